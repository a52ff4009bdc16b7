"""The DiffPure plugin: score models loaded through the registry from checkpoint files (the small
reference configurations stand in for the published ones), params validation, missing files."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from benchkit import registry
from benchkit.errors import BadInput
from conftest import SHARED
from diffpure_helpers import TinyConvScore

REF = SHARED / "reference"
pytestmark = pytest.mark.skipif(not REF.is_dir(), reason=f"reference fixtures not found at {REF}")


def small_config(name):
    return json.loads((REF / f"{name}_small_config.json").read_text())


def check_close(out, ref):
    assert float((out - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


def test_ddpmpp_from_score_sde_checkpoint(tmp_path, plugin_manager):
    """A score_sde-layout checkpoint (DataParallel 'module.' keys, EMA shadow params) loads through
    the plugin and the wrapper feeds the network t * 999."""
    weights = load_file(str(REF / "ncsnpp_cifar10_small_fanin.safetensors"))
    io = load_file(str(REF / "ncsnpp_cifar10_small_fanin_io.safetensors"))
    from benchkit_diffpure.architectures.ncsnpp import NCSNpp
    net = NCSNpp.from_config(small_config("ncsnpp_cifar10"))
    names = [n for n, _ in net.named_parameters()]
    ckpt = {"model": {f"module.{k}": torch.zeros_like(v) for k, v in weights.items()},
            "ema": {"decay": 0.9999, "num_updates": 1, "shadow_params": [weights[n] for n in names]}, "step": 1}
    torch.save(ckpt, tmp_path / "checkpoint_8.pth")
    score = registry.get("score-models").get("ddpmpp").build(
        {"path": str(tmp_path / "checkpoint_8.pth"), "config": small_config("ncsnpp_cifar10")})
    with torch.no_grad():
        check_close(score.eps(io["x"], io["t"]), io["output"])
    assert not score.discrete_time


@pytest.mark.parametrize("plugin, name", [("adm", "guided_unet_imagenet256"), ("ddpm", "ddpm_unet_celebahq")])
def test_discrete_models_take_floor_of_t_times_1000(plugin, name, plugin_manager):
    io = load_file(str(REF / f"{name}_small_fanin_io.safetensors"))
    config = small_config(name)
    score = registry.get("score-models").get(plugin).build(
        {"path": str(REF / f"{name}_small_fanin.safetensors"), "config": config})
    t = io["timesteps"].double() / 1000 + 0.0004  # any t in [k/1000, (k+1)/1000) is step k
    with torch.no_grad():
        check_close(score.eps(io["x"], t.float()), io["output"][:, :3])
        check_close(score.eps_index(io["x"], io["timesteps"]), io["output"][:, :3])  # what the solvers call
    assert score.discrete_time


@pytest.mark.parametrize("plugin, relpath", [("ddpmpp", "diffpure/score_sde/checkpoint_8.pth"),
                                             ("adm", "diffpure/guided_diffusion/256x256_diffusion_uncond.pt"),
                                             ("ddpm", "diffpure/sdedit/celeba_hq.ckpt")])
def test_missing_checkpoint_names_path_and_source(plugin, relpath, tmp_path, monkeypatch, plugin_manager):
    monkeypatch.setenv("BENCHKIT_HOME", str(tmp_path))
    with pytest.raises(BadInput) as exc:
        registry.get("score-models").get(plugin).build({})
    (line,) = exc.value.problems
    assert f"missing file {tmp_path / relpath}: get it from " in line and ("http" in line)


def test_diffpure_params_are_validated(plugin_manager):
    entry = registry.get("defenses").get("diffpure")
    with pytest.raises(BadInput, match=r"score_model: Value error, unknown score-model plugin 'digits-unte'; did you mean 'digits-unet'"):
        entry.validate({"score_model": "digits-unte"}, "d")
    with pytest.raises(BadInput, match="need 0 <= t_delta < t_star"):
        entry.validate({"score_model": "digits-unet", "t_star": 0.1, "t_delta": 0.2}, "d")
    with pytest.raises(BadInput, match="sampler: Input should be 'vp-sde', 'vp-ode', 'ld-sde', 'ddpm' or 'ddim'"):
        entry.validate({"score_model": "digits-unet", "sampler": "euler"}, "d")
    with pytest.raises(BadInput, match="per-call offsets the forward noise, which ld-sde does not have"):
        entry.validate({"score_model": "digits-unet", "sampler": "ld-sde", "t_delta": 0.01, "t_delta_mode": "per-call"}, "d")
    with pytest.raises(BadInput, match="whole steps of 0.001"):
        entry.validate({"score_model": "digits-unet", "t_delta": 0.0155, "t_delta_mode": "per-call"}, "d")
    with pytest.raises(BadInput, match="precision: Input should be 'fp32', 'fp16' or 'bf16'"):
        registry.get("score-models").get("adm").validate({"precision": "fp8"}, "score_params")
    p = entry.validate({"score_model": "digits-unet"}, "d")
    assert (p.sampler, p.ddim_eta, p.forward, p.clamp, p.t_delta_mode) == ("vp-sde", 0.0, "continuous", False, "per-image")


def test_resized_purifies_at_model_resolution_and_returns_input_size(one_thread):
    from benchkit.noise import PerExampleNoise
    from benchkit_diffpure.plugin import Resized
    from benchkit_diffpure.purifier import DiffPure

    seen = []

    class Spy(TinyConvScore):
        def eps(self, x, t):
            seen.append(tuple(x.shape[-2:]))
            return super().eps(x, t)

    x = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    x[:, :, :3], x[:, :, -3:] = 1.0, 0.0  # saturated rows: noise pushes them out of [0, 1]
    p = Resized(DiffPure(Spy(), t_star=0.01), 16)
    out = p.purify(x, gradient="none", noise=PerExampleNoise([1, 2]))
    assert out.shape == (2, 3, 12, 12) and set(seen) == {(16, 16)}
    assert float(out.min()) < 0 or float(out.max()) > 1  # not clamped: the authors' ImageNet path
    clamped = Resized(DiffPure(Spy(), t_star=0.01), 16, clamp=True)
    assert torch.equal(clamped.purify(x, gradient="none", noise=PerExampleNoise([1, 2])), out.clamp(0, 1))
    cos = p.gradient_agreement(x)  # the gradient-correctness check sees through the resize
    assert cos["exact"] == pytest.approx(1.0, abs=1e-5) and "adjoint" in cos


def test_gradient_agreement_reports_cosines(one_thread):
    from benchkit_diffpure.purifier import DiffPure

    pur, x = DiffPure(TinyConvScore(), t_star=0.05), torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    cos = pur.gradient_agreement(x)
    print(dict(cos), cos.reference)
    assert set(cos) == {"exact", "adjoint"} and cos.images == 2
    assert cos.reference == "exact vs central finite differences along 8 random directions per image, adjoint vs the exact gradient"
    assert cos["exact"] == pytest.approx(1.0, abs=1e-5)   # the true gradient, to float32 round-off
    assert 0.9 < cos["adjoint"] <= 1.0 + 1e-6              # a different discretisation of the backward
    full = pur.gradient_agreement(x, reference="autograd")  # the same numbers against the unrolled solver
    assert full.reference == "autograd through the unrolled solver"
    assert full["exact"] == pytest.approx(1.0, abs=1e-6) and full["adjoint"] == pytest.approx(cos["adjoint"], abs=1e-6)


def test_run_checks_assets_first_and_assets_prints_checklist(tmp_path, monkeypatch, plugin_manager, capsys):
    from benchkit.cli import main
    from conftest import write

    monkeypatch.setenv("BENCHKIT_HOME", str(tmp_path / "home"))
    suite = write(tmp_path / "s.yaml", """
suite: x
dataset: {plugin: digits, params: {n: 4}}
classifiers: [{id: c, plugin: digits-cnn}]
defenses: [{id: d, plugin: diffpure, params: {score_model: ddpmpp}}, {id: e, plugin: diffpure, params: {score_model: adm}}]
attacks: [{id: aa, plugin: autoattack}]
""")
    assert main(["run", str(suite), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == ("benchkit: error: 2 file(s) missing; nothing was run (`benchkit assets SUITE --download` "
                      "fetches what is published for download; or set BENCHKIT_HOME or the params' path):")
    assert f"[MISSING] {tmp_path}/home/diffpure/score_sde/checkpoint_8.pth  <- score_sde_pytorch" in err[1]
    assert "256x256_diffusion_uncond.pt" in err[2] and "2,211,383,297 bytes" in err[2] and "defenses[1]" in err[2]
    assert not (tmp_path / "o").exists()
    ckpt = tmp_path / "home" / "diffpure" / "score_sde" / "checkpoint_8.pth"
    write(ckpt, "x")
    assert main(["assets", str(suite)]) == 2
    out = capsys.readouterr().out.splitlines()
    # The shipped digits-cnn weights come first (present), then the two checkpoints.
    assert "digits_cnn.safetensors" in out[0] and out[0].startswith("[ok     ]")
    assert out[1].startswith(f"[ok     ] {ckpt}") and out[2].startswith("[MISSING]")
