"""Resolve MODEL (HF directory, HF repo id in the local cache, or .gguf) and build the runtime model.

Loading is tensor by tensor from memory-mapped safetensors; each layer's experts are stacked as
they are read, so peak memory is the model plus one layer, never two copies of the weights.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from emo_cli.arch.emo import EmoConfig, EmoForCausalLM
from emo_cli.arch.layers import MoEBlock
from emo_cli.arch.registry import architecture, read_config
from emo_cli.arch.spec import Architecture, TensorNames
from emo_cli.errors import EmoError
from emo_cli.model.checkpoint import SafetensorsCheckpoint, ShardWriter, write_moe_layer

DEFAULT_MODEL = "allenai/Emo_1b14b_1T"
ASSETS = Path(__file__).parent.parent / "assets"
# The models shipped inside the package, usable by name wherever a MODEL is accepted (a local
# file or directory of the same name wins): try emo without the 14B download.
EMBEDDED_MODELS = {"tiny-emo": ASSETS / "tiny-emo", "tiny-stdmoe": ASSETS / "tiny-stdmoe"}
LICENSE_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md", "NOTICE")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def hf_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    return home / "hub"


def find_in_hf_cache(repo_id: str) -> Path | None:
    """The snapshot directory of `repo_id` in the local HF cache (refs/main first), or None."""
    repo = hf_cache_dir() / ("models--" + repo_id.replace("/", "--"))
    snaps = repo / "snapshots"
    if not snaps.is_dir():
        return None
    ref = repo / "refs" / "main"
    if ref.exists():
        snap = snaps / ref.read_text().strip()
        if (snap / "config.json").exists():
            return snap
    for snap in sorted(snaps.iterdir()):
        if (snap / "config.json").exists():
            return snap
    return None


def resolve_model_path(spec: str | os.PathLike) -> Path:
    """A local directory or .gguf file, an embedded model's name (tiny-emo, tiny-stdmoe), or an
    `org/name` repo id found in the local HF cache."""
    p = Path(spec).expanduser()
    if p.exists():
        if p.is_dir() or p.suffix == ".gguf":
            return p
        raise EmoError(f"{p}: not a model directory or .gguf file")
    s = str(spec)
    if s in EMBEDDED_MODELS:
        if not (EMBEDDED_MODELS[s] / "config.json").exists():
            raise EmoError(f"{s}: the embedded model is missing from this installation ({EMBEDDED_MODELS[s]})")
        return EMBEDDED_MODELS[s]
    if s.endswith(".gguf") or s.startswith((".", "/")) or s.count("/") != 1:
        raise EmoError(f"{s}: no such model file or directory")
    found = find_in_hf_cache(s)
    if found is None:
        raise EmoError(
            f"model {s} is not in the local Hugging Face cache ({hf_cache_dir()}); get it with "
            f"`huggingface-cli download {s}` on a machine with network access, or pass a local "
            f"directory with --model (or an embedded model: {', '.join(EMBEDDED_MODELS)})"
        )
    return found


def is_gguf(path: Path) -> bool:
    return Path(path).suffix == ".gguf" and Path(path).is_file()


@dataclass
class HFModelFiles:
    dir: Path
    config: EmoConfig
    config_text: str
    ckpt: SafetensorsCheckpoint
    arch: Architecture

    @property
    def names(self) -> TensorNames:
        return self.arch.names

    @property
    def fingerprint(self) -> str:
        return self.ckpt.fingerprint(self.config_text)


def open_hf_dir(path: Path) -> HFModelFiles:
    path = Path(path)
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise EmoError(f"{path}: missing config.json (not a Hugging Face model directory)")
    arch, cfg = read_config(cfg_path)
    text = cfg_path.read_text(encoding="utf-8")
    ckpt = SafetensorsCheckpoint(path)
    embed = arch.names.embed
    if embed not in ckpt.headers:
        raise EmoError(f"{path}: checkpoint has no {embed}")
    vocab, hidden = ckpt.shape(embed)
    if hidden != cfg.hidden_size:
        raise EmoError(f"{path}: {embed} has width {hidden} but hidden_size is {cfg.hidden_size}")
    cfg.vocab_size = vocab  # the tensor decides (released configs may disagree)
    return HFModelFiles(path, cfg, text, ckpt, arch)


def default_dtype(device: str, ckpt_dtype: torch.dtype) -> torch.dtype:
    # this CPU has no fast bf16 matmul: compute in fp32 there; keep the checkpoint dtype on GPUs
    return torch.float32 if device == "cpu" else ckpt_dtype


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name in (None, "auto"):
        return None
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise EmoError(f"unknown dtype {name!r} (use auto, float32, bfloat16 or float16)")
    return table[name]


def deterministic_cuda() -> None:
    """Reproducible GPU passes. By default CUDA's scatter/index_add kernels add floats in whatever
    order threads finish: on an H100 two runs of the same `emo profile` gave different selection
    counts (2.8% apart on some experts). With deterministic algorithms (and cuBLAS's fixed
    workspace, which must be set before its first handle), one process and a torchrun run
    agreed exactly on counts and to 4e-16 on sums."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)


def check_device(device: str) -> str:
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise EmoError(f"unknown device {device!r} (use cpu or cuda)")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EmoError("--device cuda requested but no CUDA GPU is available")
    if device.startswith("cuda"):
        deterministic_cuda()
    return device


def source_expert_ids(model_dir: Path, cfg) -> list[list[int] | None]:
    """ORIGINAL ids of each layer's experts (identity for an unpruned model)."""
    meta = read_pruning_metadata(model_dir)
    known = meta.get("experts_kept_per_layer") if meta else None
    out = []
    for i in range(cfg.num_hidden_layers):
        n = cfg.layer_experts(i)
        if n == 0:
            out.append(None)
        elif known and known[i] is not None:
            out.append([int(e) for e in known[i]])
        else:
            out.append(list(range(n)))
    return out


def read_weight(files: HFModelFiles, name: str, shape: tuple[int, ...], device, dtype) -> torch.Tensor:
    """One tensor converted from the mapped checkpoint into a tensor of its own (never the map)."""
    t = files.ckpt.view(name)
    if tuple(t.shape) != tuple(shape):
        raise EmoError(f"{files.dir}: tensor {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    return t.to(device=device, dtype=dtype, copy=True)


def layer_sources(files: HFModelFiles, i: int, block) -> list[tuple[str, str, tuple[int, ...], int | None]]:
    """Where every parameter of layer i comes from: (checkpoint name, parameter name, shape, expert
    row of a stacked tensor or None), checked against the safetensors headers alone."""
    ckpt, names = files.ckpt, files.names
    expected = {n: tuple(p.shape) for n, p in block.named_parameters()}
    moe = isinstance(block.mlp, MoEBlock)
    out = [(names.in_layer(i, n), n, shape, None) for n, shape in expected.items()
           if not (moe and n.startswith("mlp."))]
    if moe:
        E = block.mlp.spec.num_experts
        out.append((names.router_of(i), "mlp.router", expected["mlp.router"], None))
        for ours, proj in names.expert_projs.items():
            out += [(names.expert_of(i, j, proj), f"mlp.{ours}", expected[f"mlp.{ours}"][1:], j) for j in range(E)]
    for name, ours, shape, row in out:
        if name not in ckpt.headers:
            raise EmoError(f"{files.dir}: checkpoint has no tensor {name}")
        if ckpt.shape(name) != shape:
            what = f"layer {i} expert {row} {name.rsplit('.', 2)[-2]}" if row is not None else f"tensor {name}"
            if ours == "mlp.router" and ckpt.shape(name)[1:] == shape[1:]:
                raise EmoError(f"{files.dir}: layer {i} router has {ckpt.shape(name)[0]} rows but config says "
                               f"{shape[0]} experts")
            raise EmoError(f"{files.dir}: {what} has shape {ckpt.shape(name)}, expected {shape}")
        ckpt.dtype(name)  # an unsupported dtype fails here, before any pass starts
    return out


def check_checkpoint(files: HFModelFiles) -> None:
    """Every tensor the config asks for is in the checkpoint with its shape (headers only): a
    streamed pass must not find a bad layer after an hour of work."""
    cfg = files.config
    with torch.device("meta"):
        for i in range(cfg.num_hidden_layers):
            layer_sources(files, i, files.arch.block_class(cfg, i))
    D, V = cfg.hidden_size, cfg.vocab_size
    for name, shape in ((files.names.final_norm, (D,)), (files.names.lm_head, (V, D))):
        if name not in files.ckpt.headers:
            raise EmoError(f"{files.dir}: checkpoint has no tensor {name}")
        if files.ckpt.shape(name) != shape:
            raise EmoError(f"{files.dir}: tensor {name} has shape {files.ckpt.shape(name)}, expected {shape}")


def load_block(files: HFModelFiles, i: int, device, dtype: torch.dtype, expert_ids: list[int] | None):
    """Decoder layer i from the checkpoint: the unit a streamed pass holds at a time. Each expert
    is copied (and converted) straight from the map into its row of the stacked tensors, so
    loading never holds a second copy of the layer."""
    with torch.device("meta"):
        block = files.arch.block_class(files.config, i)
    sources = layer_sources(files, i, block)
    params = dict(block.named_parameters())
    state: dict[str, torch.Tensor] = {}
    for name, ours, shape, row in sources:
        if row is None:
            state[ours] = read_weight(files, name, shape, device, dtype)
            continue
        if ours not in state:  # [E, F, D] / [E, D, F], filled expert by expert
            state[ours] = torch.empty(params[ours].shape, device=device, dtype=dtype)
        state[ours][row].copy_(files.ckpt.view(name))
    if isinstance(block.mlp, MoEBlock):
        E = block.mlp.spec.num_experts
        state["mlp.expert_ids"] = torch.tensor(expert_ids if expert_ids is not None else range(E),
                                               dtype=torch.long, device=device)
    block.load_state_dict(state, assign=True, strict=True)
    return block.requires_grad_(False).eval()


def load_hf_model(path: Path, device: str = "cpu", dtype: torch.dtype | None = None) -> tuple[EmoForCausalLM, HFModelFiles]:
    """The whole model resident on `device`, no memory planning (runtime.load_model plans)."""
    files = open_hf_dir(path)
    device = check_device(device)
    return load_resident(files, device, dtype or default_dtype(device, files.ckpt.dtype(files.names.embed))), files


def load_resident(files: HFModelFiles, device: str, dtype: torch.dtype) -> EmoForCausalLM:
    """The whole model resident on `device` (see model/streaming.py for one layer at a time)."""
    cfg = files.config
    with torch.device("meta"):
        model = files.arch.model_class(cfg)
    ids = source_expert_ids(files.dir, cfg)
    model.layers = torch.nn.ModuleList(load_block(files, i, device, dtype, ids[i]) for i in range(cfg.num_hidden_layers))
    names = files.names
    for name, module in ((names.embed, model.embed_tokens), (names.final_norm, model.norm),
                         (names.lm_head, model.lm_head)):
        module.weight = torch.nn.Parameter(read_weight(files, name, module.weight.shape, device, dtype), requires_grad=False)
    model.requires_grad_(False)
    model.eval()
    return model


def read_pruning_metadata(path: Path) -> dict | None:
    f = Path(path) / "pruning_metadata.json"
    if not f.exists():
        return None
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError:
        raise EmoError(f"{f}: invalid JSON") from None


def save_hf_model(model: EmoForCausalLM, out_dir: Path, dtype: torch.dtype | None = None,
                  tokenizer_dir: Path | None = None, shard_bytes: int = 2 * 1024**3) -> None:
    """Write `model` in the released HF layout (per-expert tensor names) into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    w = ShardWriter(out_dir, shard_bytes=shard_bytes, dtype=dtype)
    arch = architecture(cfg.model_type)
    names = arch.names
    w.add(names.embed, model.embed_tokens.weight)
    for i, block in enumerate(model.layers):
        moe = isinstance(block.mlp, MoEBlock)
        for n, t in block.named_parameters():
            if not (moe and n.startswith("mlp.")):
                w.add(names.in_layer(i, n), t)
        if moe:
            m = block.mlp
            write_moe_layer(w, names, i, m.router, m.w_gate, m.w_up, m.w_down)
    w.add(names.final_norm, model.norm.weight)
    w.add(names.lm_head, model.lm_head.weight)
    w.close()
    d = cfg.to_dict()
    d["vocab_size"] = model.embed_tokens.weight.shape[0]
    d["torch_dtype"] = str(dtype or model.dtype).replace("torch.", "")
    d.setdefault("architectures", arch.hf_architectures)
    (out_dir / "config.json").write_text(json.dumps(d, indent=2) + "\n")
    if tokenizer_dir is not None:
        copy_tokenizer_files(Path(tokenizer_dir), out_dir)


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copyfile(src / name, dst / name)


def code_files(src: Path, config: dict) -> list[str]:
    """The Python files a trust_remote_code checkpoint needs: each module its config's auto_map
    names ("configuration_emo.EmoConfig", or "repo--module.Class"), and the local modules those
    import (`from .x import ...`), as found in `src`."""
    auto = config.get("auto_map") if isinstance(config.get("auto_map"), dict) else {}
    refs = [r for v in auto.values() for r in (v if isinstance(v, list) else [v]) if isinstance(r, str)]
    todo = [r.split("--")[-1].rsplit(".", 1)[0] + ".py" for r in refs]
    found: set[str] = set()
    while todo:
        name = todo.pop()
        if name in found or not (src / name).is_file():
            continue
        found.add(name)
        text = (src / name).read_text(encoding="utf-8", errors="replace")
        todo += [m + ".py" for m in re.findall(r"^\s*from \.(\w+) import", text, re.M)]
    return sorted(found)


def copy_support_files(src: Path, dst: Path, config: dict) -> None:
    """Everything beside the weights a derived directory needs to load where its source loads:
    tokenizer and generation config, the remote-code modules, and the license files."""
    copy_tokenizer_files(src, dst)
    for name in code_files(src, config) + [n for n in LICENSE_FILES if (src / n).is_file()]:
        shutil.copyfile(src / name, dst / name)
