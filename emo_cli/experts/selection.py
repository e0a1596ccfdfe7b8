"""Budgets and expert selection: Profile(s) (+ model and data for loss-guided methods) -> Plan.

Budget semantics follow EMO: the count kept per layer INCLUDES shared (and always-active) experts,
which are always kept; `25%` keeps ceil(0.25 x experts) per layer, never fewer than top-k.

The methods are declared in experts/methods.py; `score_plan` runs the score-based ones (cheap, from
the profile), and experts/search.py the data-driven ones.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from emo_cli.errors import EmoError
from emo_cli.experts.methods import Scorer, check_allocation, method_named
from emo_cli.experts.usage_profile import Profile
from emo_cli.outputs import write_atomic


@dataclass(frozen=True)
class Budget:
    text: str
    percent: float | None = None
    count: int | None = None

    @classmethod
    def parse(cls, text: str) -> "Budget":
        s = str(text).strip()
        try:
            if s.endswith("%"):
                p = float(s[:-1])
                if not 0 < p <= 100 or math.isnan(p):
                    raise EmoError(f"budget {s}: a percentage must be in (0%, 100%]")
                return cls(s, percent=p)
            n = int(s)
        except ValueError:
            raise EmoError(f"budget {s!r} is not a number: use a percentage like 25% or a count like 32") from None
        if n <= 0:
            raise EmoError(f"budget {s}: must keep at least one expert per layer")
        return cls(s, count=n)

    def keep_for(self, experts: int, top_k: int, layer: int) -> int:
        """Experts kept in a layer with `experts` experts (shared included) and routing top-k."""
        if self.percent is not None:
            return min(experts, max(top_k, math.ceil(self.percent / 100 * experts - 1e-9)))
        if self.count > experts:
            raise EmoError(f"budget {self.text}: layer {layer} has only {experts} experts")
        if self.count < top_k:
            raise EmoError(f"budget {self.text} is below top-k ({top_k}): every token routes to {top_k} experts")
        return self.count


@dataclass
class Plan:
    kept: dict[int, list[int]]  # layer -> kept ORIGINAL ids (sorted; shared/always-active included)
    method: str
    budget: str
    allocation: str
    model_fingerprint: str
    scores: dict[int, dict[int, float]] = field(default_factory=dict)  # layer -> {original id: score}
    extra: dict = field(default_factory=dict)

    def keep_counts(self) -> dict[int, int]:
        return {layer: len(ids) for layer, ids in self.kept.items()}

    def to_json(self) -> dict:
        d = asdict(self)
        d["kept"] = {str(k): v for k, v in self.kept.items()}
        d["scores"] = {str(k): {str(e): s for e, s in v.items()} for k, v in self.scores.items()}
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Plan":
        try:
            return cls(kept={int(k): [int(e) for e in v] for k, v in d["kept"].items()}, method=d["method"],
                       budget=d["budget"], allocation=d["allocation"], model_fingerprint=d["model_fingerprint"],
                       scores={int(k): {int(e): float(s) for e, s in v.items()} for k, v in d.get("scores", {}).items()},
                       extra=d.get("extra", {}))
        except (KeyError, TypeError, ValueError) as e:
            raise EmoError(f"invalid plan file ({e})") from None

    def save(self, path: Path) -> None:
        text = json.dumps(self.to_json(), indent=1, sort_keys=True) + "\n"
        write_atomic(path, lambda tmp: tmp.write_text(text))

    @classmethod
    def load(cls, path: Path) -> "Plan":
        try:
            return cls.from_json(json.loads(Path(path).read_text()))
        except FileNotFoundError:
            raise EmoError(f"{path}: no such plan file") from None
        except json.JSONDecodeError:
            raise EmoError(f"{path}: invalid JSON") from None


# ---- scores ---------------------------------------------------------------------------------------
def layer_scores(profile: Profile, score: Scorer, layer: int, seed: int = 0) -> dict[int, tuple]:
    """Sort keys (larger is better) for the routed experts of one layer."""
    return score(profile, layer, profile.routed_ids(layer), seed)


def combined_scores(profiles: list[Profile], score: Scorer, layer: int, seed: int = 0) -> dict[int, tuple]:
    """Several domains: each domain's primary score normalised to sum 1 in the layer, then averaged."""
    if len(profiles) == 1:
        return layer_scores(profiles[0], score, layer, seed)
    total: dict[int, list[float]] = {}
    for prof in profiles:
        s = layer_scores(prof, score, layer, seed)
        norm = sum(v[0] for v in s.values()) or 1.0
        for e, v in s.items():
            acc = total.setdefault(e, [0.0, 0.0])
            acc[0] += v[0] / norm / len(profiles)
            acc[1] += v[1] / len(profiles)
    return {e: (v[0], v[1], -e) for e, v in total.items()}


def layer_budgets(profile: Profile, budget: Budget, top_k: int) -> dict[int, int]:
    return {layer: budget.keep_for(len(profile.layer_ids(layer)), min(top_k, len(profile.layer_ids(layer))), layer)
            for layer in profile.moe_layers()}


def plan_from_scores(profile: Profile, scores: dict[int, dict[int, tuple]], keep: dict[int, int],
                     allocation: str) -> dict[int, list[int]]:
    """Kept ids per layer: fixed experts + the best routed ones, uniform or global allocation."""
    kept: dict[int, list[int]] = {}
    if allocation == "uniform":
        for layer, n in keep.items():
            fixed = profile.fixed_ids(layer)
            ranked = sorted(scores[layer], key=lambda e: scores[layer][e], reverse=True)
            kept[layer] = sorted(fixed + ranked[: n - len(fixed)])
        return kept
    check_allocation(allocation)
    # Global: every layer keeps at least top-k; the rest of the same total goes to the best
    # experts anywhere, by each layer's score share (so layers with flat usage get more).
    total = sum(keep.values())
    top_k = {layer: min(profile.meta.model.routed_top_k[layer] + len(profile.fixed_ids(layer)),
                        len(profile.layer_ids(layer))) for layer in keep}
    ranked_by_layer, pool = {}, []
    for layer in keep:
        ranked = sorted(scores[layer], key=lambda e: scores[layer][e], reverse=True)
        ranked_by_layer[layer] = ranked
        mass = sum(max(scores[layer][e][0], 0.0) for e in ranked) or 1.0
        fixed = profile.fixed_ids(layer)
        base = top_k[layer] - len(fixed)
        kept[layer] = fixed + ranked[:base]
        for rank, e in enumerate(ranked[base:]):
            pool.append((max(scores[layer][e][0], 0.0) / mass, -layer, -rank, layer, e))
    remaining = total - sum(len(v) for v in kept.values())
    for *_, layer, e in sorted(pool, reverse=True)[:max(remaining, 0)]:
        kept[layer].append(e)
    return {layer: sorted(v) for layer, v in kept.items()}


def score_plan(profiles: list[Profile], method: str, budget: Budget, allocation: str, top_k: int,
               seed: int = 0) -> Plan:
    """The plan of score-based `method` (a name in experts/methods.py) for one budget."""
    m = method_named(method)
    if m.score is None:
        raise EmoError(f"{method} is data-driven: it needs the model (experts/search.py), not only profiles")
    base = profiles[0]
    keep = layer_budgets(base, budget, top_k)
    scores = {layer: combined_scores(profiles, m.score, layer, seed) for layer in keep}
    kept = plan_from_scores(base, scores, keep, allocation)
    return Plan(kept=kept, method=m.name, budget=budget.text, allocation=allocation,
                model_fingerprint=base.fingerprint,
                scores={layer: {e: v[0] for e, v in s.items()} for layer, s in scores.items()},
                extra={"seed": seed} if m.uses_seed else {})


def domain_coverage(profile: Profile, plan: Plan) -> float:
    """Share of the domain's routed probability mass that lands on kept experts (mean over layers)."""
    shares = []
    for layer, ids in plan.kept.items():
        routed = profile.routed_ids(layer)
        total = float(profile.prob[layer, routed].sum())
        if total > 0:
            kept_routed = [e for e in ids if e in set(routed)]
            shares.append(float(profile.prob[layer, kept_routed].sum()) / total)
    return sum(shares) / len(shares) if shares else 0.0
