"""Downstream use: what `load_pretrained(...).encode_*` accept, `similarity` with the exported
temperatures, and the modes of the files a run writes."""

import io
import math
import os
import stat

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image
from safetensors.torch import load_file

import mmpretrain
from mmpretrain import train
from mmpretrain.build import build_task
from mmpretrain.checkpoint import latest_checkpoint, read_tensors
from mmpretrain.config import load_config
from mmpretrain.export import export_model
from mmpretrain.model import MultimodalModel
from mmpretrain.pretrained import Pretrained
from mmpretrain.tokenizer import Tokenizer

from conftest import ROOT
from test_video import mp4


def untrained(*overrides) -> Pretrained:
    """A freshly initialised tiny model with its preprocessing (no training needed to test inputs)."""
    cfg = load_config(ROOT / "configs" / "tiny.yaml", list(overrides))
    return Pretrained(MultimodalModel(cfg.model, Tokenizer(cfg.model.text).vocab_size), cfg.model)


def picture(seed=0, w=40, h=30) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


# ---------------------------------------------------------------------------- file modes


def test_every_file_a_run_and_consolidate_write_follows_the_umask(tiny_cfg, tmp_path):
    """safetensors writes 0600 whatever the umask; the run folder (export included) and
    `checkpoint consolidate`'s output must be like any other file: 0644 / 0755 under umask 022."""
    from mmpretrain import checkpoint

    cfg = tiny_cfg("train.steps=1", "run.name=modes")
    consolidated = tmp_path / "weights" / "model.safetensors"
    old = os.umask(0o022)
    try:
        train.run(cfg)
        assert checkpoint.main(["consolidate", str(latest_checkpoint(cfg.run_dir)), str(consolidated)]) == 0
    finally:
        os.umask(old)
    written = [cfg.run_dir, *cfg.run_dir.rglob("*"), consolidated.parent, consolidated]
    assert (cfg.run_dir / "export" / "image" / "model.safetensors") in written
    wrong = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in written
             if stat.S_IMODE(p.stat().st_mode) != (0o755 if p.is_dir() else 0o644)}
    assert not wrong


# ---------------------------------------------------------------------------- inputs


def test_encode_image_takes_paths_bytes_pil_arrays_and_tensors_one_or_many(tmp_path):
    model = untrained()
    a, b = picture(0), picture(1)
    expected = model.encode_image([a, b])
    path = tmp_path / "a.png"
    a.save(path)
    pixels = np.asarray(a)  # (H, W, 3), as PIL, NumPy and OpenCV (after BGR->RGB) give; read-only
    chw = torch.tensor(pixels).permute(2, 0, 1)  # (3, H, W), as torchvision.io.read_image gives
    for one in (a, str(path), path, path.read_bytes(), pixels, chw, [chw]):
        torch.testing.assert_close(model.encode_image(one), expected[:1])
    torch.testing.assert_close(model.encode_image(np.stack([pixels, np.asarray(b)])), expected)
    torch.testing.assert_close(model.encode_image(torch.stack([chw, chw])), expected[[0, 0]])
    torch.testing.assert_close(model.encode_image([path, b]), expected)
    preprocessed = mmpretrain.encoders.MODALITIES["image"].preprocess([a, b], model.cfg.image)
    torch.testing.assert_close(model.encode_image(preprocessed), expected)  # float: preprocessed already
    torch.testing.assert_close(model.encode_image(preprocessed[0].double()), expected[:1])

    with pytest.raises(TypeError, match=r"^image inputs: expected a path, bytes, a PIL image.*got dict$"):
        model.encode_image({"x": a})
    with pytest.raises(ValueError, match=r"channel axis.*\(3, 20, 3\)"):
        model.encode_image(np.zeros((3, 20, 3), np.uint8))  # (H, W, 3) or (3, H, W)? refused, not guessed
    with pytest.raises(ValueError, match=r"preprocessed.*\(3, 16, 16\).*got \(3, 30, 40\).*uint8"):
        model.encode_image(chw.float())  # float [0, 255] pixels are not silently taken as normalised
    with pytest.raises(ValueError, match=r"uint8.*got int64"):
        model.encode_image(chw.long())
    with pytest.raises(ValueError, match=r"no images"):
        model.encode_image([])
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"bad.png: .*bad_image"):
        model.encode_image(tmp_path / "bad.png")


def test_encode_image_makes_grey_rgba_and_palette_rgb_and_a_missing_tower_is_named():
    model = untrained()  # image and audio towers
    a = picture(0)
    grey, rgba = np.asarray(a.convert("L")), np.asarray(a.convert("RGBA"))  # (H, W); (H, W, 4), opaque
    expected = model.encode_image(a.convert("L").convert("RGB"))
    for one in (grey, torch.tensor(grey), grey[..., None], torch.tensor(grey)[None]):  # (H, W, 1), (1, H, W)
        torch.testing.assert_close(model.encode_image(one), expected)
    for one in (rgba, torch.tensor(rgba).permute(2, 0, 1), [a.convert("RGBA")]):  # the alpha dropped
        torch.testing.assert_close(model.encode_image(one), model.encode_image(a))
    torch.testing.assert_close(model.encode_image([grey, grey]), expected[[0, 0]])
    palette = a.convert("P")
    torch.testing.assert_close(model.encode_image(palette), model.encode_image(palette.convert("RGB")))
    torch.testing.assert_close(model.encode_image(np.asarray(a)[:4]), model.encode_image(a.crop((0, 0, 40, 4))))
    with pytest.raises(ValueError, match=r"channel axis.*\(4, 20, 4\)"):
        model.encode_image(np.zeros((4, 20, 4), np.uint8))  # RGBA either way: refused, not guessed

    with pytest.raises(ValueError, match=r"^encode_video: this model has no video tower \(its towers: text, image, "
                                         r"audio\)$"):
        model.encode_video(np.zeros((4, 3, 16, 16), np.uint8))  # refused before decoding, whatever the input


def test_encode_audio_takes_clips_batches_channels_and_files_never_guessing_the_rate(tmp_path):
    model = untrained()
    sr = model.cfg.audio.sample_rate
    rng = np.random.default_rng(0)
    pcm = rng.integers(-2**15, 2**15, (2, 22050 // 2), dtype=np.int16)  # two clips, 0.5 s at 22050 Hz
    waves = torch.from_numpy(pcm / 2**15).float()  # exactly what a 16-bit file reads back as
    expected = model.encode_audio(waves, sample_rate=22050)  # (B, N): resampled to the model's rate
    for i, wave in enumerate(waves):
        torch.testing.assert_close(model.encode_audio(wave, sample_rate=22050), expected[i:i + 1])  # (N,)
    stereo = torch.stack([waves, waves], dim=1)  # (B, C, N): channels averaged to mono
    torch.testing.assert_close(model.encode_audio(stereo, sample_rate=22050), expected)
    torch.testing.assert_close(model.encode_audio(list(stereo.numpy()), sample_rate=22050), expected)
    path = tmp_path / "clip.flac"
    sf.write(path, np.stack([pcm[1], pcm[1]], axis=1), 22050, subtype="PCM_16")  # a stereo file
    torch.testing.assert_close(model.encode_audio(path), expected[1:])  # its rate read from the file
    torch.testing.assert_close(model.encode_audio([str(path), waves[0]], sample_rate=22050), expected[[1, 0]])

    with pytest.raises(ValueError, match=rf"^audio inputs: sample_rate= is required.*{sr} Hz"):
        model.encode_audio(waves)  # the rate is never assumed
    with pytest.raises(ValueError, match=r"shorter than one spectrogram window.*\(samples, channels\)"):
        model.encode_audio(np.zeros((22050, 2), np.float32), sample_rate=22050)  # soundfile's layout
    with pytest.raises(ValueError, match=r"float waveforms.*got int16.*32768"):
        model.encode_audio(pcm, sample_rate=22050)
    with pytest.raises(ValueError, match=r"\(N,\), \(B, N\) or \(B, C, N\).*got 4-D"):
        model.encode_audio(stereo[None], sample_rate=22050)
    with pytest.raises(ValueError, match=r"clip.flac is at 22050 Hz, not sample_rate=16000"):
        model.encode_audio(path, sample_rate=16000)
    with pytest.raises(TypeError, match=r"^audio inputs: expected a path, bytes, .*got int$"):
        model.encode_audio([1, 2], sample_rate=22050)


def test_encode_video_takes_files_and_frames_in_either_layout(tmp_path):
    model = untrained("model.modalities=[video]", "model.video.num_frames=4", "model.video.width=32",
                      "model.video.heads=2", "model.video.depth=1")
    data = mp4(n_frames=16, fps=8)
    path = tmp_path / "clip.mp4"
    path.write_bytes(data)
    expected = model.encode_video(path)
    import av

    with av.open(io.BytesIO(data)) as c:
        thwc = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])  # (T, H, W, 3), all 16
    tchw = torch.from_numpy(thwc).permute(0, 3, 1, 2)
    picked = [2, 6, 10, 14]  # the frames evaluation takes from this file
    for one in (str(path), data, [path], thwc[picked], tchw[picked], tchw[None, picked]):
        torch.testing.assert_close(model.encode_video(one), expected)
    torch.testing.assert_close(model.encode_video(thwc, fps=8), expected)  # sampled as evaluation samples
    torch.testing.assert_close(model.encode_video([tchw, data], fps=8), expected[[0, 0]])

    with pytest.raises(ValueError, match=r"16 frames.*num_frames=4.*fps="):
        model.encode_video(tchw)
    with pytest.raises(ValueError, match=r"preprocessed.*\(4, 3, 32, 32\).*got \(3, 3, 32, 32\)"):
        model.encode_video(tchw[:3].float())
    with pytest.raises(TypeError, match=r"^video inputs: expected a path, bytes"):
        model.encode_video(3.5)


# ---------------------------------------------------------------------------- similarity


def exported_task(tmp_path, scales: dict[str, float]):
    """An export of a fresh tiny task whose temperatures are set to `scales` (exp(log(1/T)))."""
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["objectives.media_pairs=true"])
    task = build_task(cfg, Tokenizer(cfg.model.text).vocab_size)
    with torch.no_grad():
        for pair, scale in scales.items():
            task.objectives.logit_scale[pair].fill_(math.log(scale))
    return export_model(task.state_dict(), cfg, tmp_path / "export")


def test_similarity_uses_the_exported_temperature_of_each_pair(tmp_path):
    export = exported_task(tmp_path, {"text-image": 30.0, "text-audio": 50.0, "image-audio": 20.0})
    assert set(load_file(export / "objectives.safetensors")) == {
        "logit_scale.text-image", "logit_scale.text-audio", "logit_scale.image-audio"}
    model = mmpretrain.load_pretrained(export)
    img, txt = model.encode_image([picture(0), picture(1)]), model.encode_text(["a", "b", "c"])
    logits = model.similarity(img, txt, "image-text")  # CLIP's logits_per_image: (images, texts)
    torch.testing.assert_close(logits, 30.0 * img @ txt.T)
    torch.testing.assert_close(model.similarity(txt, img, "text-image"), logits.T)
    probs = model.similarity(img, txt, "image-text", probs=True)
    torch.testing.assert_close(probs, logits.softmax(dim=-1))
    aud = model.encode_audio(torch.zeros(1, 8000), sample_rate=16000)
    torch.testing.assert_close(model.similarity(aud, img, "audio-image"), 20.0 * aud @ img.T)
    pairs = r"'text-video' has no learned temperature; this model's pairs: image-audio, text-audio, text-im"
    with pytest.raises(ValueError, match=pairs):
        model.similarity(txt, img, "text-video")
    with pytest.raises(ValueError, match=r"\(2, 32\) and \(3, 16\)"):
        model.similarity(img, txt[:, :16], "image-text")


def test_similarity_from_a_trained_run_and_without_temperatures(tiny_cfg, tmp_path):
    cfg = tiny_cfg("train.steps=1", "run.name=sim")
    train.run(cfg)
    export = cfg.run_dir / "export"
    learned = read_tensors(latest_checkpoint(cfg.run_dir), "task.objectives.")
    exported = load_file(export / "objectives.safetensors")
    assert exported.keys() == learned.keys() and all(torch.equal(exported[k], learned[k]) for k in learned)
    model = mmpretrain.load_pretrained(export)
    img, txt = model.encode_image([picture(0)]), model.encode_text(["a red circle", "a blue ring"])
    scale = float(learned["logit_scale.text-image"].exp())
    torch.testing.assert_close(model.similarity(txt, img, "text-image"), scale * txt @ img.T)

    with pytest.raises(RuntimeError, match=r"no learned temperatures.*use a @ b.T"):
        untrained().similarity(txt, img, "text-image")  # a model given no temperatures
    (export / "objectives.safetensors").unlink()  # an export without them is incomplete
    with pytest.raises(FileNotFoundError, match="no objectives.safetensors here"):
        mmpretrain.load_pretrained(export)


def test_a_run_its_export_and_a_checkpoint_name_one_model_in_python_and_every_cli(tiny_cfg, tmp_path, capsys):
    from mmpretrain.eval import classify, linear_probe, retrieval

    cfg = tiny_cfg("train.steps=1", "run.name=named")
    train.run(cfg)
    folders = [cfg.run_dir, cfg.run_dir / "export", latest_checkpoint(cfg.run_dir)]
    models = [mmpretrain.load_pretrained(folder) for folder in folders]
    img, txt = [m.encode_image([picture(0)]) for m in models], [m.encode_text(["a red circle"]) for m in models]
    for i in (1, 2):
        torch.testing.assert_close(img[i], img[0])
        torch.testing.assert_close(txt[i], txt[0])
        assert models[i].logit_scale == models[0].logit_scale  # a checkpoint's temperatures too
    with pytest.raises(FileNotFoundError, match=r"^load_pretrained .*nowhere: no such folder; expected a run folder"):
        mmpretrain.load_pretrained(tmp_path / "nowhere")

    capsys.readouterr()
    dataset = ["--dataset", str(tmp_path)]
    for main, more in ((retrieval.main, []), (classify.main, dataset), (linear_probe.main, dataset)):
        for flag in ("--model", "--run"):  # one flag, --run its alias; tmp_path holds no model
            assert main([flag, str(tmp_path), *more]) == 2
            err = capsys.readouterr().err
            assert err.startswith(f"error: --model {tmp_path}: holds no export") and err.count("\n") == 1, err
