import json
import re

import pytest

from emo_cli.lab.corpus import (MIN_DOC_CHARS, CorpusSpec, build_corpus, debian_root, domain_files, pack,
                            read_manifest, read_texts, split_domain, worksheet_docs)
from emo_cli.errors import EmoError
from tiny_corpus import SMALL, small_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return small_corpus(tmp_path_factory.mktemp("shared"))


def test_files_documents_and_split(corpus):
    manifest = read_manifest(corpus)
    for d in SMALL["domains"]:
        train_path, held_path = domain_files(corpus, d)
        for line in train_path.read_text().splitlines():
            assert set(json.loads(line)) == {"text"}
        train, held = read_texts(train_path), read_texts(held_path)
        assert train and held and not set(train) & set(held)
        assert len(held) <= SMALL["max_heldout_docs"]
        assert sum(map(len, train)) >= SMALL["max_chars_per_domain"]  # the cap stops after crossing it
        assert sum(map(len, train)) - max(map(len, train)) < SMALL["max_chars_per_domain"]
        for t in train + held:
            assert MIN_DOC_CHARS <= len(t) <= SMALL["max_chars"] + SMALL["min_chars"]
        entry = manifest["domains"][d]
        assert entry["train_docs"] == len(train) and entry["heldout_docs"] == len(held)


def test_build_is_deterministic_and_reused(corpus, tmp_path):
    again = tmp_path / "again"
    build_corpus(again, CorpusSpec(**SMALL))
    for d in SMALL["domains"]:
        for a, b in zip(domain_files(corpus, d), domain_files(again, d)):
            assert a.read_bytes() == b.read_bytes()
    stamp = {p.name: p.stat().st_mtime_ns for p in again.iterdir()}
    build_corpus(again, CorpusSpec(**SMALL))  # same settings: nothing rewritten
    assert stamp == {p.name: p.stat().st_mtime_ns for p in again.iterdir()}


def test_larger_cap_only_adds_documents():
    texts = [f"document {i} " + "x" * (300 + 37 * (i % 11)) for i in range(400)]
    small = CorpusSpec(max_chars_per_domain=20_000, max_chars=1000, min_chars=200)
    big = CorpusSpec(max_chars_per_domain=60_000, max_chars=1000, min_chars=200)
    tr_s, held_s = split_domain(texts, small)
    tr_b, held_b = split_domain(texts, big)
    assert set(tr_s) < set(tr_b) and held_s == held_b


def test_pack_keeps_text_and_bounds():
    pieces = [f"piece {i} " + "y" * (50 * (i % 7)) for i in range(60)] + ["z" * 2500]
    docs = pack(pieces, min_chars=300, max_chars=1000, header="H\n", sep="\n")
    assert all(d.startswith("H\n") for d in docs)
    assert all(len(d) <= 1000 + 300 for d in docs)
    squash = lambda s: "".join(s.split())  # noqa: E731 (documents are stripped at their ends)
    assert squash("".join(d[2:] for d in docs)) == squash("".join(pieces))


def test_bad_specs_and_missing_debian(tmp_path, monkeypatch):
    with pytest.raises(EmoError, match="unknown domain"):
        build_corpus(tmp_path, CorpusSpec(domains=("code", "poetry")))
    with pytest.raises(EmoError, match="heldout_frac"):
        build_corpus(tmp_path, CorpusSpec(heldout_frac=0.9))
    monkeypatch.setenv("EMO_CACHE", str(tmp_path / "empty-cache"))
    from emo_cli.lab import corpus as c

    if not c.Path(c.SETMM).exists():
        with pytest.raises(EmoError, match="metamath-databases"):
            debian_root("math", c.SETMM, fetch=False)


def test_generated_math_is_correct_and_deterministic():
    a = worksheet_docs(3, 20_000, 300, 1500)
    assert a == worksheet_docs(3, 20_000, 300, 1500) and a != worksheet_docs(4, 20_000, 300, 1500)
    text = "\n".join(a)
    checked = 0
    for m in re.finditer(r"Solve (-?\d+)x(?: ([+-]) (\d+))? = (-?\d+)\.\nSolution\..*?: x = (-?\d+)\. Check", text):
        a_, sign, b, c, x = m.groups()
        b = int(b or 0) * (-1 if sign == "-" else 1)
        assert int(a_) * int(x) + b == int(c)
        checked += 1
    for m in re.finditer(r"Compute (\d+) ([+-]) (\d+)\.\nSolution\. .* = (\d+)\.", text):
        a_, op, b, r = m.groups()
        assert (int(a_) + int(b) if op == "+" else int(a_) - int(b)) == int(r)
        checked += 1
    assert checked > 10
