"""Each worker's progress where its peers can read it, so that a collective that times out
names the rank that did not arrive (and its step and phase) instead of the waiting rank's
gloo traceback; a worker whose launcher died stops instead of training on unsupervised.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn

import torch.distributed as dist

from dist_train.errors import EXIT_INFRA, InfraError, first_line
from dist_train.launch.env import DistEnv, restart_count

PHASES = {  # in the order a step goes through them
    "start-up": "starting up",
    "data": "loading data",
    "forward/backward": "in forward/backward (the gradient all-reduce)",
    "optimizer": "in the optimizer step",
    "log": "logging (the loss all-reduce)",
    "checkpoint": "saving a checkpoint",
    "evaluation": "evaluating",
}
POST_EVERY_S = 0.5
FAILED = "failed"  # store key: some rank failed; the others must not linger
STORE_TIMEOUT_S = 1.0  # after a failure: node 0's store answers at once, or is out of reach
SILENT_S = 1.5  # no post for this long (3 posting periods): the rank, or the way to it, is gone
FAILED_GRACE_S = 3.0  # time for a rank to fail on its own (and say why) before it is ended
FAILED_EXIT_WAIT_S = 60.0  # the most a stuck rank waits for the failed one to exit first
# What gloo and NCCL say when a peer does not answer in time or went away.
PEER_TROUBLE = (
    "timed out",
    "timeout",
    "connection closed",
    "connection reset",
    "connection refused",
    "broken pipe",
    "remote process exited",  # NCCL
    "network error",  # NCCL
)


class Progress:
    """Where this rank is. The loop replaces one tuple (free, and never half-written); the
    watch thread reads it."""

    def __init__(self) -> None:
        self.at: tuple[int, int, str, float] = (0, 0, "start-up", time.monotonic())

    def enter(self, phase: str, step: int, micro: int = 0) -> None:
        self.at = (step, micro, phase, time.monotonic())

    def report(self, seq: int) -> Report:
        step, micro, phase, since = self.at
        return Report(step, micro, phase, time.monotonic() - since, seq)


@dataclass(frozen=True)
class Report:
    """A rank's progress as posted: durations measured on its own clock (nodes' clocks
    differ), and a sequence number that grows with every post (a heartbeat)."""

    step: int
    micro: int
    phase: str
    seconds: float  # in this phase
    seq: int

    def position(self) -> tuple[int, int, int]:
        return self.step, self.micro, list(PHASES).index(self.phase)

    def describe(self) -> str:
        return f"{PHASES[self.phase]} at step {self.step + 1} (for {self.seconds:.0f} s)"


def _store(timeout_s: float) -> dist.Store | None:
    """A client of the store torchrun's agent serves to its workers; None outside torchrun."""
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not host or not port:
        return None
    store = dist.TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=timeout_s))
    run = os.environ.get("TORCHELASTIC_RUN_ID", "run")
    return dist.PrefixStore(f"dist_train/progress/{run}/{restart_count()}", store)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    # A zombie (exited, not yet reaped by the agent) has exited for the launcher's purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class Watch:
    """A daemon thread: posts this rank's progress when it changes, and ends the process
    when its parent (torchrun's agent, inside `dist-train`'s launcher) is gone."""

    def __init__(self, env: DistEnv, progress: Progress | None = None) -> None:
        self.env, self.progress = env, progress or Progress()
        self._parent = os.getppid()
        self.leaving = False  # set once this rank's loop has ended, however: never cut short
        self.store_gone = False  # node 0's store did not answer after a failure: not again
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dist-train-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        store, seq = None, 0
        while not self._stop.wait(POST_EVERY_S):
            if os.getppid() != self._parent:  # re-parented: the launcher was killed
                print(
                    f"dist-train: rank {self.env.rank}: the launcher (pid {self._parent}) is "
                    "gone; stopping this worker",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(1)
            p = self.progress
            try:
                store = store or _store(timeout_s=10)
                if store is not None:  # None: no torchrun store to post to
                    seq += 1
                    store.set(str(self.env.rank), json.dumps(asdict(p.report(seq))))
                    if not self.leaving and store.check([FAILED]):
                        self._end_if_stuck(store)
            except Exception:  # not up yet, or gone: try again; the parent check goes on
                store = None

    def _end_if_stuck(self, store: Any) -> None:
        """A peer failed and said why. This rank gets a moment to fail on its own; if its loop
        is still where it was, it is stuck (in its own code: the agent's SIGTERM would only ask
        it to stop at a log step it never reaches) and ends here, after the failed peer's
        process when it runs on this host: the launcher names the worker that exited first,
        which must be the cause, not this consequence (however loaded the machine)."""
        where = self.progress.at
        if self._stop.wait(FAILED_GRACE_S) or self.leaving or self.progress.at != where:
            return
        failed = json.loads(store.get(FAILED))
        if isinstance(failed, dict) and failed.get("host") == socket.gethostname():
            deadline = time.monotonic() + FAILED_EXIT_WAIT_S
            while _pid_alive(int(failed["pid"])) and time.monotonic() < deadline:
                if self._stop.wait(0.1) or self.leaving:
                    return
        print(
            f"dist-train: rank {self.env.rank}: another rank failed while this one was "
            f"{self.progress.report(0).describe()}; stopping it",
            file=sys.stderr,
            flush=True,
        )
        os._exit(EXIT_INFRA)  # its own failure is a peer's: what a retry can fix

    def failed(self) -> None:
        """Tell the other ranks this one failed (and printed why): a rank stuck in its own
        code, which would ignore the agent's SIGTERM (a stop request), ends promptly."""
        if self.store_gone:  # this node is cut off: nobody to tell (and no time to lose)
            return
        try:
            store = _store(timeout_s=STORE_TIMEOUT_S)
            if store is not None:
                record = {"rank": self.env.rank, "host": socket.gethostname(), "pid": os.getpid()}
                store.set(FAILED, json.dumps(record))
        except Exception:
            pass

    def leave(self, error: BaseException) -> NoReturn:
        """This rank lost a peer and `explain` said why: it says so and exits at once, as a rank
        the watch ends does. Not through the interpreter's shutdown: this thread may be inside
        a store call to a node that is gone (joining it waits out the call's timeout, and a
        daemon thread left there can abort the shutdown), and the process group's teardown
        waits on the dead link too. The trainer has closed what it opened by now."""
        if not getattr(error, "quiet", False):
            print(f"error: {error}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(EXIT_INFRA)

    def close(self) -> None:
        self._stop.set()
        # Not left inside a store call while the interpreter shuts down (it can abort there).
        self._thread.join(timeout=2)

    def explain(self, error: BaseException, timeout_s: float, run_dir: Path) -> BaseException:
        """A peer failure as one line naming the rank(s) behind, their step and phase, as an
        InfraError (a retry can fix it); the traceback goes to RUN_DIR/logs. Other errors come
        back unchanged."""
        if not peer_trouble(error):
            return error
        log = _write_traceback(error, run_dir / "logs" / f"rank_{self.env.rank}.traceback.txt")
        me = self.progress.report(0)
        try:
            store = _store(timeout_s=STORE_TIMEOUT_S)
        except Exception:  # node 0's store is out of reach too
            store, self.store_gone = None, True
        first = read_progress(store, self.env.world_size, exclude=self.env.rank)
        if first:
            time.sleep(SILENT_S)  # a rank that posts nothing meanwhile is gone, or cut off
        others = read_progress(store, self.env.world_size, exclude=self.env.rank) if first else {}
        silent = {r: p for r, p in others.items() if r in first and first[r].seq == p.seq}
        behind = {
            r: p for r, p in others.items() if r not in silent and p.position() < me.position()
        }
        text = _peer_text(me, self.env.rank, silent, behind, bool(others), error)
        if me.phase == "checkpoint" or str(error).startswith("checkpoint:"):
            # Not the disk: the save's collectives lost a peer (a commit needs every rank).
            text += "; a peer was lost during the checkpoint save, which did not complete (the "
            text += "checkpoints before it are untouched)"
        failure = InfraError(f"{text} (parallel.timeout_s={timeout_s:g}); traceback in {log}")
        # The waiting ranks of a node find the same laggards: the lowest-numbered speaks (each
        # node's launcher prints to its own terminal, so one per node).
        node = self.env.rank // self.env.local_world_size
        here = range(node * self.env.local_world_size, (node + 1) * self.env.local_world_size)
        first_waiting = min(set(here) - set(behind) - set(silent), default=self.env.rank)
        failure.quiet = self.env.rank != first_waiting  # type: ignore[attr-defined]
        return failure


def peer_trouble(error: BaseException) -> bool:
    """A collective that timed out or lost its peer (gloo's and NCCL's RuntimeErrors), or a
    checkpoint save that failed for that reason."""
    if not isinstance(error, RuntimeError) and not str(error).startswith("checkpoint:"):
        return False
    return any(word in str(error).lower() for word in PEER_TROUBLE)


def _peer_text(
    me: Report,
    rank: int,
    silent: dict[int, Report],
    behind: dict[int, Report],
    reachable: bool,
    error: BaseException,
) -> str:
    """What the waiting rank `rank` (at `me`) can say about its peers."""
    waited = f"rank {rank} waited {PHASES[me.phase]} at step {me.step + 1}"
    names = [
        f"rank {r} stopped reporting (its process, its node or the network to it is gone; "
        f"{_last_seen(p, me)})"
        for r, p in sorted(silent.items())
    ] + [f"rank {r} is {p.describe()}" for r, p in sorted(behind.items())]
    if names:
        return f"{'; '.join(names)} while {waited}"
    if reachable:
        return (
            f"every rank that reports is as far as this one ({waited}), yet the collective did "
            "not complete: the network between the workers failed, or a rank is stuck inside it "
            f"({first_line(error)})"
        )
    # not even the store (on node 0) answers: this node is cut off
    return (
        f"{waited} and cannot reach the rendezvous store on node 0 either: the network from "
        f"this node failed ({first_line(error)})"
    )


def _last_seen(last: Report, me: Report) -> str:
    """A silent rank's last report, if it can still be where that rank was. Reports are posted
    twice a second, many steps apart on a fast run; but every rank took part in this rank's
    gradient all-reduces up to step `done`, so a report from before that is stale, and where
    the rank was is unknown."""
    after_all_reduce = list(PHASES).index(me.phase) > list(PHASES).index("forward/backward")
    done = me.step + 1 if after_all_reduce else me.step  # steps counted from 1
    if last.step + 1 >= done:
        return f"it was last {last.describe()}"
    return (
        f"where it was is unknown: it got past step {done} with this rank, and its last "
        f"report, from step {last.step + 1}, is older"
    )


def _write_traceback(error: BaseException, log: Path) -> Path:
    """The whole traceback into `log`, which comes back; a placeholder when it cannot be written
    (the one-line error names it either way)."""
    try:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("".join(traceback.format_exception(error)))
    except OSError:
        return Path("(not written)")
    return log


def read_progress(store: dist.Store | None, world_size: int, exclude: int) -> dict[int, Report]:
    """The other ranks' last posted progress; nothing for a rank that never posted, and
    nothing at all when the store cannot be reached (it lives on node 0)."""
    if store is None:
        return {}
    try:
        keys = [str(rank) for rank in range(world_size) if rank != exclude]
        posted = [key for key in keys if store.check([key])]
        values = store.multi_get(posted) if posted else []
        return {int(k): Report(**json.loads(v)) for k, v in zip(posted, values, strict=True)}
    except Exception:  # the store went too: the caller says so
        return {}
