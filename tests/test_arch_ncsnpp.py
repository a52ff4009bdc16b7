"""Our NCSN++ re-implementation against the upstream reference fixtures (README "Architecture A").

The std-0.02 fixtures only check keys and coarse wiring; the fan-in fixtures are the real
numerical gate (attention and time-embedding bugs move their output by 0.07 or more).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from benchkit_diffpure import sde
from benchkit_diffpure.architectures.ncsnpp import NCSNpp, load_score_sde_checkpoint

from conftest import needs_shared

REF = Path(__file__).resolve().parents[2] / "shared" / "reference"
pytestmark = needs_shared(REF)

WEIGHT_VARIANTS = ["ncsnpp_cifar10_small", "ncsnpp_cifar10_small_fanin"]


def _json(name: str) -> dict:
    return json.loads((REF / name).read_text())


def _entries(model: torch.nn.Module) -> list[list]:
    return [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in model.state_dict().items()]


def _small_model() -> NCSNpp:
    return NCSNpp.from_config(_json("ncsnpp_cifar10_small_config.json")).eval()


def _run(model: NCSNpp, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x, labels)


def _assert_rel(out: torch.Tensor, ref: torch.Tensor, rel: float, what: str) -> float:
    err = (out - ref).abs().max().item()
    bound = rel * ref.abs().max().item()
    assert err <= bound, f"{what}: max|out-ref|={err:.3e} > {bound:.3e}"
    return err


def test_full_config_matches_manifest_on_meta() -> None:
    manifest = _json("ncsnpp_cifar10_full_keys.json")
    with torch.device("meta"):
        model = NCSNpp.from_config(manifest["config"])
    assert _entries(model) == manifest["entries"]
    assert len(manifest["entries"]) == manifest["num_entries"] == 957
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == manifest["total_params"] == 106_632_579
    assert sum(v.numel() for v in model.state_dict().values()) == manifest["total_state_numel"]
    # EMA shadow params are applied by position, so parameter order must be the manifest's minus buffers.
    param_names = [e[0] for e in manifest["entries"] if e[0] not in manifest["buffers"]]
    assert [n for n, _ in model.named_parameters()] == param_names
    assert [n for n, _ in model.named_buffers()] == manifest["buffers"] == ["sigmas"]


def test_small_config_matches_manifest() -> None:
    manifest = _json("ncsnpp_cifar10_small_keys.json")
    model = _small_model()
    assert _entries(model) == manifest["entries"]
    assert sum(p.numel() for p in model.parameters()) == manifest["total_params"]


def test_sigmas_buffer_is_the_geometric_schedule() -> None:
    sigmas = _small_model().sigmas
    assert sigmas.dtype == torch.float64 and sigmas.shape == (1000,)
    assert sigmas[0].item() == pytest.approx(50.0, rel=1e-12)
    assert sigmas[-1].item() == pytest.approx(0.01, rel=1e-12)
    ratios = sigmas[1:] / sigmas[:-1]
    assert torch.allclose(ratios, ratios[0].expand_as(ratios), rtol=1e-12, atol=0)


@pytest.mark.parametrize("weights", WEIGHT_VARIANTS)
def test_small_output_matches_upstream(weights: str) -> None:
    model = _small_model()
    model.load_state_dict(load_file(REF / f"{weights}.safetensors"), strict=True)
    io_path = REF / f"{weights}_io.safetensors"
    with safe_open(io_path, "pt") as f:
        meta = f.metadata()
    assert meta["weights"] == f"{weights}.safetensors"
    io = load_file(io_path)
    assert torch.equal(io["labels"], io["t"] * 999)  # documents the convention: not rounded
    _assert_rel(_run(model, io["x"], io["labels"]), io["output"], 1e-5, weights)


def _score_sde_checkpoint(state: dict[str, torch.Tensor], param_names: list[str]) -> dict:
    gen = torch.Generator().manual_seed(0)
    garbage = {f"module.{k}": torch.randn(v.shape, generator=gen).to(v.dtype) for k, v in state.items()}
    return {
        "model": garbage,
        "ema": {"decay": 0.9999, "num_updates": 7, "shadow_params": [state[n].clone() for n in param_names]},
        "step": 7,
    }


def test_score_sde_checkpoint_layout_uses_ema_weights(tmp_path: Path) -> None:
    state = load_file(REF / "ncsnpp_cifar10_small_fanin.safetensors")
    manifest = _json("ncsnpp_cifar10_small_keys.json")
    param_names = [e[0] for e in manifest["entries"] if e[0] not in manifest["buffers"]]
    ckpt = tmp_path / "checkpoint_8.pth"
    torch.save(_score_sde_checkpoint(state, param_names), ckpt)

    model = _small_model()
    sigmas_before = model.sigmas.clone()
    assert load_score_sde_checkpoint(model, ckpt) is model
    # Buffers come from the configuration, as in DiffPure, not from the checkpoint's 'model' entry.
    assert torch.equal(model.sigmas, sigmas_before)
    io = load_file(REF / "ncsnpp_cifar10_small_fanin_io.safetensors")
    _assert_rel(_run(model, io["x"], io["labels"]), io["output"], 1e-5, "score_sde checkpoint")


def test_score_sde_checkpoint_without_sigmas_and_raw_weights(tmp_path: Path) -> None:
    state = load_file(REF / "ncsnpp_cifar10_small_fanin.safetensors")
    manifest = _json("ncsnpp_cifar10_small_keys.json")
    param_names = [e[0] for e in manifest["entries"] if e[0] not in manifest["buffers"]]
    ckpt = _score_sde_checkpoint(state, param_names)
    del ckpt["model"]["module.sigmas"]  # older score_sde code did not register it as a buffer
    io = load_file(REF / "ncsnpp_cifar10_small_fanin_io.safetensors")
    model = load_score_sde_checkpoint(_small_model(), ckpt)
    _assert_rel(_run(model, io["x"], io["labels"]), io["output"], 1e-5, "checkpoint without sigmas")

    # use_ema=False takes the raw 'model' entry; zeroed EMA weights prove it is not used.
    ckpt["model"] = {f"module.{k}": v for k, v in state.items()}
    ckpt["ema"]["shadow_params"] = [torch.zeros_like(s) for s in ckpt["ema"]["shadow_params"]]
    model = load_score_sde_checkpoint(_small_model(), ckpt, use_ema=False)
    _assert_rel(_run(model, io["x"], io["labels"]), io["output"], 1e-5, "checkpoint raw weights")


def test_score_sde_checkpoint_mismatch_names_the_file(tmp_path: Path) -> None:
    state = load_file(REF / "ncsnpp_cifar10_small_fanin.safetensors")
    manifest = _json("ncsnpp_cifar10_small_keys.json")
    param_names = [e[0] for e in manifest["entries"] if e[0] not in manifest["buffers"]]

    short = _score_sde_checkpoint(state, param_names)
    short["ema"]["shadow_params"].pop()
    torch.save(short, tmp_path / "short.pth")
    with pytest.raises(ValueError, match=r"short\.pth.*shadow params"):
        load_score_sde_checkpoint(_small_model(), tmp_path / "short.pth")

    # Swapping two parameters keeps the count but not the shapes.
    swapped = _score_sde_checkpoint(state, param_names)
    sp = swapped["ema"]["shadow_params"]
    sp[0], sp[2] = sp[2], sp[0]
    torch.save(swapped, tmp_path / "swapped.pth")
    with pytest.raises(ValueError, match=r"swapped\.pth.*shadow param 0"):
        load_score_sde_checkpoint(_small_model(), tmp_path / "swapped.pth")

    bad_keys = _score_sde_checkpoint(state, param_names)
    bad_keys["model"] = {k.replace("all_modules", "layers"): v for k, v in bad_keys["model"].items()}
    torch.save(bad_keys, tmp_path / "renamed.pth")
    with pytest.raises(ValueError, match=r"renamed\.pth.*missing"):
        load_score_sde_checkpoint(_small_model(), tmp_path / "renamed.pth")


def test_plain_state_dict_loads_strictly(tmp_path: Path) -> None:
    path = REF / "ncsnpp_cifar10_small_fanin.safetensors"
    io = load_file(REF / "ncsnpp_cifar10_small_fanin_io.safetensors")
    for source in (path, load_file(path)):
        model = load_score_sde_checkpoint(_small_model(), source)
        _assert_rel(_run(model, io["x"], io["labels"]), io["output"], 1e-5, f"plain {type(source).__name__}")
    partial = load_file(path)
    partial.pop("all_modules.17.bias")
    with pytest.raises(ValueError, match="missing"):
        load_score_sde_checkpoint(_small_model(), partial)


def test_unsupported_options_raise() -> None:
    cfg = _json("ncsnpp_cifar10_small_config.json")
    for key, value in [("fir", True), ("resblock_type", "ddpm"), ("progressive", "output_skip"),
                       ("embedding_type", "fourier"), ("conditional", False), ("attention_type", "legacy")]:
        bad = {**cfg, "model": {**cfg["model"], key: value}}
        with pytest.raises(ValueError, match=f"model.{key}"):
            NCSNpp.from_config(bad)


@pytest.mark.parametrize("io_name", ["diffpure_revvpsde_fanin_io", "diffpure_revvpsde_io"])
def test_diffpure_reverse_vpsde_matches_fixture(io_name: str) -> None:
    path = REF / f"{io_name}.safetensors"
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    ref = load_file(path)
    model = _small_model()
    model.load_state_dict(load_file(REF / meta["model_weights"]), strict=True)
    img_shape = tuple(int(s) for s in meta["img_shape"].split(","))

    x = ref["x"]
    batch = x.shape[0]
    for i, t_prime in enumerate(ref["t_prime"]):
        # torchsde hands a 0-dim float32 time; everything stays float32, including 1 - t'.
        t = (1 - t_prime).expand(batch)
        assert torch.equal(t, ref["t_forward"][i])
        labels = t * 999
        assert torch.equal(labels, ref["labels"][i])

        net = _run(model, x.view(batch, *img_shape), labels).reshape(batch, -1)
        _assert_rel(net, ref["net_output"][i], 1e-5, f"{io_name} net t'={t_prime.item()}")

        std = sde.marginal_std(t)
        beta_t = sde.beta(t)
        assert std.dtype == beta_t.dtype == torch.float32
        torch.testing.assert_close(std, ref["std"][i], rtol=0, atol=1e-6)
        torch.testing.assert_close(beta_t, ref["beta"][i], rtol=0, atol=1e-6)

        score = -net / std[:, None]
        _assert_rel(score, ref["score"][i], 1e-5, f"{io_name} score t'={t_prime.item()}")

        f = -sde.reverse_sde_drift(x, t, score, beta_t[:, None])
        g = beta_t.sqrt()[:, None].expand_as(x)
        _assert_rel(f, ref["drift_f"][i], 1e-5, f"{io_name} f t'={t_prime.item()}")
        torch.testing.assert_close(g, ref["diffusion_g"][i], rtol=0, atol=1e-6)

    # Forward noising uses DDPM's discrete alpha-bar at index t-1, not the continuous one.
    t_int = int(ref["noise_level_t"].item())
    torch.testing.assert_close(sde.discrete_alphas_cumprod(), ref["alphas_cumprod"], rtol=0, atol=1e-6)
    alpha_bar = sde.discrete_alpha_bar(t_int / sde.DISCRETE_STEPS)
    torch.testing.assert_close(alpha_bar.reshape(1), ref["alpha_bar_used"], rtol=0, atol=1e-6)
    x_t = sde.diffuse(ref["x0"], alpha_bar, ref["eps"])
    torch.testing.assert_close(x_t, ref["x_t"], rtol=0, atol=1e-6)
