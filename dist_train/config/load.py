"""Reading a run's config: structured dataclasses merged with YAML and `key=value` overrides,
then validated; and writing it back as the run directory's config.yaml.

Order of precedence: dataclass defaults < YAML file < command-line overrides.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dist_train.config.backends import validate_trackers
from dist_train.config.layers import fit_layers
from dist_train.config.schema import CHOICES, SHARDED, ParallelConfig, RunConfig
from dist_train.config.sections import (
    check_fields,
    get_key,
)
from dist_train.config.targets import resolve_target
from dist_train.config.yaml_io import (
    aliased,
    as_config_error,
    check_sections,
    parse_overrides,
    read_yaml,
    resolve_config_path,
)
from dist_train.errors import ConfigError

POSITIVE = (
    "train.max_steps",
    "train.global_batch_size",
    "train.max_nonfinite_skips",
    "parallel.timeout_s",
    "optim.lr",
    "log.every_steps",
)


def load_config(
    path: str | Path | None, overrides: Sequence[str] = (), notes: list[str] | None = None
) -> RunConfig:
    """Defaults < YAML < overrides, validated; raises ConfigError naming the key. Old key names
    are read as their new ones, each with a line in `notes` (the CLI prints them once)."""
    schema = RunConfig()
    found: list[str] = []
    try:
        file = OmegaConf.create()
        if path is not None:
            path = resolve_config_path(path)
            file = aliased(read_yaml(path), found)
            check_sections(file, schema, str(path))
        # Read twice: first for the model and data they select, then with that selection's
        # field types (a string setting keeps what the user typed, see yaml_io).
        given = parse_overrides(overrides, schema, found)
        check_sections(given, schema, "the overrides")
        classes = fit_layers(schema, file, given)
        model, data = classes["model"](), classes["data"]()
        schema = RunConfig(model=model, data=data)  # type: ignore[arg-type]
        given = parse_overrides(overrides, schema, [])  # noted the first time
        merged = OmegaConf.merge(OmegaConf.structured(schema), file, given)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise as_config_error(e, overrides, schema) from None
    assert isinstance(cfg, RunConfig)
    validate(cfg)
    if notes is not None:
        notes.extend(dict.fromkeys(found))  # each once, in order
    return cfg


def validate(cfg: RunConfig) -> None:
    """Checks that need no data, processes or world size; the model and data sections check
    their own keys."""
    check_fields(cfg, "", CHOICES, POSITIVE)
    cfg.model.validate()
    cfg.data.validate()
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
    if cfg.checkpoint.every_steps < 0 or cfg.checkpoint.keep_last < 1:
        key = "checkpoint.every_steps" if cfg.checkpoint.every_steps < 0 else "checkpoint.keep_last"
        raise ConfigError(key, get_key(cfg, key), "every_steps must be >= 0, keep_last >= 1")
    _validate_parallel(cfg.parallel)
    if len(cfg.optim.betas) != 2:
        raise ConfigError("optim.betas", cfg.optim.betas, "expected two numbers")
    validate_trackers(cfg.log)
    for metric in cfg.train.metrics:
        resolve_target(metric, "train.metrics")
    _validate_selection(cfg)


def _validate_parallel(p: ParallelConfig) -> None:
    """Combinations of parallel keys that mean nothing; the world-size checks come with the
    world size (`parallel.wrap.resolve_strategy`)."""
    sharded = p.strategy in SHARDED
    if p.grad_compression != "none" and sharded:
        raise ConfigError(
            "parallel.grad_compression",
            p.grad_compression,
            f"compression hooks are DDP's; with parallel.strategy={p.strategy} "
            "use precision.reduce_dtype",
        )
    if p.cpu_offload and not sharded:
        raise ConfigError(
            "parallel.cpu_offload",
            True,
            f"offloads sharded state, so it needs parallel.strategy zero2, fsdp or hsdp "
            f"(parallel.strategy is {p.strategy})",
        )
    if p.shard_size < 0 or (p.shard_size and p.strategy != "hsdp"):
        raise ConfigError(
            "parallel.shard_size",
            p.shard_size,
            f"is hsdp's shard group size (>= 0, 0: one node's workers); "
            f"parallel.strategy is {p.strategy}",
        )
    if p.activation_checkpointing_every < 1:
        raise ConfigError(
            "parallel.activation_checkpointing_every",
            p.activation_checkpointing_every,
            "must be >= 1 (checkpoint every n-th block)",
        )


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


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: RunConfig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_yaml(cfg))
