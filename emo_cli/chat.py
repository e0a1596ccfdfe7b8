"""`emo chat`: one-shot continuation or an interactive streaming REPL, on any backend.

Base models continue raw text: the REPL's context is everything typed and generated so far. When
the tokenizer carries a chat template (tokenizer_config.json or the GGUF's
tokenizer.chat_template) the conversation is rendered through it instead. Either way the engine
keeps its KV cache across turns and recomputes only what changed.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from emo_cli.errors import EmoError
from emo_cli.model.generate import EmoEngine, Engine, GenerationStats, SamplingParams, TextStream, generate
from emo_cli.model.loading import is_gguf, resolve_model_path

HISTORY_FILE = Path.home() / ".cache" / "emo" / "chat_history"


@dataclass
class OpenModel:
    engine: Engine
    eos_ids: set[int]
    chat_template: str | None
    backend: str
    path: Path
    threads: int
    device: str


def open_model(spec: str, backend: str = "auto", device: str = "auto", threads: int | None = None) -> OpenModel:
    """Load MODEL for generation on the chosen backend (resolved once by emo_kernels.dispatch)."""
    from emo_kernels.dispatch import BackendError, moe_function, resolve

    path = resolve_model_path(spec)
    gguf = is_gguf(path)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    threads = threads or os.cpu_count() or 1
    if threads < 1:
        raise EmoError("--threads must be >= 1")
    torch.set_num_threads(threads)
    try:
        chosen = resolve(backend, device, gguf)
    except BackendError as e:
        raise EmoError(str(e)) from None
    if chosen == "llama.cpp":
        from emo_cli.gguf.llama_backend import LlamaCppEngine

        eng = LlamaCppEngine(path, threads)
        template = eng.llm.metadata.get("tokenizer.chat_template")
        return OpenModel(eng, eng.eos_ids, template, chosen, path, threads, device)
    if chosen == "cpu":
        from emo_kernels import cpu

        cpu.set_threads(threads)
    if not gguf and chosen == "cpu":
        raise EmoError("--backend cpu runs GGUF files (weights stay quantized); export with `emo export` "
                       "first, or use --backend auto for this HF directory")
    from emo_cli.model.memory import Workload
    from emo_cli.runtime import load_model, open_model

    opened = open_model(path)
    ctx = None if gguf else int(opened.config.max_position_embeddings)
    lm = load_model(opened, device=device, backend=chosen, what="chat",
                    workload=Workload(batch_size=1, seq_len=ctx or 1, kv_tokens=ctx or 0, streamable=False))
    if not gguf:
        for blk in lm.model.moe_blocks().values():
            blk.moe_fn = moe_function(chosen)
        lm.model.eval()
    eos = set(lm.config.eos_ids)
    if lm.tokenizer.eos_id is not None:
        eos.add(lm.tokenizer.eos_id)
    return OpenModel(EmoEngine(lm.model, lm.tokenizer), eos, lm.tokenizer.chat_template, chosen, path,
                     threads, device)


def render_template(template: str, messages: list[dict], eos_text: str, add_generation_prompt: bool = True) -> str:
    """A Hugging Face chat template (jinja) rendered, by default for the next assistant turn."""
    try:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise EmoError("this model has a chat template, which needs jinja2: pip install jinja2") from None

    def fail(msg):
        raise TemplateError(msg)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = fail
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                bos_token="", eos_token=eos_text)
    except TemplateError as e:
        raise EmoError(f"the model's chat template failed: {e}") from None


class ChatSession:
    """A conversation on one engine: turns in, streamed text out."""

    def __init__(self, m: OpenModel, params: SamplingParams):
        self.m, self.params = m, params
        self.messages: list[dict] = []
        self.context: list[int] = []  # raw-text mode: every token typed or generated
        self.last = GenerationStats()
        self.total_new = 0
        self.notice: str | None = None
        eos = next(iter(m.eos_ids), None)
        self.eos_text = m.engine.decode([eos]) if eos is not None else ""

    def reset(self) -> None:
        self.messages, self.context = [], []

    def fit(self, text: str) -> tuple[list[int], str | None]:
        """The context for this turn within the model's window, leaving room for a reply: the oldest
        turns (template) or tokens (raw text) go first; an input too long on its own keeps its
        end. Returns the ids and a notice of what was dropped, if anything."""
        engine = self.m.engine
        room = max(1, engine.max_context - min(max(self.params.max_new_tokens, 16), engine.max_context // 4))
        if self.m.chat_template:
            self.messages.append({"role": "user", "content": text})
            render = lambda: engine.encode(render_template(self.m.chat_template, self.messages, self.eos_text))  # noqa: E731
            ids, dropped = render(), 0
            while len(ids) > room and len(self.messages) > 1:
                self.messages.pop(0)
                dropped += 1
                ids = render()
            if len(ids) <= room:
                return ids, (f"context full: dropped the {dropped} oldest message(s)" if dropped else None)
            own = engine.encode(text)
            self.messages[-1]["content"] = engine.decode(own[len(own) - max(1, room - (len(ids) - len(own))):])
            return render()[-room:], f"this input is longer than the context ({len(own)} tokens): kept its end"
        own = engine.encode(text)
        if len(own) > room:
            return own[-room:], f"this input is longer than the context ({len(own)} tokens): kept its last {room}"
        ids = self.context + own
        if len(ids) > room:
            return ids[-room:], f"context full: dropped the {len(ids) - room} oldest tokens of the conversation"
        return ids, None

    def turn(self, text: str, on_notice=None):
        """Yield the continuation of `text` piece by piece (whole UTF-8 characters); what an
        over-full context dropped is `self.notice`, also given to `on_notice` before any text."""
        ids, self.notice = self.fit(text)
        if self.notice and on_notice:
            on_notice(self.notice)
        stats = GenerationStats()
        self.last = stats
        stream = TextStream(self.m.engine.decode)
        reply: list[str] = []
        try:
            for tok in generate(self.m.engine, ids, self.params, self.m.eos_ids, stats):
                piece = stream.push(tok)
                if piece:
                    reply.append(piece)
                    yield piece
            tail = stream.flush()
            if tail:
                reply.append(tail)
                yield tail
        except KeyboardInterrupt:
            stats.stop = "interrupted"
        finally:
            self.total_new += stats.new_tokens
            if self.m.chat_template:
                self.messages.append({"role": "assistant", "content": "".join(reply)})
            else:
                self.context = ids + stats.tokens


def memory() -> tuple[int, int]:
    """(current, peak) resident set size in bytes."""
    vals = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                vals[k] = int(v.split()[0]) * 1024
    except OSError:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return peak, peak
    return vals.get("VmRSS", 0), vals.get("VmHWM", 0)


def one_shot(m: OpenModel, prompt: str, params: SamplingParams) -> GenerationStats:
    """Print only the continuation of `prompt` to stdout, as plain text (no markup)."""
    session = ChatSession(m, params)
    out = sys.stdout
    for piece in session.turn(prompt, on_notice=lambda n: print(f"note: {n}", file=sys.stderr)):
        out.write(piece)
        out.flush()
    if session.last.stop == "interrupted":  # Ctrl-C: the output is cut off; say so by the exit code
        out.write("\n")
        out.flush()
        raise KeyboardInterrupt
    if out.isatty():
        out.write("\n")
    return session.last


def stats_rows(session: ChatSession) -> list[list]:
    s, m = session.last, session.m
    rss, peak = memory()
    rows = [["backend", m.backend], ["threads", m.threads], ["device", m.device],
            ["prompt tokens (computed)", s.prompt_tokens], ["prefill tok/s", s.prefill_tps],
            ["new tokens", s.new_tokens], ["decode tok/s", s.decode_tps], ["stopped by", s.stop or "-"],
            ["context tokens", len(m.engine.tokens)], ["tokens generated (session)", session.total_new],
            ["memory RSS MB", rss / 1e6], ["peak RSS MB", peak / 1e6]]
    if m.device.startswith("cuda"):
        rows.append(["peak CUDA MB", torch.cuda.max_memory_allocated() / 1e6])
    if m.backend == "cpu":  # which build of the kernels this CPU got (chosen at run time)
        from emo_kernels import cpu

        rows.insert(1, ["CPU kernels", cpu.chosen_variant()])
    return rows


def _readline_setup() -> None:
    try:
        import readline
    except ImportError:  # no line editing on this platform; input() still works
        return
    try:
        HISTORY_FILE.parent.mkdir(parents=True, exist_ok=True)
        if HISTORY_FILE.exists():
            readline.read_history_file(str(HISTORY_FILE))
        readline.set_history_length(1000)
    except OSError:
        return
    import atexit

    atexit.register(lambda: _save_history(readline))


def _save_history(readline) -> None:
    try:
        readline.write_history_file(str(HISTORY_FILE))
    except OSError:
        pass


def is_text(s: str) -> bool:
    """Whether a str decoded from the terminal, a pipe or argv is real text: Python keeps bytes
    that are not UTF-8 as lone surrogates, which no tokenizer can encode."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def repl(m: OpenModel, params: SamplingParams) -> None:
    """Interactive chat: stream replies; /reset, /stats, /exit; line editing and history."""
    from emo_cli import ui

    if sys.stdin is None or sys.stdin.closed:
        raise EmoError("stdin is closed: nothing to chat with (pass --prompt TEXT for one reply)")

    _readline_setup()
    session = ChatSession(m, params)
    mode = "chat template" if m.chat_template else "raw text continuation"
    ui.out.print(f"[bold]emo chat[/bold]  {m.path.name}  backend {m.backend}, {m.threads} threads, {mode}\n"
                 f"[dim]/reset clears the conversation, /stats shows speed and memory, /exit quits[/dim]")
    while True:
        try:
            line = input("\n> ")
        except EOFError:
            ui.out.print()
            return
        except KeyboardInterrupt:
            ui.out.print()
            continue
        cmd = line.strip()
        if not cmd:
            continue
        if not is_text(line):  # a paste of binary or Latin-1 bytes: skip it, keep the conversation
            ui.err.print("that line is not UTF-8 text; skipped it", style="yellow")
            continue
        if cmd in ("/exit", "/quit"):
            return
        if cmd == "/reset":
            session.reset()
            ui.out.print("[dim]conversation cleared[/dim]")
            continue
        if cmd == "/stats":
            ui.out.print(ui.table("chat stats", ["", "value"], stats_rows(session)))
            continue
        if cmd.startswith("/") and " " not in cmd:
            ui.out.print(f"[red]unknown command {cmd}[/red] (use /reset, /stats, /exit)", markup=True)
            continue
        t0 = time.perf_counter()
        try:  # raw text: model output is never rich markup
            for piece in session.turn(line, on_notice=lambda n: ui.out.print(f"[dim]{n}[/dim]")):
                ui.out.file.write(piece)
                ui.out.file.flush()
        except KeyboardInterrupt:  # Ctrl-C stops this reply, not the session
            session.last.stop = "interrupted"
        s = session.last
        ui.out.print()
        ui.out.print(f"[dim]{s.new_tokens} tokens, {s.decode_tps:.1f} tok/s"
                     f"{' (interrupted)' if s.stop == 'interrupted' else ''}, "
                     f"{time.perf_counter() - t0:.1f} s[/dim]")
