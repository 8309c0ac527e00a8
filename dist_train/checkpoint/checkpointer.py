"""Sharded, atomic, optionally async checkpoints (this package alone imports DCP).

Every rank writes its own shards into `checkpoints/.tmp_step_N/`; once all shards, DCP's
`.metadata` and the RNG files are there, rank 0 writes `manifest.json` and renames the folder to
`step_N` (see commit.py: an existing `step_N` is renamed aside first, then deleted). A `step_N`
folder therefore exists only when complete; anything else is ignored. Each manifest names its
parent, the checkpoint the run continued (lineage.py).
"""

from __future__ import annotations

import copy
import shutil
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from dist_train.checkpoint.checksums import damaged_files
from dist_train.checkpoint.commit import commit_step, save_failure
from dist_train.checkpoint.files import (
    QUIET_MESSAGE,
    TMP,
    check_compatible,
    check_files,
    check_shapes,
    corrupted,
    read_manifest,
    read_tensor_metadata,
    single_process_quiet,
    step_name,
)
from dist_train.checkpoint.integrity import HashingWriter
from dist_train.checkpoint.lineage import reference
from dist_train.checkpoint.reader import ThreadedFileSystemReader
from dist_train.checkpoint.state import loaded_in_place, rng_state, set_rng_state, tied_names
from dist_train.checkpoint.train_state import TrainState
from dist_train.config.schema import RunConfig
from dist_train.errors import ConfigError, DistTrainError, first_line
from dist_train.launch.env import DistEnv
from dist_train.launch.faults import Fault
from dist_train.parallel.precision import Precision
from dist_train.parallel.wrap import unwrap


class Checkpointer:
    """Saves and loads model, optimizer, precision (loss scaler), train state and per-rank RNG."""

    def __init__(
        self,
        cfg: RunConfig,
        env: DistEnv,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        precision: Precision,
        fault: Fault | None = None,
    ) -> None:
        """`fault`: a test's (DIST_TRAIN_FAULT), struck inside saves, commits and retention."""
        self.cfg, self.env, self.fault = cfg, env, fault
        self.model, self.optimizer, self.precision = model, optimizer, precision
        self.root = Path(cfg.train.run_dir) / "checkpoints"
        self.tied = tied_names(unwrap(model))  # for the manifest: export stores them once
        # Background saves talk on their own gloo group: sharing the training group would let
        # the save's collectives interleave with the loop's (a deadlock or a wrong result).
        # Synchronous saves block the loop, so they use the training group (None = default).
        async_group = env.is_distributed and cfg.checkpoint.enabled and cfg.checkpoint.async_save
        self.group = dist.new_group(backend="gloo") if async_group else None
        if cfg.checkpoint.async_save and not env.is_distributed:
            # DCP's background thread warns on every single-process save that it "assumes" one
            # process (we said so: no_dist=True), after any `catch_warnings` here has exited.
            # Thread-safe scoping of a filter does not exist before Python 3.14: drop it for
            # the process.
            warnings.filterwarnings("ignore", message=QUIET_MESSAGE)
        # One stager for the whole run: it keeps the staging copy's memory between saves, so a
        # background save blocks for a copy into memory already there (page-locked on CUDA),
        # not for allocating and faulting in a fresh copy of the state every time. Staging runs
        # on the training thread: the optimizer cannot touch the state before the copy is done.
        self._stager = (
            DefaultStager(
                StagingOptions(
                    use_pinned_memory=env.device.type == "cuda",
                    use_shared_memory=False,
                    use_async_staging=False,
                    use_non_blocking_copy=False,
                )
            )
            if cfg.checkpoint.async_save
            else None
        )
        self._pending: tuple[Future[Any], TrainState, Path] | None = None
        self.saved_step: int | None = None  # the step of the newest save started
        self._verifying: tuple[Future[list[str]], Path] | None = None  # after a load
        # The checkpoint the next commit continues: the one loaded, then each one committed.
        self.parent: dict[str, Any] | None = None

    def _state(self, with_optimizer: bool) -> dict[str, Any]:
        state = {
            "model": get_model_state_dict(self.model),
            "precision": self.precision.state_dict(),
        }
        if with_optimizer:
            state["optim"] = get_optimizer_state_dict(self.model, self.optimizer)
        return state

    def _saves_optimizer(self) -> bool:
        """A stateless optimizer (SGD without momentum) has nothing to save, and asking DCP for
        its state dict would run a zero-lr optimizer step over model-sized zero gradients
        on every save (torch initializes empty optimizer state that way)."""
        return bool(self.optimizer.state)

    def _dcp_kwargs(self, background: bool = False) -> dict[str, Any]:
        if not self.env.is_distributed:
            return {"no_dist": True}
        return {"process_group": self.group if background else None}

    def save(self, state: TrainState, blocking: bool) -> None:
        """Sync: returns once committed. Async: returns once the state is copied in memory."""
        self.wait()  # one save at a time; also commits the previous async one
        tmp = self.root / f"{TMP}{step_name(state.step)}"
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # debris of a crashed attempt
            tmp.mkdir(parents=True)
        self._barrier()
        self.saved_step = state.step
        if blocking or not self.cfg.checkpoint.async_save:
            try:
                self._write_rng(tmp)
                with single_process_quiet():
                    dcp.save(
                        self._state(self._saves_optimizer()),
                        checkpoint_id=tmp,
                        storage_writer=HashingWriter(tmp, self._strike("sync-save", state)),
                        **self._dcp_kwargs(),
                    )
                self._commit(state, tmp)
            except (Exception, CheckpointException) as e:  # DCP raises it on every rank alike
                raise self._failed(tmp, e) from None
        else:
            self._write_rng(tmp)
            with single_process_quiet():
                future = dcp.async_save(
                    self._state(self._saves_optimizer()),
                    checkpoint_id=tmp,
                    storage_writer=HashingWriter(tmp),
                    async_stager=self._stager,
                    **self._dcp_kwargs(background=True),
                )
            self._pending = (future, copy.deepcopy(state), tmp)  # type: ignore[assignment]
            if self.fault is not None:  # a test's: strikes while the write runs in the background
                self.fault.reached("async-save", state.step)

    def _strike(self, point: str, state: TrainState) -> Callable[[], None] | None:
        """What strikes the test's fault at `point` of this save (None: no fault)."""
        fault, step = self.fault, state.step
        return None if fault is None else lambda: fault.reached(point, step)

    @property
    def saving(self) -> bool:
        """A background save is under way (or done, not yet committed)."""
        return self._pending is not None

    def poll(self) -> None:
        """Commit a finished background save; costs nothing while it is still running."""
        if self._pending is not None and self._pending[0].done():
            self.wait()

    def wait(self) -> None:
        if self._pending is None:
            return
        future, saved, tmp = self._pending
        self._pending = None
        try:
            future.result()  # re-raises a failed write here, on the training thread
            self._commit(saved, tmp)
        except (Exception, CheckpointException) as e:
            raise self._failed(tmp, e) from None

    def _write_rng(self, tmp: Path) -> None:
        (tmp / "rng").mkdir(exist_ok=True)
        torch.save(rng_state(), tmp / "rng" / f"rank_{self.env.rank}.pt")

    def _failed(self, tmp: Path, error: BaseException) -> DistTrainError:
        """The failed save's one-line error; rank 0 removes the partial folder."""
        return save_failure(self.root, tmp, error, self.env.is_main)

    def _commit(self, saved: TrainState, tmp: Path) -> None:
        """Rank 0 makes the checkpoint visible: manifest, fsync, atomic renames, retention.
        DCP returns on rank 0 only after every rank's shards and the metadata are written."""
        if not self.env.is_main:
            return
        self.parent = commit_step(
            self.cfg, self.env, self.root, saved, tmp, self.tied, self.parent, self.fault
        )

    def load(self, path: Path, state: TrainState) -> None:
        """Restore everything from a complete checkpoint, checked before any collective."""
        manifest = read_manifest(path)
        check_compatible(self.cfg, manifest, path)
        check_files(manifest, path, checksums=False)  # sizes now; the bytes right after the load
        saved_keys = read_tensor_metadata(path)
        current = self._state(with_optimizer=any(k.startswith("optim.") for k in saved_keys))
        if not any(k.startswith("precision.") for k in saved_keys):
            current.pop("precision")  # saved without a loss scaler: fp16 now starts a fresh one
        check_shapes(current, path)
        try:
            with single_process_quiet():
                dcp.load(
                    current, storage_reader=ThreadedFileSystemReader(path), **self._dcp_kwargs()
                )
        except (Exception, CheckpointException) as e:  # DCP raises it on every rank alike
            raise ConfigError(
                "resume", str(path), f"cannot read checkpoint ({first_line(e)})"
            ) from None
        self._verifying = (self._verify_in_background(manifest, path), path)
        if not loaded_in_place(current["model"], self.model):
            set_model_state_dict(self.model, current["model"])
        if "optim" in current:
            set_optimizer_state_dict(self.model, self.optimizer, current["optim"])
        self.precision.load_state_dict(current.get("precision", {}))
        state.step, state.samples_seen = manifest["step"], manifest["samples_seen"]
        self.parent = reference(manifest)
        trainer = manifest.get("trainer", {})  # absent in checkpoints of earlier versions
        state.watches = trainer.get("watches", {})
        state.stopped_early = trainer.get("stopped_early", False)
        state.eval_owed = trainer.get("eval_owed", False)
        # RNG streams are per rank; with another world size they cannot map one to one (the data
        # order does not depend on them: the sampler is a pure function of seed and step).
        if manifest["world_size"] == self.env.world_size:
            set_rng_state(torch.load(path / "rng" / f"rank_{self.env.rank}.pt", weights_only=False))

    def _verify_in_background(self, manifest: dict[str, Any], path: Path) -> Future[list[str]]:
        """Checksums of this rank's share of the files (every N-th) on a thread, started once
        DCP has read them: the pages are then in the page cache and hashing them through a
        memory map, without the GIL, takes ~15-45 ms per 400 MB while the rest of the state
        (optimizer, RNG) is restored. `check_verified` collects the verdict: the trainer calls it
        right after the load, before anything of the run is written."""
        names = sorted(manifest["files"])[self.env.rank :: self.env.world_size]
        pool = ThreadPoolExecutor(1)
        future = pool.submit(damaged_files, manifest, path, names)
        pool.shutdown(wait=False)  # the thread ends when the check does; nothing waits here
        return future

    def check_verified(self) -> None:
        """A collective (call it on every rank at the same step): raises, on every rank, when
        any rank found a file of the resumed checkpoint damaged."""
        if self._verifying is None:
            return
        future, path = self._verifying
        self._verifying = None
        bad = future.result()
        if self.env.is_distributed:
            gathered: list[list[str]] = [[] for _ in range(self.env.world_size)]
            dist.all_gather_object(gathered, bad)
            bad = [name for part in gathered for name in part]
        if bad:
            error = corrupted("resume", path, bad)
            error.on_every_rank = True  # type: ignore[attr-defined]  # rank 0 prints it
            raise error

    def _barrier(self) -> None:
        if self.env.is_distributed:
            dist.barrier()  # on the training thread, like every save starts

    def close(self) -> None:
        """Finish a pending save, then let go of the model: a DDP wrapper still referenced here
        would outlive the process group, which aborts the process now and then (gloo). A failed
        background write is raised, after everything is released all the same."""
        try:
            self.wait()
        finally:
            self.model = self.optimizer = None  # type: ignore[assignment]
            if self._stager is not None:
                self._stager.close()
                self._stager = None
            if self.group is not None:
                dist.destroy_process_group(self.group)
                self.group = None
