"""Training metrics: a JSONL log (the record), a CSV copy for spreadsheets, TensorBoard when it is installed.

    RUN/train/log.jsonl    one JSON object per logged step: step, epoch, loss, lm_loss, aux_loss, lr_<group>,
                           grad_norm, samples_per_s, tokens_per_s, elapsed_s
    RUN/train/log.csv      the same rows, rewritten from the JSONL
    RUN/train/tensorboard/ event files (if `tensorboard` is importable)

On resume the log is cut back to the checkpoint's step (the steps it holds are done), so a step that was logged
but not checkpointed before a kill is not logged twice.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any


class MetricsLog:
    """Append-only step log; only the main rank writes (others get `enabled=False`)."""

    def __init__(self, train_dir: Path, *, enabled: bool = True, resume_step: int | None = None, tensorboard: bool = True):
        self.enabled = enabled
        self.jsonl = train_dir / "log.jsonl"
        self.csv = train_dir / "log.csv"
        self.rows: list[dict[str, Any]] = []
        self._tb = None
        if not enabled:
            return
        train_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.jsonl.exists():
            self.rows = [r for r in read_log(self.jsonl) if r["step"] <= resume_step]  # resume_step steps are done
            self.jsonl.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        else:
            self.jsonl.write_text("")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(str(train_dir / "tensorboard"), purge_step=None if resume_step is None else resume_step + 1)

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.rows.append(row)
        with self.jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(f"train/{k}", v, row["step"])

    def close(self) -> None:
        if not self.enabled:
            return
        write_csv(self.csv, self.rows)
        if self._tb is not None:
            self._tb.close()


def read_log(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
