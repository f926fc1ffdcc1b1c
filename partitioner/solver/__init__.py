"""The ILP planner: CP-SAT models for tensor sharding and pipeline stages, and the search around them.

* ``sharding_ilp``: per block type, the best tensor-parallel strategy per node.
* ``pipeline_ilp``: for a fixed mesh, micro-batching and schedule, the
  assignment of blocks to stages and the recompute choice per stage.
* ``search``: the pruned enumeration of meshes, micro-batch sizes and
  schedules around the two models; produces the ``Plan``.

The formulation is written as math in each module's docstring, next to the
method that adds each constraint family; docs/solver.md collects it.
"""

from .pipeline_ilp import StageProblem, StageSolution, solve_stages
from .search import IlpResult, SearchReport, plan_ilp
from .sharding_ilp import BlockSharding, solve_block_sharding

__all__ = [
    "BlockSharding", "solve_block_sharding", "StageProblem", "StageSolution", "solve_stages",
    "IlpResult", "SearchReport", "plan_ilp",
]
