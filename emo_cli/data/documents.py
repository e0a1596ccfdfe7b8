"""Documents from user data through `datasets`, token batches, and the deterministic held-out split.

Accepted DATA: .jsonl / .json / .parquet / .csv / .txt files, directories of them, and datasets
saved with `Dataset.save_to_disk`. A .txt file holds one document per blank-line-separated block.
The text field is `--text-field`, else the first of `text`, `content`, or chat `messages`
(joined as "role: content" lines).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from emo_cli.data.mc_items import MCItem, is_mc_table, mc_item, with_shots
from emo_cli.errors import EmoError

SUFFIX_BUILDER = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}
TEXT_FIELDS = ("text", "content", "messages")


@dataclass
class Document:
    text: str
    source: str  # file it came from
    index: int  # position in the whole input (the id recorded in profiles)
    item: MCItem | None = None  # a multiple-choice row: text is its prompt plus the gold answer
    messages: list[dict] | None = None  # a chat row: text is its turns as "role: content" lines

    @property
    def split_key(self) -> str:
        """What the held-out split hashes: the item's question, so --shots never moves an item."""
        return self.item.question if self.item is not None else self.text


def _quiet_datasets():
    import datasets

    datasets.disable_progress_bars()
    # its parsers log each failure before raising; emo reports the failure itself, in one line
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    logging.getLogger("datasets").setLevel(logging.CRITICAL)
    return datasets


def data_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIX_BUILDER)
        if not files:
            raise EmoError(f"{path}: directory holds no .jsonl/.json/.parquet/.csv/.txt files")
        return files
    if not path.exists():
        raise EmoError(f"{path}: no such data file")
    if path.suffix not in SUFFIX_BUILDER:
        raise EmoError(f"{path}: unsupported data format (use .jsonl, .json, .parquet, .csv or .txt)")
    return [path]


def _check_utf8(path: Path) -> None:
    """Text formats must be UTF-8: name the first line that is not (the parsers' errors do not)."""
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise EmoError(f"{path}:{n}: not UTF-8 text (byte {line[e.start]:#04x}); "
                               f"binary data, or another encoding?") from None


def _check_jsonl(path: Path) -> None:
    """Every line must be a JSON object. We check it ourselves: the datasets error does not name the
    line, and pyarrow's JSON reader under it crashes the process on some valid JSON (a `null` line)."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise EmoError(f"{path}:{n}: malformed JSON line ({e.msg})") from None
                if not isinstance(row, dict):
                    raise EmoError(f"{path}:{n}: a JSON {type(row).__name__}, not an object with a text field")


def _check_json(path: Path) -> None:
    """A .json file is a list of objects (or JSON Lines under another name), checked as _check_jsonl."""
    with open(path, encoding="utf-8") as f:
        try:
            rows = json.load(f)
        except json.JSONDecodeError:
            rows = None
    if rows is None:
        _check_jsonl(path)
    elif not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise EmoError(f"{path}: not a list of JSON objects (nor JSON Lines)")


def _row_text(row: dict, field: str, where: str) -> str:
    value = row.get(field)
    if field == "messages" and isinstance(value, list):
        return "\n".join(f"{m.get('role') or ''}: {m.get('content') or ''}" for m in value if isinstance(m, dict))
    if value is None:
        return ""
    if not isinstance(value, str):  # a number or a structure is not text: say so, never str() it
        raise EmoError(f"{where}: field {field!r} holds {type(value).__name__} {str(value)[:40]!r}, not text "
                       f"(pass --text-field to pick another field)")
    return value


def _pick_field(columns: list[str], text_field: str | None, source: str) -> str:
    if text_field:
        if text_field not in columns:
            raise EmoError(f"{source}: no field {text_field!r} (fields: {', '.join(map(repr, columns))})")
        return text_field
    for f in TEXT_FIELDS:
        if f in columns:
            return f
    raise EmoError(f"{source}: no text field found (looked for {', '.join(TEXT_FIELDS)}; "
                   f"fields: {', '.join(map(repr, columns))}); pass --text-field")


def load_table(path: Path):
    datasets = _quiet_datasets()
    builder = SUFFIX_BUILDER[path.suffix]
    if path.stat().st_size == 0:
        raise EmoError(f"{path}: empty file")
    if builder != "parquet":
        _check_utf8(path)
    if path.suffix == ".jsonl":
        _check_jsonl(path)
    elif path.suffix == ".json":
        _check_json(path)
    kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
    except Exception as e:  # datasets wraps parser errors in many types; report one line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EmoError(f"{path}: cannot read as {path.suffix[1:]} ({msg})") from None


def read_documents(inputs: list[str | Path], text_field: str | None = None,
                   max_docs: int | None = None, shots: int = 0) -> list[Document]:
    """All documents of all inputs, in order; empty texts are skipped (they have nothing to score).
    Multiple-choice rows (question, choices, answer; no text field) become EMO's selection text:
    `shots` solved items of the same file, the question and its gold answer."""
    docs: list[Document] = []
    mc_seen = False
    for inp in inputs:
        path = Path(inp)
        if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "state.json").exists()):
            datasets = _quiet_datasets()
            tables = [(str(path), datasets.load_from_disk(str(path)))]
        else:
            tables = [(str(f), load_table(f)) for f in data_files(path)]
        for source, table in tables:
            if hasattr(table, "keys") and not hasattr(table, "column_names"):
                raise EmoError(f"{source}: a DatasetDict; pass one split's directory")
            if text_field is None and is_mc_table(table.column_names) and not set(TEXT_FIELDS) & set(table.column_names):
                mc_seen = True
                items = with_shots([mc_item(row, f"{source}: row {n}") for n, row in enumerate(table, 1)], shots)
                for it in items:
                    docs.append(Document(it.solved, source, len(docs), it))
                    if max_docs is not None and len(docs) >= max_docs:
                        return docs
                continue
            field = _pick_field(table.column_names, text_field, source)
            for n, row in enumerate(table, 1):
                text = _row_text(row, field, f"{source}: row {n}")
                if text.strip():
                    turns = row[field] if field == "messages" and isinstance(row[field], list) else None
                    docs.append(Document(text, source, len(docs), messages=turns))
                    if max_docs is not None and len(docs) >= max_docs:
                        return docs
    if not docs:
        raise EmoError(f"{', '.join(map(str, inputs))}: no non-empty documents")
    if shots and not mc_seen:
        raise EmoError("--shots applies to multiple-choice rows (question, choices, answer); this data has none")
    return docs


def data_hash(docs: list[Document]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(hashlib.sha256(d.text.encode()).digest())
    return h.hexdigest()[:16]


def heldout_split(docs: list[Document], frac: float, salt: str = "") -> tuple[list[Document], list[Document]]:
    """(kept, held out): a document is held out when the hash of `salt` + its text falls below
    `frac`, so the split is deterministic and independent of order and of --max-docs. Different
    salts give independent splits (profiling's must not follow the corpus builder's)."""
    if not 0.0 <= frac < 1.0:
        raise EmoError(f"--heldout-frac must be in [0, 1), got {frac}")
    keep, held = [], []
    for d in docs:
        u = int.from_bytes(hashlib.sha256((salt + d.split_key).encode()).digest()[:8], "big") / 2**64
        (held if u < frac else keep).append(d)
    if frac > 0 and not held and len(docs) > 1:
        held, keep = keep[-1:], keep[:-1]  # small inputs: still hold one out
    if not keep:
        keep, held = held[:1], held[1:]
    return keep, held


@dataclass
class TokenBatch:
    ids: torch.Tensor  # [B, S] right-padded
    mask: torch.Tensor  # [B, S] bool, True on real tokens
    doc_index: list[int]  # Document.index per row


def tokenize_documents(tokenizer, docs: list[Document], seq_len: int) -> list[list[int]]:
    if seq_len < 2:
        raise EmoError("--seq-len must be at least 2")
    return [ids for ids, _ in tokenizer.encode_prefixes([d.text for d in docs], seq_len)]


def make_batches(token_lists: list[list[int]], docs: list[Document], batch_size: int, pad_id: int,
                 max_tokens: int | None = None) -> list[TokenBatch]:
    """Right-padded batches of similar lengths (sorted, so little padding); empty documents dropped."""
    if batch_size < 1:
        raise EmoError("--batch-size must be at least 1")
    order = sorted((i for i, t in enumerate(token_lists) if t), key=lambda i: (-len(token_lists[i]), i))
    if max_tokens is not None:
        kept, total = [], 0
        for i in sorted(order):
            if total >= max_tokens:
                break
            kept.append(i)
            total += len(token_lists[i])
        keep = set(kept)
        order = [i for i in order if i in keep]
    batches = []
    for s in range(0, len(order), batch_size):
        rows = order[s:s + batch_size]
        S = max(len(token_lists[i]) for i in rows)
        ids = torch.full((len(rows), S), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), S), dtype=torch.bool)
        for r, i in enumerate(rows):
            t = token_lists[i]
            ids[r, :len(t)] = torch.tensor(t, dtype=torch.long)
            mask[r, :len(t)] = True
        batches.append(TokenBatch(ids, mask, [docs[i].index for i in rows]))
    return batches
