"""Tests of iwm_bus.model at tiny sizes on CPU: shapes, determinism, rollout, checkpoints."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from iwm_bus.errors import CheckpointError
from iwm_bus.model import (
    EMA,
    IWM,
    VARIANT_DEPTHS,
    IWMConfig,
    create_iwm_model,
    ema_momentum,
    load_checkpoint,
    load_iwm,
    pad_cond,
    save_checkpoint,
)

pytestmark = pytest.mark.timeout(60)

# ViT-Ti at 32 px: D = 192, N = 4 patches; a narrow predictor.
TINY = dict(encoder_name="vit_tiny_patch16_224", img_size=32, pred_dim=64, pred_heads=2,
            ensemble=3)
D, N = 192, 4


def tiny(variant: str = "custom", seed: int = 0, **kw) -> IWM:
    return create_iwm_model(variant, seed=seed, **{**TINY, **kw})


@pytest.fixture(scope="module")
def model() -> IWM:
    return tiny(num_actions=5, pred_depth=2)


def frames(b: int, h: int = 37, w: int = 53, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (b, h, w, 3), dtype=np.uint8)


def assert_finite(*tensors: torch.Tensor | None) -> None:
    for t in tensors:
        if t is not None:
            assert torch.isfinite(t).all()


# ----------------------------------------------------------------------------- config


def test_config_defaults_and_derived() -> None:
    cfg = IWMConfig()
    assert (cfg.embed_dim, cfg.num_patches) == (768, 196)
    assert IWMConfig(encoder_name="vit_small_patch16_224").embed_dim == 384
    assert IWMConfig(**TINY).num_patches == N
    assert IWMConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("field,value", [
    ("variant", "huge"), ("encoder_name", "no_such_net"), ("img_size", 30),
    ("pred_depth", 0), ("pred_dim", 66), ("ensemble", 1), ("cond_dim", 2.5),
    ("num_actions", -1), ("dropout", 1.5), ("ema_momentum_start", 1.1), ("pred_depth", True),
    ("action_init_std", -0.1), ("layer_cond_init_std", "0.02"),
])
def test_config_rejects_bad_values(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        IWMConfig(**{field: value})


def test_config_from_dict_rejects_unknown_keys() -> None:
    with pytest.raises(ValueError, match="unknown IWMConfig keys.*'depth'"):
        IWMConfig.from_dict({"depth": 3})


def test_pad_cond() -> None:
    out = pad_cond([0.5, 0.3, 0.0], 16)
    assert out.dtype == np.float32 and out.shape == (16,)
    np.testing.assert_array_equal(out[:3], np.float32([0.5, 0.3, 0.0]))
    assert not out[3:].any()
    assert pad_cond(np.ones((4, 2)), 5).shape == (4, 5)
    with pytest.raises(ValueError, match="length 17"):
        pad_cond(np.zeros(17), 16)


def test_vit_b_core_param_count() -> None:
    m = create_iwm_model("core")
    counts = m.num_params()
    assert 85_000_000 < counts["encoder"] < 87_000_000
    assert len(m.predictor.blocks) == 8 and m.embed_dim == 768
    assert m.target_encoder is None  # not built for inference


# ----------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("variant", ["core", "invariant", "equivariant", "custom"])
def test_variant_shapes(variant: str) -> None:
    m = tiny(variant)
    assert len(m.predictor.blocks) == VARIANT_DEPTHS.get(variant, 8)
    z, p = m.encode(frames(3))
    assert z.shape == (3, D) and p.shape == (3, N, D) and z.dtype == torch.float32
    z1, p1 = m.encode(frames(1)[0])  # a single (H, W, 3) frame
    assert z1.shape == (1, D) and p1.shape == (1, N, D)
    pred = m.predict(z, p, cond=np.zeros((3, 16), np.float32))
    assert pred.z_cls.shape == (3, D) and pred.patches.shape == (3, N, D)
    assert pred.uncertainty.shape == (3,) and (pred.uncertainty > 0).all()
    cls_only = m.predict(z)
    assert cls_only.patches is None and cls_only.z_cls.shape == (3, D)
    roll = m.rollout(z, p, cond_seq=torch.zeros(3, 4, 16))
    assert roll.z_cls_seq.shape == (3, 4, D) and roll.patches_seq.shape == (3, 4, N, D)
    assert roll.uncertainty_seq.shape == (3, 4)
    assert_finite(z, p, pred.z_cls, pred.patches, pred.uncertainty, roll.z_cls_seq,
                  roll.patches_seq, roll.uncertainty_seq)


def test_encode_accepts_tensor_and_numpy_alike(model: IWM) -> None:
    f = frames(2, 32, 32)
    z_np, p_np = model.encode(f)
    z_t, p_t = model.encode(torch.from_numpy(f))
    assert torch.equal(z_np, z_t) and torch.equal(p_np, p_t)


def test_preprocess_normalises_on_device(model: IWM) -> None:
    grey = np.full((40, 60, 3), 128, np.uint8)
    x = model.preprocess(grey)
    assert x.shape == (1, 3, 32, 32)
    expect = (128 / 255 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(x[0, :, 5, 7], expect)


# ----------------------------------------------------------------------------- determinism


def test_determinism_with_seed() -> None:
    a, b = tiny(seed=3, pred_depth=2), tiny(seed=3, pred_depth=2)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    f = frames(2)
    za, pa = a.encode(f)
    zb, pb = b.encode(f)
    assert torch.equal(za, zb) and torch.equal(pa, pb)
    assert torch.equal(a.predict(za, pa).z_cls, b.predict(zb, pb).z_cls)
    c = tiny(seed=4, pred_depth=2)
    assert not torch.equal(c.encode(f)[0], za)


# ----------------------------------------------------------------------------- rollout


def test_rollout_equals_chained_predict(model: IWM) -> None:
    z, p = model.encode(frames(2))
    rng = np.random.default_rng(1)
    cond_seq = rng.normal(size=(2, 3, 16)).astype(np.float32)
    action_seq = np.array([[0, 4, -1], [2, 2, 1]])
    roll = model.rollout(z, p, cond_seq=cond_seq, action_seq=action_seq)
    zk, pk = z, p
    for k in range(3):
        step = model.predict(zk, pk, cond=cond_seq[:, k], action_id=action_seq[:, k])
        assert torch.equal(roll.z_cls_seq[:, k], step.z_cls)
        assert torch.equal(roll.patches_seq[:, k], step.patches)
        assert torch.equal(roll.uncertainty_seq[:, k], step.uncertainty)
        zk, pk = step.z_cls, step.patches


@pytest.mark.parametrize("with_patches", [True, False])
def test_batched_rollout_equals_per_candidate(model: IWM, with_patches: bool) -> None:
    z, p = model.encode(frames(1))
    p = p if with_patches else None
    cond_seq = torch.from_numpy(np.random.default_rng(2).normal(size=(6, 4, 16)).astype(np.float32))
    action_seq = torch.arange(24).reshape(6, 4) % 6 - 1
    batched = model.rollout(z, p, cond_seq=cond_seq, action_seq=action_seq)  # start shared
    for i in range(6):
        one = model.rollout(z, p, cond_seq=cond_seq[i:i + 1], action_seq=action_seq[i:i + 1])
        torch.testing.assert_close(batched.z_cls_seq[i:i + 1], one.z_cls_seq, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(batched.uncertainty_seq[i:i + 1], one.uncertainty_seq,
                                   atol=1e-5, rtol=1e-5)
        if with_patches:
            torch.testing.assert_close(batched.patches_seq[i:i + 1], one.patches_seq,
                                       atol=1e-5, rtol=1e-5)


def test_actions_change_the_prediction(model: IWM) -> None:
    z, p = model.encode(frames(1))
    a = model.predict(z, p, action_id=[0]).z_cls
    b = model.predict(z, p, action_id=[3]).z_cls
    none = model.predict(z, p).z_cls
    assert not torch.equal(a, b)
    assert torch.equal(none, model.predict(z, p, action_id=[-1]).z_cls)


def test_action_init_std_sets_how_far_a_new_predictor_moves_with_the_action() -> None:
    """A new predictor's next-frame prediction under two actions: almost equal at the ViT-style
    init (on Atari ~1e-6 apart in 1 - cos, where one state's outcomes lie ~6e-3 apart); the
    larger init starts it near the outcomes' scale. Fails if the fields are ignored (same
    spread) or if a zero action table still moves the prediction."""
    def spread(**kw) -> float:
        m = tiny(num_actions=5, pred_depth=2, action_every_layer=True, **kw)
        z, p = m.encode(frames(1))
        a, b = (m.predict(z, p, action_id=[i]).patches.flatten() for i in (0, 3))
        return ((a - b).norm() / a.norm()).item()

    small, large = spread(), spread(action_init_std=1.0, layer_cond_init_std=0.02)
    assert large > 10 * small, (small, large)  # measured 23x
    assert spread(action_init_std=0.0) == 0.0  # the table is the only action input here


# ----------------------------------------------------------------------------- bad inputs


def test_bad_inputs_raise_clear_errors(model: IWM) -> None:
    z, p = model.encode(frames(2))
    with pytest.raises(ValueError, match="cond has length.*cond_dim=16.*pad_cond"):
        model.predict(z, p, cond=np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        model.encode(frames(1).astype(np.float32))
    with pytest.raises(ValueError, match="3 channels"):
        model.encode(np.zeros((2, 32, 32, 4), np.uint8))
    with pytest.raises(ValueError, match="3 channels"):
        model.encode(np.zeros((2, 3, 32, 32), np.uint8))  # channels first
    with pytest.raises(ValueError, match="z_cls must be"):
        model.predict(torch.zeros(2, 10))
    with pytest.raises(ValueError, match="patches must be"):
        model.predict(z, p[:, :3])
    with pytest.raises(ValueError, match="action ids must be in"):
        model.predict(z, p, action_id=[0, 5])
    with pytest.raises(ValueError, match="rollout needs"):
        model.rollout(z, p)
    with pytest.raises(ValueError, match="start state batch"):
        model.rollout(z, p, cond_seq=torch.zeros(3, 2, 16))
    no_actions = tiny(pred_depth=1)
    with pytest.raises(ValueError, match="num_actions=0"):
        no_actions.predict(z, action_id=[1, 1])


# ----------------------------------------------------------------------------- training bits


def test_training_path_has_gradients() -> None:
    m = tiny(pred_depth=1).train()
    x = m.preprocess(frames(2))
    p = m.encode_features(x)
    heads = m.predict_heads(p.mean(1), p, cond=torch.zeros(2, 16))
    assert heads.shape == (3, 2, N, D)
    with pytest.raises(RuntimeError, match="init_target_encoder"):
        m.encode_features(x, target=True)
    ema = m.make_ema(total_steps=10)
    pt = m.encode_features(x, target=True)
    loss = (heads - pt.detach()).square().mean()
    loss.backward()
    assert m.encoder.patch_embed.proj.weight.grad is not None
    assert all(q.grad is None for q in m.target_encoder.parameters())
    assert ema.update(0) == pytest.approx(0.996)


def test_ema_update_is_the_momentum_average_of_every_weight() -> None:
    """target <- m target + (1 - m) source for every parameter (against float64 by hand, as
    the multi-tensor update must stay), buffers copied."""
    torch.manual_seed(0)
    src, tgt = (torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
                for _ in range(2))
    ref = {k: v.detach().double().clone() for k, v in tgt.named_parameters()}
    ema = EMA(src, tgt, total_steps=4, start=0.9, end=1.0)
    for step in range(3):
        with torch.no_grad():
            for p in src.parameters():
                p.add_(torch.randn_like(p))
            src[1].running_mean.add_(1.0)
        m = ema.update(step)
        assert m == pytest.approx(0.9 + 0.1 * step / 4)
        for k, p in src.named_parameters():
            ref[k] = m * ref[k] + (1 - m) * p.detach().double()
        for k, p in tgt.named_parameters():
            assert torch.allclose(p.double(), ref[k], rtol=0, atol=1e-6), k
        assert torch.equal(tgt[1].running_mean, src[1].running_mean)


def test_ema_schedule_is_pure_and_resume_exact() -> None:
    assert ema_momentum(0, 100) == pytest.approx(0.996)
    assert ema_momentum(50, 100) == pytest.approx(0.998)
    assert ema_momentum(100, 100) == ema_momentum(500, 100) == 1.0
    src, t1, t2 = (torch.nn.Linear(3, 3) for _ in range(3))
    t2.load_state_dict(t1.state_dict())
    e1 = EMA(src, t1, total_steps=10)
    for step in range(4):
        e1.update(step)
    e2 = EMA(src, t2, total_steps=99)
    e2.load_state_dict(EMA(src, t1, 10).state_dict() | {"step": 0})
    for step in range(4):  # the same steps replayed give the same weights
        e2.update(step)
    assert torch.equal(t1.weight, t2.weight) and e1.state_dict() == e2.state_dict()
    with pytest.raises(ValueError, match="same parameters"):
        EMA(src, torch.nn.Linear(3, 4), 10)


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip_is_bit_exact(model: IWM, tmp_path: Path) -> None:
    path = tmp_path / "iwm.pt"
    save_checkpoint(model, path, step=7, note="hi", opt={"lr": torch.tensor(0.1)})
    loaded = load_iwm(path, "cpu", variant="custom")
    assert loaded.config == model.config and not loaded.training
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    f = frames(2)
    z, p = model.encode(f)
    z2, p2 = loaded.encode(f)
    assert torch.equal(z, z2) and torch.equal(p, p2)
    assert torch.equal(model.predict(z, p).patches, loaded.predict(z2, p2).patches)
    extra = load_checkpoint(path)["extra"]
    assert extra["step"] == 7 and extra["note"] == "hi"
    assert not list(tmp_path.glob(".*tmp*"))  # atomic write left nothing behind


def test_the_conv_encoder_is_an_encoder_like_the_vits(tmp_path: Path) -> None:
    """``iwm_conv64`` through the whole model: geometry, encode, predict, a bit-exact
    checkpoint, and context masking equal to keeping cells of the full map."""
    from iwm_bus.model.encoder import vit_patch_tokens

    m = tiny(encoder_name="iwm_conv64", img_size=64, num_actions=18, action_every_layer=True,
             local_mix=True)
    assert (m.embed_dim, m.num_patches, m.config.grid) == (64, 64, 8)
    z, p = m.encode(frames(2))
    assert z.shape == (2, 64) and p.shape == (2, 64, 64)
    pred = m.predict(z, p, action_id=[1, 4])
    assert pred.patches.shape == (2, 64, 64)
    save_checkpoint(m, tmp_path / "conv.pt")
    loaded = load_iwm(tmp_path / "conv.pt", "cpu")
    assert torch.equal(loaded.encode(frames(2))[1], p)
    x = m.preprocess(frames(2))
    keep = torch.tensor([[0, 9, 63], [5, 6, 7]])
    with torch.no_grad():
        full = vit_patch_tokens(m.encoder, x)
        kept = vit_patch_tokens(m.encoder, x, keep)
    assert torch.equal(kept, torch.stack([full[0, keep[0]], full[1, keep[1]]]))


def test_a_conv_encoder_cell_sees_only_its_neighbourhood() -> None:
    """What the conv encoder is for: a sprite changed in one corner changes the cells
    around it and leaves the far corner's alone (a ViT's attention mixes it everywhere)."""
    m = tiny(encoder_name="iwm_conv64", img_size=128)
    a = frames(1, 128, 128)
    b = a.copy()
    b[0, :8, :8] = 255 - b[0, :8, :8]  # the top-left cell's pixels
    (_, pa), (_, pb) = m.encode(a), m.encode(b)
    moved = (pa - pb).norm(dim=-1)[0].reshape(16, 16)
    assert moved[0, 0] > 0.1 and moved[8:, 8:].max() == 0.0, moved
    vit = tiny(img_size=128)
    (_, va), (_, vb) = vit.encode(a), vit.encode(b)
    assert (va - vb).norm(dim=-1)[0].reshape(8, 8)[4:, 4:].min() > 0


def test_checkpoint_target_encoder(tmp_path: Path) -> None:
    m = tiny(pred_depth=1)
    m.make_ema(10)
    with torch.no_grad():
        m.target_encoder.cls_token.add_(1.0)
    save_checkpoint(m, tmp_path / "t.pt")
    assert load_iwm(tmp_path / "t.pt").target_encoder is None  # inference: not loaded
    back = load_iwm(tmp_path / "t.pt", with_target=True)
    assert torch.equal(back.target_encoder.cls_token, m.target_encoder.cls_token)
    with pytest.raises(TypeError, match="extra\\['bad'\\]"):
        save_checkpoint(m, tmp_path / "x.pt", bad=object())


class _Payload:
    """Unpickling this would call _plant (i.e. run code); a safe loader must refuse."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (_plant, (str(self.marker),))


def _plant(marker: str) -> None:
    Path(marker).write_text("pwned")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("raw_pickle", [False, True])
def test_pickle_payload_is_refused(model: IWM, tmp_path: Path, raw_pickle: bool) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    payload = {"format": "iwm-bus/checkpoint", "version": 1, "config": model.config.to_dict(),
               "state_dict": model.state_dict(), "extra": {"x": _Payload(marker)}}
    if raw_pickle:
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path)
    with pytest.raises(CheckpointError, match="evil.pt") as err:
        load_iwm(path)
    assert not marker.exists(), "unpickling ran code from the checkpoint"
    if not raw_pickle:
        assert "pickled Python objects" in str(err.value)


def test_truncated_or_missing_checkpoint_is_refused(model: IWM, tmp_path: Path) -> None:
    path = tmp_path / "iwm.pt"
    save_checkpoint(model, path)
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 10, 0):
        (tmp_path / "cut.pt").write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="cut.pt.*(truncated|corrupt)"):
            load_iwm(tmp_path / "cut.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_iwm(tmp_path / "absent.pt")


def test_config_mismatch_is_refused(model: IWM, tmp_path: Path) -> None:
    path = tmp_path / "iwm.pt"
    save_checkpoint(model, path)
    payload = torch.load(path, weights_only=True)

    def rewrite(**changes) -> Path:
        out = tmp_path / "changed.pt"
        torch.save({**payload, **changes}, out)
        return out

    deeper = rewrite(config={**payload["config"], "pred_depth": 3})
    with pytest.raises(CheckpointError, match="do not match.*missing weights.*blocks.2"):
        load_iwm(deeper)
    wider = rewrite(config={**payload["config"], "cond_dim": 8})
    with pytest.raises(CheckpointError, match="cond_embed.0.weight has shape"):
        load_iwm(wider)
    with pytest.raises(CheckpointError, match="invalid config.*unknown IWMConfig keys"):
        load_iwm(rewrite(config={**payload["config"], "depth": 3}))
    with pytest.raises(CheckpointError, match="version 99"):
        load_iwm(rewrite(version=99))
    with pytest.raises(CheckpointError, match="variant 'custom', expected 'invariant'"):
        load_iwm(path, variant="invariant")
    plain = tmp_path / "plain.pt"
    torch.save(model.state_dict(), plain)
    with pytest.raises(CheckpointError, match="not an iwm-bus checkpoint"):
        load_iwm(plain)


# ----------------------------------------------------------------------------- GPU


GPU = os.environ.get("IWM_TEST_DEVICE", "cuda:0")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(1).cpu(), b.flatten(1).cpu()).min())


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("amp", [False, True])
def test_gpu_matches_cpu(tmp_path: Path, amp: bool) -> None:
    cpu = tiny(pred_depth=2, img_size=64)
    save_checkpoint(cpu, tmp_path / "m.pt")
    gpu = load_iwm(tmp_path / "m.pt", GPU, amp=amp)
    f = frames(4, 48, 80)
    z, p = cpu.encode(f)
    zg, pg = gpu.encode(f)
    assert zg.device.type == "cuda" and zg.dtype == torch.float32
    floor = 0.98 if amp else 0.999
    assert _cos(z, zg) > floor and _cos(p, pg) > floor
    pred, predg = cpu.predict(z, p), gpu.predict(z.to(GPU), p.to(GPU))
    assert _cos(pred.patches, predg.patches) > floor
    torch.testing.assert_close(predg.uncertainty.cpu(), pred.uncertainty, rtol=0.1, atol=0.01)


@pytest.mark.gpu
@needs_gpu
def test_gpu_rollout_consistency() -> None:
    m = tiny(num_actions=5, pred_depth=2, img_size=64, device=GPU)
    z, p = m.encode(frames(1, 64, 64))
    cond_seq = torch.randn(6, 3, 16, generator=torch.Generator().manual_seed(0))
    roll = m.rollout(z, p, cond_seq=cond_seq)
    zk, pk = z.expand(6, -1), p.expand(6, -1, -1)
    for k in range(3):  # same shapes, same kernels: chained predict gives the same numbers
        step = m.predict(zk, pk, cond=cond_seq[:, k])
        assert torch.equal(roll.z_cls_seq[:, k], step.z_cls)
        zk, pk = step.z_cls, step.patches
    for i in range(6):  # another batch size may pick other bf16 kernels: close, not equal
        one = m.rollout(z, p, cond_seq=cond_seq[i:i + 1])
        assert _cos(roll.patches_seq[i:i + 1, -1], one.patches_seq[:, -1]) > 0.99


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("amp", [False, True])
def test_gpu_cuda_graphs_match_eager(amp: bool) -> None:
    m = tiny(num_actions=5, pred_depth=2, img_size=64, device=GPU, amp=amp)
    assert m.describe()["cuda_graphs"]
    f1, f2 = frames(2, 64, 64, seed=1), frames(2, 64, 64, seed=2)
    z1, p1 = m.encode(f1)
    keep = z1.clone()
    z2, _ = m.encode(f2)  # replays the same graph
    assert torch.equal(z1, keep) and not torch.equal(z1, z2)  # results never alias
    pred = m.predict(z1, p1, action_id=[1, -1])
    roll = m.rollout(z1[:1], p1[:1], cond_seq=torch.ones(3, 2, 16))
    m.cuda_graphs = False
    ze, pe = m.encode(f1)
    torch.testing.assert_close(ze, z1, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(pe, p1, rtol=1e-6, atol=1e-6)
    eager = m.predict(z1, p1, action_id=[1, -1])
    torch.testing.assert_close(eager.patches, pred.patches, rtol=1e-6, atol=1e-6)
    roll_eager = m.rollout(z1[:1], p1[:1], cond_seq=torch.ones(3, 2, 16))
    torch.testing.assert_close(roll_eager.patches_seq, roll.patches_seq, rtol=1e-6, atol=1e-6)
    m.cuda_graphs = True
    m.to("cpu").to(GPU)  # moving drops the graphs; they are captured again
    torch.testing.assert_close(m.encode(f1)[0], z1, rtol=1e-6, atol=1e-6)


def test_the_conditioning_vector_alone_changes_the_prediction(model: IWM) -> None:
    """Same frame, same action id, another conditioning vector: another prediction, in the
    next-frame call, the global-latent call and a rollout; the same vector, the same one.
    (Kills "the action/conditioning vector zeroed before the predictor".)"""
    z, p = model.encode(frames(1))
    cond = np.random.default_rng(3).normal(size=(1, 16)).astype(np.float32)
    for patches in (p, None):
        base = model.predict(z, patches, action_id=[2]).z_cls
        moved = model.predict(z, patches, cond=cond, action_id=[2]).z_cls
        assert torch.equal(moved, model.predict(z, patches, cond=cond, action_id=[2]).z_cls)
        # the untrained conditioning is small (init std 0.02) but far above float noise
        scale = (base - z).abs().max() if patches is not None else base.abs().max()
        assert (moved - base).abs().max() > 1e-3 * scale, patches is None
    zeros = model.rollout(z, p, cond_seq=np.zeros((1, 3, 16), np.float32))
    rolled = model.rollout(z, p, cond_seq=np.repeat(cond[:, None], 3, axis=1))
    for k in range(3):
        assert not torch.allclose(rolled.patches_seq[:, k], zeros.patches_seq[:, k],
                                  rtol=0, atol=1e-6), k


# ------------------------------------------------------------------ inference precision


def _blocks(n: int, seed: int) -> np.ndarray:
    """n frames (n, 64, 64, 3) of coloured blocks on a dark ground, each its own scene."""
    rng = np.random.default_rng(seed)
    out = np.full((n, 64, 64, 3), 20, np.uint8)
    for f in out:
        for _ in range(4):
            y, x, h, w = rng.integers(0, 48, 2).tolist() + rng.integers(6, 16, 2).tolist()
            f[y:y + h, x:x + w] = rng.integers(40, 255, 3)
    return out


@pytest.fixture(scope="module")
def shipped() -> Path:
    from iwm_bus.default_model import dual_checkpoints

    return dual_checkpoints()[0]  # trained weights: what the precisions are used on


@pytest.mark.parametrize("precision, most", [("bf16", 0.02), ("int8", 0.05)])
def test_a_lower_precision_is_close_to_fp32_without_being_it(shipped: Path, precision: str,
                                                            most: float) -> None:
    """The shipped semantic model at bf16 / int8 against itself at fp32, on the same frames:
    latents and predictions within ``most`` (relative), each frame's nearest fp32 latent
    still its own, and not bit-identical (kills "the precision is ignored")."""
    from iwm_bus.model import set_precision

    ref = load_iwm(shipped, "cpu")
    low = set_precision(load_iwm(shipped, "cpu"), precision)
    assert ref.precision == "auto" and low.describe()["precision"] == precision
    assert low.num_params() == ref.num_params()  # int8's packed weights are counted too
    f = _blocks(8, 0)
    (z0, p0), (_, p1) = ref.encode(f), low.encode(f)
    rel = float((p1 - p0).norm() / p0.norm())
    assert 1e-5 < rel < most, rel
    nearest = torch.cdist(p1.flatten(1), p0.flatten(1)).argmin(1)
    assert nearest.tolist() == list(range(8))
    ids = torch.arange(8) % 18
    a, b = ref.predict(z0, p0, action_id=ids), low.predict(z0, p0, action_id=ids)
    rel = float((b.patches - a.patches).norm() / a.patches.norm())
    assert 1e-5 < rel < most, rel


def test_int8_is_for_inference_on_a_cpu(shipped: Path, tmp_path: Path) -> None:
    from iwm_bus.model import set_precision

    q = set_precision(load_iwm(shipped, "cpu"), "int8")
    assert not q.training
    with pytest.raises(RuntimeError, match="inference only"):
        q({"frames": torch.zeros(1, 2, 3, 64, 64)})
    with pytest.raises(ValueError, match="cannot be saved"):
        save_checkpoint(q, tmp_path / "q.pt")
    with pytest.raises(ValueError, match="already int8"):
        set_precision(q, "fp32")
    with pytest.raises(ValueError, match="precision must be one of"):
        set_precision(tiny(), "fp16")
    with pytest.raises(ValueError, match="int8 is a CPU precision"):
        set_precision(tiny().to("meta"), "int8")
    with pytest.raises(ValueError, match="bf16 autocast runs on a CPU or CUDA"):
        set_precision(tiny().to("meta"), "bf16")
    fp32 = set_precision(tiny(), "fp32")
    assert not fp32.amp and not fp32.cpu_amp
