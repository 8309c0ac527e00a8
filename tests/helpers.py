"""What tests that train share: a run in this process (or on each rank of `run_on_ranks`), the
tiny settings that keep runs to seconds, and the exactness comparison."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch


class StopTraining(Exception):
    """Raised by a test hook to cut a run short, as a crash or a kill would."""


def train_in_process(
    overrides: list[str],
    stop_at: int | None = None,
    config: str | Path | None = None,
    probe: Callable[[Any], Any] | None = None,
) -> dict[str, Any]:
    """Train in this process (a rank when RANK etc. are set): losses per step, full weights,
    and what this rank stores locally (`_outcome`). `stop_at=N` interrupts the run right after
    step N; `config` is a YAML file under the overrides. `probe(trainer)` runs once the trainer
    is built, before it trains (to install hooks); what it returns comes back as "probe"."""
    from dist_train.config.load import load_config
    from dist_train.launch.env import dist_session, read_env
    from dist_train.parallel.wrap import unwrap
    from dist_train.train.build import build_trainer

    cfg = load_config(config, overrides)
    env = read_env(cfg.train.device)
    with dist_session(env, timeout_s=120):
        trainer = build_trainer(cfg, env)
        seen = probe(trainer) if probe is not None else None
        if stop_at is not None:

            def stop(module: torch.nn.Module, *_: Any) -> None:
                if trainer.state.step == stop_at and module.training:  # not in evaluation
                    raise StopTraining

            unwrap(trainer.model).register_forward_pre_hook(stop)
        try:
            result = trainer.fit()
        except StopTraining:
            trainer.close()
            return {"stopped_at": trainer.state.step}
        except BaseException:
            trainer.close()  # as the CLI does: DDP must go before its process group
            raise
        out = _outcome(trainer, result)
        if probe is not None:
            out["probe"] = seen
        trainer.close()
    return out


def _outcome(trainer: Any, result: Any) -> dict[str, Any]:
    from dist_train.parallel.wrap import local_numel, unwrap

    model = unwrap(trainer.model)
    params = {
        k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
        for k, v in model.state_dict().items()
    }
    meshes = {p.device_mesh.device_type for p in model.parameters() if hasattr(p, "device_mesh")}
    return {
        "losses": result.losses,
        "val": result.val_losses,
        "val_metrics": result.val_metrics,
        "params": params,
        "local_numel": local_numel(model),
        "numel": sum(p.numel() for p in model.parameters()),
        "devices": {p.device.type for p in model.parameters()},
        "meshes": meshes,
        "wrapper": type(trainer.model).__name__,
        "sample": result.sample,
    }


# Small settings shared by tests that train: seconds, not minutes, on 2 cores. Each model and
# data source has only its own keys, so the parts come apart: TINY_TEXT for any model on 32-token
# windows of a capped text corpus (gpt or a _target_), GPT_SHAPE for the built-in gpt's size.
TINY_RUN = ["train.device=cpu", "train.eval_batches=2", "log.progress=never"]
TINY_TEXT = [*TINY_RUN, "model.block_size=32", "data.max_chars=100000"]
GPT_SHAPE = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32"]
TINY_GPT = [*TINY_TEXT, *GPT_SHAPE]

# Exactness runs: fp32, no dropout, every step logged. SGD is kept on purpose: only SGD exposes a
# gradient summed over ranks instead of averaged (Adam is nearly blind to the scale).
STEPS = 24
EXACT_RUN = [
    *TINY_GPT,
    f"train.max_steps={STEPS}",
    "train.global_batch_size=8",
    "log.every_steps=1",
    "train.eval_every=12",
    "optim.warmup_steps=3",
    "optim.grad_clip=1.0",
    "model.dropout=0.0",
]
OPTIMIZERS = {
    "adamw": ["optim.name=adamw", "optim.lr=1e-3"],
    "sgd": ["optim.name=sgd", "optim.lr=0.05", "optim.momentum=0.9"],
}


def assert_same_training(
    a: dict[str, Any], b: dict[str, Any], rel: float = 1e-5, atol: float = 1e-6
) -> None:
    """Same per-step losses, validation losses and final weights within `rel` (and `atol` for
    weights near zero)."""
    assert sorted(a["losses"]) == sorted(b["losses"]) and a["losses"]
    for step in a["losses"]:
        assert b["losses"][step] == pytest.approx(a["losses"][step], rel=rel), step
    assert b["val"] == pytest.approx(a["val"], rel=rel)
    for name, tensor in a["params"].items():
        torch.testing.assert_close(b["params"][name], tensor, rtol=rel, atol=atol, msg=name)


# Metric selection on a tiny regression (tests/test_selection.py, tests/test_stop_evaluation.py):
# val/count (user_plugins.SampleCounter) is the same at every evaluation, never an improvement
# after the first, so the best stays at the first evaluation and patience runs out on schedule.
SELECTION_RUN = [
    "data._target_=user_plugins.IndexedSamples",
    "model._target_=user_plugins.TinyRegressor",
    "model.kwargs.in_features=8",
    "train.metrics=[user_plugins.SampleCounter]",
    "train.global_batch_size=6",
    "train.device=cpu",
    "train.eval_every=2",
    "log.every_steps=1",
    "log.progress=never",
]
EARLY_STOPPING = [
    "train.early_stopping.metric=val/count",
    "train.early_stopping.patience=2",
    "train.max_steps=12",
]


# torch's log lines (torchrun's agent in Python, c10d in C++): "E1207 16:10:59.760000 13332 ...".
TORCH_LOG_LINE = re.compile(r"^\[?[DIWEF]\d{4} \d\d:\d\d:\d\d")


def torch_log_lines(text: str) -> list[str]:
    """The lines of torch's own logs in a command's output: none may reach a user by default."""
    return [line for line in text.splitlines() if TORCH_LOG_LINE.match(line)]
