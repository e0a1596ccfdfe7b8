"""`emo chat`: greedy continuations equal llama.cpp's; the REPL driven through a pty and stdin."""

import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from emo_cli.cli.app import app
from emo_cli.gguf.export import export_gguf
from emo_cli.model.generate import EmoEngine, SamplingParams, Sampler, TextStream, generate
from emo_cli.runtime import load_model
from kernel_support import cpu_param, needs_cpu_kernels

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "The patient was given a dose of"
runner = CliRunner()


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory, tiny_model_factory):
    src = tiny_model_factory("shared")
    d = tmp_path_factory.mktemp("chat")
    return src, {q: Path(export_gguf(src, d / f"m-{q}.gguf", q)["output"]) for q in ("f32", "q8_0")}


def chat(*args) -> str:
    if "--threads" not in args:  # one thread: tests share the machine, and results do not depend on it
        args = (*args, "--threads", 1)
    r = runner.invoke(app, ["chat", *map(str, args)])
    assert r.exit_code == 0, r.output
    return r.stdout


def llama_greedy(path: Path, prompt: str, n: int) -> tuple[list[int], str]:
    """llama.cpp's greedy decoding: argmax over eval'd logits, fp32 KV cache, no BOS."""
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(str(path), n_ctx=256, n_threads=1, type_k=llama_cpp.GGML_TYPE_F32,
                          type_v=llama_cpp.GGML_TYPE_F32, verbose=False)
    llm.eval(llm.tokenize(prompt.encode(), add_bos=False, special=False))
    out = []
    for _ in range(n):
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
        tok = int(logits.argmax())
        if tok == llm.token_eos():
            break
        out.append(tok)
        llm.eval([tok])
    stream = TextStream(lambda ids: llm.detokenize(ids).decode("utf-8", errors="replace"))
    text = "".join(stream.push(t) for t in out) + stream.flush()
    llm.close()
    return out, text


@pytest.mark.parametrize("quant,backend", [("f32", "auto"), cpu_param("f32", "cpu"), ("f32", "torch"),
                                           cpu_param("q8_0", "auto"), cpu_param("q8_0", "cpu")])
def test_greedy_chat_equals_llama_cpp(ggufs, quant, backend):
    _, files = ggufs
    ids, text = llama_greedy(files[quant], PROMPT, 16)
    ours = chat("--model", files[quant], "--prompt", PROMPT, "--temperature", 0, "--max-new-tokens", 16,
                "--seed", 0, "--backend", backend, "--threads", 1)
    assert ours == text
    lm = load_model(files[quant], backend=backend)
    got = list(generate(EmoEngine(lm.model, lm.tokenizer), lm.tokenizer.encode(PROMPT),
                        SamplingParams(temperature=0, max_new_tokens=16), set(lm.config.eos_ids)))
    assert got == ids


def test_llama_cpp_backend_and_hf_dir(ggufs):
    src, files = ggufs
    _, text = llama_greedy(files["f32"], PROMPT, 12)
    assert chat("--model", files["f32"], "--prompt", PROMPT, "--temperature", 0, "-n", 12,
                "--backend", "llama.cpp") == text
    assert chat("--model", src, "--prompt", PROMPT, "--temperature", 0, "-n", 12) == text  # HF runtime


def test_sampling_is_seeded_and_top_k_1_is_greedy(ggufs):
    _, files = ggufs
    args = ["--model", files["q8_0"], "--prompt", PROMPT, "-n", 12, "--temperature", 1.0]
    a = chat(*args, "--seed", 3)
    assert a == chat(*args, "--seed", 3)
    draws = {chat(*args, "--seed", s) for s in range(4)}
    assert len(draws) > 1  # temperature 1 on a random model: seeds disagree
    greedy = chat("--model", files["q8_0"], "--prompt", PROMPT, "-n", 12, "--temperature", 0)
    assert chat(*args, "--top-k", 1, "--seed", 5) == greedy
    assert chat(*args, "--top-p", 1e-6, "--seed", 6) == greedy


def test_sampler_filters():
    logits = torch.tensor([0.0, 2.0, 1.0, -1.0])
    assert Sampler(SamplingParams(temperature=0))(logits) == 1
    picks = {Sampler(SamplingParams(temperature=5, top_k=2, top_p=1, seed=s))(logits) for s in range(40)}
    assert picks == {1, 2}
    probs = torch.softmax(logits, 0)  # top-p 0.9 keeps the tokens whose preceding mass < 0.9
    keep = int((torch.sort(probs, descending=True).values.cumsum(0) - torch.sort(probs, descending=True).values < 0.9).sum())
    picks = {Sampler(SamplingParams(temperature=1, top_p=0.9, seed=s))(logits) for s in range(200)}
    assert len(picks) == keep


def test_stream_holds_partial_utf8(tiny_model_factory):
    lm = load_model(tiny_model_factory("shared"))
    text = "naïve café ✓ 漢字 ok"
    ids = lm.tokenizer.encode(text)
    stream = TextStream(lm.tokenizer.decode)
    pieces = [stream.push(t) for t in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def templated(src, tmp_path):
    """A copy of the HF model whose tokenizer has a chat template, and its f32 GGUF."""
    import shutil

    d = tmp_path / "templated"
    shutil.copytree(src, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = ("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
                            "{% if add_generation_prompt %}[assistant]{% endif %}")
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d, export_gguf(d, tmp_path / "t.gguf", "f32")["output"]


def test_chat_template_is_applied(ggufs, tmp_path):
    src, _ = ggufs
    d, gguf = templated(src, tmp_path)
    rendered = f"[user] {PROMPT}\n[assistant]"
    raw = chat("--model", src, "--prompt", rendered, "--temperature", 0, "-n", 10)
    assert chat("--model", gguf, "--prompt", PROMPT, "--temperature", 0, "-n", 10) == raw
    assert chat("--model", d, "--prompt", PROMPT, "--temperature", 0, "-n", 10) == raw


@pytest.mark.parametrize("args,message", [
    (["--model", "missing.gguf", "--prompt", "x"], "no such model"),
    (["--prompt", "x", "--temperature", "-1"], "--temperature"),
    (["--prompt", "x", "--backend", "fast"], "unknown backend"),
    (["--prompt", "x", "--backend", "triton"], "triton"),
])
def test_bad_input_is_one_line(ggufs, args, message):
    _, files = ggufs
    if "--model" not in args:
        args = ["--model", str(files["q8_0"]), *args]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "emo_cli", "chat", *args], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 1 and r.stdout == ""
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def _cli_env(tmp_path) -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), HOME=str(tmp_path), COLUMNS="200", TERM="dumb")


@pytest.mark.slow
def test_repl_through_stdin(ggufs, tmp_path):
    _, files = ggufs
    r = subprocess.run([sys.executable, "-m", "emo_cli", "chat", "--model", str(files["q8_0"]),
                        "--temperature", "0", "-n", "6", "--threads", "1"],
                       input=f"{PROMPT}\n/stats\n/reset\n/bogus\n/exit\n", capture_output=True, text=True,
                       env=_cli_env(tmp_path), timeout=120)
    assert r.returncode == 0, r.stderr
    one_shot = chat("--model", files["q8_0"], "--prompt", PROMPT, "--temperature", 0, "-n", 6)
    assert one_shot in r.stdout
    for expected in ("decode tok/s", "peak RSS MB", "conversation cleared", "unknown command /bogus"):
        assert expected in r.stdout, r.stdout


def _read_until(fd, needle: str, buf: list, timeout=90.0, after: str = "") -> str:
    """Read the terminal until `needle` shows up (after the last `after`, when given)."""
    end = time.time() + timeout

    def seen() -> bool:
        text = "".join(buf)
        return needle in (text[text.rfind(after) + len(after):] if after else text) and (not after or after in text)

    while not seen():
        left = end - time.time()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise AssertionError(f"no {needle!r} in {''.join(buf)!r}")
        try:
            buf.append(os.read(fd, 4096).decode("utf-8", errors="replace"))
        except OSError:  # the child closed the terminal
            raise AssertionError(f"no {needle!r} in {''.join(buf)!r}") from None
    return "".join(buf)


@pytest.mark.slow
@needs_cpu_kernels
def test_repl_through_a_pty(ggufs, tmp_path):
    """Line editing goes through readline on a real terminal; the reply streams, /stats, /reset,
    /exit work, and Ctrl-D also leaves cleanly."""
    _, files = ggufs
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "emo_cli", "chat", "--model", str(files["q8_0"]),
                             "--temperature", "0", "-n", "6", "--threads", "1", "--backend", "cpu"],
                            stdin=slave, stdout=slave, stderr=slave, env=_cli_env(tmp_path), close_fds=True)
    os.close(slave)
    buf: list[str] = []
    try:
        _read_until(master, "> ", buf)
        os.write(master, (PROMPT + "\r").encode())
        out = _read_until(master, "> ", buf, after="tok/s")
        one_shot = chat("--model", files["q8_0"], "--prompt", PROMPT, "--temperature", 0, "-n", 6)
        assert one_shot in out.replace("\r\n", "\n")
        os.write(master, b"/stats\r")
        _read_until(master, "> ", buf, after="peak RSS MB")
        os.write(master, b"/reset\r")
        _read_until(master, "> ", buf, after="conversation cleared")  # readline waits again
        os.write(master, b"\x04")  # Ctrl-D
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    assert (tmp_path / ".cache" / "emo" / "chat_history").exists()  # readline history was saved


@pytest.mark.slow
def test_repl_survives_a_full_context(ggufs, tmp_path):
    """Turns that overflow the 256-token context drop the oldest tokens with one dim notice, an
    input longer than the context keeps its end, and the session goes on (exit 0)."""
    _, files = ggufs
    long_line = " ".join(["the patient was given a dose of aspirin"] * 12)  # ~100 tokens
    huge_line = " ".join(["def return value"] * 150)
    r = subprocess.run([sys.executable, "-m", "emo_cli", "chat", "--model", str(files["q8_0"]),
                        "--temperature", "0", "-n", "4", "--threads", "1"],
                       input=f"{long_line}\n{long_line}\n{long_line}\n{huge_line}\n{PROMPT}\n/exit\n",
                       capture_output=True, text=True, env=_cli_env(tmp_path), timeout=120)
    assert r.returncode == 0, r.stderr
    assert "context full: dropped the" in r.stdout, r.stdout
    assert "this input is longer than the context" in r.stdout, r.stdout
    assert r.stdout.count(" tokens, ") == 5  # every turn answered


def test_templated_session_drops_oldest_messages_when_full(ggufs, tmp_path):
    """With a chat template, an over-full conversation drops whole messages, oldest first, and the
    rendered context always fits the window with room for the reply."""
    from emo_cli.chat import ChatSession, open_model
    from emo_cli.model.generate import SamplingParams

    _, gguf = templated(ggufs[0], tmp_path)
    m = open_model(str(gguf), threads=1)
    session = ChatSession(m, SamplingParams(temperature=0, max_new_tokens=4))
    long_line = " ".join(["the patient was given a dose of aspirin"] * 4)
    notices = []
    for _ in range(4):
        "".join(session.turn(long_line))
        notices.append(session.notice)
    assert notices[0] is None and any(n and "oldest message" in n for n in notices[1:]), notices
    ids, _ = session.fit(long_line)
    assert len(ids) <= m.engine.max_context - 16
    "".join(session.turn(" ".join(["def return value"] * 150)))
    assert "longer than the context" in session.notice


def test_ctrl_c_in_one_shot_exits_130_after_a_newline(ggufs, monkeypatch, capsys):
    """Ctrl-C cuts one-shot output short: the shell learns it from exit code 130, the terminal
    gets its newline. The interrupt arrives after the first tokens, as a user's would."""
    import emo_cli.chat as chat_mod
    from test_cli import run

    real = chat_mod.generate

    def interrupted(*a, **k):
        for i, tok in enumerate(real(*a, **k)):
            if i == 3:
                raise KeyboardInterrupt
            yield tok

    monkeypatch.setattr(chat_mod, "generate", interrupted)
    _, files = ggufs
    code, out, err = run(["chat", "--model", files["q8_0"], "--prompt", PROMPT, "-n", "20", "--temperature", "0",
                          "--threads", "1"], capsys)
    assert code == 130 and out.endswith("\n"), (code, out, err)
