"""Opening an emo GGUF: gguf-py's GGUFReader (what emo used) vs emo's reader (emo_cli/gguf/reader.py).

    .venv/bin/python bench/gguf_load.py                         # a tiny model with the real 100278-row vocabulary
    .venv/bin/python bench/gguf_load.py --gguf model.gguf       # any emo GGUF
    .venv/bin/python bench/gguf_load.py --gguf big.gguf --no-load   # header and tokenizer only
    .venv/bin/python bench/gguf_load.py --gguf 1L-q8_0.gguf --stack-layers 16  # a 16-layer sparse copy

Without --gguf, a 1-layer model with the released config's vocabulary (100278 rows: the 8k BPE of
bench/scale.py's --workdir plus [PAD] rows, as `emo export` writes them) but tiny widths is written
and exported to q8_0 once under --workdir: the tokenizer tables are the real model's, the tensors
small. Each step runs --repeat times, the two readers alternating (the file stays in the page cache);
the median is reported. `load_gguf_model` is timed with each reader behind gguf/layout.py open_reader,
the rest of the load path unchanged (the old runtime used gguf-py's reader through the same calls).

--stack-layers N times a copy of --gguf whose layer 0 is repeated N times, with the tensor bytes left
as a hole in a sparse file (zeros, no disk): e.g. the real 16-layer model's file layout from a 1-layer
export of bench/scale.py's checkpoint, without writing 14 GB. Loading maps weights without reading
them (the background prefetch skips a file larger than half the free memory), so this times the load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[0] = str(ROOT)  # not bench/: bench/profile.py would shadow the standard library's profile

from gguf import GGUFReader  # noqa: E402

from emo_cli.gguf import layout as gf  # noqa: E402
from emo_cli.gguf.reader import GGUFFile  # noqa: E402
from emo_cli.gguf.runtime import load_gguf_model  # noqa: E402
from emo_cli.gguf.vocab import tokenizer_from_gguf  # noqa: E402

TINY = {"hidden_size": 64, "intermediate_size": 32, "num_attention_heads": 4, "num_key_value_heads": 4,
        "num_experts": 8, "num_experts_per_tok": 2}


def build(workdir: Path, tokenizer: Path | None) -> Path:
    """The q8_0 export of a 1-layer, 100278-row model (written once)."""
    from safetensors.torch import save_file

    from bench import scale
    from emo_cli.gguf.export import export_gguf

    out = workdir / "tiny-v100278-q8_0.gguf"
    if out.exists():
        return out
    tok_dir = tokenizer or scale.write_data(workdir)[0]
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    cfg = scale.released_config(1, tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|pad|>"))
    cfg.update(TINY, torch_dtype="float32")
    hf = workdir / "tiny-v100278"
    hf.mkdir(parents=True, exist_ok=True)
    tensors = {name: scale.make_tensor(name, shape, std).float() for name, shape, std in scale.tensor_specs(cfg)}
    save_file(tensors, str(hf / "model.safetensors"), metadata={"format": "pt"})
    (hf / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (hf / f).write_bytes((tok_dir / f).read_bytes())
    export_gguf(hf, out, "q8_0")
    return out


def stack_layers(src: Path, layers: int, workdir: Path) -> Path:
    """A sparse copy of `src` with its layer 0 repeated `layers` times (header exact, data all zeros)."""
    from gguf import GGUFValueType, GGUFWriter

    out = workdir / f"{src.stem}-x{layers}.gguf"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    r = GGUFFile(src)
    w = GGUFWriter(out, gf.ARCH)
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = layers if key == gf.K_BLOCKS else f.contents()
        sub = f.types[1] if f.types[0] == GGUFValueType.ARRAY else None
        w.add_key_value(key, value, f.types[0], sub_type=sub)
    for t in r.tensors:
        names = [t.name.replace("blk.0.", f"blk.{i}.") for i in range(layers)] if t.name.startswith("blk.0.") else \
            [t.name] if not t.name.startswith("blk.") else []
        for name in names:
            w.add_tensor_info(name, t.data.shape, t.data.dtype, t.n_bytes, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    with open(out, "r+b") as f:  # room for every tensor, then exactly up to the last one's end
        f.truncate(out.stat().st_size + sum(t.n_bytes + 64 for t in r.tensors) * layers)
        f.truncate(max(t.data_offset + t.n_bytes for t in GGUFFile(out).tensors))
    return out


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", type=Path, help="time this emo GGUF instead of the built tiny model")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/emo-gguf-load"))
    ap.add_argument("--tokenizer", type=Path, help="tokenizer dir for the built model (default: bench/scale.py's 8k "
                    "BPE, trained into --workdir)")
    ap.add_argument("--stack-layers", type=int, help="time a sparse copy of --gguf with layer 0 repeated N times")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--no-load", action="store_true", help="skip load_gguf_model (header and tokenizer only)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    path = args.gguf or build(args.workdir, args.tokenizer)
    if args.stack_layers:
        path = stack_layers(path, args.stack_layers, args.workdir)
    readers = {"gguf-py": GGUFReader, "emo": GGUFFile}
    original = gf.open_reader

    def load(reader):
        gf.open_reader = reader
        try:
            load_gguf_model(path, backend="auto")
        finally:
            gf.open_reader = original

    steps = {"open": lambda r: r(path), "open + tokenizer": lambda r: tokenizer_from_gguf(r(path), path)}
    if not args.no_load:
        steps["load_gguf_model"] = load
    for reader in readers.values():  # warm the page cache and the imports
        steps["open + tokenizer"](reader)
    times = {(s, n): [] for s in steps for n in readers}
    for _ in range(args.repeat):
        for s, fn in steps.items():
            for n, reader in readers.items():
                times[s, n].append(timed(lambda fn=fn, reader=reader: fn(reader)))
    med = {k: statistics.median(v) for k, v in times.items()}
    vocab = len(gf.field(GGUFFile(path), "tokenizer.ggml.tokens"))
    rows = [{"step": s, "gguf_py_s": med[s, "gguf-py"], "emo_s": med[s, "emo"],
             "speedup": med[s, "gguf-py"] / med[s, "emo"]} for s in steps]
    if args.json:
        print(json.dumps({"file": str(path), "bytes": path.stat().st_size, "vocab": vocab, "repeat": args.repeat,
                          "rows": rows}, indent=2))
        return
    print(f"{path} ({path.stat().st_size / 1e6:.1f} MB, {vocab} tokens), median of {args.repeat}")
    print(f"{'step':<18} {'gguf-py':>10} {'emo':>10} {'speedup':>8}")
    for r in rows:
        print(f"{r['step']:<18} {r['gguf_py_s'] * 1e3:>8.0f}ms {r['emo_s'] * 1e3:>8.0f}ms {r['speedup']:>7.1f}x")


if __name__ == "__main__":
    main()
