"""train/recipes/actions.sh end to end at toy size: counterfactual data, training (the conv
preset from scratch; the ViT preset from the v1 default read from git history), the widen
step on more games from that run, the seen / unseen eval and the export (issue 23)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.games, pytest.mark.timeout(300)]
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("preset", ["cpu-actions-conv", "cpu-actions"])
def test_actions_recipe_runs_at_toy_size(tmp_path: Path, preset: str) -> None:
    pytest.importorskip("ale_py")
    env = {**os.environ, "DATA": str(tmp_path / "data"), "RUN": str(tmp_path / "run"),
           "SHIP": str(tmp_path / "ship.pt"), "GAMES": "ALE/Pong-v5", "DOOM": "basic",
           "FRAMES": "40", "HELDOUT_GAMES": "pong", "HELDOUT_FRAMES": "120",
           "UNSEEN": "ALE/Boxing-v5", "SEEN_EVAL": "ALE/Pong-v5", "CF_STATES": "2",
           "TRAIN_STEPS": "2", "PYTHON": sys.executable, "PRESET": preset,
           "MORE_GAMES": "ALE/Breakout-v5", "WIDEN_STEPS": "2",
           "WIDEN_INIT": str(tmp_path / "run" / "last.pt"),
           "TRAIN_ARGS": "--set train.batch_size=4 --set train.cf_states=2",
           "EVAL_ARGS": "--bank 16 --aug_images 1 --cut_gap 10 --max_transitions 32"}
    r = subprocess.run(["bash", str(ROOT / "train/recipes/actions.sh")], env=env,
                       capture_output=True, text=True, timeout=280, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert list((tmp_path / "data" / "train").glob("*.cf.npz")), "no counterfactual sidecar"
    assert list((tmp_path / "data" / "more").glob("*Breakout*.cf.npz")), "the widen step's data"
    out = r.stdout
    assert "action discrimination MRR, seen (1 games)" in out
    assert "action discrimination MRR, unseen (1 games)" in out
    assert "inverse dynamics accuracy" in out and "ALE/Boxing-v5 (unseen)" in out
    from iwm_bus.model import load_iwm

    shipped = load_iwm(tmp_path / "ship.pt")
    info = shipped.provenance
    assert info["name"] == "iwm-default-v3" and info["recipe"] == "train/recipes/actions.sh"
    # the widen run went on from the first run: its config names both data folders
    widened = json.loads((tmp_path / "run-wide" / "config.json").read_text())["train"]
    assert widened["init_from"] == env["WIDEN_INIT"] and widened["init_predictor"] is True
    assert [Path(p).name for p in widened["sessions"]] == ["train", "more"]
    assert shipped.config.inverse_dynamics and shipped.config.local_mix
    assert shipped.config.encoder_name == ("iwm_conv64" if preset == "cpu-actions-conv"
                                           else "vit_tiny_patch16_224")
    assert info["eval"]["action_discrimination"]["unseen"]["games"] == ["ALE/Boxing-v5"]
