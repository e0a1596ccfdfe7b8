"""HF EMO directory -> GGUF that llama.cpp runs exactly (`deepseek` mapping, see gguf/layout.py).

Streaming: every tensor's info is declared first, then header, metadata and tensor infos are
written, then the data tensor by tensor, each built from the memory-mapped safetensors shards
(an expert stack is encoded expert by expert into its output buffer), so peak memory is about
one stacked tensor plus one expert, never the model.

Quantization: f32/f16/bf16/q8_0/q4_0/q5_0 are encoded here with gguf-py; norms and the router stay
f32, and a tensor whose rows are not a whole number of quant blocks falls back to f16 as
llama.cpp's quantizer does. K-quants are made by llama.cpp itself (`llama_model_quantize`) from
an intermediate file in the source precision, which is always removed.
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
from gguf import GGML_QUANT_SIZES, GGML_QUANT_VERSION, GGUFWriter, TokenType
from gguf import GGMLQuantizationType as QT
from gguf.metadata import Metadata
from gguf.quants import quant_shape_to_byte_shape, quantize

from emo_cli.arch.emo import EmoConfig
from emo_cli.arch.registry import architecture
from emo_cli.errors import EmoError
from emo_cli.gguf import layout as gf
from emo_cli.gguf.quants import QUANTS, quant_types
from emo_cli.model.bpe import CL100K_SPLIT
from emo_cli.model.loading import HFModelFiles, open_hf_dir, read_pruning_metadata
from emo_cli.outputs import check_location, remove_stale

Progress = Callable[[str, int, int], None]  # (stage, done, total)


# ---- what cannot be represented ------------------------------------------------------------------
def gguf_blocker(config: EmoConfig, model_dir: Path | None = None) -> str | None:
    """One line (reason and fix) when llama.cpp cannot run this model exactly, else None.

    `model_dir`, when given, also checks the tokenizer's pre-tokenization.
    """
    cfg = config
    arch = architecture(cfg.model_type)
    if arch.gguf_arch != gf.ARCH:
        return f"model_type {cfg.model_type!r} has no GGUF mapping here (emo writes llama.cpp's {gf.ARCH!r})"
    moe = cfg.moe_layers()
    if not moe:
        return "the model has no MoE layer; llama.cpp's deepseek graph needs at least one"
    dense = [i for i in range(cfg.num_hidden_layers) if i not in moe]
    late = [i for i in dense if i > moe[0]]
    if late:
        return (f"dense layer {late[0]} comes after MoE layer {moe[0]}: llama.cpp only supports dense "
                f"layers before all MoE layers (leading_dense_block_count)")
    if dense and cfg.dense_mlp_bias:
        return "the dense MLP layers have biases, which llama.cpp's deepseek graph does not apply"
    counts = {i: cfg.layer_experts(i) for i in moe}
    other = next((i for i in moe if counts[i] != counts[moe[0]]), None)
    if other is not None:
        return (f"layers keep different expert counts ({counts[moe[0]]} in layer {moe[0]}, {counts[other]} in "
                f"layer {other}) but a GGUF has one expert count for all layers: prune with --allocation uniform")
    aa = next((i for i in moe if cfg.layer_always_active(i)), None)
    if aa is not None:
        return (f"layer {aa} has always-active experts {list(cfg.layer_always_active(aa))}, a routing "
                f"path llama.cpp's deepseek graph does not have: use the HF directory with emo's runtime")
    shared = {cfg.layer_shared(i) for i in moe}
    if len(shared) > 1:
        return "layers have different shared-expert counts; a GGUF has one count for all layers"
    ns = shared.pop()
    if ns > 1:
        return (f"{ns} shared experts per layer are weighted by their own softmax; llama.cpp adds one "
                f"unweighted shared expert, so only 0 or 1 can be exported exactly")
    if cfg.norm_topk_prob:
        return ("norm_topk_prob renormalises the top-k routing weights, which llama.cpp's deepseek "
                "graph does not: use the HF directory with emo's runtime")
    if min(cfg.num_experts_per_tok, counts[moe[0]]) - ns < 1:
        return f"top-k {cfg.num_experts_per_tok} leaves no routed expert besides the shared one"
    if cfg.attention_bias:
        return "attention projections have biases, which llama.cpp's deepseek graph does not apply"
    if cfg.rope_scaling:
        return f"rope_scaling {cfg.rope_scaling} is not exported (only plain RoPE is mapped)"
    if cfg.hidden_act != "silu":
        return f"hidden_act {cfg.hidden_act!r}: llama.cpp's deepseek experts use silu"
    if model_dir is not None:
        try:
            pre_tokenizer_name(read_tokenizer_json(Path(model_dir)))
        except EmoError as e:
            return str(e)
    return None


# ---- tokenizer -----------------------------------------------------------------------------------
def read_tokenizer_json(model_dir: Path) -> dict:
    path = Path(model_dir) / "tokenizer.json"
    if not path.exists():
        raise EmoError(f"{model_dir}: missing tokenizer.json (the GGUF needs the vocabulary)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EmoError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None


def pre_tokenizer_name(tj: dict) -> str:
    """llama.cpp's pre-tokenizer for this tokenizer.json, judged from its own pre-tokenization.

    A cl100k-style split followed by byte-level mapping (EMO's dolma2 tokenizer, and emo's model/bpe.py
    tokenizers) is llama.cpp's `dbrx`. Anything else is refused rather than silently tokenized
    differently.
    """
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise EmoError(f"tokenizer model {model.get('type')!r} is not byte-level BPE; GGUF export maps only gpt2-style BPE")
    if tj.get("normalizer"):
        raise EmoError(f"tokenizer normalizer {tj['normalizer'].get('type')!r} has no llama.cpp equivalent")
    pre = tj.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if len(steps) == 2 and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel":
        split, byte_level = steps
        regex = (split.get("pattern") or {}).get("Regex")
        # "Isolated" keeps the matches as pieces; "Removed" + invert keeps the same pieces
        keeps_matches = (split.get("behavior"), bool(split.get("invert"))) in (("Isolated", False), ("Removed", True))
        if (regex == CL100K_SPLIT and keeps_matches and not byte_level.get("use_regex", True)
                and not byte_level.get("add_prefix_space", False)):
            return "dbrx"
    kinds = [s.get("type") for s in steps]
    raise EmoError(f"unrecognised tokenizer pre-tokenization {kinds}: GGUF export knows the cl100k-style "
                   f"split + byte-level one (llama.cpp 'dbrx'), so this tokenizer cannot be exported exactly")


def _merge_text(m) -> str:
    return m if isinstance(m, str) else " ".join(m)


def add_tokenizer(w: GGUFWriter, model_dir: Path, vocab_rows: int, cfg: EmoConfig) -> None:
    """gpt2-style BPE: tokens by id padded to the embedding rows, types, merges, eos/pad, no BOS."""
    tj = read_tokenizer_json(model_dir)
    pre = pre_tokenizer_name(tj)
    # (id, text, type): the BPE vocabulary, then added tokens (which win for their ids)
    entries = [(i, text, TokenType.NORMAL) for text, i in (tj["model"].get("vocab") or {}).items()]
    entries += [(t["id"], t["content"], TokenType.CONTROL if t.get("special") else TokenType.USER_DEFINED)
                for t in tj.get("added_tokens", [])]
    top = max((e[0] for e in entries), default=-1)
    if top >= vocab_rows:
        raise EmoError(f"{model_dir}: tokenizer id {top} exceeds the {vocab_rows} embedding rows")
    tokens = [f"[PAD{i}]" for i in range(vocab_rows)]  # rows no token uses
    token_types = [TokenType.UNUSED] * vocab_rows
    for i, text, kind in entries:
        tokens[i], token_types[i] = text, kind
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    w.add_token_merges([_merge_text(m) for m in tj["model"].get("merges") or []])
    eos = cfg.eos_ids[0] if cfg.eos_ids else None
    if eos is not None:
        w.add_eos_token_id(eos)
        w.add_bos_token_id(eos)  # EMO has no BOS; llama.cpp wants an id, and add_bos is off
    if cfg.pad_token_id is not None:
        w.add_pad_token_id(cfg.pad_token_id)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    tcfg = Path(model_dir) / "tokenizer_config.json"
    if tcfg.exists():
        try:
            template = json.loads(tcfg.read_text()).get("chat_template")
        except json.JSONDecodeError:
            raise EmoError(f"{tcfg}: invalid JSON") from None
        if isinstance(template, str):
            w.add_chat_template(template)


# ---- tensors -------------------------------------------------------------------------------------
@dataclass
class _Planned:
    name: str
    shape: tuple[int, ...]  # numpy order, elements
    qtype: QT
    build: Callable[[QT], np.ndarray]  # the encoded data (float array, or uint8 quant bytes)


def tensor_type(name: str, shape: tuple[int, ...], base: QT) -> QT:
    """The type a tensor is stored in for a file whose weights are `base`."""
    if len(shape) == 1 or gf.keeps_f32(name):
        return QT.F32
    block = GGML_QUANT_SIZES[base][0]
    if shape[-1] % block:
        return QT.F16  # rows must hold whole quant blocks; llama.cpp falls back the same way
    return base


def encode(a: np.ndarray, qtype: QT) -> np.ndarray:
    a = np.ascontiguousarray(a, dtype=np.float32)
    if qtype == QT.F32:
        return a
    if qtype == QT.F16:
        return a.astype(np.float16)
    return quantize(a, qtype)  # uint8, rows of quant blocks


def encoded_shape(shape: tuple[int, ...], qtype: QT) -> tuple[int, ...]:
    if qtype in (QT.F32, QT.F16):
        return shape
    return tuple(quant_shape_to_byte_shape(shape, qtype))


def _stack(loaders: list[Callable[[], np.ndarray]], qtype: QT) -> np.ndarray:
    """Encode expert by expert into one [E, ...] buffer, so only one expert is ever in f32."""
    first = encode(loaders[0](), qtype)
    out = np.empty((len(loaders), *first.shape), dtype=first.dtype)
    out[0] = first
    for j, load in enumerate(loaders[1:], 1):
        out[j] = encode(load(), qtype)
    return out


def plan_tensors(files: HFModelFiles) -> list[_Planned]:
    """Every GGUF tensor in file order, with how to build it from the HF checkpoint."""
    cfg, ckpt = files.config, files.ckpt
    D, F, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    H, Hkv = cfg.num_attention_heads, cfg.kv_heads

    def hf(name: str) -> Callable[[], np.ndarray]:
        return lambda: ckpt.get(name).float().numpy()

    def permuted(name: str, heads: int) -> Callable[[], np.ndarray]:
        return lambda: gf.permute_qk(ckpt.get(name).float().numpy(), heads)

    def one(name, shape, load):
        return (name, tuple(shape), lambda qt: encode(load(), qt))

    names = files.names
    items = [one(gf.TOKEN_EMBD, ckpt.shape(names.embed), hf(names.embed))]
    for i in range(cfg.num_hidden_layers):
        att = {role: names.in_layer(i, rel) for role, rel in names.attention.items()}
        items += [
            one(gf.blk(i, gf.ATTN_NORM), (D,), hf(att["attn_norm"])),
            one(gf.blk(i, gf.ATTN_Q), (H * hd, D), permuted(att["q"], H)),
            one(gf.blk(i, gf.ATTN_K), (Hkv * hd, D), permuted(att["k"], Hkv)),
            one(gf.blk(i, gf.ATTN_V), (Hkv * hd, D), hf(att["v"])),
            one(gf.blk(i, gf.ATTN_OUT), (D, H * hd), hf(att["o"])),
            one(gf.blk(i, gf.FFN_NORM), (D,), hf(att["ffn_norm"])),
        ]
        n = cfg.layer_experts(i)
        if n == 0:
            Fd = cfg.dense_intermediate_size
            dense = {role: names.in_layer(i, rel) for role, rel in names.dense.items()}
            items += [one(gf.blk(i, gf.FFN_GATE), (Fd, D), hf(dense["gate"])),
                      one(gf.blk(i, gf.FFN_UP), (Fd, D), hf(dense["up"])),
                      one(gf.blk(i, gf.FFN_DOWN), (D, Fd), hf(dense["down"]))]
            continue
        ns = cfg.layer_shared(i)
        er = n - ns  # routed experts are 0..er-1; the shared one (if any) is the last index
        router = names.router_of(i)
        if ckpt.shape(router) != (n, D):
            raise EmoError(f"{files.dir}: {router} has shape {ckpt.shape(router)}, expected {(n, D)}")
        items.append(one(gf.blk(i, gf.FFN_GATE_INP), (er, D), lambda r=router, e=er: ckpt.get(r)[:e].float().numpy()))
        projs = names.expert_projs
        for gname, ours, shape in ((gf.FFN_GATE_EXPS, "w_gate", (F, D)), (gf.FFN_UP_EXPS, "w_up", (F, D)),
                                   (gf.FFN_DOWN_EXPS, "w_down", (D, F))):
            loaders = [hf(names.expert_of(i, j, projs[ours])) for j in range(er)]
            items.append((gf.blk(i, gname), (er, *shape), lambda qt, L=loaders: _stack(L, qt)))
        for gname, ours, shape in ((gf.FFN_GATE_SHEXP, "w_gate", (F, D)), (gf.FFN_UP_SHEXP, "w_up", (F, D)),
                                   (gf.FFN_DOWN_SHEXP, "w_down", (D, F))):
            load = hf(names.expert_of(i, er, projs[ours])) if ns else (lambda s=shape: np.zeros(s, np.float32))
            items.append(one(gf.blk(i, gname), shape, load))
    items += [one(gf.OUTPUT_NORM, (D,), hf(names.final_norm)),
              one(gf.OUTPUT, ckpt.shape(names.lm_head), hf(names.lm_head))]
    return [_Planned(name, shape, QT.F32, build) for name, shape, build in items]


# ---- metadata ------------------------------------------------------------------------------------
def collect_provenance(files: HFModelFiles, given: dict | None) -> dict:
    """Pruning provenance from pruning_metadata.json, overridden by `given` (field names of PROVENANCE_KEYS)."""
    meta = read_pruning_metadata(files.dir) or {}
    prov = {}
    for name, meta_name in gf.PROVENANCE_METADATA_NAMES.items():
        if meta.get(meta_name) is not None:
            prov[name] = meta[meta_name]
    prov.update({k: v for k, v in (given or {}).items() if v is not None})
    unknown = set(prov) - set(gf.PROVENANCE_KEYS)
    if unknown:
        raise EmoError(f"unknown provenance field {sorted(unknown)[0]!r} (known: {', '.join(gf.PROVENANCE_KEYS)})")
    kept = prov.get("experts_kept_per_layer")
    if kept is not None:
        cfg = files.config
        if len(kept) != cfg.num_hidden_layers:
            raise EmoError(f"experts_kept_per_layer has {len(kept)} entries for {cfg.num_hidden_layers} layers")
        for i, ids in enumerate(kept):
            n = cfg.layer_experts(i)
            if (ids is None) != (n == 0) or (ids is not None and len(ids) != n):
                raise EmoError(f"experts_kept_per_layer[{i}] does not match layer {i}'s {n} experts")
    return prov


def add_general(w: GGUFWriter, model_dir: Path, planned: list, expert_count: int) -> None:
    """general.name, basename, size_label, license, base_model.* ... as llama.cpp's converter
    writes them (gguf-py's Metadata: the model card's front matter, config and folder name), so
    llama.cpp, LM Studio and Ollama show the model sensibly. Parameters are counted as the
    converter counts them: a `_exps` tensor is expert_count experts, anything else is shared."""
    expert = sum(math.prod(t.shape) for t in planned if "_exps." in t.name) // max(expert_count, 1)
    shared = sum(math.prod(t.shape) for t in planned if "_exps." not in t.name)
    total = shared + expert * expert_count
    try:
        meta = Metadata.load(None, model_dir.resolve(), None, total)
    except Exception:  # a user's README front matter gguf-py cannot parse: keep the folder name only
        meta = Metadata()
    if meta.name is None:
        meta.name = model_dir.resolve().name
    if meta.size_label is None:
        meta.size_label = gguf.size_label(total, shared, expert, expert_count)
    meta.set_gguf_meta_model(w)


def add_metadata(w: GGUFWriter, files: HFModelFiles, file_type: int, quantized: bool, prov: dict,
                 planned: list) -> None:
    cfg = files.config
    moe = cfg.moe_layers()
    n, ns = cfg.layer_experts(moe[0]), cfg.layer_shared(moe[0])
    n_dense = moe[0]  # the blocker guarantees dense layers only lead
    add_general(w, files.dir, planned, n - ns)
    w.add_file_type(file_type)
    if quantized:
        w.add_quantization_version(GGML_QUANT_VERSION)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.dense_intermediate_size if n_dense else cfg.intermediate_size)
    w.add_leading_dense_block_count(n_dense)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.kv_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_vocab_size(files.ckpt.shape(files.names.embed)[0])
    w.add_expert_count(n - ns)
    w.add_expert_used_count(min(cfg.num_experts_per_tok, n) - ns)
    w.add_expert_shared_count(1)  # deepseek requires a shexp; zero-filled when ns == 0
    w.add_expert_feed_forward_length(cfg.intermediate_size)
    w.add_expert_weights_scale(1.0)
    w.add_uint32(gf.K_EMO_SHARED, ns)
    w.add_string(gf.K_EMO_SOURCE_FINGERPRINT, files.fingerprint)
    add_provenance(w, prov)


def add_provenance(w: GGUFWriter, prov: dict) -> None:
    """Pruning provenance as strings (the kept ids as JSON); also written by `emo prune` of a GGUF."""
    for name, value in prov.items():
        text = json.dumps(value) if name == "experts_kept_per_layer" else (
            ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value))
        w.add_string(gf.PROVENANCE_KEYS[name], text)


# ---- export --------------------------------------------------------------------------------------
def _source_base(files: HFModelFiles) -> QT:
    """Lossless intermediate precision for llama.cpp's K-quants: the checkpoint's own float type."""
    import torch

    dt = files.ckpt.dtype(files.names.embed)
    return {torch.bfloat16: QT.BF16, torch.float16: QT.F16}.get(dt, QT.F32)


def _write(files: HFModelFiles, path: Path, base: QT, file_type: int, prov: dict, progress: Progress | None) -> None:
    planned = plan_tensors(files)
    w = GGUFWriter(path, gf.ARCH)
    try:
        add_metadata(w, files, file_type, base not in (QT.F32, QT.F16, QT.BF16), prov, planned)
        add_tokenizer(w, files.dir, planned[0].shape[0], files.config)
        for t in planned:
            t.qtype = tensor_type(t.name, t.shape, base)
            eshape = encoded_shape(t.shape, t.qtype)
            dtype = {QT.F32: np.float32, QT.F16: np.float16}.get(t.qtype, np.uint8)
            nbytes = int(np.prod(eshape)) * np.dtype(dtype).itemsize
            w.add_tensor_info(t.name, eshape, np.dtype(dtype), nbytes, raw_dtype=t.qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        written = 0
        for k, t in enumerate(planned):
            data = t.build(t.qtype)
            expect = encoded_shape(t.shape, t.qtype)
            if tuple(data.shape) != expect:
                raise EmoError(f"{files.dir}: {t.name} came out {tuple(data.shape)}, expected {expect}")
            w.write_tensor_data(data)
            written += data.nbytes
            if progress:
                progress("writing", k + 1, len(planned), written)
    finally:
        w.close()


def check_quant(quant: str) -> None:
    """A known quant type whose writer is installed: checked before any work (and by `emo prune`
    before it loads anything)."""
    if quant_types(quant)[1] is None:
        _require_llama_cpp(quant)


def _require_llama_cpp(quant: str):
    try:
        import llama_cpp
    except ImportError:
        raise EmoError(f"--quant {quant} is made by llama.cpp: pip install llama-cpp-python==0.3.36 "
                       f"(f16, bf16, q8_0, q4_0 and q5_0 need nothing extra)") from None
    return llama_cpp


def _llama_quantize(src: Path, dst: Path, file_type: int, quant: str) -> None:
    llama_cpp = _require_llama_cpp(quant)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = file_type
    params.nthread = os.cpu_count() or 1
    log = logging.getLogger("llama-cpp-python")  # llama.cpp's log callback goes through this logger
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with _c_output_captured() as captured:
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    finally:
        log.setLevel(level)
    if rc != 0:
        lines = [ln for ln in "".join(captured).splitlines() if ln.strip()]
        why = f": {lines[-1].strip()}" if lines else ""
        raise EmoError(f"llama.cpp could not quantize to {quant} (llama_model_quantize returned {rc}){why}")


@contextmanager
def _c_output_captured():
    """Redirect the process's stdout/stderr file descriptors; yields a list that receives the text.

    llama.cpp's quantizer prints a line per tensor straight from C (fallback notices for tensor
    shapes that K-quants cannot hold); the user sees them only when quantization fails.
    """
    text: list[str] = []
    sys.stdout.flush()
    sys.stderr.flush()
    saved = (os.dup(1), os.dup(2))
    with tempfile.TemporaryFile() as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield text
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            f.seek(0)
            text.append(f.read().decode(errors="replace"))


def export_gguf(model: HFModelFiles | Path, out: Path, quant: str = "f16", provenance: dict | None = None,
                force: bool = False, progress: Progress | None = None) -> dict:
    """Write the HF EMO directory `model` (opened, or its path) as a GGUF file llama.cpp runs exactly.

    Args:
        quant: one of quants.QUANTS.
        provenance: pruning provenance (fields of layout.PROVENANCE_KEYS), overriding what
            the directory's pruning_metadata.json says.
        force: overwrite an existing `out`.
        progress: called as progress(stage, done, total, bytes_written); stages "writing" (tensors),
            then "quantizing" (llama.cpp's K-quants).
    Returns: output path, quant, bytes, f32_bytes (the same file at f32), ratio, tensors, params.
    Raises: EmoError, before anything is written, when the model cannot be represented exactly.
    """
    t0 = time.perf_counter()
    out = Path(out)
    check_quant(quant)
    if out.suffix != ".gguf":
        raise EmoError(f"{out}: the output file name must end in .gguf")
    if out.is_dir():
        raise EmoError(f"{out} is a directory")
    if out.exists() and not force:
        raise EmoError(f"{out} already exists (use --force to overwrite it)")
    check_location(out)
    files = model if isinstance(model, HFModelFiles) else open_hf_dir(Path(model))
    reason = gguf_blocker(files.config, files.dir)
    if reason:
        raise EmoError(f"{files.dir} cannot be exported to GGUF exactly: {reason}")
    prov = collect_provenance(files, provenance)
    file_type, qtype = QUANTS[quant]
    if qtype is None:
        _require_llama_cpp(quant)  # before any work
    remove_stale(out.parent, out.name)  # what a killed export left behind
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    mid = out.with_name(f".{out.name}.{os.getpid()}.src.tmp")
    try:
        if qtype is not None:
            _write(files, tmp, qtype, int(file_type), prov, progress)
        else:
            base = _source_base(files)
            _write(files, mid, base, int(QUANTS[base.name.lower()][0]), prov, progress)
            if progress:
                progress("quantizing", 0, 1, 0)
            _llama_quantize(mid, tmp, int(file_type), quant)
            if progress:
                progress("quantizing", 1, 1, tmp.stat().st_size)
        os.replace(tmp, out)
    finally:
        for p in (tmp, mid):
            p.unlink(missing_ok=True)
    return summarize(out, quant, time.perf_counter() - t0)


def summarize(path: Path, quant: str, seconds: float) -> dict:
    reader = gf.open_reader(path)
    size = path.stat().st_size
    data = sum(int(t.n_bytes) for t in reader.tensors)
    elements = sum(int(t.n_elements) for t in reader.tensors)
    f32 = size - data + 4 * elements  # metadata unchanged, every tensor at 4 bytes per weight
    return {"output": str(path), "quant": quant, "bytes": size, "f32_bytes": f32,
            "ratio": size / f32, "tensors": len(reader.tensors), "params": elements,
            "seconds": round(seconds, 2)}
