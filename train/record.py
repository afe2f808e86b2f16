"""Record exploration sessions from real games: the world model's training data.

One session file (``iwm_bus.session``, MCAP) per game and seed, ``OUT/<game>-s<seed>.mcap``,
played by the exploration policy (``train.explore``: uniform random ids of the shared
18-action vocabulary, each held 1..8 steps); ``train.datasets.SessionDataset`` reads its
``(frame_t, action_t, frame_t+1)`` transitions::

    python -m train.record --out data/default/train --games mix --frames 3000 --seeds 0-3 --jobs 2
    python -m train.record --out /tmp/rec --games pong,basic --frames 200 --seed 7
    python -m train.record --list

Recorded in-process: the same ``GymSource`` the launcher's capture steps (so the same env
settings: ALE full 18-action set, no sticky actions, frameskip 4; ViZDoom buttons mapped to the
shared ids, 1 tic a step) feeds the same ``SessionWriter`` the recorder process uses, so the
files have the format of ``iwm-launch --record``. No ring, bus or world-model worker runs
(the launcher's lossless mode would pace capture by the worker's ViT); one job on an idle
core of this machine records ~2,200 ALE frames/s and ~1,100 ViZDoom frames/s. Frames are
stored losslessly at the game's native size (ALE 210x160, ViZDoom 240x320), ``zstd-raw`` by
default (7-10x faster to write than png here, and smaller: ~1 KB an ALE frame, ~33 KB a
ViZDoom one).

How the files differ from a launcher recording:

- timestamps are on the game clock, ``t0 + i / step_hz`` (ALE v5: 15 Hz = 60 Hz / frameskip
  4; ViZDoom: 35 Hz), so a replay at ``--rate 1`` plays at game speed;
- no ``agent.action`` / ``iwm.*`` messages: the action that produced each frame is stored
  with the frame, as the gym capture does.

As in a live recording, a new episode's first frame has no action (``None``): the transition
into it has ``has_id`` False in ``SessionDataset`` (drop it when training on actions). ViZDoom
writes ``_vizdoom.ini`` and ``_vizdoom/`` into the working directory: run from a scratch
directory (the recipe, ``train/recipes/default.sh``, runs inside ``data/``).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from loguru import logger

from iwm_bus.errors import SessionError
from iwm_bus.session import FRAME_ENCODINGS, SessionOptions, SessionReader, SessionWriter
from train.counterfactual import sidecar_path
from train.explore import ExplorationPolicy, ExploreConfig

__all__ = ["GAMES", "GROUPS", "GameSpec", "RecordConfig", "main", "parse_seeds", "record_all",
           "record_session", "resolve_games"]


class GameSpec(NamedTuple):
    """A game of the mix: its gymnasium id and how many env steps make a second of play."""

    env_id: str
    step_hz: float


GAMES: dict[str, GameSpec] = {
    "pong": GameSpec("ALE/Pong-v5", 15.0),
    "breakout": GameSpec("ALE/Breakout-v5", 15.0),
    "mspacman": GameSpec("ALE/MsPacman-v5", 15.0),
    "seaquest": GameSpec("ALE/Seaquest-v5", 15.0),
    "spaceinvaders": GameSpec("ALE/SpaceInvaders-v5", 15.0),
    "basic": GameSpec("VizdoomBasic-v1", 35.0),
    "defend_the_line": GameSpec("VizdoomDefendLine-v1", 35.0),
    "health_gathering": GameSpec("VizdoomHealthGathering-v1", 35.0),
    "my_way_home": GameSpec("VizdoomMyWayHome-v1", 35.0),
    "deadly_corridor": GameSpec("VizdoomDeadlyCorridor-v1", 35.0),
}
GROUPS: dict[str, tuple[str, ...]] = {
    "ale": ("pong", "breakout", "mspacman", "seaquest", "spaceinvaders"),
    "doom": ("basic", "defend_the_line", "health_gathering", "my_way_home", "deadly_corridor"),
}
GROUPS["mix"] = GROUPS["ale"] + GROUPS["doom"]


def resolve_games(names: Iterable[str]) -> list[tuple[str, GameSpec]]:
    """``(name, GameSpec)`` for game names, groups (``ale``, ``doom``, ``mix``) and env ids.

    An env id (``ALE/...`` or ``Vizdoom...``) is its own name, with ``/`` made ``_``.
    """
    out: dict[str, GameSpec] = {}
    for raw in names:
        name = raw.strip()
        if name in GROUPS:
            out.update((g, GAMES[g]) for g in GROUPS[name])
        elif name in GAMES:
            out[name] = GAMES[name]
        elif name.startswith("ALE/"):
            out[name.replace("/", "_")] = GameSpec(name, 15.0)
        elif name.startswith("Vizdoom"):
            out[name] = GameSpec(name, 35.0)
        else:
            raise ValueError(f"unknown game {name!r}: use one of {sorted(GAMES)}, a group "
                             f"{sorted(GROUPS)}, or an ALE/... or Vizdoom... env id")
    if not out:
        raise ValueError("no games given")
    return list(out.items())


def parse_seeds(text: str) -> tuple[int, ...]:
    """``"0-3"`` -> (0, 1, 2, 3); ``"0,5,7"``; ``"1000-1001,2000"``."""
    seeds: list[int] = []
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"seeds {text!r}: expected N, A-B or a comma list of them")
        seeds.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds {text!r}: empty or repeated")
    return tuple(seeds)


@dataclass
class RecordConfig:
    # folder for the session files (created)
    out: Path
    # game names, groups or env ids (resolve_games)
    games: tuple[str, ...] = ("mix",)
    # one session per game and seed; the seed drives the policy and the game's reset
    seeds: tuple[int, ...] = (0,)
    # frames a session (the first is the reset frame: frames - 1 transitions)
    frames: int = 1000
    # the exploration policy's hold range (its seed is the session's)
    min_hold: int = 1
    max_hold: int = 8
    # zstd-raw or png (lossless); jpeg is refused (training data stays exact)
    frame_encoding: str = "zstd-raw"
    # parallel recording processes (spawned); 1 = in this process
    jobs: int = 1
    # replace existing session files
    overwrite: bool = False
    # leave a session that is already complete (closed, with `frames` frames) as it is
    skip_existing: bool = False
    # every this many frames, also the next frame under every action from a cloned state
    # (a ``.cf.npz`` sidecar beside the session, ``train.counterfactual``); 0 = none;
    # ALE games only (emulator clone / restore)
    counterfactual_every: int = 0
    # the policy config of each session is made from these plus the session's seed
    explore: ExploreConfig = field(init=False)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.games = tuple(self.games)
        resolve_games(self.games)  # ValueError for an unknown name
        for name in ("frames", "jobs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"RecordConfig.{name}={value!r}: must be an int >= 1")
        if self.frames < 2:
            raise ValueError(f"RecordConfig.frames={self.frames!r}: must be >= 2 (a transition)")
        if not self.seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0
                                 for s in self.seeds):
            raise ValueError(f"RecordConfig.seeds={self.seeds!r}: must be ints >= 0")
        if self.frame_encoding not in FRAME_ENCODINGS or self.frame_encoding == "jpeg":
            raise ValueError(f"RecordConfig.frame_encoding={self.frame_encoding!r}: must be "
                             "zstd-raw or png (lossless)")
        ce = self.counterfactual_every
        if isinstance(ce, bool) or not isinstance(ce, int) or ce < 0:
            raise ValueError(f"RecordConfig.counterfactual_every={ce!r}: must be an int >= 0")
        if ce:
            cannot = [spec.env_id for _, spec in resolve_games(self.games)
                      if not spec.env_id.startswith("ALE/")]
            if cannot:
                raise ValueError(f"--counterfactual needs sources that can clone their state "
                                 f"(ALE games); {', '.join(cannot)} cannot: record those "
                                 "without --counterfactual")
        if self.overwrite and self.skip_existing:
            raise ValueError("RecordConfig: overwrite and skip_existing exclude each other")
        self.explore = ExploreConfig(min_hold=self.min_hold, max_hold=self.max_hold)


def session_path(out: Path, name: str, seed: int) -> Path:
    """Where the session of game ``name`` and ``seed`` goes."""
    return Path(out) / f"{name}-s{seed}.mcap"


def record_session(game: GameSpec, path: str | Path, *, seed: int, frames: int,
                   explore: ExploreConfig | None = None, frame_encoding: str = "zstd-raw",
                   overwrite: bool = False, name: str | None = None,
                   counterfactual_every: int = 0) -> dict[str, Any]:
    """Play ``game`` with the exploration policy for ``frames`` frames into ``path``.

    ``counterfactual_every`` > 0: every that many frames (not at an episode's end), the next
    frame under every action is taken from a clone of the emulator state and the sidecar
    ``train.counterfactual.sidecar_path(path)`` is written beside the session.
    Returns ``{path, game, env_id, seed, frames, episodes, seconds, fps, bytes, cf_states}``.
    """
    from train.counterfactual import CounterfactualWriter, branch, can_branch, sidecar_path
    from workers.sources import open_source  # the capture's own source (imports gymnasium)

    explore = ExploreConfig(**{**asdict(explore or ExploreConfig()), "seed": seed})
    policy = ExplorationPolicy(explore)
    period_ns = round(1e9 / game.step_hz)
    t_start = time.perf_counter()
    with open_source(f"gym:{game.env_id}", seed=seed) as src:
        meta = {
            "source": {"spec": src.spec, "action_space": src.action_space,
                       "env_kwargs": src.env_kwargs, "seed": seed, "game": name or game.env_id},
            "agent": {"policy": "train.explore", **asdict(explore)},
            "recorder": {"tool": "train.record", "in_process": True, "frames": frames,
                         "step_hz": game.step_hz,
                         "timestamps": "game clock: t0 + i / step_hz (not capture times)"},
        }
        with SessionWriter(path, metadata=meta, overwrite=overwrite,
                           options=SessionOptions(frame_encoding=frame_encoding,
                                                  viewer=False)) as writer:
            if counterfactual_every and not can_branch(src):
                raise ValueError(f"{game.env_id}: --counterfactual needs a source that can "
                                 "clone its state (an ALE game)")
            cf = CounterfactualWriter(game.env_id, seed) if counterfactual_every else None
            t0 = time.time_ns()
            frame = src.reset()
            writer.write_frame(0, t0, frame.pixels, frame.action)
            for i in range(1, frames):
                if cf is not None and (i - 1) % counterfactual_every == 0 \
                        and not src.env.unwrapped.ale.game_over():
                    cf.add(i - 1, branch(src, frame.pixels))
                frame = src.step({"action_id": policy.act()})
                writer.write_frame(i, t0 + i * period_ns, frame.pixels, frame.action)
            episodes = src.episodes
            writer.close(end_metadata={"episodes": episodes})
            if cf is not None:
                cf.write(sidecar_path(path))
    seconds = time.perf_counter() - t_start
    return {"path": str(path), "game": name or game.env_id, "env_id": game.env_id,
            "seed": seed, "frames": frames, "episodes": episodes, "seconds": round(seconds, 3),
            "fps": round(frames / seconds, 1), "bytes": Path(path).stat().st_size,
            "cf_states": len(cf) if cf is not None else 0}


def _complete(path: Path, frames: int) -> bool:
    try:
        reader = SessionReader(path)
    except (SessionError, OSError):
        return False
    return not reader.recovered and reader.num_frames == frames


def _job(args: tuple[GameSpec, Path, int, RecordConfig, str]) -> dict[str, Any]:
    game, path, seed, cfg, name = args
    return record_session(game, path, seed=seed, frames=cfg.frames, explore=cfg.explore,
                          frame_encoding=cfg.frame_encoding, overwrite=cfg.overwrite, name=name,
                          counterfactual_every=cfg.counterfactual_every)


def record_all(cfg: RecordConfig) -> list[dict[str, Any]]:
    """Record every (game, seed) of ``cfg``; the stats of each session, in order."""
    cfg.out.mkdir(parents=True, exist_ok=True)
    jobs = []
    for name, game in resolve_games(cfg.games):
        for seed in cfg.seeds:
            path = session_path(cfg.out, name, seed)
            if cfg.skip_existing and _complete(path, cfg.frames) and (
                    not cfg.counterfactual_every or sidecar_path(path).exists()):
                logger.info("record: {} is complete; skipped", path)
                continue
            if cfg.skip_existing:
                path.unlink(missing_ok=True)  # a partial or different session is redone
            jobs.append((game, path, seed, cfg, name))
    if cfg.jobs == 1 or len(jobs) <= 1:
        results = []
        for job in jobs:
            results.append(_job(job))
            _log(results[-1])
        return results
    with ProcessPoolExecutor(cfg.jobs, mp_context=mp.get_context("spawn")) as pool:
        results = []
        for result in pool.map(_job, jobs):
            results.append(result)
            _log(result)
    return results


def _log(r: dict[str, Any]) -> None:
    logger.info("record: {} ({} frames, {} episodes, {:.1f} s, {:.0f} frames/s, {:.1f} MB)",
                r["path"], r["frames"], r["episodes"], r["seconds"], r["fps"], r["bytes"] / 1e6)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.record",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="folder for OUT/<game>-s<seed>.mcap")
    p.add_argument("--games", default="mix",
                   help=f"comma list of games {sorted(GAMES)}, groups {sorted(GROUPS)} or "
                        "env ids (default: mix)")
    p.add_argument("--frames", type=int, default=1000, help="frames a session (default 1000)")
    p.add_argument("--seeds", "--seed", default="0", help="N, A-B or a comma list (default 0)")
    p.add_argument("--min-hold", type=int, default=1)
    p.add_argument("--max-hold", type=int, default=8)
    p.add_argument("--frame-encoding", default="zstd-raw", choices=["zstd-raw", "png"])
    p.add_argument("--jobs", type=int, default=1, help="parallel processes (default 1)")
    p.add_argument("--counterfactual", type=int, default=0, metavar="EVERY",
                   help="every EVERY frames also record the next frame under every action "
                        "from a cloned state (ALE only; a .cf.npz beside each session)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--overwrite", action="store_true", help="replace existing sessions")
    what.add_argument("--skip-existing", action="store_true",
                      help="keep sessions that are already complete; redo the rest")
    p.add_argument("--list", action="store_true", help="print the games and groups, exit")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: exit 0 done, 2 bad arguments or an existing session file."""
    args = _parser().parse_args(argv)
    if args.list:
        for name, game in GAMES.items():
            print(f"{name:18s} {game.env_id:28s} {game.step_hz:g} Hz")
        for name, members in GROUPS.items():
            print(f"{name:18s} {','.join(members)}")
        return 0
    try:
        if args.out is None:
            raise ValueError("--out is required")
        cfg = RecordConfig(out=args.out, games=tuple(args.games.split(",")),
                           seeds=parse_seeds(args.seeds), frames=args.frames,
                           min_hold=args.min_hold, max_hold=args.max_hold,
                           frame_encoding=args.frame_encoding, jobs=args.jobs,
                           overwrite=args.overwrite, skip_existing=args.skip_existing,
                           counterfactual_every=args.counterfactual)
        t0 = time.perf_counter()
        results = record_all(cfg)
    except (ValueError, FileExistsError) as e:
        print(f"train.record: {e}", file=sys.stderr)
        return 2
    frames = sum(r["frames"] for r in results)
    wall = time.perf_counter() - t0
    logger.info("record: {} sessions, {} frames in {:.1f} s ({:.0f} frames/s) → {}",
                len(results), frames, wall, frames / max(wall, 1e-9), cfg.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
