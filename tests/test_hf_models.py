"""Hugging Face transformers models by `_target_`, built from tiny random configs (no
download): training under none/DDP/FSDP, fine-tuning from a `save_pretrained` folder, errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from dist_train.checkpoint.export import init_model
from dist_train.config.load import load_config
from dist_train.config.schema import ModelConfig
from dist_train.data.build import build_data
from dist_train.data.datasets import DataSpec
from dist_train.data.sampler import GlobalBatchSampler
from dist_train.errors import ConfigError
from dist_train.models.protocol import CanSampleTokens, fsdp_units, logits_of, sampler
from dist_train.models.registry import build_model

from conftest import cli, free_port, run_on_ranks
from helpers import TINY_TEXT, assert_same_training, train_in_process

hf = pytest.importorskip("transformers", reason="the hf extra is not installed")


GPT2 = "transformers.GPT2LMHeadModel"
NO_DROPOUT = "resid_pdrop: 0.0, embd_pdrop: 0.0, attn_pdrop: 0.0"
GPT2_KWARGS = f"{{n_layer: 2, n_embd: 32, n_head: 2, n_positions: 64, {NO_DROPOUT}}}"
HF_RUN = [
    *TINY_TEXT,
    f"model._target_={GPT2}",
    f"model.kwargs={GPT2_KWARGS}",
    "train.max_steps=12",
    "train.global_batch_size=8",
    "log.every_steps=1",
    "train.eval_every=6",
    "checkpoint.enabled=false",
]
BERT_KWARGS = {
    "vocab_size": 24,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 16,
    "num_labels": 3,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}


def tiny_gpt2(vocab_size: int = 40) -> Any:
    """With transformers' default dropout (0.1), as a real pretrained model has."""
    config = hf.GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64)
    config.vocab_size, config.bos_token_id, config.eos_token_id = vocab_size, None, None
    return hf.GPT2LMHeadModel(config)


def test_transformers_models_offer_blocks_and_causal_sampling() -> None:
    gpt2 = tiny_gpt2()
    assert fsdp_units(gpt2) == list(gpt2.transformer.h)  # its _no_split_modules: GPT2Block
    # transformers' own `generate` has another signature: it must not pass for ours
    assert not isinstance(gpt2, CanSampleTokens)
    gpt2.train()
    g = torch.Generator().manual_seed(0)
    out = sampler(gpt2)(torch.zeros(1, 3, dtype=torch.long), 4, g)  # type: ignore[misc]
    assert out.shape == (1, 7) and gpt2.training  # its mode restored
    bert_config = hf.BertConfig(**BERT_KWARGS)
    bert = hf.BertForSequenceClassification(bert_config)
    assert sampler(bert) is None  # not a causal LM
    assert fsdp_units(bert) == [bert.bert.embeddings, *bert.bert.encoder.layer]
    # A masked LM ties its decoder to the word embeddings: that block stays with the root.
    masked = hf.BertForMaskedLM(bert_config)
    assert fsdp_units(masked) == list(masked.bert.encoder.layer)


def test_model_outputs_give_their_logits() -> None:
    logits = torch.randn(2, 3)
    assert logits_of(hf.modeling_outputs.SequenceClassifierOutput(logits=logits)) is logits


def test_gpt2_from_config_defaults_to_the_data_vocabulary() -> None:
    spec = DataSpec("lm", vocab_size=70, tokens_per_sample=32)
    model = build_model(
        ModelConfig(_target_=GPT2, kwargs={"n_layer": 1, "n_embd": 16, "n_head": 2}), spec
    )
    assert isinstance(model, hf.GPT2LMHeadModel)
    assert model.config.vocab_size == 70 and model.config.n_layer == 1
    assert model.config.use_cache is False  # training never reads a key/value cache
    given = build_model(
        ModelConfig(
            _target_=GPT2, kwargs={"n_layer": 1, "n_embd": 16, "n_head": 2, "vocab_size": 80}
        ),
        spec,
    )
    assert given.config.vocab_size == 80
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.distributed
def test_gpt2_trains_alike_on_one_process_ddp_and_fsdp(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    single = train_in_process([*HF_RUN, f"train.run_dir={tmp_path}/single"])
    ddp, fsdp = zip(
        *run_on_ranks(
            two_runs,
            2,
            [*HF_RUN, f"train.run_dir={tmp_path}/ddp"],
            [*HF_RUN, "parallel.strategy=fsdp", f"train.run_dir={tmp_path}/fsdp"],
            free_port(),
        ),
        strict=True,
    )
    assert single["losses"][12] < single["losses"][1]  # it learns
    for rank in range(2):
        assert ddp[rank]["wrapper"] == "DistributedDataParallel"
        assert fsdp[rank]["wrapper"] == "FSDPGPT2LMHeadModel"
        assert 0.45 < fsdp[rank]["local_numel"] / fsdp[rank]["numel"] < 0.55  # sharded
        # AdamW divides by the root of the squared gradient: on an element whose gradient is
        # near zero, the sum order of 1 vs 2 ranks moves the update by ~1e-6 on some CPUs
        # (seen on an AMD EPYC: 1.6e-6 in one LayerNorm bias element, DDP and FSDP alike).
        assert_same_training(single, ddp[rank], atol=1e-5)
        assert_same_training(single, fsdp[rank], atol=1e-5)


def two_runs(
    first: list[str], second: list[str], port: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Two trainings one after the other in the same rank processes (one spawn, not two). The
    second group meets on a port of its own: on the first one's, a rank still leaving the old
    group can meet the other's new one (seen as a 2-minute hang on a loaded machine)."""
    one = train_in_process(first)
    os.environ["MASTER_PORT"] = str(port)
    return one, train_in_process(second)


def test_bert_classifies_token_sequences(tmp_path: Path) -> None:
    kwargs = ", ".join(f"{k}: {v}" for k, v in BERT_KWARGS.items())
    result = train_in_process(
        [
            "train.device=cpu",
            "log.progress=never",
            "model._target_=transformers.BertForSequenceClassification",
            f"model.kwargs={{{kwargs}}}",
            "data._target_=user_plugins.MarkerSequences",
            "train.max_steps=40",
            "train.global_batch_size=16",
            "optim.lr=3e-3",
            "log.every_steps=10",
            "train.eval_batches=4",
            "checkpoint.enabled=false",
            f"train.run_dir={tmp_path}",
        ]
    )
    losses = result["losses"]
    assert losses[40] < 0.5 * losses[10], losses  # well below chance (ln 3 = 1.10)
    assert result["val"][40] < 0.7


def test_init_from_a_save_pretrained_folder_then_freeze(tmp_path: Path) -> None:
    pretrained_dir = tmp_path / "pretrained"
    overrides = [
        *[o for o in HF_RUN if not o.startswith("model.kwargs=")],
        f"model.init_from={pretrained_dir}",  # the architecture comes from its config.json,
        f"model.kwargs={{{NO_DROPOUT}}}",  # with kwargs over it
        "model.freeze=[transformer.h.0.*]",
        "train.max_steps=3",
        f"train.run_dir={tmp_path}/run",
    ]
    cfg = load_config(None, overrides)
    data = build_data(cfg)
    torch.manual_seed(123)  # other weights than the run's own seed would draw
    pretrained = tiny_gpt2(vocab_size=data.spec.vocab_size + 5)
    pretrained.save_pretrained(
        pretrained_dir, max_shard_size="100KB"
    )  # sharded, tied head left out
    assert (pretrained_dir / "model.safetensors.index.json").is_file()
    x, y = data.train.get_batch(
        GlobalBatchSampler(len(data.train), 8, cfg.train.seed).global_indices(0)
    )
    with torch.no_grad():
        logits = pretrained.eval()(x).logits  # no dropout, like the run's kwargs
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()).item()
    result = train_in_process(overrides)
    assert result["losses"][1] == pytest.approx(expected, rel=1e-5)  # the first step's loss
    before = pretrained.state_dict()
    for name, tensor in result["params"].items():
        frozen = name.startswith("transformer.h.0.")
        assert torch.equal(tensor, before[name]) == frozen, name


def test_errors_are_one_line_naming_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = DataSpec("lm", vocab_size=40, tokens_per_sample=32)
    with pytest.raises(ConfigError, match="GPT2Config has no field 'n_layr'") as e:
        build_model(ModelConfig(_target_=GPT2, kwargs={"n_layr": 2}), spec)
    assert e.value.key == "model.kwargs"
    with pytest.raises(ConfigError, match="must be divisible by num_heads") as e:
        build_model(ModelConfig(_target_=GPT2, kwargs={"n_embd": 16, "n_head": 3}), spec)
    assert e.value.key == "model.kwargs"  # the model's own complaint, in one line
    with pytest.raises(ConfigError, match="smaller than the data's vocabulary") as e:
        build_model(ModelConfig(_target_=GPT2, kwargs={"vocab_size": 30}), spec)
    assert e.value.key == "model.kwargs"
    with pytest.raises(ConfigError, match="longer than the model's context") as e:
        build_model(ModelConfig(_target_=GPT2, kwargs={"n_positions": 16}), spec)
    assert e.value.key == "model.block_size"

    folder = tmp_path / "no_weights"
    tiny_gpt2().config.save_pretrained(folder)  # config.json only
    model = build_model(ModelConfig(_target_=GPT2, init_from=str(folder)), spec)
    with pytest.raises(ConfigError, match="no weights") as e:
        init_model(model, str(folder), [])
    assert e.value.key == "model.init_from"
    for cfg in (
        ModelConfig(init_from=str(folder)),  # our GPT cannot read it
        ModelConfig(_target_="transformers.BertForSequenceClassification", init_from=str(folder)),
    ):
        with pytest.raises(ConfigError) as e:
            build_model(cfg, spec)
        assert e.value.key == "model.init_from" and "\n" not in str(e.value)

    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed
    with pytest.raises(ConfigError, match=r"pip install 'dist-train\[hf\]'") as e:
        load_config(None, [f"model._target_={GPT2}"])
    assert e.value.key == "model._target_"


@pytest.mark.slow
def test_dist_train_does_not_import_transformers() -> None:
    code = "import sys, dist_train.train.build; assert 'transformers' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.slow
def test_cli_reports_a_bad_kwarg_in_one_line(tmp_path: Path) -> None:
    bad = [f"model._target_={GPT2}", "model.kwargs={n_layr: 2}", f"train.run_dir={tmp_path}"]
    result = cli("check", "configs/quickstart.yaml", *TINY_TEXT, *bad)
    assert result.returncode == 2, result.stdout[-1500:] + result.stderr[-1500:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: model.kwargs="), lines
    assert "n_layr" in lines[0] and "Traceback" not in result.stdout


def test_readme_example_trains_and_samples(tmp_path: Path) -> None:
    """The README's transformers YAML, as written (shorter): it trains, and the causal LM
    gets the framework's sampling although it offers no `sample_tokens` of its own."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    path = tmp_path / "hf.yaml"
    block = readme.split("```yaml\n# transformers model")[1].split("```")[0]
    path.write_text(block.split("\n", 1)[1])  # after the rest of its comment line
    short = ["train.max_steps=2", "data.max_chars=20000", "train.eval_batches=1"]
    quiet = ["log.progress=never", "checkpoint.enabled=false", "train.device=cpu"]
    result = train_in_process([*short, *quiet, f"train.run_dir={tmp_path}/run"], config=path)
    assert isinstance(result["sample"], str) and len(result["sample"]) == 1 + 100  # prompt "\n"
    assert result["params"]["transformer.wte.weight"].shape[1] == 64  # kwargs n_embd applied
