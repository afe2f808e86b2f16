"""Tests of iwm_bus.metrics against slow pure-Python references."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from iwm_bus import metrics
from iwm_bus.metrics import (
    RunningMean,
    SurpriseZ,
    auroc,
    mrr,
    patch_errors,
    patch_surprise,
    reciprocal_rank,
    reciprocal_ranks,
    reciprocal_ranks_torch,
    surprise,
    surprise_torch,
)

pytestmark = pytest.mark.timeout(60)

# ----------------------------------------------------------------------------- references


def ref_surprise(p: list[float], o: list[float], eps: float = 1e-6) -> float:
    def ln(x: list[float]) -> list[float]:
        mu = sum(x) / len(x)
        var = sum((v - mu) ** 2 for v in x) / len(x)
        return [(v - mu) / math.sqrt(var + eps) for v in x]

    lp, lo = ln(p), ln(o)
    return math.sqrt(sum((a - b) ** 2 for a, b in zip(lp, lo, strict=True))) / math.sqrt(len(p))


def ref_cos(a: list[float], b: list[float], eps: float = 1e-6) -> float:
    na = max(math.sqrt(sum(v * v for v in a)), eps)
    nb = max(math.sqrt(sum(v * v for v in b)), eps)
    return sum((x / na) * (y / nb) for x, y in zip(a, b, strict=True))


def ref_rr(p: list[float], o: list[float], cands: list[list[float]]) -> float:
    s_obs = ref_cos(o, p)
    rank = 1 + sum(1 for c in cands if ref_cos(c, p) >= s_obs)
    return 1.0 / rank


def rand(*shape: int, seed: int = 0, dtype: type = np.float32) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(dtype)


# ----------------------------------------------------------------------------- surprise


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_surprise_matches_reference(dtype: type) -> None:
    p, o = rand(5, 64, seed=1, dtype=dtype), rand(5, 64, seed=2, dtype=dtype)
    got = surprise(p, o)
    assert got.shape == (5,)
    want = [ref_surprise(p[i].tolist(), o[i].tolist()) for i in range(5)]
    np.testing.assert_allclose(got, want, rtol=1e-9)
    single = surprise(p[0], o[0])
    assert isinstance(single, float) and single == pytest.approx(want[0], rel=1e-9)


def test_surprise_scale() -> None:
    a = rand(768, seed=3)
    assert surprise(a, a) == pytest.approx(0.0, abs=1e-6)
    assert surprise(a, 3 * a + 5) == pytest.approx(0.0, abs=1e-5)  # affine-invariant
    assert surprise(a, -a) == pytest.approx(2.0, abs=1e-5)
    # unrelated latents sit near sqrt(2) whatever the width
    for d in (256, 768, 4096):
        assert surprise(rand(d, seed=4), rand(d, seed=5)) == pytest.approx(math.sqrt(2), abs=0.1)


@settings(max_examples=50, deadline=None)
@given(arrays(np.float64, (2, 16), elements=st.floats(-1e3, 1e3)))
def test_surprise_bounded_and_symmetric(x: np.ndarray) -> None:
    s = surprise(x[0], x[1])
    assert 0.0 <= s <= 2.0 + 1e-9
    assert s == pytest.approx(surprise(x[1], x[0]), abs=1e-12)


def test_surprise_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="pred and observed"):
        surprise(np.zeros(4), np.zeros(5))


# ----------------------------------------------------------------------------- ranks


def test_reciprocal_rank_matches_reference() -> None:
    p, o, c = rand(32, seed=1), rand(32, seed=2), rand(20, 32, seed=3)
    assert reciprocal_rank(p, o, c) == pytest.approx(ref_rr(p.tolist(), o.tolist(), c.tolist()))
    assert reciprocal_rank(p, p * 2, c) == 1.0  # the observed latent is the best match
    assert reciprocal_rank(p, o, np.zeros((0, 32))) == 1.0  # no candidates


def test_ties_count_against_the_observed_latent() -> None:
    p, o = rand(8, seed=1), rand(8, seed=2)
    assert reciprocal_rank(p, o, np.stack([o, o])) == pytest.approx(1 / 3)
    assert reciprocal_rank(p, o, np.stack([2 * o])) == pytest.approx(1 / 2)  # same direction
    assert ref_rr(p.tolist(), o.tolist(), [o.tolist(), o.tolist()]) == pytest.approx(1 / 3)


@pytest.mark.parametrize("shared", [False, True])
def test_mrr_matches_reference(shared: bool) -> None:
    b, k, d = 16, 30, 24
    obs = rand(b, d, seed=1)
    pred = obs + 3.0 * rand(b, d, seed=2)  # noisy predictions: ranks spread out
    cands = rand(k, d, seed=3) if shared else rand(b, k, d, seed=3)
    rr = reciprocal_ranks(pred, obs, cands)
    want = [ref_rr(pred[i].tolist(), obs[i].tolist(),
                   (cands if shared else cands[i]).tolist()) for i in range(b)]
    np.testing.assert_allclose(rr, want)
    assert len(set(want)) > 2  # the test exercises several ranks
    assert mrr(pred, obs, cands) == pytest.approx(sum(want) / b)


def test_rank_shape_errors() -> None:
    with pytest.raises(ValueError, match="candidates must be"):
        reciprocal_ranks(rand(2, 8), rand(2, 8), rand(3, 3, 8))
    with pytest.raises(ValueError, match="pred and observed"):
        mrr(rand(8), rand(8), rand(3, 8))


# ----------------------------------------------------------------------------- torch versions


def test_torch_versions_match_numpy() -> None:
    torch = pytest.importorskip("torch")
    pred, obs, cands = rand(8, 32, seed=1), rand(8, 32, seed=2), rand(8, 40, 32, seed=3)
    pred = obs + 1.2 * pred
    np.testing.assert_allclose(surprise_torch(torch.from_numpy(pred), torch.from_numpy(obs)),
                               surprise(pred, obs), rtol=1e-5)
    for c in (cands, cands[0]):
        got = reciprocal_ranks_torch(torch.from_numpy(pred), torch.from_numpy(obs),
                                     torch.from_numpy(c))
        np.testing.assert_allclose(got.numpy(), reciprocal_ranks(pred, obs, c))
        assert float(got.mean()) == pytest.approx(mrr(pred, obs, c))


# ----------------------------------------------------------------------------- running mean


def test_running_mean() -> None:
    rm = RunningMean()
    assert math.isnan(rm.value)
    rm.update(1.0)
    assert rm.update([2.0, 3.0]) == pytest.approx(2.0) and rm.count == 3
    win = RunningMean(window=2)
    for v in (1.0, 5.0, 7.0):
        win.update(v)
    assert win.value == pytest.approx(6.0) and win.count == 3
    with pytest.raises(ValueError, match="non-finite"):
        rm.update(float("nan"))
    rm.reset()
    assert rm.count == 0 and math.isnan(rm.value)


def test_package_and_metrics_import_without_torch() -> None:
    code = "import iwm_bus, iwm_bus.metrics, sys; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)


def _stream(rng: np.random.Generator, n: int, scale: float, patches: int = 16) -> np.ndarray:
    """Per-patch errors (n, patches) of ordinary play: each patch its own level and spread."""
    level = rng.uniform(0.1, 0.5, patches) * scale
    return np.abs(level + rng.normal(0, 0.05 * scale, (n, patches)))


def test_surprise_z_separates_cuts_that_raw_surprise_cannot() -> None:
    """Two games at different error scales, a cut in each raising a quarter of the patches
    by ~2x their level: raw surprise ranks the calm game's cut below the busy game's
    ordinary frames; surprise_z puts both cuts above every ordinary frame of both."""
    rng = np.random.default_rng(0)
    scores_raw, scores_z, cuts_raw, cuts_z = [], [], [], []
    for scale in (1.0, 4.0):
        errs = _stream(rng, 200, scale)
        sz = SurpriseZ()
        for e in errs[:-1]:
            z = sz(e)
            if not math.isnan(z):
                scores_z.append(z)
                scores_raw.append(float(np.sqrt(np.mean(e ** 2))))
        cut = errs[-1].copy()
        cut[:4] *= 3.0
        cuts_raw.append(float(np.sqrt(np.mean(cut ** 2))))
        cuts_z.append(sz.score(cut))
    assert auroc(scores_raw, cuts_raw) < 0.8  # the calm game's cut hides among busy frames
    assert min(cuts_z) > max(scores_z)
    assert len(scores_z) == 2 * (199 - SurpriseZ().warmup)


def test_surprise_z_state_score_update_and_batch() -> None:
    rng = np.random.default_rng(1)
    errs = _stream(rng, 40, 1.0)
    a = SurpriseZ(warmup=5)
    assert math.isnan(a.score(errs[0]))
    for e in errs[:30]:
        a.update(e)
    s1 = a.score(errs[30])
    assert a.score(errs[30]) == s1 and a.count == 30  # score does not change the state
    # a cut folds in clipped: the next ordinary frame still scores as ordinary
    before = a.score(errs[31])
    a.update(errs[30] * 50)
    assert a.score(errs[31]) < before + 1.0
    # B streams at once equal B single streams
    batch = SurpriseZ(warmup=5)
    single = [SurpriseZ(warmup=5), SurpriseZ(warmup=5)]
    two = np.stack([errs, errs[::-1]], 1)  # (40, 2, patches)
    for t in range(40):
        got = batch(two[t])
        want = [single[i](two[t, i]) for i in range(2)]
        assert np.allclose(got, want, equal_nan=True)
    with pytest.raises(ValueError, match="alpha"):
        SurpriseZ(alpha=0)


def test_patch_errors_are_what_patch_surprise_averages() -> None:
    rng = np.random.default_rng(2)
    p, o = rng.normal(size=(2, 3, 9, 8))
    e = patch_errors(p, o)
    assert e.shape == (3, 9)
    assert np.allclose(np.sqrt((e ** 2).mean(-1)), patch_surprise(p, o))
    assert np.allclose(e[1, 4], surprise(p[1, 4], o[1, 4]))


def test_abstraction_index_places_a_model_between_invariant_and_equivariant() -> None:
    chance = 0.0239
    assert metrics.abstraction_index(chance, chance) == 1.0  # conditioning ignored
    assert metrics.abstraction_index(0.01, chance) == 1.0  # below chance: clipped
    assert metrics.abstraction_index(1.0, chance) == 0.0  # always the right view
    mid = metrics.abstraction_index(0.5, chance)
    assert mid == pytest.approx(1 - (0.5 - chance) / (1 - chance))
    assert metrics.abstraction_index(0.3, chance) > mid > metrics.abstraction_index(0.7, chance)
    for bad in ((float("nan"), chance), (0.5, 0.0), (0.5, 1.0)):
        with pytest.raises(ValueError):
            metrics.abstraction_index(*bad)


def test_running_mean_update_returns_the_current_mean_windowed_or_not() -> None:
    for window, want in ((None, [1.0, 3.0, 5.0]), (2, [1.0, 3.0, 7.0])):
        rm = RunningMean(window)
        assert [rm.update(v) for v in (1.0, 5.0, 9.0)] == pytest.approx(want), window
