"""iwm-train and iwm-eval end to end at toy size on CPU: real session files and image
folders, real torchrun processes, real checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from toy_world import write_toy_session

from iwm_bus.model import load_checkpoint
from train import cli, eval_cli
from train.augment import COND_LAYOUT, AugConfig, apply_views, cond_vector, sample_params
from train.config import RunConfig
from train.data import FrameStore, batch_indices
from train.masks import sample_masks
from train.trainer import Trainer

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parents[2]
# A toy model: ViT-Ti cut to 1 block, 32 px with 8 px patches (16 tokens), 1-layer predictor.
TOY = ["--set", "model.variant=\"custom\"", "--set", "model.encoder_depth=1",
       "--set", "model.img_size=32", "--set", "model.pred_depth=1", "--set", "model.pred_dim=64",
       "--set", "model.pred_heads=2", "--set", "model.num_actions=5", "--no_progress"]


@pytest.fixture(scope="module")
def sessions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("sessions")
    write_toy_session(d / "a.mcap", n=120, seed=0, episode=60)
    write_toy_session(d / "b.mcap", n=80, seed=1, episode=40)
    return d


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("images")
    (d / "sub").mkdir()
    rng = np.random.default_rng(0)
    for i in range(24):
        img = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(img).save(d / ("sub" if i % 2 else ".") / f"{i}.{'png' if i % 3 else 'jpg'}")
    return d


def train(*args: str) -> int:
    return cli.main([*args, "--preset", "cpu-tiny", *TOY])


def state(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["state_dict"]


# ----------------------------------------------------------------------------- pieces


def test_augmentation_parameters_round_trip_into_the_conditioning_vector() -> None:
    gen = torch.Generator().manual_seed(0)
    p = sample_params(gen, 64, AugConfig())
    c = cond_vector(p, 16)
    assert c.shape == (64, 16) and not c[:, len(COND_LAYOUT):].any()
    torch.testing.assert_close(c[:, :4], p.jitter_t - p.jitter_s)
    torch.testing.assert_close(c[:, 4:8], torch.stack(
        [p.gray.float(), p.blur.float(), p.sigma / 2, p.solarize.float()], 1))
    assert p.gray.any() and p.blur.any() and p.solarize.any()  # all kinds drawn at p < 1
    weak = sample_params(gen, 64, AugConfig(gray_p=0, blur_p=0, solarize_p=0))
    assert not cond_vector(weak, 16)[:, 4:].any()
    with pytest.raises(ValueError, match="cond_dim=4 is too small"):
        cond_vector(p, 4)
    # the parameters are what was applied: identity parameters give identical views
    img = torch.from_numpy(np.random.default_rng(1).integers(0, 255, (2, 32, 32, 3), np.uint8))
    ident = sample_params(torch.Generator().manual_seed(1), 2, AugConfig(
        crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0, jitter_p=0, gray_p=0, blur_p=0, solarize_p=0))
    src, tgt = apply_views(img, ident)
    torch.testing.assert_close(src, tgt)
    torch.testing.assert_close(tgt, img.permute(0, 3, 1, 2).float() / 255, atol=0.02, rtol=0)
    gray = ident.slice(slice(None))
    gray.gray[:] = True
    src_g, _ = apply_views(img, gray)
    assert torch.allclose(src_g[:, 0], src_g[:, 1]) and not torch.allclose(src, src_g)


def test_batched_crops_and_blurs_are_torchvisions_per_image() -> None:
    """The views are made for the whole batch at once; each image must still be what
    torchvision's resized_crop + flip and gaussian_blur make of it (the per-image loop
    they replace): a box off by a pixel, a flip of the wrong images or a kernel of the
    wrong size would break this."""
    import math

    import torchvision.transforms.v2.functional as TF

    from train.augment import _blur, _crop

    gen = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (48, 40, 40, 3), dtype=torch.uint8, generator=gen)
    p = sample_params(gen, 48, AugConfig())
    assert p.flip.any() and not p.flip.all() and p.blur.any() and not p.blur.all()
    got = _crop(img, p)
    for i in range(48):
        top, left, h, w = (p.crop[i] * 40).tolist()
        ref = TF.resized_crop(img[i].permute(2, 0, 1), int(top), int(left), max(1, round(h)),
                              max(1, round(w)), [40, 40], antialias=True)
        ref = (TF.horizontal_flip(ref) if p.flip[i] else ref).float() / 255
        torch.testing.assert_close(got[i], ref, atol=1.01 / 255, rtol=0)  # uint8 rounding
        assert (got[i] - ref).abs().mean() < 0.35 / 255  # mostly the same level
    x = torch.rand(48, 3, 40, 40, generator=gen)
    blurred = _blur(x, p.sigma, p.blur)
    for i in range(48):
        sig = float(p.sigma[i])
        k = max(3, 2 * math.ceil(3 * sig) + 1)
        ref = TF.gaussian_blur(x[i], [k, k], [sig, sig]) if p.blur[i] else x[i]
        torch.testing.assert_close(blurred[i], ref, atol=1e-5, rtol=0)


def test_masks_are_disjoint_blocks_of_equal_length() -> None:
    ctx, tgt = sample_masks(torch.Generator().manual_seed(0), 8, 8)
    assert ctx.shape[0] == tgt.shape[0] == 8 and ctx.shape[1] >= 4 and tgt.shape[1] >= 4
    for c, t in zip(ctx.tolist(), tgt.tolist(), strict=True):
        assert not set(c) & set(t) and len(set(c)) == len(c)


def test_batches_are_a_pure_function_of_the_step() -> None:
    a = batch_indices(7, 100, 16, seed=3)
    assert torch.equal(a, batch_indices(7, 100, 16, seed=3))
    epoch0 = torch.cat([batch_indices(s, 100, 16, 3) for s in range(6)])
    assert len(set(epoch0.tolist())) == 96  # an epoch visits each sample at most once
    assert not torch.equal(batch_indices(6, 100, 16, 3)[:6], epoch0[:6])  # new order next epoch


def test_frame_store_links_sequences_within_episodes(sessions: Path) -> None:
    store = FrameStore.from_sessions([sessions], 32, 16)
    assert len(store) == 200 and store.frames.shape[1:] == (32, 32, 3)
    starts = store.sequence_starts(2)
    # no sequence crosses an episode start (frames 0, 60 of a; 120, 160 of b) or a file
    for s in starts.tolist():
        assert store.linked[s + 1] and store.linked[s + 2]
    assert 57 in starts.tolist() and 58 not in starts.tolist() and 59 not in starts.tolist()
    assert store.num_actions == 5 and set(store.session.tolist()) == {0, 1}


def test_parallel_loading_gives_the_same_store(sessions: Path) -> None:
    one = FrameStore.from_sessions([sessions], 32, 16)
    two = FrameStore.from_sessions([sessions], 32, 16, workers=2)
    for f in ("frames", "action_id", "vector", "linked", "session"):
        assert torch.equal(getattr(one, f), getattr(two, f)), f
    assert one.sources == two.sources
    # max_frames cuts the same frames either way, across the file boundary (a has 120)
    cut1 = FrameStore.from_sessions([sessions], 32, 16, max_frames=150)
    cut2 = FrameStore.from_sessions([sessions], 32, 16, max_frames=150, workers=2)
    assert len(cut1) == len(cut2) == 150 and torch.equal(cut1.frames, cut2.frames)
    assert torch.equal(cut1.session, cut2.session) and cut1.session[-1] == 1


def _trainer(sessions: Path, out: Path, views: float = 1.0, **train_kw: object) -> Trainer:
    run = RunConfig.from_dict({
        "model": {"variant": "custom", "encoder_name": "vit_tiny_patch16_224",
                  "encoder_depth": 1, "img_size": 32, "patch_size": 8, "pred_depth": 1,
                  "pred_dim": 64, "pred_heads": 2, "num_actions": 5},
        "train": {"phase": 3, "sessions": [str(sessions)], "batch_size": 8, "steps": 4,
                  "out_dir": str(out), "progress": False, "warmup_steps": 1, **train_kw},
        "objective": {"views_weight": views}})
    return Trainer(run, store=FrameStore.from_sessions([sessions], 32, 16))


def test_prefetched_batches_train_the_same_weights(sessions: Path, tmp_path: Path) -> None:
    plain = _trainer(sessions, tmp_path / "plain")
    plain.run()
    ahead = _trainer(sessions, tmp_path / "ahead")
    ahead.prefetch = True  # what CUDA runs do: batch s+1 made on a thread during step s
    ahead.run()
    a, b = plain.model.state_dict(), ahead.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # and the batches really come from the thread: a broken prefetch (a batch made twice,
    # or one step's batch reused) would change the data and the weights
    made: list[int] = []
    again = _trainer(sessions, tmp_path / "again")
    again.prefetch = True
    real = again.make_batch
    again.make_batch = lambda step: made.append(step) or real(step)  # type: ignore[method-assign]
    again.run()
    assert made == [0, 1, 2, 3]


def test_a_minutes_budget_fits_the_schedule_to_the_time_left(sessions: Path,
                                                            tmp_path: Path) -> None:
    t = _trainer(sessions, tmp_path / "fit", steps=1000, minutes=1.0)
    t.step = 50
    t.fit_to_budget(50, 10.0)  # 0.2 s a step, 50 s left of 60: 250 more steps
    assert t.total == 300 and t.ema.total_steps == 300
    t.fit_to_budget(50, 1.0)  # a budget that holds more than the schedule leaves it alone
    assert t.total == 300
    t.fit_to_budget(50, 70.0)  # over budget already: one more step, then stop
    assert t.total == 51
    # end to end: a budget too short for the schedule ends the run early, at a checkpoint
    fit = _trainer(sessions, tmp_path / "run", views=0.0, steps=10_000, minutes=0.001,
                   ckpt_every=10_000)
    fit.run()
    assert fit.step == fit.total < 10_000
    assert load_checkpoint(tmp_path / "run" / "last.pt")["extra"]["step"] == fit.step


# ----------------------------------------------------------------------------- iwm-train


def test_phase1_from_image_folders_and_sessions(image_dir: Path, sessions: Path,
                                                tmp_path: Path) -> None:
    out = tmp_path / "p1"
    assert train("--phase", "1", "--data_dirs", str(image_dir), str(sessions / "a.mcap"),
                 "--out_dir", str(out), "--steps", "3", "--batch_size", "8") == 0
    payload = load_checkpoint(out / "last.pt")
    assert payload["extra"]["step"] == 3 and payload["extra"]["kind"] == "train-state"
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step,") and "target_std" in rows[0] and "ema_distance" in rows[0]
    assert (out / "config.json").exists() and list((out / "tb").iterdir())


def test_phase3_from_sessions_then_resume_is_bit_identical(sessions: Path, tmp_path: Path
                                                             ) -> None:
    args = ["--phase", "3", "--sessions", str(sessions), "--steps", "4", "--batch_size", "8",
            "--ckpt_every", "2"]
    assert train(*args, "--out_dir", str(tmp_path / "full")) == 0
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    shutil.copy(tmp_path / "full" / "step_0000002.pt", stopped / "last.pt")  # "killed" at 2
    assert train(*args, "--out_dir", str(stopped), "--resume", "auto") == 0
    a, b = state(tmp_path / "full" / "last.pt"), state(stopped / "last.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.startswith("target_encoder.") for k in a)  # the EMA target is saved too
    # an uninterrupted 2-step run differs: resume really continued the schedule
    assert not all(torch.equal(a[k], v) for k, v in state(tmp_path / "full" / "step_0000002.pt")
                   .items())


def test_torchrun_ddp_equals_single_process(sessions: Path, tmp_path: Path) -> None:
    args = ["-m", "train", "--phase", "3", "--sessions", str(sessions), "--steps", "2",
            "--batch_size", "8", "--preset", "cpu-tiny", *TOY,
            "--set", "objective.var_weight=0", "--set", "objective.cov_weight=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    torchrun = Path(sys.executable).with_name("torchrun")
    subprocess.run([sys.executable, *args, "--out_dir", str(tmp_path / "one")], env=env,
                   check=True, timeout=150, capture_output=True)
    ddp = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", *args,
                          "--ddp", "--out_dir", str(tmp_path / "two")], env=env,
                         timeout=150, capture_output=True, text=True)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    a, b = state(tmp_path / "one" / "last.pt"), state(tmp_path / "two" / "last.pt")
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert diff < 1e-4, diff
    start = state(tmp_path / "one" / "step_0000002.pt")
    assert start.keys() == a.keys()


@pytest.mark.parametrize("argv,message", [
    (["--phase", "1", "--data_dirs", "{empty}"], "no PNG/JPG images or .mcap sessions"),
    (["--phase", "1", "--data_dirs", "{missing}"], "no such file or folder"),
    (["--phase", "3", "--sessions", "{corrupt}"], "unreadable session"),
    (["--phase", "3", "--sessions", "{sessions}", "--set", "train.nope=1"], "unknown train keys"),
    (["--phase", "3", "--sessions", "{sessions}", "--init_from", "{foreign}"], "differs"),
    (["--phase", "3", "--sessions", "{sessions}", "--batch_size", "7", "--ddp"], None),
    (["--phase", "3", "--sessions", "{sessions}", "--ddp", "--minutes", "5"],
     "minutes does not work with ddp"),
    (["--phase", "3", "--sessions", "{sessions}", "--set", "model.num_actions=3"],
     "action ids up to 4"),
    (["--phase", "3", "--sessions", "{sessions}", "--set", "objective.views_residual=true",
      "--set", "objective.views_nce_weight=1"], "needs aug.target_views >= 2"),
    (["--phase", "3", "--sessions", "{sessions}", "--set", "objective.views_nce_weight=1",
      "--set", "aug.target_views=4"], "needs views_residual"),
    (["--phase", "3", "--sessions", "{sessions}", "--set", "aug.target_views=3"],
     "does not divide train.batch_size=32"),
])
def test_bad_input_is_one_line_and_exit_2(argv: list[str], message: str | None,
                                          sessions: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "corrupt.mcap").write_bytes(b"\x89MCAP0\r\n" + b"junk" * 50)
    foreign = tmp_path / "foreign.pt"
    from iwm_bus.model import create_iwm_model, save_checkpoint
    save_checkpoint(create_iwm_model("custom", encoder_name="vit_tiny_patch16_224", img_size=48,
                                     pred_depth=1, pred_dim=64, pred_heads=2), foreign)
    fill = {"empty": tmp_path / "empty", "missing": tmp_path / "missing", "corrupt":
            tmp_path / "corrupt.mcap", "sessions": sessions, "foreign": foreign}
    argv = [a.format(**fill) for a in argv]
    if "--ddp" in argv:  # 2 ranks that a batch of 7 does not divide over
        os.environ.update(WORLD_SIZE="2", RANK="0")
        argv.remove("--ddp")
        argv += ["--set", "train.ddp=true"]
        message = message or "does not divide over 2 DDP ranks"
    try:
        rc = cli.main(["--preset", "cpu-tiny", *TOY, *argv, "--out_dir", str(tmp_path / "o")])
    finally:
        os.environ.pop("WORLD_SIZE", None)
        os.environ.pop("RANK", None)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("iwm-train: error:"), err
    assert message in err[0]
    assert not (tmp_path / "o" / "last.pt").exists()  # nothing trained


def test_unknown_preset_and_env_vars(sessions: Path, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--phase", "3", "--sessions", str(sessions), "--preset", "huge"]) == 2
    assert "unknown preset 'huge'" in capsys.readouterr().err
    monkeypatch.setenv("IWM_DATA_DIRS", str(sessions))
    monkeypatch.setenv("IWM_BATCH_SIZE", "8")
    monkeypatch.setenv("IWM_LR", "0.002")
    args = cli.build_parser().parse_args(["--phase", "1", "--preset", "cpu-tiny"])
    d = cli.resolve_config(args, dict(os.environ))
    assert d["train"]["data_dirs"] == [str(sessions)] and d["train"]["batch_size"] == 8
    assert d["train"]["lr"] == 0.002
    monkeypatch.setenv("IWM_EPOCHS", "two")
    with pytest.raises(ValueError, match="IWM_EPOCHS='two'"):
        cli.resolve_config(args, dict(os.environ))


# ----------------------------------------------------------------------------- iwm-eval


def test_iwm_eval_prints_every_row_and_writes_the_png(sessions: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert train("--phase", "3", "--sessions", str(sessions), "--steps", "2", "--batch_size", "8",
                 "--out_dir", str(tmp_path / "m")) == 0
    capsys.readouterr()
    rc = eval_cli.main(["--model", str(tmp_path / "m" / "last.pt"), "--sessions", str(sessions),
                        "--bank", "16", "--aug_images", "2", "--cut_gap", "20",
                        "--out", str(tmp_path / "ev")])
    out = capsys.readouterr().out
    assert rc == 0
    for row in ("augmentation MRR", "next-latent MRR", "surprise AUROC", "uncertainty~surprise",
                "latent std"):
        assert row in out
    assert "copy_last=" in out and "shuffled=" in out and "chance=" in out
    png = tmp_path / "ev" / "eval.png"
    assert png.stat().st_size > 5000 and png.read_bytes()[:4] == b"\x89PNG"
    assert eval_cli.main(["--model", str(tmp_path / "nope.pt"), "--sessions", str(sessions)]) == 2
    # the same model at int8: recorded as such, close to fp32 and not fp32 itself
    assert eval_cli.main(["--model", str(tmp_path / "m" / "last.pt"), "--sessions",
                          str(sessions), "--bank", "16", "--aug_images", "2", "--cut_gap", "20",
                          "--precision", "int8", "--out", str(tmp_path / "ev8")]) == 0
    fp32, int8 = (json.loads((tmp_path / d / "eval.json").read_text()) for d in ("ev", "ev8"))
    assert (fp32["model"]["precision"], int8["model"]["precision"]) == ("fp32", "int8")
    a, b = fp32["uncertainty"]["surprise_mean"], int8["uncertainty"]["surprise_mean"]
    assert a != b and b == pytest.approx(a, rel=0.1)
    capsys.readouterr()
    assert eval_cli.main(["--model", str(tmp_path / "m" / "last.pt"), "--sessions",
                          str(sessions), "--precision", "int8", "--device", "cuda"]) == 2
    assert "--precision int8 is a CPU precision" in capsys.readouterr().err


def test_next_latent_mrr_cannot_see_the_answer(sessions: Path) -> None:
    """A leak (the next frame in the query) would keep MRR high when the next frames are
    replaced by frames unrelated to the current one; without a leak it falls to chance."""
    from iwm_bus.model import create_iwm_model
    from train.evaluate import EvalConfig, next_latent_mrr

    m = create_iwm_model("custom", seed=0, encoder_name="vit_tiny_patch16_224", img_size=32,
                         patch_size=8, encoder_depth=1, pred_depth=1, pred_dim=64, pred_heads=2,
                         num_actions=5)
    store = FrameStore.from_sessions([sessions / "a.mcap"], 32, 16)
    cfg = EvalConfig(bank=32, max_transitions=100)
    base = next_latent_mrr(m, store, cfg)
    assert base["copy_last"] > base["chance"]
    noise = torch.from_numpy(np.random.default_rng(0).integers(0, 255, store.frames.shape,
                                                                np.uint8))
    scrambled = FrameStore(noise, store.action_id, store.vector, store.linked, store.session,
                           store.sources)
    r = next_latent_mrr(m, scrambled, cfg)
    assert r["model"] < 2.5 * r["chance"] and r["copy_last"] < 2.5 * r["chance"], r


@pytest.mark.games
def test_phase3_and_eval_on_a_real_recorded_game(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A real Pong session recorded by train.record, trained on for 2 steps, evaluated with
    counterfactual next frames from cloned emulator states."""
    pytest.importorskip("ale_py")
    from train.record import GAMES, record_session

    rec = tmp_path / "pong.mcap"
    record_session(GAMES["pong"], rec, seed=0, frames=60, name="pong")
    model_args = [a.replace("model.num_actions=5", "model.num_actions=18") for a in TOY]
    assert cli.main(["--phase", "3", "--sessions", str(rec), "--steps", "2", "--batch_size",
                     "8", "--preset", "cpu-tiny", *model_args,
                     "--out_dir", str(tmp_path / "m")]) == 0
    capsys.readouterr()
    assert eval_cli.main(["--model", str(tmp_path / "m" / "last.pt"), "--sessions", str(rec),
                          "--games", "ALE/Pong-v5", "--cf_states", "4", "--bank", "16",
                          "--aug_images", "1", "--cut_gap", "20"]) == 0
    out = capsys.readouterr().out
    assert "action discrimination MRR" in out and "chance=" in out


def test_export_keeps_weights_and_records_provenance(sessions: Path, tmp_path: Path) -> None:
    from iwm_bus.model import load_iwm
    from train.export import export

    assert train("--phase", "3", "--sessions", str(sessions), "--steps", "1", "--batch_size", "8",
                 "--out_dir", str(tmp_path / "m")) == 0
    src = tmp_path / "m" / "last.pt"
    info = export(src, tmp_path / "ship.pt", name="toy-v1",
                  eval_summary={"next_latent_mrr": {"model": 0.5, "copy_last": 0.4}})
    shipped = load_iwm(tmp_path / "ship.pt")
    assert shipped.provenance["name"] == "toy-v1" and info["action_vocab"] == "iwm-18"
    assert shipped.provenance["eval"]["next_latent_mrr"]["model"] == 0.5
    assert shipped.provenance["data"]["sessions"] == [str(sessions)]
    assert not any(k.startswith("target_encoder.") for k in state(tmp_path / "ship.pt"))
    trained = load_iwm(src, target_as_encoder=True)  # what ships: the EMA target encoder
    assert all(torch.equal(v, shipped.state_dict()[k]) for k, v in trained.state_dict().items())
    online = load_iwm(src)
    assert not all(torch.equal(v, shipped.state_dict()[k])
                   for k, v in online.state_dict().items() if k.startswith("encoder."))
    assert (tmp_path / "ship.pt").stat().st_size < 0.6 * src.stat().st_size
    # an exported checkpoint re-stamped with an eval made elsewhere: same weights and data
    export(tmp_path / "ship.pt", tmp_path / "stamped.pt", name="toy-v2",
           eval_summary={"next_latent_mrr": {"model": 0.7}}, recipe="r.sh")
    stamped = load_iwm(tmp_path / "stamped.pt")
    assert all(torch.equal(v, stamped.state_dict()[k]) for k, v in shipped.state_dict().items())
    assert stamped.provenance["name"] == "toy-v2" and stamped.provenance["recipe"] == "r.sh"
    assert stamped.provenance["eval"]["next_latent_mrr"]["model"] == 0.7
    assert stamped.provenance["data"] == shipped.provenance["data"]
    assert stamped.provenance["step"] == info["step"]


def test_dual_stream_training_starts_from_an_encoder_and_learns_views_with_actions(
        sessions: Path, tmp_path: Path) -> None:
    """The dual-stream presets' two features: ``init_from`` a checkpoint of the same encoder
    and another predictor (the encoder is taken, the predictor is new), and Phase 3 batches
    that carry augmentation views (``views_weight``) whose conditioning is the augmentation
    (``aug.condition``) or zero (an invariant stream)."""
    from iwm_bus.model import create_iwm_model, save_checkpoint
    from train.config import RunConfig
    from train.presets import preset
    from train.trainer import Trainer

    base = preset("cpu-tiny")
    enc = {"encoder_name": "vit_tiny_patch16_224", "img_size": 32, "encoder_depth": 1,
           "patch_size": 8}
    src = create_iwm_model("custom", seed=7, pred_depth=1, pred_dim=64, pred_heads=2,
                           num_actions=5, **enc)
    src.init_target_encoder()
    save_checkpoint(src, tmp_path / "src.pt", step=0)

    def run_cfg(condition: bool) -> RunConfig:
        d = {**base, "model": {**base["model"], **enc, "variant": "custom", "pred_depth": 2,
                               "pred_dim": 64, "pred_heads": 2, "num_actions": 5}}
        d["train"] = {**d["train"], "phase": 3, "sessions": [str(sessions)], "batch_size": 8,
                      "steps": 2, "init_from": str(tmp_path / "src.pt"),
                      "out_dir": str(tmp_path / f"o{condition}"), "progress": False}
        d["objective"] = {**d["objective"], "views_weight": 1.0}
        d["aug"] = {"condition": condition, "jitter_p": 1.0}
        return RunConfig.from_dict(d)

    told = Trainer(run_cfg(True))
    for k, v in src.encoder.state_dict().items():
        assert torch.equal(told.model.encoder.state_dict()[k], v), k
    fresh = create_iwm_model("custom", seed=0, pred_depth=2, pred_dim=64, pred_heads=2,
                             num_actions=5, **enc)
    for k, v in src.target_encoder.state_dict().items():
        assert torch.equal(told.model.target_encoder.state_dict()[k], v), k
    assert told.model.predictor.state_dict().keys() == fresh.predictor.state_dict().keys()
    assert len(told.model.predictor.blocks) == 2  # the run's new predictor, not the source's
    batch = told.make_batch(0)
    views = batch["views"]
    assert views["src"].shape == views["tgt"].shape == (8, 3, 32, 32)
    assert views["cond"].abs().sum() > 0  # told the augmentation (colour jitter always on)
    assert not torch.equal(views["src"], views["tgt"])
    blind = Trainer(run_cfg(False)).make_batch(0)["views"]
    assert torch.equal(blind["cond"], torch.zeros_like(blind["cond"]))
    torch.testing.assert_close(blind["src"], views["src"])  # same views, only not told
    out = told.model(batch, told.run_cfg.objective)
    assert float(out["views_pred"]) > 0
    without = told.model({k: v for k, v in batch.items() if k != "views"},
                         told.run_cfg.objective)
    assert float(out["loss"].detach()) > float(without["loss"].detach())  # views loss counts
    # views_residual: the next-frame call, starting from "the target view is the source
    # view": with identical views it is near zero at once; the masked form must inpaint
    import dataclasses
    same = {**batch, "views": {**views, "tgt": views["src"]}}
    obj = told.run_cfg.objective
    res = told.model(same, dataclasses.replace(obj, views_residual=True))["views_pred"]
    masked = told.model(same, obj)["views_pred"]
    assert float(res) < 0.2 * float(masked), (float(res), float(masked))
    told.run()
    rows = (tmp_path / "oTrue" / "metrics.csv").read_text().splitlines()
    assert "views_pred" in rows[0].split(",")
