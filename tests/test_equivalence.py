"""1 process, 2 DDP processes and gradient accumulation train identically (fp32, CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import run_on_ranks
from helpers import EXACT_RUN, OPTIMIZERS, STEPS, assert_same_training, train_in_process


@pytest.mark.distributed
@pytest.mark.parametrize("optim", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_one_vs_two_ranks_vs_accumulation(optim: list[str], tmp_path: Path) -> None:
    base = [*EXACT_RUN, *optim]
    torch.set_num_threads(1)
    single = train_in_process([*base, "train.micro_batch_size=8", f"train.run_dir={tmp_path}/a"])
    accum = train_in_process([*base, "train.micro_batch_size=4", f"train.run_dir={tmp_path}/b"])
    ddp = run_on_ranks(
        train_in_process, 2, [*base, "train.micro_batch_size=4", f"train.run_dir={tmp_path}/c"]
    )
    ddp_accum = run_on_ranks(
        train_in_process, 2, [*base, "train.micro_batch_size=2", f"train.run_dir={tmp_path}/d"]
    )
    assert single["losses"][STEPS] < single["losses"][1]  # it trains at all
    assert_same_training(single, accum)
    for rank_result in [*ddp, *ddp_accum]:  # every rank logs the global mean loss
        assert_same_training(single, rank_result)
