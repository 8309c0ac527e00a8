"""Export for serving: metadata, tied weights stored once (safetensors' load_model), dtypes."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dist_train.checkpoint.export import export, init_model
from dist_train.checkpoint.files import MANIFEST, complete_checkpoints
from dist_train.checkpoint.serving import TOKENIZER_KEY as TOKENIZER
from dist_train.checkpoint.serving import serving_metadata
from dist_train.cli.main import build_parser
from dist_train.config.load import load_config
from dist_train.errors import ConfigError
from dist_train.models.gpt import GPT
from dist_train.models.gpt_core import load as gpt_from_export

from conftest import run_on_ranks
from helpers import TINY_GPT, train_in_process

RUN = [
    *TINY_GPT,
    "train.max_steps=8",
    "train.global_batch_size=8",
    "optim.lr=1e-2",
    "log.every_steps=1",
]


def outputs(model: torch.nn.Module) -> torch.Tensor:
    x = torch.randint(50, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(x)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    run_dir = tmp_path_factory.mktemp("export") / "run"
    return run_dir, train_in_process([*RUN, f"train.run_dir={run_dir}"])


def test_export_records_the_run_and_stores_tied_weights_once(
    trained: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    run_dir, run = trained
    notes: list[str] = []
    out = export(str(run_dir), str(tmp_path / "m.safetensors"), "fp32", notes.append)
    assert [n.split(" (")[0] for n in notes] == [f"wrote {tmp_path / 'gpt_model.py'}"]
    with safe_open(str(out), "pt") as f:
        meta, names = f.metadata(), set(f.keys())
    cfg = load_config(None, [*RUN, f"train.run_dir={run_dir}"])
    assert json.loads(meta["dist_train.model"]) == {
        **json.loads(json.dumps(dataclasses.asdict(cfg.model))),
        "vocab_size": run["params"]["wte.weight"].shape[0],
    }
    assert json.loads(meta["dist_train.data"]) == {"name": "text", "path": None, "_target_": None}
    assert (meta["format"], meta["dist_train.step"]) == ("pt", "8")
    # built-in text data: its char alphabet, read again from the same corpus
    tokenizer = json.loads(meta["dist_train.tokenizer"])
    assert tokenizer["type"] == "char" and tokenizer["vocab_size"] == len(tokenizer["chars"])
    assert tokenizer["vocab_size"] == run["params"]["wte.weight"].shape[0]
    assert json.loads(meta["dist_train.model"])["vocab_size"] == tokenizer["vocab_size"]
    assert out.stat().st_mode & 0o777 == 0o644  # readable by others (umask 022)
    assert (tmp_path / "gpt_model.py").stat().st_mode & 0o777 == 0o644
    # safetensors' own rule (save_model): the first name in sorted order stays, the other is
    # named in the metadata
    assert "wte.weight" not in names and meta["wte.weight"] == "lm_head.weight"
    assert names == set(run["params"]) - {"wte.weight"}

    fresh = gpt_from_export(out)
    assert fresh.lm_head.weight is fresh.wte.weight  # still tied after loading
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, run["params"][name]), name
    reference = GPT(fresh.lm_head.weight.shape[0], 32, 2, 2, 32).eval()
    reference.load_state_dict(run["params"])
    assert torch.equal(outputs(fresh), outputs(reference))


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_lower_dtype_export_loads_and_starts_runs(
    trained: tuple[Path, dict[str, Any]], tmp_path: Path, dtype: str
) -> None:
    run_dir, run = trained
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    full = export(str(run_dir), str(tmp_path / "full.safetensors"), "fp32", print)
    out = export(str(run_dir), str(tmp_path / "half.safetensors"), dtype, print)
    assert {t.dtype for t in load_file(out).values()} == {torch_dtype}
    assert out.stat().st_size < 0.6 * full.stat().st_size
    rounded = {k: v.to(torch_dtype).float() for k, v in run["params"].items()}
    for name, tensor in gpt_from_export(out).state_dict().items():  # load_model casts up
        assert torch.equal(tensor, rounded[name]), name
    # model.init_from: the tied head comes from the one stored tensor
    model = GPT(load_file(out)["lm_head.weight"].shape[0], 32, 2, 2, 32)
    init_model(model, str(out), [])
    assert model.lm_head.weight is model.wte.weight
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, rounded[name]), name
    if dtype == "bf16":  # and through the whole training path once
        tuned = train_in_process(
            [*RUN, f"model.init_from={out}", "train.max_steps=2", f"train.run_dir={tmp_path}/t"]
        )
        assert tuned["losses"][1] < run["losses"][1] - 0.5  # starts from the trained weights


def test_checkpoint_without_tied_record_exports_every_name(
    trained: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    """Checkpoints written before the manifest recorded tied names still export, as before."""
    run_dir, run = trained
    manifest = complete_checkpoints(run_dir / "checkpoints")[-1] / MANIFEST
    original = manifest.read_text()
    try:
        manifest.write_text(
            json.dumps({k: v for k, v in json.loads(original).items() if k != "tied"})
        )
        notes: list[str] = []
        out = export(str(run_dir), str(tmp_path / "m.safetensors"), "fp32", notes.append)
    finally:
        manifest.write_text(original)
    assert "predates records of tied weights" in notes[0] and len(notes) == 2  # + gpt_model.py
    assert set(load_file(out)) == set(run["params"])


def manifest_for_data(data: dict[str, Any]) -> dict[str, Any]:
    return {"config": {"model": {"name": "gpt"}, "data": data}, "step": 3}


def test_tokenizer_of_token_data(tmp_path: Path) -> None:
    data = {"name": "tokens", "path": str(tmp_path), "_target_": None}
    notes: list[str] = []

    def tokenizer() -> dict[str, Any]:
        return json.loads(serving_metadata(manifest_for_data(data), notes.append)[TOKENIZER])

    none = tokenizer()  # said explicitly, in the metadata as on the console
    assert none["type"] == "none" and "holds no meta.json or meta.pkl" in none["reason"]
    assert "holds no meta.json or meta.pkl" in notes.pop()
    (tmp_path / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": 50257}))  # GPT-2 BPE
    assert tokenizer() == {"vocab_size": 50257}
    itos = {0: "\n", 1: " ", 2: "a", 3: "b"}
    (tmp_path / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": 4, "itos": itos}))
    assert tokenizer() == {"vocab_size": 4, "type": "char", "chars": "\n ab"}
    entry = {"type": "tokenizers", "file": "tokenizer.json", "sha256": "ab" * 32}
    meta = {"format": "dist_train.tokens", "version": 1, "vocab_size": 300, "tokenizer": entry}
    (tmp_path / "meta.json").write_text(json.dumps(meta))  # dist_train's format comes first
    assert tokenizer() == {"vocab_size": 300, **entry}  # by name only: the file is missing
    assert "tokenizer.json is missing" in notes.pop()
    text = '{"model": {}}'  # the file's text goes into the export, when it is the recorded one
    (tmp_path / "tokenizer.json").write_text(text)
    entry["sha256"] = hashlib.sha256(text.encode()).hexdigest()
    (tmp_path / "meta.json").write_text(json.dumps({**meta, "tokenizer": entry}))
    assert tokenizer() == {"vocab_size": 300, **entry, "json": text}
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"unreadable meta\.json"):
        tokenizer()
    assert notes == []
    data.update(name="synthetic", path=None)
    assert tokenizer() == {"type": "none", "reason": "data.name=synthetic has no tokenizer"}
    data.update(name="text", path=str(tmp_path / "input.txt"))
    (tmp_path / "input.txt").write_text("hello world")  # the alphabet build_data derives
    assert tokenizer() == {"type": "char", "vocab_size": 8, "chars": " dehlorw"}
    assert notes == []


@pytest.mark.distributed
def test_fsdp_checkpoint_exports_tied_weights_once(tmp_path: Path) -> None:
    """FSDP2 shards the tied parameter once: the manifest still names both of its names."""
    run = [*RUN, "train.max_steps=2", "parallel.strategy=fsdp", f"train.run_dir={tmp_path}/r"]
    params = run_on_ranks(train_in_process, 2, run)[0]["params"]
    out = export(str(tmp_path / "r"), str(tmp_path / "m.safetensors"), "fp32", print)
    for name, tensor in gpt_from_export(out).state_dict().items():
        assert torch.equal(tensor, params[name]), name


def test_export_help_lists_dtype(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["export", "--help"])
    assert "--dtype DTYPE" in capsys.readouterr().out
