"""emo's GGUF reader (emo_cli/gguf/reader.py) reads what gguf-py's GGUFReader reads, and refuses
damaged files in one line.

gguf-py is the reference here: on files emo exports (f32, f16, bf16, q8_0, q4_0, a K-quant via
llama.cpp) both readers must give the same keys, value types and values, the same tensor table and
the same bytes, so every fingerprint stored in a profile stays valid."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader, GGUFValueType
from tiny_models import write_tiny_model

from emo_cli.info import gguf_info
from emo_cli.gguf import layout as gf
from emo_cli.errors import EmoError
from emo_cli.gguf.export import export_gguf
from emo_cli.gguf.reader import GGUFFile
from emo_cli.gguf.vocab import tokenizer_from_gguf

QUANTS = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m"]


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny_model_factory):
    """(quant, variant) -> an emo export; "dense_lead" without MLP biases (GGUF has none), "pruned"
    with pruning provenance (emo.* keys: strings, the kept ids as JSON)."""
    cache = {}

    def make(quant: str, variant: str = "shared") -> Path:
        if (quant, variant) not in cache:
            if quant.endswith("_k_m"):
                pytest.importorskip("llama_cpp")
            root = tmp_path_factory.mktemp(f"r-{variant}-{quant}")
            prov = None
            if variant == "dense_lead":
                src = write_tiny_model(root / "hf", variant, overrides={"dense_mlp_bias": False})
            elif variant == "pruned":
                src = tiny_model_factory("shared")
                prov = {"source_model": "acme/Emo-test", "experts_kept_per_layer": [list(range(8))] * 3,
                        "method": "frequency", "budget": "8", "profile_fingerprint": "0123456789abcdef"}
            else:
                src = tiny_model_factory(variant)
            cache[quant, variant] = Path(export_gguf(src, root / f"{variant}-{quant}.gguf", quant, prov)["output"])
        return cache[quant, variant]

    return make


@pytest.mark.parametrize("quant,variant", [(q, "shared") for q in QUANTS] + [("f16", "dense_lead"),
                                                                            ("q8_0", "pruned")])
def test_same_fields_and_tensors_as_gguf_py(exports, quant, variant):
    path = exports(quant, variant)
    ref, ours = GGUFReader(path), GGUFFile(path)
    assert list(ours.fields) == list(ref.fields)  # the GGUF.* header entries included, in file order
    for key, f in ref.fields.items():
        g = ours.get_field(key)
        assert g.types == f.types and g.name == key and g.offset == f.offset, key
        want, got = f.contents(), g.contents()
        assert got == want and type(got) is type(want), key
        if isinstance(want, list) and want:
            assert [type(v) for v in got] == [type(v) for v in want], key
            for part in (0, -1, len(want) - 1, slice(1, 4), slice(None, None, 3), slice(-2, None)):
                assert g.contents(part) == f.contents(part), (key, part)
    assert (ours.alignment, ours.data_offset) == (ref.alignment, ref.data_offset)
    assert len(ours.tensors) == len(ref.tensors)
    for t, r in zip(ours.tensors, ref.tensors):
        assert (t.name, t.tensor_type, t.shape, t.n_elements, t.n_bytes, t.data_offset, t.info_offset) == \
               (r.name, r.tensor_type, tuple(int(s) for s in r.shape), int(r.n_elements), int(r.n_bytes),
                int(r.data_offset), int(r.field.offset)), r.name
        assert t.data.dtype == r.data.dtype and t.data.shape == r.data.shape, r.name
        assert t.data.tobytes() == r.data.tobytes(), r.name
        assert np.shares_memory(t.data, ours.data)  # a view of the map, not a copy
    assert ours.data.nbytes == ref.data.nbytes == path.stat().st_size


@pytest.mark.parametrize("quant,variant", [("q8_0", "shared"), ("f16", "dense_lead"), ("q4_0", "plain"),
                                           ("q4_k_m", "gqa"), ("q8_0", "pruned")])
def test_fingerprint_and_info_unchanged(exports, quant, variant, monkeypatch):
    """Profiles store gguf_fingerprint: it must not move with the reader (nor must `emo info`)."""
    path = exports(quant, variant)
    ours = gf.open_reader(path)
    assert isinstance(ours, GGUFFile)
    assert gf.gguf_fingerprint(ours) == gf.gguf_fingerprint(GGUFReader(path))
    new_info = gguf_info(path)
    monkeypatch.setattr(gf, "open_reader", GGUFReader)
    assert gguf_info(path) == new_info


def test_tokenizer_is_the_same(exports):
    path = exports("q8_0")
    ours, ref = tokenizer_from_gguf(GGUFFile(path), path), tokenizer_from_gguf(GGUFReader(path), path)
    text = "The patient was given a dose of aspirin. def return 42! <|endoftext|>"
    assert ours.encode(text) == ref.encode(text) and ours.tok.get_vocab() == ref.tok.get_vocab()
    assert (ours.eos_id, ours.pad_id) == (ref.eos_id, ref.pad_id)


def test_numeric_arrays_are_views(exports):
    f = GGUFFile(exports("q8_0")).get_field("tokenizer.ggml.token_type")
    arr = f.array()
    assert arr.dtype == np.int32 and not arr.flags.writeable and arr.tolist() == f.contents()
    with pytest.raises(TypeError):
        GGUFFile(exports("q8_0")).get_field("tokenizer.ggml.tokens").array()


# ---- damaged files -------------------------------------------------------------------------------------
def gguf_bytes(kvs=(), tensors=(), version=3, counts=None) -> bytes:
    """A little-endian GGUF: kvs as (key, type, raw value bytes), tensors as (name, ne, type, offset)."""
    def s(x: bytes) -> bytes:
        return struct.pack("<Q", len(x)) + x

    out = b"GGUF" + struct.pack("<IQQ", version, *(counts or (len(tensors), len(kvs))))
    for k, vtype, raw in kvs:
        out += s(k.encode() if isinstance(k, str) else k) + struct.pack("<I", vtype) + raw
    for name, ne, qtype, offset in tensors:
        out += s(name.encode()) + struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, qtype, offset)
    out += b"\0" * (-len(out) % 32)
    return out + b"\0" * 256  # room for small tensors


def u32(v: int) -> tuple:
    return GGUFValueType.UINT32, struct.pack("<I", v)


def strings(*items: bytes, count=None) -> tuple:
    raw = struct.pack("<IQ", GGUFValueType.STRING, len(items) if count is None else count)
    return GGUFValueType.ARRAY, raw + b"".join(struct.pack("<Q", len(x)) + x for x in items)


F32_VEC = ("v", [16], QT.F32, 0)


@pytest.mark.parametrize("blob,needle", [
    (b"", "empty"),
    (b"GGUX" + bytes(40), "magic"),
    (b"GGUF", "past the end"),
    (gguf_bytes(version=1), "version 1"),
    (gguf_bytes(version=3 << 24), "big-endian"),
    (gguf_bytes(counts=(0, 2**60)), "metadata count"),
    (gguf_bytes(counts=(0, 2**64 - 1)), "metadata count"),
    (gguf_bytes(counts=(2**60, 0)), "tensor count"),
    (gguf_bytes(counts=(2**31, 0)), "tensor count"),
    (gguf_bytes([("a", *u32(1)), ("a", *u32(2))]), "twice"),
    (gguf_bytes([(b"\xff\xfe", *u32(1))]), "UTF-8"),
    (gguf_bytes([("a", 99, b"")]), "unknown value type 99"),
    (gguf_bytes([("a", GGUFValueType.STRING, struct.pack("<Q", 2**64 - 1))]), "past the end"),
    (gguf_bytes([("a", *strings(b"x", count=2**60))]), "more than the file can hold"),
    (gguf_bytes([("a", GGUFValueType.ARRAY, struct.pack("<IQQ", GGUFValueType.STRING, 1, 2**63))]), "past the end"),
    (gguf_bytes([("a", GGUFValueType.ARRAY, struct.pack("<IQ", GGUFValueType.UINT64, 2**61))]), "past the end"),
    (gguf_bytes([("a", GGUFValueType.ARRAY, struct.pack("<IQ", GGUFValueType.ARRAY, 1))]), "array of arrays"),
    (gguf_bytes([("general.alignment", *u32(0))]), "alignment"),
    (gguf_bytes([("general.alignment", *u32(48))]), "alignment"),
    (gguf_bytes([("general.alignment", GGUFValueType.UINT64, struct.pack("<Q", 32))]), "alignment"),
    (gguf_bytes(tensors=[F32_VEC, F32_VEC]), "appears twice"),
    (gguf_bytes(tensors=[("v", [16], 250, 0)]), "unknown type 250"),
    (gguf_bytes(tensors=[("v", [1] * 5, QT.F32, 0)]), "5 dimensions"),
    (gguf_bytes(tensors=[("v", [2**32] * 4, QT.F32, 0)]), "impossible shape"),
    (gguf_bytes(tensors=[("v", [0, 2**63, 2**63], QT.F32, 0)]), "impossible shape"),
    (gguf_bytes(tensors=[("v", [48], QT.Q8_0, 0)]), "blocks"),
    (gguf_bytes(tensors=[("v", [], QT.Q8_0, 0)]), "blocks"),
    (gguf_bytes(tensors=[("v", [16], QT.F32, 2**64 - 1)]), "outside the file"),
    (gguf_bytes(tensors=[("v", [4096], QT.F32, 0)]), "outside the file"),
])
def test_damaged_files_are_one_line(tmp_path, blob, needle):
    path = tmp_path / "x.gguf"
    path.write_bytes(blob)
    with pytest.raises(EmoError, match="not a valid GGUF") as e:
        gf.open_reader(path)
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_every_truncation_of_a_real_file_is_one_line(exports, tmp_path):
    src = exports("q4_0")
    blob, path = src.read_bytes(), tmp_path / "x.gguf"
    end = max(t.data_offset + t.n_bytes for t in GGUFFile(src).tensors)  # any padding after it is not needed
    cuts = sorted({*range(0, 600, 7), *range(600, end, max(1, end // 300)), end - 1})
    for cut in cuts:
        path.write_bytes(blob[:cut])
        with pytest.raises(EmoError, match="not a valid GGUF"):
            gf.open_reader(path)


def test_paths_that_are_not_files(tmp_path):
    with pytest.raises(EmoError, match="no such file"):
        gf.open_reader(tmp_path / "missing.gguf")
    with pytest.raises(EmoError, match="a directory"):
        gf.open_reader(tmp_path)


def test_values_are_decoded_only_when_asked(tmp_path):
    """A bad string opens (gguf-py's reader also decodes values lazily); reading it is the error."""
    path = tmp_path / "x.gguf"
    path.write_bytes(gguf_bytes([("t", *strings(b"ok", b"\xff")), ("s", GGUFValueType.STRING,
                                                                    struct.pack("<Q", 1) + b"\xfe")],
                                [F32_VEC]))
    r = gf.open_reader(path)
    assert r.get_field("t").contents(0) == "ok" and r.tensors[0].data.shape == (16,)
    for key in ("t", "s"):
        with pytest.raises(EmoError, match=f"GGUF key {key} is unreadable"):
            gf.field(r, key)


def test_empty_and_tiny_values(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(gguf_bytes([("e", *strings()), ("b", GGUFValueType.BOOL, b"\x02"),
                                 ("f", GGUFValueType.FLOAT32, struct.pack("<f", 1e-6)),
                                 ("i", GGUFValueType.ARRAY, struct.pack("<IQ3q", GGUFValueType.INT64, 3, -1, 0, 2**62)),
                                 ("z", GGUFValueType.STRING, struct.pack("<Q", 0))],
                                [("v", [32, 2], QT.Q8_0, 0), ("s", [], QT.F32, 128)]))
    r, ref = gf.open_reader(path), GGUFReader(path)
    for key in ("e", "b", "f", "i", "z"):
        assert r.get_field(key).contents() == ref.get_field(key).contents(), key
    assert r.get_field("e").types == [GGUFValueType.ARRAY, GGUFValueType.STRING]  # gguf-py: [ARRAY]
    assert r.tensors[0].data.shape == (2, 34) and r.tensors[1].n_elements == 1
