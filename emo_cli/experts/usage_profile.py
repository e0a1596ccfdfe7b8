"""Expert-usage profiles: what a domain's tokens do in every MoE layer, per ORIGINAL expert id.

Statistics per layer l and original expert e (tensors [L, E], float64; pad tokens never count):
  counts   top-k selections (routed and shared/always-active slots alike)
  prob     sum of routing probabilities (routed softmax; shared columns carry their own softmax)
  reap     sum over the tokens routed to e of gate weight x ||expert output||   (REAP saliency)
  easyep   the same product x (1 - cos(h, h + moe(h)))                          (EASY-EP saliency)
plus tokens [L] and documents. Profiles of the same model add up, so shards and domains merge.
Profile.meta (ProfileMeta) says what was profiled: the model and its experts, the data (enough to
read it again) and the settings.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from dataclasses import MISSING, dataclass, field, fields, is_dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from emo_cli import __version__
from emo_cli.arch.config import conforms
from emo_cli.arch.layers import MoEObservation
from emo_cli.errors import EmoError
from emo_cli.model.api import layout
from emo_cli.model.distributed import world
from emo_cli.model.passes import HiddenStore, embed_batches, run_layers
from emo_cli.outputs import write_atomic

STATS = ("counts", "prob", "reap", "easyep")


# ---- metadata -------------------------------------------------------------------------------------
# Saved as JSON under the file's `emo_profile` key. A field without a default must be in the file,
# and is always written; one with a default may be absent (files of older versions, or of the demo)
# and is written only when set. A value of another type than the annotation is refused at load,
# not deep inside a command. Keys emo does not know are kept in `extra`, so a round trip loses nothing.
@dataclass
class ModelInfo:
    """The profiled model: where it was, what it is, and its experts per layer by original id."""
    path: str
    fingerprint: str
    expert_ids: list[list[int] | None]  # None: a dense layer
    fixed_ids: list[list[int] | None]  # shared or always-active experts, which every token uses
    routed_top_k: list[int]
    top_k: int
    spec: str | None = None  # the model as `emo profile --model` named it: what `emo prune` loads
    extra: dict = field(default_factory=dict)

    @classmethod
    def of(cls, model, path: str | Path, fingerprint: str, spec: str | None = None) -> ModelInfo:
        return cls(path=str(path), fingerprint=fingerprint, spec=spec, **layout(model))


@dataclass
class DataPart:
    """One profiled dataset, described well enough to be read again: its held-out documents score
    greedy's candidates and the prune report, its profiled ones are router's calibration data."""
    sources: list[str]  # absolute since emo 0.1
    text_field: str | None  # None: text, content or messages
    max_docs: int | None
    docs: int  # profiled, the held-out ones left out
    tokens: int
    hash: str  # of the documents read (data.data_hash): a changed file is refused
    heldout_ids: list[int] | None = None  # absent before emo 0.1, which held nothing out
    shots: int | None = None  # absent: no solved examples before multiple-choice items
    # recorded for the reader, not read back
    multiple_choice: bool | None = None
    total_docs: int | None = None  # read, before the held-out split
    heldout_frac: float | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class MergedData:
    """The data of merged profiles: totals, and the parts that each describe their own dataset."""
    sources: list[str]
    docs: int
    tokens: int
    hash: str  # the parts' hashes joined by +
    parts: list[DataPart]
    extra: dict = field(default_factory=dict)


@dataclass
class ProfileSettings:
    seq_len: int
    batch_size: int
    max_tokens: int | None
    extra: dict = field(default_factory=dict)


@dataclass
class ProfileMeta:
    model: ModelInfo
    data: DataPart | MergedData
    settings: ProfileSettings
    emo_version: str | None = None  # of the emo that computed the statistics
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return _to_json(self)

    @classmethod
    def from_json(cls, raw) -> ProfileMeta:
        """The metadata read from a file's JSON; ValueError says what is wrong with it."""
        if not isinstance(raw, dict):
            raise ValueError("metadata is not an object")
        data = raw.get("data")
        if isinstance(data, dict) and "parts" in data:
            if not isinstance(data["parts"], list) or not data["parts"]:
                raise ValueError("data.parts malformed")
            parts = [_from_json(DataPart, p, f"data.parts[{i}]") for i, p in enumerate(data["parts"])]
            data = _from_json(MergedData, data, "data", parts=parts)
        else:
            data = _from_json(DataPart, data, "data")
        return _from_json(cls, raw, "metadata", model=_from_json(ModelInfo, raw.get("model"), "model"), data=data,
                          settings=_from_json(ProfileSettings, raw.get("settings"), "settings"))


def _required(f) -> bool:
    return f.default is MISSING and f.default_factory is MISSING


def _to_json(obj) -> dict:
    out = dict(obj.extra)
    for f in fields(obj):
        value = getattr(obj, f.name)
        if f.name == "extra" or (value is None and not _required(f)):
            continue
        if is_dataclass(value):
            value = _to_json(value)
        elif isinstance(value, list) and value and is_dataclass(value[0]):
            value = [_to_json(v) for v in value]
        out[f.name] = value
    return out


def _from_json(cls, raw, where: str, **sections):
    """A `cls` from the JSON object `raw`, its fields checked against their annotations; `sections`
    are the nested dataclasses, already read."""
    if not isinstance(raw, dict):
        raise ValueError(f"no {where!r} section")
    values = dict(sections)
    known = [f for f in fields(cls) if f.name != "extra"]
    for f in known:
        if f.name in sections or (f.name not in raw and not _required(f)):
            continue
        if f.name not in raw or not conforms(raw[f.name], f.type):
            raise ValueError(f"{where}.{f.name} missing or not {f.type}")
        values[f.name] = raw[f.name]
    names = {f.name for f in known}
    return cls(**values, extra={k: v for k, v in raw.items() if k not in names})


@dataclass
class Profile:
    counts: torch.Tensor  # [L, E] float64
    prob: torch.Tensor  # [L, E]
    reap: torch.Tensor  # [L, E]
    easyep: torch.Tensor  # [L, E]
    tokens: torch.Tensor  # [L] tokens seen by each layer
    meta: ProfileMeta
    path: Path | None = None  # the file it was loaded from (not saved): moved data is looked for beside it

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def empty(cls, num_layers: int, width: int, meta: ProfileMeta) -> "Profile":
        z = lambda: torch.zeros(num_layers, width, dtype=torch.float64)  # noqa: E731
        return cls(z(), z(), z(), z(), torch.zeros(num_layers, dtype=torch.float64), meta)

    @property
    def fingerprint(self) -> str:
        return self.meta.model.fingerprint

    @property
    def docs(self) -> int:
        return self.meta.data.docs

    def layer_ids(self, layer: int) -> list[int]:
        """Original expert ids present in the profiled model at `layer` (empty for dense layers)."""
        return list(self.meta.model.expert_ids[layer] or [])

    def routed_ids(self, layer: int) -> list[int]:
        return [e for e in self.layer_ids(layer) if e not in set(self.fixed_ids(layer))]

    def fixed_ids(self, layer: int) -> list[int]:
        """Experts every token uses (legacy shared or always-active): always kept by pruning."""
        return list(self.meta.model.fixed_ids[layer] or [])

    def moe_layers(self) -> list[int]:
        return [i for i, ids in enumerate(self.meta.model.expert_ids) if ids]

    # ---- arithmetic ---------------------------------------------------------------------------
    def merged(self, other: "Profile") -> "Profile":
        if other.fingerprint != self.fingerprint:
            raise EmoError(
                f"profiles come from different models (fingerprints {self.fingerprint} and "
                f"{other.fingerprint}); profiles only add up for the same model"
            )
        meta = copy.deepcopy(self.meta)
        parts = copy.deepcopy(self.parts() + other.parts())
        meta.data = MergedData(sources=[src for p in parts for src in p.sources], docs=self.docs + other.docs,
                               tokens=self.meta.data.tokens + other.meta.data.tokens,
                               hash="+".join(p.hash for p in parts), parts=parts)
        return Profile(self.counts + other.counts, self.prob + other.prob, self.reap + other.reap,
                       self.easyep + other.easyep, self.tokens + other.tokens, meta)

    def parts(self) -> list[DataPart]:
        """The datasets behind the profile (several after a merge)."""
        data = self.meta.data
        return list(data.parts) if isinstance(data, MergedData) else [data]

    # ---- files --------------------------------------------------------------------------------
    def save(self, path: Path, force: bool = False) -> None:
        path = Path(path)
        if path.exists() and not force:
            raise EmoError(f"{path} exists (pass --force to overwrite)")
        tensors = {k: getattr(self, k).contiguous() for k in STATS + ("tokens",)}
        meta = {"emo_profile": json.dumps(self.meta.to_json(), sort_keys=True)}
        write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))

    @classmethod
    def load(cls, path: Path) -> "Profile":
        path = Path(path)
        if not path.exists():
            raise EmoError(f"{path}: no such profile")
        try:
            with safe_open(str(path), framework="pt") as f:
                raw = json.loads((f.metadata() or {})["emo_profile"])
                t = {k: f.get_tensor(k) for k in STATS + ("tokens",)}
        except (KeyError, json.JSONDecodeError):
            raise EmoError(f"{path}: not an emo profile (no emo_profile metadata)") from None
        except Exception as e:  # safetensors raises its own error type for corrupt files
            raise EmoError(f"{path}: cannot read profile ({(str(e).splitlines() or [type(e).__name__])[0]})") from None
        try:
            meta = ProfileMeta.from_json(raw)
        except ValueError as e:
            raise EmoError(f"{path}: not a valid emo profile ({e})") from None
        problem = _statistics_problem(meta, t)
        if problem:
            raise EmoError(f"{path}: not a valid emo profile ({problem})")
        t = {k: v.to(torch.float64) for k, v in t.items()}
        return cls(**t, meta=meta, path=path.resolve())


def _statistics_problem(meta: ProfileMeta, tensors: dict[str, torch.Tensor]) -> str | None:
    """What does not fit between a loaded profile's per-layer metadata and its statistics, or None."""
    ids = meta.model.expert_ids
    L = len(ids)
    width = tensors["counts"].shape[-1] if tensors["counts"].dim() == 2 else -1
    for k in STATS:
        if tuple(tensors[k].shape) != (L, width) or not tensors[k].is_floating_point():
            return f"{k} has shape {tuple(tensors[k].shape)}, expected {L} layers x {width}"
    if tuple(tensors["tokens"].shape) != (L,) or not tensors["tokens"].is_floating_point():
        return f"tokens has shape {tuple(tensors['tokens'].shape)}, expected ({L},)"
    if len(meta.model.fixed_ids) != L or len(meta.model.routed_top_k) != L:
        return "per-layer lists of different lengths"
    for layer_ids, fixed in zip(ids, meta.model.fixed_ids):
        if any(not 0 <= e < width for e in layer_ids or []) or any(e not in (layer_ids or []) for e in fixed or []):
            return f"expert ids outside the {width} profiled experts"
    for v in tensors.values():
        if not bool(torch.isfinite(v).all()) or bool((v < 0).any()):
            return "negative or non-finite statistics"
    return None


class ProfileAccumulator:
    """Observer of a pass: accumulates statistics of non-pad tokens into a Profile."""

    def __init__(self, profile: Profile, expert_ids: list[list[int] | None]):
        self.p = profile
        self.mask: torch.Tensor | None = None  # [T] bool, set per batch
        # local expert index -> column (original id) per layer
        self.cols = {i: torch.tensor(ids) for i, ids in enumerate(expert_ids) if ids is not None}

    def __call__(self, ob: MoEObservation) -> None:
        m = self.mask
        r = ob.routing
        experts, weights, norms = r.experts[m], r.weights[m].double(), ob.expert_norms[m].double()  # [N, K]
        x, out = ob.x[m].float(), ob.out[m].float()  # [N, D]
        E = r.probs.shape[1]
        cols = self.cols[ob.layer]
        flat = experts.reshape(-1)
        counts = torch.bincount(flat, minlength=E).double()
        prob = r.probs[m].double().sum(0)
        sal = weights * norms  # [N, K] REAP terms
        reap = torch.zeros(E, dtype=torch.float64, device=flat.device).index_add_(0, flat, sal.reshape(-1))
        # EASY-EP weighs each token by how much the MoE output turns its residual stream
        turn = (1 - F.cosine_similarity(x, x + out, dim=-1)).clamp_min(0).double()  # [N]
        easy = torch.zeros(E, dtype=torch.float64, device=flat.device).index_add_(
            0, flat, (sal * turn[:, None]).reshape(-1))
        L = ob.layer
        for name, v in (("counts", counts), ("prob", prob), ("reap", reap), ("easyep", easy)):
            getattr(self.p, name)[L].index_add_(0, cols, v.cpu())
        self.p.tokens[L] += float(m.sum())


@torch.no_grad()
def profile_model(model, batches, meta: ProfileMeta, on_step=None, resume_dir: Path | None = None, on_resume=None,
                  checkpoint_docs: int | None = None) -> Profile:
    """Run every batch through `model` (layer-major, no lm_head) and accumulate the profile;
    `on_step(layer, n_docs, n_tokens)` reports progress after each batch of each layer. `meta`
    describes the run, its model section made by ModelInfo.of(model, ...).

    With `resume_dir`, the run is resumable, and a later call with the same model, data and
    settings continues where it stopped (`on_resume(where, layers_done, batches_done)` is told):
      * by default (for streamed models, which read every layer once) after every layer the
        partial profile and the residual streams entering the next layer are on disk; the streams
        alternate between two files, so the checkpoint stays valid while a layer is computed;
      * with `checkpoint_docs` (resident models), the batches go through all layers in groups of
        about that many documents, and the partial sums are saved after each group.
    Under torchrun every rank checkpoints its own share in resume_dir/rank-R-of-W."""
    w = world()
    if w.size > 1:  # data parallel: this rank's share of the batches (and its own checkpoints);
        batches = [batches[i] for i in w.mine(len(batches))]  # the sums are reduced below
        resume_dir = Path(resume_dir) / f"rank-{w.rank}-of-{w.size}" if resume_dir is not None else None
    expert_ids = meta.model.expert_ids
    width = max((max(ids) + 1 for ids in expert_ids if ids), default=0)
    if width == 0:
        raise EmoError("the model has no MoE layers to profile")
    prof = Profile.empty(model.num_layers, width, replace(meta, emo_version=__version__))
    acc = ProfileAccumulator(prof, expert_ids)

    def before(b):
        acc.mask = batches[b].mask.reshape(-1).to(model.device)

    def step(layer, b):
        if on_step:
            on_step(layer, len(batches[b].doc_index), int(batches[b].mask.sum()))

    try:
        if not batches:  # more ranks than batches: this one only joins the reduction
            pass
        elif resume_dir is None:
            store = embed_batches(model, [b.ids for b in batches])
            run_layers(model, store, 0, model.num_layers, before_batch=before, observer=acc, on_step=step)
            store.close()
        elif checkpoint_docs:
            _grouped_pass(model, batches, prof, Path(resume_dir), acc, step, on_resume, checkpoint_docs)
        else:
            _resumable_pass(model, batches, prof, Path(resume_dir), before, acc, step, on_resume)
    finally:
        model.release()
    if w.size > 1:
        names = STATS + ("tokens",)
        for name, total in zip(names, w.sum(*(getattr(prof, n) for n in names))):
            setattr(prof, name, total)
    return prof


def _checkpoint(folder: Path, prof: Profile, layout_key: str, fresh: dict) -> tuple[Path, str, dict]:
    """(state file, run key, state) of a resumable pass in `folder`. A checkpoint of the same run
    (same metadata and batch layout) is resumed: its partial sums are loaded into `prof`; anything
    else in the folder (emo's own) is another run's leftovers and is cleared."""
    key = hashlib.sha256((json.dumps(prof.meta.to_json(), sort_keys=True) + layout_key).encode()).hexdigest()[:16]
    state_file = folder / "state.json"
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError):
        state = None
    if not isinstance(state, dict) or state.get("key") != key:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        return state_file, key, {"key": key, **fresh}
    if any(state.get(k) for k in fresh):  # past the start: the partial sums come back too
        saved = Profile.load(folder / "partial.profile.safetensors")
        for name in STATS + ("tokens",):
            getattr(prof, name).copy_(getattr(saved, name))
    return state_file, key, state


def _resumable_pass(model, batches, prof: Profile, folder: Path, before, acc, step, on_resume) -> None:
    D = model.config.hidden_size
    shapes = [(b.ids.shape[0], b.ids.shape[1], D) for b in batches]
    state_file, key, state = _checkpoint(folder, prof, repr(shapes), {"next_layer": 0, "current": 0})
    dtype = model.embed(batches[0].ids[:1, :1]).dtype
    stores = [HiddenStore(shapes, dtype, model.device, 0, path=folder / f"hidden-{k}.bin") for k in (0, 1)]
    cur, start = state["current"], state["next_layer"]
    if start > 0:
        if on_resume:
            on_resume(f"layer {start + 1}/{model.num_layers}", start, 0)
    else:
        for i, b in enumerate(batches):
            stores[cur][i] = model.embed(b.ids)
    for layer in range(start, model.num_layers):
        run_layers(model, stores[cur], layer, layer + 1, before_batch=before, observer=acc, on_step=step,
                   out=stores[1 - cur])
        cur = 1 - cur
        stores[cur].sync()  # the streams first, then the state that points at them
        prof.save(folder / "partial.profile.safetensors", force=True)
        state = json.dumps({"key": key, "next_layer": layer + 1, "current": cur})
        write_atomic(state_file, lambda tmp: tmp.write_text(state))
    for st in stores:
        st.close()
    shutil.rmtree(folder, ignore_errors=True)


def _grouped_pass(model, batches, prof: Profile, folder: Path, acc, step, on_resume, docs_per_group: int) -> None:
    """All layers for one group of batches at a time; the partial sums are saved after each group.
    Per (layer, expert) the batches still add up in the same order as one layer-major pass, so the
    profile is bit-identical to an uncheckpointed run."""
    per = max(1, docs_per_group // max(len(batches[0].doc_index), 1))  # batches per group
    shapes = [tuple(b.ids.shape) for b in batches]
    state_file, key, state = _checkpoint(folder, prof, f"{shapes!r}/{per}", {"next_batch": 0})
    partial = folder / "partial.profile.safetensors"
    start = int(state["next_batch"])
    if start > 0:
        if on_resume:
            on_resume(f"document {sum(len(b.doc_index) for b in batches[:start]) + 1}", 0, start)
    for s in range(start, len(batches), per):
        group = batches[s:s + per]
        store = embed_batches(model, [b.ids for b in group])

        def before(b, group=group):
            acc.mask = group[b].mask.reshape(-1).to(model.device)

        run_layers(model, store, 0, model.num_layers, before_batch=before, observer=acc,
                   on_step=lambda layer, b, s=s: step(layer, s + b))
        store.close()
        prof.save(partial, force=True)
        done = json.dumps({"key": key, "next_batch": s + len(group)})
        write_atomic(state_file, lambda tmp: tmp.write_text(done))
    shutil.rmtree(folder, ignore_errors=True)


def coverage(profile: Profile, layer: int, share: float) -> int:
    """How many routed experts carry `share` of the layer's routed probability mass."""
    ids = profile.routed_ids(layer)
    if not ids:
        return 0
    mass = profile.prob[layer, ids].sort(descending=True).values
    total = float(mass.sum())
    if total <= 0:
        return 0
    return int((mass.cumsum(0) < share * total).sum()) + 1
