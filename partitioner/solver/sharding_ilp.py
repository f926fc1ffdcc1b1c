"""Tensor-parallel sharding of one block as a CP-SAT model.

For a block type, a tensor-parallel degree and a micro-batch size, choose one
strategy per node (see [Note: layouts and resharding] in tp_strategies.py) that
minimizes the block's forward + backward time, communication included. Every
coefficient comes from ``BlockLayoutCosts``, the same tables the evaluator
prices plans with, so the ILP's objective and the evaluator agree exactly.
Repeated identical blocks share the solution (one solve per block type).

Formulation (all times per micro-batch, in integer units of ``UNIT_S``; layouts
l in {R, S, Q}, see [Note: sequence parallelism] for Q):

    variables   y[n, s] in {0,1}           node n uses strategy s (s allowed for n)
                out[n, l] = sum_{s: out(s)=l} y[n, s]   n's output has layout l
                in[n, l]  = sum_{s: in(s)=l}  y[n, s]   n reads its inputs in layout l
                e[u, v, a, b] in {0,1}      edge u->v reshards a -> b (a != b, not Q -> R)
                q[u] in {0,1}               u is Q and read whole: gathered once
                z[u], r[u] in {0,1}         u feeds a column linear: all-reduce (u not Q) /
                                            reduce-scatter (u is Q) of its gradient
                m[u] in {0,1}               u is saved split (S or Q)

    one strategy       sum_s y[n, s] = 1                                 add_one_strategy_constraints()
    resharding         e[u,v,a,b] >= out[u,a] + in[v,b] - 1               add_resharding_constraints()
                       q[u] >= out[u,Q] + in[v,R] - 1;  q[u] >= out[u,Q] if u leaves the block
    block boundary     inputs from outside are R; outputs read outside must be R
    column inputs      z[u] >= y[v, column] - out[u,Q],                  add_column_input_constraints()
                       r[u] >= y[v, column] + out[u,Q] - 1  for every consumer v of u
    saved split        m[u] <= out[u,S] + out[u,Q],  m[u] <= 1 - in[v,R]         add_memory_term()
                       for every saver v != u (a saver reading u whole keeps the gathered copy)
                       (a block input u: m[u] <= in[v,Q] for every saver v)

    minimize  sum y[n,s] (compute + own comm)[n,s] + sum e[u,v,a,b] reshard[u,a,b] + sum q[u] gather[u]
              + sum z[u] allreduce[u] + sum r[u] reducescatter[u]
              + w * (saved activation bytes + static bytes of parameters)

With the default tiny ``w`` the memory term only breaks ties toward the
smaller footprint (the *fast* layout); the search also asks for a *lean*
layout with a large ``w``, which splits big weights (a vocabulary-parallel
embedding) even where that costs a little time, for meshes short of memory.

Note [the sharding model's LP relaxation]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
The solver runs with ``linearization_level = 2``: every constraint above is
linear over booleans, and with the full LP relaxation in the search CP-SAT
proves a block optimal from its first bound instead of branching to it. On a
decoder layer of a 4-layer, 1024-wide Llama (58 nodes) one solve took 0.22-1.18 s
at the default level and 0.019-0.024 s at level 2, the same objective and the
same strategies in each of the five (tp, micro-batch) cases tried; `autopart
plan` of that model on one DGX H100 (144 such solves) planned in 20.8 s before.
The status stays OPTIMAL, so only ties between equally good layouts can
resolve differently: one golden plan did (bigvocab's MLP activations now take
Megatron's hidden split where they took the token split, the same step time
and peak to the byte), and the golden plans (tests/golden) pin the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from ortools.sat.python import cp_model

from ..sharding import BlockLayoutCosts
from ..tp_strategies import INPUT_LAYOUT, LAYOUTS, OUTPUT_LAYOUT, STRATEGIES

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
    def __init__(self, tables: BlockLayoutCosts, memory_weight: float, static_per_weight_byte: float,
                 sequence_parallel: bool = True) -> None:
        self.t = tables
        self.sequence_parallel = sequence_parallel
        self.w = memory_weight
        self.static_factor = static_per_weight_byte
        self.m = cp_model.CpModel()
        self.y: dict[str, dict[str, cp_model.IntVar]] = {}
        self.cost: list[cp_model.LinearExpr] = []

    def out(self, n: str, layout: str) -> cp_model.LinearExpr:
        return sum(v for s, v in self.y[n].items() if OUTPUT_LAYOUT[s] == layout)

    def inn(self, n: str, layout: str) -> cp_model.LinearExpr:
        return sum(v for s, v in self.y[n].items() if INPUT_LAYOUT[s] == layout)

    def can(self, n: str, layout: str, reads: bool = False) -> bool:
        table = INPUT_LAYOUT if reads else OUTPUT_LAYOUT
        return any(table[s] == layout for s in self.y[n])

    def add_one_strategy_constraints(self) -> None:
        """sum_s y[n, s] = 1 for every node n (constraint ``one_strategy[n]``)."""
        for n in self.t.nodes:
            self.y[n] = {s: self.m.new_bool_var(f"y[{n},{s}]") for s in self.t.options[n]
                         if self.sequence_parallel or OUTPUT_LAYOUT[s] != "Q"}
            self.m.add_exactly_one(self.y[n].values()).with_name(f"one_strategy[{n}]")
            for s, var in self.y[n].items():
                o = self.t.options[n][s]
                c = o.compute.forward_s + o.compute.backward_s + o.comm.forward_s + o.comm.backward_s
                static = self.static_factor * o.param_bytes
                self.cost.append(_units(c + self.w * (o.saved_other + static)) * var)

    def add_resharding_constraints(self) -> None:
        """e[u,v,a,b] >= out[u,a] + in[v,b] - 1 on every data edge and layout change a -> b
        (``reshard[u,v,a,b]``); q[u] >= out[u,Q] + in[v,R] - 1 (``gather_q[u,v]``): a sequence-split
        tensor read whole is gathered once, whatever reads it."""
        gather_q: dict[str, cp_model.IntVar] = {}

        def q(u: str) -> cp_model.IntVar:
            if u not in gather_q:
                gather_q[u] = self.m.new_bool_var(f"q[{u}]")
                self.cost.append(_units(self.t.edge_cost(u, "Q", "R").forward_s) * gather_q[u])
            return gather_q[u]

        for u, v in self.t.edges:
            for a in LAYOUTS:
                if not self.can(u, a):
                    continue
                for b in LAYOUTS:
                    if a == b or not self.can(v, b, reads=True):
                        continue
                    if (a, b) == ("Q", "R"):
                        self.m.add(q(u) >= self.out(u, a) + self.inn(v, b) - 1).with_name(f"gather_q[{u},{v}]")
                        continue
                    c = self.t.edge_cost(u, a, b)
                    units = _units(c.forward_s + c.backward_s)
                    if units:
                        e = self.m.new_bool_var(f"e[{u},{v},{a},{b}]")
                        self.m.add(e >= self.out(u, a) + self.inn(v, b) - 1).with_name(f"reshard[{u},{v},{a},{b}]")
                        self.cost.append(units * e)
        # Block boundary: inputs arrive whole (a split consumer slices them) ...
        for u, v in self.t.boundary_inputs:
            for b in ("S", "Q"):
                c = self.t.edge_cost(u, "R", b)
                self.cost.append(_units(c.forward_s + c.backward_s) * self.inn(v, b))
        # ... and tensors leaving the block must be whole again.
        for u in self.t.leaving:
            self.cost.append(_units(self.t.edge_cost(u, "S", "R").forward_s) * self.out(u, "S"))
            if self.can(u, "Q"):
                self.m.add(q(u) >= self.out(u, "Q")).with_name(f"leave_q[{u}]")

    def add_column_input_constraints(self) -> None:
        """z[u] >= y[v, column] - out[u, Q] and r[u] >= y[v, column] + out[u, Q] - 1 for each consumer
        v of u: one backward all-reduce per tensor, or one reduce-scatter where u is sequence-split."""
        readers: dict[str, list[str]] = {}
        for u, v in [*self.t.edges, *self.t.boundary_inputs]:
            if any(STRATEGIES[s].input_grad_all_reduce for s in self.y[v]):
                readers.setdefault(u, []).append(v)
        for u, vs in sorted(readers.items()):
            split_q = self.out(u, "Q") if u in self.y and self.can(u, "Q") else 0
            z = self.m.new_bool_var(f"z[{u}]")
            r = self.m.new_bool_var(f"r[{u}]") if u in self.y and self.can(u, "Q") else None
            for v in vs:
                for s, y in self.y[v].items():
                    if STRATEGIES[s].input_grad_all_reduce:
                        self.m.add(z >= y - split_q).with_name(f"column_input[{u},{v}]")
                        if r is not None:
                            self.m.add(r >= y + split_q - 1).with_name(f"column_input_q[{u},{v}]")
            self.cost.append(_units(self.t.column_input_cost(u).backward_s) * z)
            if r is not None:
                self.cost.append(_units(self.t.sequence_input_cost(u).backward_s) * r)

    def add_memory_term(self) -> None:
        """-w * bytes saved by splitting each saved tensor (parameters are priced per option): where
        m[u] <= out[u,S] + out[u,Q] (``saved_split[u]``) and m[u] <= 1 - in[v,R] for each saver
        v != u (``saved_split[u,v]``): a node that reads u whole saves the gathered copy."""
        tp = self.t.tp
        for t in self.t.saved_tensors:
            saving = _units(self.w * self.t.tensor_bytes(t) * (1 - 1 / tp))
            if not saving:
                continue
            if t not in self.y:  # a block input: kept as slices where every saver reads it along the tokens
                savers = sorted(v for v in self.t.savers.get(t, ()) if v in self.y)
                if savers and all(self.can(v, "Q", reads=True) for v in savers):
                    m = self.m.new_bool_var(f"m[{t}]")
                    for v in savers:
                        self.m.add(m <= self.inn(v, "Q")).with_name(f"saved_q[{t},{v}]")
                    self.cost.append(-saving * m)
                continue
            if self.can(t, "S") or self.can(t, "Q"):
                m = self.m.new_bool_var(f"m[{t}]")
                self.m.add(m <= self.out(t, "S") + self.out(t, "Q")).with_name(f"saved_split[{t}]")
                for v in sorted(self.t.savers.get(t, ())):
                    if v != t and self.can(v, "R", reads=True):
                        self.m.add(m <= 1 - self.inn(v, "R")).with_name(f"saved_split[{t},{v}]")
                self.cost.append(-saving * m)

    def solve(self) -> BlockSharding:
        self.add_one_strategy_constraints()
        self.add_resharding_constraints()
        self.add_column_input_constraints()
        self.add_memory_term()
        self.m.minimize(sum(self.cost))
        solver = cp_model.CpSolver()
        solver.parameters.num_workers = 1  # deterministic
        solver.parameters.max_deterministic_time = 10.0
        # [Note: the sharding model's LP relaxation]
        solver.parameters.linearization_level = 2
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
    tables: BlockLayoutCosts, memory_weight: float = FAST_WEIGHT, static_per_weight_byte: float = 8.0,
    sequence_parallel: bool = True,
) -> BlockSharding:
    """The best realizable sharding of ``tables.block`` at ``tables.tp``.

    ``memory_weight`` (seconds per byte) prices memory against time;
    ``static_per_weight_byte`` converts a parameter's weight bytes into its
    resident bytes (weights + gradients + optimizer state: 16/2 = 8 for
    mixed-precision Adam on bf16 weights). ``sequence_parallel=False`` leaves
    out the strategies that make ``Q`` ([Note: sequence parallelism]).
    """
    if tables.tp == 1:
        compute, comm, _ = tables.evaluate({})
        return BlockSharding({}, compute.forward_s + compute.backward_s, "OPTIMAL")
    return _BlockModel(tables, memory_weight, static_per_weight_byte, sequence_parallel).solve()
