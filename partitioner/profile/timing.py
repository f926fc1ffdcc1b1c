"""Timing blocks and nodes on this device; see [Note: profiling one block at a time] and
[Note: nodes alone and the block] in the package."""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import time
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import fx

from cost_models import MeasuredLoss, MeasuredOp, NodeRef

from ..capture import CapturedModel, NodeInfo, flat_tensors, loss_kind
from ..graph import Block, PartitionGraph
from ..tp_strategies import STRATEGIES, allowed_strategies
from .values import Measurement, NO_TIME, ProfileError, ProfileOptions, ProfileResult, ProfileStats, Timing, device_name
from .cache import ProfileCache


# --------------------------------------------------------------------------------------
# Profiling
# --------------------------------------------------------------------------------------


def profile_model(
    pgraph: PartitionGraph, cache: ProfileCache, options: ProfileOptions = ProfileOptions()
) -> ProfileResult:
    """Measure every block of ``pgraph`` (and its compute nodes and their shards) on ``options.device``."""
    return _Profiler(pgraph, cache, options).run()


def _dtype_of(t: Any) -> torch.dtype | None:
    return t.dtype if isinstance(t, torch.Tensor) else None


def _spec(a: Any) -> Any:
    """A printable, hashable description of an argument: tensors by shape, dtype and strides."""
    if isinstance(a, fx.Node):
        v = a.meta.get("val")
        return _spec(v) if v is not None else f"node:{a.name}"
    if isinstance(a, torch.Tensor):
        return f"T{tuple(a.shape)}:{str(a.dtype).removeprefix('torch.')}:{tuple(a.stride())}"
    if isinstance(a, (list, tuple)):
        return [_spec(x) for x in a]
    if isinstance(a, dict):
        return {str(k): _spec(v) for k, v in sorted(a.items())}
    if isinstance(a, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
        return str(a)
    return repr(a)


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class _Clock:
    """Wall time on CPU (or the process's CPU time, on request), CUDA events on a GPU."""

    def __init__(self, device: torch.device, kind: str = "wall") -> None:
        self.cuda = device.type == "cuda"
        self.now = time.process_time if kind == "cpu" and not self.cuda else time.perf_counter

    def time(self, fn: Callable[[], Any]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = self.now()
        fn()
        return self.now() - t0

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


class _Profiler:
    def __init__(self, pgraph: PartitionGraph, cache: ProfileCache, options: ProfileOptions) -> None:
        self.pgraph = pgraph
        self.cap: CapturedModel = pgraph.captured
        if self.cap.tracer != "export":
            raise ProfileError(
                f"{self.cap.name} was captured with torch.fx, whose graph calls modules; profiling runs "
                "torch.export graphs only. Fix what stops torch.export (see `autopart inspect`), or plan without --profile"
            )
        self.cache = cache
        self.opt = options
        self.device = torch.device(options.device)
        self.device_name = device_name(options.device)
        self.torch_version = torch.__version__
        self.clock = _Clock(self.device, options.clock)
        self.fx_nodes = {n.name: n for n in self.cap.graph_module.graph.nodes}
        self.grad_nodes = {n for n, info in self.cap.nodes.items() if info.needs_grad}
        self.started = time.perf_counter()
        self.measured = self.cached = self.unmeasured = 0
        self.corrupt_before = cache.corrupt
        self.nodes: dict[NodeRef, Measurement] = {}
        self.blocks: dict[str, Measurement] = {}
        self.by_key: dict[str, Measurement] = {}
        self.in_block: dict[NodeRef, MeasuredOp] = {}

    # --- bookkeeping ------------------------------------------------------------------

    def over_budget(self) -> bool:
        return self.opt.budget_s is not None and time.perf_counter() - self.started > self.opt.budget_s

    def node_signature(self, node: fx.Node) -> str:
        return json.dumps([str(node.target), _spec(node.args), _spec(node.kwargs),
                           [a.name in self.grad_nodes for a in node.all_input_nodes]])

    def cache_key(self, kind: str, signature: str, strategy: str, tp: int) -> str:
        return _key(kind, signature, strategy, tp, self.opt.dtype, self.device_name, self.torch_version, self.opt.clock)

    def lookup(self, key: str) -> Measurement | None:
        if key in self.by_key:
            return self.by_key[key]
        m = self.cache.get(key)
        if m is not None:
            self.cached += 1
            self.by_key[key] = m
        return m

    def store(self, key: str, kind: str, m: Measurement) -> None:
        self.measured += 1
        self.by_key[key] = m
        self.cache.put(key, kind, self.device_name, self.torch_version, self.opt.dtype, m)

    # --- what to measure --------------------------------------------------------------

    def compute_nodes(self, block: Block) -> list[NodeInfo]:
        """Nodes that run something: ops, and views too (no kernel, but a dispatcher call each)."""
        return [
            info for info in (self.cap.nodes[n] for n in block.nodes)
            if info.outputs and info.op in ("call_function", "call_method")
        ]

    def variants(self, info: NodeInfo) -> list[tuple[str, int]]:
        """(strategy, tp) shards of ``info`` to measure besides the whole op: those whose strategy
        times its shard (``TPStrategy.measured``; others are scaled from the whole op)."""
        return [
            (strat, tp)
            for tp in self.opt.tp_degrees
            for strat in allowed_strategies(info, self.cap, tp)
            if STRATEGIES[strat].divides_work and STRATEGIES[strat].measured(info.target)
        ]

    # --- the run ----------------------------------------------------------------------

    def run(self) -> ProfileResult:
        blocks = list(self.pgraph.blocks)
        loss = self.profile_loss()  # first: cheap, and not left out by a budget the blocks use up
        bar = _progress(self.opt.progress, len(blocks))
        try:
            for block in blocks:
                if bar:
                    bar.advance(block.name)
                self.profile_block(block)
        finally:
            if bar:
                bar.close()
            self.cache.commit()
        stats = ProfileStats(self.measured, self.cached, self.cache.corrupt - self.corrupt_before, self.unmeasured,
                             time.perf_counter() - self.started)
        return ProfileResult(self.device_name, self.torch_version, self.opt.dtype, dict(self.nodes), dict(self.blocks), stats,
                             dict(self.in_block), loss)

    def profile_loss(self) -> MeasuredLoss | None:
        """The training loss on the model's largest floating output (the logits), at the capture batch
        ([Note: the loss's time] in cost_models/profiled.py); None where the model has no such output."""
        kind = loss_kind(self.cap)
        if kind == "in_graph":  # the graph's own blocks compute the loss: they are profiled as blocks
            return None
        outs = [v for n in sorted(self.pgraph.model_outputs) for v in flat_tensors(self.fx_nodes[n].meta.get("val"))
                if n in self.fx_nodes and v.dtype.is_floating_point]
        if not outs:
            return None
        meta = max(outs, key=lambda v: v.numel() * v.element_size())
        shape = tuple(int(s) for s in meta.shape)
        key = self.cache_key("loss", json.dumps([kind, shape, str(meta.dtype)]), "replicate", 1)
        m = self.lookup(key)
        if m is None:
            if self.over_budget():
                self.unmeasured += 1
                return None
            try:
                m = self.time_loss(kind, shape, meta.dtype)
            except Exception as exc:  # the loss raises many types
                raise ProfileError(f"timing the loss ({kind} on outputs of shape {list(shape)}) failed: "
                                   f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
            self.store(key, "loss", m)
        # the evaluator asks by all the outputs' bytes (as it sizes the loss's memory): the same measure here
        return MeasuredLoss(kind, float(self.pgraph.output_bytes), m.forward.median_s, m.backward.median_s)

    def time_loss(self, kind: str, shape: tuple[int, ...], dtype: torch.dtype) -> Measurement:
        """Time ``kind`` as the runtime computes it (runtime/loop.py), forward and backward, on random outputs."""
        out = torch.randn(shape, dtype=dtype, device=self.device)
        if kind == "cross_entropy":
            target = torch.randint(0, shape[-1], shape[:-1], device=self.device)

            def loss(o: torch.Tensor) -> torch.Tensor:
                return torch.nn.functional.cross_entropy(o.reshape(-1, o.shape[-1]), target.reshape(-1))
        else:
            target = torch.randn(shape, dtype=dtype, device=self.device)

            def loss(o: torch.Tensor) -> torch.Tensor:
                return torch.nn.functional.mse_loss(o, target)

        def leaf() -> torch.Tensor:
            return out.detach().requires_grad_(True)

        with torch.enable_grad():
            forward = self.repeat(leaf, loss)
            backward = self.repeat(lambda: loss(leaf()), lambda v: v.backward())
        nbytes = out.numel() * out.element_size()
        return Measurement(f"loss.{kind}", "replicate", 1, forward, backward, 0.0, 0.0, float(nbytes))

    def profile_block(self, block: Block) -> None:
        infos = self.compute_nodes(block)
        wanted: list[tuple[NodeInfo, str, int, str]] = []  # (node, strategy, tp, key) not yet known
        node_keys: dict[str, str] = {}
        for info in infos:
            sig = self.node_signature(self.fx_nodes[info.name])
            node_keys[info.name] = sig
            for strat, tp in [("replicate", 1), *self.variants(info)]:
                key = self.cache_key("node", sig, strat, tp)
                m = self.lookup(key)
                if m is None:
                    wanted.append((info, strat, tp, key))
                else:
                    self.nodes[NodeRef(info.name, strat, tp)] = m
        block_sig = json.dumps([node_keys.get(n, "") for n in block.nodes] + [self._boundary_specs(block)])
        # "split": rows measured since blocks are timed split as well ([Note: the split backward per block])
        block_key = self.cache_key("block", block_sig + "split", "replicate", 1)
        bm = self.lookup(block_key)
        if bm is not None:
            self.blocks[block.name] = bm
        if not wanted and bm is not None:
            self.share_out(block, infos, bm, block_key, fresh=False)
            return
        if self.over_budget():
            self.unmeasured += len(wanted) + (bm is None)
            return
        env = self.materialize(block)
        try:
            self.forward_block(block, env)
            for info, strat, tp, key in wanted:
                if key in self.by_key:  # a twin earlier in this block (same op, same shapes)
                    self.nodes[NodeRef(info.name, strat, tp)] = self.by_key[key]
                    continue
                if self.over_budget():
                    self.unmeasured += 1
                    continue
                try:
                    m = self.time_node(info, env, strat, tp)
                except Exception as exc:
                    raise ProfileError(
                        f"block {block.name}: timing node {info.name} ({info.target}, {strat} at tp={tp}) failed: "
                        f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                    ) from None
                self.store(key, "node", m)
                self.nodes[NodeRef(info.name, strat, tp)] = m
            if bm is None:
                if self.over_budget():
                    self.unmeasured += 1
                else:
                    bm = self.time_block(block, env)
                    self.store(block_key, "block", bm)
                    self.blocks[block.name] = bm
            if bm is not None:
                self.share_out(block, infos, bm, block_key, fresh=True)
        finally:
            env.clear()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def share_out(self, block: Block, infos: Sequence[NodeInfo], bm: Measurement, block_key: str, fresh: bool) -> None:
        """In-block node times; see [Note: nodes alone and the block]. ``fresh``: also file them for fitting."""
        alone = [(info, self.nodes.get(NodeRef(info.name))) for info in infos]
        if any(m is None for _, m in alone) or not alone:
            return  # the budget ran out inside this block: keep the nodes as measured

        def shares(total: float, parts: list[float]) -> list[tuple[float, float]]:
            """(add, scale) per part so that the parts sum to ``total``."""
            have = sum(parts)
            counted = sum(1 for p in parts if p > 0) or 1
            if total >= have:
                return [((total - have) / counted if p > 0 else 0.0, 1.0) for p in parts]
            return [(0.0, total / have if have > 0 else 1.0) for _ in parts]

        fwd = shares(bm.forward.median_s, [m.forward.median_s for _, m in alone])
        bwd = shares(bm.backward.median_s, [m.backward.median_s for _, m in alone])
        for i, ((info, _), (fa, fs), (ba, bs)) in enumerate(zip(alone, fwd, bwd)):
            refs = [NodeRef(info.name, st, tp) for st, tp in [("replicate", 1), *self.variants(info)]]
            for ref, m in [(r, self.nodes[r]) for r in refs if r in self.nodes]:
                op = MeasuredOp(
                    m.forward.median_s * fs + fa,
                    (m.backward.median_s * bs + ba) if m.backward.reps else 0.0,
                    m.forward_flops, m.backward_flops, m.bytes_moved, m.param_bytes,
                )
                self.in_block[ref] = op
                if fresh:
                    key = self.cache_key("sample", json.dumps([block_key, i]), ref.strategy, ref.tp)
                    self.cache.put_sample(key, self.device_name, self.torch_version, self.opt.dtype, m.op, op)

    def _boundary_specs(self, block: Block) -> list[Any]:
        inside = set(block.nodes)
        return [
            [a.name in self.grad_nodes, _spec(a)]
            for n in block.nodes
            for a in self.fx_nodes[n].all_input_nodes
            if a.name not in inside
        ]

    # --- tensors ----------------------------------------------------------------------

    def materialize(self, block: Block) -> dict[str, Any]:
        """Values for everything the block reads from outside it; see [Note: profiling one block at a time]."""
        inside = set(block.nodes)
        env: dict[str, Any] = {}
        for n in block.nodes:
            for a in self.fx_nodes[n].all_input_nodes:
                if a.name in inside or a.name in env:
                    continue
                bound = self._index_bound(a, block)
                env[a.name] = self._make(a.meta.get("val"), a.name in self.grad_nodes, a.name in self.cap.param_nodes, bound)
        return env

    def _index_bound(self, producer: fx.Node, block: Block) -> int | None:
        """Rows of the embedding that ``producer`` indexes inside ``block``, if it does."""
        bounds = []
        for user in producer.users:
            if user.name in block.nodes and _base(str(user.target)) == "embedding" and user.args[1] is producer:
                weight = user.args[0].meta.get("val") if isinstance(user.args[0], fx.Node) else None
                if isinstance(weight, torch.Tensor):
                    bounds.append(int(weight.shape[0]))
        return min(bounds) if bounds else None

    def _make(self, val: Any, grad: bool, is_param: bool, bound: int | None) -> Any:
        if isinstance(val, (list, tuple)):
            return type(val)(self._make(v, grad, is_param, bound) for v in val)
        if not isinstance(val, torch.Tensor):
            return val  # ints, symbolic sizes already concrete, None
        shape, stride = tuple(int(s) for s in val.shape), tuple(int(s) for s in val.stride())
        t = torch.empty_strided(shape, stride, dtype=val.dtype, device=self.device)
        if val.dtype.is_floating_point:
            t.normal_(0.0, 0.02 if is_param else 1.0)
            return t.requires_grad_(grad)
        if val.dtype == torch.bool:
            return t.fill_(True)
        if bound is not None:
            return t.random_(0, bound)
        return t.zero_()

    def _on_device(self, obj: Any) -> Any:
        """The capture ran on meta: factory ops and ``.to`` name that device; run them here instead."""
        if isinstance(obj, torch.device) and obj.type == "meta":
            return self.device
        if isinstance(obj, (list, tuple)):
            return type(obj)(self._on_device(o) for o in obj)
        if isinstance(obj, dict):
            return {k: self._on_device(v) for k, v in obj.items()}
        return obj

    def _runnable_here(self, node: fx.Node, args: Any) -> Any:
        """``args`` as this device's kernel of ``node`` takes them. The CPU's histc counts floating-point
        values only: a model that picks the dtype by its device (transformers' Mixtral counts its experts in
        int32 on a GPU, float32 on a CPU) took the GPU's when captured on meta."""
        if node.target is torch.ops.aten.histc.default and self.device.type == "cpu" and not args[0].is_floating_point():
            return (args[0].float(), *args[1:])
        return args

    def _call(self, node: fx.Node, env: Mapping[str, Any]) -> Any:
        if "_assert" in str(node.target):
            return None  # metadata assertions (they name the capture's meta device) do no work
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda a: env[a.name])
        args, kwargs = self._on_device(args), self._on_device(kwargs)
        args = self._runnable_here(node, args)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            obj, *rest = args
            return getattr(obj, node.target)(*rest, **kwargs)
        raise ProfileError(f"node {node.name} ({node.op} {node.target}) cannot be run on its own; profiling needs torch.export graphs")

    def forward_block(self, block: Block, env: dict[str, Any]) -> None:
        """Run the block once, leaving every node's real output in ``env`` (its nodes' inputs)."""
        with torch.enable_grad():
            for n in block.nodes:
                node = self.fx_nodes[n]
                try:
                    env[n] = self._call(node, env)
                except ProfileError:
                    raise
                except Exception as exc:
                    raise ProfileError(
                        f"block {block.name}: node {n} ({node.format_node()}) failed on real tensors: "
                        f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                    ) from None

    # --- timing -----------------------------------------------------------------------

    def repeat(self, setup: Callable[[], Any], timed: Callable[[Any], Any]) -> Timing:
        """Warm up, then time ``timed(setup())`` until ``max_reps`` or ``target_s`` (at least ``min_reps``)."""

        def run() -> tuple[float]:
            state = setup()
            return (self.clock.time(lambda: timed(state)),)

        return Timing.of([t for (t,) in self.repeated(run)])

    def repeated(self, run: Callable[[], tuple[float, ...]]) -> list[tuple[float, ...]]:
        """``run()`` (it returns the seconds of its timed parts) after the warm-up runs, until ``max_reps`` or
        ``target_s`` of timed parts (at least ``min_reps``): the stopping rule of every timing here."""
        for _ in range(self.opt.warmup):
            run()
        self.clock.sync()
        runs: list[tuple[float, ...]] = []
        spent = 0.0
        while len(runs) < self.opt.max_reps and (len(runs) < self.opt.min_reps or spent < self.opt.target_s):
            runs.append(run())
            spent += sum(runs[-1])
        return runs

    def _variant_args(self, node: fx.Node, env: Mapping[str, Any], strat: str, tp: int) -> tuple[tuple, dict]:
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda a: env[a.name])
        args, kwargs = self._on_device(args), self._on_device(kwargs)
        if strat == "replicate":
            return tuple(args), dict(kwargs)
        args, kwargs = list(args), dict(kwargs)
        STRATEGIES[strat].local_args(str(node.target), args, kwargs, tp)
        return tuple(args), dict(kwargs)

    def time_node(self, info: NodeInfo, env: Mapping[str, Any], strat: str, tp: int) -> Measurement:
        node = self.fx_nodes[info.name]
        args, kwargs = self._variant_args(node, env, strat, tp)
        args = self._runnable_here(node, args)
        target = node.target if node.op == "call_function" else None

        def call(a: tuple, k: dict) -> Any:
            if target is not None:
                return target(*a, **k)
            obj, *rest = a
            return getattr(obj, node.target)(*rest, **k)

        written, written_kw = _written(node)

        def fresh() -> tuple[tuple, dict]:  # leaves, so backward stops at this op
            def leaf(x: Any) -> Any:
                if isinstance(x, torch.Tensor) and x.requires_grad:
                    return x.detach().requires_grad_(True)
                return x

            def own(x: Any) -> Any:  # an in-place op's target, copied: repeated calls must not change env
                return x.clone() if isinstance(x, torch.Tensor) else x

            a = [own(_map(leaf, x)) if i in written else _map(leaf, x) for i, x in enumerate(args)]
            return tuple(a), {k: own(_map(leaf, v)) if k in written_kw else _map(leaf, v) for k, v in kwargs.items()}

        with torch.enable_grad():
            a0, k0 = fresh()
            outs = [t for t in flat_tensors(call(a0, k0)) if t.grad_fn is not None and t.dtype.is_floating_point]
            grads = [torch.randn_like(t) for t in outs]
            forward = self.repeat(lambda: fresh(), lambda s: call(*s))
            if outs:
                def setup() -> list[torch.Tensor]:
                    a, k = fresh()
                    return [t for t in flat_tensors(call(a, k)) if t.grad_fn is not None and t.dtype.is_floating_point]

                backward = self.repeat(setup, lambda o: torch.autograd.backward(o, grads))
            else:
                backward = NO_TIME
        div = tp if strat != "replicate" else 1
        moved = 0 if info.is_view else info.bytes_read + info.bytes_written  # as sharding.BlockLayoutCosts prices it
        pbytes = 0 if info.is_view else sum(self.cap.params[p].bytes for p in info.params if p in self.cap.params)
        return Measurement(
            info.op_label, strat, div, forward, backward,
            info.forward_flops / div, info.backward_flops / div, moved / div, None, pbytes / div,
        )

    def time_block(self, block: Block, env: Mapping[str, Any]) -> Measurement:
        """The whole block, forward and backward, from the inputs in ``env``."""
        inside = set(block.nodes)
        leaving = [
            n for n in block.nodes
            if n in self.pgraph.model_outputs or any(u.name not in inside for u in self.fx_nodes[n].users)
        ]
        inputs = {k: v for k, v in env.items() if k not in inside}

        def forward() -> dict[str, Any]:
            local = dict(inputs)
            with torch.enable_grad():
                for n in block.nodes:
                    local[n] = self._call(self.fx_nodes[n], local)
            return local

        def outputs(local: Mapping[str, Any]) -> list[torch.Tensor]:
            return [t for n in leaving for t in flat_tensors(local[n]) if t.grad_fn is not None and t.dtype.is_floating_point]

        grads = [torch.randn_like(t) for t in outputs(forward())]
        activation = None
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            kept = forward()
            torch.cuda.synchronize()
            activation = int(torch.cuda.max_memory_allocated(self.device) - before)
            del kept
        fwd = self.repeat(lambda: None, lambda _: forward())
        bwd = self.repeat(lambda: outputs(forward()), lambda o: torch.autograd.backward(o, grads)) if grads else NO_TIME
        # [Note: the split backward per block]: the inputs that need a gradient, as a later stage's do
        needing = [v for k, v in inputs.items() if k not in self.cap.param_nodes and isinstance(v, torch.Tensor)
                   and v.requires_grad]
        weights = [v for k, v in inputs.items() if k in self.cap.param_nodes and isinstance(v, torch.Tensor)
                   and v.requires_grad]
        split: tuple[Timing | None, Timing | None] = (None, None)
        if grads and needing:
            # torch's split may refuse a block (RuntimeError): it keeps no split timing, and the calibrated
            # per-node figures price it
            with contextlib.suppress(RuntimeError):
                split = self.repeat_split(lambda: outputs(forward()), grads, needing, weights)
        return Measurement(block.name, "replicate", 1, fwd, bwd, float(block.forward_flops), float(block.backward_flops),
                           float(block.bytes_read + block.bytes_written), activation, 0.0, *split)

    def repeat_split(self, outputs: Callable[[], list[torch.Tensor]], grads: list[torch.Tensor],
                     needing: list[torch.Tensor], weights: list[torch.Tensor]) -> tuple[Timing, Timing]:
        """The backward of ``outputs()`` as torch's zero-bubble schedules run a stage's: ``stage_backward_input``
        (the gradients of ``needing``) then ``stage_backward_weight`` (of ``weights``), each timed, repeated as
        every timing here is (``repeated``; [Note: the split backward per block] in profile/__init__.py)."""
        from torch.distributed.pipelining._backward import stage_backward_input, stage_backward_weight

        def run() -> tuple[float, float]:
            # torch detaches a stage's outputs in place after I, which a view refuses: such an output is
            # cloned first, untimed (the clone's backward, a pass-through, is timed with I)
            out = [t.clone() if t._is_view() else t for t in outputs()]
            groups: list[Any] = []

            def first() -> None:
                groups.extend(stage_backward_input(out, grads, needing, iter(weights))[1])

            i = self.clock.time(first)
            w = self.clock.time(lambda: stage_backward_weight(iter(weights), groups)) if weights else 0.0
            return i, w

        halves = self.repeated(run)
        return Timing.of([i for i, _ in halves]), Timing.of([w for _, w in halves])


def measure_blocks(pgraph: PartitionGraph, blocks: Sequence[int], options: ProfileOptions = ProfileOptions()) -> Measurement:
    """Forward and backward of ``blocks`` run together, as one pipeline stage runs them (not cached).

    For checking the simulator's per-stage times against a real run of the
    stage's blocks in one process (benchmarks/stage_fidelity.py).
    """
    from dataclasses import replace

    members = [pgraph.blocks[i] for i in sorted(blocks)]
    nodes = tuple(n for b in members for n in b.nodes)
    unit = replace(
        members[0], name="+".join(b.name for b in members) if len(members) < 4 else f"{members[0].name}..{members[-1].name}",
        nodes=nodes, forward_flops=sum(b.forward_flops for b in members),
        backward_flops=sum(b.backward_flops for b in members), bytes_read=sum(b.bytes_read for b in members),
        bytes_written=sum(b.bytes_written for b in members),
    )
    with ProfileCache(":memory:") as cache:
        prof = _Profiler(pgraph, cache, options)
        env = prof.materialize(unit)
        return prof.time_block(unit, env)


def _written(node: fx.Node) -> tuple[frozenset[int], frozenset[str]]:
    """The positions and keywords of the arguments ``node``'s op writes in place (``add_``'s self, an
    ``out=``), by its schema. Timing such a node alone calls it many times: on the block's own values it
    would add to them again each time, and the nodes timed after it would read what it made of them
    (T5's relative position buckets, ``relative_buckets += ...``, indexed an embedding out of range)."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return frozenset(), frozenset()
    written = [(i, a) for i, a in enumerate(schema.arguments) if a.alias_info is not None and a.alias_info.is_write]
    return frozenset(i for i, a in written if not a.kwarg_only), frozenset(a.name for _, a in written)


def _map(fn: Callable[[Any], Any], obj: Any) -> Any:
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map(fn, o) for o in obj)
    return fn(obj)


def _base(target: str) -> str:
    """``aten.addmm.default`` -> ``addmm``."""
    parts = target.split(".")
    return parts[1] if target.startswith("aten.") and len(parts) > 1 else parts[0]


class _Bar:
    def __init__(self, total: int) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("profiling"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.description}"),
            console=Console(stderr=True), transient=True,
        )
        self.task = self.progress.add_task("", total=total)
        self.progress.start()
        self.first = True

    def advance(self, label: str) -> None:
        if not self.first:
            self.progress.advance(self.task)
        self.first = False
        self.progress.update(self.task, description=label)

    def close(self) -> None:
        self.progress.advance(self.task)
        self.progress.stop()


def _progress(enabled: bool | None, total: int) -> _Bar | None:
    if enabled is None:
        enabled = sys.stderr.isatty()
    return _Bar(total) if enabled and total > 1 else None


