"""Per-model and per-data-source config sections: each holds only its own keys, a key of another
one is a one-line error, switching by override drops the old one's settings, a flat config.yaml
from before sections still loads, each section validates its own values, and `check` prints
only the selected sections' keys."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from dist_train.cli.main import build_parser
from dist_train.config.load import load_config, to_yaml
from dist_train.config.sections import DATA, MODELS, SECTIONS, MLPConfig, TargetModelConfig
from dist_train.data.build import build_data
from dist_train.errors import ConfigError

from conftest import REPO
from helpers_config import write

COMMON_MODEL = ["name", "_target_", "kwargs", "dropout", "init_from", "freeze"]
LOADING = ["num_workers", "prefetch_factor", "persistent_workers", "pin_memory"]
COMMON_DATA = ["name", "_target_", "kwargs", "train_kwargs", "val_kwargs", *LOADING]
COMMON_DATA += ["transform", "collate"]
OWN_KEYS = {
    "model.name=gpt": ["n_layer", "n_head", "n_embd", "block_size", "bias"],
    "model.name=mlp": ["hidden_dims"],
    "model.name=cnn": ["channels"],
    "model._target_=user_plugins.TinyRegressor": ["block_size"],
    "data.name=text": ["path", "max_chars", "val_fraction"],
    "data.name=tokens": ["path", "val_fraction", "vocab_size"],
    "data.name=synthetic": ["task", "num_samples", "input_shape", "num_classes", "val_fraction"],
    "data._target_=user_plugins.LineDataset": [],
}


@pytest.mark.parametrize("selected", sorted(OWN_KEYS))
def test_each_model_and_data_source_has_only_its_own_keys(selected: str) -> None:
    section = selected.split(".")[0]
    cfg = load_config(None, [selected])
    chosen = getattr(cfg, section)
    common = COMMON_MODEL if section == "model" else COMMON_DATA
    assert [f.name for f in dataclasses.fields(chosen)] == [*common, *OWN_KEYS[selected]]
    registry = MODELS if section == "model" else DATA
    name = selected.split("=")[1]
    assert type(chosen) is registry.get(name, SECTIONS[section][0])
    # every key of the section can be set by the same flat override as before
    for key in OWN_KEYS[selected]:
        again = load_config(None, [selected, f"{section}.{key}={_value(chosen, key)}"])
        assert getattr(getattr(again, section), key) == getattr(chosen, key)


def _value(section: object, key: str) -> str:
    value = getattr(section, key)
    return (
        "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    )


@pytest.mark.parametrize(
    ("overrides", "line"),
    [
        (
            ["model.hidden_dims=[8]"],
            "model.hidden_dims=[8]: unknown key: not a key of model.name=gpt (a key of "
            "model.name=mlp); valid: name, _target_, kwargs, dropout, init_from, freeze, "
            "n_layer, n_head, n_embd, block_size, bias",
        ),
        (
            ["model.name=mlp", "model.n_layer=2"],
            "model.n_layer=2: unknown key: not a key of model.name=mlp (a key of "
            "model.name=gpt); valid: name, _target_, kwargs, dropout, init_from, freeze, "
            "hidden_dims",
        ),
        (
            ["model._target_=user_plugins.TinyRegressor", "model.n_layer=2"],
            "model.n_layer=2: unknown key: not a key of "
            "model._target_=user_plugins.TinyRegressor (a key of model.name=gpt); valid: "
            "name, _target_, kwargs, dropout, init_from, freeze, block_size",
        ),
        (
            ["data.name=synthetic", "data.path=x.txt"],
            "data.path='x.txt': unknown key: not a key of data.name=synthetic (a key of "
            "data.name=text/tokens); valid: ",
        ),
        (["model.name=cnn", "model.chanels=[4]"], "model.chanels=[4]: unknown key: not a key of "),
    ],
)
def test_a_key_of_another_model_or_source_is_one_line(overrides: list[str], line: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert str(err.value).startswith(line)
    assert err.value.key == line.split("=")[0]
    assert "\n" not in str(err.value)


def test_a_file_key_not_of_its_own_model_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "model:\n  name: mlp\n  n_layer: 2\n")
    with pytest.raises(ConfigError, match=r"not a key of model\.name=mlp") as err:
        load_config(path)
    assert err.value.key == "model.n_layer"
    # also when an override switches the model: the file's own model never had it
    path = write(tmp_path, "model:\n  nlayers: 2\n")
    with pytest.raises(ConfigError, match=r"not a key of model\.name=mlp") as err:
        load_config(path, ["model.name=mlp"])
    assert err.value.key == "model.nlayers"


def test_switching_model_or_data_by_override_drops_the_files_settings_of_the_old_one() -> None:
    quick = REPO / "configs/quickstart.yaml"
    cfg = load_config(quick, ["model.name=mlp", "data.name=synthetic", "model.dropout=0.2"])
    assert isinstance(cfg.model, MLPConfig) and not hasattr(cfg.model, "n_layer")
    assert cfg.model.dropout == 0.2 and cfg.data.num_samples == 4096
    cfg = load_config(quick, ["data.name=tokens", "data.path=/d"])
    assert not hasattr(cfg.data, "max_chars") and cfg.model.n_layer == 4  # the file's gpt
    cfg = load_config(
        REPO / "configs/mlp_synthetic.yaml", ["model._target_=user_plugins.Exploding"]
    )
    assert type(cfg.model) is TargetModelConfig and cfg.model.name == "mlp"  # common keys kept


# What main's `config.yaml` held before per-model sections: every model's and data source's
# keys in one flat section (defaults for those not selected).
FLAT = """model:
  name: {model}
  _target_: null
  kwargs: {{}}
  n_layer: 2
  n_head: 2
  n_embd: 32
  block_size: 32
  dropout: 0.0
  bias: false
  hidden_dims: [8]
  channels: [16, 32]
  init_from: null
  freeze: []
data:
  name: {data}
  _target_: null
  kwargs: {{}}
  train_kwargs: {{}}
  val_kwargs: {{}}
  path: null
  max_chars: 100000
  val_fraction: 0.2
  vocab_size: 0
  task: regression
  num_samples: 4096
  input_shape: [32]
  num_classes: 10
  num_workers: 0
  prefetch_factor: 2
  persistent_workers: true
  pin_memory: auto
  transform: null
  collate: null
"""


def test_a_flat_config_yaml_written_before_sections_still_loads(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, FLAT.format(model="gpt", data="text")))
    assert (cfg.model.n_layer, cfg.data.max_chars, cfg.data.val_fraction) == (2, 100000, 0.2)
    assert not hasattr(cfg.model, "hidden_dims") and not hasattr(cfg.data, "task")
    cfg = load_config(write(tmp_path, FLAT.format(model="mlp", data="synthetic")))
    assert (cfg.model.hidden_dims, cfg.data.task) == ([8], "regression")
    assert not hasattr(cfg.model, "channels") and not hasattr(cfg.data, "max_chars")
    # only a whole flat record is taken as one: a typo in it is still an error
    with pytest.raises(ConfigError, match="unknown key") as err:
        load_config(write(tmp_path, FLAT.format(model="gpt", data="text") + "  pth: x\n"))
    assert err.value.key == "data.pth"


@pytest.mark.parametrize(
    ("overrides", "key", "fragment"),
    [
        (["model.name=mlp", "model.hidden_dims=[8,0]"], "model.hidden_dims", "numbers > 0"),
        (["model.name=cnn", "model.channels=[-1]"], "model.channels", "numbers > 0"),
        (["model.dropout=1"], "model.dropout", "0 <= x < 1"),
        (["model.block_size=0"], "model.block_size", "> 0"),
        (["data.name=synthetic", "data.task=ranking"], "data.task", "classification, regression"),
        (["data.name=synthetic", "data.num_samples=0"], "data.num_samples", "> 0"),
        (["data.name=synthetic", "data.input_shape=[]"], "data.input_shape", "non-empty"),
        (["data.name=tokens", "data.vocab_size=-1"], "data.vocab_size", ">= 0"),
        (["data.val_fraction=1.5"], "data.val_fraction", "0 <= x < 1"),
        (["data.max_chars=-1"], "data.max_chars", ">= 0"),
    ],
)
def test_each_section_validates_its_own_values(
    overrides: list[str], key: str, fragment: str
) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert err.value.key == key and fragment in str(err.value)


def test_gpt_shape_rules_apply_to_gpt_only() -> None:
    # a user model has no n_embd/n_head to divide; the old flat section checked them anyway
    cfg = load_config(None, ["model._target_=user_plugins.TinyRegressor"])
    assert not hasattr(cfg.model, "n_head")
    with pytest.raises(ConfigError, match=r"model\.n_head=4"):
        load_config(None, ["model.n_embd=30"])


def test_token_windows_need_a_model_with_a_block_size() -> None:
    cfg = load_config(None, ["model.name=mlp", "data.max_chars=1000"])
    with pytest.raises(ConfigError, match=r"model\.name=mlp has no block_size") as err:
        build_data(cfg)
    assert err.value.key == "data.name"
    for model in ("model.name=gpt", "model._target_=user_plugins.PlainLM"):
        cfg = load_config(None, [model, "model.block_size=16", "data.max_chars=1000"])
        assert build_data(cfg).train.get_batch(torch.arange(2))[0].shape == (2, 16)


def test_check_prints_only_the_selected_models_and_datas_keys(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    run = f"train.run_dir={tmp_path}"
    gpt = to_yaml(load_config(REPO / "configs/quickstart.yaml", [run]))
    for word in ("hidden_dims", "channels", "num_samples", "input_shape", "vocab_size"):
        assert word not in gpt
    assert "n_layer: 4" in gpt and "max_chars: 2000000" in gpt
    mlp = to_yaml(load_config(REPO / "configs/mlp_synthetic.yaml", [run]))
    for word in ("n_layer", "block_size", "channels", "max_chars", "path"):
        assert f" {word}:" not in mlp
    assert "hidden_dims:" in mlp and "num_classes: 10" in mlp
    # and `dist-train check` prints exactly that
    args = build_parser().parse_args(["check", "configs/mlp_synthetic.yaml", run])
    assert args.func(args) == 0
    assert capsys.readouterr().out.startswith(mlp)
