"""The selection methods, each declared once: what `emo prune`, `emo report` and `emo demo` offer,
how each ranks experts, and what it needs.

Score-based methods rank a layer's routed experts from the profile alone (selection.score_plan);
data-driven ones (search.py: `router`, `greedy`) run the loaded model over the profiled or
held-out documents. The command line builds its --method choices from METHODS.

This module imports no torch at load time: the command line reads it at start-up.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from emo_cli.errors import EmoError

if TYPE_CHECKING:
    from emo_cli.experts.usage_profile import Profile

# (profile, layer, routed ids, seed) -> {original id: sort key}, larger keys ranked first
Scorer = Callable[["Profile", int, list[int], int], dict[int, tuple]]


def frequency_scores(profile: Profile, layer: int, ids: list[int], seed: int) -> dict[int, tuple]:
    """Top-k selection counts; ties broken by probability mass, then by the lower id."""
    c, p = profile.counts[layer], profile.prob[layer]
    return {e: (float(c[e]), float(p[e]), -e) for e in ids}


def reap_scores(profile: Profile, layer: int, ids: list[int], seed: int) -> dict[int, tuple]:
    """REAP saliency, as a mean over the tokens routed to the expert."""
    c, p = profile.counts[layer], profile.prob[layer]
    return {e: ((float(profile.reap[layer, e]) / float(c[e])) if c[e] > 0 else 0.0, float(p[e]), -e) for e in ids}


def easyep_scores(profile: Profile, layer: int, ids: list[int], seed: int) -> dict[int, tuple]:
    """EASY-EP saliency, summed."""
    p = profile.prob[layer]
    return {e: (float(profile.easyep[layer, e]), float(p[e]), -e) for e in ids}


def random_scores(profile: Profile, layer: int, ids: list[int], seed: int) -> dict[int, tuple]:
    """A permutation seeded by (seed, layer)."""
    import torch  # here, not at the top: the command line imports this module at start-up

    g = torch.Generator().manual_seed(seed * 1000003 + layer)
    perm = torch.randperm(len(ids), generator=g).tolist()
    return {ids[j]: (float(len(ids) - rank), 0.0, 0) for rank, j in enumerate(perm)}


def routing_mass_scores(profile: Profile, layer: int, ids: list[int], seed: int) -> dict[int, tuple]:
    """Routing probability mass. Not a method of its own: the cheap ranking behind router's global
    allocation and greedy's swap shortlists."""
    c, p = profile.counts[layer], profile.prob[layer]
    return {e: (float(p[e]), float(c[e]), -e) for e in ids}


@dataclass(frozen=True)
class Method:
    """A selection method: its kind is "score" when it ranks from the profile alone, "data" when
    it runs the model."""
    name: str
    label: str  # what it ranks by, for --help
    score: Scorer | None = None  # None: data-driven, it needs the loaded model and documents
    needs_heldout: bool = False  # held-out documents, not only the profiled ones
    seeds_greedy: bool = False  # greedy starts from the best of these plans (and router's)
    in_report: bool = False  # `emo report` compares domains by these kept sets
    uses_seed: bool = False  # --seed changes the plan, and the plan records it
    weight_passes: int = 1  # reads of the weights: the memory planner keeps a model read often resident

    @property
    def kind(self) -> str:
        return "score" if self.score is not None else "data"


METHODS: tuple[Method, ...] = (
    Method("frequency", "top-k selection counts", frequency_scores, seeds_greedy=True, in_report=True),
    Method("router", "EMO's layerwise method: mean routing probability with the layers below pruned "
           "(one cached forward pass)", weight_passes=2),
    Method("reap", "REAP saliency, gate x ||expert output|| averaged over routed tokens", reap_scores,
           seeds_greedy=True, in_report=True),
    Method("easyep", "EASY-EP saliency, REAP's product x (1 - cos(h, h + moe(h)))", easyep_scores,
           seeds_greedy=True, in_report=True),
    Method("greedy", "held-out loss: swaps experts layer by layer, starting from the best of the others",
           needs_heldout=True, weight_passes=8),
    Method("random", "a seeded permutation (--seed), the baseline", random_scores, uses_seed=True),
)
REPORT_METHODS = tuple(m for m in METHODS if m.in_report)
DEFAULT_METHOD = "frequency"  # of `emo prune`, `emo report` and `emo demo`


# How a budget is spread over the layers -> what it means, for --help.
ALLOCATIONS = {"uniform": "the same count per layer (llama.cpp needs it)",
               "global": "per-layer counts by score, the same total"}


def check_allocation(name: str) -> str:
    if name not in ALLOCATIONS:
        raise EmoError(f"unknown allocation {name!r} ({' or '.join(ALLOCATIONS)})")
    return name


def method_named(name: str) -> Method:
    for m in METHODS:
        if m.name == name:
            return m
    raise EmoError(f"unknown method {name!r} (choose from {', '.join(m.name for m in METHODS)})")


def report_method_named(name: str) -> Method:
    for m in REPORT_METHODS:
        if m.name == name:
            return m
    raise EmoError(f"--method {name!r}: a report uses a score method ({', '.join(m.name for m in REPORT_METHODS)})")
