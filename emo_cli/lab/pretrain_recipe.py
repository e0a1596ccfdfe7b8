"""Pretraining recipes: TOML files validated into dataclasses (no code is ever executed).

    name = "tiny-emo"
    [corpus]    dir, domains, max_chars_per_domain, heldout_frac, max_heldout_docs, min_chars, max_chars, fetch
    [tokenizer] vocab_size
    [model]     hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, num_experts,
                num_experts_per_tok, num_shared_experts, rope_theta, rms_norm_eps, init_std
    [pool]      enabled, min_size, max_size         (EMO's document pool, docs/design.md#emo-in-brief)
    [train]     seed, seq_len, batch_size, steps, lr, ...

Every key is optional except `name`; an unknown key or a value of the wrong type is one clear error.
Relative corpus directories are resolved against the current directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

from emo_cli.errors import EmoError
from emo_cli.lab.corpus import ALL_DOMAINS, CorpusSpec

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    try:
        import tomli as tomllib
    except ModuleNotFoundError:
        tomllib = None

SAVE_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class CorpusSection:
    dir: str = "corpus"
    domains: list[str] = field(default_factory=lambda: list(ALL_DOMAINS))
    max_chars_per_domain: int = CorpusSpec.max_chars_per_domain
    heldout_frac: float = CorpusSpec.heldout_frac
    max_heldout_docs: int = CorpusSpec.max_heldout_docs
    min_chars: int = CorpusSpec.min_chars
    max_chars: int = CorpusSpec.max_chars
    fetch: bool = True  # may run `apt-get download` for Debian-sourced domains

    def spec(self, seed: int) -> CorpusSpec:
        return CorpusSpec(domains=tuple(self.domains), max_chars_per_domain=self.max_chars_per_domain,
                          heldout_frac=self.heldout_frac, max_heldout_docs=self.max_heldout_docs,
                          min_chars=self.min_chars, max_chars=self.max_chars, seed=seed, fetch=self.fetch)


@dataclass
class TokenizerSection:
    vocab_size: int = 8192


@dataclass
class ModelSection:
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 64  # width of each expert
    num_experts: int = 32  # shared expert included (it is the last index)
    num_experts_per_tok: int = 4  # shared expert included
    num_shared_experts: int = 1
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    init_std: float = 0.02


@dataclass
class PoolSection:
    enabled: bool = True
    min_size: int = 3  # d ~ U{min_size..max_size} routed experts per document and layer
    max_size: int = 31


@dataclass
class TrainSection:
    seed: int = 0
    seq_len: int = 512
    batch_size: int = 8
    steps: int = 1000
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    lb_weight: float = 0.01  # global-batch load balancing over routed experts
    z_weight: float = 0.001  # router z-loss
    checkpoint_every: int = 200
    log_every: int = 10
    save_dtype: str = "bfloat16"


@dataclass
class Recipe:
    name: str
    corpus: CorpusSection = field(default_factory=CorpusSection)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    model: ModelSection = field(default_factory=ModelSection)
    pool: PoolSection = field(default_factory=PoolSection)
    train: TrainSection = field(default_factory=TrainSection)
    source_text: str = field(default="", repr=False, compare=False)

    @property
    def k_routed(self) -> int:
        return self.model.num_experts_per_tok - self.model.num_shared_experts

    @property
    def n_routed(self) -> int:
        return self.model.num_experts - self.model.num_shared_experts

    def fingerprint(self) -> str:
        d = dataclasses.asdict(self)
        d.pop("source_text")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("source_text")
        return d


def _type_name(tp) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _coerce(value, tp, where: str):
    origin = typing.get_origin(tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise EmoError(f"{where} must be a list, got {value!r}")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    ok = (isinstance(value, bool) if tp is bool else
          isinstance(value, (int, float)) and not isinstance(value, bool) if tp is float else
          isinstance(value, int) and not isinstance(value, bool) if tp is int else isinstance(value, tp))
    if not ok:
        raise EmoError(f"{where} must be {_type_name(tp)}, got {value!r}")
    return float(value) if tp is float else value


def _section(cls, raw, where: str, source: str):
    if not isinstance(raw, dict):
        raise EmoError(f"{source}: [{where}] must be a table")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in known:
            raise EmoError(f"{source}: unknown key {key!r} in [{where}] (known: {', '.join(known)})")
        kwargs[key] = _coerce(value, hints[key], f"{source}: [{where}] {key}")
    return cls(**kwargs)


def parse_recipe(text: str, source: str = "recipe") -> Recipe:
    if tomllib is None:
        raise EmoError("reading TOML recipes needs Python 3.11+ or the tomli package")
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise EmoError(f"{source}: invalid TOML ({e})") from None
    sections = {"corpus": CorpusSection, "tokenizer": TokenizerSection, "model": ModelSection,
                "pool": PoolSection, "train": TrainSection}
    for key in raw:
        if key not in sections and key != "name":
            raise EmoError(f"{source}: unknown key {key!r} (known: name, {', '.join(sections)})")
    if not isinstance(raw.get("name"), str) or not raw["name"].strip():
        raise EmoError(f"{source}: needs name = \"...\" (a non-empty string)")
    parts = {k: _section(cls, raw.get(k, {}), k, source) for k, cls in sections.items()}
    recipe = Recipe(name=raw["name"], source_text=text, **parts)
    validate(recipe, source)
    return recipe


def load_recipe(path: Path) -> Recipe:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EmoError(f"{path}: no such recipe file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise EmoError(f"{path}: cannot read recipe ({e})") from None
    return parse_recipe(text, str(path))


def validate(r: Recipe, source: str) -> None:
    def need(cond: bool, msg: str):
        if not cond:
            raise EmoError(f"{source}: {msg}")

    m, t, p = r.model, r.train, r.pool
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        need(getattr(m, name) >= 1, f"[model] {name} must be at least 1")
    need(m.hidden_size % m.num_attention_heads == 0, "[model] hidden_size must be divisible by num_attention_heads")
    need((m.hidden_size // m.num_attention_heads) % 2 == 0, "[model] head dimension must be even (rotary embedding)")
    need(0 <= m.num_shared_experts < m.num_experts, "[model] num_shared_experts must be in [0, num_experts)")
    need(1 <= r.k_routed <= r.n_routed,
         "[model] num_experts_per_tok must exceed num_shared_experts by 1..(routed experts)")
    need(m.init_std > 0 and m.rope_theta > 0 and m.rms_norm_eps > 0, "[model] init_std, rope_theta, rms_norm_eps must be > 0")
    need(r.tokenizer.vocab_size >= 300, "[tokenizer] vocab_size must be at least 300 (256 bytes + merges)")
    if p.enabled:
        need(r.k_routed <= p.min_size <= p.max_size <= r.n_routed,
             f"[pool] need top-k routed ({r.k_routed}) <= min_size <= max_size <= routed experts ({r.n_routed})")
    need(t.seq_len >= 8 and t.batch_size >= 1 and t.steps >= 1, "[train] seq_len >= 8, batch_size >= 1, steps >= 1")
    need(t.lr > 0 and 0 <= t.min_lr_ratio <= 1 and 0 <= t.warmup_steps, "[train] lr > 0, 0 <= min_lr_ratio <= 1, warmup_steps >= 0")
    need(0 <= t.beta1 < 1 and 0 <= t.beta2 < 1, "[train] beta1 and beta2 must be in [0, 1)")
    need(t.weight_decay >= 0 and t.grad_clip >= 0 and t.lb_weight >= 0 and t.z_weight >= 0,
         "[train] weight_decay, grad_clip, lb_weight, z_weight must be >= 0")
    need(t.checkpoint_every >= 1 and t.log_every >= 1, "[train] checkpoint_every and log_every must be >= 1")
    need(t.save_dtype in SAVE_DTYPES, f"[train] save_dtype must be one of {', '.join(SAVE_DTYPES)}")
    try:
        r.corpus.spec(t.seed).validate()
    except EmoError as e:
        raise EmoError(f"{source}: [corpus] {str(e).removeprefix('corpus: ')}") from None
