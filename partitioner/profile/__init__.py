"""The profiler: each block's and each compute node's forward and backward time, measured on this device.

It sits between capture and the cost models. Given a captured model and its
blocks, it runs every distinct block for real (random tensors of the annotated
shapes and dtypes), times the block and each of its compute nodes forward and
backward, and also times the tensor-parallel shards the solver considers (a
column-parallel linear with its local shard's shapes). The measurements feed
``cost_models.MeasuredCostModel`` directly and, through
``cost_models.fit_calibration``, the calibrated analytic model that prices
what was not measured. ``autopart plan --profile`` and ``autopart profile``
are its commands.

The package follows the flow: ``values`` (timings, measurements, options, results), ``cache`` (the
SQLite file, [Note: the profile cache]), ``timing`` (running blocks and nodes on the device) and
``fitting`` (measurements to the planner's cost model, and the fidelity report).

Glossary (as everywhere): a **node** is an FX graph node, a **block** a group
of nodes aligned to a module, a **variant** one (strategy, tp) shard of a node.

[Note: profiling one block at a time]
Only one block's parameters ever exist: its parameter placeholders and the
activations entering it are created (random, with the annotated shape, dtype
and strides) just before it runs and dropped after, so a 175B model is
profiled one layer's weights at a time. Integer inputs that index an embedding
get indices within its rows; other integer inputs are zeros and boolean ones
True (masks that attend everywhere: the same work as a causal mask on the
kernels we run). A float input requires grad when a trainable parameter flows
into it, so backward computes exactly the gradients training would. Each node
is then timed alone on the real values it saw in the block's run (so views
keep their strides). Repeated identical blocks and identical nodes share one
signature and are measured once.

[Note: the profile cache]
Measurements go to an SQLite file (a plain format, never pickle), one row per
(kind, signature, variant, dtype, device, torch version), with a checksum of
its JSON payload. A row that fails its checksum or does not parse as a valid
measurement is counted as corrupt, deleted and measured again; a file that is
not a database is moved aside (``<name>.corrupt-<time>``), never deleted, and
a fresh cache is started. Timings depend on the device, the torch version and
(on CPU) the number of threads, so those are part of the key.

[Note: nodes alone and the block]
A node timed alone runs hot (its inputs in cache, no neighbours) and skips
what the block pays between ops: the dispatcher, the Python of the forward,
allocation. The planner sums node costs, so the difference between the
whole block (measured) and the sum of its nodes (measured alone) is shared
out over the block's nodes, separately forward and backward: equally (it is
per-call overhead) when the block is slower, in proportion when it is faster.
These in-block times are what the planner uses and what the calibrated model
is fitted to (as ``sample`` rows of the cache), so that both add up to the
block that runs for real. Shards get the same per-node share as their node.

[Note: the split backward per block]
torch's zero-bubble schedules (zb, zbv, and DualPipeV at its ends) run a
stage's backward split: ``stage_backward_input`` (I: it walks the stage's
autograd graph in Python to group each weight with the intermediates that
feed it, hooks those, and computes the input gradients) then
``stage_backward_weight`` (W: one ``autograd.grad`` per group). What that
costs over the backward run whole is not one figure: a block whose inputs
need a gradient is therefore also timed split, as torch runs it (the same
inputs and output gradients; an output that is a view is cloned untimed,
since I detaches the outputs in place), and its ``Measurement`` keeps I and
W (``backward_input``, ``backward_weight``). The cost model gives the
evaluator ``SplitShare(ratio = (I + W) / whole, weight = W / (I + W))``
at the micro-batch size measured nearest (``MeasuredCostModel.split_share``);
a stage past the first pays ``(ratio - 1)`` of each such block's whole
backward more, shared between I and W by ``weight``, and its W is ``weight``
of the block's backward in place of ``WEIGHT_GRAD_SHARE``
(``Evaluator.split_terms``). Blocks not measured split (no profile, an
older cache row, the analytic model) keep the calibrated per-node and
per-parameter figures (``a_split``, ``a_split_w``; [Note: software
overheads] in cost_models/overheads.py). On the 2-core CPU of development,
one thread, CPU time, 2 x 64 tokens: gpt2-tiny's layers (width 64) ran
1.74x split (0.86 ms whole, 0.87 + 0.63 ms split), GPT-2 width 128 layers
1.45x, its 50,257-row head 0.89x (53.5 ms whole, 21.5 + 26.4 ms split: the
split ran faster, as a whole stage of it had, -7%,
benchmarks/results/2026-12-06-split-scale.md), the funnel's layers from
1.05x (MLP width 2048) to 2.2x (width 32), its 4,000-row head 1.02x: a fixed
cost per graph node and a share of arithmetic that depends on the ops, which
the single ratios of earlier models (``split_backward_scale``, tried and
reverted) could not price. A block's ratio is taken at every micro-batch
size alike from the nearest measured; the fixed part of it weighs more at
smaller sizes.
"""

from __future__ import annotations

from .values import Measurement, ProfileError, ProfileOptions, ProfileResult, ProfileStats, Timing, device_name
from .cache import ProfileCache, default_cache_path
from .timing import measure_blocks, profile_model
from .fitting import (PROFILED_SIZES, BlockFidelity, Profiled, calibration, check_device, cpu_threads_for, fidelity, gpu_preset,
                      measured_cost_model, micro_batches_to_profile, profile_clock, profile_for_planning, recaptured,
                      matched_nodes, split_shares)

__all__ = [
    "ProfileError",
    "Timing",
    "Measurement",
    "ProfileCache",
    "ProfileOptions",
    "ProfileStats",
    "ProfileResult",
    "profile_model",
    "device_name",
    "default_cache_path",
    "gpu_preset",
    "check_device",
    "calibration",
    "profile_for_planning",
    "profile_clock",
    "PROFILED_SIZES",
    "micro_batches_to_profile",
    "recaptured",
    "matched_nodes",
    "split_shares",
    "measured_cost_model",
    "Profiled",
    "BlockFidelity",
    "fidelity",
    "measure_blocks",
    "cpu_threads_for",
]

