"""The runtime's watchdog: a failing, dead or hung rank stops the job within ``timeout_s`` and is named.

Part of the run phase (partitioner/runtime/): every rank of a ``ParallelModel`` runs one
``Watchdog`` thread. It talks through the job's own ``TCPStore`` (a client of its own,
since the main thread may be blocked inside the default one) and never through the
process group, whose operations cannot be interrupted from Python.

[Note: failing ranks]
Each rank publishes a heartbeat ``beat:progress:phase:since`` every poll:

- ``beat`` counts polls of the watchdog thread: it proves the process is alive;
- ``progress`` counts what the training loop completed (each stage forward, backward and
  loss of a micro-batch, each step start and end; ``Watchdog.progress``): it proves the
  rank is getting work done, which a live thread alone does not (a rank stuck in its loss
  function keeps its thread beating);
- ``phase`` is ``compute`` while the rank runs its own forward, backward or loss, ``wait``
  otherwise (waiting for peers in a send, receive or collective), ``idle`` outside a step;
- ``since`` is the wall time of its last progress.

While this rank is in a step (``busy``) the thread ends the job, naming the culprit, when

1. another rank published an abort (it raised; or a peer found it dead or hung first);
2. the peer it watches ([Note: watching a ring]) has a ``beat`` that has not moved for
   ``timeout_s``: ``rank r (stage s) died``;
3. this rank has made no progress for ``timeout_s``: the culprit is the stalled rank that
   is in ``compute`` (it hangs in its own work while the others wait for it), else the rank
   stalled longest: ``rank r (stage s) hangs``;
4. the store is unreachable: the rank hosting it, rank 0, died.

[Note: watching a ring]
Each poll a rank writes its own heartbeat, checks the abort key and reads one peer's
heartbeat: its successor on the ring of ranks (``rank + 1 mod world``). So every rank is
watched by exactly one other, and the store serves O(world) operations a poll instead of
the O(world^2) of every rank reading every peer, which at thousands of ranks would make
the store itself the bottleneck. Only a rank that has made no progress for ``timeout_s``
reads every peer, for a few polls, to tell a dead peer (its beat stopped) from a hung one
and name the culprit. A dead rank whose watcher died with it is still found: the job
stalls, and the stalled ranks read everyone.

The first rank to detect a failure publishes it with ``compare_set`` (first one wins), so
every rank reports the same culprit. A rank that raises inside a step publishes its own
abort at once, before its sockets close, and only when the error is a communication error
does it first look for a peer's abort (a peer's failure makes our receives fail too).
The message is printed once where ranks share a terminal: under torchrun only the rank that
published it prints ([`reported_here`]); run by hand, every rank prints why it stops; under
autopart's own launcher (``--nproc-per-node``) no rank prints, and the launcher prints the line
the ranks left in their error files ([Note: one line per failed job] in launch.py).

[Note: stopped by torchrun]
Under raw torchrun a rank that exits or is killed never reaches our code, and torchrun
ends the others (SIGTERM) within a second, before any heartbeat is missed; its own
``ChildFailedError`` report names the rank but not the stage. So each rank publishes its pid,
learns its machine's ranks' pids, and on SIGTERM the lowest surviving rank of the machine
names the local rank whose process is gone, with its stage, before torchrun's report. A
SIGTERM with no rank gone (the user stopped torchrun) ends the rank silently, as before, and
so does a rank already stopping for the job's abort: a rank that ended for that abort (it left
its line, unprinted, in its error file) is not the cause, and the cause was printed once.

Why our own and not torch's: torch's gloo backend has no watchdog, and its collective
timeout does not cover gloo's point-to-point receives, which is where a pipeline rank waits.
The process group's timeout is still set (``backend_timeout_s``) as a backstop.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch.distributed as dist

from .errors import AutopartError, one_line, root_cause

__all__ = ["DistributedError", "RankFailedError", "Watchdog", "backend_timeout_s", "record_error", "report",
           "reported_here", "under_autopart_launcher", "under_launcher", "AUTOPART_LAUNCHER_ENV"]

# Set by launch.py in the ranks it starts: the launcher, not the ranks, prints the job's error line.
AUTOPART_LAUNCHER_ENV = "AUTOPART_LAUNCHER"


class DistributedError(AutopartError):
    """A distributed run cannot start or continue (world size, launch, a failed rank)."""


class RankFailedError(DistributedError):
    """A rank of the job failed (raised, died or hung); the message names it and its stage.

    ``published_by_peer`` is True on the ranks that merely stop because of it: the failing
    (or detecting) rank has printed the line already."""

    def __init__(self, message: str, published_by_peer: bool = False) -> None:
        super().__init__(message)
        self.published_by_peer = published_by_peer


def backend_timeout_s(timeout_s: float) -> float:
    """The process group's timeout: a backstop well behind the watchdog's ``timeout_s``, and long
    enough for rank 0 to plan while the others wait in a broadcast."""
    return max(300.0, 3.0 * timeout_s)


def under_launcher() -> bool:
    """True under torchrun (torchelastic), where every rank's output shares one terminal."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def under_autopart_launcher() -> bool:
    """True in a rank started by ``autopart run --nproc-per-node N`` (launch.py): the ranks print no
    error themselves; they leave it in torchelastic's error file, and the launcher prints one line."""
    return under_launcher() and os.environ.get(AUTOPART_LAUNCHER_ENV) == "1"


def reported_here(exc: BaseException) -> bool:
    """Whether this rank should print ``exc``: always when run by hand; under torchrun only once per
    job: the rank that failed (or found the failure), or rank 0 for an error every rank meets
    alike (a bad plan, a wrong world size)."""
    if not under_launcher() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return True
    if isinstance(exc, RankFailedError):
        return not exc.published_by_peer
    return os.environ.get("RANK", "0") == "0"


def report(exc_or_line: BaseException | str, primary: bool | None = None) -> None:
    """Print an error as autopart's one line (``autopart: error: ...``), once per job under torchrun
    (``reported_here``), and hand it to torchrun's error file (on every rank, printed or not) so that
    its summary names the cause instead of "To enable traceback see ...".

    Under autopart's own launcher nothing is printed here: the line goes to the error file only,
    marked ``primary`` (default: whether this rank would have printed it), and the launcher prints
    one line for the job ([Note: one line per failed job] in launch.py). Under raw torchrun
    ``primary=False`` (another rank prints the cause) likewise only writes the error file."""
    line = f"autopart: error: {exc_or_line}"
    if under_autopart_launcher() or primary is False:
        if primary is None:
            primary = reported_here(exc_or_line) if isinstance(exc_or_line, BaseException) else True
        record_error(line, primary)
        return
    echo = reported_here(exc_or_line) if isinstance(exc_or_line, BaseException) else True
    if not echo and not isinstance(exc_or_line, RankFailedError):
        # An error every rank meets alike is rank 0's to print, but the first rank to exit makes
        # torchrun end the others: wait, and speak only if rank 0 did not end the job meanwhile
        # (then the error was this rank's alone).
        time.sleep(3.0)
        echo = True
    if echo:
        print(line, file=sys.stderr, flush=True)
    record_error(line, echo)


def record_error(line: str, primary: bool) -> None:
    """Write ``line`` to this rank's torchelastic error file (no-op outside torchrun), in torchelastic's
    format (``ErrorHandler.record_exception``; its summary prints ``py_callstack``). ``autopart_primary``
    tells autopart's launcher which rank's line to print: the one that failed or found the failure
    ("1"), rather than a rank that merely stops because of it ("0")."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not error_file or not under_launcher():
        return
    try:
        Path(error_file).write_text(json.dumps({"message": {"message": line, "extraInfo": {
            "py_callstack": line, "timestamp": str(int(time.time())), "autopart_primary": "1" if primary else "0"}}}))
    except OSError:
        pass


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, ended but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        pass
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except OSError:
        return True


def _is_comm_error(exc: BaseException) -> bool:
    """A send, receive or collective failed (usually because a peer failed first)."""
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc)
    return any(w in text for w in ("Connection closed", "Connection reset", "Timed out", "gloo", "Broken pipe", "NCCL"))


class Watchdog:
    """Ends this rank when a rank failed, died or hangs; see [Note: failing ranks]."""

    def __init__(self, rank: int, stages_of: Callable[[int], str], timeout_s: float) -> None:
        self.rank = rank
        self.stages_of = stages_of  # rank -> "stage 1" / "stages 0, 2"
        self.timeout_s = timeout_s
        self.busy = False  # in a step, save or load: watch for dead peers
        self.in_step = False  # in a step: also watch for a stall in progress
        self.phase = "idle"
        self.stopping = False  # this rank stops for the job's abort: the line naming the cause is out
        self._progress = 0
        self._since = time.time()
        self._stop = threading.Event()
        token = [uuid.uuid4().hex[:12] if rank == 0 else None]
        dist.broadcast_object_list(token, src=0)
        self.prefix = f"autopart/{token[0]}/"
        self.abort_key = f"{self.prefix}abort"
        self.world = dist.get_world_size()
        self.store = self._client()
        self.store.set(f"{self.prefix}hb/{rank}", self._beat(0))
        self.store.set(f"{self.prefix}pid/{rank}", str(os.getpid()))
        self.local_pids: dict[int, int] = {}  # this machine's ranks -> pid
        if under_launcher():
            try:  # every rank is here (the broadcast above): their pids follow at once
                self.store.wait([f"{self.prefix}pid/{r}" for r in self._local_ranks()], timedelta(seconds=10))
            except Exception:
                pass  # the thread reads what is missing
            self._read_local_pids()
        self._prev_sigterm: Any = None
        if under_launcher() and not under_autopart_launcher() and threading.current_thread() is threading.main_thread():
            self._prev_sigterm = signal.signal(signal.SIGTERM, self._on_torchrun_stop)
        self._thread = threading.Thread(target=self._run, name="autopart-watchdog", daemon=True)
        self._thread.start()

    def _client(self) -> Any:
        """A store client of our own: the main thread may be inside the default one."""
        store = dist.distributed_c10d._get_default_store()
        while hasattr(store, "underlying_store"):
            store = store.underlying_store
        self._address = (store.host, store.port)
        return dist.TCPStore(store.host, store.port, is_master=False, timeout=timedelta(seconds=30))

    def _store_alive(self) -> bool:
        """Whether the store still listens. Probed with a bare connection before the store is used,
        since a store call to a dead host logs a C++ stack trace before it raises."""
        if self.rank == 0:
            return True
        try:
            socket.create_connection(self._address, timeout=2.0).close()
            return True
        except OSError:
            return False

    # --- called by the training loop -------------------------------------------------------

    def progress(self, phase: str | None = None) -> None:
        """Record completed work (and the phase entered); cheap, called per forward/backward/loss."""
        self._progress += 1
        self._since = time.time()
        if phase is not None:
            self.phase = phase

    def who(self, rank: int) -> str:
        return f"rank {rank} ({self.stages_of(rank)})"

    def publish(self, msg: str) -> tuple[str, bool]:
        """Publish ``msg`` as the job's abort unless another rank did first: (the abort, ours?)."""
        if not self._store_alive():
            return msg, True
        mine = f"{msg[:500]}\n@{self.rank}"  # who published: two ranks may word the same message alike
        try:
            cur = self.store.compare_set(self.abort_key, "", mine).decode()
        except Exception:
            return msg, True
        return cur.rsplit("\n@", 1)[0], cur == mine

    def _abort(self) -> tuple[str, int] | None:
        """The job's abort message and the rank that published it, if there is one."""
        if not self.store.check([self.abort_key]):
            return None
        text, _, publisher = self.store.get(self.abort_key).decode().rpartition("\n@")
        return text, int(publisher)

    def failed(self, exc: BaseException) -> RankFailedError:
        """The error a step raises on this rank after ``exc``: this rank's own failure, published at
        once, or (for a communication error) the peer's failure that caused it."""
        own = self.phase == "compute" and not _is_comm_error(exc)
        if not own:
            peer = self.peer_failure(wait_s=self.timeout_s + 3.0)
            if peer is not None:
                self.stopping = True
                self._linger()  # marks this rank stopped; rank 0 (its exit takes the store) waits for the others
                return RankFailedError(f"{peer} (rank {self.rank} stops)", published_by_peer=True)
        # pipelining wraps a stage's error in a RuntimeError: name the original
        msg, ours = self.publish(f"{self.who(self.rank)} failed: {one_line(root_cause(exc))}")
        self._linger()
        if ours:
            return RankFailedError(msg)
        return RankFailedError(f"{msg} (rank {self.rank} stops)", published_by_peer=True)

    def peer_failure(self, wait_s: float) -> str | None:
        """A peer's abort message, waiting up to ``wait_s`` for one (the thread meanwhile ends this
        process if a peer died or hangs). If the store is gone, rank 0 died."""
        deadline = time.monotonic() + wait_s
        while True:
            if not self._store_alive():
                return self._store_gone()
            try:
                abort = self._abort()
                if abort is not None:
                    return None if abort[1] == self.rank else abort[0]
            except Exception:
                return self._store_gone()
            if time.monotonic() > deadline:
                return None
            time.sleep(0.1)

    def close(self) -> None:
        if self._prev_sigterm is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._prev_sigterm)
            self._prev_sigterm = None
        if not self._stop.is_set():
            self._stop.set()
            try:
                self.store.set(f"{self.prefix}done/{self.rank}", "1")
            except Exception:
                pass
            # Wait for the thread to leave the store: a daemon thread still inside a store call when
            # the interpreter exits made a rank abort ("terminate called without an active exception")
            # after a run had finished and written its results.
            if self._thread is not threading.current_thread():
                self._thread.join(timeout=5.0)

    # --- a rank that ended under raw torchrun ([Note: stopped by torchrun]) -----------------

    def _local_ranks(self) -> list[int]:
        """The ranks on this machine: torchrun numbers them contiguously from ``rank - LOCAL_RANK``."""
        local = int(os.environ.get("LOCAL_RANK", "0"))
        size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        first = self.rank - local
        return [r for r in range(first, first + size) if 0 <= r < self.world]

    def _read_local_pids(self) -> None:
        """Learn the pids of this machine's ranks (once: they publish them as they start)."""
        if not under_launcher() or len(self.local_pids) == len(self._local_ranks()):
            return
        for r in self._local_ranks():
            key = f"{self.prefix}pid/{r}"
            if r not in self.local_pids and self.store.check([key]):
                self.local_pids[r] = int(self.store.get(key).decode())

    def _left_error_file(self, rank: int) -> bool:
        """Whether local ``rank`` wrote its torchelastic error file (autopart's line, or torchelastic's
        ``@record``): then it reported its own failure. The files lie in ``.../<local rank>/error.json``;
        where that layout is not found, assume it did (and say nothing rather than something wrong)."""
        mine = os.environ.get("TORCHELASTIC_ERROR_FILE")
        local = os.environ.get("LOCAL_RANK")
        if not mine or local is None or Path(mine).parent.name != local:
            return True
        peer_local = rank - (self.rank - int(local))
        return (Path(mine).parent.parent / str(peer_local) / Path(mine).name).exists()

    def _on_torchrun_stop(self, signum: int, frame: Any) -> None:
        """SIGTERM from torchrun: when a rank of this machine has ended, name it (once: the lowest
        surviving local rank speaks), then end as SIGTERM would have."""
        dead = sorted(r for r, pid in self.local_pids.items() if r != self.rank and not _alive(pid))
        alive = [r for r in self._local_ranks() if r not in dead]
        silent = [r for r in dead if not self._left_error_file(r)]  # the others printed their own line
        # A rank that stops for the job's abort was not the cause: whoever published it has spoken.
        if silent and alive and alive[0] == self.rank and not self.stopping:
            dead = silent
            line = (f"autopart: error: {self.who(dead[0])} died: its process ended without an error "
                    f"(it exited or was killed), and torchrun stopped the job")
            print(line, file=sys.stderr, flush=True)
            record_error(line, True)
        os._exit(128 + signal.SIGTERM)

    # --- the thread -------------------------------------------------------------------------

    def _beat(self, beat: int) -> str:
        return f"{beat}:{self._progress}:{self.phase}:{self._since:.3f}"

    def _store_gone(self) -> str:
        return f"{self.who(0)} died: the job's store, which rank 0 hosts, is unreachable"

    def _die(self, msg: str, ours: bool, dead: int | None = None) -> None:
        self.stopping = True
        if ours or not under_launcher():
            report(msg if ours else f"{msg} (rank {self.rank} stops)")
        else:  # another rank printed the cause: this rank's line goes to its error file only (not primary, so
            # autopart's launcher, which may see this rank end first, does not take it for the cause; torchrun's
            # summary and the peers' SIGTERM handlers read it)
            report(msg if under_autopart_launcher() else f"{msg} (rank {self.rank} stops)", primary=False)
        self._linger(dead)
        os._exit(1)

    def _linger(self, dead: int | None = None) -> None:
        """Mark this rank stopped; on rank 0, whose exit takes the store with it, first wait (a few
        polls, at most 5 s: a loaded machine starves the threads) until the others, but the ``dead``
        rank this rank found, have read why the job stops."""
        try:
            if not self._store_alive():
                return
            self.store.set(f"{self.prefix}stopped/{self.rank}", "1")
            if self.rank == 0:
                def ended(r: int) -> bool:
                    return any(self.store.check([f"{self.prefix}{k}/{r}"]) for k in ("stopped", "done"))

                deadline = time.monotonic() + 5.0
                while time.monotonic() < deadline and not all(ended(r) for r in range(1, self.world) if r != dead):
                    time.sleep(0.1)
        except Exception:
            pass

    def _stop_for(self, msg: str, dead: int | None = None) -> None:
        """Publish ``msg`` (unless a peer published first) and end this process."""
        cur, ours = self.publish(msg)
        self._die(cur, ours, dead if ours else None)

    def _watched(self, stalled: bool) -> list[int]:
        """The peers this rank reads each poll: its ring successor only, so that the store serves
        O(world) reads a poll, not O(world^2); every peer once this rank has stalled, to name the
        culprit (see [Note: watching a ring])."""
        if self.world == 1:
            return []
        if stalled:
            return [r for r in range(self.world) if r != self.rank]
        return [(self.rank + 1) % self.world]

    def _run(self) -> None:
        beat = 0
        # peer -> (its beat, when it last moved, since when it is read every poll, when last read)
        seen: dict[int, tuple[str, float, float, float]] = {}
        poll = min(1.0, max(0.1, self.timeout_s / 10))
        while not self._stop.wait(poll):
            beat += 1
            if not self._store_alive():
                if self.busy:
                    self._die(self._store_gone(), True)
                continue
            try:
                self.store.set(f"{self.prefix}hb/{self.rank}", self._beat(beat))
                self._read_local_pids()
                abort = self._abort()
                if abort is not None:
                    msg = abort[0]
                    if abort[1] != self.rank:
                        time.sleep(0.5)  # let the failing rank print its own line first
                        self._die(msg, False)
                    continue
                now = time.monotonic()
                stalled = self.in_step and time.time() - self._since > self.timeout_s
                peers: dict[int, tuple[int, str, float]] = {}  # rank -> (progress, phase, since)
                watched = self._watched(stalled)
                for r in watched:
                    if self.store.check([f"{self.prefix}done/{r}"]):
                        continue
                    hb = self.store.get(f"{self.prefix}hb/{r}").decode()
                    b, prog, phase, since = hb.split(":", 3)
                    peers[r] = (int(prog), phase, float(since))
                    last = seen.get(r)
                    if last is None or now - last[3] > 2 * poll + 1.0:  # not read last poll: start afresh
                        seen[r] = (b, now, now, now)
                    elif last[0] != b:
                        seen[r] = (b, now, last[2], now)
                    else:
                        seen[r] = (*last[:3], now)
                        if self.busy and now - last[1] > self.timeout_s:
                            self._stop_for(f"{self.who(r)} died: no heartbeat for {self.timeout_s:g} s", r)
                if stalled:
                    # A peer whose beat stopped for several polls is dead, not hung (its phase is stale);
                    # a peer read only since the stall began is judged once it has been watched that long.
                    window = 3 * poll + 1.0
                    if any(now - seen[r][2] < window for r in peers):
                        continue
                    dead = [r for r in peers if now - seen[r][1] > window]
                    if dead:
                        self._stop_for(f"{self.who(dead[0])} died: no heartbeat for {now - seen[dead[0]][1]:.0f} s", dead[0])
                    self._stop_for(self._hang_message(peers))
            except Exception:  # the store itself is gone: the rank hosting it died
                if self._stop.is_set():
                    return
                if self.busy:
                    self._die(self._store_gone(), self.rank != 0)

    def _hang_message(self, peers: dict[int, tuple[int, str, float]]) -> str:
        """This rank is stalled: name the rank the job waits for (see [Note: failing ranks])."""
        wall = time.time()
        # A peer stalled too if it has not progressed for half the timeout: the culprit entered its stuck
        # work a moment after this rank's last progress, so it may not have reached the full timeout yet.
        stalled = {r: (phase, since) for r, (_, phase, since) in peers.items() if wall - since > self.timeout_s / 2}
        stalled[self.rank] = (self.phase, self._since)
        # A rank between steps ("idle") is not waiting for anyone either: it hangs in the caller's code.
        computing = [r for r, (phase, _) in stalled.items() if phase in ("compute", "idle")]
        culprit = min(computing or stalled, key=lambda r: (stalled[r][1], r))
        phase, since = stalled[culprit]
        where = {"compute": "in its own forward, backward or loss", "idle": "outside the step"}.get(phase, "waiting")
        return f"{self.who(culprit)} hangs: no progress for {wall - since:.0f} s ({where}; timeout_s={self.timeout_s:g})"
