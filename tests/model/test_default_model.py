"""The shipped default world model: it loads, says what it is, runs in a real game through
the launcher, and its surprise rises at a scene cut injected into a real recorded session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_launch import Sidecar

from iwm_bus.bus import topics
from iwm_bus.config import WorkerConfig
from iwm_bus.default_model import DEFAULT_CHECKPOINT, default_checkpoint
from iwm_bus.session import SessionReader, SessionWriter

pytestmark = pytest.mark.timeout(240)
ROOT = Path(__file__).resolve().parents[2]


def test_shipped_checkpoint_loads_and_matches_its_eval_summary() -> None:
    from iwm_bus.model import load_iwm

    assert default_checkpoint() == DEFAULT_CHECKPOINT, "the package ships no default model"
    assert DEFAULT_CHECKPOINT.stat().st_size <= 50 * 2**20
    m = load_iwm(DEFAULT_CHECKPOINT)
    info = m.provenance
    assert info["name"].startswith("iwm-default") and info["action_vocab"] == "iwm-18"
    # config = what was trained (fields added since take their defaults)
    trained = info["run_config"]["model"]
    assert {k: v for k, v in m.config.to_dict().items() if k in trained} == trained
    assert m.config.num_actions == 18
    ev = info["eval"]
    for row in ("next_latent_mrr", "surprise_auroc", "action_discrimination", "latents"):
        assert row in ev, row
    assert ev["next_latent_mrr"]["model"] > ev["next_latent_mrr"]["chance"]
    assert info["data"]["sessions"], "the training data is named"


@pytest.mark.games
def test_the_default_tells_its_actions_apart_on_states_it_never_saw() -> None:
    """Issue 23: from cloned emulator states of other seeds than training, the shipped model
    ranks the next frame under its own action above the other actions' next frames, beyond
    what any model that ignores the action can reach (the action-blind oracle) and beyond
    itself fed the wrong action. Red for a predictor that ignores or confuses the action."""
    pytest.importorskip("ale_py")
    from iwm_bus.model import load_iwm
    from train.counterfactual import counterfactual_sets
    from train.evaluate import EvalConfig, action_discrimination

    m = load_iwm(DEFAULT_CHECKPOINT)
    sets = [s for i, g in enumerate(("ALE/Breakout-v5", "ALE/Seaquest-v5"))
            for s in counterfactual_sets(g, 12, seed=7000 + i)]
    r = action_discrimination(m, sets, EvalConfig())
    assert r["model"] >= r["oracle"] + 0.1, r
    assert r["model"] >= r["shuffled"] + 0.15 and r["model"] >= r["no_action"] + 0.15, r


def test_the_worker_loads_the_default_unless_told_otherwise() -> None:
    from workers.encoder import load_model

    m = load_model(WorkerConfig())
    assert m.provenance is not None and m.provenance["path"] == str(DEFAULT_CHECKPOINT)
    untrained = load_model(WorkerConfig(untrained=True, encoder="vit_tiny_patch16_224",
                                        img_size=32))
    assert untrained.provenance is None
    with pytest.raises(ValueError, match="contradicts model_path"):
        WorkerConfig(untrained=True, model_path=DEFAULT_CHECKPOINT)


def _record(path: Path, seed: int, frames: int, game: str = "breakout") -> Path:
    from train.record import GAMES, record_session

    record_session(GAMES[game], path, seed=seed, frames=frames, name=game)
    return path


def _surprises(sc: Sidecar, n: int, timeout: float) -> dict[int, float]:
    msgs = sc.collect(lambda ms: sum(m["kind"] == "surprise" for m in ms) >= n, timeout)
    return {m["seq"]: m["surprise"] for m in msgs if m["kind"] == "surprise"}


@pytest.mark.games
def test_a_real_game_through_the_launcher_publishes_surprise() -> None:
    pytest.importorskip("ale_py")
    with Sidecar("--source", "gym:ALE/Breakout-v5", "--mode", "lossless", "--frames", "24",
                 sub_topics=(topics.SURPRISE,)) as sc:
        got = _surprises(sc, 20, 180)
        assert sc.wait(120) == 0, sc.output()[-2000:]
        log = sc.output()
    values = [v for v in got.values() if v is not None]
    assert len(values) >= 19 and all(0 <= v <= 2 for v in values)
    assert "UNTRAINED" not in log


@pytest.mark.games
def test_surprise_rises_at_a_scene_cut_in_a_replayed_real_session(tmp_path: Path) -> None:
    """A frame of another game of the mix (Seaquest) spliced into a recorded Breakout
    session: replayed lossless through the launcher, the surprise at the cut is higher than
    at every one of the 20 frames before it. (Same-game cuts 5 s away are the harder case;
    iwm-eval measures them: AUROC 0.77 for iwm-default-v1, not yet robust enough for a
    per-session test.)"""
    pytest.importorskip("ale_py")
    play = _record(tmp_path / "a.mcap", 0, 80)
    other = _record(tmp_path / "b.mcap", 1, 100, game="seaquest")
    a, b = SessionReader(play), SessionReader(other)
    frames_a = [(r, act) for r, act in a.frames_with_actions()]
    far = list(b.frame_records())[-1]
    cut_at = 60
    cut = tmp_path / "cut.mcap"
    with SessionWriter(cut, metadata={"source": a.metadata["source"]}) as w:
        for i, (rec, act) in enumerate(frames_a):
            pixels = b.decode(far) if i == cut_at else a.decode(rec)
            w.write_frame(rec.seq, rec.t_ns, pixels, action=act)
    with Sidecar("--source", f"replay:{cut}", "--mode", "lossless", "--rate", "0",
                 sub_topics=(topics.SURPRISE,)) as sc:
        got = _surprises(sc, 79, 180)
        sc.wait(120)
    seqs = sorted(got)
    series = np.array([got[s] if got[s] is not None else np.nan for s in seqs])
    i = seqs.index(frames_a[cut_at][0].seq)
    before = series[i - 20:i]
    assert np.isfinite(before).all() and series[i] > before.max(), (series[i], before)


@pytest.mark.games
def test_recipe_runs_at_toy_size(tmp_path: Path) -> None:
    """train/recipes/default.sh end to end (data, train, eval + export) in seconds."""
    pytest.importorskip("ale_py")
    env = {**os.environ, "DATA": str(tmp_path / "data"), "RUN": str(tmp_path / "run"),
           "SHIP": str(tmp_path / "ship.pt"), "GAMES": "pong", "FRAMES": "40",
           "TRAIN_SEEDS": "0", "HELDOUT_SEEDS": "1000", "JOBS": "1", "PYTHON": sys.executable,
           "TRAIN_ARGS": "--steps 2 --batch_size 8 --set model.encoder_depth=1 "
                         "--set model.img_size=32",
           "EVAL_ARGS": "--bank 16 --aug_images 1 --cut_gap 10",
           "CF_GAMES": "ALE/Pong-v5", "CF_STATES": "2"}
    r = subprocess.run(["bash", str(ROOT / "train/recipes/default.sh")], env=env,
                       capture_output=True, text=True, timeout=200)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "next-latent MRR" in r.stdout and "action discrimination MRR" in r.stdout
    from iwm_bus.model import load_iwm

    shipped = load_iwm(tmp_path / "ship.pt")
    assert shipped.provenance["name"] == "iwm-default-v1" and shipped.config.img_size == 32
    assert shipped.provenance["eval"]["next_latent_mrr"]["n"] > 0
