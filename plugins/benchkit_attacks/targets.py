"""Targets and losses for targeted attacks, usable by any attack of this plugin.

A targeted attack pushes each image towards one chosen wrong class instead of away from its true
class. Two pieces, both pure functions:

  choose_targets(logits, y, n_classes, how, noise)   which wrong class each image aims at
  targeted_loss(loss_name, logits, target, y)        the per-image loss to MAXIMISE towards it

`targeted_loss_fn(loss_name, y)` packs the second into the `LossFn(logits, labels)` shape that
`DefendedModel.loss_and_grad` calls, with the targets passed where the labels usually go, so EOT
copies get their targets repeated like labels:

    target = choose_targets(model.mean_logits(x, n), y, n_classes, "second", ctx.noise)
    loss, grad = model.loss_and_grad(targeted_loss_fn("dlr", y), x_adv, target, eot)

The host still judges the result untargeted (robust iff the prediction is y): a targeted attack is
one more way to find a misclassification, as AutoAttack's APGD-T is.
"""
from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from benchkit.noise import Noise
from benchkit_attacks.losses import LossFn

TargetHow = Literal["random", "least-likely", "second"]
TARGET_HOWS: tuple[str, ...] = get_args(TargetHow)
TargetedLossName = Literal["ce", "cw", "dlr"]


def _check_labels(y: Tensor, n_classes: int) -> None:
    if n_classes < 2:
        raise ValueError(f"a targeted attack needs at least 2 classes, got n_classes={n_classes}")
    if y.dim() != 1:
        raise ValueError(f"y must hold one label per image ([B]), got shape {tuple(y.shape)}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= n_classes):
        raise ValueError(f"labels must lie in [0, {n_classes}), got min {int(y.min())} max {int(y.max())}")


def _without_true(logits: Tensor, y: Tensor, fill: float) -> Tensor:
    # Masking with +-inf (not subtracting a constant) so no logit value can make y win.
    return logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), fill)


def choose_targets(logits: Tensor | None, y: Tensor, n_classes: int, how: str, noise: Noise) -> Tensor:
    """One target class per image ([B], long, on y's device), never the true label y.

    how:
      "random"        uniform over the n_classes - 1 classes other than y. Drawn from `noise`, the
                      host's per-image streams (ctx.noise): image i's target comes from its own
                      stream only, so it does not depend on which images share the batch. The draw
                      consumes one number of each image's stream; `logits` may be None.
      "least-likely"  the class with the lowest logit other than y (Kurakin et al. 2017's
                      'least likely class'): the hardest target.
      "second"        the highest logit other than y: AutoAttack's first APGD-T / FAB-T target
                      (its target_class 2, the second-highest logit of a correctly classified image).

    `logits` ([B, n_classes]) are the clean prediction, e.g. DefendedModel.mean_logits(x, n) for a
    stochastic defense; required for "least-likely" and "second", ignored for "random".
    """
    _check_labels(y, n_classes)
    if how == "random":
        # float64 so u * (n - 1) < n - 1 holds after rounding; the clamp guards it anyway.
        u = noise.rand((y.shape[0],), device=y.device, dtype=torch.float64)
        k = (u * (n_classes - 1)).floor().long().clamp_(0, n_classes - 2)
        # Skip over y: k in [0, n-2] maps one-to-one onto the classes other than y.
        return k + (k >= y).long()
    if how not in TARGET_HOWS:
        raise ValueError(f"unknown target choice {how!r}; expected one of {TARGET_HOWS}")
    if logits is None:
        raise ValueError(f"target choice {how!r} needs the clean logits")
    if logits.shape != (y.shape[0], n_classes):
        raise ValueError(f"logits have shape {tuple(logits.shape)}, expected {(y.shape[0], n_classes)}")
    logits = logits.detach()
    if how == "least-likely":
        return _without_true(logits, y, float("inf")).argmin(1)
    return _without_true(logits, y, float("-inf")).argmax(1)


def top_targets(logits: Tensor, y: Tensor, k: int) -> Tensor:
    """[B, k] the k highest-logit classes other than y, best first: AutoAttack's APGD-T and FAB-T
    target list (n_target_classes = k, 9 in its standard version), for attacks that loop over
    targets. Column 0 is choose_targets(..., "second")."""
    _check_labels(y, logits.shape[1])
    if not 1 <= k <= logits.shape[1] - 1:
        raise ValueError(f"k must be in [1, {logits.shape[1] - 1}] (classes other than y), got {k}")
    return _without_true(logits.detach(), y, float("-inf")).topk(k, dim=1).indices


def _logit(logits: Tensor, idx: Tensor) -> Tensor:
    return logits.gather(1, idx[:, None]).squeeze(1)


def targeted_loss(loss_name: str, logits: Tensor, target: Tensor, y: Tensor | None = None) -> Tensor:
    """Per-image loss ([B]) that grows as `logits` move towards `target`: maximise it.

      ce   -CE(logits, target): the log-probability of the target.
      cw   z_target - max_{j != target} z_j (Carlini & Wagner's targeted margin, kappa = inf):
           positive exactly when the target is the top class.
      dlr  AutoAttack's targeted DLR (Croce & Hein 2020; pyautoattack's
           APGDAttack_targeted.dlr_loss_targeted): -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12),
           pi the classes sorted by decreasing logit, y the TRUE label (required). Scale-invariant;
           needs at least 4 classes.
    """
    if logits.dim() != 2 or target.shape != (logits.shape[0],):
        raise ValueError(f"expected logits [B, classes] and target [B], got {tuple(logits.shape)} and "
                         f"{tuple(target.shape)}")
    if loss_name == "ce":
        return -F.cross_entropy(logits, target, reduction="none")
    if loss_name == "cw":
        return _logit(logits, target) - _without_true(logits, target, float("-inf")).amax(1)
    if loss_name == "dlr":
        if y is None:
            raise ValueError("the targeted DLR loss needs the true labels y")
        if logits.shape[1] < 4:
            raise ValueError(f"the targeted DLR loss needs at least 4 classes, got {logits.shape[1]}")
        top = logits.sort(1, descending=True).values
        return -(_logit(logits, y) - _logit(logits, target)) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)
    raise ValueError(f"unknown targeted loss {loss_name!r}; expected one of {get_args(TargetedLossName)}")


def targeted_loss_fn(loss_name: str, y: Tensor | None = None) -> LossFn:
    """`targeted_loss` as a LossFn(logits, target) for DefendedModel.loss_and_grad / expectation:
    pass the targets where the labels go (they are repeated for EOT copies like labels). `y`, the
    true labels, is only needed by "dlr"; it is repeated to the rows of the logits, which must hold
    whole copies of the batch, repeat-major (how DefendedModel lays out EOT samples)."""
    if loss_name not in get_args(TargetedLossName):
        raise ValueError(f"unknown targeted loss {loss_name!r}; expected one of {get_args(TargetedLossName)}")
    if loss_name == "dlr" and y is None:
        raise ValueError("the targeted DLR loss needs the true labels y")

    def loss(logits: Tensor, target: Tensor) -> Tensor:
        true = None
        if y is not None:
            if logits.shape[0] % y.shape[0]:
                raise ValueError(f"{logits.shape[0]} rows of logits are not whole copies of {y.shape[0]} labels")
            true = y.repeat(logits.shape[0] // y.shape[0])
        return targeted_loss(loss_name, logits, target, true)

    return loss


def targeted_objective(loss_name: str, y: Tensor, target: Tensor) -> tuple[LossFn, Tensor]:
    """(loss_fn, labels) to hand to DefendedModel.loss_and_grad in place of an untargeted
    (loss_fn, y): the targeted loss towards `target`, with the targets as the labels it is called
    with (y, the true labels, kept for the DLR loss)."""
    if target.shape != y.shape:
        raise ValueError(f"target has shape {tuple(target.shape)}, expected {tuple(y.shape)} like y")
    return targeted_loss_fn(loss_name, y), target
