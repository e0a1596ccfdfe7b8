"""Greedy (held-out-loss-guided) selection vs the cheap methods, scored on documents that neither
profiling nor selection saw, on the embedded tiny models.

    python bench/greedy.py                       # medical, tiny EMO and tiny std MoE, keep 25% and 12.5%
    python bench/greedy.py --domains medical,legal --max-evals 64

Profiling uses the domain's training documents minus a held-out quarter (the selection set that
greedy optimises); the table scores the corpus's own held-out file, which no step has seen.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)

from emo_cli.lab.corpus import PIP_DOMAINS, CorpusSpec, build_corpus, domain_files  # noqa: E402
from emo_cli.data.documents import read_documents  # noqa: E402
from emo_cli.evaluation.loss import evaluate_loss  # noqa: E402
from emo_cli.experts.pipeline import heldout_documents, make_plan, masked_loss, run_profile  # noqa: E402
from emo_cli.runtime import load_model  # noqa: E402
from emo_cli.experts.selection import Budget  # noqa: E402

ASSETS = ROOT / "emo_cli" / "assets"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--domains", default="medical")
    ap.add_argument("--models", default="tiny-emo,tiny-stdmoe")
    ap.add_argument("--keeps", default="25%,12.5%")
    ap.add_argument("--calib-docs", type=int, default=96)
    ap.add_argument("--test-docs", type=int, default=48)
    ap.add_argument("--max-evals", type=int, default=48)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--corpus", default="emo-demo/data")
    args = ap.parse_args()
    corpus = Path(args.corpus)
    build_corpus(corpus, CorpusSpec(domains=PIP_DOMAINS, max_chars_per_domain=600_000, fetch=False))
    methods = ("frequency", "router", "reap", "greedy")
    print(f"{'model':12} {'domain':9} {'keep':6} " + " ".join(f"{m:>10}" for m in methods) + "   greedy cost")
    for name in args.models.split(","):
        lm = load_model(str(ASSETS / name))
        for dom in args.domains.split(","):
            train, held_file = domain_files(corpus, dom)
            test = read_documents([str(held_file)], max_docs=args.test_docs)
            prof = run_profile(lm, [str(train)], max_docs=args.calib_docs, seq_len=args.seq_len, heldout_frac=0.25,
                               quiet=True)
            sel = heldout_documents([prof])
            full = evaluate_loss(lm.model, lm.tokenizer, test, seq_len=args.seq_len).loss
            for keep in args.keeps.split(","):
                row, cost = [], ""
                for m in methods:
                    t = time.perf_counter()
                    plan = make_plan([prof], m, Budget.parse(keep), "uniform", model=lm.model, tokenizer=lm.tokenizer,
                                     heldout_docs=sel, max_evals=args.max_evals, quiet=True)
                    if m == "greedy":
                        cost = (f"{plan.extra['evals']} evals, {plan.extra['forward_equivalents']} fwd-eq, "
                                f"{time.perf_counter() - t:.0f} s, start {plan.extra['start']}")
                    row.append(masked_loss(lm.model, lm.tokenizer, test, plan.kept, args.seq_len) / full - 1)
                print(f"{name:12} {dom:9} {keep:6} " + " ".join(f"{100 * v:+9.2f}%" for v in row) + "   " + cost,
                      flush=True)


if __name__ == "__main__":
    main()
