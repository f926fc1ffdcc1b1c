"""Measured costs of the software stack that the roofline and alpha-beta models do not see.

The analytic model prices an op by its FLOPs and bytes and a collective by its
link. On a GPU that is most of a training step. On a CPU with gloo (issue 12:
predictions 5-80% off the measured step) a large part of the step is the
software around the kernels: Python per pipeline action, the tensor-parallel
interpreter and DTensor's dispatch per graph node, the optimizer's loop over
parameter tensors, and a gradient reduction that cannot hide behind compute
when the ranks share the cores. ``Overheads`` holds those costs as figures
``autopart calibrate`` measures on the live process group
(partitioner/calibrate.py), stored in the cluster file's ``[overheads]``
table; the evaluator and the simulator (partitioner/evaluate.py,
partitioner/simulate.py) add them. Every field defaults to "not measured",
which adds nothing: a cluster without the table (every GPU preset) is priced
as before.

[Note: software overheads]
With ``M`` micro-batches, a stage ``s`` whose blocks hold ``N_s`` graph nodes,
``D_s`` of them run on DTensors (strategy other than ``replicate``), and whose
rank updates ``T_s`` parameter tensors of ``P_s`` elements:

* every op's compute, as the cost model prices it from one process alone
  (the profiler's CPU time, the calibrated device rates), times
  ``k = compute_slowdown``, the wall time of every rank computing at once over
  that: the ranks share the machine (4 ranks on 2 cores run at half speed);
* per pipeline action (one forward or one whole backward of one micro-batch on
  one stage; torch's schedule, its sends and receives posted and waited):
  ``F_s += a_action``, ``B_s += a_action``, so a rank pays ``2 M a_action``
  per stage, and the simulator puts it on the critical path. The schedules of
  several stages a rank (interleaved, zb, zbv, dualpipev) run on torch's other
  runtime (``_PipelineScheduleRuntime``: each send and receive its own action
  and its own batch), whose action costs more: ``a_action_multi`` (stages in a
  loop) and ``a_action_v`` (in a V, whose middle hand-off stays on the rank)
  take its place there (``schedule_action``). On the 2-core machine, 2 ranks
  (gloo), calibrate's tiny pipelines: ``a_action`` 295 us, ``a_action_multi``
  752 us, ``a_action_v`` 425 us (4 ranks: 601, 984, 789 us);
* per step and rank (the schedule's set-up, the loss's all-reduce):
  ``a_step``, once per rank, after its optimizer step;
* per graph node under tensor parallelism (``tp > 1``: the stage runs node by
  node through the tp interpreter, rewrite.TensorParallelModule):
  ``F += N_s a_node + D_s a_dtensor`` and
  ``B += N_s a_node_bwd + D_s a_dtensor_bwd`` per micro-batch;
* the optimizer step, per rank after its gradient reduction:
  ``t_opt = T_s a_tensor + P_s (w + g + o) / B_opt``, where ``w``, ``g``, ``o``
  are the weight, gradient and optimizer-state bytes per parameter (the update
  reads and writes each), and under ZeRO-1 ``T_s`` and ``P_s`` are divided
  over dp and each tensor is broadcast from its owner (priced by the link as
  an all-gather of the tensor's ``1/dp`` share), plus ``T_s a_zero1`` over all
  the stage's tensors: ZeroRedundancyOptimizer's own work per tensor and step
  (its bookkeeping around the local step, each broadcast's issue and wait;
  ``benchmarks/zero1_step.py`` on llama-tiny's 39 tensors, 2 CPU ranks: its step
  took a median 17.1 ms where AdamW over all of them took 3.3 ms and the 39
  broadcasts alone 9.3 ms, benchmarks/results/2026-12-05-zero1.md);
* per FSDP unit under ZeRO-2/3 (``dp > 1``: fully_shard's hooks, the copy-in
  and copy-out around each collective, DTensor's wrapping of the unit's
  parameters; the collectives themselves are priced by the link, one per
  unit: [Note: FSDP prefetch overlap] in partitioner/evaluate.py), with
  ``n_s`` units in the stage and ``r`` gathers per micro-batch (1 for ZeRO-2,
  2 for ZeRO-3): ``F_s += n_s a_fsdp`` and
  ``B_s += n_s (a_fsdp_bwd + (r - 1) a_fsdp)`` per micro-batch (a backward's
  regather costs what a forward's gather does);
* the optimizer step over FSDP's DTensor parameters: every rank updates all
  ``T_s`` tensors (each a ``1/dp`` shard), ``t_opt = T_s (a_tensor + a_opt_dtensor)
  + (P_s / dp) (w + g + o) / B_opt``: each tensor's update runs through
  DTensor's dispatch, once per op of the single-tensor AdamW;
* per ``torch.utils.checkpoint`` call (each recomputed block, and with selective
  recomputation each other block's attention core; [Note: recompute in the runtime] in
  partitioner/recompute.py), per micro-batch: ``F += C_s a_ckpt + n_s a_ckpt_node`` and
  ``B += C_s a_ckpt_bwd`` with ``C_s`` the stage's calls and ``n_s`` the graph nodes inside
  them that save a tensor for their backward (``Evaluator.saving_nodes``; one per attention
  core): the checkpoint's own machinery (the RNG state it keeps and restores, the replay's
  set-up, per call; in the forward its hook on every tensor a node saves, per such node),
  beyond the replayed forward the cost model prices. The backward is priced per call only:
  per node it was not one figure (benchmarks/checkpoint_cost.py, one process's CPU time:
  blocks of a linear and GELUs gave 33 us a node, GPT-2's and Llama's layers, 12 and 22
  saving nodes each, less than the per-call figure in all), while the forward's per-node
  term brought mlp, gpt2-tiny and llama-tiny each closer (results/2026-12-05-bwdfit.md).
  On the 2-core CPU of development, one process alone, about 0.09 ms a call and 0.02 ms a
  node forward, 0.15 ms a call backward, more than a tiny block's own compute;
* per point-to-point transfer between pipeline stages on different ranks (an
  activation forward, its gradient back), beyond the link's ``alpha + S / B``:
  ``send_s += a_p2p + (n_f - 1) a_p2p_tensor`` and ``grad_send_s += a_p2p + (n_b - 1)
  a_p2p_tensor`` for a cut carrying ``n_f`` tensors forward and ``n_b`` gradients back.
  torch's stage sends each tensor of a boundary as its own operation, and a gradient only
  where one is needed: GPT-2's cut sends its attention mask beside the hidden state,
  Llama's also the rotary cosine and sine tables, and one gradient comes back. A further
  tensor costs less than the first, and the third and fourth little more than the second: the
  busy pipeline below with 1, 2 and 4 tensors a transfer waited 1913, 2560 and 2682 us
  per transfer (medians of 6 rounds, benchmarks/p2p_tensors.py,
  results/2026-12-06-p2p-tensors.md). The link is measured by a ping-pong between idle ranks;
  in a pipeline the ranks compute while their transfers are due, and a gloo
  transfer needs its sender's communication thread, and its receiver's waiting
  thread, to get a core back from the computing ones (a one-way 64 KiB transfer
  whose sender computed arrived a median 3.56 ms late at load 1.2 on the 2-core
  CPU of development, and a mean 0.85 ms at load 0.7, against 0.2 ms with the
  sender idle: benchmarks/results/2026-12-05-p2pwait.md), and torch's ``Schedule1F1B`` fires a send only with the
  next receive and waits for both. ``a_p2p`` is what a 1F1B pipeline whose ranks
  compute waits per transfer beyond the simulator's link and action terms
  ([Note: measuring overheads] in partitioner/calibrate.py). It delays the
  receiver only (a transfer occupies neither rank), so it costs a step only where
  a rank waits for that transfer: on the critical path, ``2 (p - 1)`` transfers
  and more for every micro-batch the schedule's order makes wait;
* in a stage whose backward a zero-bubble schedule (``zb``, ``zbv``) splits into its input
  half (I) and its weight half (W), per micro-batch: ``I_s += G_s a_split`` and
  ``W_s += P_s a_split_w``, with ``G_s`` the stage's graph nodes that need a gradient and
  ``P_s`` its trainable parameter tensors. torch runs the split as ``stage_backward_input``
  then ``stage_backward_weight`` (torch/distributed/pipelining/_backward.py): I walks the
  stage's autograd graph in Python to group its weights with the intermediates that feed
  them and hooks each intermediate; W runs one ``autograd.grad`` per group; a fused
  backward is one C++ pass. On the 2-core CPU of development a stack of 16 layers
  (LayerNorm, Linear, GELU) of width 64 took 2.9 ms split against 0.9 ms fused; GPT-2's
  layers, mostly views and elementwise ops (41 nodes, 12 weights in gpt2-tiny's layer),
  cost less per node than such weight-dense stacks, so the two are measured apart. The
  zero-bubble fidelity layout's stages after the first measured 0.7-1.2 ms a micro-batch
  of backward beyond the model without it
  (benchmarks/results/2026-12-06-fidelity-session11-b.md). torch runs the first stage's
  backward whole (its inputs need no gradient): stage 0 pays none. DualPipeV splits only a
  few backwards at its ends and runs its steady state whole: those few pay on their own I and
  W actions (``StageCost.split_input_s`` and ``split_weight_s``), its whole backwards nothing.
  These two figures price the blocks the profiler did not time split; a block it did is
  priced by its own measurement ([Note: the split backward per block] in
  partitioner/profile/__init__.py), which also sees the share of arithmetic that some
  layers' split costs and others' does not;
* per backward of a micro-batch into gradients the stage already holds: autograd adds the
  new gradient into each parameter's ``.grad`` (reading both, writing one: 3 bytes moved
  per gradient byte), where a backward into no gradient hands its result over. A stage
  whose rank holds ``G_s`` gradient bytes (its shard under ZeRO-2/3) runs ``A`` such
  additions a step: ``M - 1`` (the first backward after ``zero_grad`` finds none), or ``M``
  under DDP (its gradients are bucket views, zeroed in place), so per micro-batch
  ``B_s += (A / M) G_s / B_acc`` and ``W_s`` the same (the weight half makes the
  gradients), with ``B_acc = grad_accumulate_gbps`` the measured rate in gradient bytes.
  A vocabulary is where it shows: on the 2-core CPU of development (an AMD EPYC) GPT-2's
  stage 0 under GPipe ran its first backward in a median 4.87 ms and each later one in
  12.04 ms (benchmarks/results/2026-12-06-measured-quality-12.md's runs), and adding a
  50,257 x 128 embedding's gradient into a held one cost 2.0-2.2 ms alone (about 12 GB/s
  of gradient): a part of that difference, the rest not understood;
* every collective of kind ``x`` (all-reduce, all-gather, reduce-scatter, broadcast), as the
  ring model prices it on the link, times ``f_x``, its measured time over that
  price. The link's latency and bandwidth are fitted to point-to-point transfers
  ([Note: fitting alpha-beta] in partitioner/calibrate.py); gloo's collectives on
  the 2-core CPU of development took 1.7-2.4x (all-reduce), 2.8-4.2x
  (all-gather) and 4.2-7.3x (reduce-scatter) the ring's time on that link
  (benchmarks/results/2026-12-05-collectives.md), where the ring of 2 ranks moves
  an all-reduce's bytes once each way, as a transfer does. A broadcast (ZeRO-1's,
  each tensor from its owner) has its own factor: priced as an all-gather of its
  share, as the evaluator does, it is not an all-gather's time. The GPU presets
  have none (1): their ``efficiency.comm`` is the collectives' measured share of
  the link; ``autopart calibrate`` on NCCL measures the factors as here;
* the exposed data-parallel reduction of ``R`` seconds launched with a last
  backward of ``b`` seconds: ``R - c min(R, b)`` with ``c = comm_overlap``,
  the fraction of compute that a collective can run beside (``c = 1``, the
  default: ``max(0, R - b)``, the GPU's separate stream; on a CPU whose cores
  the ranks share, ``c`` is near 0). The simulator applies it
  ([Note: data-parallel reduction] in partitioner/simulate.py).

Calibration ([Note: measuring overheads] in partitioner/calibrate.py) measures
each by a small controlled experiment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from decimal import Decimal
from typing import Any, Mapping

from .base import COLLECTIVES

__all__ = ["Overheads", "OVERHEAD_FILE_KEYS"]

# File key -> (field, factor from file units to SI, applied as a decimal shift so a file reads back equal). Times per event are in microseconds, the
# optimizer's rate in GB/s, the overlap a fraction: the units the cluster file uses elsewhere.
OVERHEAD_FILE_KEYS = {
    "action_us": ("action_s", Decimal("1e-6")),
    "multi_action_us": ("multi_action_s", Decimal("1e-6")),
    "v_action_us": ("v_action_s", Decimal("1e-6")),
    "step_us": ("step_s", Decimal("1e-6")),
    "tp_node_forward_us": ("tp_node_s", Decimal("1e-6")),
    "tp_node_backward_us": ("tp_node_backward_s", Decimal("1e-6")),
    "dtensor_op_forward_us": ("dtensor_op_s", Decimal("1e-6")),
    "dtensor_op_backward_us": ("dtensor_op_backward_s", Decimal("1e-6")),
    "optimizer_tensor_us": ("optimizer_tensor_s", Decimal("1e-6")),
    "optimizer_dtensor_us": ("optimizer_dtensor_s", Decimal("1e-6")),
    "zero1_tensor_us": ("zero1_tensor_s", Decimal("1e-6")),
    "fsdp_unit_forward_us": ("fsdp_unit_s", Decimal("1e-6")),
    "fsdp_unit_backward_us": ("fsdp_unit_backward_s", Decimal("1e-6")),
    "optimizer_gbps": ("optimizer_bandwidth", Decimal("1e9")),
    "checkpoint_forward_us": ("checkpoint_s", Decimal("1e-6")),
    "checkpoint_backward_us": ("checkpoint_backward_s", Decimal("1e-6")),
    "checkpoint_node_forward_us": ("checkpoint_node_s", Decimal("1e-6")),
    "p2p_transfer_us": ("p2p_transfer_s", Decimal("1e-6")),
    "p2p_tensor_us": ("p2p_tensor_s", Decimal("1e-6")),
    "split_backward_node_us": ("split_backward_node_s", Decimal("1e-6")),
    "split_backward_param_us": ("split_backward_param_s", Decimal("1e-6")),
    "grad_accumulate_gbps": ("accumulate_bandwidth", Decimal("1e9")),
    "all_reduce_factor": ("all_reduce_factor", Decimal(1)),
    "all_gather_factor": ("all_gather_factor", Decimal(1)),
    "reduce_scatter_factor": ("reduce_scatter_factor", Decimal(1)),
    "broadcast_factor": ("broadcast_factor", Decimal(1)),
    "comm_overlap": ("comm_overlap", Decimal(1)),
    "compute_slowdown": ("compute_slowdown", Decimal(1)),
    "oversubscribed": ("oversubscribed", Decimal(1)),
    "idle_core_use": ("idle_core_use", Decimal(1)),
}


@dataclass(frozen=True, slots=True)
class Overheads:
    """Measured software costs, seconds (SI); see [Note: software overheads]. Zero: not measured, adds nothing."""

    action_s: float = 0.0  # a_action: per pipeline action (a forward or a whole backward of one micro-batch)
    # a_action under torch's multi-stage runtime (_PipelineScheduleRuntime), in place of a_action: stages in a
    # loop (interleaved, zb) and in a V (zbv, dualpipev); 0: not measured, a_action is used
    multi_action_s: float = 0.0
    v_action_s: float = 0.0
    step_s: float = 0.0  # a_step: per step and rank (schedule set-up, the loss's all-reduce)
    tp_node_s: float = 0.0  # a_node: per graph node run by the tensor-parallel interpreter, forward
    tp_node_backward_s: float = 0.0  # a_node_bwd: the same in backward
    dtensor_op_s: float = 0.0  # a_dtensor: per node run on DTensors beyond a plain tensor, forward
    dtensor_op_backward_s: float = 0.0  # a_dtensor_bwd: the same in backward
    optimizer_tensor_s: float = 0.0  # a_tensor: per parameter tensor the optimizer step updates
    optimizer_dtensor_s: float = 0.0  # a_opt_dtensor: per FSDP (DTensor) parameter tensor, beyond a_tensor
    zero1_tensor_s: float = 0.0  # a_zero1: per parameter tensor under ZeRO-1 (ZeroRedundancyOptimizer's own work), beyond its broadcast's link time
    fsdp_unit_s: float = 0.0  # a_fsdp: per FSDP unit per forward of a micro-batch, beyond its all-gather's link time
    fsdp_unit_backward_s: float = 0.0  # a_fsdp_bwd: the same per backward, beyond its reduce-scatter's link time
    optimizer_bandwidth: float = 0.0  # B_opt: bytes/s of the update (weights, gradients, state); 0: not measured
    checkpoint_s: float = 0.0  # a_ckpt: per torch.utils.checkpoint call (a recomputed block, a selective core), forward
    checkpoint_backward_s: float = 0.0  # a_ckpt_bwd: the same call's backward, beyond the forward it replays
    checkpoint_node_s: float = 0.0  # a_ckpt_node: per node inside a checkpoint call that saves a tensor, forward (its hook)
    p2p_transfer_s: float = 0.0  # a_p2p: per transfer between pipeline ranks while they compute, beyond the link
    p2p_tensor_s: float = 0.0  # a_p2p_tensor: per further tensor such a transfer carries (each its own operation)
    split_backward_node_s: float = 0.0  # a_split: per graph node of a stage whose backward torch splits (I, W), per micro-batch
    split_backward_param_s: float = 0.0  # a_split_w: per trainable parameter tensor of such a stage, per micro-batch
    accumulate_bandwidth: float = 0.0  # B_acc: gradient bytes/s autograd adds into a held .grad; 0: not measured
    all_reduce_factor: float = 1.0  # f_all_reduce: an all-reduce's measured time over the ring model on the link
    all_gather_factor: float = 1.0  # f_all_gather: the same for an all-gather
    reduce_scatter_factor: float = 1.0  # f_reduce_scatter: the same for a reduce-scatter
    broadcast_factor: float = 1.0  # f_broadcast: the same for a broadcast (priced as an all-gather of its share)
    comm_overlap: float = 1.0  # c: fraction of a collective that runs beside compute; 1: all of it (GPU)
    compute_slowdown: float = 1.0  # k: an op's time with every rank computing at once over one rank alone
    # o: of k, the factor of a node's ranks over its cores (time-slicing); the simulator gives a rank its core
    # back while others wait ([Note: ranks sharing cores] in partitioner/evaluate.py); 1: a core per rank
    oversubscribed: float = 1.0
    # b: of a core, what a rank uses while it waits between its actions (its transfers' threads, the schedule's
    # work), which the computing ranks do not get; used where o > 1 ([Note: ranks sharing cores]); 0: none
    idle_core_use: float = 0.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"overheads.{f.name} = {value!r}: expected a finite number >= 0")
            object.__setattr__(self, f.name, float(value))
        if self.comm_overlap > 1:
            raise ValueError(f"overheads.comm_overlap = {self.comm_overlap!r}: a fraction, in [0, 1]")
        if self.compute_slowdown < 1:
            raise ValueError(f"overheads.compute_slowdown = {self.compute_slowdown!r}: a ratio of times, at least 1")
        if not 1 <= self.oversubscribed <= self.compute_slowdown:
            raise ValueError(f"overheads.oversubscribed = {self.oversubscribed!r}: ranks over cores, at least 1 and "
                             f"at most compute_slowdown ({self.compute_slowdown!r}), of which it is a factor")
        if self.idle_core_use > 1:
            raise ValueError(f"overheads.idle_core_use = {self.idle_core_use!r}: a share of one core, in [0, 1]")
        for kind in COLLECTIVES:
            if getattr(self, f"{kind}_factor") <= 0:
                raise ValueError(f"overheads.{kind}_factor = {getattr(self, f'{kind}_factor')!r}: a ratio of times, above 0")

    @property
    def measured(self) -> bool:
        """Whether any figure differs from "not measured" (the cluster file then writes the table)."""
        return self != Overheads()

    def collective_factor(self, kind: str) -> float:
        """``f_kind``: a collective's measured time over the ring model on the link ([Note: software overheads])."""
        return getattr(self, f"{kind}_factor")

    def schedule_action(self, multi_stage: bool, layout: str) -> float:
        """The per-action overhead of a schedule: ``a_action`` under torch's single-stage runtime, the measured
        ``a_action_multi`` (stages in a loop) or ``a_action_v`` (in a V) under its multi-stage one, else ``a_action``
        ([Note: software overheads])."""
        if multi_stage:
            measured = self.v_action_s if layout == "v" else self.multi_action_s
            if measured > 0:
                return measured
        return self.action_s

    def optimizer_time(self, tensors: float, params: float, bytes_per_param: float, dtensors: bool = False) -> float:
        """``T a_tensor + P bytes_per_param / B_opt``: the optimizer step over ``tensors`` tensors of ``params``
        elements in all, plus ``T a_opt_dtensor`` when they are FSDP's DTensors ([Note: software overheads])."""
        t = tensors * (self.optimizer_tensor_s + (self.optimizer_dtensor_s if dtensors else 0.0))
        if self.optimizer_bandwidth > 0:
            t += params * bytes_per_param / self.optimizer_bandwidth
        return t

    def transfer_wait(self, tensors: int) -> float:
        """``a_p2p + (n - 1) a_p2p_tensor``: what a transfer of ``n`` tensors between pipeline ranks waits beyond
        the link ([Note: software overheads]); 0 for no tensor (no transfer)."""
        return self.p2p_transfer_s + (tensors - 1) * self.p2p_tensor_s if tensors > 0 else 0.0

    def accumulate_time(self, grad_bytes: float, accumulations: float) -> float:
        """``A G / B_acc``: ``accumulations`` additions of a micro-batch's gradients into the ``grad_bytes`` a
        stage holds ([Note: software overheads]); 0 when not measured."""
        return accumulations * grad_bytes / self.accumulate_bandwidth if self.accumulate_bandwidth > 0 else 0.0

    def checkpoint_time(self, calls: float, nodes: float) -> tuple[float, float]:
        """(forward, backward) seconds of ``calls`` torch.utils.checkpoint calls around ``nodes`` graph nodes
        that save a tensor, in all, beyond the forward they replay: ``C a_ckpt + n a_ckpt_node`` and
        ``C a_ckpt_bwd`` ([Note: software overheads])."""
        return calls * self.checkpoint_s + nodes * self.checkpoint_node_s, calls * self.checkpoint_backward_s

    def to_file(self) -> dict[str, float]:
        """The ``[overheads]`` table in file units (only the measured keys)."""
        out = {}
        default = Overheads()
        for key, (name, factor) in OVERHEAD_FILE_KEYS.items():
            value = getattr(self, name)
            if value != getattr(default, name):
                out[key] = float(f"{Decimal(repr(value)) / factor:.6g}")
        return out

    @classmethod
    def from_file(cls, table: Mapping[str, Any]) -> "Overheads":
        """Read the ``[overheads]`` table (file units); ValueError names the key at fault."""
        values: dict[str, float] = {}
        for key, value in table.items():
            if key not in OVERHEAD_FILE_KEYS:
                raise ValueError(f"overheads.{key}: unknown key; keys allowed: {', '.join(OVERHEAD_FILE_KEYS)}")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"overheads.{key} = {value!r}: expected a number >= 0")
            name, factor = OVERHEAD_FILE_KEYS[key]
            values[name] = float(Decimal(repr(float(value))) * factor)  # exact decimal shift, as cluster.py does
        return cls(**values)
