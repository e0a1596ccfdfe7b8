import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

from tiny_models import VARIANTS, sample_texts, write_jsonl, write_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    cache = {}

    def make(variant="shared", seed=0):
        key = (variant, seed)
        if key not in cache:
            cache[key] = write_tiny_model(tmp_path_factory.mktemp(f"m-{variant}-{seed}"), variant, seed)
        return cache[key]

    return make


@pytest.fixture(params=sorted(VARIANTS))
def any_variant(request):
    return request.param


@pytest.fixture(scope="session")
def med_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    return write_jsonl(d / "med.jsonl", sample_texts(40, seed=7))


@pytest.fixture
def model_opens(monkeypatch):
    """How often each model file or directory is opened (safetensors checkpoints, GGUF files), by
    resolved path: a command opens its model once and hands the handle down."""
    from collections import Counter

    from emo_cli.gguf.reader import GGUFFile
    from emo_cli.model.checkpoint import SafetensorsCheckpoint

    opened = Counter()
    for cls in (SafetensorsCheckpoint, GGUFFile):
        def counting(self, path, *a, _init=cls.__init__, **k):
            opened[Path(path).resolve()] += 1
            _init(self, path, *a, **k)

        monkeypatch.setattr(cls, "__init__", counting)
    return opened

