"""benchkit.evaluate: the host's verification of an attack's result, rule by rule."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from benchkit.attack import AttackResult
from benchkit.evaluate import CellFailure, check_result
from benchkit.threat import L2, Linf

X = torch.rand(4, 1, 3, 3, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.25


@pytest.mark.parametrize("result, rule", [
    (None, "returned NoneType, not an AttackResult"),
    (X, "returned Tensor, not an AttackResult"),
    (AttackResult(X.numpy()), "x_adv is a numpy.ndarray, not a torch tensor"),
    (AttackResult(X.half()), "x_adv has dtype torch.float16, expected torch.float32"),
    (AttackResult(X.double()), "x_adv has dtype torch.float64, expected torch.float32"),
    (AttackResult(X[:3]), "x_adv has shape (3, 1, 3, 3), expected (4, 1, 3, 3)"),
    (AttackResult(X.clone(), extra={"flow": np.zeros(4)}), "extra must map names to tensors"),
    (AttackResult(X + float("nan")), "4 example(s) contain NaN or inf"),
    (AttackResult(X + 0.2), "exceed Linf eps=0.1 (max 0.2)"),
    (AttackResult((X - 0.3).clamp(-0.01, 1)), "values outside [0, 1]"),
])
def test_each_rule_fails_with_one_line(result, rule):
    with pytest.raises(CellFailure) as exc:
        check_result(result, X, Linf(0.1))
    assert rule in str(exc.value) and "\n" not in str(exc.value)


def test_valid_examples_pass_detached_and_at_the_budget():
    x_adv = (X + 0.1).requires_grad_(True)
    out, extra = check_result(AttackResult(x_adv), X, Linf(0.1))
    assert not out.requires_grad and extra == {} and torch.equal(out, x_adv.detach())
    d = torch.randn_like(X)
    on_sphere = X + 0.5 * d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    check_result(AttackResult(on_sphere.clamp(0, 1)), X, L2(0.5))
