"""`dist-train export --format hf`: a folder `AutoModelForCausalLM.from_pretrained` loads, for a
transformers model and for the built-in GPT (mapped onto GPT-2, same logits), and the one-line
refusals; a transformers model's .safetensors export carries its complete config."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from dist_train.checkpoint.export import export
from dist_train.checkpoint.hf_export import gpt_as_gpt2
from dist_train.errors import ConfigError
from dist_train.models.gpt import GPT

from conftest import cli
from helpers import TINY_GPT, TINY_RUN, TINY_TEXT, train_in_process

hf = pytest.importorskip("transformers", reason="the hf extra is not installed")

RUN = ["train.max_steps=4", "train.global_batch_size=8", "log.every_steps=1", "train.eval_every=0"]
GPT2_KWARGS = "{n_layer: 2, n_embd: 32, n_head: 2, n_positions: 64}"


def logits(model: torch.nn.Module, vocab: int) -> torch.Tensor:
    x = torch.randint(vocab, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model.eval()(x)
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize("bias", [False, True])
def test_builtin_gpt_maps_onto_gpt2_with_equal_logits(bias: bool) -> None:
    torch.manual_seed(0)
    ours = GPT(50, 32, 2, 2, 32, bias=bias).eval()
    if bias:  # trained biases are not zero: the mapping must carry them
        with torch.no_grad():
            for name, p in ours.named_parameters():
                if name.endswith("bias"):
                    p.normal_()
    section = {"name": "gpt", "block_size": 32, "n_head": 2, "dropout": 0.0, "bias": bias}
    gpt2 = gpt_as_gpt2(section, ours.state_dict())
    torch.testing.assert_close(logits(gpt2, 50), logits(ours, 50), rtol=1e-5, atol=1e-5)


def test_builtin_gpt_hf_export_loads_with_from_pretrained(tmp_path: Path) -> None:
    run = train_in_process([*TINY_GPT, *RUN, f"train.run_dir={tmp_path}/run"])
    proc = cli("export", str(tmp_path / "run"), "--out", str(tmp_path / "hf"), "--format", "hf")
    assert proc.returncode == 0, proc.stderr
    loaded = hf.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    assert type(loaded).__name__ == "GPT2LMHeadModel"
    vocab = run["params"]["wte.weight"].shape[0]
    ours = GPT(vocab, 32, 2, 2, 32)
    ours.load_state_dict(run["params"])
    torch.testing.assert_close(logits(loaded, vocab), logits(ours, vocab), rtol=1e-5, atol=1e-5)
    config = json.loads((tmp_path / "hf/config.json").read_text())
    assert config["vocab_size"] == vocab and config["activation_function"] == "gelu"
    assert config["dist_train"]["tokenizer"]["type"] == "char"
    assert {p.stat().st_mode & 0o777 for p in (tmp_path / "hf").iterdir()} == {0o644}


def test_transformers_model_exports_complete_config(tmp_path: Path) -> None:
    overrides = [*TINY_TEXT, "model._target_=transformers.GPT2LMHeadModel"]
    run = train_in_process(
        [*overrides, f"model.kwargs={GPT2_KWARGS}", *RUN, f"train.run_dir={tmp_path}/run"]
    )
    out = export(str(tmp_path / "run"), str(tmp_path / "hf"), "fp32", print, "hf")
    loaded = hf.AutoModelForCausalLM.from_pretrained(str(out))
    config = json.loads((out / "config.json").read_text())
    vocab = run["params"]["transformer.wte.weight"].shape[0]
    assert config["vocab_size"] == vocab  # the data's, not GPT-2's 50257
    # GPT-2's special ids (50256) point past a char vocabulary: said to be none, not left out
    assert {config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")} == {None}
    reference = hf.GPT2LMHeadModel(loaded.config)
    reference.load_state_dict(run["params"])
    torch.testing.assert_close(logits(loaded, vocab), logits(reference, vocab))

    file = export(str(tmp_path / "run"), str(tmp_path / "m.safetensors"), "fp32", print)
    with safe_open(str(file), "pt") as f:
        model = json.loads(f.metadata()["dist_train.model"])
    assert "name" not in model and model["_target_"] == "transformers.GPT2LMHeadModel"
    assert model["config"]["vocab_size"] == vocab and "eos_token_id" in model["config"]
    assert not (tmp_path / "gpt_model.py").exists()  # a transformers model needs no copy


def test_models_without_a_transformers_class_are_refused_in_one_line(tmp_path: Path) -> None:
    mlp = ["model.name=mlp", "data.name=synthetic", *TINY_RUN, *RUN]
    train_in_process([*mlp, f"train.run_dir={tmp_path}/run"])
    proc = cli("export", str(tmp_path / "run"), "--out", str(tmp_path / "hf"), "--format", "hf")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "model.name=mlp" in proc.stderr
    assert "--format safetensors" in proc.stderr and not (tmp_path / "hf").exists()


def test_missing_transformers_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    section: dict[str, Any] = {"name": "gpt", "block_size": 32, "n_head": 2}
    with pytest.raises(ConfigError, match=r"pip install 'dist-train\[hf\]'"):
        gpt_as_gpt2(section, GPT(50, 32, 2, 2, 32).state_dict())
