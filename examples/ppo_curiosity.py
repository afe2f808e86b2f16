"""PPO (CleanRL-style, one file) on an Atari game through the world-model sidecar, with and
without curiosity: ``agent_bridge.gym.IWMWrapper(intrinsic_reward=beta)`` adds
``beta × surprise`` (the shipped world model's prediction error) to every step's reward.

::

    python examples/ppo_curiosity.py train --beta 0    --steps 10240 --out runs/ppo/beta0
    python examples/ppo_curiosity.py train --beta 0.05 --steps 10240 --out runs/ppo/beta0.05
    python examples/ppo_curiosity.py plot runs/ppo/beta0 runs/ppo/beta0.05 --png docs/ppo_curiosity.png

Each ``train`` writes to its ``--out`` folder:

``config.json``
    the resolved :class:`PPOConfig`
``episodes.csv``
    one row per finished episode: ``global_step, env, episode_return, episode_length,
    wall_s``; the return is the game's own (extrinsic) score, without the bonus
``steps.csv``
    one row per env step: ``global_step, env, extrinsic_reward, surprise,
    intrinsic_reward, train_reward`` (``surprise`` empty where the worker had no
    prediction; ``train_reward`` = sign(extrinsic) + intrinsic is what PPO learns from: the
    game's reward clipped as in the DQN/PPO Atari setups, the bonus not)

The env stack of each sub-env: ``gym.make(game, render_mode="rgb_array")`` → episode
statistics (extrinsic) → ``IWMWrapper`` (one world-model worker process per sub-env, fed the
full RGB frame) → grayscale, half size (105 × 80) → 4 stacked frames for the policy. The
sub-envs run in a ``gymnasium.vector.SyncVectorEnv`` (``SAME_STEP`` autoreset). This
process needs torch for PPO itself; the world model runs in the workers.
"""

from __future__ import annotations

import argparse
import csv
import json
import signal
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import ale_py
import gymnasium as gym
import numpy as np
import torch
from torch import nn

from agent_bridge.gym import IWMWrapper

gym.register_envs(ale_py)

EPISODE_COLUMNS = ("global_step", "env", "episode_return", "episode_length", "wall_s")
STEP_COLUMNS = ("global_step", "env", "extrinsic_reward", "surprise", "intrinsic_reward",
                "train_reward")


@dataclass
class PPOConfig:
    # gymnasium id of an ALE game (rendered frames go to the world model)
    env_id: str = "ALE/Breakout-v5"
    # curiosity weight: reward += beta * surprise (0 = plain PPO)
    beta: float = 0.0
    # total env steps over all sub-envs
    steps: int = 10_240
    # sub-envs (each with its own world-model worker)
    num_envs: int = 4
    # steps per sub-env per rollout
    num_steps: int = 64
    # cut episodes after this many steps (None: the game's own limit)
    max_episode_steps: int | None = None
    learning_rate: float = 2.5e-4
    gamma: float = 0.99
    gae_lambda: float = 0.95
    num_minibatches: int = 4
    update_epochs: int = 4
    clip_coef: float = 0.1
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    seed: int = 0
    # torch threads of this process (each worker uses one more)
    threads: int = 1
    # output folder (config.json, episodes.csv, steps.csv)
    out: str = "runs/ppo"

    def __post_init__(self) -> None:
        if not np.isfinite(self.beta) or self.beta < 0:
            raise ValueError(f"PPOConfig.beta={self.beta!r}: must be finite and >= 0")
        for name in ("steps", "num_envs", "num_steps", "num_minibatches", "update_epochs",
                     "threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"PPOConfig.{name}={value!r}: must be an int >= 1")
        if (self.num_envs * self.num_steps) % self.num_minibatches:
            raise ValueError(f"PPOConfig.num_minibatches={self.num_minibatches}: must divide "
                             f"num_envs * num_steps = {self.num_envs * self.num_steps}")
        if self.max_episode_steps is not None and self.max_episode_steps < 2:
            raise ValueError(f"PPOConfig.max_episode_steps={self.max_episode_steps!r}: "
                             "must be None or >= 2")

    @property
    def batch_size(self) -> int:
        return self.num_envs * self.num_steps


# ---------------------------------------------------------------- envs


class HalfGray(gym.ObservationWrapper):
    """RGB ``(210, 160, 3)`` → grayscale ``(105, 80)`` uint8 (every second pixel)."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        h, w = env.observation_space.shape[:2]
        self.observation_space = gym.spaces.Box(0, 255, ((h + 1) // 2, (w + 1) // 2), np.uint8)

    def observation(self, obs: np.ndarray) -> np.ndarray:
        rgb = obs[::2, ::2].astype(np.float32)  # (105, 80, 3)
        return (rgb @ np.array([0.299, 0.587, 0.114], np.float32)).astype(np.uint8)


def make_env(cfg: PPOConfig) -> gym.Env:
    env = gym.make(cfg.env_id, render_mode="rgb_array",
                   max_episode_steps=cfg.max_episode_steps)
    env = gym.wrappers.RecordEpisodeStatistics(env)  # inside: the game's own returns
    env = IWMWrapper(env, intrinsic_reward=cfg.beta)
    return gym.wrappers.FrameStackObservation(HalfGray(env), 4)  # (4, 105, 80)


def make_vector_env(cfg: PPOConfig) -> gym.vector.SyncVectorEnv:
    return gym.vector.SyncVectorEnv([lambda: make_env(cfg)] * cfg.num_envs,
                                    autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)


def step_records(infos: dict[str, Any], rewards: np.ndarray, done: np.ndarray
                 ) -> list[dict[str, Any]]:
    """Per sub-env: the wrapper's surprise and bonus, the extrinsic reward and, at an
    episode's end, its statistics. With ``SAME_STEP`` autoreset a finished sub-env's step
    info is in ``final_info`` (``infos`` holds its reset's)."""
    out = []
    for i, finished in enumerate(done):
        src = infos["final_info"] if finished else infos
        iwm = src["iwm"]
        surprise = iwm["surprise"][i]  # None, or NaN in a float array, on a first frame
        if surprise is not None and not np.isfinite(surprise):
            surprise = None
        bonus = float(iwm["intrinsic_reward"][i])
        episode = None
        if finished and src.get("_episode", np.zeros(len(done), bool))[i]:
            episode = (float(src["episode"]["r"][i]), int(src["episode"]["l"][i]))
        out.append({"surprise": None if surprise is None else float(surprise),
                    "intrinsic_reward": bonus, "extrinsic_reward": float(rewards[i]) - bonus,
                    "episode": episode})
    return out


# ---------------------------------------------------------------- agent


def layer_init(layer: nn.Module, std: float = np.sqrt(2), bias: float = 0.0) -> nn.Module:
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias)
    return layer


class Agent(nn.Module):
    """The Nature-DQN CNN with a policy and a value head (CleanRL ``ppo_atari``)."""

    def __init__(self, obs_shape: tuple[int, ...], num_actions: int) -> None:
        super().__init__()
        conv = nn.Sequential(
            layer_init(nn.Conv2d(obs_shape[0], 32, 8, stride=4)), nn.ReLU(),
            layer_init(nn.Conv2d(32, 64, 4, stride=2)), nn.ReLU(),
            layer_init(nn.Conv2d(64, 64, 3, stride=1)), nn.ReLU(), nn.Flatten())
        with torch.no_grad():
            flat = conv(torch.zeros(1, *obs_shape)).shape[1]  # 64 * 9 * 6 at (4, 105, 80)
        self.network = nn.Sequential(conv, layer_init(nn.Linear(flat, 512)), nn.ReLU())
        self.actor = layer_init(nn.Linear(512, num_actions), std=0.01)
        self.critic = layer_init(nn.Linear(512, 1), std=1.0)

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.critic(self.network(obs / 255.0)).squeeze(-1)  # (B,)

    def act(self, obs: torch.Tensor, action: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(action, log_prob, entropy, value)`` for a batch ``(B, 4, H, W)``."""
        hidden = self.network(obs / 255.0)  # (B, 512)
        dist = torch.distributions.Categorical(logits=self.actor(hidden))
        if action is None:
            action = dist.sample()
        return action, dist.log_prob(action), dist.entropy(), self.critic(hidden).squeeze(-1)


# ---------------------------------------------------------------- PPO


def gae(cfg: PPOConfig, rewards: torch.Tensor, values: torch.Tensor, dones: torch.Tensor,
        next_value: torch.Tensor, next_done: torch.Tensor) -> torch.Tensor:
    """Generalised advantage estimates ``(T, N)``; ``dones[t]``: obs t began an episode."""
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(next_value)
    for t in reversed(range(cfg.num_steps)):
        not_done = 1.0 - (next_done if t == cfg.num_steps - 1 else dones[t + 1])
        nxt = next_value if t == cfg.num_steps - 1 else values[t + 1]
        delta = rewards[t] + cfg.gamma * nxt * not_done - values[t]
        last = delta + cfg.gamma * cfg.gae_lambda * not_done * last
        adv[t] = last
    return adv


def ppo_update(cfg: PPOConfig, agent: Agent, opt: torch.optim.Optimizer,
               batch: dict[str, torch.Tensor], rng: np.random.Generator) -> dict[str, float]:
    """CleanRL's clipped-objective update over ``update_epochs`` of shuffled minibatches."""
    mb = cfg.batch_size // cfg.num_minibatches
    stats: dict[str, float] = {}
    for _ in range(cfg.update_epochs):
        order = rng.permutation(cfg.batch_size)
        for start in range(0, cfg.batch_size, mb):
            idx = torch.as_tensor(order[start:start + mb])
            _, logp, entropy, value = agent.act(batch["obs"][idx].float(),
                                                batch["actions"][idx])
            ratio = (logp - batch["logprobs"][idx]).exp()
            adv = batch["advantages"][idx]
            adv = (adv - adv.mean()) / (adv.std() + 1e-8)
            pg_loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - cfg.clip_coef,
                                                                 1 + cfg.clip_coef)).mean()
            v_loss = 0.5 * ((value - batch["returns"][idx]) ** 2).mean()
            loss = pg_loss - cfg.ent_coef * entropy.mean() + cfg.vf_coef * v_loss
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(agent.parameters(), cfg.max_grad_norm)
            opt.step()
            stats = {"pg_loss": pg_loss.item(), "v_loss": v_loss.item(),
                     "entropy": entropy.mean().item()}
    return stats


class RunLog:
    """``episodes.csv`` and ``steps.csv`` of one run, flushed after every rollout."""

    def __init__(self, out: Path) -> None:
        self._files = [(out / name).open("w", newline="") for name in
                       ("episodes.csv", "steps.csv")]
        self.episodes, self.steps = (csv.writer(f) for f in self._files)
        self.episodes.writerow(EPISODE_COLUMNS)
        self.steps.writerow(STEP_COLUMNS)
        self.returns: list[float] = []

    def write(self, global_step: int, records: list[dict[str, Any]], wall_s: float) -> None:
        for i, r in enumerate(records):
            self.steps.writerow([global_step, i, r["extrinsic_reward"],
                                 "" if r["surprise"] is None else r["surprise"],
                                 r["intrinsic_reward"], r["train_reward"]])
            if r["episode"] is not None:
                self.episodes.writerow([global_step, i, *r["episode"], round(wall_s, 2)])
                self.returns.append(r["episode"][0])

    def flush(self) -> None:
        for f in self._files:
            f.flush()

    def close(self) -> None:
        for f in self._files:
            f.close()


def collect(cfg: PPOConfig, envs: gym.vector.VectorEnv, agent: Agent, state: dict[str, Any],
            log: RunLog, t0: float) -> dict[str, torch.Tensor]:
    """One rollout of ``num_steps`` vector steps; returns the batch with advantages."""
    shape = (cfg.num_steps, cfg.num_envs)
    buf = {"obs": torch.zeros(shape + envs.single_observation_space.shape, dtype=torch.uint8),
           "actions": torch.zeros(shape, dtype=torch.long),
           **{k: torch.zeros(shape) for k in ("logprobs", "rewards", "dones", "values")}}
    for t in range(cfg.num_steps):
        buf["obs"][t], buf["dones"][t] = state["obs"], state["done"]
        with torch.no_grad():
            action, logp, _, value = agent.act(state["obs"].float())
        buf["actions"][t], buf["logprobs"][t], buf["values"][t] = action, logp, value
        obs, reward, term, trunc, infos = envs.step(action.numpy())
        done = np.logical_or(term, trunc)
        records = step_records(infos, reward, done)
        for r in records:
            r["train_reward"] = float(np.sign(r["extrinsic_reward"])) + r["intrinsic_reward"]
        buf["rewards"][t] = torch.tensor([r["train_reward"] for r in records])
        state["global_step"] += cfg.num_envs
        log.write(state["global_step"], records, time.monotonic() - t0)
        state["obs"] = torch.as_tensor(obs)
        state["done"] = torch.as_tensor(done, dtype=torch.float32)
    with torch.no_grad():
        next_value = agent.value(state["obs"].float())
    adv = gae(cfg, buf["rewards"], buf["values"], buf["dones"], next_value, state["done"])
    flat = lambda x: x.reshape(cfg.batch_size, *x.shape[2:])  # noqa: E731  (T, N, ...) -> (B, ...)
    return {"obs": flat(buf["obs"]), "actions": flat(buf["actions"]),
            "logprobs": flat(buf["logprobs"]), "advantages": flat(adv),
            "returns": flat(adv + buf["values"])}


def train(cfg: PPOConfig) -> Path:
    """Run PPO for ``cfg.steps`` env steps; returns the output folder."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    rng = np.random.default_rng(cfg.seed)
    envs = make_vector_env(cfg)
    log = RunLog(out)
    try:
        agent = Agent(envs.single_observation_space.shape, int(envs.single_action_space.n))
        opt = torch.optim.Adam(agent.parameters(), lr=cfg.learning_rate, eps=1e-5)
        obs, _ = envs.reset(seed=[cfg.seed + i for i in range(cfg.num_envs)])
        t0 = time.monotonic()
        state = {"obs": torch.as_tensor(obs), "done": torch.zeros(cfg.num_envs),
                 "global_step": 0}
        updates = -(-cfg.steps // cfg.batch_size)
        for update in range(updates):
            opt.param_groups[0]["lr"] = cfg.learning_rate * (1.0 - update / updates)
            batch = collect(cfg, envs, agent, state, log, t0)
            stats = ppo_update(cfg, agent, opt, batch, rng)
            log.flush()
            recent = log.returns[-20:]
            rate = state["global_step"] / (time.monotonic() - t0)
            print(f"step {state['global_step']:>7} ({rate:.1f}/s)  episodes "
                  f"{len(log.returns)}  mean return (last 20) "
                  f"{np.mean(recent) if recent else float('nan'):.2f}  "
                  + "  ".join(f"{k} {v:.3f}" for k, v in stats.items()), flush=True)
    finally:
        log.close()
        envs.close()
    return out


# ---------------------------------------------------------------- plot


def read_csv(path: Path) -> dict[str, np.ndarray]:
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    keys = rows[0].keys() if rows else ()
    return {k: np.array([float(r[k]) if r[k] != "" else np.nan for r in rows]) for k in keys}


def smooth(x: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over up to ``window`` values (the first ones over fewer)."""
    c = np.cumsum(np.insert(x, 0, 0.0))
    n = np.minimum(np.arange(1, len(x) + 1), window)
    return (c[1:] - c[np.arange(1, len(x) + 1) - n]) / n


def plot(runs: list[Path], png: Path, window: int = 20) -> None:
    """Extrinsic episode return (and the world model's surprise) against env steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_s) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=90)
    for run in runs:
        cfg = json.loads((run / "config.json").read_text())
        ep, st = read_csv(run / "episodes.csv"), read_csv(run / "steps.csv")
        label = f"β = {cfg['beta']:g}" + (" (no curiosity)" if cfg["beta"] == 0 else "")
        line, = ax.plot(ep["global_step"], smooth(ep["episode_return"], window), label=label)
        ax.scatter(ep["global_step"], ep["episode_return"], s=3, alpha=0.25,
                   color=line.get_color())
        ok = np.isfinite(st["surprise"])
        steps, surprise = st["global_step"][ok], smooth(st["surprise"][ok], 2000)
        ax_s.plot(steps[500:], surprise[500:], color=line.get_color(), label=label)
    game = json.loads((runs[0] / "config.json").read_text())["env_id"]
    ax.set(xlabel="env steps", ylabel="episode return (game score)",
           title=f"PPO on {game}: mean of {window} episodes")
    ax_s.set(xlabel="env steps", ylabel="surprise",
             title="surprise of the frames seen (mean of 2000)")
    ax.legend(fontsize=8)
    for a in (ax, ax_s):
        a.grid(alpha=0.3)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    plt.close(fig)


# ---------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="one PPO run")
    for f in fields(PPOConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = {"float": float, "int": int, "str": str}.get(str(f.type).split(" ")[0], int)
        tr.add_argument(flag, type=kind, default=f.default)
    pl = sub.add_parser("plot", help="learning curves of finished runs into a PNG")
    pl.add_argument("runs", nargs="+", type=Path, help="run folders (train --out)")
    pl.add_argument("--png", type=Path, default=Path("docs/ppo_curiosity.png"))
    pl.add_argument("--window", type=int, default=20, help="episodes in the moving mean")
    args = ap.parse_args(argv)
    if args.cmd == "plot":
        plot(args.runs, args.png, args.window)
        print(f"wrote {args.png}")
        return 0
    try:
        cfg = PPOConfig(**{f.name: getattr(args, f.name) for f in fields(PPOConfig)})
    except ValueError as e:
        ap.error(str(e))
    # SIGTERM unwinds like Ctrl-C, so the envs close and their workers stop
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    print(f"wrote {train(cfg)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
