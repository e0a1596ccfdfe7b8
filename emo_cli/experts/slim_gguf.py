"""Plan + GGUF file -> slim GGUF, by copying the kept experts' bytes (no re-quantization, no HF round trip).

A stacked expert tensor [E_r, F, D] (numpy order) is quantized row by row along D, so expert e is
the contiguous byte range [e*F*row_bytes, (e+1)*F*row_bytes) whatever the type (F32, F16, Q8_0,
K-quants ...): slicing the first axis of the memory-mapped data keeps every byte and the type.
The router rows [E_r, D] are sliced the same way; every other tensor is copied verbatim.

The result is what `emo export --quant <the source's quant>` writes for the HF directory `emo
prune` would have made with the same plan: same tensors byte for byte (gguf-py's quantizers work
row by row, so slicing commutes with quantizing), and the same metadata, except for what only an
HF directory has (see `_metadata`). A K-quant file keeps the source's per-tensor types, which
llama.cpp's mixes might choose differently when quantizing the slim model afresh.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf import GGUFValueType, GGUFWriter, Keys
from gguf.metadata import Metadata
from gguf.quants import quant_shape_from_byte_shape

from emo_cli.arch.emo import EmoConfig
from emo_cli.errors import EmoError
from emo_cli.experts.selection import Plan
from emo_cli.gguf import layout as gf
from emo_cli.gguf.export import add_provenance
from emo_cli.gguf.quants import quant_name
from emo_cli.gguf.reader import GGUFFile
from emo_cli.outputs import check_outputs, write_atomic

Progress = Callable[[int, int, int], None]  # (tensors done, total, bytes written)

STACKED = (gf.FFN_GATE_INP, gf.FFN_GATE_EXPS, gf.FFN_UP_EXPS, gf.FFN_DOWN_EXPS)  # first axis = routed expert
# general.* keys about the weights' terms of use, not the file: a pruned model keeps them (the HF route
# copies them into the slim directory's model card, which its export reads)
KEPT_GENERAL = (Keys.General.LICENSE, Keys.General.LICENSE_NAME, Keys.General.LICENSE_LINK, Keys.General.LANGUAGES)


@dataclass
class GGUFSource:
    path: Path
    reader: GGUFFile
    config: EmoConfig
    fingerprint: str
    exported_from: str | None  # emo.source_fingerprint: the HF directory the file was exported from
    expert_ids: list[list[int] | None]  # ORIGINAL id of each expert per layer (routed..., shared last)

    @property
    def fingerprints(self) -> tuple[str, ...]:
        """Models whose profiles and plans apply here: the file, and the HF directory it was exported
        from (same experts under the same original ids; only the precision differs)."""
        return (self.fingerprint,) + ((self.exported_from,) if self.exported_from else ())

    @property
    def quant(self) -> str:
        return quant_name(gf.field(self.reader, Keys.General.FILE_TYPE))

    def describe(self) -> str:
        via = f", exported from {self.exported_from}" if self.exported_from else ""
        return f"{self.path} (fingerprint {self.fingerprint}{via})"


def open_source(file: Path | GGUFFile) -> GGUFSource:
    """A GGUF file (its path, or a command's opened reader) as the source of a slim GGUF."""
    reader = file if isinstance(file, GGUFFile) else gf.open_reader(Path(file))
    path = reader.path
    cfg = gf.config_from_gguf(reader, path)
    if not cfg.moe_layers():
        raise EmoError(f"{path} has no MoE layer: there are no experts to prune")
    kept = gf.provenance(reader).get("experts_kept_per_layer")
    ids = []
    for i in range(cfg.num_hidden_layers):
        n = cfg.layer_experts(i)
        if n == 0:
            ids.append(None)
        elif kept is not None:
            if not (isinstance(kept, list) and len(kept) == cfg.num_hidden_layers and isinstance(kept[i], list)
                    and len(set(kept[i])) == len(kept[i]) == n
                    and all(isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in kept[i])):
                raise EmoError(f"{path}: emo.experts_kept_per_layer does not match the file's layers")
            ids.append(list(kept[i]))
        else:
            ids.append(list(range(n)))
    tensors = {t.name: t for t in reader.tensors}
    for i in cfg.moe_layers():
        er = cfg.layer_experts(i) - cfg.layer_shared(i)
        for name in STACKED + (gf.FFN_GATE_SHEXP, gf.FFN_UP_SHEXP, gf.FFN_DOWN_SHEXP):
            t = tensors.get(gf.blk(i, name))
            if t is None:
                raise EmoError(f"{path}: GGUF lacks tensor {gf.blk(i, name)} (not a complete emo export)")
            if name in STACKED and (t.data.ndim < 2 or t.data.shape[0] != er):
                raise EmoError(f"{path}: {t.name} does not hold the {er} routed experts the file's keys imply")
    exported_from = gf.field(reader, gf.K_EMO_SOURCE_FINGERPRINT)
    return GGUFSource(path, reader, cfg, gf.gguf_fingerprint(reader),
                      exported_from if isinstance(exported_from, str) else None, ids)


def output_path(output: Path | None, gguf_path: Path | None, no_gguf: bool, stem: str) -> Path:
    """The slim file: --gguf, else -o (`.gguf` added unless it has it), else slim-<data stem>.gguf."""
    if no_gguf:
        raise EmoError("--no-gguf: pruning a .gguf model writes only a GGUF (prune the HF directory for one)")
    if gguf_path is not None and output is not None and Path(output) != Path(gguf_path):
        raise EmoError("-o and --gguf both name the output of a .gguf model: pass one of them")
    out = Path(gguf_path or output or f"slim-{stem}")
    return out if out.suffix == ".gguf" else out.with_name(out.name + ".gguf")


def check_quant(source: GGUFSource, quant: str | None) -> None:
    if quant is not None and quant != source.quant:
        raise EmoError(f"--quant {quant}: pruning a .gguf copies its {source.quant} tensors without re-quantizing; "
                       f"leave --quant out (or export the pruned HF directory at {quant})")


def local_kept(source: GGUFSource, plan: Plan) -> dict[int, list[int]]:
    """Positions in the file of the experts the plan keeps, per MoE layer, ascending (as prune_to_dir
    renumbers them, so the shared expert stays last); checked against what one GGUF can hold."""
    if plan.model_fingerprint not in source.fingerprints:
        raise EmoError(f"the plan was made for model {plan.model_fingerprint}, not {source.describe()}")
    cfg, out = source.config, {}
    for i in cfg.moe_layers():
        ids, ns = source.expert_ids[i], cfg.layer_shared(i)
        wanted = plan.kept.get(i)
        if wanted is None:
            out[i] = list(range(len(ids)))
            continue
        missing = sorted(set(wanted) - set(ids))
        if missing:
            raise EmoError(f"plan keeps expert {missing[0]} in layer {i}, which {source.path} does not have")
        pos = {e: j for j, e in enumerate(ids)}
        out[i] = sorted(pos[e] for e in set(wanted))
        if ns and len(ids) - 1 not in out[i]:
            raise EmoError(f"plan drops the shared expert of layer {i}; shared experts are always kept")
    counts = {i: len(v) for i, v in out.items()}
    first = next(iter(counts))
    other = next((i for i in counts if counts[i] != counts[first]), None)
    if other is not None:
        raise EmoError(f"the plan keeps different expert counts ({counts[first]} in layer {first}, {counts[other]} "
                       f"in layer {other}) but a GGUF has one expert count for all layers: prune with --allocation uniform")
    if counts[first] - cfg.layer_shared(first) < 1:
        raise EmoError("the plan keeps no routed expert besides the shared one")
    return out


def _routed(source: GGUFSource, local: dict[int, list[int]], layer: int) -> list[int]:
    er = source.config.layer_experts(layer) - source.config.layer_shared(layer)
    return [j for j in local[layer] if j < er]


def _layer_of(name: str) -> tuple[int | None, str]:
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit():
        return int(parts[1]), parts[2]
    return None, name


def _slim_tensors(source: GGUFSource, local: dict[int, list[int]]):
    """(name, type, data) of every tensor of the slim file in the source's order; data is the map
    itself, or the kept experts' rows copied out of it (one tensor at a time)."""
    for t in source.reader.tensors:
        layer, kind = _layer_of(t.name)
        if layer in local and kind in STACKED:
            yield t.name, t.tensor_type, t.data[_routed(source, local, layer)]  # [E_kept, ...] bytes as stored
        else:
            yield t.name, t.tensor_type, t.data


def expected_size(source: GGUFSource, plan: Plan) -> tuple[int, int]:
    """(tensor bytes of the source, tensor bytes of the slim file): an expert is a fixed share of a stack."""
    local = local_kept(source, plan)
    full = slim = 0
    for t in source.reader.tensors:
        layer, kind = _layer_of(t.name)
        full += int(t.n_bytes)
        if layer in local and kind in STACKED:
            slim += int(t.n_bytes) * len(_routed(source, local, layer)) // int(t.data.shape[0])
        else:
            slim += int(t.n_bytes)
    return full, slim


def _copy_field(w: GGUFWriter, reader: GGUFFile, key: str) -> None:
    f = reader.get_field(key)
    value, types = gf.field(reader, key), f.types
    if types[0] == GGUFValueType.ARRAY:
        if len(types) != 2:
            raise EmoError(f"GGUF key {key} is a nested array, which emo does not copy")
        if len(value):  # gguf-py cannot write an empty array (and writes none itself)
            w.add_key_value(key, value, types[0], sub_type=types[1])
    else:
        w.add_key_value(key, value, types[0])


def _general(w: GGUFWriter, reader: GGUFFile, name: str, tensors: list, expert_count: int) -> None:
    """general.* as `add_general` writes them for the slim directory `name`: name, basename... by
    gguf-py's heuristics from the name, the model card's tags and license, and the size label counted
    the converter's way. The source's identity (its name, URLs, base models) is not the slim model's:
    the HF route does not carry it either, as its model card names a base model only for Hub repos."""
    from emo_cli.experts.model_card import TAGS

    expert = sum(math.prod(shape) for n, shape in tensors if "_exps." in n) // max(expert_count, 1)
    shared = sum(math.prod(shape) for n, shape in tensors if "_exps." not in n)
    total = shared + expert * expert_count
    card = {"tags": list(TAGS)}
    for key, card_key in zip(KEPT_GENERAL, ("license", "license_name", "license_link", "language")):
        v = gf.field(reader, key)
        if v is not None:
            card[card_key] = v
    meta = Metadata.apply_metadata_heuristic(Metadata(), card, None, Path(name), total)
    if meta.name is None:
        meta.name = name
    if meta.size_label is None:
        meta.size_label = gguf.size_label(total, shared, expert, expert_count)
    meta.set_gguf_meta_model(w)
    for key in reader.fields:  # sampling defaults (generation_config.json on the HF route)
        if key.startswith("general.sampling."):
            _copy_field(w, reader, key)


def _metadata(w: GGUFWriter, source: GGUFSource, name: str, tensors: list, local: dict[int, list[int]],
              prov: dict) -> None:
    """The source's keys with the expert counts of the slim model, in `add_metadata`'s order.

    Differs from `emo export` of the pruned HF directory only in what has no GGUF-side source:
    emo.source_fingerprint (the fingerprint of an HF directory that never existed) is left out, and
    emo.source_model names the .gguf this was cut from."""
    reader, cfg = source.reader, source.config
    moe = cfg.moe_layers()
    n, ns = len(local[moe[0]]), cfg.layer_shared(moe[0])
    top_k = min(cfg.num_experts_per_tok, n)  # slim_config's rule: never more than the experts kept
    _general(w, reader, name, tensors, n - ns)
    if reader.get_field(Keys.General.ALIGNMENT) is not None:
        w.add_custom_alignment(int(gf.field(reader, Keys.General.ALIGNMENT)))
    skip = {Keys.General.ARCHITECTURE, Keys.General.ALIGNMENT, gf.K_EMO_SOURCE_FINGERPRINT,
            *gf.PROVENANCE_KEYS.values()}
    counts = {gf.K_EXPERTS: n - ns, gf.K_EXPERTS_USED: top_k - ns}
    later = []
    for key in reader.fields:
        if key.startswith("GGUF.") or key in skip or (key.startswith("general.") and key not in (
                Keys.General.FILE_TYPE, Keys.General.QUANTIZATION_VERSION)):
            continue
        if key.startswith("tokenizer."):
            later.append(key)  # after the provenance, as export writes them
        elif key in counts:
            w.add_uint32(key, counts[key])
        else:
            _copy_field(w, reader, key)
    add_provenance(w, prov)
    for key in later:
        _copy_field(w, reader, key)


def prune_gguf(source: GGUFSource | Path, plan: Plan, out: Path, force: bool = False,
               source_name: str | None = None, progress: Progress | None = None) -> dict:
    """Write the slim GGUF of `plan` (kept ORIGINAL expert ids per layer) cut from `source`.

    Written under a staging name and renamed when complete; an existing `out` is replaced only with
    `force`, and only if it is a GGUF file. Returns path, quant, bytes, tensors.
    """
    if not isinstance(source, GGUFSource):
        source = open_source(source)
    out = Path(out)
    if out.suffix != ".gguf":
        raise EmoError(f"{out}: the output file name must end in .gguf")
    local = local_kept(source, plan)  # before anything is written
    if out.resolve() == source.path.resolve():
        raise EmoError(f"{out} is the model being pruned; write the slim file under another name")
    check_outputs(None, out, force)
    cfg = source.config
    kept_orig = [None if source.expert_ids[i] is None else [source.expert_ids[i][j] for j in local[i]]
                 for i in range(cfg.num_hidden_layers)]
    prov = {"source_model": source_name or str(source.path), "experts_kept_per_layer": kept_orig,
            "method": plan.method, "budget": plan.budget,
            "profile_fingerprint": plan.extra.get("profile_fingerprint")}
    prov = {k: v for k, v in prov.items() if v is not None}
    shapes = [(name, _element_shape(data, qtype)) for name, qtype, data in _slim_tensors(source, local)]

    def write(tmp: Path) -> None:
        w = GGUFWriter(tmp, gf.ARCH)
        try:
            _metadata(w, source, out.stem, shapes, local, prov)
            for name, qtype, data in _slim_tensors(source, local):
                w.add_tensor_info(name, data.shape, data.dtype, data.nbytes, raw_dtype=qtype)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            written = 0
            for k, (_name, _qtype, data) in enumerate(_slim_tensors(source, local)):
                w.write_tensor_data(np.ascontiguousarray(data))
                written += data.nbytes
                if progress:
                    progress(k + 1, len(shapes), written)
        finally:
            w.close()

    write_atomic(out, write)
    return {"path": str(out), "quant": source.quant, "bytes": out.stat().st_size, "tensors": len(shapes),
            "experts_kept_per_layer": kept_orig}


def _element_shape(data: np.ndarray, qtype) -> tuple[int, ...]:
    """Numpy element shape of a tensor the reader maps as bytes (quantized, BF16)."""
    return tuple(quant_shape_from_byte_shape(data.shape, qtype)) if data.dtype == np.uint8 else data.shape
