"""agent_bridge.gym.IWMVectorWrapper: one batched worker process for a vector env (issue 30).

A toy gymnasium env (tests/toy_world.py's square, moved by 5 actions, an episode of
``length`` steps) so that sub-envs end their episodes at different steps; an untrained tiny
worker model. The vector wrapper's numbers for a sub-env are compared with the single-env
IWMWrapper's on the same env alone.

    .venv/bin/python -m pytest tests/agent/test_vector_wrapper.py -q
"""

from __future__ import annotations

import gymnasium
import numpy as np
import pytest
from toy_world import SIZE, background, render, step

from agent_bridge.gym import IWMVectorWrapper, IWMWrapper
from iwm_bus.config import WorkerConfig

pytestmark = pytest.mark.timeout(600)
TINY = WorkerConfig(untrained=True, encoder="vit_tiny_patch16_224", img_size=32, threads=1,
                    num_actions=8)
BETA = 0.5


class Square(gymnasium.Env):
    """The toy square; ``length`` steps an episode; reward 1 a step."""

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, length: int, render_mode: str = "rgb_array") -> None:
        self.length, self.render_mode = length, render_mode
        self.action_space = gymnasium.spaces.Discrete(5)
        self.observation_space = gymnasium.spaces.Box(0, SIZE, (2,), np.int64)
        self._bg = background()
        self._pos, self._t = (0, 0), 0

    def reset(self, *, seed: int | None = None, options=None):
        super().reset(seed=seed)
        self._pos = tuple(int(v) for v in self.np_random.integers(0, SIZE - 8, 2))
        self._t = 0
        return np.array(self._pos), {}

    def step(self, action):
        self._pos = step(self._pos, int(action))
        self._t += 1
        return np.array(self._pos), 1.0, self._t >= self.length, False, {}

    def render(self):
        return render(self._pos, self._bg)


def actions_for(t: int, n: int) -> np.ndarray:
    return np.array([(t + 2 * i) % 5 for i in range(n)])


def test_one_batched_worker_for_a_vector_env_with_autoreset_per_sub_env() -> None:
    lengths = [4, 6, 100]
    venv = gymnasium.vector.SyncVectorEnv([lambda n=n: Square(n) for n in lengths])
    env = IWMVectorWrapper(venv, intrinsic_reward=BETA, worker=TINY)
    steps = 9
    try:
        _, infos = env.reset(seed=[1, 2, 3])
        iwm = infos["iwm"]
        assert iwm["surprise"].shape == (3,) and np.isnan(iwm["surprise"]).all()
        assert list(iwm["seq"]) == [0, 0, 0]  # one ring (and seq) per sub-env
        vec = [iwm]
        for t in range(steps):
            _, rewards, term, trunc, infos = env.step(actions_for(t, 3))
            iwm = infos["iwm"]
            vec.append(iwm)
            assert all(iwm[k].shape == (3,) for k in ("seq", "surprise", "rr", "mrr",
                                                      "intrinsic_reward"))
            assert list(iwm["seq"]) == [t + 1] * 3
            bonus = np.where(np.isnan(iwm["surprise"]), 0.0, BETA * iwm["surprise"])
            np.testing.assert_allclose(iwm["intrinsic_reward"], bonus)
            # NEXT_STEP autoreset: the step after an episode's end is the next episode's
            # first frame (reward 0, nothing predicted it)
            np.testing.assert_allclose(rewards - bonus, [
                0.0 if t > 0 and (t % (n + 1)) == n else 1.0 for n in lengths])
        firsts = [[t + 1 for t in range(steps) if t > 0 and t % (n + 1) == n]
                  for n in lengths]
        assert firsts == [[5], [7], []]
        for i, f in enumerate(firsts):
            got = [bool(np.isnan(v["surprise"][i])) for v in vec]
            assert got == [t == 0 or t in f for t in range(steps + 1)], i
    finally:
        env.close()
    # the same sub-env alone, through the single-env wrapper (n = 1, same code): the same
    # numbers, step for step (its own episode ends reset it as the vector env did)
    alone = IWMWrapper(Square(lengths[0]), intrinsic_reward=BETA, worker=TINY)
    try:
        _, info = alone.reset(seed=1)
        got = [info["iwm"]]
        for t in range(steps):
            a = int(actions_for(t, 3)[0])
            if t > 0 and t % (lengths[0] + 1) == lengths[0]:  # the vector env reset it here
                _, info = alone.reset()
            else:
                info = alone.step(a)[-1]
            got.append(info["iwm"])
    finally:
        alone.close()
    for t, (one, many) in enumerate(zip(got, vec, strict=True)):
        for k in ("surprise", "rr", "mrr"):
            want = np.nan if one[k] is None else one[k]
            assert many[k][0] == pytest.approx(want, rel=1e-4, abs=1e-5, nan_ok=True), (t, k)


def test_a_non_rendering_vector_env_is_refused() -> None:
    venv = gymnasium.vector.SyncVectorEnv([lambda: Square(5, render_mode=None)] * 2)
    try:
        with pytest.raises(ValueError, match="render_mode='rgb_array'"):
            IWMVectorWrapper(venv)
    finally:
        venv.close()
