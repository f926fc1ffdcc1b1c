"""Tensor-parallel sharding of one block as a CP-SAT model.

For a block type, a tensor-parallel degree and a micro-batch size, choose one
strategy per node (see [Note: layouts and resharding] in tp_strategies.py) that
minimizes the block's forward + backward time, communication included. Every
coefficient comes from ``BlockLayoutCosts``, the same tables the evaluator
prices plans with, so the ILP's objective and the evaluator agree exactly.
Repeated identical blocks share the solution (one solve per block type).

Formulation (all times per micro-batch, in integer units of ``UNIT_S``):

    variables   y[n, s] in {0,1}           node n uses strategy s (s allowed for n)
                S[n] = sum_{s: out(s)=S} y[n, s]   n's output is split
                Q[n] = sum_{s: in(s)=S}  y[n, s]   n needs split inputs
                a[u, v], g[u, v] in {0,1}   edge u->v slices (R->S) / gathers (S->R)
                z[u] in {0,1}               u feeds a column-parallel node

    one strategy       sum_s y[n, s] = 1                              add_one_strategy_constraints()
    resharding         a[u,v] >= Q[v] - S[u],  g[u,v] >= S[u] - Q[v]  add_resharding_constraints()
    block boundary     inputs from outside are R; outputs read outside must be R
    column inputs      z[u] >= y[v, column] for every consumer v of u add_column_input_constraints()

    minimize  sum y[n,s] (compute + own comm)[n,s] + sum a[u,v] slice[u] + sum g[u,v] gather[u]
              + sum z[u] allreduce[u] + w * (saved activation bytes + static bytes of parameters)

With the default tiny ``w`` the memory term only breaks ties toward the
smaller footprint (the *fast* layout); the search also asks for a *lean*
layout with a large ``w``, which splits big weights (a vocabulary-parallel
embedding) even where that costs a little time, for meshes short of memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from ortools.sat.python import cp_model

from ..sharding import BlockLayoutCosts
from ..tp_strategies import INPUT_LAYOUT, OUTPUT_LAYOUT, STRATEGIES

__all__ = ["UNIT_S", "FAST_WEIGHT", "LEAN_WEIGHT", "BlockSharding", "solve_block_sharding"]

UNIT_S = 1e-8  # integer time unit of the CP-SAT models: 10 ns
FAST_WEIGHT = 1e-15  # seconds per byte: 1 us per GB, a tie-break
LEAN_WEIGHT = 1e-10  # seconds per byte: 100 ms per GB, memory first


@dataclass(frozen=True, slots=True)
class BlockSharding:
    """The chosen strategy per node of one block (only the non-replicated ones)."""

    strategies: Mapping[str, str]
    time_s: float  # forward + backward, compute and communication, per micro-batch
    status: str  # CP-SAT status name


def _units(seconds: float) -> int:
    return int(round(seconds / UNIT_S))


class _BlockModel:
    def __init__(self, tables: BlockLayoutCosts, memory_weight: float, static_per_weight_byte: float) -> None:
        self.t = tables
        self.w = memory_weight
        self.static_factor = static_per_weight_byte
        self.m = cp_model.CpModel()
        self.y: dict[str, dict[str, cp_model.IntVar]] = {}
        self.cost: list[cp_model.LinearExpr] = []

    def split_out(self, n: str) -> cp_model.LinearExpr:
        return sum(v for s, v in self.y[n].items() if OUTPUT_LAYOUT[s] == "S")

    def split_in(self, n: str) -> cp_model.LinearExpr:
        return sum(v for s, v in self.y[n].items() if INPUT_LAYOUT[s] == "S")

    def add_one_strategy_constraints(self) -> None:
        """sum_s y[n, s] = 1 for every node n (constraint ``one_strategy[n]``)."""
        for n in self.t.nodes:
            self.y[n] = {s: self.m.new_bool_var(f"y[{n},{s}]") for s in self.t.options[n]}
            self.m.add_exactly_one(self.y[n].values()).with_name(f"one_strategy[{n}]")
            for s, var in self.y[n].items():
                o = self.t.options[n][s]
                c = o.compute.forward_s + o.compute.backward_s + o.comm.forward_s + o.comm.backward_s
                static = self.static_factor * o.param_bytes
                self.cost.append(_units(c + self.w * (o.saved_other + static)) * var)

    def add_resharding_constraints(self) -> None:
        """a[u,v] >= Q[v] - S[u] (slice) and g[u,v] >= S[u] - Q[v] (gather) on every data edge."""
        for u, v in self.t.edges:
            slice_c = _units(self.t.edge_cost(u, "R", "S").backward_s)
            gather_c = _units(self.t.edge_cost(u, "S", "R").forward_s)
            if slice_c:
                a = self.m.new_bool_var(f"a[{u},{v}]")
                self.m.add(a >= self.split_in(v) - self.split_out(u)).with_name(f"slice[{u},{v}]")
                self.cost.append(slice_c * a)
            if gather_c:
                g = self.m.new_bool_var(f"g[{u},{v}]")
                self.m.add(g >= self.split_out(u) - self.split_in(v)).with_name(f"gather[{u},{v}]")
                self.cost.append(gather_c * g)
        # Block boundary: inputs arrive whole (a split consumer slices them) ...
        for u, v in self.t.boundary_inputs:
            self.cost.append(_units(self.t.edge_cost(u, "R", "S").backward_s) * self.split_in(v))
        # ... and tensors leaving the block must be whole again.
        for u in self.t.leaving:
            self.cost.append(_units(self.t.edge_cost(u, "S", "R").forward_s) * self.split_out(u))

    def add_column_input_constraints(self) -> None:
        """z[u] >= y[v, column] for each consumer v of u: one backward all-reduce per tensor."""
        readers: dict[str, list[str]] = {}
        for u, v in [*self.t.edges, *self.t.boundary_inputs]:
            if any(STRATEGIES[s].input_grad_all_reduce for s in self.y[v]):
                readers.setdefault(u, []).append(v)
        for u, vs in sorted(readers.items()):
            z = self.m.new_bool_var(f"z[{u}]")
            for v in vs:
                for s, y in self.y[v].items():
                    if STRATEGIES[s].input_grad_all_reduce:
                        self.m.add(z >= y).with_name(f"column_input[{u},{v}]")
            self.cost.append(_units(self.t.column_input_cost(u).backward_s) * z)

    def add_memory_term(self) -> None:
        """-w * bytes saved by splitting each saved tensor (parameters are priced per option)."""
        tp = self.t.tp
        for t in self.t.saved_tensors:
            if t in self.y:
                saving = self.t.tensor_bytes(t) * (1 - 1 / tp)
                self.cost.append(-_units(self.w * saving) * self.split_out(t))

    def solve(self) -> BlockSharding:
        self.add_one_strategy_constraints()
        self.add_resharding_constraints()
        self.add_column_input_constraints()
        self.add_memory_term()
        self.m.minimize(sum(self.cost))
        solver = cp_model.CpSolver()
        solver.parameters.num_workers = 1  # deterministic
        solver.parameters.max_deterministic_time = 10.0
        status = solver.solve(self.m)
        if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):  # cannot happen: all-replicate is feasible
            return BlockSharding({}, 0.0, solver.status_name(status))
        chosen = {n: next(s for s, v in ys.items() if solver.value(v)) for n, ys in self.y.items()}
        compute, comm, _ = self.t.evaluate(chosen)
        return BlockSharding(
            {n: s for n, s in chosen.items() if s != "replicate"},
            compute.forward_s + compute.backward_s + comm.forward_s + comm.backward_s,
            solver.status_name(status),
        )


def solve_block_sharding(
    tables: BlockLayoutCosts, memory_weight: float = FAST_WEIGHT, static_per_weight_byte: float = 8.0
) -> BlockSharding:
    """The best realizable sharding of ``tables.block`` at ``tables.tp``.

    ``memory_weight`` (seconds per byte) prices memory against time;
    ``static_per_weight_byte`` converts a parameter's weight bytes into its
    resident bytes (weights + gradients + optimizer state: 16/2 = 8 for
    mixed-precision Adam on bf16 weights).
    """
    if tables.tp == 1:
        compute, comm, _ = tables.evaluate({})
        return BlockSharding({}, compute.forward_s + compute.backward_s, "OPTIMAL")
    return _BlockModel(tables, memory_weight, static_per_weight_byte).solve()
