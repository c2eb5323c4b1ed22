"""The one way to name a trained model, for `load_pretrained` and every command: a run folder,
its export/ or one of its checkpoints (`find_model`, `--model`). Light on purpose: commands that
build their parsers import it without loading a model's code (torch's model zoo, the decoders)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mmpretrain.config import ConfigError


class ModelNotFound(ConfigError, FileNotFoundError):
    """A path that names no model: one line from a CLI or a config key, a FileNotFoundError in Python."""


EXPECTED = "expected a run folder (runs/<name>), its export/ or one of its checkpoints/step_* folders"


@dataclass(frozen=True)
class ModelPath:
    """Where a model is: `folder`, the export/ or the checkpoint its weights are read from; `run`,
    the run folder (the CLIs write their results to its eval/)."""

    folder: Path
    run: Path
    checkpoint: bool

    @property
    def config(self) -> Path:
        return (self.run if self.checkpoint else self.folder) / "config.yaml"

    @property
    def suffix(self) -> str:
        """"-step_00000400" for a checkpoint: its results' names differ from the run's own."""
        return f"-{self.folder.name}" if self.checkpoint else ""


def find_model(path: str | Path, what: str = "load_pretrained") -> ModelPath:
    """The one way to name a model, for `load_pretrained` and every CLI: a run folder (its export/,
    or its newest checkpoint before there is one), an export/ folder or a checkpoint folder.
    `what`: the argument or key that errors name."""
    from mmpretrain.checkpoint import is_checkpoint, latest_checkpoint

    path = Path(path).expanduser()
    if not path.is_dir():
        raise ModelNotFound(f"{what} {path}: no such folder; {EXPECTED}")
    if (path / "export" / "model.safetensors").is_file():
        path = path / "export"
    if (path / "model.safetensors").is_file():
        return ModelPath(path, path.parent, checkpoint=False)
    checkpoint = path if is_checkpoint(path) else latest_checkpoint(path)
    if checkpoint is None:
        raise ModelNotFound(f"{what} {path}: holds no export (model.safetensors) and no complete checkpoint; "
                            f"{EXPECTED}")
    run = checkpoint.parent.parent
    if not (run / "config.yaml").is_file():
        raise ModelNotFound(f"{what} {checkpoint}: its run folder {run} has no config.yaml")
    return ModelPath(checkpoint, run, checkpoint=True)


def add_model_argument(parser, **kwargs) -> None:
    """`--model` (or its alias `--run`): a CLI's model, as `find_model` reads it."""
    parser.add_argument("--model", "--run", dest="model", metavar="FOLDER",
                        help="a run folder, its export/ folder or a checkpoint folder (--run: the same)", **kwargs)
