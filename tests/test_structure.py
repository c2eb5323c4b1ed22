"""Structure the rest of the code relies on: import layering, the one owner of the packed row,
weight-decay declarations, old checkpoints."""

import itertools
import json
import sys

import pytest
import torch

from mmpretrain.config import ConfigError, load_config
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
        "train.batch_size=12", "model.decoder.heads=2"])
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


def test_checkpoints_from_before_0_3_load(tiny_cfg, tmp_path):
    """One state.pt from rank 0, written before DCP checkpoints, and before 0.2 (temperatures in
    the model, as scalars): it resumes; another model's is refused, naming the tensors."""
    from mmpretrain import parallel, train

    trainer = train.Trainer(tiny_cfg(), parallel.DistEnv(), torch.device("cpu"))
    scales = {f"logit_scale.{k}": torch.tensor(3.5) for k in trainer.task.objectives.logit_scale}
    old = {"model": {**trainer.model.state_dict(), **scales}, "optimizer": trainer.optimizer.state_dict(),
           "scheduler": trainer.scheduler.state_dict(), "step": 3, "data": trainer.stream.state_dict(),
           "rng": train.rng_state()}
    folder = tmp_path / "step_00000003"
    folder.mkdir()
    torch.save(old, folder / "state.pt")
    trainer.resume_from = folder
    trainer.maybe_resume()
    assert trainer.step == 3
    from mmpretrain.checkpoint import describe

    assert describe(folder).startswith(f"{folder}: step 3, written by 1 process(es)\nmodel: ")
    assert all(float(p.detach()) == 3.5 for p in trainer.task.objectives.logit_scale.values())
    other = train.Trainer(tiny_cfg("model.decoder.width=64"), parallel.DistEnv(), torch.device("cpu"))
    other.resume_from = folder
    differ = r"train.resume: the checkpoint holds another model .*shape: model.towers.image.fusion.modality_embed \(32,\)"
    with pytest.raises(ConfigError, match=differ):
        other.maybe_resume()
