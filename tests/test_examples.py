"""examples/: the PPO-with-curiosity script runs end to end on a real ALE game and logs what
it learns from (a few dozen steps: plumbing and bookkeeping, not learning)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.games, pytest.mark.timeout(180)]
pytest.importorskip("ale_py")
pytest.importorskip("torch")
ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "ppo_curiosity.py"


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_ppo_curiosity_logs_extrinsic_returns_and_beta_times_surprise(tmp_path: Path) -> None:
    beta, envs, ep_len, steps = 0.5, 2, 10, 64
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "train", "--beta", str(beta), "--steps", str(steps),
         "--num-envs", str(envs), "--num-steps", "16", "--num-minibatches", "2",
         "--update-epochs", "1", "--max-episode-steps", str(ep_len), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "config.json").read_text())["beta"] == beta

    rows = _rows(out / "steps.csv")
    assert len(rows) == steps  # one row per env step
    assert [int(r["global_step"]) for r in rows] == sorted(int(r["global_step"]) for r in rows)
    surprise = np.array([float(r["surprise"]) for r in rows])  # every step was predicted
    bonus = np.array([float(r["intrinsic_reward"]) for r in rows])
    extrinsic = np.array([float(r["extrinsic_reward"]) for r in rows])
    train = np.array([float(r["train_reward"]) for r in rows])
    assert np.all((surprise >= 0) & (surprise <= 2)) and surprise.std() > 0  # not a constant
    np.testing.assert_allclose(bonus, beta * surprise, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(train, np.sign(extrinsic) + beta * surprise, atol=1e-9)

    # episodes: cut at ep_len steps; each return is the game's own, the bonus left out
    episodes = _rows(out / "episodes.csv")
    assert len(episodes) >= envs * (steps // envs // ep_len)
    per_env: dict[int, list[float]] = defaultdict(list)
    for r in rows:
        per_env[int(r["env"])].append(float(r["extrinsic_reward"]))
    done: dict[int, int] = defaultdict(int)
    for ep in episodes:
        env, length = int(ep["env"]), int(ep["episode_length"])
        assert length == ep_len
        start = done[env]
        want = sum(per_env[env][start:start + length])
        # counted outside the wrapper, a return would hold the bonus too
        assert float(ep["episode_return"]) == pytest.approx(want, abs=1e-9)
        done[env] += length

    png = tmp_path / "curves.png"
    plot = subprocess.run([sys.executable, str(SCRIPT), "plot", str(out), "--png", str(png)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert plot.returncode == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", plot.stderr


def test_ppo_config_refuses_bad_values() -> None:
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from ppo_curiosity import PPOConfig
    finally:
        sys.path.remove(str(SCRIPT.parent))
    with pytest.raises(ValueError, match="beta"):
        PPOConfig(beta=-0.1)
    with pytest.raises(ValueError, match="num_minibatches"):
        PPOConfig(num_envs=3, num_steps=5, num_minibatches=4)
