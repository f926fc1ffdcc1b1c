"""A small model that fails on request, for injecting faults into a real ``autopart run``.

``--model py:fault_model:build`` (with ``tests/`` on ``PYTHONPATH``) gives a stack of linear
blocks, each followed by ``autopart_test::fault_point``, a custom op: ``torch.export`` keeps it
in the graph as one opaque call, so it runs inside each stage at run time, where a model's own
Python code would have been traced away. The op does nothing unless ``AUTOPART_FAULT`` says
``HOW:RANK:CALL``: on the process whose ``RANK`` is RANK, its CALL-th call (counted from 1)
raises (``raise``), exits with code 3 (``exit``), kills its own process with SIGKILL (``kill``)
or sleeps for an hour (``hang``). ``AUTOPART_FAULT_FILE``, when set, receives the wall time of
the fault first, so that a test can measure how long every rank takes to stop.

Used by tests/test_launch.py and benchmarks/failure_matrix.py.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import torch

WIDTH = 16
DEPTH = 4
_calls = [0]


@torch.library.custom_op("autopart_test::fault_point", mutates_args=())
def fault_point(x: torch.Tensor) -> torch.Tensor:
    spec = os.environ.get("AUTOPART_FAULT")
    if spec:
        how, rank, call = spec.split(":")
        if os.environ.get("RANK") == rank:
            _calls[0] += 1
            if _calls[0] == int(call):
                _fail(how)
    return x.clone()


@fault_point.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def _backward(ctx, grad: torch.Tensor) -> torch.Tensor:
    return grad


fault_point.register_autograd(_backward)


def _fail(how: str) -> None:
    path = os.environ.get("AUTOPART_FAULT_FILE")
    if path:
        Path(path).write_text(str(time.time()))
    if how == "exit":
        os._exit(3)
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if how == "hang":
        time.sleep(3600)
    raise ValueError("injected failure")


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fault_point(torch.relu(self.linear(x)))


class FaultModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(Block() for _ in range(DEPTH))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def build() -> tuple[torch.nn.Module, tuple[torch.Tensor]]:
    """(model, example inputs of batch 1), the same weights on every rank."""
    torch.manual_seed(0)
    return FaultModel(), (torch.zeros(1, WIDTH),)
