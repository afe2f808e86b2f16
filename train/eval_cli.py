"""``iwm-eval``: evaluate a checkpoint on held-out data; one table, one PNG, one JSON.

    iwm-eval --model runs/p3/last.pt --sessions data/default/heldout --out runs/p3/eval
    iwm-eval --model runs/p3/last.pt --sessions data/default/heldout \\
        --games ALE/Pong-v5,ALE/Breakout-v5 --cf_states 40 --out runs/p3/eval
    iwm-eval --model runs/p1/last.pt --images photos/ --out runs/p1/eval    # Phase 1

Rows (see ``train.evaluate``): augmentation MRR vs zero conditioning and chance; next-latent
MRR vs copy-last and action-shuffled; action discrimination on counterfactual next frames
(``--games``, ALE clone/restore) vs copy-last and chance; surprise AUROC on injected cuts vs
copy-last; uncertainty-vs-surprise correlation; latent std and effective rank.
Writes ``OUT/eval.json`` and ``OUT/eval.png``. Bad input: one line, exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from iwm_bus.config import PRECISIONS, precision_error

__all__ = ["format_games", "format_table", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="iwm-eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint to evaluate")
    p.add_argument("--sessions", nargs="+", help="held-out session files or folders")
    p.add_argument("--images", nargs="+", help="held-out image folders (augmentation MRR)")
    p.add_argument("--games", help="comma-separated ALE ids for action discrimination: games "
                                   "of the training mix (held-out episodes: other seeds)")
    p.add_argument("--unseen_games", help="comma-separated ALE ids never trained on, scored "
                                          "as their own split")
    p.add_argument("--cf_states", type=int, default=30, help="cloned states per game")
    p.add_argument("--bank", type=int, default=256)
    p.add_argument("--max_transitions", type=int, default=1024)
    p.add_argument("--aug_images", type=int, default=8)
    p.add_argument("--cut_gap", type=int, default=75, help="frames between a cut's two frames")
    p.add_argument("--z_history", type=int, default=30,
                   help="transitions surprise_z has seen before the one it scores")
    p.add_argument("--max_frames", type=int, default=0, help="frames loaded per source (0 = all)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="inference precision, as the worker's --precision (default fp32; "
                        "auto: bf16 on CUDA as the worker runs it; int8: CPU only)")
    p.add_argument("--seed", type=int, default=1000, help="seed of samples and emulator states")
    p.add_argument("--out", type=Path, help="folder for eval.json and eval.png")
    return p


def _fmt(v: Any) -> str:
    return "n/a" if v is None or (isinstance(v, float) and v != v) else f"{v:.3f}"


def format_games(ad: dict[str, Any]) -> str:
    """Action discrimination per game: the model beside every baseline."""
    cols = ("model", "oracle", "copy_last", "chance", "centroid", "shuffled", "no_action",
            "inverse", "inverse_majority")
    per = ad.get("per_game", {})
    unseen = set(ad.get("unseen", {}).get("games", ()))
    w = max([len(g) + 9 for g in per] + [4])
    lines = [f"{'game':<{w}}  " + "  ".join(f"{c:>9}" for c in cols)]
    for g, d in per.items():
        name = g + (" (unseen)" if g in unseen else "")
        lines.append(f"{name:<{w}}  " + "  ".join(f"{_fmt(d.get(c)):>9}" for c in cols))
    return "\n".join(lines)


def format_table(s: dict[str, Any]) -> str:
    """The summary as an aligned text table: metric, model, baselines."""
    rows = [("metric", "model", "baselines")]
    def add(name: str, key: str, base: list[str]) -> None:
        if key in s:
            d = s[key]
            rows.append((name, _fmt(d.get("model")),
                         "  ".join(f"{b}={_fmt(d.get(b))}" for b in base)))
    add("augmentation MRR", "augmentation_mrr", ["zero_cond", "chance"])
    if "response" in s.get("augmentation_mrr", {}):
        d = s["augmentation_mrr"]
        rows.append(("prediction ~ augmentation", f"{_fmt(d['response'])} / "
                     f"{_fmt(d['alignment'])}", "response / alignment (0 = ignores it)"))
    if "abstraction_index" in s.get("augmentation_mrr", {}):
        rows.append(("abstraction index", _fmt(s["augmentation_mrr"]["abstraction_index"]),
                     "1 = invariant, 0 = equivariant"))
    add("next-latent MRR", "next_latent_mrr", ["copy_last", "shuffled", "chance"])
    ad = s.get("action_discrimination", {})
    for split in ("seen", "unseen"):
        if split in ad:
            d = ad[split]
            rows.append((f"action discrimination MRR, {split} ({len(d['games'])} games)",
                         _fmt(d.get("model")), "  ".join(
                             f"{b}={_fmt(d.get(b))}" for b in
                             ("oracle", "copy_last", "chance", "centroid", "shuffled",
                              "no_action"))))
    if "seen" not in ad and "unseen" not in ad:
        add("action discrimination MRR", "action_discrimination", ["copy_last", "chance"])
    if ad:
        rows.append(("inverse dynamics accuracy", _fmt(ad.get("inverse")),
                     f"majority={_fmt(ad.get('inverse_majority'))}"))
    add("surprise AUROC (cuts)", "surprise_auroc", ["copy_last"])
    if "z" in s.get("surprise_auroc", {}):
        d = s["surprise_auroc"]["z"]
        rows.append(("surprise_z AUROC (cuts)", _fmt(d.get("model")),
                     f"raw surprise={_fmt(s['surprise_auroc'].get('model'))}"))
    if "uncertainty" in s:
        rows.append(("uncertainty~surprise corr", _fmt(s["uncertainty"]["corr_with_surprise"]),
                     ">0.3 wanted"))
    if "latents" in s:
        d = s["latents"]
        rows.append(("latent std / eff. rank", f"{_fmt(d['std'])} / {d['effective_rank']:.1f}",
                     f"dim={d['dim']}"))
    w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    return "\n".join(f"{a:<{w0}}  {b:>{w1}}  {c}" for a, b, c in rows)


def write_png(results: dict[str, Any], path: Path) -> None:
    """Bar chart of every MRR/AUROC row beside its baselines; surprise histograms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("augmentation_mrr", "next_latent_mrr", "action_discrimination",
                        "surprise_auroc") if k in results]
    fig, axes = plt.subplots(1, len(keys) + 1, figsize=(4 * (len(keys) + 1), 3.5))
    axes = list(axes) if len(keys) else [axes]
    for ax, k in zip(axes, keys, strict=False):
        d = {n: v for n, v in results[k].items()
             if n in ("model", "zero_cond", "copy_last", "shuffled", "chance", "oracle",
                      "centroid", "no_action")
             and isinstance(v, float)}
        ax.bar(list(d), [0 if v != v else v for v in d.values()],
               color=["C0"] + ["C7"] * (len(d) - 1))
        ax.set_title(k.replace("_", " "))
        ax.set_ylim(0, 1)
        ax.tick_params(axis="x", rotation=30)
    ax = axes[-1]
    sa = results.get("surprise_auroc", {})
    if "_normal" in sa:
        ax.hist(sa["_normal"], bins=30, alpha=0.6, label="normal")
        ax.hist(sa["_cuts"], bins=30, alpha=0.6, label="injected cut")
        ax.legend()
    ax.set_title("surprise")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _fail(msg: str) -> int:
    print(f"iwm-eval: error: {msg}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not (args.sessions or args.images or args.games or args.unseen_games):
        return _fail("nothing to evaluate on: give --sessions, --images, --games and/or "
                     "--unseen_games")
    seen_games = [g for g in (args.games or "").split(",") if g]
    unseen_games = [g for g in (args.unseen_games or "").split(",") if g]
    both = sorted(set(seen_games) & set(unseen_games))
    if both:
        return _fail(f"{', '.join(both)} given in both --games and --unseen_games")
    why = precision_error(args.precision, args.device)
    if why:
        return _fail(f"--precision {why}")
    from iwm_bus.errors import CheckpointError
    from iwm_bus.model import load_checkpoint, load_iwm, set_precision
    from train.data import DataError, FrameStore
    from train.evaluate import EvalConfig, evaluate, summary

    try:
        cfg = EvalConfig(bank=args.bank, max_transitions=args.max_transitions,
                         aug_images=args.aug_images, cut_gap=args.cut_gap,
                         z_history=args.z_history, seed=args.seed)
        payload = load_checkpoint(args.model)
        has_target = any(k.startswith("target_encoder.") for k in payload["state_dict"])
        # a model trained on views as next-frame calls is measured through that call
        run = payload["extra"].get("run_config") or (payload["extra"].get("info") or {}).get(
            "run_config") or {}
        if (run.get("objective") or {}).get("views_residual"):
            cfg = dataclasses.replace(cfg, aug_residual=True)
        # a training checkpoint is evaluated as it would ship: with its EMA target encoder
        model = set_precision(load_iwm(args.model, args.device, target_as_encoder=has_target),
                              args.precision)
        mc = model.config
        sessions = FrameStore.from_sessions(args.sessions, mc.img_size, mc.cond_dim,
                                            args.max_frames or None) if args.sessions else None
        images = FrameStore.from_images(args.images, mc.img_size, mc.cond_dim) \
            if args.images else None
        sets: dict[str, list[Any]] = {}
        if seen_games or unseen_games:
            from train.counterfactual import counterfactual_sets
            for i, game in enumerate(seen_games + unseen_games):
                sets[game] = counterfactual_sets(game, args.cf_states, seed=args.seed + i)
    except (CheckpointError, DataError, ValueError) as e:
        return _fail(str(e))
    results = evaluate(model, cfg, sessions, images, sets, unseen_games)  # model's precision
    s = summary(results)
    s["model"] = {"path": str(args.model), "config": mc.to_dict(), "precision": args.precision}
    print(format_table(s))
    if "per_game" in s.get("action_discrimination", {}):
        print(format_games(s["action_discrimination"]))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "eval.json").write_text(json.dumps(s, indent=2))
        write_png(results, args.out / "eval.png")
        print(f"wrote {args.out / 'eval.json'} and {args.out / 'eval.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
