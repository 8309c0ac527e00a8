"""Run configuration: structured dataclasses merged with YAML and `key=value` overrides.

Order of precedence: dataclass defaults < YAML file < command-line overrides.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dist_train.errors import ConfigError, install_hint
from dist_train.trackers import validate_trackers
from dist_train.yaml_io import (
    ALIASES,
    aliased,
    as_config_error,
    check_sections,
    parse_overrides,
    read_yaml,
    resolve_config_path,
)

MODEL_NAMES = ("gpt", "mlp", "cnn")
DATA_NAMES = ("text", "tokens", "synthetic")


@dataclass
class ModelConfig:
    name: str = "gpt"  # gpt | mlp | cnn; ignored when _target_ is set
    _target_: Optional[str] = None  # "package.module.Class" of a user nn.Module
    kwargs: dict[str, Any] = field(default_factory=dict)  # keyword arguments for _target_
    n_layer: int = 4  # gpt: transformer blocks
    n_head: int = 4  # gpt: attention heads per block
    n_embd: int = 128  # gpt: residual stream width
    block_size: int = 64  # gpt: context length; also the length of training windows
    dropout: float = 0.0
    bias: bool = False  # gpt: biases in Linear and LayerNorm
    hidden_dims: list[int] = field(default_factory=lambda: [128, 128])  # mlp
    channels: list[int] = field(default_factory=lambda: [16, 32])  # cnn conv widths
    init_from: Optional[str] = None  # weights to start from: a checkpoint dir or a .safetensors
    freeze: list[str] = field(default_factory=list)  # parameter-name patterns (fnmatch) to freeze


@dataclass
class DataConfig:
    name: str = "text"  # text | tokens | synthetic; ignored when _target_ is set
    _target_: Optional[str] = None  # "package.module.Class" of a user dataset (see data.py)
    kwargs: dict[str, Any] = field(default_factory=dict)  # keyword arguments for _target_
    # Per split, over kwargs: set either and _target_ gets no split= (torchvision style:
    # train_kwargs {train: true}, val_kwargs {train: false}; no val_kwargs: no validation).
    train_kwargs: dict[str, Any] = field(default_factory=dict)
    val_kwargs: dict[str, Any] = field(default_factory=dict)
    path: Optional[str] = (
        None  # text: UTF-8 file (default: Python's own stdlib source); tokens: dir
    )
    max_chars: int = 2_000_000  # text: cap on characters read from the default corpus (0 = all)
    val_fraction: float = 0.1  # text/tokens: tail of the corpus; synthetic: random split by seed
    vocab_size: int = 0  # tokens: 0 = meta.json's/meta.pkl's vocab_size, else max id + 1
    task: str = "classification"  # synthetic: classification | regression
    num_samples: int = 4096  # synthetic: total samples before the split
    input_shape: list[int] = field(default_factory=lambda: [32])  # synthetic: e.g. [3, 16, 16]
    num_classes: int = 10  # synthetic classification
    # Background loading (torch DataLoader worker processes; 0: batches built on the training
    # thread). The batches and their order are the same for any value.
    num_workers: int = 0
    prefetch_factor: int = 2  # batches each worker keeps ready
    persistent_workers: bool = True  # keep workers between evaluations (not re-forked)
    pin_memory: str = "auto"  # auto (on CUDA) | true | false
    # "package.module.callable" applied to each sample of a map-style dataset (in the workers),
    # and one that turns a list of samples into a batch (default: torch's default_collate).
    transform: Optional[str] = None
    collate: Optional[str] = None


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | adam | sgd
    lr: float = 1e-3  # peak learning rate
    weight_decay: float = 0.0  # adamw/sgd: applied to matrices only, never to biases and norms
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    momentum: float = 0.9  # sgd
    nesterov: bool = False  # sgd
    schedule: str = "cosine"  # cosine | constant
    warmup_steps: int = 0  # linear warmup from 0
    # Steps the cosine decays over, reaching min_lr at the last of them and staying there. 0: the
    # run's train.max_steps when it starts; a resume keeps the checkpoint's horizon, so raising
    # max_steps later trains on at min_lr instead of re-stretching the schedule.
    decay_steps: int = 0
    min_lr: float = 0.0  # cosine floor, reached at the last decay step
    grad_clip: float = 1.0  # clip by global norm; 0 disables


@dataclass
class EarlyStoppingConfig:
    metric: str = ""  # an evaluation metric, e.g. val/loss ("": never stop early)
    mode: str = "min"  # min | max: which way is better
    patience: int = 3  # evaluations in a row without improvement before the run stops
    min_delta: float = 0.0  # an improvement must beat the best so far by more than this


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"  # config.yaml, metrics.jsonl, checkpoints
    max_steps: int = 100  # optimizer steps
    global_batch_size: int = 32  # samples per optimizer step, summed over all workers
    micro_batch_size: int = 0  # samples per forward/backward on one worker (0: no accumulation)
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda
    eval_every: int = 0  # steps between evaluations (0: only at the end)
    eval_batches: int = 4  # sampled evaluation: seeded global batches of validation data
    # full: every validation sample exactly once (the last batch partial, at any world size) |
    # sampled: eval_batches global batches drawn like training batches | auto: full when the
    # validation set is no larger than eval_batches x global_batch_size, else sampled.
    eval_mode: str = "auto"
    # Your own evaluation metrics by import path (see dist_train/evaluation.py), besides the
    # task's: loss (+ perplexity for lm; + accuracy, precision, recall, f1 for classification).
    metrics: list[str] = field(default_factory=list)
    sample_chars: int = 0  # text: characters to generate at the end (0: none)
    sample_prompt: str = "\n"
    compile: bool = (
        False  # torch.compile each block (or the whole model), in place, before wrapping
    )
    # Start over in a run_dir that holds an earlier run, moving it to run_dir/previous/<time>/
    # first (nothing is deleted). Without it, such a fresh start is refused.
    overwrite: bool = False
    # A non-finite loss or weights: stop (exit with one line naming the step; nothing non-finite
    # is ever saved) | skip (drop that update, count it as `nonfinite_skips`, and stop after
    # max_nonfinite_skips in a row; reads the gradient norm on the host every step).
    on_nonfinite: str = "stop"
    max_nonfinite_skips: int = 10
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)


@dataclass
class ParallelConfig:
    strategy: str = "auto"  # auto (ddp if world_size > 1 else none) | none | ddp | fsdp
    bucket_cap_mb: float = 25.0  # DDP gradient bucket size
    static_graph: bool = False  # DDP: graph is the same every step (enables extra optimizations)
    grad_compression: str = "none"  # DDP comm hook: none | bf16 | fp16 | powersgd
    powersgd_rank: int = 1  # powersgd: rank of the low-rank gradient approximation
    powersgd_start_step: int = 10  # powersgd: plain all-reduce before this step (warm start)
    reshard_after_forward: bool = True  # fsdp: free gathered params after forward (less memory)
    timeout_s: int = 600  # collective timeout; a stalled peer errors instead of hanging forever


@dataclass
class PrecisionConfig:
    # fp32 | bf16 | fp16: autocast of forward and loss; parameters and optimizer state stay fp32.
    # fp16 always uses a loss scaler (skips steps with inf/nan grads); bf16 never needs one.
    dtype: str = "fp32"
    reduce_dtype: str = "fp32"  # fsdp: dtype gradients are reduce-scattered in (fp32 | bf16 | fp16)
    # fp16: warn once when the loss scale falls below this (gradients overflow even unscaled:
    # the scaler is skipping most steps). Changing dtype on resume is allowed; fp16 then starts
    # a fresh scaler.
    warn_loss_scale: float = 1.0


@dataclass
class BestConfig:
    # Keep the checkpoint of the best evaluation on this metric (e.g. val/loss), saved when it
    # improves, as checkpoints/best, apart from keep_last ("": no best checkpoint).
    metric: str = ""
    mode: str = "min"  # min | max


@dataclass
class CheckpointConfig:
    enabled: bool = True  # the last step always saves when enabled
    every_steps: int = 0  # also save every N steps (0: only at the end)
    keep_last: int = 2  # complete checkpoints kept; older ones go only once a newer is complete
    # Also accepted as `checkpoint.async`: training blocks only while the state is copied in
    # memory; files are written in the background (DCP async_save on its own gloo group). The
    # copy is kept between saves: one extra CPU copy of the state for the whole run.
    async_save: bool = False
    best: BestConfig = field(default_factory=BestConfig)


@dataclass
class LogConfig:
    every_steps: int = 10  # steps between metric lines (loss is averaged over the interval)
    progress: str = "auto"  # auto (bar on a TTY only) | always | never; the bar needs tqdm
    # Peak dense TFLOP/s of one device at the run's precision, for the `mfu` metric
    # (0: known GPUs are looked up, otherwise no mfu is reported).
    peak_tflops: float = 0.0
    # Where metrics go, on rank 0: jsonl (RUN_DIR/metrics.jsonl, written whether listed or
    # not) | console (one line per record) | tensorboard | wandb | mlflow (each an extra:
    # pip install 'dist-train[tensorboard]'); see dist_train/trackers/.
    backends: list[str] = field(default_factory=lambda: ["jsonl", "console"])
    project: str = "dist_train"  # the W&B project and the MLflow experiment
    wandb_mode: str = "offline"  # offline (files in RUN_DIR/wandb; `wandb sync` uploads) | online
    wandb_entity: str = ""  # W&B team or user ("": your default entity)
    mlflow_uri: str = ""  # MLflow tracking URI ("": sqlite:///RUN_DIR/mlflow.db)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    resume: str = "auto"  # auto (newest complete checkpoint in run_dir, if any) | none | PATH


CHOICES: dict[str, tuple[str, ...]] = {
    "model.name": MODEL_NAMES,
    "data.name": DATA_NAMES,
    "data.task": ("classification", "regression"),
    "optim.name": ("adamw", "adam", "sgd"),
    "optim.schedule": ("cosine", "constant"),
    "train.device": ("auto", "cpu", "cuda"),
    "parallel.strategy": ("auto", "none", "ddp", "fsdp"),
    "parallel.grad_compression": ("none", "bf16", "fp16", "powersgd"),
    "precision.reduce_dtype": ("fp32", "bf16", "fp16"),
    "precision.dtype": ("fp32", "bf16", "fp16"),
    "log.progress": ("auto", "always", "never"),
    "train.on_nonfinite": ("stop", "skip"),
    "train.eval_mode": ("auto", "full", "sampled"),
    "train.early_stopping.mode": ("min", "max"),
    "checkpoint.best.mode": ("min", "max"),
}
POSITIVE = (
    "train.max_steps",
    "train.global_batch_size",
    "train.max_nonfinite_skips",
    "parallel.timeout_s",
    "optim.lr",
    "log.every_steps",
    "model.n_layer",
    "model.n_head",
    "model.n_embd",
    "model.block_size",
)


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> RunConfig:
    """Defaults < YAML < overrides, validated; raises ConfigError naming the key."""
    merged = OmegaConf.structured(RunConfig)
    try:
        if path is not None:
            path = resolve_config_path(path)
            node = read_yaml(path)
            check_sections(node, RunConfig(), str(path))
            merged = OmegaConf.merge(merged, aliased(node))
        given = parse_overrides(overrides, RunConfig(), ALIASES)
        check_sections(given, RunConfig(), "the overrides")
        merged = OmegaConf.merge(merged, given)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise as_config_error(e, overrides, RunConfig()) from None
    assert isinstance(cfg, RunConfig)
    validate(cfg)
    return cfg


def get_key(cfg: RunConfig, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def validate(cfg: RunConfig) -> None:
    """Checks that need no data, processes or world size."""
    for key, choices in CHOICES.items():
        if key.startswith(("model.", "data.")) and get_key(cfg, key.split(".")[0] + "._target_"):
            continue
        value = get_key(cfg, key)
        if value not in choices:
            raise ConfigError(key, value, f"expected one of {', '.join(choices)}")
    for key in POSITIVE:
        if get_key(cfg, key) <= 0:
            raise ConfigError(key, get_key(cfg, key), "must be > 0")
    if cfg.optim.decay_steps < 0:
        raise ConfigError("optim.decay_steps", cfg.optim.decay_steps, "must be >= 0 (0: max_steps)")
    if cfg.train.overwrite and cfg.resume not in ("auto", "none"):
        raise ConfigError(
            "train.overwrite",
            True,
            f"starts the run over, so it cannot be combined "
            f"with resume={cfg.resume!r}; use resume=auto or none",
        )
    if cfg.train.micro_batch_size < 0:
        raise ConfigError(
            "train.micro_batch_size",
            cfg.train.micro_batch_size,
            "must be >= 0 (0: global_batch_size / world_size)",
        )
    if cfg.model.n_embd % cfg.model.n_head:
        raise ConfigError(
            "model.n_embd",
            cfg.model.n_embd,
            f"must be divisible by model.n_head={cfg.model.n_head}",
        )
    _validate_loading(cfg.data)
    if not 0.0 <= cfg.data.val_fraction < 1.0:
        raise ConfigError("data.val_fraction", cfg.data.val_fraction, "expected 0 <= x < 1")
    if cfg.checkpoint.every_steps < 0 or cfg.checkpoint.keep_last < 1:
        key = "checkpoint.every_steps" if cfg.checkpoint.every_steps < 0 else "checkpoint.keep_last"
        raise ConfigError(key, get_key(cfg, key), "every_steps must be >= 0, keep_last >= 1")
    if cfg.parallel.grad_compression != "none" and cfg.parallel.strategy == "fsdp":
        raise ConfigError(
            "parallel.grad_compression",
            cfg.parallel.grad_compression,
            "compression hooks are DDP's; with fsdp use precision.reduce_dtype",
        )
    if len(cfg.optim.betas) != 2:
        raise ConfigError("optim.betas", cfg.optim.betas, "expected two numbers")
    validate_trackers(cfg.log)
    for section in ("model", "data"):
        target = get_key(cfg, f"{section}._target_")
        if target:
            resolve_target(target, f"{section}._target_")
    for metric in cfg.train.metrics:
        resolve_target(metric, "train.metrics")
    _validate_selection(cfg)


def _validate_selection(cfg: RunConfig) -> None:
    """checkpoint.best and train.early_stopping watch an evaluation metric."""
    stop, best = cfg.train.early_stopping, cfg.checkpoint.best
    for key, metric in (
        ("train.early_stopping.metric", stop.metric),
        ("checkpoint.best.metric", best.metric),
    ):
        if metric and not metric.startswith("val/"):
            raise ConfigError(key, metric, "expected an evaluation metric, e.g. val/loss")
    if stop.patience < 1:
        raise ConfigError("train.early_stopping.patience", stop.patience, "must be >= 1")
    if stop.min_delta < 0:
        raise ConfigError("train.early_stopping.min_delta", stop.min_delta, "must be >= 0")
    if best.metric and not cfg.checkpoint.enabled:
        raise ConfigError("checkpoint.best.metric", best.metric, "needs checkpoint.enabled=true")


def _validate_loading(d: DataConfig) -> None:
    if d.num_workers < 0:
        raise ConfigError(
            "data.num_workers", d.num_workers, "must be >= 0 (0: no worker processes)"
        )
    if d.prefetch_factor < 1:
        raise ConfigError("data.prefetch_factor", d.prefetch_factor, "must be >= 1")
    d.pin_memory = str(d.pin_memory).lower()  # YAML's `true` arrives as "True"
    if d.pin_memory not in ("auto", "true", "false"):
        raise ConfigError("data.pin_memory", d.pin_memory, "expected one of auto, true, false")
    for key in ("transform", "collate"):
        if getattr(d, key) and not d._target_:
            raise ConfigError(
                f"data.{key}", getattr(d, key), "applies to a user dataset (data._target_)"
            )
        if getattr(d, key):
            resolve_target(getattr(d, key), f"data.{key}")


def resolve_target(target: str, key: str) -> Any:
    """Import "package.module.Attr"; ConfigError when it cannot be found."""
    module_name, _, attr = target.rpartition(".")
    if not module_name:
        raise ConfigError(key, target, "expected 'package.module.Class'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        reason = f"cannot import module '{module_name}': {e}{install_hint(e)}"
        raise ConfigError(key, target, reason) from None
    if not hasattr(module, attr):
        raise ConfigError(key, target, f"module '{module_name}' has no attribute '{attr}'")
    return getattr(module, attr)


def call_target(target: str, key: str, kwargs_key: str, **kwargs: Any) -> Any:
    """Build a user's `_target_` class. Arguments its signature does not take name
    `kwargs_key`; whatever its constructor raises becomes one line naming `key`, the call and
    the user's own message (their code, their input)."""
    cls = resolve_target(target, key)
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as e:
        raise ConfigError(
            kwargs_key,
            target if kwargs_key == key else kwargs,
            f"{target}({args}) does not fit its signature {inspect.signature(cls)}: {e}",
        ) from None
    except ValueError:  # no signature to inspect (a builtin): let the call decide
        pass
    try:
        return cls(**kwargs)
    except Exception as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ConfigError(
            key, target, f"{cls.__name__}({args}) raised {type(e).__name__}: {detail}"
        ) from None


def micro_batch_size(cfg: RunConfig, world_size: int) -> int:
    """Samples per forward/backward on one worker; 0 in the config means the whole rank slice."""
    if cfg.train.global_batch_size % world_size:
        raise ConfigError(
            "train.global_batch_size",
            cfg.train.global_batch_size,
            f"must be divisible by world_size ({world_size})",
        )
    return cfg.train.micro_batch_size or cfg.train.global_batch_size // world_size


def accumulation_steps(cfg: RunConfig, world_size: int) -> int:
    """Micro-batches per worker per optimizer step; the global batch must split evenly."""
    micro = micro_batch_size(cfg, world_size)
    per_step = world_size * micro
    if cfg.train.global_batch_size % per_step:
        raise ConfigError(
            "train.global_batch_size",
            cfg.train.global_batch_size,
            f"must be divisible by world_size ({world_size}) x train.micro_batch_size "
            f"({micro}) = {per_step}",
        )
    return cfg.train.global_batch_size // per_step


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: RunConfig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_yaml(cfg))
