"""AutoAttack's EOT in batches (benchkit_autoattack.plugin.BatchedEOT): each sample is what APGD's
sequential loop would compute with the same per-image noise, in ceil(n B / max_batch) passes instead of n."""
from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from benchkit.defended import DefendedModel, Purifier
from benchkit.noise import derive_seed

pytest.importorskip("pyautoattack")
from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted  # noqa: E402

from benchkit_autoattack import plugin  # noqa: E402

B, CLASSES = 4, 5


class Counted(Purifier):
    """Records the rows of every purifier pass."""

    gradient_modes = ("exact",)

    def __init__(self) -> None:
        super().__init__()
        self.passes: list[int] = []

    def _purify(self, x: Tensor, *, gradient: str, noise) -> Tensor:
        self.passes.append(x.shape[0])
        return self.transform(x, noise)


class Jitter(Counted):
    """sin(4x + 0.3 z): stochastic, and even the sign of its gradient depends on the draw."""

    stochastic = True

    def transform(self, x, noise):
        return torch.sin(4 * x + 0.3 * noise.randn_like(x))


class Square(Counted):
    def transform(self, x, noise):
        return x**2


def classifier() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, CLASSES)).eval()


def images() -> tuple[Tensor, Tensor, list[int]]:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(B, 1, 4, 4, generator=g)
    return x, torch.tensor([0, 1, 2, 3]), [derive_seed("eot-test", i) for i in range(B)]


def sequential(model: DefendedModel, x: Tensor, y: Tensor, criterion, n: int) -> list[tuple[Tensor, Tensor, Tensor]]:
    """APGD's own loop (pyautoattack, not is_tf_model): n model calls, one gradient each."""
    out = []
    for _ in range(n):
        xr = x.clone().requires_grad_(True)
        logits = model(xr)
        loss = criterion(logits, y)
        (g,) = torch.autograd.grad(loss.sum(), xr)
        out.append((logits.detach(), loss.detach(), g))
    return out


def batched(model: DefendedModel, apgd, x: Tensor, y: Tensor, loss: str, n: int) -> list[tuple[Tensor, Tensor, Tensor]]:
    """What APGD receives from n calls through the adapter."""
    adapter = plugin.BatchedEOT(model, apgd)
    xr = x.clone().requires_grad_(True)   # APGD's x_adv: one tensor for the n calls
    call = {"ce": adapter.get_logits_loss_grad_xent, "dlr": adapter.get_logits_loss_grad_dlr,
            "dlr-targeted": lambda z, t: adapter.get_logits_loss_grad_target(z, t, apgd.y_target)}[loss]
    return [call(xr, y) for _ in range(n)]


LOSSES = ["ce", "dlr", "dlr-targeted"]


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("purifier", [Jitter, Square])
def test_batched_samples_are_the_sequential_ones(purifier, loss: str) -> None:
    n, max_batch = 7, 12   # 3 copies of the 4 images per pass: passes of 3, 3, 1
    x, y, seeds = images()
    clf = classifier()
    apgd = (APGDAttack_targeted if loss == "dlr-targeted" else APGDAttack)(clf, eps=0.1, eot_iter=n)
    apgd.y_target = torch.tensor([4, 3, 0, 1]) if loss == "dlr-targeted" else None
    criterion = (nn.CrossEntropyLoss(reduction="none") if loss == "ce" else
                 apgd.dlr_loss if loss == "dlr" else apgd.dlr_loss_targeted)

    p_seq, p_bat = purifier(), purifier()
    seq = sequential(DefendedModel(clf, p_seq, max_batch=max_batch).for_images(x, seeds), x, y, criterion, n)
    bat = batched(DefendedModel(clf, p_bat, max_batch=max_batch).for_images(x, seeds), apgd, x, y, loss, n)

    for (lz, ll, lg), (bz, bl, bg) in zip(seq, bat):   # each sample: its own noise, its own gradient
        assert torch.allclose(lz, bz, atol=1e-6) and torch.allclose(ll, bl, atol=1e-6)
        assert torch.allclose(lg, bg, atol=1e-6)
    mean_seq = torch.stack([g for *_, g in seq]).mean(0)
    mean_bat = sum(g for *_, g in bat) / n   # what APGD averages
    assert mean_seq.abs().sum() > 0 and torch.allclose(mean_seq, mean_bat, atol=1e-6)
    assert p_seq.passes == [B] * n
    if purifier.stochastic:   # the same rows, in ceil(n B / max_batch) passes
        assert p_bat.passes == [12, 12, 4] and len(p_bat.passes) == math.ceil(n * B / max_batch)
        assert not torch.allclose(seq[0][2], seq[1][2])   # the samples differ: EOT is real here
    else:                     # a deterministic defense: one sample stands for all
        assert p_bat.passes == [B]


def test_a_new_iterate_draws_new_samples() -> None:
    x, y, seeds = images()
    clf, p = classifier(), Jitter()
    apgd = APGDAttack(clf, eps=0.1, eot_iter=2)
    adapter = plugin.BatchedEOT(DefendedModel(clf, p).for_images(x, seeds), apgd)
    first = x.clone().requires_grad_(True)
    adapter.get_logits_loss_grad_xent(first, y)
    second = x.clone().requires_grad_(True)   # a new x_adv before the queue is spent: drawn afresh
    adapter.get_logits_loss_grad_xent(second, y)
    adapter.get_logits_loss_grad_xent(second, y)
    assert p.passes == [2 * B, 2 * B]


def _run(monkeypatch, version: str, batched_eot: bool, eot: int = 3):
    """One AutoAttack version host-style (benchkit.evaluate.run_attack verifies the examples)."""
    from benchkit.evaluate import run_attack
    from benchkit.protocol import Protocol

    if not batched_eot:   # pyautoattack's own sequential loop
        monkeypatch.setattr(plugin, "_batch_eot", lambda apgd, model: None)
    x, _, _ = images()
    clf, p = classifier(), Jitter()
    with torch.no_grad():
        y = clf(torch.sin(4 * x)).argmax(1)
    params = plugin.AutoAttackParams(eps=0.05, versions=[version], eot=eot, n_iter=4, n_target_classes=2)
    attack = plugin.AutoAttackSuite(params)
    ctx = {"device": torch.device("cpu"), "undefended": clf, "batch_size": B, "protocol": Protocol()}
    model = DefendedModel(clf, p, max_batch=2 * B)
    (variant, x_adv, _, result), = run_attack(model, attack, plugin.autoattack_threat(params), x, y,
                                              list(range(B)), ctx, ("eot-test",))
    monkeypatch.undo()
    return x_adv, result.verdict, p.passes


@pytest.mark.parametrize("version", ["rand", "apgd-t"])
def test_autoattack_with_batched_eot_is_its_sequential_run(monkeypatch, version: str) -> None:
    """The same examples and verdicts as pyautoattack's sequential EOT loop (the same noise per
    sample), from fewer purifier passes of more rows."""
    x_seq, v_seq, passes_seq = _run(monkeypatch, version, batched_eot=False)
    x_bat, v_bat, passes_bat = _run(monkeypatch, version, batched_eot=True)
    assert x_bat.shape == (B, 1, 4, 4) and (x_bat - images()[0]).abs().max() <= 0.05 + 1e-6
    assert torch.allclose(x_seq, x_bat, atol=1e-5) and torch.equal(v_seq, v_bat)
    assert sum(passes_bat) == sum(passes_seq) and len(passes_bat) < len(passes_seq) and max(passes_bat) > B


class CappedJitter(Jitter):
    """Jitter whose passes above 8 rows run out of memory (after drawing their noise, so a retry that
    did not re-bind its streams would draw other samples)."""

    def _purify(self, x: Tensor, *, gradient: str, noise) -> Tensor:
        out = super()._purify(x, gradient=gradient, noise=noise)
        if x.shape[0] > 8:
            raise torch.OutOfMemoryError(f"simulated: {x.shape[0]} rows > 8")
        return out


def test_a_pass_out_of_memory_runs_as_halves_with_the_same_samples() -> None:
    n = 7
    x, y, seeds = images()
    clf = classifier()
    apgd = APGDAttack(clf, eps=0.1, eot_iter=n)
    criterion = nn.CrossEntropyLoss(reduction="none")
    seq = sequential(DefendedModel(clf, Jitter(), max_batch=12).for_images(x, seeds), x, y, criterion, n)
    capped = CappedJitter()
    model = DefendedModel(clf, capped, max_batch=12).for_images(x, seeds)
    bat = batched(model, apgd, x, y, "ce", n)
    for (lz, ll, lg), (bz, bl, bg) in zip(seq, bat):
        assert torch.allclose(lz, bz, atol=1e-6) and torch.allclose(lg, bg, atol=1e-6)
    # 12 rows failed, then 8 (2 copies), 4 (1); the remembered size keeps the rest at 8 rows.
    assert capped.passes[:3] == [12, 8, 4] and max(capped.passes[3:]) == 8
    assert model.max_batch == 8 and model.limits.take()["eot_rows"] == {"from": 12, "to": 8}
