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
"""

from __future__ import annotations

from .values import Measurement, ProfileError, ProfileOptions, ProfileResult, ProfileStats, Timing, device_name
from .cache import ProfileCache, default_cache_path
from .timing import measure_blocks, profile_model
from .fitting import (PROFILED_SIZES, BlockFidelity, Profiled, calibration, check_device, cpu_threads_for, fidelity, gpu_preset,
                      measured_cost_model, micro_batches_to_profile, profile_clock, profile_for_planning, recaptured,
                      matched_nodes)

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
    "measured_cost_model",
    "Profiled",
    "BlockFidelity",
    "fidelity",
    "measure_blocks",
    "cpu_threads_for",
]

