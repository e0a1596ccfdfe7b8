"""`emo chat`."""

from __future__ import annotations

from typing import Optional

import typer


def chat(
    model: str = typer.Option(..., "--model", "-m", help="A .gguf file, an HF model directory, or a cached HF repo id."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p",
                                         help="One-shot: print only the continuation of TEXT to stdout, then exit."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", "-n", help="Stop after N new tokens."),
    temperature: float = typer.Option(0.7, "--temperature", "-t", help="0 = greedy (plain argmax)."),
    top_p: float = typer.Option(0.95, "--top-p", help="Nucleus sampling mass (1 = off)."),
    top_k: int = typer.Option(0, "--top-k", help="Sample among the K most likely tokens (0 = off)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed for sampling (reproducible runs)."),
    backend: str = typer.Option("auto", "--backend",
                                help="auto | cpu (emo's quantized CPU kernels, GGUF) | triton (CUDA) | torch | "
                                     "llama.cpp (the GGUF run by llama-cpp-python)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads (default: all cores)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda."),
):
    """Chat with a model, streaming tokens; or continue one prompt with --prompt.

    Interactive: /reset clears the conversation, /stats shows tokens/s and memory, /exit quits; arrow keys edit and recall lines. Base models continue raw text; a chat template is applied when the tokenizer provides one.

    Example: emo chat --model slim-med.gguf --prompt "The patient was" --temperature 0 --max-new-tokens 32
    """
    from emo_cli.chat import is_text, one_shot, open_model, repl
    from emo_cli.errors import EmoError
    from emo_cli.model.generate import SamplingParams

    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                            max_new_tokens=max_new_tokens)
    params.validate()
    if prompt is not None and not is_text(prompt):
        raise EmoError("--prompt is not UTF-8 text")
    m = open_model(model, backend=backend, device=device, threads=threads)
    if prompt is not None:
        one_shot(m, prompt, params)
    else:
        repl(m, params)
