"""Adding a modality is one module and its `register`: a toy depth-map modality, declared and
registered here, gets its config section, trains end to end, evaluates and exports, and FSDP2 and
compile find its blocks where its spec says they are."""

import io
import json
import tarfile
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block

from mmpretrain.config import ConfigError, _check, load_config, to_yaml
from mmpretrain.encoders import MODALITIES, register
from mmpretrain.encoders.spec import BadSample, ModalitySpec, as_tensor, check_heads

from conftest import ROOT, TINY


@dataclass
class DepthConfig:
    """Depth maps (1, size, size) in metres, cut into patch x patch patches."""

    size: int = _check(4, default=8)
    patch: int = _check(1, default=4)
    width: int = _check(8, default=32)
    depth: int = _check(1, default=1)
    heads: int = _check(1, default=2)
    max_metres: float = _check(0.1, default=10.0)


def validate(cfg: DepthConfig, model_cfg) -> None:
    check_heads("model.depth", cfg)
    if cfg.size % cfg.patch:
        raise ConfigError(f"model.depth.patch: {cfg.patch} does not divide model.depth.size={cfg.size}")


class DepthEncoder(nn.Module):
    """Patches -> a linear embedding, a class token and positions -> timm blocks, kept in `layers`
    (neither `blocks` nor under a `vit`: only the spec says where they are)."""

    def __init__(self, cfg: DepthConfig):
        super().__init__()
        self.cfg, self.width = cfg, cfg.width
        self.embed = nn.Linear(cfg.patch ** 2, cfg.width)
        self.cls_token = nn.Parameter(torch.empty(1, 1, cfg.width))
        self.pos = nn.Parameter(torch.empty(1, 1 + (cfg.size // cfg.patch) ** 2, cfg.width))
        self.layers = nn.ModuleList(Block(cfg.width, cfg.heads) for _ in range(cfg.depth))
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) -> (B, 1 + patches, width)."""
        x = self.embed(F.unfold(x, self.cfg.patch, stride=self.cfg.patch).transpose(1, 2))
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos
        for layer in self.layers:
            x = layer(x)
        return x


def decode(data: bytes, cfg: DepthConfig, rng) -> torch.Tensor:
    """A .npy member (1, S, S) -> scaled to [0, 1]; flipped left-right at random in training."""
    try:
        x = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:  # NumPy raises several types for a bad file
        raise BadSample("bad_depth", repr(e)) from e
    if x.shape != media_shape(cfg):
        raise BadSample("bad_depth", f"shape {x.shape}")
    x = torch.from_numpy(x.astype(np.float32)) / cfg.max_metres
    return x.flip(-1) if rng is not None and rng.random() < 0.5 else x


def preprocess(maps, cfg: DepthConfig) -> torch.Tensor:
    """One depth map (1, S, S) in metres, or a list -> (B, 1, S, S)."""
    items = maps if isinstance(maps, (list, tuple)) else [maps]
    accepted = "(1, S, S) maps in metres"
    return torch.stack([as_tensor(m, "depth", accepted).float() / cfg.max_metres for m in items])


def media_shape(cfg: DepthConfig) -> tuple[int, ...]:
    return (1, cfg.size, cfg.size)


DEPTH = ModalitySpec("depth", DepthConfig, DepthEncoder, ("npy",), decode, preprocess, media_shape, validate,
                     blocks=lambda encoder: list(encoder.layers))


@pytest.fixture
def depth():
    register(DEPTH)
    yield DEPTH
    del MODALITIES["depth"]  # the other tests see the shipped modalities only


def write_shard(path, n: int) -> str:
    """n samples of a depth map (.npy) and its caption (.txt): walls at n distances."""
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            metres = 0.5 + 9 * i / n
            buf = io.BytesIO()
            np.save(buf, metres + np.linspace(0, 0.1, 64, dtype=np.float32).reshape(1, 8, 8))
            for ext, data in (("npy", buf.getvalue()), ("txt", f"a wall {metres:.1f} metres away".encode())):
                info = tarfile.TarInfo(f"s{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_a_registered_modality_has_a_config_section(depth):
    cfg = load_config(None, ["model.modalities=[image, depth]", "model.depth.size=12"])
    assert cfg.model.depth is cfg.model.sections["depth"] and cfg.model.depth.size == 12
    text = to_yaml(cfg)
    assert "\n  depth:\n    size: 12\n" in text  # after the shipped modalities' sections
    assert text.index("\n  video:\n") < text.index("\n  depth:\n") < text.index("\n  text:\n")
    with pytest.raises(ConfigError, match=r"model\.modalities\[1\]: 'smell' is not allowed; expected one of "
                                          r"'image', 'audio', 'video', 'depth'"):
        load_config(None, ["model.modalities=[depth, smell]"])
    with pytest.raises(ConfigError, match=r"model\.depth\.patch: 5 does not divide model\.depth\.size=8"):
        load_config(None, ["model.modalities=[depth]", "model.depth.patch=5"])
    with pytest.raises(ConfigError, match=r"model\.depht: unknown key; did you mean 'depth'"):
        load_config(None, ["model.depht.size=8"])
    with pytest.raises(ValueError, match="'depth': the name is taken"):
        register(DEPTH)


def test_a_registered_modality_trains_evaluates_and_exports(depth, tmp_path):
    import mmpretrain
    from mmpretrain import train

    shard = write_shard(tmp_path / "depth-000000.tar", 24)
    run_dir = tmp_path / "runs" / "depth"
    assert train.main([str(ROOT / "configs" / "tiny.yaml"), f"run.dir={run_dir.parent}", "run.name=depth",
                       "train.device=cpu", "data.num_workers=0", "train.steps=2", "model.modalities=[depth]",
                       f"data.sources=[{shard}]", f"data.eval_sources=[{shard}]"]) == 0
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    results = json.loads((run_dir / "eval" / "retrieval.json").read_text())
    assert results["text->depth"]["n"] == 24
    model = mmpretrain.load_pretrained(run_dir / "export")
    maps = [np.full((1, 8, 8), 2.0, dtype=np.float32), np.full((1, 8, 8), 7.0, dtype=np.float32)]
    embeddings = model.encode("depth", maps)
    assert embeddings.shape == (2, 32)
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(2))
    tower = mmpretrain.load_encoder(run_dir / "export" / "depth")
    with torch.no_grad():
        torch.testing.assert_close(tower(tower.preprocess(maps))[1], embeddings)


def test_every_registered_modalitys_blocks_are_sharded_and_compiled(depth):
    """FSDP2 shards, and compile compiles, each block a modality's spec names, wherever its encoder
    keeps them (the toy's are in `layers`); one process, a mesh of one. Built on the meta device
    and materialised as a sharded run is, the toy's own `init_weights` included."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule

    from mmpretrain.build import build_task
    from mmpretrain.parallel import DistEnv
    from mmpretrain.parallel.compile import compiled_regions
    from mmpretrain.parallel.fsdp import apply_fsdp, materialize

    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"model.modalities=[{', '.join(MODALITIES)}]", *TINY])
    with torch.device("meta"):
        task = build_task(cfg, 1000)
    blocks = {m: MODALITIES[m].blocks(tower.encoder) for m, tower in task.model.towers.items()}
    assert list(blocks) == ["image", "audio", "video", "depth"] and all(blocks.values())
    regions = compiled_regions(task.model)
    assert all(any(b is r for r in regions) for bs in blocks.values() for b in bs)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("dp", "sp"))
        apply_fsdp(task, DistEnv(mesh=mesh), "cpu", False)
        unsharded = [f"{m} block {i}" for m, bs in blocks.items() for i, b in enumerate(bs)
                     if not isinstance(b, FSDPModule)]
        assert not unsharded
        materialize(task, torch.device("cpu"), seed=0)
        assert 0.01 < float(task.model.towers["depth"].encoder.pos.detach().full_tensor().std()) < 0.03
    finally:
        dist.destroy_process_group()
