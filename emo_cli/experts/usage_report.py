"""`emo report`: what several domains' profiles say about expert usage, as numbers and one HTML file.

Every number comes from the routed experts' probability mass (Profile.prob), by ORIGINAL expert id.
Shared and always-active experts are left out: every token uses them and pruning always keeps them,
so they say nothing about a domain.
  usage     [L, E] share of each MoE layer's routed mass per expert (NaN: not a routed id there)
  curves    per layer, the share of that mass carried by the k heaviest routed experts, k = 0..n
  kept      per layer, the routed experts `emo prune --method M --budget B` keeps for the domain
  jaccard   per pair of profiles and layer, |A & B| / |A | B| of the kept routed sets
The HTML embeds every figure as a base64 PNG (matplotlib, Agg) and fetches nothing.
"""

from __future__ import annotations

import base64
import html
import io
import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from emo_cli import __version__
from emo_cli.errors import EmoError
from emo_cli.experts.methods import DEFAULT_METHOD, report_method_named
from emo_cli.experts.selection import Budget, score_plan
from emo_cli.experts.usage_profile import Profile, coverage
from emo_cli.outputs import check_location, write_atomic

SHARES = (0.5, 0.9)
DPI = 110


@dataclass
class ProfileStats:
    name: str
    path: str
    docs: int
    tokens: int
    sources: list[str]
    layers: list[int]  # MoE layers, in order
    usage: np.ndarray  # [len(layers), E] share of the layer's routed mass
    curves: dict[int, np.ndarray]  # layer -> [n + 1]
    cover: dict[float, dict[int, int]]  # share -> layer -> routed experts carrying it
    kept: dict[int, list[int]]  # layer -> kept routed ids

    def mean_cover(self, share: float) -> float:
        vals = list(self.cover[share].values())
        return sum(vals) / len(vals) if vals else 0.0


@dataclass
class Report:
    profiles: list[ProfileStats]
    budget: str
    method: str
    model: dict  # fingerprint, path
    jaccard: dict[tuple[int, int], dict[int, float]]  # (i, j) profile indices -> layer -> J
    chance: dict[int, float]  # layer -> expected J of two random kept sets of the same sizes

    def mean_jaccard(self, pair: tuple[int, int]) -> float:
        vals = list(self.jaccard[pair].values())
        return sum(vals) / len(vals) if vals else 0.0


# ---- numbers --------------------------------------------------------------------------------------
def usage_matrix(profile: Profile) -> tuple[list[int], np.ndarray]:
    """MoE layers and their [layers, E] share of routed probability mass per original expert id."""
    layers = profile.moe_layers()
    usage = np.full((len(layers), profile.prob.shape[1]), np.nan)
    for row, layer in enumerate(layers):
        ids = profile.routed_ids(layer)
        mass = profile.prob[layer, ids].numpy()
        total = mass.sum()
        usage[row, ids] = mass / total if total > 0 else 0.0
    return layers, usage


def coverage_curve(profile: Profile, layer: int) -> np.ndarray:
    """[n + 1]: share of the layer's routed mass on its k heaviest routed experts, k = 0..n."""
    mass = np.sort(profile.prob[layer, profile.routed_ids(layer)].numpy())[::-1]
    total = mass.sum()
    if total <= 0:
        return np.zeros(len(mass) + 1)
    return np.concatenate([[0.0], np.cumsum(mass) / total])


def kept_routed(profile: Profile, budget: Budget, method: str) -> dict[int, list[int]]:
    """The routed experts `emo prune` keeps for this profile alone (uniform allocation)."""
    plan = score_plan([profile], report_method_named(method).name, budget, "uniform", profile.meta.model.top_k)
    return {layer: sorted(set(ids) - set(profile.fixed_ids(layer))) for layer, ids in plan.kept.items()}


def jaccard(a: list[int], b: list[int]) -> float:
    union = set(a) | set(b)
    return len(set(a) & set(b)) / len(union) if union else 1.0


def chance_jaccard(n: int, ka: int, kb: int) -> float:
    """Expected Jaccard of two independent uniformly random subsets of sizes ka, kb out of n
    (hypergeometric overlap), the baseline that says whether two domains share more than luck."""
    if ka == 0 and kb == 0:
        return 1.0
    total = math.comb(n, kb)
    return sum(math.comb(ka, i) * math.comb(n - ka, kb - i) / total * i / (ka + kb - i)
               for i in range(max(0, ka + kb - n), min(ka, kb) + 1))


def profile_names(paths: list[Path]) -> list[str]:
    """Short labels: the file name without .profile.safetensors, the path where names clash."""
    def short(p: Path) -> str:
        for suffix in (".profile.safetensors", ".safetensors"):
            if p.name.endswith(suffix) and len(p.name) > len(suffix):
                return p.name[: -len(suffix)]
        return p.name

    names = [short(Path(p)) for p in paths]
    if len(set(names)) < len(names):
        names = [str(p) for p in paths]
    if len(set(names)) < len(names):
        names = [f"{n} ({i + 1})" for i, n in enumerate(names)]
    return names


def check_same_model(profiles: list[Profile], paths: list[Path]) -> None:
    for prof, path in zip(profiles[1:], paths[1:]):
        if prof.fingerprint != profiles[0].fingerprint:
            raise EmoError(f"{paths[0]} and {path} come from different models (fingerprints "
                           f"{profiles[0].fingerprint} and {prof.fingerprint}); "
                           "a report compares profiles of one model")


def build_report(profiles: list[Profile], paths: list[Path], budget: str = "25%",
                 method: str = DEFAULT_METHOD) -> Report:
    if not profiles:
        raise EmoError("give at least one profile")
    check_same_model(profiles, paths)
    b = Budget.parse(budget)
    stats = []
    for prof, path, name in zip(profiles, paths, profile_names(paths)):
        layers, usage = usage_matrix(prof)
        stats.append(ProfileStats(
            name=name, path=str(path), docs=prof.docs, tokens=prof.meta.data.tokens,
            sources=list(prof.meta.data.sources), layers=layers, usage=usage,
            curves={layer: coverage_curve(prof, layer) for layer in layers},
            cover={s: {layer: coverage(prof, layer, s) for layer in layers} for s in SHARES},
            kept=kept_routed(prof, b, method)))
    first = stats[0]
    pairs = {(i, j): {layer: jaccard(stats[i].kept[layer], stats[j].kept[layer]) for layer in first.layers}
             for i, j in itertools.combinations(range(len(stats)), 2)}
    # same model and budget, so every profile keeps the same number per layer
    chance = {layer: chance_jaccard(len(profiles[0].routed_ids(layer)), len(first.kept[layer]),
                                    len(first.kept[layer])) for layer in first.layers}
    model = {"fingerprint": profiles[0].fingerprint, "path": profiles[0].meta.model.spec or profiles[0].meta.model.path}
    return Report(stats, b.text, method, model, pairs, chance)


def summary(rep: Report, output: Path | None = None) -> dict:
    """Everything the report shows, as one JSON-ready object."""
    profs = []
    for st in rep.profiles:
        layers = []
        for row, layer in enumerate(st.layers):
            routed = np.flatnonzero(~np.isnan(st.usage[row]))
            layers.append({"layer": layer, "routed": len(routed), "cover50": st.cover[0.5][layer],
                           "cover90": st.cover[0.9][layer], "kept": st.kept[layer],
                           "usage": {str(int(e)): float(st.usage[row, e]) for e in routed},
                           "coverage": [float(v) for v in st.curves[layer]]})
        profs.append({"name": st.name, "path": st.path, "docs": st.docs, "tokens": st.tokens, "sources": st.sources,
                      "mean_cover50": st.mean_cover(0.5), "mean_cover90": st.mean_cover(0.9), "layers": layers})
    pairs = [{"a": rep.profiles[i].name, "b": rep.profiles[j].name, "mean_jaccard": rep.mean_jaccard((i, j)),
              "jaccard": {str(layer): v for layer, v in per.items()}} for (i, j), per in rep.jaccard.items()]
    return {"output": None if output is None else str(output), "model": rep.model, "budget": rep.budget,
            "method": rep.method, "heatmap_columns": "original expert id", "profiles": profs, "pairs": pairs,
            "chance_jaccard": {str(layer): v for layer, v in rep.chance.items()}}


# ---- figures --------------------------------------------------------------------------------------
def _png(fig) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    return base64.b64encode(buf.getvalue()).decode("ascii")


def heatmap_png(st: ProfileStats, vmax: float, budget: str) -> str:
    """Layers x experts, columns in ORIGINAL id order so a column is the same expert in every profile."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    L, E = st.usage.shape
    fig = Figure(figsize=(min(13.0, max(6.0, 4.5 + 0.07 * E)), min(9.0, max(2.8, 1.6 + 0.3 * L))))
    ax = fig.add_subplot()
    cmap = colormaps["viridis"].with_extremes(bad="#d0d0d0")
    im = ax.imshow(np.ma.masked_invalid(st.usage), aspect="auto", cmap=cmap, vmin=0.0, vmax=vmax,
                   interpolation="nearest")
    dots = [(e, row) for row, layer in enumerate(st.layers) for e in st.kept[layer]]
    ax.scatter([x for x, _ in dots], [y for _, y in dots], s=14 if E <= 48 else 5, facecolors="white",
               edgecolors="black", linewidths=0.5)
    ax.set_yticks(range(L), [str(layer) for layer in st.layers])
    if E <= 16:
        ax.set_xticks(range(E))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=16))
    ax.set_xlabel("original expert id")
    ax.set_ylabel("layer")
    ax.set_title(f"{st.name}: share of routed probability mass (dots: kept at {budget})", fontsize=10, loc="left")
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02, extend="max" if np.nanmax(st.usage) > vmax else "neither"
                 ).set_label("share of layer's routed mass", fontsize=8)
    return _png(fig)


def coverage_png(st: ProfileStats, budget: str) -> str:
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import ListedColormap, Normalize
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.2, 4.0))
    ax = fig.add_subplot()
    cmap = colormaps["viridis"]
    norm = Normalize(min(st.layers, default=0), max(max(st.layers, default=0), min(st.layers, default=0) + 1))
    for layer in st.layers:
        c = st.curves[layer]
        # viridis without its last, pale-yellow stretch: every layer stays visible on white
        ax.plot(np.arange(len(c)), c, color=cmap(0.85 * norm(layer)), lw=1.4, label=f"layer {layer}")
    sizes = {len(c) - 1 for c in st.curves.values()}
    n_max = max(sizes, default=1)
    if len(sizes) == 1:
        ax.plot([0, n_max], [0, 1], ls=":", color="0.45", lw=1, label="equal usage")
    # where each layer's curve stands at the budget (layers may keep different counts)
    at = [len(st.kept[layer]) for layer in st.layers]
    ax.scatter(at, [st.curves[layer][k] for layer, k in zip(st.layers, at)], s=22, facecolors="white",
               edgecolors="crimson", linewidths=1.2, zorder=3, label=f"kept at {budget}")
    for s in SHARES:
        ax.axhline(s, color="0.75", lw=0.8, zorder=0)
        ax.text(n_max, s, f"{s:.0%} ", ha="right", va="bottom", fontsize=7, color="0.4")
    ax.set_xlim(0, n_max)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("routed experts kept (heaviest first)")
    ax.set_ylabel("share of routed probability mass")
    ax.set_title(f"{st.name}: coverage per layer", fontsize=11, loc="left")
    ax.grid(alpha=0.25)
    if len(st.layers) <= 10:
        ax.legend(fontsize=7, ncol=2, loc="lower right")
    else:  # many layers: depth as a colour scale, the reference lines in the legend
        depth = ListedColormap(cmap(np.linspace(0, 0.85, 256)))
        fig.colorbar(ScalarMappable(norm=norm, cmap=depth), ax=ax, fraction=0.04, pad=0.02).set_label("layer")
        handles = [h for h in ax.get_lines() + ax.collections if not h.get_label().startswith(("layer", "_"))]
        ax.legend(handles=handles, fontsize=7, loc="lower right")
    return _png(fig)


def jaccard_layers_png(rep: Report) -> str:
    from matplotlib.figure import Figure

    layers = rep.profiles[0].layers
    fig = Figure(figsize=(6.2, 4.0))
    ax = fig.add_subplot()
    # pairs often share values (J takes few distinct values at small budgets): dodge them sideways
    step = min(0.08, 0.4 / max(1, len(rep.jaccard)))
    for n, ((i, j), per) in enumerate(rep.jaccard.items()):
        dx = (n - (len(rep.jaccard) - 1) / 2) * step
        ax.plot([layer + dx for layer in layers], [per[layer] for layer in layers], marker="osD^v<>ph"[n % 9],
                ms=4, lw=1.3, alpha=0.9, label=f"{rep.profiles[i].name} vs {rep.profiles[j].name}")
    ax.plot(layers, [rep.chance[layer] for layer in layers], ls=":", color="0.4", lw=1.2, label="random sets")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xticks(layers if len(layers) <= 32 else layers[:: max(1, len(layers) // 16)])
    ax.set_xlabel("layer")
    ax.set_ylabel(f"Jaccard of kept routed experts ({rep.budget})")
    ax.set_title("overlap of kept sets per layer", fontsize=11, loc="left")
    ax.grid(alpha=0.25)
    if len(rep.jaccard) <= 10:  # below the axes: a legend inside would hide points at 0 or 1
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    return _png(fig)


def jaccard_matrix_png(rep: Report) -> str:
    from matplotlib.figure import Figure

    P = len(rep.profiles)
    m = np.eye(P)
    for (i, j) in rep.jaccard:
        m[i, j] = m[j, i] = rep.mean_jaccard((i, j))
    side = min(9.0, max(3.6, 1.8 + 0.9 * P))
    fig = Figure(figsize=(side + 1.0, side))
    ax = fig.add_subplot()
    im = ax.imshow(m, cmap="magma", vmin=0.0, vmax=1.0)
    names = [st.name for st in rep.profiles]
    ax.set_xticks(range(P), names, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(P), names, fontsize=8)
    if P <= 12:
        for i in range(P):
            for j in range(P):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="black" if m[i, j] > 0.6 else "white")
    ax.set_title("mean Jaccard over layers", fontsize=11, loc="left")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return _png(fig)


# ---- HTML -----------------------------------------------------------------------------------------
CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d1d1f; margin: 0;
       background: #fafafa; }
main { max-width: 1360px; margin: 0 auto; padding: 18px 28px 40px; }
h1 { font-size: 24px; margin: 4px 0; } h2 { font-size: 18px; margin: 28px 0 8px; border-bottom: 1px solid #ddd; }
.meta, figcaption, .note { color: #555; font-size: 13px; }
table { border-collapse: collapse; margin: 8px 0; background: #fff; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 3px 9px; text-align: right; } th { background: #f0f0f0; }
.t { text-align: left; }
.grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(560px, 1fr)); gap: 14px; }
figure { margin: 8px 0; background: #fff; border: 1px solid #e3e3e3; padding: 8px; }
figure img { max-width: 100%; height: auto; display: block; }
code { font-size: 12px; }
"""


def _figure(kind: str, png: str, alt: str, caption: str, profile: str | None = None) -> str:
    attr = f' data-profile="{html.escape(profile)}"' if profile is not None else ""
    return (f'<figure data-figure="{kind}"{attr}><img alt="{html.escape(alt)}" '
            f'src="data:image/png;base64,{png}"><figcaption>{caption}</figcaption></figure>')


def _table(head: list[str], rows: list[list], text_cols: tuple[int, ...] = (0,)) -> str:
    th = "".join(f"<th{' class=t' if c in text_cols else ''}>{html.escape(h)}</th>" for c, h in enumerate(head))
    body = "".join("<tr>" + "".join(f"<td{' class=t' if c in text_cols else ''}>{html.escape(_cell(v))}</td>"
                                    for c, v in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.2f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def expected_figures(n_profiles: int) -> int:
    """A heatmap and a coverage figure per profile, plus two overlap figures from two profiles on."""
    return 2 * n_profiles + (2 if n_profiles > 1 else 0)


def render_html(rep: Report) -> str:
    try:  # an optional dependency (the `report` extra): say how to get it rather than a traceback
        import matplotlib  # noqa: F401
    except ImportError:
        raise EmoError("emo report draws its figures with matplotlib: pip install 'emo-cli[report]'") from None
    esc = html.escape
    profs = rep.profiles
    # one colour scale for all heatmaps, capped at the 99th percentile: a few hot experts would
    # otherwise leave every other cell in the darkest shade
    shares = np.concatenate([st.usage[np.isfinite(st.usage)] for st in profs])
    vmax = float(np.percentile(shares, 99)) if shares.size and shares.max() > 0 else 1.0
    parts = [f"<h1>emo report</h1><p class=meta>model <code>{esc(str(rep.model['path']))}</code> "
             f"(fingerprint <code>{esc(rep.model['fingerprint'])}</code>) · kept sets: budget {esc(rep.budget)}, "
             f"method {esc(rep.method)}, as <code>emo prune</code> would keep them for each domain alone · "
             f"emo {esc(__version__)}</p>"]
    rows = [[st.name, st.docs, st.tokens, len(st.layers), st.mean_cover(0.5), st.mean_cover(0.9),
             ", ".join(st.sources)] for st in profs]
    parts.append("<h2>Profiles</h2>" + _table(
        ["profile", "docs", "tokens", "MoE layers", "experts for 50% mass (mean)", "experts for 90% mass (mean)",
         "data"], rows, text_cols=(0, 6)))
    head = ["layer", "routed experts", "kept"] + [f"{st.name} 50% / 90%" for st in profs]
    head += [f"J {profs[i].name}·{profs[j].name}" for i, j in rep.jaccard] + (["J random"] if rep.jaccard else [])
    rows: list[list] = []
    for row, layer in enumerate(profs[0].layers):
        r = [layer, int(np.isfinite(profs[0].usage[row]).sum()), len(profs[0].kept[layer])]
        r += [f"{st.cover[0.5][layer]} / {st.cover[0.9][layer]}" for st in profs]
        r += [per[layer] for per in rep.jaccard.values()] + ([rep.chance[layer]] if rep.jaccard else [])
        rows.append(r)
    parts.append("<h2>Per layer</h2><p class=note>Routed experts that carry 50% and 90% of each layer's routed "
                 "probability mass; J = Jaccard overlap of two domains' kept routed experts.</p>" + _table(head, rows))
    parts.append("<h2>Expert usage</h2><p class=note>One row per MoE layer, one column per ORIGINAL expert id "
                 "(columns are not sorted, so a column is the same expert in every heatmap); colour = the expert's "
                 "share of the layer's routed probability mass, on one scale for all profiles (capped at the 99th "
                 "percentile: an arrow on the colour bar means brighter cells are clipped). Grey: shared or "
                 "always-active experts (every token uses them; always kept) and ids absent from a layer. "
                 f"Dots: the routed experts kept at {esc(rep.budget)} ({esc(rep.method)}).</p>")
    wide = profs[0].usage.shape[1] > 48  # many experts: one heatmap per row, or the cells get too small
    parts.append("<div>" if wide else "<div class=grid>")
    for st in profs:
        parts.append(_figure("heatmap", heatmap_png(st, vmax, rep.budget), f"expert usage heatmap of {st.name}",
                             f"{esc(st.name)}: {st.docs:,} docs, {st.tokens:,} tokens", st.name))
    parts.append("</div><h2>Coverage</h2><p class=note>Share of each layer's routed probability mass kept when "
                 "keeping its k most used routed experts. Curves that rise fast mean a domain needs few experts; "
                 "the dotted diagonal is equal usage.</p><div class=grid>")
    for st in profs:
        parts.append(_figure("coverage", coverage_png(st, rep.budget), f"coverage curves of {st.name}",
                             f"{esc(st.name)}: mean {st.mean_cover(0.5):.1f} experts for 50% of the mass, "
                             f"{st.mean_cover(0.9):.1f} for 90%", st.name))
    parts.append("</div><h2>Overlap of kept sets</h2>")
    if rep.jaccard:
        parts.append(f"<p class=note>Jaccard |A&thinsp;∩&thinsp;B| / |A&thinsp;∪&thinsp;B| of the routed experts "
                     f"each domain keeps at {esc(rep.budget)}; 1 = the same experts, dotted = two random sets of "
                     "the same size. Low overlap means one slim model will not serve both domains.</p><div class=grid>")
        parts.append(_figure("jaccard-layers", jaccard_layers_png(rep), "Jaccard per layer", "per layer and pair"))
        parts.append(_figure("jaccard-matrix", jaccard_matrix_png(rep), "mean Jaccard matrix",
                             "mean over layers, per pair"))
        parts.append("</div>")
    else:
        parts.append("<p class=note>Give two or more profiles to compare their kept sets.</p>")
    return ("<!doctype html>\n<html lang=en><head><meta charset=utf-8><title>emo report</title>"
            f"<style>{CSS}</style></head><body><main>{''.join(parts)}</main></body></html>\n")


# ---- files ----------------------------------------------------------------------------------------
def check_output(path: Path, force: bool) -> None:
    path = Path(path)
    if path.is_dir():
        raise EmoError(f"{path} is a directory; -o takes an .html file name")
    if path.exists() and not force:
        raise EmoError(f"{path} exists (pass --force to overwrite, or -o another name)")
    check_location(path)


def write_html(path: Path, text: str, force: bool = False) -> None:
    """Write to a temporary name beside `path`, then rename: a failure never leaves a partial report."""
    path = Path(path)
    check_output(path, force)
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8", errors="xmlcharrefreplace"))
