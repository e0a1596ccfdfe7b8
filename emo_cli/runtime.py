"""Open any MODEL for computation: an HF directory (or cached repo id) or a .gguf file.

A command opens its model once (`open_model`: config, tensor headers, the mapping; no weights
read) and hands that handle down: to `load_model`, to the slim writers, to the size estimates.
For an HF directory the memory planner (model/memory.py) decides, before loading, whether the
model is held whole (arch/emo.py) or streamed one layer at a time (model/streaming.py), and in
which dtype. Both implement the model interface of model/api.py, and so does the GGUF runtime.
"""

from __future__ import annotations

from emo_cli.gguf.layout import open_reader
from emo_cli.gguf.reader import GGUFFile
from emo_cli.model.api import LoadedModel
from emo_cli.model.loading import (
    HFModelFiles,
    check_device,
    is_gguf,
    load_resident,
    open_hf_dir,
    parse_dtype,
    resolve_model_path,
)
from emo_cli.model.memory import Workload, plan_memory
from emo_cli.model.tokenizer import EmoTokenizer

ModelHandle = HFModelFiles | GGUFFile


def open_model(spec) -> ModelHandle:
    """MODEL resolved and opened: an HF directory's files, or a GGUF file's reader."""
    path = resolve_model_path(spec)
    return open_reader(path) if is_gguf(path) else open_hf_dir(path)


def load_model(model, device: str = "cpu", dtype: str | None = None, backend: str = "auto",
               streaming: str = "auto", max_memory: float | None = None, workload: Workload = Workload(),
               what: str = "this command") -> LoadedModel:
    """`model`: a MODEL spec, or what `open_model` returned for it."""
    opened = model if isinstance(model, (HFModelFiles, GGUFFile)) else open_model(model)
    device = check_device(device)
    if isinstance(opened, GGUFFile):
        from emo_cli.gguf.runtime import load_gguf_model

        return load_gguf_model(opened, device=device, backend=backend)  # mapped: nothing to stream
    files = opened
    plan = plan_memory(files, device, parse_dtype(dtype), streaming, max_memory, workload, what)
    if plan.streaming:
        from emo_cli.model.streaming import StreamedModel

        model = StreamedModel(files, device, plan.dtype, plan.activation_budget)
    else:
        model = load_resident(files, device, plan.dtype)
        model.activation_budget = plan.activation_budget
    cfg = files.config
    tok = EmoTokenizer.from_dir(files.dir, cfg.eos_token_id, cfg.pad_token_id)
    return LoadedModel(model, tok, files.dir, cfg, files.fingerprint, "hf", plan, files)
