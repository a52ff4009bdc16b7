"""Score-model options: `compile` (torch.compile) next to `precision` (autocast), from the registry to the
built ScoreModel, and compiled outputs against eager."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from benchkit_diffpure.plugin import build_score_model
from benchkit_diffpure.score import ContinuousTimeScore
from conftest import SHARED, needs_shared

pytestmark = pytest.mark.usefixtures("one_thread")

# Inductor fuses and reorders float32 arithmetic: compiled eps stays within this fraction of eager's
# largest magnitude (measured: 1e-6 on digits-unet).
COMPILE_RTOL = 1e-5


class TinyNet(nn.Module):
    """A noise predictor net(x, label) of the plain kind (conv, GroupNorm, SiLU, time embedding)."""

    TIME_SCALE = 999.0

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.conv2 = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 1, 3, padding=1)
        self.norm, self.temb = nn.GroupNorm(2, 8), nn.Linear(1, 8)

    def forward(self, x, label):
        h = self.conv1(x) + self.temb(label.view(-1, 1) / 1000)[:, :, None, None]
        return self.conv2(nn.functional.silu(self.norm(h)))


@pytest.mark.slow   # inductor compiles C++: tens of seconds on one CPU thread
def test_compiled_eps_stays_within_tolerance_of_eager():
    eager = ContinuousTimeScore(TinyNet())
    compiled = ContinuousTimeScore(TinyNet(), compile=True)
    assert list(compiled.state_dict()) == list(eager.state_dict())   # checkpoints and digests unchanged
    g = torch.Generator().manual_seed(0)
    for batch in (4, 3, 6):   # a second size compiles a dynamic-shape graph that serves the third
        x, t = torch.randn(batch, 1, 8, 8, generator=g), torch.rand(batch, generator=g)
        for ctx in (torch.inference_mode, torch.enable_grad):
            with ctx():
                ref, out = eager.eps(x, t), compiled.eps(x, t)
            assert float((out - ref).abs().max()) <= COMPILE_RTOL * float(ref.abs().max())


def test_options_reach_the_zoo_score_model_through_the_registry(plugin_manager):
    score = build_score_model("digits-unet", {"precision": "bf16", "compile": True})
    assert (score.precision, score.compiled) == ("bf16", True)
    assert score.net._compiled_call_impl is not None   # compiled lazily, at the first call
    default = build_score_model("digits-unet", {})
    assert (default.precision, default.compiled) == ("fp32", False) and default.net._compiled_call_impl is None


def shared(fn):
    for mark in needs_shared(SHARED / "reference"):   # small reference configurations
        fn = mark(fn)
    return fn


@shared
@pytest.mark.parametrize("model", ["ddpmpp", "adm", "ddpm"])
def test_options_reach_the_published_score_models(model, tmp_path, plugin_manager):
    from standin import score_checkpoint   # random weights in the published file layouts

    params = score_checkpoint(model, 16, tmp_path)
    score = build_score_model(model, {**params, "precision": "bf16", "compile": True})
    assert (score.precision, score.compiled) == ("bf16", True) and score.net._compiled_call_impl is not None
    assert build_score_model(model, params).compiled is False
