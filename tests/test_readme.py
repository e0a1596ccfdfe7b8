"""The README's promises, run as printed: the three commands at the top work on the embedded tiny
EMO, in a fresh directory, with the data `emo demo --data-only` writes."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EMO = Path(sys.executable).with_name("emo")


def fenced_blocks(markdown: str) -> list[list[str]]:
    return [b.strip("\n").splitlines() for b in re.findall(r"```[a-z]*\n(.*?)```", markdown, re.S)]


def command(line: str) -> str:
    return line.split("  #")[0].strip()


@pytest.mark.slow
@pytest.mark.skipif(not EMO.exists(), reason="the emo console script is not installed")
def test_the_three_commands_run_as_printed_on_the_tiny_model(tmp_path):
    readme = (ROOT / "README.md").read_text()
    blocks = fenced_blocks(readme)
    top = [command(ln) for ln in blocks[0]]
    assert top == ["emo profile data/med.jsonl", "emo prune --budget 25%", "emo chat --model slim-med.gguf"]
    try_block = next(b for b in blocks if any("EMO_MODEL=tiny-emo" in ln for ln in b))
    lines = [command(ln) for ln in try_block]
    assert lines[-3:] == top  # verbatim
    bin_dir = str(EMO.parent)
    env = {k: v for k, v in os.environ.items() if k != "EMO_MODEL"}
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    script = "set -euo pipefail\n" + "\n".join(
        ln + (" <<< $'The patient was\\n/exit'" if ln.startswith("emo chat") else "") for ln in lines)
    r = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    for made in ("data/med.jsonl", "med.profile.safetensors", "slim-med/config.json", "slim-med.gguf"):
        assert (tmp_path / made).exists(), made
    assert "tok/s" in r.stdout  # the chat answered one turn and left on /exit


def test_embedded_models_resolve_by_name_and_a_local_path_wins(tmp_path, monkeypatch, tiny_model_factory):
    from emo_cli.model.loading import EMBEDDED_MODELS, resolve_model_path

    monkeypatch.chdir(tmp_path)
    assert resolve_model_path("tiny-emo") == EMBEDDED_MODELS["tiny-emo"]
    assert resolve_model_path("tiny-stdmoe") == EMBEDDED_MODELS["tiny-stdmoe"]
    shutil.copytree(tiny_model_factory("shared"), tmp_path / "tiny-emo")
    assert resolve_model_path("tiny-emo") == Path("tiny-emo")
