"""Registers DiffPure, the score-models kind it owns, and the published score models.

Official checkpoints are looked up under BENCHKIT_HOME (never downloaded); each factory builds
the architecture from our own code and loads the published weights without key renaming. Other
plugins add score models through this plugin's hook (benchkit_diffpure.hookspecs), e.g. the zoo's
digits-unet.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field, field_validator, model_validator

from benchkit import registry
from benchkit.assets import Asset, load_into, load_state_dict
from benchkit.defended import Purifier
from benchkit.errors import BadInput
from benchkit.hookspecs import hookimpl
from benchkit.noise import Noise
from benchkit.params import Params

if TYPE_CHECKING:
    from benchkit_diffpure.score import ScoreModel

# Published checkpoints and the configurations DiffPure uses with them.
# Addresses: NVlabs/DiffPure's README ("pre-trained diffusion models"). None of the three publishers gives
# a digest: `benchkit assets --download` records the sha256 of what it receives (BENCHKIT_HOME/sha256sums).
DDPMPP_ASSET = Asset("diffpure/score_sde/checkpoint_8.pth",
                     "score_sde_pytorch's release, vp/cifar10_ddpmpp_deep_continuous/checkpoints/checkpoint_8.pth "
                     "(https://github.com/yang-song/score_sde_pytorch)",
                     # a Google Drive file (DiffPure's README link): gdown fetches it, else a manual step
                     url="https://drive.google.com/file/d/16_-Ahc6ImZV5ClUc0vM5Iivf8OJ1VSif/view?usp=sharing")
# Size: 2,211,383,297 bytes (as DiffBreak's mirror of the same file also records). A third-party
# sha256 (Disco Diffusion's check_model_SHA, 983e3de6...) is not declared: not the publisher's.
ADM_ASSET = Asset("diffpure/guided_diffusion/256x256_diffusion_uncond.pt",
                  "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/256x256_diffusion_uncond.pt",
                  size=2_211_383_297,
                  url="https://openaipublic.blob.core.windows.net/diffusion/jul-2021/256x256_diffusion_uncond.pt")
CELEBAHQ_ASSET = Asset("diffpure/sdedit/celeba_hq.ckpt",
                       "https://image-editing-test-12345.s3-us-west-2.amazonaws.com/checkpoints/celeba_hq.ckpt "
                       "(SDEdit, https://github.com/ermongroup/SDEdit)",
                       url="https://image-editing-test-12345.s3-us-west-2.amazonaws.com/checkpoints/celeba_hq.ckpt")

DDPMPP_CONFIG = {"data": {"image_size": 32, "num_channels": 3, "centered": True},
                 "model": {"name": "ncsnpp", "nf": 128, "ch_mult": [1, 2, 2, 2], "num_res_blocks": 8,
                           "attn_resolutions": [16], "resamp_with_conv": True, "conditional": True, "fir": False,
                           "fir_kernel": [1, 3, 3, 1], "skip_rescale": True, "resblock_type": "biggan",
                           "progressive": "none", "progressive_input": "none", "progressive_combine": "sum",
                           "attention_type": "ddpm", "init_scale": 0.0, "embedding_type": "positional",
                           "fourier_scale": 16, "conv_size": 3, "dropout": 0.1, "normalization": "GroupNorm",
                           "nonlinearity": "swish", "scale_by_sigma": False, "sigma_min": 0.01, "sigma_max": 50,
                           "num_scales": 1000, "beta_min": 0.1, "beta_max": 20.0}}
ADM_CONFIG = {"image_size": 256, "num_channels": 256, "num_res_blocks": 2, "num_heads": 4, "num_heads_upsample": -1,
              "num_head_channels": 64, "attention_resolutions": "32,16,8", "channel_mult": "", "dropout": 0.0,
              "class_cond": False, "use_checkpoint": False, "use_scale_shift_norm": True, "resblock_updown": True,
              "use_fp16": False, "use_new_attention_order": False, "learn_sigma": True}
CELEBAHQ_CONFIG = {"data": {"image_size": 256, "channels": 3},
                   "model": {"type": "simple", "in_channels": 3, "out_ch": 3, "ch": 128, "ch_mult": [1, 1, 2, 2, 4, 4],
                             "num_res_blocks": 2, "attn_resolutions": [16], "dropout": 0.0, "resamp_with_conv": True},
                   "diffusion": {"num_diffusion_timesteps": 1000}}


class CheckpointParams(Params):
    path: str | None = Field(None, description="checkpoint file (default: the expected path under BENCHKIT_HOME)")
    config: dict[str, Any] | None = Field(None, description="architecture config overriding the published one (with "
                                                            "`path`, your own model: the file is not held to the "
                                                            "published size and sha256)")
    precision: Literal["fp32", "fp16", "bf16"] = Field(
        "fp32", description="network arithmetic (torch.autocast; eps returned in float32). The authors run "
                            "ImageNet's ADM in fp16 (use_fp16), CIFAR-10 and CelebA-HQ in fp32. On a CPU with "
                            "AMX bf16 is faster and fp16 slower (README, Performance)")
    compile: bool = Field(False, description="torch.compile the network (inductor): the first call compiles "
                                             "(seconds to minutes), later ones are faster on CPU (README, "
                                             "Performance); outputs agree with eager to float round-off")


def _checkpoint(asset: Asset, p: CheckpointParams) -> tuple[Path, Any]:
    """The checked file and what it holds (one-line errors for a missing, empty, wrongly sized,
    truncated or unsafe file), read before the network is built: a bad file fails in a moment."""
    # Another architecture with a file of one's own is not the published model: only its presence counts.
    path = asset.require(p.path, published=not (p.config and p.path))
    return path, load_state_dict(path)


def _architecture(build, config: dict, id: str) -> torch.nn.Module:
    try:
        return build(config)
    except (ValueError, KeyError, TypeError) as exc:   # a `config` override the architecture does not take
        raise BadInput(f"score model '{id}': config: {type(exc).__name__}: {exc}") from None


def ddpmpp(p: CheckpointParams):
    from benchkit_diffpure.architectures.ncsnpp import NCSNpp, load_score_sde_checkpoint
    from benchkit_diffpure.score import ContinuousTimeScore

    path, state = _checkpoint(DDPMPP_ASSET, p)
    net = _architecture(NCSNpp.from_config, p.config or DDPMPP_CONFIG, "ddpmpp")
    load_score_sde_checkpoint(net, state, source=path, what="the ddpmpp architecture")
    return ContinuousTimeScore(net, precision=p.precision, compile=p.compile)


def adm(p: CheckpointParams):
    from benchkit_diffpure.architectures.guided_unet import GuidedUNet
    from benchkit_diffpure.score import DiscreteTimeScore

    path, state = _checkpoint(ADM_ASSET, p)
    net = _architecture(GuidedUNet.from_config, p.config or ADM_CONFIG, "adm")
    load_into(net, state, path, "the adm architecture")
    return DiscreteTimeScore(net, eps_channels=3, precision=p.precision, compile=p.compile)


def ddpm(p: CheckpointParams):
    from benchkit_diffpure.architectures.ddpm_unet import DDPMUNet
    from benchkit_diffpure.score import DiscreteTimeScore

    path, state = _checkpoint(CELEBAHQ_ASSET, p)
    net = _architecture(DDPMUNet.from_config, p.config or CELEBAHQ_CONFIG, "ddpm")
    # SDEdit's celeba_hq.ckpt is a bare state dict; some copies are wrapped in a list or DataParallel.
    if isinstance(state, (list, tuple)) and state:
        state = state[0]
    if isinstance(state, dict):
        state = {k.removeprefix("module.") if isinstance(k, str) else k: v for k, v in state.items()}
    load_into(net, state, path, "the ddpm architecture")
    return DiscreteTimeScore(net, eps_channels=3, precision=p.precision, compile=p.compile)


def build_score_model(id: str, params: dict[str, Any]) -> ScoreModel:
    """The registered score model `id` as a ScoreModel: a plain noise predictor registered by
    another plugin (see hookspecs.register_score_models) is wrapped in ContinuousTimeScore, with the
    wrapper's options `precision` and `compile` where its params model declares them."""
    from benchkit_diffpure.score import ContinuousTimeScore, ScoreModel

    entry = registry.get("score-models").get(id)
    p = entry.validate(params, "params")
    model = entry.build(p)
    if isinstance(model, ScoreModel):
        return model
    scale = getattr(model, "TIME_SCALE", None)
    if not isinstance(model, torch.nn.Module) or scale is None:
        raise BadInput(f"score model '{id}': its factory returned {type(model).__name__}, neither a ScoreModel "
                       "nor an nn.Module noise predictor with a TIME_SCALE attribute")
    return ContinuousTimeScore(model, label_scale=float(scale), precision=getattr(p, "precision", "fp32"),
                               compile=getattr(p, "compile", False))


class DiffPureParams(Params):
    score_model: str = Field(description="id of a registered score model (benchkit ls score-models)")
    score_params: dict[str, Any] = Field(default_factory=dict)
    sampler: Literal["vp-sde", "vp-ode", "ld-sde", "ddpm", "ddim"] = Field(
        "vp-sde", description="reverse VP-SDE, probability-flow ODE, Langevin (paper Eq. 4, 28, 26), the DDPM "
                              "ancestral chain (the authors' CelebA-HQ runner) or DDIM; see solver.py")
    t_star: float = Field(0.1, gt=0, le=1, description="diffusion time t*")
    t_delta: float = Field(0.0, ge=0, description="randomised t* in [t* - delta, t* + delta] (paper Table 13)")
    t_delta_mode: Literal["per-image", "per-call"] = Field(
        "per-image", description="per-image: each image draws t* ~ U for its noise and its solve; per-call: the "
                                 "authors' one integer step offset per call, forward noise only")
    dt: float = Field(1e-3, gt=0, le=0.1, description="solver step (t* = 0.1 -> 100 score evaluations); ddpm / "
                                                      "ddim take round(t*/dt) evenly spaced integer steps, "
                                                      "dt = 1e-3 being the full chain")
    ddim_eta: float = Field(0.0, ge=0, le=1, description="DDIM noise: 0 deterministic, 1 = ddpm's ancestral step")
    forward: Literal["continuous", "discrete"] = Field(
        "continuous", description="forward noising (Eq. 3) with the VP-SDE's alpha(t*) or, as the authors' code, "
                                  "the discrete 1000-step alpha-bar (always discrete for discrete-time score "
                                  "models and for ddpm / ddim)")
    clamp: bool = Field(False, description="clamp the purified image to [0, 1] (the authors do not; a clamp "
                                           "zeroes the gradient of saturated pixels)")
    ld_sigma2: float = Field(100.0, gt=0)
    ld_lambda: float = Field(0.1, gt=0)
    ld_eta: float = Field(1.0, ge=0)
    image_size: int | None = Field(None, ge=8, description="resize inputs to this size for the score model and back "
                                                             "(ImageNet 224 -> ADM 256)")

    @field_validator("score_model")
    @classmethod
    def _known(cls, v: str) -> str:
        try:
            registry.get("score-models").get(v)
        except BadInput as exc:  # pydantic reports ValueErrors with the key's location
            raise ValueError(exc.problems[0]) from None
        return v

    @model_validator(mode="after")
    def _window(self):
        if not self.t_delta < self.t_star or self.t_star + self.t_delta > 1:
            raise ValueError(f"need 0 <= t_delta < t_star and t_star + t_delta <= 1 (t_star={self.t_star}, t_delta={self.t_delta})")
        if self.t_delta_mode == "per-call" and self.t_delta > 0:
            if self.sampler == "ld-sde":
                raise ValueError("t_delta_mode per-call offsets the forward noise, which ld-sde does not have")
            if abs(self.t_delta * 1000 - round(self.t_delta * 1000)) > 1e-6:
                raise ValueError(f"t_delta_mode per-call offsets whole steps of 0.001: t_delta={self.t_delta}")
        return self


class Resized(Purifier):
    """Purify at the score model's resolution: bilinear resize in, purify, resize back (as the authors'
    ImageNet 224 -> 256 -> 224); clamped to [0, 1] only if clamp (the authors do not)."""

    def __init__(self, inner: Purifier, size: int, clamp: bool = False):
        super().__init__()
        self.inner, self.size, self.clamp = inner, size, clamp
        self.stochastic, self.gradient_modes = inner.stochastic, inner.gradient_modes

    @staticmethod
    def _resize(im, s: int):
        return torch.nn.functional.interpolate(im, size=(s, s), mode="bilinear", align_corners=False, antialias=False)

    def _purify(self, x, *, gradient: str, noise: Noise):
        out = self._resize(self.inner._purify(self._resize(x, self.size), gradient=gradient, noise=noise), x.shape[-1])
        return out.clamp(0, 1) if self.clamp else out

    def deviation_pairs(self, x, *, noise: Noise, states: int, gradient: str = "exact"):
        """The inner DiffPure's (pairs at the score model's resolution), the purified image resized back."""
        out, pairs = self.inner.deviation_pairs(self._resize(x, self.size), noise=noise, states=states, gradient=gradient)
        out = self._resize(out, x.shape[-1])
        return (out.clamp(0, 1) if self.clamp else out), pairs

    def surrogate(self, kind: str, **options) -> "Resized":
        return Resized(self.inner.surrogate(kind, **options), self.size, clamp=self.clamp)

    def gradient_agreement(self, x, seed: int = 0, **kw):
        from benchkit_diffpure.purifier import gradient_agreement

        return gradient_agreement(self._purify, self.gradient_modes, x, seed, **kw)


def diffpure(p: DiffPureParams) -> Purifier:
    from benchkit_diffpure.purifier import DiffPure

    score = build_score_model(p.score_model, p.score_params)
    purifier = DiffPure(score, sampler=p.sampler, t_star=p.t_star, t_delta=p.t_delta, dt=p.dt,
                        ld_sigma2=p.ld_sigma2, ld_lambda=p.ld_lambda, ld_eta=p.ld_eta, ddim_eta=p.ddim_eta,
                        forward=p.forward, clamp=p.clamp, t_delta_mode=p.t_delta_mode)
    return Resized(purifier, p.image_size, clamp=p.clamp) if p.image_size else purifier


def _needs(asset: Asset):
    return lambda p: [(asset, p.path)]


def diffpure_assets(p: DiffPureParams) -> list:
    entry = registry.get("score-models").get(p.score_model)
    return entry.assets(entry.validate(p.score_params, "score_params")) if entry.assets else []


@hookimpl
def register_score_models(register):
    register("ddpmpp", ddpmpp, params=CheckpointParams, assets=_needs(DDPMPP_ASSET),
             description="score_sde NCSN++ (DDPM++ deep, continuous VP), CIFAR-10 32x32: checkpoint_8.pth")
    register("adm", adm, params=CheckpointParams, assets=_needs(ADM_ASSET),
             description="guided-diffusion 256x256 unconditional ImageNet (learned sigma), discrete steps")
    register("ddpm", ddpm, params=CheckpointParams, assets=_needs(CELEBAHQ_ASSET),
             description="SDEdit's CelebA-HQ 256x256 DDPM U-Net, discrete steps")


@hookimpl
def register_component_kinds(register):
    from benchkit_diffpure import hookspecs

    register("score-models", hookspecs=hookspecs, hook="register_score_models",
             description="diffusion score models that DiffPure defenses look up by id")


def diffpure_modes(p: DiffPureParams) -> tuple[str, ...]:
    """What the built DiffPure will declare, known from the params before any model is built."""
    from benchkit_diffpure.purifier import defense_modes

    return defense_modes(p.sampler)


@hookimpl
def register_defenses(register):
    register("diffpure", diffpure, params=DiffPureParams, assets=diffpure_assets, gradient_modes=diffpure_modes,
             description="DiffPure (Nie et al. 2022): forward diffusion to t*, reverse VP-SDE / VP-ODE / LD-SDE / "
                         "DDPM / DDIM")
