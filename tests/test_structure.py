"""Structure the rest of the code relies on: import layering, the one owner of the packed row,
weight-decay declarations, old checkpoints, packaging (a wheel), what the docs and strings state."""

import itertools
import json
import re
import sys

import pytest
import torch

from mmpretrain.config import load_config
from mmpretrain.data.sources import resolve_sources
from mmpretrain.data.stream import _EpochDataset
from mmpretrain.model import MultimodalModel
from mmpretrain.optim import build_optimizer
from mmpretrain.packing import RowLayout
from mmpretrain.tokenizer import Tokenizer

from conftest import CONFIGS, ROOT, TINY, run


def _modules_after(imports: str) -> set[str]:
    code = f"import sys\n{imports}\nimport json; print(json.dumps(sorted(sys.modules)))"
    proc = run([sys.executable, "-c", code], timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return set(json.loads(proc.stdout.splitlines()[-1]))


def test_model_and_downstream_imports_load_no_data_pipeline_or_parallel_code():
    loaded = _modules_after("import mmpretrain.model, mmpretrain.pretrained, mmpretrain.encoders\n"
                            "from mmpretrain import load_pretrained, load_encoder")
    for name in ("webdataset", "soundfile", "mmpretrain.data", "mmpretrain.data.demo", "mmpretrain.parallel",
                 "mmpretrain.objectives", "mmpretrain.train"):
        assert name not in loaded, name


def test_data_pipeline_imports_no_model_or_parallel_code():
    loaded = _modules_after("import mmpretrain.data, mmpretrain.data.stream, mmpretrain.data.samples")
    for name in ("mmpretrain.model", "mmpretrain.decoder", "mmpretrain.parallel", "mmpretrain.objectives",
                 "mmpretrain.fusion"):
        assert name not in loaded, name


VARIANTS = {"as-shipped": [], "budget+captioned-limit": ["data.max_tokens=300",
                                                          "objectives.next_token_max_samples=3"]}


@pytest.mark.parametrize("variant", VARIANTS, ids=list(VARIANTS))
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_budgeted_rows_are_the_rows_the_model_builds(path, variant, demo_cache):
    """For every shipped config, the data side's count of each row's tokens (what the token
    budget packs against) equals the length of the row the model builds from that batch."""
    cfg = load_config(path, TINY + VARIANTS[variant] + [
        f"data.demo.cache_dir={demo_cache}", "data.demo.variants_per_concept=1", "data.shuffle_buffer=0",
        "train.batch_size=12"])
    tok = Tokenizer(cfg.model.text)
    ds = _EpochDataset(resolve_sources(cfg.data, "train"), cfg, tok, cfg.train.batch_size, 0, train=True)
    model = MultimodalModel(cfg.model, tok.vocab_size).eval()
    layout = RowLayout.from_config(cfg)
    batches = list(itertools.islice(iter(ds), 6))
    assert batches
    with torch.no_grad():
        for batch in batches:
            assert model(batch, layout).packed_tokens == batch.row_tokens
            assert batch.row_budget == cfg.data.max_tokens
            if cfg.data.max_tokens:
                assert batch.row_tokens <= cfg.data.max_tokens


def test_captioned_limit_counts_only_captioned_pairs():
    layout = RowLayout(num_latents=4, captioned=2)
    assert [layout.pair_tokens(10, 2, i) for i in range(4)] == [28, 28, 10, 10]
    assert RowLayout(num_latents=4).pair_tokens(10, 1, 99) == 24


def test_weight_decay_follows_module_declarations():
    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    model = MultimodalModel(cfg.model, Tokenizer(cfg.model.text).vocab_size)
    decay, no_decay = build_optimizer(model, cfg.train).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    declared = {names[id(p)] for p in no_decay["params"] if p.ndim >= 2}
    assert declared == {"decoder.embed.weight"} | {
        f"towers.{m}.{n}" for m in ("image", "audio")
        for n in ("encoder.vit.cls_token", "encoder.vit.pos_embed", "fusion.pool.latent")}
    assert all(p.ndim >= 2 for p in decay["params"]) and no_decay["weight_decay"] == 0.0


@pytest.mark.slow
def test_a_wheel_ships_the_configs_and_runs_from_any_folder(tmp_path):
    """Installed from a wheel (not an editable clone): the configs are package data, a shipped
    config is found by name from another folder, and the console scripts run."""
    import shutil
    import zipfile

    import mmpretrain

    src = tmp_path / "src"  # a copy, so the build leaves nothing in the clone
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("mmpretrain", "configs"):
        shutil.copytree(ROOT / name, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    build = [*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp_path / "dist"), "."]
    proc = run(build, timeout=300, cwd=src)
    assert proc.returncode == 0, proc.stderr[-3000:]
    wheel, = (tmp_path / "dist").glob(f"mmpretrain-{mmpretrain.__version__}-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        entry_points = z.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert {f"mmpretrain/configs/{p.name}" for p in CONFIGS} <= set(names), names
    assert "mmpretrain-train = mmpretrain.train:main" in entry_points
    assert "mmpretrain-eval = mmpretrain.eval.retrieval:main" in entry_points

    target, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    proc = run([*pip, "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    elsewhere.mkdir()
    env = {"PYTHONPATH": str(target)}
    where = run([sys.executable, "-c", "import mmpretrain; print(mmpretrain.__file__)"], timeout=120, env=env,
                cwd=elsewhere)
    assert where.stdout.startswith(str(target)), (where.stdout, where.stderr[-2000:])
    for cmd in ([sys.executable, "-m", "mmpretrain.train", "text_image_audio", "--print-config"],
                [str(target / "bin" / "mmpretrain-train"), "text_image_audio.yaml", "--print-config"]):
        proc = run(cmd, timeout=120, env=env, cwd=elsewhere)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "name: demo" in proc.stdout, proc.stdout
    proc = run([str(target / "bin" / "mmpretrain-eval"), "--help"], timeout=120, env=env, cwd=elsewhere)
    assert proc.returncode == 0 and "--run" in proc.stdout, proc.stderr[-3000:]


def test_readme_and_the_main_config_give_the_same_time():
    """The main job's time on 2 CPU cores, as the README's quickstart and the config's comment say it."""
    minutes = r"about (\w+) minutes on 2 CPU cores"
    readme = (ROOT / "README.md").read_text().split("## Quickstart")[1].split("\n## ")[0]
    config = (ROOT / "configs" / "text_image_audio.yaml").read_text()
    assert re.findall(minutes, readme)[:1] == re.findall(minutes, config), (re.findall(minutes, readme),
                                                                            re.findall(minutes, config))


def test_no_string_names_a_version_after_this_one():
    """Wording such as "before 0.3" about formats must not name a version the package has not reached."""
    import mmpretrain

    current = tuple(int(x) for x in mmpretrain.__version__.split(".")[:2])
    later = [f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
             for path in sorted((ROOT / "mmpretrain").rglob("*.py"))
             for n, line in enumerate(path.read_text().splitlines(), 1)
             for major, minor in re.findall(r"(?:before |pre-|since |until )v?(\d+)\.(\d+)\b", line)
             if (int(major), int(minor)) > current]
    assert not later, "\n".join(later)
