"""``iwm-session``: inspect, repair, export and plot recorded sessions.

    iwm-session info run.mcap                 # duration, frames, fps, size, topics, actions
    iwm-session info run.mcap --json          # the same as JSON
    iwm-session recover run.mcap              # rewrite an unclosed file as a valid one (in place)
    iwm-session recover run.mcap --out ok.mcap
    iwm-session convert old.mcap [new.mcap]   # format 1 -> 2 (viewer channels), in place or OUT
    iwm-session export run.mcap frames/       # frame_<seq>.png + actions.csv (= folder:frames/)
    iwm-session export run.mcap --video run.mp4   # H.264 with a surprise strip (--no-overlay)
    iwm-session report run.mcap --out report.png   # surprise + MRR over time, peak thumbnails
    iwm-session view run.mcap                 # open it in Rerun (needs the viewer extra)
    iwm-session view run.mcap --save run.rrd  # the same, to a file (`rerun run.rrd`)

Exit status: 0 done, 1 the session file is bad (the message names the file and the
problem), 2 bad command line (``view``: also rerun-sdk missing, or no display to spawn on).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from iwm_bus.bus.topics import ACTION, MRR, SURPRISE, base_topic
from iwm_bus.errors import SessionError
from iwm_bus.session import FRAMES_TOPIC, SessionReader, convert, recover


def _fmt_info(info: dict[str, Any]) -> str:
    acts = info["actions"]
    lines = [
        f"session    {info['path']}",
        f"size       {info['size_bytes'] / 1e6:.2f} MB ({info['bytes_per_frame']:.0f} B/frame, "
        f"{', '.join(info['frame_encodings']) or '-'})",
        f"duration   {info['duration_s']:.2f} s",
        f"frames     {info['frames']} (seq {info['seq_first']}..{info['seq_last']}, "
        f"{info['seq_missing']} missing), {info['fps']:.1f} fps, "
        f"{', '.join(info['frame_shapes']) or '-'}",
        "topics     " + ", ".join(f"{t} {n}" for t, n in sorted(info["topics"].items())),
        "viewer     " + (", ".join(f"{t} {n}" for t, n in sorted(info["viewer_topics"].items()))
                         or "- (format 1 or viewer=False; `iwm-session convert` adds them)"),
        f"actions    {acts['messages']} agent.action messages; action ids (frames + "
        f"messages) {acts['action_ids'] or '-'}; vector dims {acts['vector_dims'] or '-'}",
    ]
    meta = info["metadata"]
    lines.append(f"recorded   {meta.get('created_utc', '?')} by iwm-bus "
                 f"{meta.get('software_version', '?')}, session format {info['format_version']}")
    if "source" in meta:
        lines.append(f"source     {json.dumps(meta['source'], default=str)}")
    if info["end"]:
        lines.append(f"closing    {json.dumps(info['end'], default=str)}")
    if info["recovered"]:
        lines.append(f"RECOVERED  {info['problem']}")
        lines.append(f"           read up to the last complete chunk; run "
                     f"`iwm-session recover {info['path']}` to rewrite it as a valid file")
    return "\n".join(lines)


def cmd_info(args: argparse.Namespace) -> int:
    info = SessionReader(args.path).info()
    print(json.dumps(info, indent=2, default=str) if args.json else _fmt_info(info))
    return 0


def cmd_recover(args: argparse.Namespace) -> int:
    res = recover(args.path, args.out)
    if not res.needed and args.out is None:
        print(f"{res.path}: already a valid session ({res.frames} frames); nothing to do")
    else:
        print(f"{res.path}: {res.messages} messages ({res.frames} frames) written; "
              f"{res.bytes_dropped} bytes after the last complete chunk dropped"
              + (f" ({res.problem})" if res.problem else ""))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    res = convert(args.path, args.out)
    if not res.needed:
        print(f"{res.path}: already session format 2 with viewer channels; nothing to do")
    else:
        print(f"{res.path}: format {res.from_version} -> 2: {res.messages} messages "
              f"({res.frames} frames) copied, {res.viewer_messages} viewer messages added"
              + (f"; read up to the last complete chunk ({res.problem})" if res.problem else ""))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """PNG per frame + actions.csv in the layout ``folder:DIR`` sources read back, and/or
    an MP4 (``--video``)."""
    if args.dir is None and args.video is None:
        raise SessionError("export needs a folder for PNG files and/or --video OUT.mp4")
    if args.video is not None:
        from iwm_bus.session.video import export_video

        n = export_video(args.path, args.video, overlay=args.overlay)
        print(f"{args.video}: {n} frames")
    if args.dir is None:
        return 0
    from PIL import Image

    reader = SessionReader(args.path)
    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    index_rows: list[list[Any]] = []
    action_rows: list[tuple[int, Any, np.ndarray | None]] = []
    for i, (rec, action) in enumerate(reader.frames_with_actions()):
        name = f"frame_{rec.seq:08d}.png"
        px = reader.decode(rec)
        Image.fromarray(px[:, :, 0] if px.shape[2] == 1 else px).save(out / name)
        act = action or {}
        index_rows.append([i, rec.seq, rec.t_ns, name, _opt(act.get("action_id")),
                           _vec(act.get("vector"))])
        if action:
            vec = act.get("vector")
            action_rows.append((i, act.get("action_id"),
                                None if vec is None else np.asarray(vec).ravel()))
    _write_csv(out / "frames.csv", ["frame", "seq", "t_ns", "file", "action_id",
                                    "action_vector"], index_rows)
    dims = {len(v) for _, _, v in action_rows if v is not None}
    if len(dims) > 1:
        raise SessionError(f"{reader.path}: action vectors of different sizes {sorted(dims)} "
                           "cannot share one actions.csv")
    dim = dims.pop() if dims else 0
    _write_csv(out / "actions.csv", ["frame", "action_id", *(f"v{k}" for k in range(dim))],
               [[i, _opt(aid), *(["" ] * dim if v is None else [f"{x:.9g}" for x in v])]
                for i, aid, v in action_rows])
    agent = [[a["seq"], a["t_ns"], _opt(a.get("frame_seq")), _opt(a.get("action_id")),
              _vec(a.get("vector")), _opt(a.get("source"))] for a in reader.actions()]
    _write_csv(out / "agent_actions.csv", ["seq", "t_ns", "frame_seq", "action_id", "vector",
                                           "source"], agent)
    print(f"{out}: {len(index_rows)} frames (PNG; frames.csv, actions.csv) and "
          f"{len(agent)} agent actions (agent_actions.csv); replay it with folder:{out}")
    return 0


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def _opt(value: Any) -> Any:
    return "" if value is None else value


def _vec(value: Any) -> str:
    return "" if value is None else " ".join(f"{x:.6g}" for x in np.asarray(value).ravel())


# ---------------------------------------------------------------- report


def _series(reader: SessionReader, topic: str, key: str) -> tuple[np.ndarray, np.ndarray,
                                                                     np.ndarray]:
    """``(seq, t_ns, value)`` of the non-nil ``key`` values on ``topic``."""
    rows = [(m["seq"], m["t_capture_ns"], m[key]) for m in reader.events(topic)
            if m.get(key) is not None]
    arr = np.array(rows, dtype=np.float64).reshape(-1, 3)
    return arr[:, 0].astype(np.int64), arr[:, 1].astype(np.int64), arr[:, 2]


def peak_indices(values: np.ndarray, k: int, min_separation: int) -> list[int]:
    """Indices of the ``k`` highest values, each at least ``min_separation`` from the others."""
    chosen: list[int] = []
    for i in np.argsort(-values, kind="stable"):
        if all(abs(int(i) - j) >= min_separation for j in chosen):
            chosen.append(int(i))
            if len(chosen) == k:
                break
    return sorted(chosen)


def cmd_report(args: argparse.Namespace) -> int:
    reader = SessionReader(args.path)
    seq, t_ns, surprise = _series(reader, SURPRISE, "surprise")
    if len(seq) == 0:
        raise SessionError(f"{reader.path}: no {SURPRISE} values recorded; record with the "
                           "worker running (recorder record_latents=True) to get a report")
    _, mrr_t, mrr = _series(reader, MRR, "mrr")
    peaks = peak_indices(surprise, args.peaks, max(1, len(seq) // (4 * args.peaks)))
    want = {int(seq[i]) for i in peaks}
    thumbs = {r.seq: reader.decode(r) for r in reader.frame_records() if r.seq in want}
    t0 = int(min(t_ns.min(), mrr_t.min() if len(mrr_t) else t_ns.min()))
    _plot(args, reader, (t_ns - t0) / 1e9, surprise, (mrr_t - t0) / 1e9, mrr,
          [(float((t_ns[i] - t0) / 1e9), int(seq[i]), float(surprise[i])) for i in peaks],
          thumbs)
    print(f"{args.out}: surprise over {len(seq)} frames, {len(peaks)} peaks")
    return 0


def _plot(args: argparse.Namespace, reader: SessionReader, ts: np.ndarray, surprise: np.ndarray,
          mt: np.ndarray, mrr: np.ndarray, peaks: list[tuple[float, int, float]],
          thumbs: dict[int, np.ndarray]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width, height = args.size
    fig = plt.figure(figsize=(width / args.dpi, height / args.dpi), dpi=args.dpi)
    grid = fig.add_gridspec(3, max(1, len(peaks)), height_ratios=[2, 1, 1.3])
    ax = fig.add_subplot(grid[0, :])
    ax.plot(ts, surprise, lw=0.8, color="tab:red", label="surprise")
    for t, s, v in peaks:
        ax.annotate(str(s), (t, v), textcoords="offset points", xytext=(0, 4),
                    ha="center", fontsize=7)
    ax.scatter([p[0] for p in peaks], [p[2] for p in peaks], color="k", s=12, zorder=3)
    ax.set_ylabel("surprise")
    ax.set_title(f"{reader.path.name}: surprise and MRR"
                 + ("  (recovered file)" if reader.recovered else ""), fontsize=10)
    ax2 = fig.add_subplot(grid[1, :], sharex=ax)
    if len(mrr):
        ax2.plot(mt, mrr, lw=0.8, color="tab:blue")
    else:
        ax2.text(0.5, 0.5, "no MRR recorded", transform=ax2.transAxes, ha="center")
    ax2.set_ylabel("running MRR")
    ax2.set_xlabel("time (s)")
    for col, (t, s, v) in enumerate(peaks):
        axi = fig.add_subplot(grid[2, col])
        px = thumbs.get(s)
        if px is not None:
            axi.imshow(px[:, :, 0] if px.shape[2] == 1 else px[:, :, :3],
                       cmap="gray" if px.shape[2] == 1 else None)
        axi.set_title(f"#{s} t={t:.1f}s\n{v:.3f}", fontsize=7)
        axi.axis("off")
    fig.subplots_adjust(left=0.07, right=0.98, top=0.94, bottom=0.04, hspace=0.45)
    fig.savefig(args.out, dpi=args.dpi)
    plt.close(fig)


# ---------------------------------------------------------------- view


def cmd_view(args: argparse.Namespace) -> int:
    """Frames, surprise / MRR series and actions into Rerun (``workers.viewer.RerunLog``).

    A record that does not decode is named on stderr and skipped; the exit status is then 1.
    """
    from workers.viewer import RerunLog, check_target

    try:  # rerun-sdk importable, the --save folder exists, a display to spawn a viewer on
        target = check_target("spawn" if args.save is None else f"save:{args.save}",
                              "iwm-session view")
        if not 16 <= args.max_side <= 8192:
            raise ValueError(f"--max-side {args.max_side}: must be in 16..8192")
    except (ValueError, FileNotFoundError) as e:
        print(f"iwm-session: error: {e}", file=sys.stderr)
        return 2
    reader = SessionReader(args.path)
    wanted = [t for t in reader.topics if t == FRAMES_TOPIC or _base(t) in (SURPRISE, MRR,
                                                                             ACTION)]
    bad = 0
    last_frame: int | None = None
    with RerunLog(target, max_side=args.max_side, what="iwm-session view") as log:
        try:
            for topic, raw in reader.raw_messages(wanted):
                try:
                    msg = reader._decode(topic, raw)  # per record: a bad one is skipped
                    if topic == FRAMES_TOPIC:
                        log.frame(msg.seq, reader.decode(msg))
                        last_frame = msg.seq
                    else:
                        log.event(topic, msg, last_frame)
                except (SessionError, KeyError, TypeError, ValueError) as e:
                    bad += 1
                    print(f"iwm-session: error: {reader.path}: {topic} record at "
                          f"t={raw.log_time}: {e}; skipped", file=sys.stderr)
        except SessionError as e:  # a chunk that cannot be read: what came before is logged
            bad += 1
            print(f"iwm-session: error: {e}; the rest of the file is not shown",
                  file=sys.stderr)
    c = log.counts
    print(f"{args.save or 'rerun viewer'}: {c['frames']} frames, {c['scalars']} scalar values, "
          f"{c['actions']} actions from {reader.path}"
          + (f"; {bad} unreadable record(s) skipped" if bad else ""))
    return 1 if bad else 0


def _base(topic: str) -> str | None:
    try:
        return base_topic(topic)
    except KeyError:
        return None


# ---------------------------------------------------------------- main


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} must look like 1200x800") from None
    if not (200 <= w <= 8000 and 200 <= h <= 8000):
        raise argparse.ArgumentTypeError(f"size {text!r}: each side must be in 200..8000")
    return w, h


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="iwm-session", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("info", help="summarise a session")
    s.add_argument("path")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=cmd_info)
    s = sub.add_parser("recover", help="rewrite an unclosed session as a valid file")
    s.add_argument("path")
    s.add_argument("--out", help="write here instead of replacing PATH")
    s.set_defaults(func=cmd_recover)
    s = sub.add_parser("convert", help="upgrade a format 1 session to format 2 (viewer "
                       "channels for Foxglove and other MCAP tools)")
    s.add_argument("path")
    s.add_argument("out", nargs="?", help="write here instead of replacing PATH")
    s.set_defaults(func=cmd_convert)
    s = sub.add_parser("export", help=f"{FRAMES_TOPIC} as PNG files + actions.csv, or MP4")
    s.add_argument("path")
    s.add_argument("dir", nargs="?", help="folder for frame PNGs + frames.csv + actions.csv")
    s.add_argument("--video", help="write an MP4 (H.264) here")
    s.add_argument("--overlay", action=argparse.BooleanOptionalAction, default=True,
                   help="a surprise strip under each video frame")
    s.set_defaults(func=cmd_export)
    s = sub.add_parser("report", help="plot surprise and MRR with peak thumbnails")
    s.add_argument("path")
    s.add_argument("--out", required=True, help="PNG file to write")
    s.add_argument("--size", type=_size, default=(1200, 800), help="WIDTHxHEIGHT pixels")
    s.add_argument("--dpi", type=int, default=100)
    s.add_argument("--peaks", type=int, default=6, help="thumbnails of the top surprise peaks")
    s.set_defaults(func=cmd_report)
    s = sub.add_parser("view", help="open it in the Rerun viewer (frames, surprise, MRR, "
                       "actions on the frame timeline; needs the viewer extra)")
    s.add_argument("path")
    s.add_argument("--save", help="write a Rerun .rrd file here instead of spawning the viewer")
    s.add_argument("--max-side", type=int, default=320,
                   help="downscale frames to at most this many pixels a side")
    s.set_defaults(func=cmd_view)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "peaks", 1) < 1:
        build_parser().error("--peaks must be >= 1")
    try:
        return args.func(args)
    except (SessionError, FileExistsError) as e:
        print(f"iwm-session: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"iwm-session: error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
