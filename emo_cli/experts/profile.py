"""Expert-usage profiles: what a domain's tokens do in every MoE layer, per ORIGINAL expert id.

Statistics per layer l and original expert e (tensors [L, E], float64; pad tokens never count):
  counts   top-k selections (routed and shared/always-active slots alike)
  prob     sum of routing probabilities (routed softmax; shared columns carry their own softmax)
  reap     sum over the tokens routed to e of gate weight x ||expert output||   (REAP saliency)
  easyep   the same product x (1 - cos(h, h + moe(h)))                          (EASY-EP saliency)
plus tokens [L] and documents. Profiles of the same model add up, so shards and domains merge.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
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
# The metadata keys emo reads back, with their types; a file that lacks one or holds another type
# (hand-edited, or written by something else) is refused at load, not deep inside a command.
# Each dataset part (meta.data itself, or each of meta.data.parts after a merge) re-reads its data:
PART_SCHEMA = {"sources": "list[str]", "hash": "str", "heldout_ids": "list[int]", "text_field": "str | None",
               "max_docs": "int | None", "shots": "int | None"}
META_SCHEMA = {
    "model": {"path": "str", "fingerprint": "str", "expert_ids": "list[list[int] | None]",
              "fixed_ids": "list[list[int] | None]", "routed_top_k": "list[int]", "top_k": "int"},
    "data": {"sources": "list[str]", "docs": "int", "tokens": "int", "hash": "str"},
    "settings": {"seq_len": "int", "batch_size": "int", "max_tokens": "int | None"},
}


@dataclass
class Profile:
    counts: torch.Tensor  # [L, E] float64
    prob: torch.Tensor  # [L, E]
    reap: torch.Tensor  # [L, E]
    easyep: torch.Tensor  # [L, E]
    tokens: torch.Tensor  # [L] tokens seen by each layer
    meta: dict = field(default_factory=dict)
    path: Path | None = None  # the file it was loaded from (not saved): moved data is looked for beside it

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def empty(cls, num_layers: int, width: int, meta: dict) -> "Profile":
        z = lambda: torch.zeros(num_layers, width, dtype=torch.float64)  # noqa: E731
        return cls(z(), z(), z(), z(), torch.zeros(num_layers, dtype=torch.float64), meta)

    @property
    def fingerprint(self) -> str:
        return self.meta["model"]["fingerprint"]

    @property
    def docs(self) -> int:
        return int(self.meta["data"]["docs"])

    def layer_ids(self, layer: int) -> list[int]:
        """Original expert ids present in the profiled model at `layer` (empty for dense layers)."""
        return list(self.meta["model"]["expert_ids"][layer] or [])

    def routed_ids(self, layer: int) -> list[int]:
        return [e for e in self.layer_ids(layer) if e not in set(self.fixed_ids(layer))]

    def fixed_ids(self, layer: int) -> list[int]:
        """Experts every token uses (legacy shared or always-active): always kept by pruning."""
        return list(self.meta["model"]["fixed_ids"][layer] or [])

    def moe_layers(self) -> list[int]:
        return [i for i, ids in enumerate(self.meta["model"]["expert_ids"]) if ids]

    # ---- arithmetic ---------------------------------------------------------------------------
    def merged(self, other: "Profile") -> "Profile":
        if other.fingerprint != self.fingerprint:
            raise EmoError(
                f"profiles come from different models (fingerprints {self.fingerprint} and "
                f"{other.fingerprint}); profiles only add up for the same model"
            )
        meta = json.loads(json.dumps(self.meta))
        parts = self.parts() + other.parts()
        meta["data"] = {
            "sources": [src for p in parts for src in p["sources"]],
            "docs": self.docs + other.docs,
            "tokens": int(self.meta["data"]["tokens"]) + int(other.meta["data"]["tokens"]),
            "hash": "+".join(p["hash"] for p in parts),
            "parts": parts,
        }
        return Profile(self.counts + other.counts, self.prob + other.prob, self.reap + other.reap,
                       self.easyep + other.easyep, self.tokens + other.tokens, meta)

    def parts(self) -> list[dict]:
        """The datasets behind the profile, each self-describing: sources, text_field, max_docs,
        hash and held-out document ids (several after a merge)."""
        return list(self.meta["data"].get("parts") or [self.meta["data"]])

    # ---- files --------------------------------------------------------------------------------
    def save(self, path: Path, force: bool = False) -> None:
        path = Path(path)
        if path.exists() and not force:
            raise EmoError(f"{path} exists (pass --force to overwrite)")
        tensors = {k: getattr(self, k).contiguous() for k in STATS + ("tokens",)}
        meta = {"emo_profile": json.dumps(self.meta, sort_keys=True)}
        write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))

    @classmethod
    def load(cls, path: Path) -> "Profile":
        path = Path(path)
        if not path.exists():
            raise EmoError(f"{path}: no such profile")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})["emo_profile"])
                t = {k: f.get_tensor(k) for k in STATS + ("tokens",)}
        except (KeyError, json.JSONDecodeError):
            raise EmoError(f"{path}: not an emo profile (no emo_profile metadata)") from None
        except Exception as e:  # safetensors raises its own error type for corrupt files
            raise EmoError(f"{path}: cannot read profile ({(str(e).splitlines() or [type(e).__name__])[0]})") from None
        problem = _schema_problem(meta, t)
        if problem:
            raise EmoError(f"{path}: not a valid emo profile ({problem})")
        t = {k: v.to(torch.float64) for k, v in t.items()}
        return cls(**t, meta=meta, path=path.resolve())


def _schema_problem(meta, tensors: dict[str, torch.Tensor]) -> str | None:
    """What is wrong with a loaded profile's metadata and statistics, or None."""
    if not isinstance(meta, dict):
        return "metadata is not an object"
    for section, keys in META_SCHEMA.items():
        if not isinstance(meta.get(section), dict):
            return f"no {section!r} section"
        for k, ann in keys.items():
            if k not in meta[section] or not conforms(meta[section][k], ann):
                return f"{section}.{k} missing or not {ann}"
    parts = meta["data"].get("parts", [meta["data"]])
    if not isinstance(parts, list) or not all(isinstance(p, dict) for p in parts):
        return "data.parts malformed"
    for p in parts:
        for k, ann in PART_SCHEMA.items():
            if not conforms(p.get(k), ann) and not (k == "heldout_ids" and k not in p):  # before emo 0.1
                return f"data {k} not {ann}"
    ids = meta["model"]["expert_ids"]
    L = len(ids)
    width = tensors["counts"].shape[-1] if tensors["counts"].dim() == 2 else -1
    for k in STATS:
        if tuple(tensors[k].shape) != (L, width) or not tensors[k].is_floating_point():
            return f"{k} has shape {tuple(tensors[k].shape)}, expected {L} layers x {width}"
    if tuple(tensors["tokens"].shape) != (L,) or not tensors["tokens"].is_floating_point():
        return f"tokens has shape {tuple(tensors['tokens'].shape)}, expected ({L},)"
    if len(meta["model"]["fixed_ids"]) != L or len(meta["model"]["routed_top_k"]) != L:
        return "per-layer lists of different lengths"
    for layer_ids, fixed in zip(ids, meta["model"]["fixed_ids"]):
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
def profile_model(model, batches, meta: dict, on_step=None, resume_dir: Path | None = None, on_resume=None,
                  checkpoint_docs: int | None = None) -> Profile:
    """Run every batch through `model` (layer-major, no lm_head) and accumulate the profile;
    `on_step(layer, n_docs, n_tokens)` reports progress after each batch of each layer.

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
    lay = layout(model)
    width = max((max(ids) + 1 for ids in lay["expert_ids"] if ids), default=0)
    if width == 0:
        raise EmoError("the model has no MoE layers to profile")
    meta = dict(meta)
    meta["model"] = {**meta.get("model", {}), **lay}
    meta["emo_version"] = __version__
    prof = Profile.empty(model.num_layers, width, meta)
    acc = ProfileAccumulator(prof, lay["expert_ids"])

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
    key = hashlib.sha256((json.dumps(prof.meta, sort_keys=True) + layout_key).encode()).hexdigest()[:16]
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
