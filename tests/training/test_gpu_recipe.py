"""train/recipes/gpu.sh --dry-run: the GPU lease plan, every stage at toy size on this CPU
(issue 24), with the imports, commands and data path of the lease, so that a missing module,
a wrong flag or a wrong path fails here and not on the lent GPU."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.games, pytest.mark.timeout(900)]
ROOT = Path(__file__).resolve().parents[2]
STAGES = ["preflight", "data", "train", "export", "eval", "bench", "sidecar"]


def _gpu_sh(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    pytest.importorskip("ale_py")
    pytest.importorskip("vizdoom")
    env = {**os.environ, "WORK": str(tmp_path / "work"), "OUT": str(tmp_path / "out"),
           "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(ROOT / "train/recipes/gpu.sh"), "--dry-run"], env=env,
                          capture_output=True, text=True, timeout=880, cwd=tmp_path)


def _stages(out: Path) -> dict[str, str]:
    with (out / "stages.tsv").open() as f:
        return {r["stage"]: r["status"] for r in csv.DictReader(f, delimiter="\t")}


def test_dry_run_runs_every_stage_and_writes_the_results(tmp_path: Path) -> None:
    r = _gpu_sh(tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # the default preset goes on from the shipped default (its conv encoder is the preset's)
    assert f"train: gpu-actions-conv from {ROOT / 'iwm_bus/weights/default.pt'}," in r.stdout
    out = tmp_path / "out"
    assert _stages(out) == dict.fromkeys(STAGES, "ok"), (out / "stages.tsv").read_text()
    for name in ("plan.txt", "preflight.txt", "config.json", "metrics.csv", "eval.json",
                 "eval.png", "bench_train.md"):
        assert (out / name).stat().st_size > 0, name
    assert list((tmp_path / "work" / "data" / "train" / "ale").glob("*.cf.npz"))
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert rows[-1]["step"] == "2" and float(rows[-1]["cf"]) > 0  # the counterfactual term ran
    bench = (out / "bench_train.md").read_text()
    assert "| gpu-actions-conv (phase 3) | fused | 4 + 2 states |" in bench
    # the export comes back in parts under the device's 16 MiB limit, and loads whole
    parts = sorted(out.glob("model.pt.part*"))
    assert parts and all(p.stat().st_size <= 15 * 2**20 for p in parts)
    whole = tmp_path / "model.pt"
    whole.write_bytes(b"".join(p.read_bytes() for p in parts))
    from iwm_bus.model import load_iwm

    model = load_iwm(whole)
    info = model.provenance
    assert info["name"] == "iwm-actions-gpu" and info["recipe"] == "train/recipes/gpu.sh"
    assert "action_discrimination" in info["eval"]  # exported again after the eval
    assert model.config.action_every_layer and model.config.inverse_dynamics


def test_a_missing_module_stops_the_plan_in_the_preflight(tmp_path: Path) -> None:
    t0 = time.monotonic()
    r = _gpu_sh(tmp_path, EXTRA_MODULES="no_such_module_iwm24")
    assert r.returncode == 2
    assert "missing module no_such_module_iwm24" in r.stderr, r.stderr[-2000:]
    assert _stages(tmp_path / "out") == {"preflight": "failed"}
    assert not (tmp_path / "work" / "data" / "train").exists()  # nothing recorded
    assert time.monotonic() - t0 < 240  # imports only: ~20 s on a busy 2-core machine


def test_the_lease_presets_conv_model_goes_on_from_the_shipped_default(tmp_path: Path) -> None:
    """``gpu-actions-conv`` (the plan's default) is the shipped default's model: ``INIT``
    auto takes every weight of it, predictor and inverse head too, not only the encoder."""
    import torch

    from iwm_bus.default_model import default_checkpoint
    from iwm_bus.model import load_iwm
    from train.config import RunConfig
    from train.presets import preset
    from train.trainer import init_model

    d = preset("gpu-actions-conv")
    d["train"].update(device="cpu", init_from=str(default_checkpoint()), sessions=["-"],
                      out_dir=str(tmp_path / "run"))
    model = init_model(RunConfig.from_dict(d), torch.device("cpu"))
    shipped = load_iwm(default_checkpoint(), "cpu", with_target=True).state_dict()
    got = model.state_dict()
    assert got.keys() == shipped.keys()
    for k, v in shipped.items():
        assert torch.equal(got[k], v), k
