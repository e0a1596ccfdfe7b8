"""Property-based tests (Hypothesis) for every reader of untrusted bytes.

The property: whatever the bytes, a reader returns a result or raises EmoError (one line). It never
raises anything else, never reads past a buffer (a crash would end the test process), and never
writes outside the temp area. Examples are derandomized, so every run tries the same inputs.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from emo_cli.arch.emo import EmoConfig
from emo_cli.data.documents import read_documents
from emo_cli.errors import EmoError
from emo_cli.model.tokenizer import EmoTokenizer

SETTINGS = settings(derandomize=True, deadline=None, max_examples=60, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
TINY_EMO = Path(__file__).resolve().parent.parent / "emo_cli" / "assets" / "tiny-emo"

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12)


def outcome(fn, *args, **kwargs):
    """Run a reader: its result, or the EmoError message (checked to be one line)."""
    try:
        return fn(*args, **kwargs)
    except EmoError as e:
        assert "\n" not in str(e) and str(e), repr(str(e))
        return e


def listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """A working directory for the reader; the test asserts nothing in it changes."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ---- data files -----------------------------------------------------------------------------------
@SETTINGS
@given(suffix=st.sampled_from([".jsonl", ".json", ".csv", ".txt"]), body=st.binary(max_size=300))
def test_data_files_of_any_bytes(sandbox, suffix, body):
    path = sandbox / f"d{suffix}"
    path.write_bytes(body)
    before = listing(sandbox)
    docs = outcome(read_documents, [path])
    assert isinstance(docs, EmoError) or all(isinstance(d.text, str) and d.text.strip() for d in docs)
    assert listing(sandbox) == before


@SETTINGS
@given(rows=st.lists(json_values, min_size=1, max_size=5))
def test_jsonl_rows_of_any_json(sandbox, rows):
    path = sandbox / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    docs = outcome(read_documents, [path], text_field="text")
    values = [r.get("text") for r in rows if isinstance(r, dict)]
    if any(v is not None and not isinstance(v, str) for v in values) or not all(isinstance(r, dict) for r in rows):
        assert isinstance(docs, EmoError)  # a number or a structure is never str()-ed into text
    elif not isinstance(docs, EmoError):
        assert [d.text for d in docs] == [v for v in values if v and v.strip()]


# ---- config.json / state.json / tokenizer_config.json ---------------------------------------------
@SETTINGS
@given(raw=json_values, base=st.booleans())
def test_config_of_any_json(raw, base):
    if base and isinstance(raw, dict):  # mutate a valid config rather than start from nothing
        good = json.loads((TINY_EMO / "config.json").read_text())
        raw = {**good, **raw}
    cfg = outcome(EmoConfig.from_dict, raw)
    if isinstance(cfg, EmoConfig):  # what was accepted is usable: per-layer lookups do not fail
        for i in range(cfg.num_hidden_layers):
            assert cfg.layer_shared(i) <= cfg.layer_experts(i)


@SETTINGS
@given(body=st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_state_json_of_any_bytes(sandbox, body):
    from emo_cli.workspace import read_state, resolve_default_model

    (sandbox / ".emo").mkdir(exist_ok=True)
    (sandbox / ".emo" / "state.json").write_bytes(body)
    state = outcome(read_state)
    if isinstance(state, dict):
        assert all(isinstance(v, str) for v in state.values())
        outcome(resolve_default_model, None)


@SETTINGS
@given(body=st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_tokenizer_config_of_any_bytes(tmp_path_factory, body):
    d = tmp_path_factory.mktemp("tok")
    (d / "tokenizer.json").write_bytes((TINY_EMO / "tokenizer.json").read_bytes())
    (d / "tokenizer_config.json").write_bytes(body)
    tok = outcome(EmoTokenizer.from_dir, d)
    assert isinstance(tok, (EmoTokenizer, EmoError))


# ---- safetensors headers -----------------------------------------------------------------------------
entries = st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "BF16", "F16", "I64", "X9"]) | json_values,
    "shape": st.lists(st.integers(-2, 2**40), max_size=3) | json_values,
    "data_offsets": st.lists(st.integers(-2, 2**40), min_size=2, max_size=2) | json_values,
})


@SETTINGS
@given(header=st.dictionaries(st.text(min_size=1, max_size=12), entries, max_size=3) | json_values,
       data=st.binary(max_size=64))
def test_safetensors_header_of_any_json(tmp_path_factory, header, data):
    from emo_cli.model.checkpoint import SafetensorsCheckpoint

    d = tmp_path_factory.mktemp("st")
    raw = json.dumps(header).encode()
    (d / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    ck = outcome(SafetensorsCheckpoint, d)
    if isinstance(ck, SafetensorsCheckpoint):
        for name in ck.names():  # every accepted entry can be viewed, within the file
            t = outcome(ck.view, name)
            assert isinstance(t, (torch.Tensor, EmoError))


@SETTINGS
@given(body=st.binary(max_size=120))
def test_safetensors_of_any_bytes(tmp_path_factory, body):
    from emo_cli.model.checkpoint import SafetensorsCheckpoint

    d = tmp_path_factory.mktemp("st")
    (d / "model.safetensors").write_bytes(body)
    assert isinstance(outcome(SafetensorsCheckpoint, d), (SafetensorsCheckpoint, EmoError))


# ---- profiles ------------------------------------------------------------------------------------------
def valid_profile_parts():
    L, W = 2, 4
    meta = {"model": {"path": "/m", "fingerprint": "abc", "expert_ids": [[0, 1, 2, 3], [0, 1, 2, 3]],
                      "fixed_ids": [[3], [3]], "routed_top_k": [1, 1], "top_k": 2},
            "data": {"sources": ["/d.jsonl"], "docs": 3, "tokens": 30, "hash": "h", "heldout_ids": [],
                     "text_field": None, "max_docs": None},
            "settings": {"seq_len": 16, "batch_size": 2, "max_tokens": None}}
    tensors = {k: torch.rand(L, W, dtype=torch.float64) for k in ("counts", "prob", "reap", "easyep")}
    tensors["tokens"] = torch.full((L,), 30.0, dtype=torch.float64)
    return meta, tensors


@SETTINGS
@given(section=st.sampled_from(["model", "data", "settings"]), key=st.text(max_size=12) | st.sampled_from(
    ["expert_ids", "fixed_ids", "top_k", "docs", "sources", "seq_len", "fingerprint", "heldout_ids"]),
    value=json_values, shape=st.lists(st.integers(0, 5), max_size=3), which=st.sampled_from(
    ["counts", "prob", "tokens", None]))
def test_profile_with_any_metadata_or_shape(tmp_path_factory, section, key, value, shape, which):
    from emo_cli.experts.usage_profile import Profile
    from emo_cli.experts.selection import score_plan, Budget

    meta, tensors = valid_profile_parts()
    meta[section][key] = value
    if which:
        tensors[which] = torch.rand(tuple(shape), dtype=torch.float64)
    path = tmp_path_factory.mktemp("p") / "x.profile.safetensors"
    save_file(tensors, str(path), metadata={"emo_profile": json.dumps(meta)})
    prof = outcome(Profile.load, path)
    if isinstance(prof, Profile):  # an accepted profile plans without errors of any other kind
        outcome(score_plan, [prof], "frequency", Budget.parse("50%"), "uniform", prof.meta.model.top_k)


# ---- GGUF ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory, tiny_model_factory):
    from emo_cli.gguf.export import export_gguf

    out = tmp_path_factory.mktemp("g") / "m.gguf"
    export_gguf(tiny_model_factory("shared"), out, "q8_0")
    from gguf import GGUFReader

    r = GGUFReader(out)
    table = (int(r.tensors[0].field.offset), int(r.data_offset))  # the tensor-info table's byte range
    return GGUFBytes(out.read_bytes(), table)


class GGUFBytes(tuple):
    """(file bytes, tensor-info byte range), with a short repr for Hypothesis' failure reports."""

    def __new__(cls, blob: bytes, table: tuple[int, int]):
        return super().__new__(cls, (blob, table))

    def __repr__(self) -> str:
        return f"<GGUF of {len(self[0])} bytes, tensor table {self[1]}>"


def open_any_gguf(path: Path):
    """gguf_info and the runtime on a file; one that opens also runs a forward step."""
    from emo_cli.info import gguf_info
    from emo_cli.gguf.runtime import load_gguf_model

    info = outcome(gguf_info, path)
    lm = outcome(load_gguf_model, path, backend="auto")
    if not isinstance(lm, EmoError):
        assert lm.model.forward(torch.tensor([[1, 2, 3]])).shape == (1, 3, lm.config.vocab_size)
    return info, lm


@settings(SETTINGS, max_examples=200)
@given(data=st.data())
def test_gguf_with_flipped_or_huge_header_values(tmp_path_factory, small_gguf, data):
    original, (table, data_start) = small_gguf
    blob = bytearray(original)
    header_end = min(len(blob), 24 + 4096)  # counts and the first metadata
    kind = data.draw(st.sampled_from(["flip", "count", "u64", "tensor_info", "truncate"]))
    if kind in ("flip", "tensor_info"):  # a few bytes of the metadata, or of tensor names/shapes/types/offsets
        lo, hi = (4, header_end) if kind == "flip" else (table, data_start)
        for _ in range(data.draw(st.integers(1, 4))):
            at = data.draw(st.integers(lo, hi - 1))
            blob[at] ^= data.draw(st.integers(1, 255))
    elif kind == "count":  # tensor count (offset 8) or metadata count (offset 16)
        at = data.draw(st.sampled_from([8, 16]))
        blob[at:at + 8] = struct.pack("<Q", data.draw(st.sampled_from([0, 1, 2**31, 2**60, 2**64 - 1])))
    elif kind == "u64":
        at = data.draw(st.integers(24, header_end - 8))
        blob[at:at + 8] = struct.pack("<Q", data.draw(st.sampled_from([2**32, 2**60, 2**64 - 1])))
    else:
        del blob[data.draw(st.integers(0, len(blob) - 1)):]
    assume(bytes(blob) != original)
    path = tmp_path_factory.mktemp("gg") / "x.gguf"
    path.write_bytes(bytes(blob))
    open_any_gguf(path)


def test_gguf_whose_expert_count_disagrees_with_its_tensors(tmp_path, small_gguf):
    from emo_cli.gguf.layout import K_EXPERTS, open_reader

    good = tmp_path / "ok.gguf"
    original, _ = small_gguf
    good.write_bytes(original)
    reader = open_reader(good)
    f = reader.get_field(K_EXPERTS)
    at = f.value_offset
    blob = bytearray(original)
    blob[at:at + 4] = struct.pack("<I", int(f.contents()) + 1)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(blob))
    _, lm = open_any_gguf(bad)
    assert isinstance(lm, EmoError) and "shape" in str(lm)


# ---- the tokenizer's bounded prefixes ---------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    return EmoTokenizer.from_dir(TINY_EMO)


@SETTINGS
@given(text=st.text(alphabet=st.sampled_from(list("ab xyz\n.,1234é€日")), max_size=3000) | st.text(max_size=3000),
       n=st.integers(1, 40))
def test_encode_prefixes_equal_full_encoding(tokenizer, text, n):
    (ids, whole), = tokenizer.encode_prefixes([text], n)
    full = tokenizer.encode(text)
    assert ids == full[:n]
    assert whole == (len(full) <= n)


def test_a_huge_document_is_encoded_only_as_far_as_kept(tokenizer):
    seen = []
    inner = tokenizer.tok

    class Counting:  # the tokenizers object, recording how many characters it was given
        def __getattr__(self, name):
            return getattr(inner, name)

        def encode(self, text, **kw):
            seen.append(len(text))
            return inner.encode(text, **kw)

        def encode_batch(self, texts, **kw):
            seen.extend(len(t) for t in texts)
            return inner.encode_batch(texts, **kw)

    doc = "The patient was given aspirin for acute pain. " * 400_000  # 18.8 MB
    tokenizer.tok = Counting()
    try:
        (ids, whole), = tokenizer.encode_prefixes([doc], 256)
    finally:
        tokenizer.tok = inner
    assert not whole and len(ids) == 256
    assert ids == inner.encode(doc[:20_000], add_special_tokens=False).ids[:256]
    assert sum(seen) < 64 * 256 + 4096, seen  # characters encoded, bounded by the tokens kept
