"""Export a training checkpoint as an inference checkpoint with its provenance.

Ships the EMA target encoder as the encoder (the latent space the predictor was trained
to predict in; I-JEPA and V-JEPA release their target encoders too), drops the optimiser
state and the online encoder, and stores under ``extra["info"]``
what ``health`` / ``iwm.stats`` report: a name, the training data, the run config, the
eval summary and the action vocabulary. This is how the shipped default is made::

    python -m train.export --from runs/default/last.pt --eval runs/default/eval/eval.json \\
        --name iwm-default-v1 --out iwm_bus/weights/default.pt

An exported checkpoint given as ``--from`` keeps its weights and provenance and takes the
new name, eval and recipe: how a model trained on a GPU host (``train/recipes/dual_gpu.sh``)
is stamped with the eval run here on the held-out sessions.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["export", "main"]


def _plain(v: Any) -> Any:
    """JSON data as checkpoint-safe plain containers (None stays None)."""
    return json.loads(json.dumps(v))


def export(src: str | Path, out: str | Path, *, name: str, eval_summary: dict[str, Any] | None,
           action_vocab: str | None = "iwm-18",
           recipe: str = "train/recipes/default.sh") -> dict[str, Any]:
    """Write ``out`` from training checkpoint ``src``; returns the info stored."""
    from iwm_bus.model import load_checkpoint, load_iwm, save_checkpoint

    payload = load_checkpoint(src)
    extra = payload["extra"]
    if "info" in extra and extra.get("kind") != "train-state":
        # an exported checkpoint (e.g. trained on a GPU host and evaluated here): the same
        # weights and provenance, with this name, eval and recipe
        model = load_iwm(src, "cpu")
        info = {**extra["info"], "name": name, "eval": eval_summary, "recipe": recipe}
        if action_vocab:
            info["action_vocab"] = action_vocab
    else:
        run = extra.get("run_config", {})
        tr = run.get("train", {})
        model = load_iwm(src, "cpu", target_as_encoder=True)  # ship the EMA target encoder
        info = {"name": name, "action_vocab": action_vocab, "step": extra.get("step"),
                "data": {"sessions": tr.get("sessions"), "data_dirs": tr.get("data_dirs"),
                         "phase": tr.get("phase")},
                "run_config": run, "eval": eval_summary,
                "recipe": recipe}
    info = _plain(info)
    save_checkpoint(model, out, info=info)
    return info


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--from", dest="src", required=True,
                    help="training checkpoint, or an exported one to stamp with a new eval")
    ap.add_argument("--out", required=True, help="inference checkpoint to write")
    ap.add_argument("--name", required=True, help="name reported by health and iwm.stats")
    ap.add_argument("--eval", help="eval.json written by iwm-eval")
    ap.add_argument("--action_vocab", default="iwm-18")
    ap.add_argument("--recipe", default="train/recipes/default.sh",
                    help="the script that rebuilds it (stored in its provenance)")
    args = ap.parse_args(argv)
    from iwm_bus.errors import CheckpointError

    try:
        summary = json.loads(Path(args.eval).read_text()) if args.eval else None
        if summary is not None:
            summary.pop("model", None)
        info = export(args.src, args.out, name=args.name, eval_summary=summary,
                      action_vocab=args.action_vocab or None, recipe=args.recipe)
    except (CheckpointError, OSError, ValueError) as e:
        print(f"export: error: {e}", file=sys.stderr)
        return 2
    size = Path(args.out).stat().st_size / 2**20
    print(f"wrote {args.out} ({size:.1f} MiB): {info['name']}, step {info['step']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
