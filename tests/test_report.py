"""`emo report`: its numbers equal a direct computation from the profile tensors, the HTML is
self-contained and holds every figure, and bad inputs give one line and leave no file behind."""

import base64
import itertools
import json
import math
import struct
import sys
from html.parser import HTMLParser

import numpy as np
import pytest

from emo_cli.cli import app as cli
from emo_cli.errors import EmoError
from emo_cli.experts.pipeline import run_profile
from emo_cli.experts.usage_profile import Profile
from emo_cli.experts.usage_report import build_report, expected_figures, summary, write_html
from emo_cli.runtime import load_model
from tiny_models import sample_texts, write_jsonl


@pytest.fixture(scope="module")
def profiles(tiny_model_factory, med_data, tmp_path_factory):
    """Two domains on three layouts (shared expert; always-active; dense first layer with 8 then 6
    experts), plus one profile of another model. Returns {name: path}."""
    d = tmp_path_factory.mktemp("report")
    code = write_jsonl(d / "code.jsonl", sample_texts(24, seed=11))
    out = {}
    for variant, seed in (("shared", 0), ("always_active", 0), ("per_layer", 0), ("shared", 1)):
        lm = load_model(tiny_model_factory(variant, seed))
        for dom, data in (("med", med_data), ("code", code)):
            if seed == 1 and dom == "code":
                continue
            name = f"{dom}-{variant}-{seed}"
            run_profile(lm, [str(data)], seq_len=64, batch_size=4, quiet=True).save(
                d / f"{name}.profile.safetensors")
            out[name] = d / f"{name}.profile.safetensors"
    return out


# ---- the independent computation: straight from the tensors and the metadata ---------------------
def direct(path, budget_frac):
    p = Profile.load(path)
    prob, counts = p.prob.numpy(), p.counts.numpy()
    model = p.meta.to_json()["model"]  # as written in the file
    res = {}
    for layer, ids in enumerate(model["expert_ids"]):
        if not ids:
            continue
        fixed = model["fixed_ids"][layer] or []
        routed = [e for e in ids if e not in fixed]
        total = sum(prob[layer, e] for e in routed)
        usage = {e: prob[layer, e] / total for e in routed}
        desc = sorted((prob[layer, e] for e in routed), reverse=True)
        curve = [0.0] + [sum(desc[:k]) / total for k in range(1, len(desc) + 1)]
        cover = {s: next(k for k in range(1, len(desc) + 1) if sum(desc[:k]) >= s * total) for s in (0.5, 0.9)}
        # the budget counts shared experts and never goes below top-k; frequency ranks by count, then mass, then id
        n, k = len(ids), min(model["top_k"], len(ids))
        keep = min(n, max(k, math.ceil(budget_frac * n)))
        ranked = sorted(routed, key=lambda e: (-counts[layer, e], -prob[layer, e], e))
        res[layer] = {"usage": usage, "curve": curve, "cover": cover, "kept": sorted(ranked[: keep - len(fixed)]),
                      "routed": len(routed)}
    return res


def direct_jaccard(a, b):
    return len(set(a) & set(b)) / len(set(a) | set(b))


def enumerated_chance(n, k):
    """Mean Jaccard over every pair of k-subsets of n experts."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(direct_jaccard(a, b) for a in subsets for b in subsets) / len(subsets) ** 2


@pytest.mark.parametrize("variant", ["shared", "always_active", "per_layer"])
@pytest.mark.parametrize("budget", ["25%", "50%"])
def test_numbers_equal_direct_computation(profiles, variant, budget):
    paths = [profiles[f"med-{variant}-0"], profiles[f"code-{variant}-0"]]
    rep = build_report([Profile.load(p) for p in paths], paths, budget=budget)
    s = summary(rep)
    want = [direct(p, float(budget[:-1]) / 100) for p in paths]
    assert [st.name for st in rep.profiles] == [f"med-{variant}-0", f"code-{variant}-0"]
    for st, js, w in zip(rep.profiles, s["profiles"], want):
        assert st.layers == sorted(w) == [entry["layer"] for entry in js["layers"]]
        for row, layer in enumerate(st.layers):
            wl, jl = w[layer], js["layers"][row]
            assert set(np.flatnonzero(~np.isnan(st.usage[row]))) == set(wl["usage"])
            for e, share in wl["usage"].items():
                assert st.usage[row, e] == pytest.approx(share, rel=1e-12, abs=1e-15)
                assert jl["usage"][str(e)] == pytest.approx(share, rel=1e-12, abs=1e-15)
            assert np.allclose(st.curves[layer], wl["curve"], rtol=0, atol=1e-12)
            assert np.allclose(jl["coverage"], wl["curve"], rtol=0, atol=1e-12)
            assert (jl["cover50"], jl["cover90"]) == (wl["cover"][0.5], wl["cover"][0.9])
            assert st.kept[layer] == jl["kept"] == wl["kept"]
            assert jl["routed"] == wl["routed"]
        assert js["mean_cover50"] == pytest.approx(np.mean([w[layer]["cover"][0.5] for layer in w]))
        assert js["mean_cover90"] == pytest.approx(np.mean([w[layer]["cover"][0.9] for layer in w]))
        prof = Profile.load(st.path)
        assert (js["docs"], js["tokens"]) == (prof.docs, prof.meta.data.tokens)
    (pair,) = s["pairs"]
    per_layer = {str(layer): direct_jaccard(want[0][layer]["kept"], want[1][layer]["kept"]) for layer in want[0]}
    assert pair["jaccard"] == pytest.approx(per_layer)
    assert pair["mean_jaccard"] == pytest.approx(np.mean(list(per_layer.values())))
    for layer, w in want[0].items():
        assert s["chance_jaccard"][str(layer)] == pytest.approx(enumerated_chance(w["routed"], len(w["kept"])))


def test_usage_rows_sum_to_one_and_curves_rise(profiles):
    rep = build_report([Profile.load(profiles["med-per_layer-0"])], [profiles["med-per_layer-0"]])
    st = rep.profiles[0]
    assert st.layers == [1, 2]  # the dense first layer has no experts to report
    assert np.allclose(np.nansum(st.usage, axis=1), 1.0)
    for c in st.curves.values():
        assert c[0] == 0.0 and c[-1] == pytest.approx(1.0) and np.all(np.diff(c) >= 0)
    assert rep.jaccard == {}


# ---- the HTML file ----------------------------------------------------------------------------------
class Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.figures, self.style = [], [], ""
        self._in_style = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "figure":
            self.figures.append({"kind": a.get("data-figure"), "profile": a.get("data-profile"), "imgs": []})
        if tag == "img":
            self.figures[-1]["imgs"].append(a["src"])
        self._in_style = tag == "style"

    def handle_endtag(self, tag):
        self._in_style = False

    def handle_data(self, data):
        if self._in_style:
            self.style += data


def png_size(uri):
    head = "data:image/png;base64,"
    assert uri.startswith(head)
    raw = base64.b64decode(uri[len(head):], validate=True)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n" and raw[12:16] == b"IHDR"
    return struct.unpack(">II", raw[16:24])


def check_self_contained(text, names):
    page = Page()
    page.feed(text)
    for tag, attrs in page.tags:
        assert tag not in ("script", "link", "iframe", "object", "embed"), tag
        for key in ("src", "href", "srcset", "data", "poster", "action"):
            v = (attrs.get(key) or "").strip().lower()
            assert not v.startswith(("http:", "https:", "//", "file:", "ftp:")), (tag, key, v)
            if tag == "img" and key == "src":
                assert v.startswith("data:image/png;base64,")
    assert "url(" not in page.style and "@import" not in page.style
    kinds = [f["kind"] for f in page.figures]
    assert len(page.figures) == expected_figures(len(names))
    assert kinds.count("heatmap") == kinds.count("coverage") == len(names)
    assert kinds.count("jaccard-layers") == kinds.count("jaccard-matrix") == (1 if len(names) > 1 else 0)
    for kind in ("heatmap", "coverage"):
        assert [f["profile"] for f in page.figures if f["kind"] == kind] == names
    for f in page.figures:
        (img,) = f["imgs"]
        w, h = png_size(img)
        assert w > 200 and h > 150
    return page


def run(argv, capsys, monkeypatch, cwd):
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["emo", *map(str, argv)])
    code = 0
    try:
        cli.main()
    except SystemExit as e:
        code = e.code or 0
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_writes_self_contained_html_and_json(profiles, tmp_path, capsys, monkeypatch):
    paths = [profiles["med-shared-0"], profiles["code-shared-0"]]
    code, out, err = run(["report", *paths, "-o", "r.html", "--budget", "50%", "--json"], capsys, monkeypatch, tmp_path)
    assert code == 0, err
    s = json.loads(out)
    assert s["output"] == "r.html" and s["budget"] == "50%" and s["method"] == "frequency"
    want = [direct(p, 0.5) for p in paths]
    assert [[entry["kept"] for entry in p["layers"]] for p in s["profiles"]] == [
        [w[layer]["kept"] for layer in sorted(w)] for w in want]
    check_self_contained((tmp_path / "r.html").read_text(encoding="utf-8"), ["med-shared-0", "code-shared-0"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.html"]  # no temporary file left
    # the terminal summary names both profiles and the pair
    code, out, err = run(["report", *paths, "-o", "r.html", "--force"], capsys, monkeypatch, tmp_path)
    assert code == 0, err
    assert "med-shared-0" in out and "code-shared-0" in out and "Jaccard" in out and "wrote r.html" in out


def test_single_profile_has_no_overlap_figures(profiles, tmp_path, capsys, monkeypatch):
    code, out, err = run(["report", profiles["med-per_layer-0"], "--json"], capsys, monkeypatch, tmp_path)
    assert code == 0, err
    assert json.loads(out)["pairs"] == []
    page = check_self_contained((tmp_path / "report.html").read_text(encoding="utf-8"), ["med-per_layer-0"])
    assert len(page.figures) == 2


def assert_one_line_error(code, err, needle):
    assert code == 1, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err, err
    assert needle in err, err


@pytest.mark.parametrize("case", ["missing", "other_model", "not_a_profile", "bad_budget", "bad_method", "no_dir"])
def test_bad_inputs_one_line_no_file(profiles, tmp_path, capsys, monkeypatch, case):
    med = profiles["med-shared-0"]
    junk = write_jsonl(tmp_path / "junk.jsonl", ["not a profile"])
    argv, needle = {
        "missing": ([med, tmp_path / "nope.profile.safetensors"], "no such profile"),
        "other_model": ([med, profiles["med-shared-1"]], "different models"),
        "not_a_profile": ([med, junk], "cannot read profile"),
        "bad_budget": ([med, "--budget", "0%"], "budget 0%"),
        "bad_method": ([med, "--method", "router"], "--method"),
        "no_dir": ([med, "-o", tmp_path / "missing" / "r.html"], "no such directory"),
    }[case]
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = run(["report", *argv], capsys, monkeypatch, tmp_path)
    assert_one_line_error(code, err, needle)
    assert out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no temporary file


def test_existing_report_needs_force_and_survives_failures(profiles, tmp_path, capsys, monkeypatch):
    target = tmp_path / "report.html"
    target.write_text("mine")
    code, _, err = run(["report", profiles["med-shared-0"]], capsys, monkeypatch, tmp_path)
    assert_one_line_error(code, err, "--force")
    # --force with bad input: the old file is untouched
    code, _, err = run(["report", profiles["med-shared-0"], profiles["med-shared-1"], "--force"], capsys,
                       monkeypatch, tmp_path)
    assert_one_line_error(code, err, "different models")
    assert target.read_text() == "mine"


def test_write_failure_leaves_no_partial_file(tmp_path, monkeypatch):
    import emo_cli.outputs as outputs

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(outputs.os, "replace", full_disk)
    with pytest.raises(EmoError, match="No space left"):
        write_html(tmp_path / "r.html", "<html>" + "x" * 100_000)
    assert list(tmp_path.iterdir()) == []
