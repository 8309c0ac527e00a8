"""The README's serving snippet ("Export for serving"), extracted from README.md, runs in a fresh
venv that holds only torch, safetensors and torch's own dependencies: dist_train and
transformers cannot be imported there, so the export and its gpt_model.py must stand alone."""

from __future__ import annotations

import importlib.metadata as md
import re
import sys
from pathlib import Path

import pytest
from test_install import run

from dist_train.checkpoint.export import export

from conftest import REPO
from helpers import TINY_GPT, train_in_process

SECTION = "## Export for serving"


def readme_snippet() -> str:
    """The section's Python block, as the README shows it."""
    text = (REPO / "README.md").read_text()
    section = text[text.index(SECTION) :].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, f"expected one python block in {SECTION!r}"
    return blocks[0]


def closure(names: list[str]) -> set[str]:
    """These distributions and what they require (extras left out), as installed here."""
    seen: set[str] = set()
    while names:
        name = names.pop().lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        for req in md.distribution(name).requires or []:
            if "extra ==" not in req:
                names.append(re.match(r"[A-Za-z0-9_.-]+", req).group())  # type: ignore[union-attr]
    return seen


def torch_only_venv(root: Path) -> Path:
    """A venv (no pip) whose site-packages sees torch, safetensors and their dependencies only:
    each one's installed files linked from this environment (no multi-GB download)."""
    venv, linked = root / "venv", root / "linked"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], root)
    linked.mkdir()
    for dist in map(md.distribution, closure(["torch", "safetensors"])):
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops - {"__pycache__"}:
            source = Path(str(dist.locate_file(top)))
            if source.exists() and not (linked / top).exists():
                (linked / top).symlink_to(source)
    python = venv / "bin/python"
    site = run([str(python), "-c", "import site; print(site.getsitepackages()[0])"], root)
    (Path(site.stdout.strip()) / "linked.pth").write_text(f"{linked}\n")
    return python


@pytest.mark.slow
def test_readme_serving_snippet_runs_with_only_torch_and_safetensors(tmp_path: Path) -> None:
    run_dir, serve = tmp_path / "run", tmp_path / "serve"
    serve.mkdir()
    train_in_process([*TINY_GPT, "train.max_steps=2", f"train.run_dir={run_dir}"])
    export(str(run_dir), str(serve / "model.safetensors"), "fp32", print)
    python = torch_only_venv(tmp_path)
    probe = "import importlib.util as u; print([bool(u.find_spec(m)) for m in "
    probe += "('torch', 'safetensors', 'dist_train', 'transformers')])"
    assert run([str(python), "-c", probe], serve).stdout.strip() == ("[True, True, False, False]")
    (serve / "serve.py").write_text(readme_snippet())
    out = run([str(python), "serve.py"], serve).stdout
    assert out.startswith("def ") and len(out) == len("def ") + 40 + len("\n")
