"""The run's records: `metrics.jsonl` (one line per logged step) and `eval/history.jsonl`
(retrieval during training). Only the main process writes them."""

from __future__ import annotations

import json
from pathlib import Path


class RunLog:
    def __init__(self, run_dir: Path, enabled: bool):
        self.metrics_path = Path(run_dir) / "metrics.jsonl"
        self.history_path = Path(run_dir) / "eval" / "history.jsonl"
        self.enabled = enabled
        self._metrics = None  # nothing is written (no folder made) before the first record

    def trim(self, step: int) -> None:
        """Drop records past `step`: a resumed run rewrites what its checkpoint does not cover."""
        for records in (self.metrics_path, self.history_path):
            self._drop_from(records, step + 1)

    def _drop_from(self, records: Path, step: int) -> None:
        """Drop the records of `step` and later."""
        if self.enabled and records.exists():
            keep = [l for l in records.read_text().splitlines() if json.loads(l)["step"] < step]
            records.write_text("".join(l + "\n" for l in keep))

    def metrics(self, record: dict) -> None:
        if self.enabled:
            if self._metrics is None:
                self._metrics = open(self.metrics_path, "a")
            self._metrics.write(json.dumps(record) + "\n")
            self._metrics.flush()

    def eval(self, step: int, results: dict) -> None:
        """One record per step: a finished run started again evaluates its last step again."""
        self._drop_from(self.history_path, step)
        if self.enabled:
            self.history_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.history_path, "a") as f:
                f.write(json.dumps({"step": step, **results}) + "\n")

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
