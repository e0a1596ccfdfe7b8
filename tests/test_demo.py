"""`emo demo` end to end on the embedded tiny models (the README's first set-up command)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from emo_cli.lab.demo import TINY_EMO, TINY_STD


@pytest.mark.slow
def test_demo_runs_offline_and_shows_the_emo_effect(tmp_path):
    assert (TINY_EMO / "config.json").exists() and (TINY_STD / "config.json").exists()
    exe = Path(sys.executable).parent / "emo"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    r = subprocess.run([str(exe), "demo", "--out", str(tmp_path / "d"), "--json"], capture_output=True,
                       text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    res = json.loads(r.stdout)
    inc = {row["model"]: row["increase_pct"] for row in res["losses"]}
    slim = next(v for k, v in inc.items() if "slim" in k)
    rand = next(v for k, v in inc.items() if "random" in k)
    std = next(v for k, v in inc.items() if "standard" in k and "all" not in k)
    assert slim < rand and slim < std  # the domain subset beats a random one and the standard MoE
    assert (tmp_path / "d" / "slim-medical" / "pruning_metadata.json").exists()
    assert Path(res["gguf"]).stat().st_size > 0 and res["completion"]
    assert all(p.is_relative_to(tmp_path / "d") for p in (Path(res["slim_dir"]), Path(res["gguf"])))
