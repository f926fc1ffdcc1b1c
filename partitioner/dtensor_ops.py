"""Which graph ops DTensor can run sharded, and how the rest run under tensor parallelism.

This sits between the rewrite and the run (Plan -> **rewrite** -> run): a stage
graph exported by ``torch.export`` holds ops that DTensor has no sharding rule
for, chiefly the asserts export itself inserts (``aten._assert_tensor_metadata``
after every ``.to()``, ``aten._assert_scalar``, ``sym_constrain_range``), and
custom ops of a model (the MoE kernels of Mixtral). ``rewrite`` asks
``check_shardable`` which nodes of a tensor-parallel region DTensor cannot run
and replicates them; ``_TPInterpreter`` runs the checks with ``run_check``.

[Note: checks and queries under DTensor]
The rule is read from the op's schema, not from a list of names: an op that
returns no tensor and writes none of its arguments only *looks* at its
inputs. It is a check (it returns nothing: ``_assert_*``,
``sym_constrain_range*``, ``_print``) or a query (it returns a number or a
bool: ``sym_size``, ``is_nonzero``, ``_local_scalar_dense``). Its answer
concerns the logical tensor the graph was traced with, never a shard, so it
must not run on the local shard (``_assert_tensor_metadata`` of a column
output would see half the features and fail). Two cases:

* It reads only metadata (``METADATA_ONLY``): it runs on a stand-in with the
  DTensor's global shape, stride, dtype and device, made with
  ``torch.empty_strided`` (uninitialized, freed at once; no communication).
* Anything else may read values (``_assert_async`` checks a value): it runs
  on the whole tensor (``full_tensor()``, a gather only when the input is
  split; a replicated input is its local tensor).

``METADATA_ONLY`` is the one list: the schema cannot say whether an op reads
values, and an op missing from it is still run correctly, only with a gather.

[Note: ops DTensor cannot shard]
DTensor shards an op when it has a strategy or rule for it, a custom handler,
a decomposition it propagates through, or when the op is
``CompositeImplicitAutograd`` (it decomposes before DTensor sees it). No
public API answers the question, so ``dtensor_has_rule`` reads DTensor's
dispatcher tables; if those move in a later torch, every op is assumed
shardable and the runtime error names the node as before. A node the plan
splits whose op has no rule runs replicated (whole inputs, gathered when
split; the result is whole), which is always correct and costs a gather; the
rewrite warns once per stage, naming the op and its module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx

__all__ = [
    "METADATA_ONLY",
    "Unshardable",
    "is_check_or_query",
    "reads_metadata_only",
    "dtensor_has_rule",
    "can_shard",
    "check_shardable",
    "run_check",
    "mutated_in_place",
    "tree_full",
    "as_dtensors",
    "is_sharded",
    "contiguous_grads",
]

# Checks and queries that read a tensor's metadata (shape, stride, dtype, device), never its values.
METADATA_ONLY: frozenset[str] = frozenset(
    {
        "aten._assert_tensor_metadata",  # export's guard after .to(); the commonest by far
        "aten.sym_size",
        "aten.sym_stride",
        "aten.sym_numel",
        "aten.sym_storage_offset",
        "aten.is_same_size",
        "aten.is_contiguous",
    }
)


@dataclass(frozen=True, slots=True)
class Unshardable:
    """A node the plan runs sharded whose op DTensor has no rule for."""

    node: str  # runtime graph node name
    op: str  # e.g. "transformers.grouped_mm_fallback.default"
    module: str  # innermost module FQN ("" at the top level)
    strategy: str  # the plan's strategy for it

    def describe(self) -> str:
        return f"{self.op} in {self.module or 'the top-level module'} (node {self.node}, planned {self.strategy!r})"


def _schema(target: Any) -> Any:
    return getattr(target, "_schema", None) if isinstance(target, torch._ops.OpOverload) else None


def _packet_name(target: Any) -> str:
    return str(getattr(target, "_overloadpacket", target))


def is_check_or_query(target: Any) -> bool:
    """An ATen/custom op that returns no tensor and writes none of its arguments
    ([Note: checks and queries under DTensor])."""
    schema = _schema(target)
    if schema is None:
        return False
    if any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments):
        return False
    return not any("Tensor" in str(r.type) for r in schema.returns)


def reads_metadata_only(target: Any) -> bool:
    return _packet_name(target) in METADATA_ONLY


def dtensor_has_rule(target: Any) -> bool:
    """Whether DTensor can run ``target`` on sharded inputs ([Note: ops DTensor cannot shard])."""
    if not isinstance(target, torch._ops.OpOverload):
        return True  # Python-level functions (operator.getitem) act on the DTensors themselves
    try:
        from torch.distributed.tensor import DTensor

        dispatcher = DTensor._op_dispatcher
        prop = dispatcher.sharding_propagator
        tables = (prop.op_strategy_funcs, prop.op_single_dim_strategy_funcs, prop.op_to_rules,
                  dispatcher._custom_op_handlers)
        decomp = prop.decomp_strategy
    except AttributeError:  # DTensor's internals moved: assume it can, the runtime names the node if not
        return True
    if any(target in t for t in tables):
        return True
    if torch._C._dispatch_has_kernel_for_dispatch_key(target.name(), "CompositeImplicitAutograd"):
        return True
    return bool(getattr(decomp, "has_decomp", lambda op: False)(target))


def can_shard(target: Any) -> bool:
    """Whether a node with this target may run in a tensor-parallel region: DTensor shards it, or it
    is a check or query that ``run_check`` runs outside DTensor."""
    return is_check_or_query(target) or dtensor_has_rule(target)


def check_shardable(nodes: Iterable[fx.Node], sharding: dict[str, str]) -> tuple[Unshardable, ...]:
    """The nodes that ``sharding`` runs sharded (any strategy but ``replicate``) and DTensor cannot run."""
    out = []
    for n in nodes:
        strat = sharding.get(n.name, "replicate")
        if strat == "replicate" or n.op != "call_function" or can_shard(n.target):
            continue
        stack = n.meta.get("nn_module_stack") or {}
        module = list(stack.values())[-1][0] if stack else ""
        out.append(Unshardable(n.name, str(n.target), module, strat))
    return tuple(out)


def run_check(target: Callable[..., Any], args: Any, kwargs: Any) -> Any:
    """Run a check or query on the logical tensors behind its DTensor inputs
    ([Note: checks and queries under DTensor])."""
    from torch.distributed.tensor import DTensor
    from torch.utils._pytree import tree_map

    metadata = reads_metadata_only(target)

    def logical(x: Any) -> Any:
        if not isinstance(x, DTensor):
            return x
        if all(p.is_replicate() for p in x.placements):
            return x.to_local()
        if metadata:
            local = x.to_local()
            return torch.empty_strided(tuple(x.shape), tuple(x.stride()), dtype=x.dtype, device=local.device)
        return x.full_tensor()

    return target(*tree_map(logical, args), **tree_map(logical, kwargs))


def mutated_in_place(node: fx.Node) -> bool:
    """Whether a user of ``node`` writes into it (an in-place op such as ``div_`` or ``index_put_``)."""
    for user in node.users:
        schema = _schema(user.target)
        if schema is None:
            continue
        for i, a in enumerate(schema.arguments):
            if a.alias_info is None or not a.alias_info.is_write:
                continue
            value = user.args[i] if i < len(user.args) and not a.kwarg_only else user.kwargs.get(a.name)
            if value is node:
                return True
    return False


# --------------------------------------------------------------------------------------
# Moving between whole tensors and DTensors (what every tensor-parallel strategy uses)
# --------------------------------------------------------------------------------------


def tree_full(tree: Any) -> Any:
    """Every DTensor in ``tree`` as a whole tensor (a gather where it is split)."""
    from torch.distributed.tensor import DTensor
    from torch.utils._pytree import tree_map

    return tree_map(lambda x: x.full_tensor() if isinstance(x, DTensor) else x, tree)


def as_dtensors(tree: Any, mesh: Any) -> Any:
    """Every plain tensor of ``tree`` with at least one dim wrapped as a DTensor replicated on ``mesh``."""
    from torch.distributed.tensor import DTensor, Replicate
    from torch.utils._pytree import tree_map

    def wrap(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and not isinstance(x, DTensor) and x.dim() > 0:
            return DTensor.from_local(x, mesh, [Replicate()], run_check=False)
        return x

    return tree_map(wrap, tree)


def is_sharded(x: Any) -> bool:
    """Whether a DTensor is split over any mesh dim."""
    return any(p.is_shard() for p in x.placements)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous.

    DTensor's backward of a resharding can hand a strided local shard to the
    next op's backward, whose ``view`` then fails (seen with GPT-2's fused QKV
    split on a sharded dim); every sharded node's output passes through this.
    ``copy``: return a copy rather than a view, for an output a later op writes
    in place (autograd forbids writing into a custom Function's view; Mixtral's
    router divides its top-k weights in place)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, copy: bool) -> torch.Tensor:
        return x.clone() if copy else x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad.contiguous(), None


def contiguous_grads(tree: Any, copy: bool = False) -> Any:
    """``tree`` with every tensor that needs a gradient passed through ``_ContiguousGrad``."""
    from torch.utils._pytree import tree_map

    return tree_map(
        lambda x: _ContiguousGrad.apply(x, copy) if isinstance(x, torch.Tensor) and x.requires_grad else x, tree
    )
