"""The model card (README.md) of a slim directory, as the Hugging Face Hub reads it.

YAML front matter: base_model (the source's repo id when it has one), base_model_relation,
library_name, tags and the source's license. The Hub knows four relations (adapter, merge,
quantized, finetune); a pruned model is the base model's own weights with experts removed and no
training, a compressed derivative, so it is listed with the quantizations. The body holds the
plan, the held-out losses of report.json and the command that made it. gguf-py's metadata reader
takes general.base_model.* and general.license from this card when the GGUF is written.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from emo_cli.model.loading import EMBEDDED_MODELS, hf_cache_dir

TAGS = ["emo", "mixture-of-experts", "pruned"]
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def front_matter(card_text: str) -> dict:
    """The YAML front matter of a model card ({} when absent or unreadable: a card is optional)."""
    m = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", card_text, re.S)
    if not m:
        return {}
    try:
        data = yaml.safe_load(m.group(1))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def source_repo_id(spec: str, model_dir: Path) -> str | None:
    """The Hub id of the source: the spec when it is a repo id, or the cache folder it lives in."""
    if spec in EMBEDDED_MODELS:
        return None
    if REPO_ID.match(spec) and not Path(spec).exists():
        return spec
    try:
        rel = Path(model_dir).resolve().relative_to(hf_cache_dir().resolve())
    except ValueError:
        return None
    folder = rel.parts[0] if rel.parts else ""
    return folder[len("models--"):].replace("--", "/", 1) if folder.startswith("models--") else None


def model_card(report: dict, source_dir: Path, name: str, command: str | None) -> str:
    """README.md for the slim model `name` described by `report` (experts/prune.py's report dict)."""
    source_dir = Path(source_dir)
    card_path = source_dir / "README.md"
    source_meta = front_matter(card_path.read_text(encoding="utf-8", errors="replace")) if card_path.is_file() else {}
    repo = source_repo_id(str(report["model"]), source_dir)
    meta: dict = {}
    if repo:
        meta["base_model"] = repo
        meta["base_model_relation"] = "quantized"
    meta["library_name"] = "transformers"
    meta["tags"] = TAGS
    for key in ("license", "license_name", "license_link", "language"):
        if key in source_meta:
            meta[key] = source_meta[key]
    kept = sorted(set(report["kept_per_layer"].values()))
    kept_text = (f"{kept[0]} experts in every MoE layer" if len(kept) == 1 else
                 "per layer: " + ", ".join(f"{k}: {v}" for k, v in report["kept_per_layer"].items()))
    source = f"[{repo}](https://huggingface.co/{repo})" if repo else f"`{report['model']}`"
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
             f"# {name}", "",
             f"{source} with only the experts one domain uses, cut by emo from an EMO "
             f"mixture of experts: {kept_text} (shared expert included). The slim model's logits equal the "
             f"source's with routing restricted to the kept experts.", "",
             "## Plan", "",
             "| | |", "|---|---|",
             f"| method | `{report['method']}` |", f"| budget | {report['budget']} ({report['allocation']}) |",
             f"| experts kept | {kept_text} |",
             f"| size | {report['bytes_after'] / 1e9:.2f} GB (source {report['bytes_before'] / 1e9:.2f} GB) |"]
    for data, share in (report.get("coverage") or {}).items():
        lines.append(f"| routing mass kept on {data} | {share:.1%} |")
    evals = report.get("eval") or {}
    if evals:
        lines += ["", "## Loss before and after (nats per token, held out)", "",
                  "| data | docs | source | slim | change |", "|---|---|---|---|---|"]
        for data, ev in evals.items():
            lines.append(f"| {data} | {ev['docs']} | {ev['before']:.4f} | {ev['after']:.4f} | "
                         f"{ev['increase_pct']:+.2f}% |")
        acc = {data: ev for data, ev in evals.items() if "acc_before" in ev}
        if acc:
            lines += ["", "## Multiple-choice accuracy (held out)", "", "| data | items | source | slim |",
                      "|---|---|---|---|"]
            lines += [f"| {data} | {ev['items']} | {ev['acc_before']:.3f} | {ev['acc_after']:.3f} |"
                      for data, ev in acc.items()]
    if report.get("gguf"):
        lines += ["", "## Files", "",
                  f"The GGUF export `{Path(report['gguf']['path']).name}` ({report['gguf']['quant']}) runs in "
                  f"llama.cpp and in `emo chat --model {Path(report['gguf']['path']).name}`."]
    if command:
        lines += ["", "## Made with", "", "```", command, "```"]
    lines += ["", "Provenance: `pruning_metadata.json` (kept original expert ids per layer), `plan.json`, "
                  "`report.json`.", ""]
    return "\n".join(lines)


def write_model_card(out_dir: Path, report: dict, source_dir: Path, command: str | None) -> None:
    (Path(out_dir) / "README.md").write_text(model_card(report, source_dir, Path(out_dir).name, command),
                                             encoding="utf-8")

