"""Config merge order, overrides and every bad-input error (the per-model and per-data-source
sections: test_config_sections.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dist_train.config.load import load_config
from dist_train.config.schema import accumulation_steps, micro_batch_size
from dist_train.data.build import build_data
from dist_train.errors import ConfigError
from dist_train.models.registry import build_model

from conftest import REPO, cli
from helpers_config import write


def test_merge_order_defaults_then_yaml_then_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, "optim:\n  lr: 0.5\n  name: sgd\ntrain:\n  max_steps: 7\n")
    cfg = load_config(path, ["optim.lr=0.1", "model.name=mlp", "model.hidden_dims=[3,4]"])
    assert cfg.optim.lr == 0.1  # override beats YAML
    assert cfg.optim.name == "sgd"  # YAML beats default
    assert cfg.train.max_steps == 7
    assert cfg.model.hidden_dims == [3, 4]
    assert cfg.optim.betas == [0.9, 0.95]  # default kept


def test_every_shipped_config_loads() -> None:
    for path in sorted((REPO / "configs").glob("*.yaml")):
        load_config(path)


def test_target_kwargs_are_free_form() -> None:
    cfg = load_config(
        None, ["model._target_=user_plugins.TinyRegressor", "model.kwargs.in_features=8"]
    )
    assert cfg.model.kwargs == {"in_features": 8}


@pytest.mark.parametrize(
    ("overrides", "key", "fragment"),
    [
        (["model.nlayers=2"], "model.nlayers", "unknown key"),
        (["bogus=1"], "bogus", "unknown key"),
        (["model.n_layer=two"], "model.n_layer", "Integer"),
        (["model.name=resnet"], "model.name", "gpt, mlp, cnn"),
        (["optim.name=lion"], "optim.name", "adamw, adam, sgd"),
        (["train.max_steps=0"], "train.max_steps", "> 0"),
        (["model.n_embd=30", "model.n_head=4"], "model.n_embd", "divisible"),
        (["model._target_=no_such_pkg.Model"], "model._target_", "cannot import"),
        (["model._target_=user_plugins.Missing"], "model._target_", "no attribute"),
        (["data._target_=Plain"], "data._target_", "package.module.Class"),
        (["optim.lr"], "override", "key=value"),
    ],
)
def test_bad_config_names_key_and_value(overrides: list[str], key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert err.value.key == key
    assert fragment in str(err.value)


def test_unknown_key_in_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown key") as err:
        load_config(write(tmp_path, "train:\n  max_step: 3\n"))
    assert err.value.key == "train.max_step"


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.yaml")


def test_global_batch_split() -> None:
    cfg = load_config(None, ["train.global_batch_size=32", "train.micro_batch_size=8"])
    assert accumulation_steps(cfg, 1) == 4
    assert accumulation_steps(cfg, 2) == 2
    with pytest.raises(ConfigError, match=r"world_size \(3\)") as err:
        accumulation_steps(cfg, 3)
    assert err.value.key == "train.global_batch_size"
    cfg = load_config(None, ["train.global_batch_size=24", "train.micro_batch_size=8"])
    with pytest.raises(ConfigError, match=r"world_size \(2\) x train.micro_batch_size \(8\) = 16"):
        accumulation_steps(cfg, 2)
    cfg = load_config(None, ["train.global_batch_size=24", "train.micro_batch_size=0"])
    assert (micro_batch_size(cfg, 2), accumulation_steps(cfg, 2)) == (12, 1)


def test_missing_data_file(tmp_path: Path) -> None:
    cfg = load_config(None, [f"data.path={tmp_path}/missing.txt"])
    with pytest.raises(ConfigError, match="file not found") as err:
        build_data(cfg)
    assert err.value.key == "data.path"


def test_model_that_does_not_fit_the_data() -> None:
    cfg = load_config(None, ["data.name=synthetic", "model.name=gpt"])
    with pytest.raises(ConfigError, match="needs token data"):
        build_model(cfg.model, build_data(cfg).spec)
    cfg = load_config(None, ["data.name=synthetic", "model.name=cnn"])
    with pytest.raises(ConfigError, match=r"\[channels, height, width\]"):
        build_model(cfg.model, build_data(cfg).spec)
    cfg = load_config(None, ["model._target_=user_plugins.TinyRegressor", "model.kwargs.bad=1"])
    with pytest.raises(ConfigError) as err:
        build_model(cfg.model, build_data(load_config(None, ["data.name=synthetic"])).spec)
    assert err.value.key == "model.kwargs"


def test_override_values_are_what_the_user_typed_for_strings() -> None:
    cfg = load_config(
        None,
        [
            "train.sample_prompt=ROMEO:",
            "resume=a:b",
            "data.path=null",
            "model.kwargs={a: 1}",
            "model.name=mlp",
            "model.hidden_dims=[3,4]",
        ],
    )
    assert cfg.train.sample_prompt == "ROMEO:" and cfg.resume == "a:b"  # YAML would make dicts
    assert cfg.data.path is None and cfg.model.kwargs == {"a": 1}
    assert cfg.model.hidden_dims == [3, 4]


def test_a_renamed_key_still_works_with_one_note(tmp_path: Path) -> None:
    """train.sample_chars counted tokens; it is train.sample_tokens now. Configs (and earlier
    runs' config.yaml) with the old name still load, and the user is told once."""
    note = "train.sample_chars is now train.sample_tokens (the old name still works)"
    path = write(tmp_path, "train:\n  sample_chars: 7\n")
    notes: list[str] = []
    assert load_config(path, [], notes).train.sample_tokens == 7
    assert notes == [note]
    notes.clear()
    assert load_config(path, ["train.sample_chars=9"], notes).train.sample_tokens == 9
    assert notes == [note]  # in the file and in an override: said once
    notes.clear()
    assert load_config(None, ["train.sample_tokens=3"], notes).train.sample_tokens == 3
    assert notes == []  # the new name: nothing to say
    proc = cli("check", str(path), f"train.run_dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stderr
    assert [line for line in proc.stdout.splitlines() if "sample_chars" in line] == [
        f"note: {note}"
    ]
    assert "  sample_tokens: 7" in proc.stdout
