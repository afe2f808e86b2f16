"""The worker's ``--precision``: what it loads is what it serves, through the real launcher.

Each check compares against the same model at fp32 as well, so a worker that ignored the
flag (or applied it to one stream of two) fails.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_dual import pair  # noqa: F401  (the fixture: a small untrained dual pair)
from test_launch import Sidecar

from agent_bridge.client import IWMClient
from iwm_bus.config import WorkerConfig
from iwm_bus.default_model import default_checkpoint
from iwm_bus.model import load_iwm, set_precision
from workers.encoder import load_models

pytestmark = pytest.mark.timeout(120)


def test_an_int8_worker_serves_the_int8_model(tmp_path):
    """int8 quantises the Linear layers (dynamic quantisation): the shipped conv encoder has
    none, its predictor does, so the worker's int8 prediction is told apart from fp32."""
    frame = np.random.default_rng(0).integers(0, 255, (210, 160, 3), np.uint8)
    path = default_checkpoint()

    def predicted(m):
        z, p = m.encode(frame)
        return z[0].numpy(), p[0].numpy(), m.predict(z, p, action_id=[3]).z_cls[0].numpy()

    _, _, fp32 = predicted(load_iwm(path, "cpu"))
    z8, p8, int8 = predicted(set_precision(load_iwm(path, "cpu"), "int8"))
    assert not np.allclose(int8, fp32, atol=1e-4)  # the two are told apart below
    sc = Sidecar("--source", "synthetic", "--duration", "60", "--no-standby", "--agent", "none",
                 "--precision", "int8")
    try:
        sc.manifest()
        # the manifest is written before the worker has loaded: wait for it as long as the
        # test may run, not the client's default 5 s (a slow machine took longer)
        with IWMClient(sc.run_dir, timeout_s=90) as client:
            assert client.health()["precision"] == "int8"
            enc = client.encode_image(frame, patches=True)
            got = client.predict_next(enc.z_cls, action=3, patches=enc.patches).z_cls_pred
        np.testing.assert_allclose(enc.z_cls, z8, atol=1e-5)
        np.testing.assert_allclose(got, int8, atol=1e-5)
    finally:
        sc.close()


def test_both_streams_of_a_dual_worker_take_the_precision(pair):  # noqa: F811
    inv, eq = pair
    cfg = WorkerConfig(dual=True, model_path=eq, semantic_model_path=inv, precision="int8")
    models = dict(load_models(cfg))
    assert {name: m.precision for name, m in models.items()} == \
        {"equivariant": "int8", "semantic": "int8"}
    frame = np.random.default_rng(1).integers(0, 255, (64, 64, 3), np.uint8)
    for name, path in (("equivariant", eq), ("semantic", inv)):
        want = set_precision(load_iwm(path, "cpu"), "int8").encode(frame)[0]
        fp32 = load_iwm(path, "cpu").encode(frame)[0]
        got = models[name].encode(frame)[0]
        assert np.allclose(got, want, atol=1e-6) and not np.allclose(got, fp32, atol=1e-6)
