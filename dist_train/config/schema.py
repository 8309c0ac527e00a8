"""The run's settings as dataclasses, one per config section, and the sizes derived from them.

Fields marked `metadata=INVARIANT` define the model or the data stream: a resume may not change
them. How a config is read (YAML, overrides, validation) is `load.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dist_train.config.sections import (
    INVARIANT,
    DataConfig,
    GPTConfig,
    ModelConfig,
    TextDataConfig,
)
from dist_train.errors import ConfigError


@dataclass
class OptimConfig:
    name: str = field(default="adamw", metadata=INVARIANT)  # adamw | adam | sgd
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
    # Samples per optimizer step, summed over all workers.
    global_batch_size: int = field(default=32, metadata=INVARIANT)
    micro_batch_size: int = 0  # samples per forward/backward on one worker (0: no accumulation)
    seed: int = field(default=1337, metadata=INVARIANT)
    device: str = "auto"  # auto | cpu | cuda
    eval_every: int = 0  # steps between evaluations (0: only at the end)
    eval_batches: int = 4  # sampled evaluation: seeded global batches of validation data
    # full: every validation sample exactly once (the last batch partial, at any world size) |
    # sampled: eval_batches global batches drawn like training batches | auto: full when the
    # validation set is no larger than eval_batches x global_batch_size, else sampled.
    eval_mode: str = "auto"
    # Your own evaluation metrics by import path (see dist_train/train/evaluation.py), besides the
    # task's: loss (+ perplexity for lm; + accuracy, precision, recall, f1 for classification).
    metrics: list[str] = field(default_factory=list)
    sample_tokens: int = 0  # text: tokens to generate at the end of the run (0: none)
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
    # auto (ddp if world_size > 1 else none) | none | ddp | zero2 | fsdp | hsdp; the README's
    # "Parallel" section says when to pick which.
    strategy: str = "auto"
    bucket_cap_mb: float = 25.0  # DDP gradient bucket size
    static_graph: bool = False  # DDP: graph is the same every step (enables extra optimizations)
    grad_compression: str = "none"  # DDP comm hook: none | bf16 | fp16 | powersgd
    powersgd_rank: int = 1  # powersgd: rank of the low-rank gradient approximation
    powersgd_start_step: int = 10  # powersgd: plain all-reduce before this step (warm start)
    reshard_after_forward: bool = (
        True  # fsdp, hsdp: free gathered params after forward (zero2 never)
    )
    shard_size: int = 0  # hsdp: ranks per shard group, replicated across groups (0: one node's)
    # none | full (recompute every block's activations in backward) | every_n (every n-th block,
    # n = activation_checkpointing_every): less activation memory for about one more forward.
    activation_checkpointing: str = "none"
    activation_checkpointing_every: int = 2
    cpu_offload: bool = False  # zero2, fsdp, hsdp: sharded state and its updates in host memory
    timeout_s: int = 600  # collective timeout; a stalled peer errors instead of hanging forever


@dataclass
class PrecisionConfig:
    # fp32 | bf16 | fp16: autocast of forward and loss; parameters and optimizer state stay fp32.
    # fp16 always uses a loss scaler (skips steps with inf/nan grads); bf16 never needs one.
    dtype: str = "fp32"
    # zero2, fsdp, hsdp: dtype gradients are reduce-scattered in (fp32 | bf16 | fp16)
    reduce_dtype: str = "fp32"
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
    # The class of these two follows model.name / data.name (see sections.py).
    model: ModelConfig = field(default_factory=GPTConfig)
    data: DataConfig = field(default_factory=TextDataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    resume: str = "auto"  # auto (newest complete checkpoint in run_dir, if any) | none | PATH


SHARDED = ("zero2", "fsdp", "hsdp")  # the strategies built on FSDP2's fully_shard

CHOICES: dict[str, tuple[str, ...]] = {
    "optim.name": ("adamw", "adam", "sgd"),
    "optim.schedule": ("cosine", "constant"),
    "train.device": ("auto", "cpu", "cuda"),
    "parallel.strategy": ("auto", "none", "ddp", "zero2", "fsdp", "hsdp"),
    "parallel.activation_checkpointing": ("none", "full", "every_n"),
    "parallel.grad_compression": ("none", "bf16", "fp16", "powersgd"),
    "precision.reduce_dtype": ("fp32", "bf16", "fp16"),
    "precision.dtype": ("fp32", "bf16", "fp16"),
    "log.progress": ("auto", "always", "never"),
    "train.on_nonfinite": ("stop", "skip"),
    "train.eval_mode": ("auto", "full", "sampled"),
    "train.early_stopping.mode": ("min", "max"),
    "checkpoint.best.mode": ("min", "max"),
}


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
