"""The run's records: `metrics.jsonl` (one line per logged step) and `eval/history.jsonl`
(retrieval during training), each number of them also in TensorBoard event files under `tb/train/`
and `tb/eval/` (`tensorboard --logdir runs`). Only the main process writes them."""

from __future__ import annotations

import json
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter


class RunLog:
    def __init__(self, run_dir: Path, enabled: bool):
        self.metrics_path = Path(run_dir) / "metrics.jsonl"
        self.history_path = Path(run_dir) / "eval" / "history.jsonl"
        self.enabled = enabled
        self.tb_dir = Path(run_dir) / "tb"
        self._metrics = None  # nothing is written (no folder made) before the first record
        self._writers: dict[str, SummaryWriter] = {}  # tb/train/, tb/eval/: made at the first record
        self._hide_from: dict[str, int] = {}  # "train", "eval": the first step `trim` dropped

    def trim(self, step: int) -> None:
        """Drop records past `step`: a resumed run rewrites what its checkpoint does not cover."""
        for records in (self.metrics_path, self.history_path):
            self._drop_from(records, step + 1)
        self._hide_from = {"train": step + 1, "eval": step + 1}

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
            step = record["step"]
            _add_scalars(self._writer("train", step), step, {k: v for k, v in record.items() if k != "step"})

    def eval(self, step: int, results: dict) -> None:
        """One record per step: a finished run started again evaluates its last step again."""
        self._drop_from(self.history_path, step)
        if self.enabled:
            self.history_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.history_path, "a") as f:
                f.write(json.dumps({"step": step, **results}) + "\n")
            _add_scalars(self._writer("eval", step), step, results)

    def _writer(self, kind: str, step: int) -> SummaryWriter:
        """tb/<kind>/'s writer, made at its first record (at `step`): TensorBoard hides the events
        of earlier sessions from its purge_step on, as `trim` and this record drop them."""
        if kind not in self._writers:
            hide = self._hide_from.pop(kind, None)
            self._writers[kind] = SummaryWriter(self.tb_dir / kind,
                                                purge_step=None if hide is None else min(step, hide))
        return self._writers[kind]

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        for writer in self._writers.values():
            writer.close()
        self._writers = {}


def _add_scalars(events: SummaryWriter, step: int, record: dict, prefix: str = "") -> None:
    """Each number in a nested record as a scalar tagged by its keys: {"a": {"b": 1.0}} -> "a/b"."""
    for key, value in record.items():
        if isinstance(value, dict):
            _add_scalars(events, step, value, f"{prefix}{key}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            events.add_scalar(prefix + key, value, step)
    events.flush()
