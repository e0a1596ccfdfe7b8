"""Hostile but realistic use of the `emo` console script, one subprocess per case.

Each case runs in a fresh working directory holding a tiny model (model/), data (med.jsonl), a
profile and a pruned output made earlier (slim-med/, slim-med.gguf). For every case we check: the
exit code; one line on stderr and no traceback; nothing left behind (no new file in the directory,
no staging file); the files that were there are byte-identical with the same modes.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from tiny_models import sample_texts, write_jsonl

EMO = Path(sys.executable).with_name("emo")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not EMO.exists(), reason="the emo console script is not installed")]


def emo(args, cwd: Path, stdin: bytes | None = b"", close_stdin: bool = False, env=None):
    run_env = {**os.environ, "EMO_MODEL": "", "COLUMNS": "200", **(env or {})}
    return subprocess.run([str(EMO), *args], cwd=cwd, input=None if close_stdin else stdin,
                          capture_output=True, timeout=300, env=run_env,
                          preexec_fn=(lambda: os.close(0)) if close_stdin else None)


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_model_factory):
    """model/, med.jsonl, a profile (the workspace default), slim-med/ and slim-med.gguf."""
    d = tmp_path_factory.mktemp("hostile-base")
    shutil.copytree(tiny_model_factory("shared"), d / "model")
    write_jsonl(d / "med.jsonl", sample_texts(30, seed=11))
    for args in (["profile", "med.jsonl", "--model", "model", "--seq-len", "32"],
                 ["prune", "--budget", "50%", "--quant", "q8_0"]):
        r = emo(args, d)
        assert r.returncode == 0, r.stderr.decode()
    return d


def snapshot(folder: Path) -> dict[str, tuple[bytes | None, int]]:
    out = {}
    for p in sorted(folder.rglob("*")):
        out[str(p.relative_to(folder))] = (p.read_bytes() if p.is_file() else None, stat.S_IMODE(p.lstat().st_mode))
    return out


# ---- how each case damages its copy ---------------------------------------------------------------------
def write(rel: str, data: bytes | str) -> Callable[[Path], None]:
    def make(d: Path):
        p = d / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data if isinstance(data, bytes) else data.encode())
    return make


def edit_config(**changes) -> Callable[[Path], None]:
    def make(d: Path):
        cfg = json.loads((d / "model" / "config.json").read_text())
        cfg.update(changes)
        (d / "model" / "config.json").write_text(json.dumps(cfg))
    return make


def truncate_shard(d: Path):
    shard = sorted((d / "model").glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-1000])


def offsets_past_end(d: Path):
    shard = sorted((d / "model").glob("*.safetensors"))[0]
    blob = shard.read_bytes()
    n = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"] = [header[name]["data_offsets"][0], len(blob) * 4]
    raw = json.dumps(header).encode()
    raw += b" " * (n - len(raw)) if len(raw) <= n else b""
    shard.write_bytes(struct.pack("<Q", len(raw)) + raw + blob[8 + n:])


def gguf_patch(at: int | str, value: bytes) -> Callable[[Path], None]:
    def make(d: Path):
        src = d / "slim-med.gguf"
        blob = bytearray(src.read_bytes())
        pos = at if isinstance(at, int) else blob.index(at.encode()) + len(at) + 4  # a key's value
        blob[pos:pos + len(value)] = value
        (d / "bad.gguf").write_bytes(bytes(blob))
    return make


def profile_with_wrong_shape(d: Path):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    src = d / "med.profile.safetensors"
    with safe_open(str(src), framework="pt") as f:
        meta = f.metadata()
    t = load_file(str(src))
    t["counts"] = t["counts"][:, :3].contiguous()
    save_file(t, str(d / "edited.profile.safetensors"), metadata=meta)


def user_folder(d: Path):
    (d / "mine").mkdir()
    (d / "mine" / "notes.txt").write_text("my own file")


def no_heldout_profile(d: Path):
    r = emo(["profile", "med.jsonl", "--model", "model", "--seq-len", "32", "--heldout-frac", "0",
             "-o", "noheld.profile.safetensors"], d)
    assert r.returncode == 0, r.stderr.decode()


def several(*makers) -> Callable[[Path], None]:
    def make(d: Path):
        for m in makers:
            m(d)
    return make


@dataclass
class Case:
    name: str
    args: list[str]
    needle: str  # a word the one error line must hold
    setup: Callable[[Path], None] | None = None
    stdin: bytes = b""
    close_stdin: bool = False
    code: int = 1
    prefix: str = "error:"  # how the one stderr line starts
    may_create: tuple[str, ...] = field(default_factory=tuple)  # files the setup adds are not outputs


NUMS = '{"text": 12}\n{"text": {"a": 1}}\n'
CASES = [
    Case("data-invalid-utf8", ["profile", "bad.jsonl", "--model", "model"], "UTF-8",
         write("bad.jsonl", b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')),
    Case("data-binary", ["profile", "bad.txt", "--model", "model"], "UTF-8", write("bad.txt", bytes(range(256)) * 8)),
    Case("data-null-line", ["profile", "bad.jsonl", "--model", "model"], "not an object", write("bad.jsonl", "null\n")),
    Case("data-numbers", ["profile", "bad.jsonl", "--model", "model"], "not text", write("bad.jsonl", NUMS)),
    Case("guard-binary", ["prune", "--budget", "50%", "--guard", "bad.csv", "-o", "g"], "UTF-8",
         write("bad.csv", b"text\n\x80\x81\n")),
    Case("max-tokens-0", ["profile", "med.jsonl", "--model", "model", "--max-tokens", "0", "-o", "x.p"], "--max-tokens"),
    Case("max-docs-0", ["profile", "med.jsonl", "--model", "model", "--max-docs", "0", "-o", "x.p"], "--max-docs"),
    Case("max-docs-neg", ["profile", "med.jsonl", "--model", "model", "--max-docs", "-1", "-o", "x.p"], "--max-docs"),
    Case("truncated-shard", ["profile", "med.jsonl", "--model", "model", "-o", "x.p"], "outside", truncate_shard),
    Case("offsets-past-end", ["eval", "model", "--data", "med.jsonl"], "outside", offsets_past_end),
    Case("config-list", ["eval", "model", "--data", "med.jsonl"], "not an object", write("model/config.json", "[1, 2]")),
    Case("config-wrong-type", ["info", "model"], "hidden_size", edit_config(hidden_size="2048")),
    Case("config-negative", ["info", "model"], "at least 1", edit_config(num_hidden_layers=-3)),
    Case("config-not-utf8", ["info", "model"], "UTF-8", write("model/config.json", b"\xff{}")),
    Case("state-list", ["prune", "--budget", "50%", "-o", "s"], "workspace", write(".emo/state.json", "[]")),
    Case("state-number-values", ["prune", "--budget", "50%", "-o", "s"], "workspace",
         write(".emo/state.json", '{"model": 3}')),
    Case("gguf-tensor-count-2^60", ["eval", "bad.gguf", "--data", "med.jsonl"], "GGUF",
         gguf_patch(8, struct.pack("<Q", 2**60))),
    Case("gguf-kv-count-2^60", ["info", "bad.gguf"], "GGUF", gguf_patch(16, struct.pack("<Q", 2**60))),
    Case("gguf-flipped-magic", ["info", "bad.gguf"], "GGUF", gguf_patch(0, b"GGUX")),
    Case("gguf-expert-count", ["eval", "bad.gguf", "--data", "med.jsonl"], "shape",
         gguf_patch("deepseek.expert_count", struct.pack("<I", 9))),
    Case("gguf-layers-huge", ["eval", "bad.gguf", "--data", "med.jsonl"], "layers",
         gguf_patch("deepseek.block_count", struct.pack("<I", 2**31))),
    Case("profile-wrong-shape", ["prune", "-p", "edited.profile.safetensors", "--budget", "50%", "-o", "e"],
         "not a valid emo profile", profile_with_wrong_shape),
    Case("profile-not-a-profile", ["prune", "-p", "x.profile.safetensors", "--budget", "50%", "-o", "e"],
         "profile", write("x.profile.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")),
    Case("heldout-0-then-greedy", ["prune", "-p", "noheld.profile.safetensors", "--budget", "50%",
                                   "--method", "greedy", "-o", "h"], "held-out", no_heldout_profile),
    Case("method-typo", ["prune", "--budget", "50%", "--method", "frequncy", "-o", "t"], "frequncy"),
    Case("budget-and-max-loss", ["prune", "--budget", "10", "--max-loss-increase", "2%", "-o", "t"], "budget"),
    Case("quant-bogus-force", ["prune", "--budget", "25%", "--quant", "bogus", "--force"], "bogus"),
    Case("force-on-user-folder", ["prune", "--budget", "25%", "-o", "mine", "--force"], "emo", user_folder),
    Case("force-on-a-file", ["prune", "--budget", "25%", "-o", "med.jsonl", "--force"], "med.jsonl"),
    Case("output-parent-missing", ["prune", "--budget", "25%", "-o", "no/such/dir/slim"], "no/such/dir"),
    Case("profile-output-parent-missing", ["profile", "med.jsonl", "--model", "model", "-o", "nope/x.p"], "nope"),
    Case("profile-output-unwritable", ["profile", "med.jsonl", "--model", "model", "-o", "/proc/emo.p"], "/proc"),
    Case("export-output-unwritable", ["export", "slim-med", "-o", "/proc/x.gguf"], "/proc"),
    Case("chat-non-utf8-stdin", ["chat", "--model", "slim-med.gguf", "--max-new-tokens", "2"], "UTF-8",
         stdin=b"hello \xff\xfe there\n", code=0, prefix="that line"),  # skipped; the session goes on
    Case("chat-stdin-closed", ["chat", "--model", "slim-med.gguf", "--max-new-tokens", "2"], "stdin",
         close_stdin=True),
    Case("chat-model-missing", ["chat", "--model", "nothing.gguf"], "nothing.gguf"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_input_gives_one_line_and_changes_nothing(base, tmp_path, case):
    d = tmp_path / "w"
    shutil.copytree(base, d, symlinks=True)
    if case.setup:
        case.setup(d)
    before = snapshot(d)
    r = emo(case.args, d, stdin=case.stdin, close_stdin=case.close_stdin)
    err = r.stderr.decode("utf-8", "replace")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert r.returncode == case.code, (r.returncode, err, r.stdout[-500:])
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith(case.prefix), err
    assert case.needle in lines[0], lines[0]
    after = snapshot(d)
    assert after == before, sorted(set(after) ^ set(before)) or [k for k in after if after[k] != before.get(k)]


def test_chat_with_a_non_utf8_prompt_argument(base, tmp_path):
    d = tmp_path / "w"
    shutil.copytree(base, d, symlinks=True)
    before = snapshot(d)
    r = subprocess.run([os.fsencode(EMO), b"chat", b"--model", b"slim-med.gguf", b"--prompt", b"caf\xe9",
                        b"--max-new-tokens", b"2"], cwd=d, capture_output=True, timeout=300)
    err = r.stderr.decode("utf-8", "replace")
    assert r.returncode == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "UTF-8" in err
    assert snapshot(d) == before


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_of_every_writer_follow_the_umask(base, tmp_path, umask):
    d = tmp_path / "w"
    shutil.copytree(base, d, symlinks=True)
    old = os.umask(umask)
    try:
        for args in (["profile", "med.jsonl", "--model", "model", "--seq-len", "32", "-o", "u.profile.safetensors"],
                     ["prune", "-p", "u.profile.safetensors", "--budget", "25%", "-o", "u-slim", "--quant", "q8_0"],
                     ["export", "u-slim", "-o", "u2.gguf", "--quant", "f16"]):
            r = emo(args, d)
            assert r.returncode == 0, r.stderr.decode()
    finally:
        os.umask(old)
    made = [d / "u.profile.safetensors", d / "u-slim.gguf", d / "u2.gguf", d / ".emo" / "state.json",
            *(d / "u-slim").rglob("*")]
    for p in made:
        want = (0o777 if p.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(p.stat().st_mode) == want, (p, oct(p.stat().st_mode))
    assert stat.S_IMODE((d / "u-slim").stat().st_mode) == 0o777 & ~umask
    assert not [p for p in d.rglob(".*") if p.name.endswith((".tmp", ".partial")) or ".tmp" in p.name]
