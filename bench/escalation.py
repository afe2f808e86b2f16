"""Escalation benchmark: does the agent cry wolf in ordinary play, and does it see a cut?

For each held-out session recorded from a real game (``train/recipes/default.sh`` makes them:
seeds never trained on), a copy is written with a **same-game cut** injected every
``--cut-every`` frames: one frame replaced by a frame of the same session 5-20 s away. The
copy is replayed lossless through the real sidecar (``launch.py``: replay source, ring,
worker with the shipped model, bus) and every frame's ``iwm.surprise`` / ``iwm.mrr`` is
fed, in order and on the game clock, to the agent's ``ArbiterHooks`` — the demo agent's
arbiter — under two configurations in the same run:

- ``default``: the shipped defaults (escalate on ``surprise_z``, the standardised surprise,
  and on running MRR < 0.2);
- ``raw 0.98``: the previous default, escalation on raw surprise above 0.98 (its 99.9th
  percentile of pooled held-out play) instead of ``surprise_z``.

Columns: false escalations per minute of play (escalation callbacks, 5 s cooldown as the demo
agent has, outside the 3 frames from a cut) and the share of cuts escalated within 3
frames (issue 10 targets: <= 1 per minute, >= 95 %).

    python bench/escalation.py                       # one session per game of the mix
    python bench/escalation.py --sessions data/default/heldout/breakout-s1000.mcap
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from loguru import logger

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent_bridge import BeingState  # noqa: E402
from agent_bridge.arbiter import ArbiterConfig, ArbiterHooks  # noqa: E402
from iwm_bus.bus import topics  # noqa: E402
from iwm_bus.bus.transport import Endpoints, Subscriber  # noqa: E402
from iwm_bus.session import SessionReader, SessionWriter  # noqa: E402

WINDOW = 3  # a cut counts as seen when one of its first 3 frames escalates
CONFIGS = {"default": ArbiterConfig(),
           "raw 0.98": ArbiterConfig(escalate_surprise=0.98, escalate_surprise_z=None)}


def inject_cuts(src: Path, dst: Path, every: int, seed: int) -> tuple[list[int], float]:
    """Copy ``src`` to ``dst`` with a same-session frame 75-300 frames away spliced in every
    ``every`` frames; returns the cut seqs and the frame rate of the game clock."""
    reader = SessionReader(src)
    frames = list(reader.frames_with_actions())
    rng = np.random.default_rng(seed)
    cuts: dict[int, int] = {}
    for i in range(every, len(frames) - WINDOW, every):
        offsets = [o for o in range(75, 301) for o in (o, -o) if 0 <= i + o < len(frames)]
        cuts[i] = i + int(rng.choice(offsets))
    with SessionWriter(dst, metadata={"source": reader.metadata.get("source")}) as w:
        for i, (rec, action) in enumerate(frames):
            far = frames[cuts[i]][0] if i in cuts else rec
            w.write_frame(rec.seq, rec.t_ns, reader.decode(far), action=action)
    span = (frames[-1][0].t_ns - frames[0][0].t_ns) / 1e9
    return [frames[i][0].seq for i in sorted(cuts)], (len(frames) - 1) / max(span, 1e-9)


def replay(path: Path, n_frames: int, timeout: float) -> dict[int, dict]:
    """Every frame's surprise and MRR messages from the real sidecar replaying ``path``."""
    with tempfile.TemporaryDirectory(prefix="iwmesc", dir="/tmp") as tmp:
        run_dir = Path(tmp) / "run"
        sub = Subscriber([Endpoints.ipc(run_dir).worker], [topics.SURPRISE, topics.MRR])
        cmd = [sys.executable, str(ROOT / "launch.py"), "--run-dir", str(run_dir), "--quiet",
               "--source", f"replay:{path}", "--mode", "lossless", "--rate", "0",
               "--agent", "none", "--log-level", "WARNING"]
        proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.DEVNULL)
        got: dict[int, dict] = {}
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                msg = sub.recv(200)
                if msg is not None:
                    got.setdefault(msg[1]["seq"], {})[msg[1]["kind"]] = msg[1]
                done = sum("surprise" in v and "mrr" in v for v in got.values())
                if done >= n_frames or (msg is None and proc.poll() is not None):
                    break
        finally:
            proc.terminate()
            proc.wait(60)
            sub.close()
    return got


def arbitrate(msgs: dict[int, dict], cuts: list[int], fps: float,
              cfg: ArbiterConfig) -> tuple[int, int]:
    """(false escalations, cuts escalated within WINDOW frames) of one arbiter over a run."""
    clock = [0.0]
    calls: list[int] = []
    hooks = ArbiterHooks(replace(cfg), on_escalate=lambda d: calls.append(d.frame_seq),
                         clock=lambda: clock[0])
    near = {c + k for c in cuts for k in range(WINDOW)}
    flagged: set[int] = set()
    seqs = sorted(msgs)
    for seq in seqs:
        m = msgs[seq]
        st = BeingState()
        st.update_latent(np.zeros(1, np.float32), seq=seq)
        s, r = m.get("surprise", {}), m.get("mrr", {})
        st.vision_prediction_surprise, st.vision_surprise_z = s.get("surprise"), s.get("surprise_z")
        st.surprise_seq = st.mrr_seq = seq
        st.vision_mrr = r.get("mrr")
        clock[0] = (seq - seqs[0]) / fps
        if hooks.assess(st).escalate and seq in near:
            flagged.add(seq)
    seen = sum(any(c + k in flagged for k in range(WINDOW)) for c in cuts)
    return sum(seq not in near for seq in calls), seen


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sessions", nargs="+", type=Path,
                   default=sorted((ROOT / "data/default/heldout").glob("*-s1000.mcap")))
    p.add_argument("--cut-every", type=int, default=150, help="frames between injected cuts")
    p.add_argument("--sweep", type=float, nargs="*", default=[2.0, 2.5, 3.0, 4.0, 5.0, 7.0],
                   help="escalate_surprise_z values for the operating curve")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per session")
    p.add_argument("--save", type=Path, help="also pickle the sessions' messages here")
    args = p.parse_args()
    missing = [s for s in args.sessions if not s.is_file()]
    if not args.sessions or missing:
        print(f"escalation: error: no held-out session {missing[0] if missing else ''} "
              f"(make them with: STEPS=data bash train/recipes/default.sh)", file=sys.stderr)
        return 2
    logger.remove()  # the arbiter logs every escalation; the table says it
    print(f"# escalations of the demo agent's arbiter, shipped model, a same-session cut every "
          f"{args.cut_every} frames (5-20 s away); target <= 1/min, >= 95 % within {WINDOW} "
          "frames")
    runs = []
    for path in args.sessions:
        with tempfile.TemporaryDirectory(prefix="iwmesc", dir="/tmp") as tmp:
            cut_file = Path(tmp) / "cuts.mcap"
            cuts, fps = inject_cuts(path, cut_file, args.cut_every, args.seed)
            n = sum(1 for _ in SessionReader(cut_file).frame_records())
            msgs = replay(cut_file, n, args.timeout)
        runs.append((path.stem, msgs, cuts, fps, len(msgs) / fps / 60))
    if args.save is not None:
        import pickle

        args.save.write_bytes(pickle.dumps(runs))
    configs = dict(CONFIGS)
    configs["running MRR only"] = ArbiterConfig(escalate_surprise_z=None)
    for z in args.sweep:
        configs[f"z > {z:g}"] = ArbiterConfig(escalate_surprise_z=z)
    names = list(CONFIGS)
    header = f"{'session':<28}{'min':>6}{'cuts':>6}" + "".join(
        f"{n + ' false/min':>20}{n + ' cuts seen':>20}" for n in names)
    print(header)
    print("-" * len(header))
    for stem, msgs, cuts, fps, minutes in runs:
        row = f"{stem:<28}{minutes:>6.1f}{len(cuts):>6}"
        for name in names:
            false, seen = arbitrate(msgs, cuts, fps, configs[name])
            row += f"{false / minutes:>20.2f}{100 * seen / max(len(cuts), 1):>19.0f}%"
        print(row, flush=True)
    total_min = sum(r[4] for r in runs)
    total_cuts = sum(len(r[2]) for r in runs)
    print(f"\nall {len(runs)} sessions: {total_min:.1f} min of play, {total_cuts} cuts")
    print(f"{'arbiter':<24}{'false escalations/min':>24}{'cuts seen':>12}")
    for name, cfg in configs.items():
        false = seen = 0
        for _, msgs, cuts, fps, _ in runs:
            f, c = arbitrate(msgs, cuts, fps, cfg)
            false, seen = false + f, seen + c
        print(f"{name:<24}{false / total_min:>24.2f}{100 * seen / max(total_cuts, 1):>11.0f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
