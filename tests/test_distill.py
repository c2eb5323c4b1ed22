"""Distillation from a frozen mmpretrain export: open_clip's DistillClipLoss, a run with a teacher,
and offline distillation from the teacher's embeddings stored in shards (data/teacher_embed.py)."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from mmpretrain import train
from mmpretrain.build import build_task
from mmpretrain.config import ConfigError
from mmpretrain.data.samples import BadSample, SampleParser
from mmpretrain.objectives.distill import OfflineTeacher, Teacher, distill_loss, distill_terms
from mmpretrain.tokenizer import Tokenizer


def test_distill_loss_is_open_clips():
    from open_clip.loss import DistillClipLoss

    g = torch.Generator().manual_seed(0)
    a, b, ta, tb = (F.normalize(torch.randn(9, 16, generator=g), dim=-1) for _ in range(4))
    ours = distill_loss(a, b, torch.tensor(20.0), ta, tb, 50.0)
    _, theirs = DistillClipLoss()(a, b, torch.tensor(20.0), ta, tb, torch.tensor(50.0))  # image, text, ...
    torch.testing.assert_close(ours, theirs)
    # a student that agrees with its teacher has reached the teacher's own entropy: the minimum
    assert distill_loss(ta, tb, torch.tensor(50.0), ta, tb, 50.0) < ours
    # Hinton's temperature: open_clip's loss at both scales divided by it, times its square
    _, softened = DistillClipLoss()(a, b, torch.tensor(5.0), ta, tb, torch.tensor(12.5))
    torch.testing.assert_close(distill_loss(a, b, torch.tensor(20.0), ta, tb, 50.0, temperature=4.0), 16 * softened)


def test_a_run_distils_from_an_export_which_stays_frozen_and_outside_the_checkpoint(tiny_cfg, tmp_path):
    from conftest import small_eval_shard

    small = f"data.eval_sources=[{small_eval_shard(tmp_path)}]"  # no run's evaluation is checked here
    teacher_cfg = tiny_cfg("train.steps=2", "run.name=teacher", small)
    train.run(teacher_cfg)
    export = teacher_cfg.run_dir / "export"
    before = load_file(export / "model.safetensors")

    cfg = tiny_cfg("train.steps=2", "train.log_every=1", "run.name=student", f"objectives.distill.teacher={export}",
                   "objectives.distill.weight=2.0", small)
    train.run(cfg)
    records = [json.loads(l) for l in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["distill/text-image"] > 0 and "distill/text-audio" in r for r in records)
    after = load_file(export / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    saved = load_file(cfg.run_dir / "export" / "model.safetensors")
    assert saved.keys() == before.keys()  # the student's own weights only: no teacher.* tensors

    with pytest.raises(ConfigError, match="objectives.distill.teacher .*holds no export"):  # runs/: no model
        train.run(tiny_cfg("run.name=nowhere", f"objectives.distill.teacher={cfg.run_dir.parent}"))
    with pytest.raises(ConfigError, match="model.text"):
        train.run(tiny_cfg("run.name=other-text", "model.text.context_length=12",
                           f"objectives.distill.teacher={export}"))

    # offline: the same teacher's embeddings written into new shards, then read by training
    from mmpretrain.data import teacher_embed
    from mmpretrain.data.sources import resolve_sources

    shards = resolve_sources(teacher_cfg.data, "train")
    out = teacher_cfg.run_dir.parent / "taught" / "train-%06d.tar"
    assert teacher_embed.main([*shards, "--teacher", str(export), "--out", str(out), "--batch-size", "7"]) == 0
    taught = str(out).replace("%06d", "000000")
    offline = tiny_cfg("train.steps=2", "run.name=offline", "objectives.distill.teacher=offline",
                       f"data.sources=[{taught}]", small)
    check_offline_equals_online(offline, export, taught)
    train.run(offline)
    records = [json.loads(l) for l in (offline.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["distill/text-image"] > 0 and "distill/text-audio" in r for r in records)
    import webdataset as wds

    raw = next(iter(wds.DataPipeline(wds.SimpleShardList(shards[:1]), wds.tarfile_to_samples())))
    with pytest.raises(BadSample, match="missing_teacher"):  # the shards before embedding
        SampleParser(offline, True, Tokenizer(offline.model.text))(raw, __import__("random").Random(0))

    # --beside: a sidecar next to each old shard, read with it by training, the same members
    import shutil

    old = teacher_cfg.run_dir.parent / "old"
    old.mkdir()
    copies = [str(shutil.copy(s, old / Path(s).name)) for s in shards]
    assert teacher_embed.main([*copies, "--teacher", str(export), "--beside", "--batch-size", "7"]) == 0
    assert sorted(p.name for p in old.iterdir()) == sorted([*(Path(c).name for c in copies),
                                                            *(teacher_embed.sidecar_of(Path(c).name) for c in copies)])
    merged = {r["__key__"]: r for r in wds.DataPipeline(wds.SimpleShardList(copies),
                                                       teacher_embed.with_sidecars(wds.reraise_exception))}
    written = {r["__key__"]: r for r in wds.DataPipeline(wds.SimpleShardList([taught]), wds.tarfile_to_samples())}
    assert merged.keys() == written.keys()
    assert all(merged[k].get("teacher.npz") == written[k].get("teacher.npz") for k in written)
    assert sum("teacher.npz" in r for r in merged.values()) > 0
    beside = tiny_cfg("train.steps=2", "run.name=beside", "objectives.distill.teacher=offline",
                      f"data.sources=[{copies[0]}]", small)
    train.run(beside)
    records = [json.loads(l) for l in (beside.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["distill/text-image"] > 0 and "missing_teacher" not in r["skipped_samples"] for r in records)


def check_offline_equals_online(cfg, export, taught: str) -> None:
    """The loss from stored embeddings is the loss of the teacher run on the same batch (decoded
    as evaluation decodes: the stored embeddings are of the eval transform)."""
    import random

    import webdataset as wds

    from mmpretrain.batch import collate

    parser = SampleParser(cfg, False, Tokenizer(cfg.model.text))
    parser.offline_teacher = True  # what training reads, without its augmentation
    raws = wds.DataPipeline(wds.SimpleShardList([taught]), wds.tarfile_to_samples())
    samples = [parser(raw, random.Random(0)) for raw, _ in zip(raws, range(24))]
    batch = collate(samples, parser.media_shapes(), cfg.model.text.context_length)
    assert batch.teacher.keys() == {"text", "image", "audio"} and len(batch.teacher_scale) == 3
    torch.manual_seed(0)
    task = build_task(cfg, Tokenizer(cfg.model.text).vocab_size).eval()
    with torch.no_grad():
        out = task.model(batch, task.layout)
        scales = task.objectives.logit_scale
        offline = distill_terms(out, *OfflineTeacher.embed(batch), scales)
        online = distill_terms(out, *Teacher(str(export), cfg, torch.device("cpu")).embed(batch), scales)
    assert offline.keys() == online.keys() == {"distill/text-image", "distill/text-audio", "distill/image-audio"}
    for k in online:
        torch.testing.assert_close(offline[k], online[k], rtol=1e-5, atol=1e-5)


def _open_clip_teacher_files(folder, image_size: int = 16):
    """A small open_clip CLIP's model config and checkpoint, written as a user's would be."""
    import open_clip

    config = folder / "tiny-clip-teacher.json"
    config.write_text(json.dumps({
        "embed_dim": 16, "vision_cfg": {"image_size": image_size, "patch_size": 4, "width": 32, "layers": 1,
                                        "head_width": 16},
        "text_cfg": {"context_length": 20, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}))
    open_clip.add_model_config(str(config))
    torch.manual_seed(0)
    model = open_clip.create_model(config.stem)
    torch.save(model.state_dict(), folder / "teacher.pt")
    return config, folder / "teacher.pt", model.eval()


def test_an_open_clip_teacher_embeds_the_students_batch_as_open_clip_embeds_its_own_inputs(tiny_cfg, tmp_path):
    """Images the student decoded (its size, its normalisation) reach the teacher as open_clip's own
    preprocessing makes them, and captions as its tokenizer makes them (padded to its context)."""
    import open_clip
    from PIL import Image

    from mmpretrain.batch import Batch
    from mmpretrain.encoders.image import preprocess
    from mmpretrain.objectives.distill import OpenClipTeacher

    config, checkpoint, reference = _open_clip_teacher_files(tmp_path)
    cfg = tiny_cfg("model.modalities=[image]")
    teacher = OpenClipTeacher(str(checkpoint), str(config), cfg, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    pictures = [Image.fromarray(torch.randint(0, 256, (16, 16, 3), generator=g, dtype=torch.uint8).numpy())
                for _ in range(3)]
    captions = ["a red circle", "a blue cross left of a green square", "two stripes"]
    tok = Tokenizer(cfg.model.text)
    tokens, lengths = tok(captions)
    batch = Batch([str(i) for i in range(3)], tokens, lengths, {"image": preprocess(pictures, cfg.model.image)},
                  {"image": torch.ones(3, dtype=torch.bool)})
    embeddings, scale = teacher.embed(batch)
    _, _, transform = open_clip.create_model_and_transforms(config.stem)
    with torch.no_grad():
        image = F.normalize(reference.encode_image(torch.stack([transform(p) for p in pictures])), dim=-1)
        text = F.normalize(reference.encode_text(open_clip.get_tokenizer(config.stem)(captions)), dim=-1)
    torch.testing.assert_close(embeddings["image"], image, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(embeddings["text"], text, rtol=1e-4, atol=1e-5)
    assert scale == {"text-image": pytest.approx(float(reference.logit_scale.detach().exp()))}

    run = tiny_cfg("train.steps=2", "run.name=clip-taught", f"objectives.distill.teacher={checkpoint}",
                   f"objectives.distill.open_clip_model={config}")
    train.run(run)
    records = [json.loads(l) for l in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["distill/text-image"] > 0 and "distill/text-audio" not in r for r in records)  # it reads no audio
    with pytest.raises(ConfigError, match="not a file"):
        OpenClipTeacher(str(tmp_path / "none.pt"), str(config), cfg, torch.device("cpu"))
    with pytest.raises(ConfigError, match="neither a model open_clip knows"):
        OpenClipTeacher(str(checkpoint), "no-such-model", cfg, torch.device("cpu"))
