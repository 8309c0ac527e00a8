"""Models, optimizer and schedule, launcher argument building, environment, metrics."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
import torch

from dist_train.config.schema import LogConfig, OptimConfig
from dist_train.config.sections import CNNConfig, GPTConfig, MLPConfig
from dist_train.data.datasets import DataSpec
from dist_train.errors import ConfigError, InfraError
from dist_train.launch.env import read_env, under_torchrun
from dist_train.launch.launcher import LaunchConfig, check_launch, threads_per_worker, torchrun_argv
from dist_train.models.gpt import GPT
from dist_train.models.registry import build_model, count_parameters
from dist_train.track.metrics import MetricsLogger
from dist_train.train.optim import build_optimizer, clip_and_measure, lr_at


def test_gpt_shapes_tying_and_generation() -> None:
    model = build_model(
        GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8), DataSpec("lm", vocab_size=11)
    )
    assert isinstance(model, GPT) and model.lm_head.weight is model.wte.weight
    logits = model(torch.randint(0, 11, (3, 8)))
    assert logits.shape == (3, 8, 11)
    out = model.sample_tokens(torch.zeros(1, 1, dtype=torch.long), 20)
    assert out.shape == (1, 21) and model.training  # mode restored
    # tied weight counted once: embeddings 11*16 + 8*16, no separate head
    blocks = 2 * (16 * 48 + 16 * 16 + 2 * 16 * 64 + 2 * 16)
    assert count_parameters(model) == 11 * 16 + 8 * 16 + blocks + 16


def test_mlp_and_cnn_from_config() -> None:
    mlp = build_model(MLPConfig(hidden_dims=[8]), DataSpec("regression", input_shape=(2, 3)))
    assert mlp(torch.randn(4, 2, 3)).shape == (4, 1)
    cnn = build_model(
        CNNConfig(channels=[4, 8]),
        DataSpec("classification", input_shape=(3, 9, 9), num_outputs=5),
    )
    assert cnn(torch.randn(2, 3, 9, 9)).shape == (2, 5)


def test_lr_schedule_is_a_pure_function_of_step() -> None:
    cfg = OptimConfig(lr=1.0, warmup_steps=4, min_lr=0.1, schedule="cosine")
    assert lr_at(0, cfg, 105) == pytest.approx(0.2)
    assert lr_at(3, cfg, 105) == pytest.approx(0.8)
    assert lr_at(4, cfg, 105) == pytest.approx(1.0)
    assert lr_at(54, cfg, 105) == pytest.approx(0.55)
    assert lr_at(103, cfg, 105) > 0.1
    assert lr_at(104, cfg, 105) == 0.1  # the last step of the horizon reaches min_lr exactly
    assert lr_at(500, cfg, 105) == 0.1  # and it stays there (a longer run after a resume)
    const = OptimConfig(lr=0.3, warmup_steps=0, schedule="constant")
    assert {lr_at(s, const, 10) for s in range(20)} == {0.3}


def test_optimizers_and_weight_decay_groups() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer(OptimConfig(name="adamw", weight_decay=0.1), model)
    assert isinstance(opt, torch.optim.AdamW)
    decays = {tuple(p.shape): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decays == {(4, 4): 0.1, (4,): 0.0}
    sgd = build_optimizer(OptimConfig(name="sgd", momentum=0.8), model)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.8
    model[0].weight.requires_grad_(False)
    assert (
        sum(len(g["params"]) for g in build_optimizer(OptimConfig(name="adam"), model).param_groups)
        == 3
    )


def test_clip_by_global_norm() -> None:
    model = torch.nn.Linear(2, 1, bias=False)
    model.weight.grad = torch.tensor([[3.0, 4.0]])
    assert clip_and_measure(model, 0.0, measure=False) is None
    assert clip_and_measure(model, 0.0, measure=True).item() == pytest.approx(5.0)
    assert clip_and_measure(model, 1.0, measure=False).item() == pytest.approx(5.0)
    assert model.weight.grad.norm().item() == pytest.approx(1.0, rel=1e-5)


def test_torchrun_argv_single_and_multi_node() -> None:
    argv = torchrun_argv(LaunchConfig(nproc=2), ["train", "c.yaml", "optim.lr=1"], Path("r/logs"))
    assert argv == [
        "--nproc-per-node=2",
        "--max-restarts=0",
        "--log-dir=r/logs",
        "--shutdown-timeout=30",
        "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
        "--standalone",
        "--module",
        "dist_train",
        "train",
        "c.yaml",
        "optim.lr=1",
    ]
    multi = torchrun_argv(
        LaunchConfig(
            nproc=8, nnodes=2, node_rank=1, rdzv_endpoint="h:29400", rdzv_id="job7", max_restarts=3
        ),
        ["train", "c.yaml"],
        Path("logs"),
    )
    assert "--standalone" not in multi
    assert {
        "--nnodes=2",
        "--node-rank=1",
        "--rdzv-backend=static",
        "--rdzv-endpoint=h:29400",
        "--rdzv-id=job7",
        "--rdzv-conf=timeout=600",
        "--max-restarts=3",
    } <= set(multi)
    assert multi[-4:] == ["--module", "dist_train", "train", "c.yaml"]


def test_worker_endings_are_named() -> None:
    from dist_train.launch.launcher import how_it_ended

    assert how_it_ended(1) == "failed with exit code 1 (its output is above)"
    assert how_it_ended(-9).startswith("was killed by SIGKILL (the kernel's out-of-memory")
    assert how_it_ended(-15) == "was killed by SIGTERM, so it printed nothing"


def test_launch_limits() -> None:
    with pytest.raises(ConfigError, match="--nproc <=") as err:
        check_launch(LaunchConfig(nproc=10_000), "cpu")
    assert err.value.key == "--nproc"
    with pytest.raises(ConfigError, match="rdzv-endpoint"):
        check_launch(LaunchConfig(nproc=1, nnodes=2), "cpu")
    with pytest.raises(ConfigError, match=">= 1"):
        check_launch(LaunchConfig(nproc=0), "cpu")
    if not torch.cuda.is_available():  # blame the device setting, not the worker count
        with pytest.raises(ConfigError, match="no CUDA GPU") as err:
            check_launch(LaunchConfig(nproc=1), "cuda")
        assert err.value.key == "train.device"
    check_launch(LaunchConfig(nproc=1), "cpu")
    assert threads_per_worker(1) >= threads_per_worker(2) >= 1


def test_read_env() -> None:
    env = read_env("cpu", {})
    assert (env.rank, env.world_size, env.is_main, env.is_distributed, env.backend) == (
        0,
        1,
        True,
        False,
        "gloo",
    )
    env = read_env(
        "cpu", {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}
    )
    assert (env.rank, env.local_rank, env.world_size, env.local_world_size, env.is_main) == (
        3,
        1,
        4,
        2,
        False,
    )
    assert under_torchrun({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"})
    assert not under_torchrun({})
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            read_env("cuda", {})


def test_metrics_logger(tmp_path: Path) -> None:
    out = io.StringIO()
    logger = MetricsLogger(tmp_path, LogConfig(progress="never"), 10, stream=out)
    logger.log({"step": 1, "loss": 2.5})
    logger.bar(1)  # never: draws nothing
    logger.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "loss": 2.5}
    assert out.getvalue() == "step 1 loss 2.5\n"
    silent = MetricsLogger(None, LogConfig(progress="always"), 10, stream=out)
    silent.log({"step": 2})
    assert out.getvalue() == "step 1 loss 2.5\n"


def test_flops_per_token_and_mfu() -> None:
    from dist_train.config.schema import LogConfig
    from dist_train.track.metrics import mfu, peak_flops

    model = GPT(vocab_size=10, block_size=8, n_layer=2, n_head=2, n_embd=16)
    matmul_weights = count_parameters(model) - 8 * 16  # all but the position table
    assert model.flops_per_token() == 6 * matmul_weights + 12 * 2 * 16 * 8
    assert mfu(1000.0, 1e6, 1e12, 2) == pytest.approx(5e-4)
    assert peak_flops(LogConfig(peak_tflops=2.0), torch.device("cpu"), "fp32") == 2e12
    assert peak_flops(LogConfig(), torch.device("cpu"), "bf16") is None  # no honest CPU figure


@pytest.mark.slow
def test_compile_trains_like_eager(tmp_path: Path) -> None:
    from helpers import TINY_GPT, train_in_process

    run = [*TINY_GPT, "train.max_steps=6", "log.every_steps=1", "train.global_batch_size=4"]
    eager = train_in_process([*run, f"train.run_dir={tmp_path}/eager"])
    compiled = train_in_process([*run, "train.compile=true", f"train.run_dir={tmp_path}/compiled"])
    assert compiled["params"].keys() == eager["params"].keys()  # checkpoints stay compatible
    for step, loss in eager["losses"].items():
        assert compiled["losses"][step] == pytest.approx(loss, rel=1e-4)


def test_progress_bar_only_on_a_tty(tmp_path: Path) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty, pipe = Tty(), io.StringIO()
    for stream in (tty, pipe):
        logger = MetricsLogger(tmp_path, LogConfig(progress="auto"), 10, stream=stream)
        logger.log({"step": 10, "loss": 1.5})
        logger.bar(10)
        logger.close()
    assert "\r100%|" in tty.getvalue() and "10/10 [" in tty.getvalue()  # tqdm's bar
    assert "step 10 loss 1.5\n" in tty.getvalue()
    assert pipe.getvalue() == "step 10 loss 1.5\n"


def test_the_route_to_the_endpoint_picks_address_and_interface() -> None:
    from dist_train.launch.network import interface_of, is_loopback, local_addr_to

    assert local_addr_to("127.0.0.1:29400") == "127.0.0.1"
    assert local_addr_to("localhost:29400") == "127.0.0.1"  # IPv4 before ::1
    assert interface_of("127.0.0.1") == ("lo" if sys.platform.startswith("linux") else None)
    assert interface_of("192.0.2.123") is None  # TEST-NET-1: no interface holds it
    assert is_loopback("127.0.1.1") and is_loopback("localhost") and not is_loopback("node0")
    # retryable (138): a name not in DNS yet (a PyTorchJob's master service) comes with a retry
    with pytest.raises(InfraError, match=r"--rdzv-endpoint='no-such-host.invalid:1': cannot"):
        local_addr_to("no-such-host.invalid:1")
