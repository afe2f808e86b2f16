"""Training metrics to a CSV file and, when the package is installed, TensorBoard."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from loguru import logger

__all__ = ["Logbook"]


class Logbook:
    """``log(step, metrics)`` appends a CSV row (``metrics.csv``) and TensorBoard scalars.

    On resume the CSV rows after the resumed step are dropped first, so the file reads as
    one uninterrupted run.
    """

    def __init__(self, out_dir: str | Path, resume_step: int = 0) -> None:
        self.path = Path(out_dir) / "metrics.csv"
        self.rows = self._kept_rows(resume_step) if resume_step else []
        self.columns: list[str] = list(self.rows[0]) if self.rows else []
        self._rewrite()
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard not installed
            logger.info("tensorboard is not installed: metrics go to {} only", self.path)
            self.tb = None
        else:
            self.tb = SummaryWriter(str(Path(out_dir) / "tb"), purge_step=resume_step or None)

    def _kept_rows(self, step: int) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with self.path.open(newline="") as f:
            return [r for r in csv.DictReader(f) if int(r["step"]) <= step]

    def _rewrite(self) -> None:
        with self.path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.columns)
            if self.columns:
                w.writeheader()
                w.writerows(self.rows)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **{k: f"{v:.6g}" for k, v in metrics.items()}}
        self.rows.append(row)
        if set(row) - set(self.columns):
            self.columns = list(dict.fromkeys([*self.columns, *row]))
            self._rewrite()
        else:
            with self.path.open("a", newline="") as f:
                csv.DictWriter(f, fieldnames=self.columns).writerow(row)
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
