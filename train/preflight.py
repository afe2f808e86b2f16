"""Before a lease's minutes are spent: can this host import everything a recipe will run?

Imports every module the GPU plan (``train/recipes/gpu.sh``) reaches, those imported inside
functions too (the games, pygame through ViZDoom, matplotlib; two leases lost minutes to a
module found missing halfway, pygame and multiprocess), and with ``--cuda`` checks the GPU.
One line per missing module; exit 2 when a module of a required stage is missing, 0
otherwise. A missing module of an optional stage (multiprocess: the sidecar's benchmarks) is
reported and the stage named on stdout as ``drop: NAME``::

    python -m train.preflight --cuda              # on the lent host, first thing
    python -m train.preflight --also no_such_mod  # exit 2: one line naming it
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

__all__ = ["OPTIONAL", "REQUIRED", "missing_modules"]

#: modules the required stages (data, train, export, eval, bench) import, lazily or not
REQUIRED = (
    # the project's entry points and what they import at the top
    "train.record", "train.cli", "train.trainer", "train.cf_data", "train.eval_cli",
    "train.export", "train.evaluate", "iwm_bus.session",
    # imported inside functions: recording (the capture's sources), loading, evaluating
    "workers.sources", "numpy", "torch", "timm", "PIL", "loguru", "tqdm", "zstandard", "mcap",
    "gymnasium", "ale_py", "vizdoom", "vizdoom.gymnasium_wrapper", "matplotlib",
)
#: stage -> modules of a stage the plan can drop
OPTIONAL = {
    "sidecar": ("launch", "workers.entry", "zmq", "msgpack", "multiprocess"),
    "tensorboard": ("torch.utils.tensorboard",),  # train.logbook writes the CSV without it
}


def missing_modules(names: Sequence[str]) -> dict[str, str]:
    """Module -> why it did not import, for those of ``names`` that did not."""
    out = {}
    for name in dict.fromkeys(names):
        try:
            importlib.import_module(name)
        except Exception as e:  # any failure to import counts: ImportError, a broken wheel
            out[name] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
    return out


def check_cuda() -> str | None:
    """The GPU's description, or None without a usable CUDA device."""
    import torch

    if not torch.cuda.is_available():
        return None
    p = torch.cuda.get_device_properties(0)
    return (f"{p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}, "
            f"bf16 {torch.cuda.is_bf16_supported()}, torch {torch.__version__}, "
            f"CUDA {torch.version.cuda}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.preflight",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--cuda", action="store_true", help="also require a CUDA device")
    p.add_argument("--also", nargs="*", default=[], help="more required modules")
    args = p.parse_args(argv)
    bad = missing_modules([*REQUIRED, *args.also])
    for name, why in bad.items():
        print(f"preflight: missing module {name} (required): {why}", file=sys.stderr)
    for stage, names in OPTIONAL.items():
        gone = missing_modules(names)
        for name, why in gone.items():
            print(f"preflight: missing module {name} (stage {stage} dropped): {why}",
                  file=sys.stderr)
        if gone:
            print(f"drop: {stage}")
    if bad:
        print("preflight: install the modules above, or pass WHEELS=<folder of wheels> "
              "(train/recipes/wheels.sh unpacks them)", file=sys.stderr)
        return 2
    if args.cuda:
        gpu = check_cuda()
        if gpu is None:
            print("preflight: no CUDA device: run the plan on a GPU host, or --dry-run here",
                  file=sys.stderr)
            return 2
        print(f"preflight: GPU {gpu}")
    import timm
    import torch

    print(f"preflight: ok ({len(REQUIRED) + len(args.also)} modules; torch {torch.__version__}, "
          f"timm {timm.__version__}, {torch.get_num_threads()} threads)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
