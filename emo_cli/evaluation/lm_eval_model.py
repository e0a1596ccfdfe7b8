"""emo's runtime as an lm-eval model (lm-eval 0.4.x, `pip install emo-cli[eval]`).

    emo eval slim-med.gguf --tasks mmlu_clinical_knowledge            # lm-eval tasks on emo's runtime
    python -m emo_cli.evaluation.lm_eval_model --model emo --model_args pretrained=slim-med.gguf --tasks TASK
    import emo_cli.evaluation.lm_eval_model; lm_eval.simple_evaluate(model="emo", model_args="pretrained=...")

lm-eval 0.4 has no entry point for outside models: importing this module registers the name
`emo` in its model registry, and `python -m emo_cli.evaluation.lm_eval_model` is lm-eval's own command line
with `emo` registered. HF directories and GGUF files run on the backends `emo chat` uses.

loglikelihood scores the continuation's tokens exactly as `emo eval` scores a multiple-choice
choice (multiple_choice.continuation_ids: context and continuation tokenized together), so the
two agree; an empty context is the end-of-text token, as lm-eval's own models do.
loglikelihood_rolling scores a text in disjoint windows of max_length tokens, the first one after
the end-of-text token. generate_until decodes greedily (or samples, as gen_kwargs say) and cuts at
the first `until` string.
"""

from __future__ import annotations

import sys

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from emo_cli.chat import open_model
from emo_cli.errors import EmoError
from emo_cli.evaluation.multiple_choice import continuation_ids, score_rows
from emo_cli.model.generate import SamplingParams, generate


@register_model("emo")
class EmoLM(LM):
    def __init__(self, pretrained: str, backend: str = "auto", device: str = "cpu", max_length: int | str = 2048,
                 batch_size: int | str = 16, threads: int | None = None, **_ignored):
        super().__init__()
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            device = "cpu"  # lm-eval's command line passes --device cuda unless told otherwise
        self.m = open_model(str(pretrained), backend=backend, device=device, threads=threads)
        if self.m.backend == "llama.cpp":
            raise EmoError("the emo lm-eval model runs on emo's backends (auto, cpu, torch, triton), not llama.cpp")
        self.engine = self.m.engine
        self.model, self.tok = self.engine.model, self.engine.tokenizer
        self.max_length = min(int(max_length), self.engine.max_context)
        size = str(batch_size)
        self.batch = 16 if size.startswith("auto") else max(1, int(size))  # lm-eval's "auto" / "auto:N"
        self.eot = next(iter(sorted(self.m.eos_ids)), self.tok.pad_id)

    @property
    def tokenizer_name(self) -> str:
        return str(self.m.path)

    def _score(self, rows: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        return score_rows(self.model, self.tok.pad_id, rows, self.batch)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        rows = []
        for context, continuation in (r.args for r in requests):
            ctx, cont = continuation_ids(self.tok, context, continuation) if context else ([self.eot], self.tok.encode(continuation))
            if not cont:
                raise EmoError(f"continuation {continuation!r} tokenizes to nothing")
            ids = (ctx or [self.eot]) + cont
            ids = ids[-(self.max_length + 1):]
            rows.append((ids, min(len(cont), len(ids) - 1)))
        return self._score(rows)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        rows, owner = [], []
        for k, (text,) in enumerate(r.args for r in requests):
            ids = [self.eot] + self.tok.encode(text)
            for start in range(0, len(ids) - 1, self.max_length):  # window predicts ids[start+1 : start+1+L]
                window = ids[start:start + self.max_length + 1]
                rows.append((window, len(window) - 1))
                owner.append(k)
        totals = [0.0] * len(requests)
        for k, (score, _) in zip(owner, self._score(rows)):
            totals[k] += score
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for context, kwargs in (r.args for r in requests):
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            params = SamplingParams(temperature=temperature, max_new_tokens=int(kwargs.get("max_gen_toks", 256)),
                                    seed=0)
            ids = self.tok.encode(context)[-(self.max_length - params.max_new_tokens - 1):] or [self.eot]
            new: list[int] = []
            text = ""
            for t in generate(self.engine, ids, params, set(self.m.eos_ids)):
                new.append(t)
                text = self.tok.decode(new)
                if any(u in text for u in until):
                    break
            cut = min([text.index(u) for u in until if u in text], default=len(text))
            out.append(text[:cut])
        return out


def main() -> None:
    """lm-eval's command line with the `emo` model registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv[0] = "lm_eval"
    cli_evaluate()


if __name__ == "__main__":
    main()
