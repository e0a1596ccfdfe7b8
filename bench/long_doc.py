"""Memory of profiling one very long document: emo tokenizes only what --seq-len keeps.

    python bench/long_doc.py                 # a 50 MB document, --seq-len 256, the embedded tiny EMO
    python bench/long_doc.py --mb 200 --json

Runs, each as a subprocess whose peak anonymous memory (RssAnon of the process tree) is sampled:
  emo    `emo profile long.jsonl --seq-len 256` on the embedded tiny EMO
  naive  the same tokenizer encoding the whole document, then keeping 256 tokens (what emo did
         before: the peer every streaming reader is compared with)
and prints both peaks and their ratio. The document is ordinary English prose from Python's
reference manual (pydoc topics), repeated to the size asked for.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from pydoc_data.topics import topics

ROOT = Path(__file__).resolve().parent.parent
sys.path[0] = str(ROOT)  # not bench/: bench/profile.py would shadow the standard library's profile

from bench.scale import GIB, run_emo  # noqa: E402
from emo_cli.lab.demo import TINY_EMO  # noqa: E402

NAIVE = r"""
import json, sys
from emo_cli.model.tokenizer import EmoTokenizer
tok = EmoTokenizer.from_dir(sys.argv[1])
text = json.loads(open(sys.argv[2], encoding="utf-8").readline())["text"]
print(len(tok.encode(text)[:int(sys.argv[3])]))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=float, default=50.0, help="document size in MB")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    prose = "\n\n".join(topics[k] for k in sorted(topics))
    text = (prose * (int(args.mb * 1e6) // len(prose) + 1))[:int(args.mb * 1e6)]
    emo = str(Path(sys.executable).with_name("emo"))
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        (work / "long.jsonl").write_text(json.dumps({"text": text}) + "\n" + json.dumps({"text": prose[:4000]}) + "\n")
        ours = run_emo([emo, "profile", "long.jsonl", "--model", str(TINY_EMO), "--seq-len", str(args.seq_len),
                        "--heldout-frac", "0", "--json"], work, 3600, "emo")
        naive = run_emo([sys.executable, "-c", NAIVE, str(TINY_EMO), str(work / "long.jsonl"), str(args.seq_len)],
                        work, 3600, "naive")
    for name, r in (("emo", ours), ("naive", naive)):
        if not r["ok"]:
            sys.exit(f"{name} failed: {r['error']}")
    result = {"document_mb": args.mb, "seq_len": args.seq_len,
              "emo_peak_anon_gib": round(ours["peak"] / GIB, 3), "emo_wall_s": round(ours["wall"], 2),
              "naive_tokenize_peak_anon_gib": round(naive["peak"] / GIB, 3), "naive_wall_s": round(naive["wall"], 2),
              "memory_ratio_naive_over_emo": round(naive["peak"] / ours["peak"], 2),
              "command": " ".join([Path(sys.executable).name, *sys.argv])}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    from rich.console import Console
    from rich.table import Table
    t = Table(title=f"one {args.mb:g} MB document, --seq-len {args.seq_len}")
    for c in ("run", "peak anon GiB", "wall s"):
        t.add_column(c, justify="right" if c != "run" else "left")
    t.add_row("emo profile (whole command)", f"{result['emo_peak_anon_gib']:.3f}", f"{result['emo_wall_s']:.1f}")
    t.add_row("naive: encode all, keep 256", f"{result['naive_tokenize_peak_anon_gib']:.3f}", f"{result['naive_wall_s']:.1f}")
    Console().print(t)
    print(f"memory: naive / emo = {result['memory_ratio_naive_over_emo']:.2f}x")


if __name__ == "__main__":
    main()
