"""Budgets, accuracy summaries and threat-model verification against hand-computed values."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import BaseModel, ValidationError

from benchkit import metrics
from benchkit.params import Budget
from benchkit.threat import L2, Linf, StAdvFlow, TOLERANCE, warp


class P(BaseModel):
    eps: Budget


@pytest.mark.parametrize("raw, value", [("8/255", 8 / 255), (0.5, 0.5), ("0.25", 0.25), (1, 1.0)])
def test_budget_parses(raw, value):
    assert P(eps=raw).eps == pytest.approx(value, abs=0)


@pytest.mark.parametrize("raw", ["8//255", "x", "-1", True, "1/0"])
def test_budget_rejects(raw):
    with pytest.raises(ValidationError):
        P(eps=raw)


def test_accuracy_summaries():
    # 4 images x 3 repeats; per-repeat accuracies 50%, 50%, 75%
    m = metrics.flags_matrix(["111", "101", "011", "000"])
    a = metrics.accuracy(m)
    assert a.mean == pytest.approx((50 + 50 + 75) / 3)
    assert a.std == pytest.approx(np.std([50, 50, 75], ddof=1))
    assert a.worst == 25.0          # only image 0 correct every time
    assert a.majority == 75.0       # images 0, 1 and 2 (2 of 3 repeats)


def test_worst_case_over_variants_is_per_image():
    a = metrics.flags_matrix(["1", "1", "0", "1"])
    b = metrics.flags_matrix(["1", "0", "1", "1"])
    # min of the two accuracies would say 75%; the per-image worst case is 50%
    assert metrics.accuracy(metrics.worst_case([a, b])).mean == 50.0


def test_linf_and_l2_verification():
    x = torch.full((2, 1, 4, 4), 0.5)
    ok = x + 0.1
    assert Linf(0.1).violations(x, ok) == []
    assert "exceed" in Linf(0.1).violations(x, x + 0.1 + 10 * TOLERANCE)[0]
    assert "NaN" in Linf(0.1).violations(x, ok.clone().fill_(float("nan")))[0]
    assert "outside [0, 1]" in Linf(1.0).violations(x, x + 0.6)[0]
    delta = torch.zeros_like(x)
    delta[:, 0, 0, 0] = 0.3
    delta[:, 0, 0, 1] = 0.4
    assert L2(0.5).distance(x, x + delta).tolist() == pytest.approx([0.5, 0.5])
    assert L2(0.5).violations(x, x + delta) == []
    proj = L2(0.25).project(x, x + delta)
    assert L2(0.25).distance(x, proj).tolist() == pytest.approx([0.25, 0.25])


def test_stadv_flow_verification():
    torch.manual_seed(0)
    x = torch.rand(2, 1, 8, 8)
    assert torch.allclose(warp(x, torch.zeros(2, 2, 8, 8)), x, atol=1e-6)
    flow = (torch.rand(2, 2, 8, 8) - 0.5) * 0.1
    threat = StAdvFlow(0.05)
    assert threat.violations(x, warp(x, flow), {"flow": flow}) == []
    assert "exceed" in threat.violations(x, warp(x, 2 * flow), {"flow": 2 * flow})[0]
    assert "warped" in threat.violations(x, warp(x, flow) * 0.9, {"flow": flow})[0]
    assert "exceed" in threat.violations(x, x, None)[0]  # no flow returned: unverifiable
