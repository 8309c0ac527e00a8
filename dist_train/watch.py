"""Each worker's progress where its peers can read it, so that a collective that times out
names the rank that did not arrive (and its step and phase) instead of the waiting rank's
gloo traceback; a worker whose launcher died stops instead of training on unsupervised; and
a multi-node run checks that every node sees the one run directory.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from dist_train.env import DistEnv, restart_count
from dist_train.errors import DistTrainError

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
SILENT_S = 3.0  # no post for this long: the rank (or the way to it) is gone
FAILED_GRACE_S = 3.0  # time for a rank to fail on its own (and say why) before it is ended
# What gloo and NCCL say when a peer does not answer in time or went away.
PEER_TROUBLE = ("timed out", "timeout", "connection closed", "connection reset", "broken pipe")


@dataclass
class Progress:
    """Where this rank is; the loop sets it (attribute writes: free), a thread posts it."""

    step: int = 0
    micro: int = 0
    phase: str = "start-up"
    since: float = field(default_factory=time.time)
    posted: float = 0.0  # when its rank last posted it (a heartbeat: it posts twice a second)

    def enter(self, phase: str, step: int, micro: int = 0) -> None:
        self.phase, self.step, self.micro, self.since = phase, step, micro, time.time()

    def position(self) -> tuple[int, int, int]:
        return self.step, self.micro, list(PHASES).index(self.phase)

    def describe(self) -> str:
        what = PHASES[self.phase]
        return f"{what} at step {self.step + 1} (for {time.time() - self.since:.0f} s)"


def _store(timeout_s: float) -> dist.Store | None:
    """A client of the store torchrun's agent serves to its workers; None outside torchrun."""
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not host or not port:
        return None
    store = dist.TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=timeout_s))
    run = os.environ.get("TORCHELASTIC_RUN_ID", "run")
    return dist.PrefixStore(f"dist_train/progress/{run}/{restart_count()}", store)


class Watch:
    """A daemon thread: posts this rank's progress when it changes, and ends the process
    when its parent (torchrun's agent, inside `dist-train`'s launcher) is gone."""

    def __init__(self, env: DistEnv) -> None:
        self.env, self.progress = env, Progress()
        self._parent = os.getppid()
        self.leaving = False  # set once this rank's loop has ended, however: never cut short
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dist-train-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        store = None
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
                if store is None:
                    return
                store.set(
                    str(self.env.rank), json.dumps([p.step, p.micro, p.phase, p.since, time.time()])
                )
                if not self.leaving and store.check([FAILED]):
                    self._end_if_stuck()
            except Exception:  # the store is gone (the run is ending): nothing left to post
                return

    def _end_if_stuck(self) -> None:
        """A peer failed and said why. This rank gets a moment to fail on its own; if its loop
        is still where it was, it is stuck (in its own code: the agent's SIGTERM would only ask
        it to stop at a log step it never reaches) and ends here."""
        if self._stop.wait(FAILED_GRACE_S) or self.leaving:
            return
        print(
            f"dist-train: rank {self.env.rank}: another rank failed while this one was "
            f"{self.progress.describe()}; stopping it",
            file=sys.stderr,
            flush=True,
        )
        os._exit(1)

    def failed(self) -> None:
        """Tell the other ranks this one failed (and printed why): a rank stuck in its own
        code, which would ignore the agent's SIGTERM (a stop request), ends promptly."""
        try:
            store = _store(timeout_s=5)
            if store is not None:
                store.set(FAILED, str(self.env.rank))
        except Exception:
            pass

    def close(self) -> None:
        self._stop.set()

    def explain(self, error: BaseException, timeout_s: float, run_dir: Path) -> BaseException:
        """A peer failure as one line naming the rank(s) behind, their step and phase; the
        traceback goes to RUN_DIR/logs. Other errors come back unchanged."""
        if not any(word in str(error).lower() for word in PEER_TROUBLE):
            return error
        log = run_dir / "logs" / f"rank_{self.env.rank}.traceback.txt"
        try:
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text("".join(traceback.format_exception(error)))
        except OSError:
            log = Path("(not written)")
        me, now = self.progress, time.time()
        others = read_progress(self.env.world_size, exclude=self.env.rank)
        silent = {r: p for r, p in others.items() if now - p.posted > SILENT_S}
        behind = {
            r: p for r, p in others.items() if r not in silent and p.position() < me.position()
        }
        waited = f"rank {self.env.rank} waited {PHASES[me.phase]} at step {me.step + 1}"
        names = [
            f"rank {r} has not been heard from for {now - p.posted:.0f} s (its process, its "
            "node or the network to it is gone)"
            for r, p in sorted(silent.items())
        ] + [f"rank {r} is {p.describe()}" for r, p in sorted(behind.items())]
        if names:
            text = f"{'; '.join(names)} while {waited} (parallel.timeout_s={timeout_s:g})"
        elif others:
            text = (
                f"every rank reached the same point ({waited}) but the collective did not "
                f"complete: the network between the workers failed ({error_line(error)})"
            )
        else:  # not even the store (on node 0) answers: this node is cut off
            text = (
                f"{waited} and cannot reach the rendezvous store on node 0 either: the network "
                f"from this node failed ({error_line(error)})"
            )
        failure = DistTrainError(f"{text}; traceback in {log}")
        # The waiting ranks of a node find the same laggards: the lowest-numbered speaks (each
        # node's launcher prints to its own terminal, so one per node).
        node = self.env.rank // self.env.local_world_size
        here = range(node * self.env.local_world_size, (node + 1) * self.env.local_world_size)
        first_waiting = min(set(here) - set(behind) - set(silent), default=self.env.rank)
        failure.quiet = self.env.rank != first_waiting  # type: ignore[attr-defined]
        return failure


def error_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0][:200] if lines else type(error).__name__


def read_progress(world_size: int, exclude: int) -> dict[int, Progress]:
    """The other ranks' last posted progress (a rank that never posted is left out)."""
    try:
        store = _store(timeout_s=5)
    except Exception:
        return {}
    if store is None:
        return {}
    found = {}
    for rank in range(world_size):
        if rank != exclude and store.check([str(rank)]):
            found[rank] = Progress(*json.loads(store.get(str(rank))))
    return found


def check_shared_run_dir(run_dir: Path, env: DistEnv) -> None:
    """Several nodes must share one run directory: rank 0 writes a token there and every rank
    must read it back. Node-local directories would train to the end and then lose the run
    in the first save. Collective; nothing stays behind."""
    if env.local_world_size >= env.world_size:  # one node: one filesystem
        return
    token = [secrets.token_hex(8) if env.is_main else ""]
    dist.broadcast_object_list(token)
    path = run_dir / f".shared-check-{token[0]}"
    if env.is_main:
        path.write_text(token[0])
    dist.barrier()
    try:
        seen = env.is_main or path.read_text() == token[0]
    except OSError:
        seen = False
    views: list[tuple[int, str, bool]] = [(0, "", True)] * env.world_size
    dist.all_gather_object(views, (env.rank, socket.gethostname(), seen))
    if env.is_main:
        path.unlink(missing_ok=True)
    blind = [(rank, host) for rank, host, ok in views if not ok]
    if blind:
        ranks = ", ".join(f"rank {rank} on {host}" for rank, host in blind)
        error = DistTrainError(
            f"train.run_dir={str(run_dir)!r}: {ranks} cannot see what rank 0 wrote there; "
            "every node must reach one shared directory (e.g. on NFS or Lustre) at this path"
        )
        error.on_every_rank = True  # type: ignore[attr-defined]
        raise error
