"""Give a model built on ``meta`` real weights, only where this rank needs them.

Part of the run phase (capture -> ... -> Plan -> rewrite -> **run**). A model
too large for one process is built on the ``meta`` device (no storage);
``partitioner.runtime`` cuts it into the plan's stages and calls
:func:`materialize` with the names of the tensors its own stages read, so a
rank only ever allocates its stages' weights.

[Note: deterministic initialization]
Every layout must start from the same weights, or a plan change would change
the model. Each module that holds a tensor to materialize is initialized by
the model's own rule (Hugging Face's ``_init_weights``, otherwise the module's
``reset_parameters``) under a seed made from the base seed and the module's
name, with all of that module's own tensors real, so a tensor's value depends
only on its module's name and never on which other tensors this rank holds;
the module-mates this rank does not read go back to ``meta`` afterwards.
Modules are visited children first (as ``Module.apply`` does), so a parent
that re-initializes a child's weight (GPT-2's scaled ``c_proj``) has the last
word on every layout. A weight tied under two names (GPT-2's ``wte`` and
``lm_head``) is one tensor: both of its modules are initialized, in the same
order on every rank that holds it. A single-process reference built the same
way (``materialize(model, device)`` with every name) has the same weights.
"""

from __future__ import annotations

import zlib
from typing import Callable, Collection

import torch

from .errors import AutopartError
from .rewrite import canonical_names

__all__ = ["MaterializeError", "has_meta_tensors", "materialize", "release"]


class MaterializeError(AutopartError):
    """A meta tensor cannot be given values (its module has no initialization rule)."""


def has_meta_tensors(model: torch.nn.Module) -> bool:
    return any(t.is_meta for t in [*model.parameters(), *model.buffers()])


def _init_rule(model: torch.nn.Module) -> Callable[[torch.nn.Module], bool]:
    """The model's own per-module initialization; returns whether it knows the module."""
    hf_init = getattr(model, "_init_weights", None)
    if callable(hf_init) and hasattr(model, "config"):

        def hf(mod: torch.nn.Module) -> bool:
            hf_init(mod)
            return True

        return hf

    def reset(mod: torch.nn.Module) -> bool:
        fn = getattr(mod, "reset_parameters", None)
        if callable(fn):
            fn()
            return True
        return False

    return reset


def materialize(
    model: torch.nn.Module,
    device: str | torch.device,
    names: Collection[str] | None = None,
    *,
    seed: int = 0,
) -> int:
    """Allocate and initialize the meta tensors ``names`` (canonical FQNs; None: all) on ``device``.

    Returns the bytes kept. The other tensors of the modules holding them are
    materialized for the initialization and then put back on ``meta`` (see
    [Note: deterministic initialization]); every other tensor stays there.
    Tensors that are already real are left alone. Raises ``MaterializeError``
    naming a module whose tensors the model's initialization cannot set, or
    one that holds real and meta tensors at once (its initialization would
    overwrite the real ones).
    """
    canon = canonical_names(model)
    mods = dict(model.named_modules(remove_duplicate=False))
    tensors = dict([*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)])
    wanted = set(canon.values()) if names is None else {canon.get(n, n) for n in names}
    wanted = {c for c in wanted if c in tensors and tensors[c].is_meta}
    asked = set(wanted)
    # Modules holding a wanted tensor under any of its names. A module is materialized whole, so this
    # is a closure over tied tensors: every module holding any tensor that gets materialized.
    owners: set[str] = set()
    while True:
        more = {alias.rpartition(".")[0] for alias, c in canon.items() if c in wanted}
        if more <= owners:
            break
        owners |= more
        wanted |= {
            canon[full]
            for m in owners
            for table in (mods[m]._parameters, mods[m]._buffers)
            for leaf, t in table.items()
            if t is not None and (full := f"{m}.{leaf}" if m else leaf) in canon
        }
    for m in sorted(owners):
        direct = {leaf: t for table in (mods[m]._parameters, mods[m]._buffers) for leaf, t in table.items() if t is not None}
        if len({t.is_meta for t in direct.values()}) > 1:
            real = next(leaf for leaf, t in direct.items() if not t.is_meta)
            raise MaterializeError(
                f"module {m or '<root>'} ({type(mods[m]).__name__}) holds {real} on a real device and other tensors on "
                "meta; initializing it would overwrite the real one: build the module wholly on one device"
            )
    # id(meta tensor) -> (the meta tensor, kept alive so that its id is not reused; its real tensor)
    made: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    allocated = 0
    for mod_name in sorted(owners):
        mod = mods[mod_name]
        for table, is_param in ((mod._parameters, True), (mod._buffers, False)):
            for leaf, t in list(table.items()):
                if t is None or not t.is_meta:
                    continue
                if id(t) not in made:
                    data = torch.empty_like(t, device=device)
                    made[id(t)] = (t, torch.nn.Parameter(data, requires_grad=t.requires_grad) if is_param else data)
                    allocated += data.numel() * data.element_size()
                table[leaf] = made[id(t)][1]
    # The same tensor under its other names (tied weights), wherever they live.
    for mod_name, mod in mods.items():
        for table in (mod._parameters, mod._buffers):
            for leaf, t in list(table.items()):
                if t is not None and id(t) in made and made[id(t)][0] is t:
                    table[leaf] = made[id(t)][1]
    canon_of = {id(t): canon[n] for n, t in [*model.named_parameters(remove_duplicate=False),
                                                 *model.named_buffers(remove_duplicate=False)] if n in canon}
    init = _init_rule(model)
    todo = [name for name in mods if any(name == o or o.startswith(name + ".") or name == "" for o in owners)]
    with torch.no_grad():
        for name in reversed(todo):  # reversed pre-order: every module after all of its descendants
            mod = mods[name]
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
                known = init(mod)
            direct = [leaf for table in (mod._parameters, mod._buffers) for leaf, t in table.items() if t is not None]
            if name in owners and direct and not known:
                raise MaterializeError(
                    f"module {name or '<root>'} ({type(mod).__name__}) holds {direct[0]} on meta but has no "
                    "reset_parameters to initialize it; build that part of the model on a real device, or give the "
                    "module a reset_parameters()"
                )
    # Tensors made only so that their module's initialization draws the same numbers everywhere.
    extra = wanted - asked
    release(model, extra)
    return allocated - sum(made_t.numel() * made_t.element_size() for _, made_t in made.values()
                           if canon_of.get(id(made_t)) in extra)


def release(model: torch.nn.Module, names: Collection[str]) -> None:
    """Put the tensors ``names`` (canonical FQNs, every alias) of ``model`` back on ``meta``, freeing them."""
    canon = canonical_names(model)
    gone = {canon.get(n, n) for n in names}
    mods = dict(model.named_modules(remove_duplicate=False))
    metas: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (tensor kept alive, its meta twin)
    for alias, c in canon.items():
        if c not in gone:
            continue
        mod_name, _, leaf = alias.rpartition(".")
        mod = mods[mod_name]
        table = mod._parameters if leaf in mod._parameters else mod._buffers
        t = table[leaf]
        if id(t) not in metas:
            data = torch.empty_like(t, device="meta")
            metas[id(t)] = (t, torch.nn.Parameter(data, requires_grad=t.requires_grad) if isinstance(t, torch.nn.Parameter) else data)
        table[leaf] = metas[id(t)][1]
