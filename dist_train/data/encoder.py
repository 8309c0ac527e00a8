"""The encoding processes of `dist-train prepare`: batches encoded on N processes in input
order, at most 2 per process in flight; the processes end with prepare, even with a kill -9."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np

from dist_train.data.sources import Batch
from dist_train.data.tokenizer import Codec, TokenizerSpec, build_codec, encode_pieces
from dist_train.errors import DistTrainError

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class Encoder:
    """Encodes batches on `workers` processes, in input order, with at most 2 per worker in
    flight (so the input is not read ahead of the writer); one worker encodes in this process."""

    def __init__(self, spec: TokenizerSpec, dtype: np.dtype, workers: int) -> None:
        self.spec, self.dtype, self.workers = spec, dtype, workers
        self.pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> Encoder:
        if self.workers > 1:
            # spawn, not fork: a fork after the tokenizers library has run its thread pool
            # (BPE training) is unsafe. An executor, not multiprocessing.Pool: a worker that
            # dies (killed, out of memory) fails the run instead of hanging it.
            self.pool = ProcessPoolExecutor(
                self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
                initargs=(self.spec, self.dtype, os.getpid()),
            )
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def map(self, stream: Iterable[Batch]) -> Iterator[tuple[np.ndarray, int]]:
        if self.pool is None:
            codec = build_codec(self.spec)
            for b in stream:
                yield encode_pieces(codec, b.texts, b.ends, self.dtype), b.size
            return
        pending: deque[tuple[Future[np.ndarray], int]] = deque()
        for b in stream:
            pending.append((self.pool.submit(_encode_batch, b.texts, b.ends), b.size))
            if len(pending) >= 2 * self.workers:
                future, size = pending.popleft()
                yield _result(future), size
        while pending:
            future, size = pending.popleft()
            yield _result(future), size


def _result(future: Future[np.ndarray]) -> np.ndarray:
    try:
        return future.result()
    except BrokenProcessPool:
        raise DistTrainError(
            "an encoding worker process died (out of memory? killed?); try fewer --workers"
        ) from None


# A worker process's codec, built once by the pool's initializer: the tokenizer (megabytes of
# JSON for a large vocabulary) crosses to each worker once, not with every batch.
_worker_codec: list[tuple[Codec, np.dtype]] = []


def _init_worker(spec: TokenizerSpec, dtype: np.dtype, parent: int) -> None:
    _die_with(parent)
    # N single-threaded workers: the tokenizers library's own thread pool would oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_codec.append((build_codec(spec), dtype))


def _die_with(parent: int) -> None:
    """A worker ends with prepare, even when prepare is killed (kill -9 skips the pool's
    shutdown, and an idle worker would wait for work forever): on Linux the kernel sends it
    SIGKILL (PR_SET_PDEATHSIG), elsewhere a thread watches the parent's pid."""
    asked = False
    if sys.platform == "linux":
        import ctypes

        asked = ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL) == 0
    if not asked:
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    if os.getppid() != parent:  # gone before the line above took effect
        os._exit(1)


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _encode_batch(texts: list[str], ends: list[bool]) -> np.ndarray:
    codec, dtype = _worker_codec[0]
    return encode_pieces(codec, texts, ends, dtype)
