"""A multi-node run checks that every node sees the one run directory (node-local directories
would train to the end and then lose the run in the first save)."""

from __future__ import annotations

import secrets
import socket
from pathlib import Path

import torch.distributed as dist

from dist_train.errors import DistTrainError
from dist_train.launch.env import DistEnv


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
