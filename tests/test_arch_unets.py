"""Re-implemented guided-diffusion (B) and SDEdit DDPM (C) U-Nets against the upstream fixtures.

Full-size models are only built on the meta device: the key manifests need shapes, not memory.
The fan-in weight files are the real numerical gate (see the fixtures' README): with the
std-0.02 files, attention and time-embedding bugs stay below float32 noise.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from benchkit_diffpure.architectures.ddpm_unet import DDPMUNet
from benchkit_diffpure.architectures.guided_unet import GuidedUNet

REF = Path(__file__).resolve().parents[2] / "shared" / "reference"
pytestmark = pytest.mark.skipif(
    not REF.is_dir(), reason=f"reference fixtures not found at {REF} (shared/reference is not checked out)"
)

# prefix -> (builder, total parameters of the official full-size checkpoint)
ARCHS: dict[str, tuple[Callable[[dict[str, Any]], nn.Module], int]] = {
    "guided_unet_imagenet256": (GuidedUNet.from_config, 552_814_086),
    "ddpm_unet_celebahq": (DDPMUNet.from_config, 113_673_219),
}
REL_TOL = 1e-5


def _json(name: str) -> dict[str, Any]:
    return json.loads((REF / name).read_text())


def _entries(model: nn.Module) -> list[list[Any]]:
    return [
        [name, list(t.shape), str(t.dtype).removeprefix("torch.")]
        for name, t in model.state_dict().items()
    ]


@pytest.mark.parametrize("prefix", ARCHS)
def test_full_config_matches_checkpoint_manifest(prefix: str) -> None:
    builder, total = ARCHS[prefix]
    manifest = _json(f"{prefix}_full_keys.json")
    with torch.device("meta"):
        model = builder(manifest["config"])
    assert _entries(model) == manifest["entries"]
    assert len(manifest["entries"]) == manifest["num_entries"]
    assert not manifest["buffers"] and not list(model.buffers())
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == manifest["total_params"] == total


@pytest.mark.parametrize("prefix", ARCHS)
def test_small_config_matches_manifest(prefix: str) -> None:
    builder, _ = ARCHS[prefix]
    manifest = _json(f"{prefix}_small_keys.json")
    with torch.device("meta"):
        model = builder(_json(f"{prefix}_small_config.json"))
    assert _entries(model) == manifest["entries"]
    assert sum(p.numel() for p in model.parameters()) == manifest["total_params"]


@pytest.mark.parametrize("variant", ["full_keys", "small_keys"])
def test_guided_config_parsing_matches_upstream_derivation(variant: str) -> None:
    manifest = _json(f"guided_unet_imagenet256_{variant}.json")
    with torch.device("meta"):
        model = GuidedUNet.from_config(manifest["config"])
    derived = manifest["derived"]
    assert list(model.channel_mult) == derived["channel_mult"]
    assert sorted(model.attention_resolutions) == sorted(derived["attention_ds"])
    assert model.out_channels == derived["out_channels"]


@pytest.mark.parametrize("weights", ["small", "small_fanin"])
@pytest.mark.parametrize("prefix", ARCHS)
def test_small_model_reproduces_upstream_output(prefix: str, weights: str) -> None:
    builder, _ = ARCHS[prefix]
    torch.manual_seed(0)
    model = builder(_json(f"{prefix}_small_config.json")).eval()
    model.load_state_dict(load_file(REF / f"{prefix}_{weights}.safetensors"), strict=True)

    io_path = REF / f"{prefix}_{weights}_io.safetensors"
    with safe_open(io_path, "pt") as f:
        meta = f.metadata()
        io = {k: f.get_tensor(k) for k in f.keys()}
    assert meta["weights"] == f"{prefix}_{weights}.safetensors"
    assert set(io) == {"x", "timesteps", "output"}, meta.get("call")
    assert io["timesteps"].dtype == torch.int64

    with torch.no_grad():
        out = model(io["x"], io["timesteps"])
    ref = io["output"]
    assert out.shape == ref.shape
    err = (out - ref).abs().max().item()
    bound = REL_TOL * ref.abs().max().item()
    print(f"{prefix}_{weights}: max|out-ref| = {err:.3e} (bound {bound:.3e})")
    assert err <= bound


def test_guided_accepts_diffpure_yaml_spacing() -> None:
    # DiffPure's imagenet.yml writes attention_resolutions as "32, 16, 8".
    cfg = {**_json("guided_unet_imagenet256_full_keys.json")["config"], "attention_resolutions": "32, 16, 8"}
    with torch.device("meta"):
        model = GuidedUNet.from_config(cfg)
    assert sorted(model.attention_resolutions) == [8, 16, 32]


@pytest.mark.parametrize(
    "override",
    [
        {"class_cond": True},
        {"use_new_attention_order": True},
        {"resblock_updown": False},
        {"use_scale_shift_norm": False},
        {"use_checkpoint": True},
        {"channel_mult": "", "image_size": 48},
    ],
)
def test_guided_rejects_unsupported_options(override: dict[str, Any]) -> None:
    cfg = {**_json("guided_unet_imagenet256_small_config.json"), **override}
    with torch.device("meta"), pytest.raises(ValueError):
        GuidedUNet.from_config(cfg)


@pytest.mark.parametrize("override", [{"type": "bayesian"}, {"resamp_with_conv": False}])
def test_ddpm_rejects_unsupported_options(override: dict[str, Any]) -> None:
    cfg = _json("ddpm_unet_celebahq_small_config.json")
    cfg["model"] = {**cfg["model"], **override}
    with torch.device("meta"), pytest.raises(ValueError):
        DDPMUNet.from_config(cfg)
