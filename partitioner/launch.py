"""autopart's own launcher: ``autopart run --nproc-per-node N`` starts N ranks on this node.

It sits in front of the run phase (partitioner/runtime/). The CLI calls ``launch_local`` when a command
that runs under torchrun (``run``, ``calibrate``) is given ``--nproc-per-node N`` outside
torchrun. The ranks are started by torch's own launcher API (``elastic_launch`` with a
``LaunchConfig`` as ``torchrun --standalone`` builds it: one node, c10d rendezvous on a free
local port, no restarts), each running the same command without ``--nproc-per-node``. Their
stdout and stderr pass through untouched. Written here rather than used from torchrun because
torchrun's ``main`` turns every failed rank into its own ``ChildFailedError`` traceback of
about 35 lines, which its API lets a caller catch.

[Note: one line per failed job]
When a rank fails, the job ends (the launcher stops the others, as torchrun does) and the
launcher prints exactly one line on stderr, then exits:

- the line a rank left in its torchelastic error file (``watchdog.record_error``), when one
  did: the rank that failed or found the failure marks its line primary, a rank that merely
  stops because of it does not, and the primary one is printed. Ranks started here print no
  error themselves (``watchdog.under_autopart_launcher``), so the line appears once;
- otherwise what the launcher saw: ``rank 1 (stage 1) exited with code 3`` or ``rank 1
  (stage 1) was killed by SIGKILL (signal 9) — out of host memory?``. The stage comes from the
  plan (``Plan.stages_label``). A rank the launcher itself stopped (SIGTERM after another
  failed) is never the one named.

The exit status is 1 when a rank left its line; otherwise the named rank's own: its exit
code, or ``128 + N`` when signal N killed it (137 for SIGKILL), as a shell reports it; 130 on
Ctrl-C, which stops every rank. (A bad plan refused before any rank starts exits 2, as every
input error of the CLI.) There is
never a traceback. torchelastic's own log lines (``Sending process ... closing signal
SIGTERM``, its ``failed (exitcode ...)`` line) are silenced in the launcher process.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from .watchdog import AUTOPART_LAUNCHER_ENV

__all__ = ["WorkerFailure", "failure_line", "launch_local", "strip_nproc"]

NPROC_FLAG = "--nproc-per-node"


@dataclass(frozen=True, slots=True)
class WorkerFailure:
    """One failed rank as the launcher saw it."""

    rank: int  # global rank (one node: also the local rank)
    exitcode: int  # the process's exit code; -N when signal N ended it
    line: str | None = None  # the line autopart wrote to its error file ("autopart: error: ..."), if any
    primary: bool = False  # that line is the failure's own (not a rank stopping because of another)

    @property
    def signal(self) -> int | None:
        return -self.exitcode if self.exitcode < 0 else None

    @property
    def status(self) -> int:
        """The exit status a shell would report for this rank: its code, or 128 + its signal."""
        return 128 + self.signal if self.signal is not None else (self.exitcode or 1)


def strip_nproc(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--nproc-per-node N`` / ``--nproc-per-node=N``: the ranks' own command."""
    out: list[str] = []
    skip = False
    for word in argv:
        if skip:
            skip = False
        elif word == NPROC_FLAG:
            skip = True
        elif not word.startswith(NPROC_FLAG + "="):
            out.append(word)
    return out


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def failure_line(failures: Sequence[WorkerFailure], stages_of: Callable[[int], str] | None = None) -> tuple[str, int]:
    """The job's one error line and exit status; see [Note: one line per failed job]."""

    def who(rank: int) -> str:
        try:
            label = stages_of(rank) if stages_of is not None else ""
        except Exception:  # a plan the ranks refuse is theirs to explain; name the rank alone
            label = ""
        return f"rank {rank} ({label})" if label else f"rank {rank}"

    spoke = [f for f in failures if f.line]
    if spoke:
        f = min(spoke, key=lambda f: (not f.primary, f.rank))
        # 1, whatever the rank's own end: the launcher may have stopped it (SIGTERM) after it spoke.
        return f.line or "", 1
    # A rank the launcher stopped itself (SIGTERM after the first failure) is not the cause.
    own = [f for f in failures if f.signal != signal.SIGTERM] or list(failures)
    f = min(own, key=lambda f: f.rank)
    if f.signal is not None:
        name = _signal_name(f.signal)
        hint = " — out of host memory?" if f.signal == signal.SIGKILL else ""
        return f"autopart: error: {who(f.rank)} was killed by {name} (signal {f.signal}){hint}", f.status
    return f"autopart: error: {who(f.rank)} exited with code {f.exitcode}", f.status


def _from_process_failure(rank: int, pf: Any) -> WorkerFailure:
    """A torchelastic ``ProcessFailure`` as a ``WorkerFailure``: the line autopart left in its error file."""
    data = pf.error_file_data if isinstance(getattr(pf, "error_file_data", None), Mapping) else {}
    message = data.get("message")
    line, primary = None, False
    if isinstance(message, Mapping):
        extra = message.get("extraInfo") or {}
        if isinstance(extra, Mapping) and "autopart_primary" in extra and isinstance(message.get("message"), str):
            line, primary = message["message"], extra["autopart_primary"] == "1"
    return WorkerFailure(rank=rank, exitcode=int(pf.exitcode), line=line, primary=primary)


def _quiet_torchelastic() -> list[tuple[logging.Logger, logging.Handler, bool]]:
    """Keep torchelastic's log records (its WARNING, INFO and ERROR lines) out of the user's terminal.

    Its modules each set their own level, so the records are stopped where they propagate: at a
    ``NullHandler`` on the parent loggers, which do not pass them on to the root's last-resort
    handler. Returns what to undo."""
    undo = []
    for name in ("torch.distributed.elastic", "torch.distributed.launcher"):
        log = logging.getLogger(name)
        handler = logging.NullHandler()
        undo.append((log, handler, log.propagate))
        log.addHandler(handler)
        log.propagate = False
    return undo


def launch_local(nproc: int, argv: Sequence[str], stages_of: Callable[[int], str] | None = None) -> int:
    """Run ``python -m partitioner <argv>`` on ``nproc`` ranks of this node; return the exit status.

    ``argv`` is the command without ``--nproc-per-node``. ``stages_of(rank)`` names what a rank runs
    ("stage 1") in a failure's line. On failure one line is printed ([Note: one line per failed job]).
    The ranks inherit this process's environment, plus ``AUTOPART_LAUNCHER=1`` (they leave errors to
    the launcher) and, unless set, ``OMP_NUM_THREADS=1`` (as torchrun sets for several ranks per node)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
        rdzv_backend="c10d", rdzv_endpoint="localhost:0",  # torchrun --standalone
        max_restarts=0, monitor_interval=0.1, shutdown_timeout=10,
    )
    # The ranks' environment is this process's (torchelastic copies os.environ): set it for the launch only.
    saved = {k: os.environ.get(k) for k in (AUTOPART_LAUNCHER_ENV, "OMP_NUM_THREADS", "TORCHELASTIC_SIGNALS_TO_HANDLE")}
    os.environ[AUTOPART_LAUNCHER_ENV] = "1"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    undo = _quiet_torchelastic()
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "partitioner", *argv)
    except ChildFailedError as exc:
        failures = [_from_process_failure(rank, pf) for rank, pf in exc.failures.items()]
        line, status = failure_line(failures, stages_of)
        print(line, file=sys.stderr, flush=True)
        return status
    except (SignalException, KeyboardInterrupt) as exc:
        sig = getattr(exc, "sigval", signal.SIGINT)
        print("autopart: interrupted" if sig == signal.SIGINT else f"autopart: stopped by {_signal_name(sig)}",
              file=sys.stderr, flush=True)
        return 128 + int(sig)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        for log, handler, propagate in undo:
            log.removeHandler(handler)
            log.propagate = propagate
    return 0
