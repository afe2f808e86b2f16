"""What each install costs: site-packages size, distributions and pip time, per extra.

For each target, a fresh venv and ``pip install <copy of this project>[extras]`` (pip's cache
as it is: run twice for warm-cache times), then the size of its site-packages and whether
torch came with it. The first row is the agent's client (a bare install); the baseline is
the install before issue 29, every dependency in one set (``test,games,bench`` is what the
README's test command installs: its size is measured in place when ``--existing`` names
such a venv).

    python bench/install.py                          # client and sidecar
    python bench/install.py --targets "" sidecar train --existing .venv
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ("setup.cfg", "pyproject.toml", "README.md", "launch.py", "launch_config.py",
          "iwm_bus", "workers", "agent_bridge", "train")


def _copy_source(dst: Path) -> None:
    for name in SOURCE:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, dst / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(path, dst / name)


def _site_packages(python: Path) -> Path:
    out = subprocess.run([str(python), "-c", "import sysconfig; "
                          "print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True, timeout=60)
    return Path(out.stdout.strip())


def _measure(python: Path) -> tuple[float, int, bool]:
    """(site-packages MB, distributions, torch installed) of the venv of ``python``."""
    site = _site_packages(python)
    size = sum(p.stat().st_size for p in site.rglob("*") if p.is_file() and not p.is_symlink())
    dists = len(list(site.glob("*.dist-info")))
    return size / 2**20, dists, (site / "torch").is_dir()


def _install(extras: str, src: Path, work: Path) -> tuple[float, float, int, bool]:
    venv = work / f"venv-{extras or 'client'}"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=600)
    python = venv / "bin" / "python"
    spec = f"{src}[{extras}]" if extras else str(src)
    t0 = time.perf_counter()
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    spec], check=True, timeout=1800)
    seconds = time.perf_counter() - t0
    size, dists, torch = _measure(python)
    shutil.rmtree(venv)
    return seconds, size, dists, torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", nargs="+", default=["", "sidecar"],
                   help='extras to install, "" for the bare client (default: "" sidecar)')
    p.add_argument("--existing", type=Path,
                   help="a venv to measure in place as the all-in-one baseline")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="iwm-install-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        _copy_source(src)
        for extras in args.targets:
            seconds, size, dists, torch = _install(extras, src, Path(tmp))
            rows.append((f"iwm-bus[{extras}]" if extras else "iwm-bus (client)",
                         f"{seconds:.0f}", size, dists, torch))
    if args.existing:
        size, dists, torch = _measure(args.existing / "bin" / "python")
        rows.append((f"{args.existing} (all-in-one baseline)", "-", size, dists, torch))
    base = rows[-1][2] if args.existing else None
    print("| install | pip s | site-packages MB | distributions | torch | vs baseline |")
    print("|---|---:|---:|---:|---|---:|")
    for name, seconds, size, dists, torch in rows:
        ratio = f"{size / base:.3f}" if base else "-"
        print(f"| {name} | {seconds} | {size:,.0f} | {dists} | {'yes' if torch else 'no'} "
              f"| {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
