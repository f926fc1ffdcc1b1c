"""Run a ``Plan``: distributed training steps on PyTorch's own engines.

The last phase of autopart (capture -> blocks -> solve -> Plan -> rewrite ->
**run**). ``auto_parallelize`` plans (or takes a plan), lets
``partitioner.rewrite`` cut the model into stage modules, and runs them:
``torch.distributed.pipelining`` stages and schedules over the ``pp`` axis of
a ``DeviceMesh``, DTensor over ``tp`` (see rewrite.py) and DDP or FSDP2 over
``dp``. ``ParallelModel.step`` is one optimizer step; ``save``/``load`` are
``torch.distributed.checkpoint`` keyed by the model's own parameter names, so
a run resumes under another plan.

Glossary as in plan.py: a **stage** is a pipeline stage, a **rank** a
process, an **axis** one of ``pp``, ``tp``, ``dp``.

One module per concern:

- ``entry``: ``auto_parallelize`` and joining the process group;
- ``model``: ``ParallelModel``, building the stage modules and the step;
- ``state``: optimizer state and checkpoints by parameter name;
- ``loop``: ``autopart run``'s training loop and its ``--json`` record.

Failure detection is watchdog.py's, measurement measure.py's.
"""

from ..checkpoint import CheckpointError
from ..watchdog import DistributedError, RankFailedError
from .entry import auto_parallelize
from .loop import run_plan
from .model import ParallelModel, StepEvent

__all__ = ["DistributedError", "RankFailedError", "CheckpointError", "StepEvent", "ParallelModel",
           "auto_parallelize", "run_plan"]
