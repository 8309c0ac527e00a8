"""`dist-train export --format hf`: a `save_pretrained` folder (config.json + model.safetensors)
that `transformers.AutoModelForCausalLM.from_pretrained` loads. A transformers model is rebuilt
from its own config; the built-in GPT is mapped onto GPT-2's classes, whose maths it shares."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dist_train.checkpoint.state import fill_tied
from dist_train.config.sections import TargetModelConfig
from dist_train.config.targets import resolve_target
from dist_train.data.datasets import DataSpec
from dist_train.errors import ConfigError, first_line, import_extra
from dist_train.models.hf import make_config

TRANSFORMERS = "transformers."


def is_transformers_target(model: dict[str, Any]) -> bool:
    return str(model.get("_target_") or "").startswith(TRANSFORMERS)


def hf_model(model: dict[str, Any], weights: dict[str, torch.Tensor], purpose: str) -> nn.Module:
    """The run's transformers model with the checkpoint's weights: its config rebuilt as
    training built it (`model.kwargs` over the class defaults or `init_from`'s config.json),
    with the vocabulary read off the embedding the checkpoint holds."""
    import_extra("transformers", "hf", "model._target_", model["_target_"], purpose)
    cls = resolve_target(model["_target_"], "model._target_")
    known = {f.name for f in dataclasses.fields(TargetModelConfig)}
    cfg = TargetModelConfig(**{k: v for k, v in model.items() if k in known})
    config = make_config(cls, cfg, DataSpec("classification"))  # no vocabulary of the data's
    with torch.device("meta"):  # names and shapes only: nothing allocated or initialized
        probe = cls(config)
    embedding = probe.get_input_embeddings().weight
    name = next((n for n, p in probe.named_parameters() if p is embedding), "")
    rows = weights[name].shape[0] if name in weights else None
    if rows is not None and rows != getattr(config, "vocab_size", rows):
        config = make_config(cls, cfg, DataSpec("lm", vocab_size=rows))
    built = cls(config)
    _load_strict(built, weights, model["_target_"])
    return built


def gpt_as_gpt2(model: dict[str, Any], weights: dict[str, torch.Tensor]) -> nn.Module:
    """The built-in GPT as a `GPT2LMHeadModel` computing the same logits: pre-norm blocks, a
    fused q|k|v projection split in that order, learned positions, a tied head, and a 4x MLP
    with the exact GELU (GPT-2's "gelu", not its default tanh "gelu_new"). GPT-2 always has
    biases: a model trained without them gets zeros, which change nothing. GPT-2's Conv1D
    stores its weight as (in, out): the transpose of nn.Linear's."""
    transformers = import_extra("transformers", "hf", "--format", "hf", "--format hf")
    vocab, n_embd = weights["lm_head.weight"].shape
    n_layer = 1 + max(int(k.split(".")[1]) for k in weights if k.startswith("blocks."))
    config = transformers.GPT2Config(
        vocab_size=vocab,
        n_positions=model["block_size"],
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=model["n_head"],
        n_inner=4 * n_embd,
        activation_function="gelu",
        layer_norm_epsilon=1e-5,  # nn.LayerNorm's default
        resid_pdrop=model.get("dropout", 0.0),
        embd_pdrop=model.get("dropout", 0.0),
        attn_pdrop=model.get("dropout", 0.0),
        tie_word_embeddings=True,
        bos_token_id=None,  # a char or prepared vocabulary has no GPT-2 special tokens
        eos_token_id=None,
    )
    mapped = {"transformer.wte.weight": weights["lm_head.weight"]}
    mapped["lm_head.weight"] = weights["lm_head.weight"]
    mapped["transformer.wpe.weight"] = weights["wpe.weight"]
    pairs = [("ln_1", "ln_1", False), ("ln_2", "ln_2", False)]
    pairs += [("attn.qkv", "attn.c_attn", True), ("attn.proj", "attn.c_proj", True)]
    pairs += [("mlp.0", "mlp.c_fc", True), ("mlp.2", "mlp.c_proj", True)]
    for i in range(n_layer):
        for ours, theirs, conv in pairs:
            _copy(weights, mapped, f"blocks.{i}.{ours}", f"transformer.h.{i}.{theirs}", conv)
    _copy(weights, mapped, "ln_f", "transformer.ln_f", False)
    built = transformers.GPT2LMHeadModel(config)
    _load_strict(built, mapped, "transformers.GPT2LMHeadModel")
    return built


def _copy(
    weights: dict[str, torch.Tensor],
    out: dict[str, torch.Tensor],
    ours: str,
    theirs: str,
    conv: bool,
) -> None:
    weight = weights[f"{ours}.weight"]
    out[f"{theirs}.weight"] = weight.t() if conv else weight
    rows = weight.shape[0]
    out[f"{theirs}.bias"] = weights.get(f"{ours}.bias", torch.zeros(rows, dtype=weight.dtype))


def _load_strict(model: nn.Module, weights: dict[str, torch.Tensor], what: str) -> None:
    """Every name and shape of `model` from `weights`; tied names come from their one tensor."""
    state = model.state_dict()
    filled = fill_tied({k: v for k, v in weights.items() if k in state}, model)
    missing = sorted(set(state) - set(filled))
    unexpected = sorted(set(weights) - set(state))
    wrong = [k for k in filled if filled[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        raise ConfigError(
            "checkpoint",
            what,
            f"weights do not fit the rebuilt model: missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}, other shapes {wrong[:3]} (model.init_from's config.json moved?)",
        )
    try:
        model.load_state_dict(filled)
    except RuntimeError as e:
        raise ConfigError("checkpoint", what, f"weights do not fit: {first_line(e)}") from None


def write_pretrained(
    model: nn.Module, folder: Path, dtype: torch.dtype, extra: dict[str, Any]
) -> None:
    """`save_pretrained` (config.json, model.safetensors, generation_config.json), then the
    config rewritten whole: transformers writes only what differs from the class defaults,
    and a reader should see vocab_size and the special-token ids however they compare."""
    model = model.to(dtype)
    config = model.config  # type: ignore[attr-defined]
    config.dist_train = extra  # the tokenizer, step and source, as the .safetensors metadata has
    model.save_pretrained(str(folder))  # type: ignore[attr-defined]
    config.to_json_file(str(folder / "config.json"), use_diff=False)
