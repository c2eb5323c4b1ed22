"""The run's records: `metrics.jsonl` (one line per logged step) and `eval/history.jsonl` (one line
per evaluation: {"step", <set name>: its headline metrics}), each metric of them also in TensorBoard
event files under `tb/train/` and `tb/eval/` (`tensorboard --logdir runs`; tags such as
`retrieval/text->image/R@1`, `image-shape/acc1`, `source_share/<source name or index>`; a set's
size, classes and chosen weight decay stay in the records only). Only the main process writes them. With
`log.wandb=true` (the `wandb` extra) every metric also goes to a Weights & Biases run
(train/<key>, eval/<set>/<metric>), one per run folder, continued on resume; `WANDB_MODE=offline`
keeps it in `wandb/` of the run folder with no network."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

# numbers of an evaluation that describe it rather than measure it (the set's size, its classes,
# the probe's chosen weight decay): kept in history.jsonl, not charted
NOT_METRICS = frozenset({"n", "classes", "weight_decay"})


def source_tags(sources) -> dict[str, str]:
    """{"source_share/<label>": "source_share/<name or index>"} for `data.sources`: an unnamed
    source's label is its shard pattern, which makes no tag (a path of braces and slashes)."""
    return {f"source_share/{s.label}": f"source_share/{s.name or i}" for i, s in enumerate(sources)}


class RunLog:
    def __init__(self, run_dir: Path, enabled: bool, wandb: dict | None = None, tags: dict[str, str] | None = None):
        """`wandb`: wandb.init's project and config (None: no W&B); only `enabled` (the main process) logs.
        `tags`: a record's key path -> its tag in TensorBoard and W&B, where they differ (`source_tags`)."""
        self.run_dir = Path(run_dir)
        self.tags = tags or {}
        self._wandb_init, self._wandb = (wandb if enabled else None), None
        if self._wandb_init is not None:
            _import_wandb()  # before training: a missing package is a config error, not a crash at step 1
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.history_path = self.run_dir / "eval" / "history.jsonl"
        self.enabled = enabled
        self.tb_dir = self.run_dir / "tb"
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
            values = self._tagged(_numbers({k: v for k, v in record.items() if k != "step"}))
            _add_scalars(self._writer("train", step), step, values)
            self._to_wandb("train", step, values)

    def eval(self, step: int, results: dict) -> None:
        """One record per step: a finished run started again evaluates its last step again."""
        self._drop_from(self.history_path, step)
        if self.enabled:
            self.history_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.history_path, "a") as f:
                f.write(json.dumps({"step": step, **results}) + "\n")
            values = self._tagged((k, v) for k, v in _numbers(results) if k.rsplit("/", 1)[-1] not in NOT_METRICS)
            _add_scalars(self._writer("eval", step), step, values)
            self._to_wandb("eval", step, values)

    def _tagged(self, numbers) -> dict[str, float]:
        """(key path, number) pairs -> {tag: number}, renamed by `tags`."""
        return {self.tags.get(k, k): v for k, v in numbers}

    def _to_wandb(self, kind: str, step: int, values: dict[str, float]) -> None:
        if self._wandb_init is None:
            return
        if self._wandb is None:  # one W&B run per run folder: a resumed run goes on in it
            folder = str(self.run_dir.resolve())
            self._wandb = _import_wandb().init(project=self._wandb_init["project"], name=self.run_dir.name,
                                               id=hashlib.sha1(folder.encode()).hexdigest()[:16], resume="allow",
                                               dir=str(self.run_dir), config=self._wandb_init["config"])
        self._wandb.log({f"{kind}/{k}": v for k, v in values.items()}, step=step)

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
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _numbers(record: dict, prefix: str = ""):
    """Each number in a nested record, tagged by its keys: {"a": {"b": 1.0}} -> ("a/b", 1.0)."""
    for key, value in record.items():
        if isinstance(value, dict):
            yield from _numbers(value, f"{prefix}{key}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield prefix + key, value


def _add_scalars(events: SummaryWriter, step: int, values: dict[str, float]) -> None:
    for tag, value in values.items():
        events.add_scalar(tag, value, step)
    events.flush()


def _import_wandb():
    try:
        import wandb
    except ImportError:
        from mmpretrain.config import ConfigError

        raise ConfigError("log.wandb=true needs the wandb package: pip install 'mmpretrain[wandb]'") from None
    return wandb
