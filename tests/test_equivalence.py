"""1 process, 2 DDP processes and gradient accumulation train identically (fp32, CPU)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from dist_train.config import load_config
from dist_train.env import dist_session, read_env
from dist_train.parallel import unwrap
from dist_train.trainer import build_trainer

from conftest import TINY_GPT, run_on_ranks

STEPS = 24


def train(overrides: list[str]) -> dict[str, Any]:
    """Train in this process (a rank when RANK etc. are set); losses per step and weights."""
    cfg = load_config(None, overrides)
    env = read_env("cpu")
    with dist_session(env, timeout_s=120):
        trainer = build_trainer(cfg, env)
        result = trainer.fit()
        params = {k: v.detach().clone() for k, v in unwrap(trainer.model).state_dict().items()}
        trainer.close()
    return {"losses": result.losses, "val": result.val_losses, "params": params}


def assert_same_training(a: dict[str, Any], b: dict[str, Any], rel: float = 1e-5) -> None:
    assert sorted(a["losses"]) == list(range(1, STEPS + 1)) == sorted(b["losses"])
    for step in a["losses"]:
        assert b["losses"][step] == pytest.approx(a["losses"][step], rel=rel), step
    assert b["val"] == pytest.approx(a["val"], rel=rel)
    for name, tensor in a["params"].items():
        torch.testing.assert_close(b["params"][name], tensor, rtol=rel, atol=1e-6, msg=name)


@pytest.mark.distributed
@pytest.mark.parametrize("optim", [["optim.name=adamw", "optim.lr=1e-3"],
                                   ["optim.name=sgd", "optim.lr=0.05", "optim.momentum=0.9"]],
                         ids=["adamw", "sgd"])
def test_one_vs_two_ranks_vs_accumulation(optim: list[str], tmp_path: Path) -> None:
    base = [*TINY_GPT, *optim, f"train.max_steps={STEPS}", "train.global_batch_size=8",
            "log.every_steps=1", "train.eval_every=12", "optim.warmup_steps=3",
            "optim.grad_clip=1.0", "model.dropout=0.0"]
    torch.set_num_threads(1)
    single = train([*base, "train.micro_batch_size=8", f"train.run_dir={tmp_path}/a"])
    accum = train([*base, "train.micro_batch_size=4", f"train.run_dir={tmp_path}/b"])
    ddp = run_on_ranks(train, 2, [*base, "train.micro_batch_size=4", f"train.run_dir={tmp_path}/c"])
    ddp_accum = run_on_ranks(train, 2, [*base, "train.micro_batch_size=2",
                                        f"train.run_dir={tmp_path}/d"])
    assert single["losses"][STEPS] < single["losses"][1]  # it trains at all
    assert_same_training(single, accum)
    for rank_result in [*ddp, *ddp_accum]:  # every rank logs the global mean loss
        assert_same_training(single, rank_result)
