"""agent_bridge.gym.IWMWrapper on real ALE envs, through a real worker process."""

from __future__ import annotations

import sys

import gymnasium
import numpy as np
import pytest

pytestmark = [pytest.mark.games, pytest.mark.timeout(300)]
ale_py = pytest.importorskip("ale_py")
gymnasium.register_envs(ale_py)

from agent_bridge.gym import IWMWrapper  # noqa: E402


class RawReward(gymnasium.Wrapper):
    """Remembers the env's own reward of the last step."""

    last = 0.0

    def step(self, action):
        out = self.env.step(action)
        self.last = float(out[1])
        return out


def test_surprise_every_step_and_reward_plus_beta_times_surprise() -> None:
    raw = RawReward(gymnasium.make("ALE/Breakout-v5", render_mode="rgb_array"))
    env = IWMWrapper(raw, intrinsic_reward=0.5)
    try:
        _, info = env.reset(seed=0)
        assert info["iwm"]["surprise"] is None  # the first frame: nothing predicted it
        rng = np.random.default_rng(0)
        seqs, surprises = [info["iwm"]["seq"]], []
        for _ in range(200):
            _, reward, term, trunc, info = env.step(int(rng.integers(env.action_space.n)))
            s = info["iwm"]["surprise"]
            assert s is not None and 0 <= s <= 2
            assert reward == pytest.approx(raw.last + 0.5 * s, abs=1e-9)
            assert info["iwm"]["intrinsic_reward"] == pytest.approx(0.5 * s)
            seqs.append(info["iwm"]["seq"])
            surprises.append(s)
            if term or trunc:
                _, info = env.reset()
                seqs.append(info["iwm"]["seq"])
        assert seqs == list(range(len(seqs)))  # every frame, in order, answered for itself
        assert np.std(surprises) > 0  # not a constant
    finally:
        env.close()


def test_vector_env_of_two_and_a_non_rendering_env_refused() -> None:
    make = lambda: IWMWrapper(gymnasium.make("ALE/Pong-v5", render_mode="rgb_array"),  # noqa: E731
                              intrinsic_reward=0.1)
    venv = gymnasium.vector.SyncVectorEnv([make, make])
    try:
        venv.reset(seed=[1, 2])
        for _ in range(10):
            _, _, _, _, infos = venv.step(venv.action_space.sample())
        got = infos["iwm"]["surprise"]
        assert got.shape == (2,) and np.all(np.asarray(got, float) >= 0)
    finally:
        venv.close()
    with pytest.raises(ValueError, match="render_mode='rgb_array'"):
        IWMWrapper(gymnasium.make("ALE/Pong-v5"))


def test_the_wrapping_process_imports_no_torch() -> None:
    """The world model runs in the worker process; the RL process stays light."""
    import subprocess

    code = ("import sys, gymnasium, ale_py; gymnasium.register_envs(ale_py)\n"
            "from agent_bridge.gym import IWMWrapper\n"
            "env = IWMWrapper(gymnasium.make('ALE/Pong-v5', render_mode='rgb_array'))\n"
            "env.reset(seed=0); info = env.step(0)[-1]; env.close()\n"
            "assert info['iwm']['surprise'] is not None\n"
            "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"
