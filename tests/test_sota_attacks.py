"""The attacks at today's state of the art (DiffAttack, DiffHammer, targeted PGD-EOT, surrogate
gradients, APGD, best-iterate selection), each where its answer is known: it drives an undefended
classifier to 0%, its loss rises over the iterations (it maximises), and its gradient matches
central finite differences on a small solver (float64, the same noise)."""
from __future__ import annotations

import json
import sqlite3

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchkit import registry
from benchkit.attack import AttackResult
from benchkit.cli import main
from benchkit.defended import DefendedModel
from benchkit.evaluate import CellFailure, check_result
from benchkit.noise import PerExampleNoise
from benchkit.protocol import Protocol
from benchkit.threat import Linf
from benchkit_attacks.apgd import apgd, checkpoints
from benchkit_attacks.diffattack import DiffAttackLoss, DiffAttackParams
from benchkit_attacks.diffhammer import em_gradient, grafted_gradient, purify_samples
from benchkit_attacks.iterates import BestIterate
from benchkit_attacks.losses import ce_loss
from benchkit_diffpure import sde
from benchkit_diffpure.purifier import DiffPure
from conftest import write
from diffpure_helpers import TinyConvScore
from test_attacks import accuracy, build, cnn, data, run  # noqa: F401 - fixtures

pytestmark = pytest.mark.usefixtures("one_thread")

# ---------------------------------------------------------------- a small solver in float64

SEEDS = [11, 12, 13]


def tiny_diffpure(**kw) -> DiffPure:
    return DiffPure(TinyConvScore(seed=0).double(), sampler="vp-sde", t_star=0.1, dt=0.02, **kw)   # 5 steps


def tiny_head(classes: int = 4) -> nn.Module:
    head = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, classes)).double()
    with torch.no_grad():
        head[1].weight.copy_(torch.randn(classes, 192, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    return head.eval().requires_grad_(False)


def tiny_batch() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.rand(3, 3, 8, 8, generator=g, dtype=torch.float64), torch.tensor([0, 2, 3])


def directional_check(loss_at, grad: Tensor, x: Tensor, directions: int = 4, h: float = 1e-4) -> None:
    """<grad, u> against (L(x + h u) - L(x - h u)) / 2h along random directions u."""
    g = torch.Generator().manual_seed(9)
    for _ in range(directions):
        u = torch.randn(x.shape, generator=g, dtype=x.dtype)
        fd = (loss_at(x + h * u) - loss_at(x - h * u)) / (2 * h)
        assert float((grad * u).sum()) == pytest.approx(float(fd), rel=1e-5, abs=1e-9)


# ---------------------------------------------------------------- APGD


def test_apgd_checkpoints_are_autoattacks() -> None:
    # AutoAttack's APGD with 100 iterations halves its step at most at these iterations.
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]


def test_apgd_reaches_the_maximum_of_a_concave_objective_and_its_loss_rises() -> None:
    x = torch.full((2, 1, 3, 3), 0.5)
    c = torch.tensor([0.9, 0.1]).view(2, 1, 1, 1).expand_as(x)   # outside the ball of eps 0.1
    threat, seen = Linf(0.1), []
    objective = lambda z: (-((z - c) ** 2).flatten(1).sum(1), -2 * (z - c))
    out = apgd(objective, x, threat, steps=30, noise=PerExampleNoise([1, 2]),
               callback=lambda step, z, loss, g: seen.append(loss))
    assert torch.allclose(out.x_adv, threat.project(x, c), atol=1e-4)   # the projection of c is the maximum
    assert len(seen) == 31 and bool((seen[-1] > seen[0]).all())


# ---------------------------------------------------------------- undefended: every attack reaches 0%


@pytest.mark.parametrize("attack_id, params", [
    ("diffattack", {"eps": 0.3, "steps": 20, "eot": 1}),
    ("diffhammer", {"eps": 0.3, "steps": 20, "restarts": 1, "n": 2}),
    ("pgd-eot", {"eps": 0.3, "steps": 20, "eot": 1, "targeted": "random"}),
    ("pgd-eot", {"eps": 0.3, "steps": 20, "eot": 1, "targeted": "second", "loss": "dlr"}),
])
def test_attack_drives_the_undefended_classifier_to_zero(cnn, data, attack_id, params) -> None:
    x, y = data
    attack = build(attack_id, **params)
    model = DefendedModel(cnn)
    for _, sub in attack.variants():
        result = run(model, sub, x, y, threat=Linf(params["eps"]))
        assert accuracy(model, result.x_adv, y) == 0.0


def test_targeted_pgd_reaches_its_targets(cnn, data) -> None:
    x, y = data
    result = run(DefendedModel(cnn), build("pgd-eot", eps=0.3, steps=30, eot=1, targeted="second", loss="cw"), x, y)
    with torch.no_grad():
        second = cnn(x).masked_fill(F.one_hot(y, 10).bool(), float("-inf")).argmax(1)
        assert float((cnn(result.x_adv).argmax(1) == second).float().mean()) >= 0.95


# ---------------------------------------------------------------- on the digits DiffPure: the loss rises


@pytest.fixture(scope="module")
def digits_diffpure():
    from benchkit import plugins

    plugins.get_plugin_manager()
    return registry.get("defenses").get("diffpure").build({"score_model": "digits-unet", "t_star": 0.1, "dt": 0.02})


@pytest.mark.parametrize("attack_id, params", [
    ("diffattack", {"eps": 0.15, "steps": 8, "eot": 2, "losses": ["ce"]}),
    ("diffhammer", {"eps": 0.15, "steps": 8, "restarts": 1, "n": 4, "losses": ["ce"]}),
])
def test_attack_loss_rises_through_diffpure(cnn, data, digits_diffpure, attack_id, params) -> None:
    x, y = data[0][:8], data[1][:8]
    attack, seen = build(attack_id, **params), []
    (_, sub), = attack.variants()
    sub.callback = lambda step, z, loss, g: seen.append(float(loss.mean()))
    result = run(DefendedModel(cnn, digits_diffpure), sub, x, y, threat=Linf(params["eps"]))
    assert len(seen) == params["steps"] + 1
    assert max(seen[-3:]) > seen[0] + 0.1
    assert result.stats["nonfinite_grad_frac"] == 0.0


# ---------------------------------------------------------------- DiffAttack


def test_deviation_pairs_are_the_reverse_states_and_the_forward_diffused_input() -> None:
    purifier, (x, _) = tiny_diffpure(), tiny_batch()
    out, pairs = purifier.deviation_pairs(x, noise=PerExampleNoise(SEEDS), states=5)
    same = purifier.purify(x, gradient="exact", noise=PerExampleNoise(SEEDS))
    assert torch.allclose(out, same, atol=1e-12) and len(pairs) == 5
    # State 0 is x(t*) itself, and every reference is the input diffused with the one Eq. 3 noise.
    assert torch.allclose(pairs[0][0], pairs[0][1], atol=1e-12)
    eps = (pairs[0][1] - sde.alpha(torch.tensor(0.1, dtype=torch.float64)).sqrt() * sde.to_centered(x)) \
        / (1 - sde.alpha(torch.tensor(0.1, dtype=torch.float64))).sqrt()
    t2 = torch.tensor(0.1 * (1 - 2 / 5), dtype=torch.float64)
    assert torch.allclose(pairs[2][1], sde.alpha(t2).sqrt() * sde.to_centered(x) + (1 - sde.alpha(t2)).sqrt() * eps)


@pytest.mark.parametrize("lambda_dev", [0.0, 1.0])
def test_diffattack_gradient_matches_finite_differences(lambda_dev) -> None:
    purifier, head, (x, y) = tiny_diffpure(), tiny_head(), tiny_batch()
    params = DiffAttackParams(eps=0.1, eot=2, lambda_dev=lambda_dev, deviation_states=5)
    attack = DiffAttackLoss(params, "ce")

    def objective():  # fresh generators: the same noise at every evaluation
        return attack.objective(DefendedModel(head, purifier, noise=PerExampleNoise(SEEDS)), y)

    loss, grad = objective()(x)
    directional_check(lambda z: objective()(z)[0].sum(), grad, x)
    if lambda_dev:   # the deviation term is really in the loss
        plain = DiffAttackLoss(params.model_copy(update={"lambda_dev": 0.0}), "ce")
        base, _ = plain.objective(DefendedModel(head, purifier, noise=PerExampleNoise(SEEDS)), y)(x)
        assert bool((loss > base + 1e-6).all())


@pytest.mark.parametrize("loss", ["ce", "cw", "dlr"])
def test_targeted_pgd_gradient_matches_finite_differences(loss) -> None:
    from benchkit_attacks.targets import targeted_objective

    purifier, head, (x, y) = tiny_diffpure(), tiny_head(), tiny_batch()
    loss_fn, labels = targeted_objective(loss, y, torch.tensor([1, 0, 2]))
    at = lambda z: DefendedModel(head, purifier, noise=PerExampleNoise(SEEDS)).loss_and_grad(loss_fn, z, labels, 2)
    _, grad = at(x)
    directional_check(lambda z: at(z)[0].sum(), grad, x)


# ---------------------------------------------------------------- DiffHammer


def em_by_hand(loss: Tensor, g: Tensor, eps: float, lam: float) -> tuple[int, list[float], Tensor]:
    """One image: a* = argmax_a sum_i ELU(L_i + eps <sign g_a, g_i>), q_i = sigmoid(lam (L_i + eps
    <sign g_a*, g_i>)), g~ = sum q_i g_i / sum q_i, with plain loops."""
    n = loss.shape[0]
    gain = lambda a, i: float((g[a, 0].sign() * g[i, 0]).sum())
    score = [sum(F.elu(torch.tensor(float(loss[i, 0]) + eps * gain(a, i))).item() for i in range(n)) for a in range(n)]
    a = max(range(n), key=lambda k: score[k])
    q = [torch.sigmoid(torch.tensor(lam * (float(loss[i, 0]) + eps * gain(a, i)))).item() for i in range(n)]
    return a, q, sum(q[i] * g[i, 0] for i in range(n)) / sum(q)


@pytest.mark.parametrize("loss, g, reach", [
    # Sample 0 is broken (margin 3, gradient e0); sample 1 is still correct (margin -2) and its gradient
    # is orthogonal: out of reach of the common step, it weighs nothing.
    ([[3.0], [-2.0]], [[[1.0, 0.0]], [[0.0, 1.0]]], False),
    # Still correct (margin -0.2) but along the same direction: within reach, it counts.
    ([[3.0], [-0.2]], [[[1.0, 0.0]], [[1.0, 0.2]]], True),
])
def test_em_gradient_by_hand(loss, g, reach) -> None:
    loss, g, eps, lam = torch.tensor(loss), torch.tensor(g), 0.5, 5.0
    em, a_star = em_gradient(loss, g, eps, lam, linf=True)
    a, q, want = em_by_hand(loss, g, eps, lam)
    assert int(a_star) == a and torch.allclose(em[0], want, atol=1e-6)
    assert q[0] > 0.99 and (q[1] > 0.8 if reach else q[1] < 0.01)


def test_grafted_gradient_of_one_purification_is_its_exact_gradient() -> None:
    purifier, head, (x, y) = tiny_diffpure(), tiny_head(), tiny_batch()
    model = DefendedModel(head, purifier)
    loss, correct, g = purify_samples(model, ce_loss, x, y, [SEEDS])
    grad = grafted_gradient(model, x, g[0].view_as(x), SEEDS)
    loss_at = lambda z: ce_loss(head(purifier.purify(z, gradient="none", noise=PerExampleNoise(SEEDS))), y).sum()
    assert float(loss.sum()) == pytest.approx(float(loss_at(x)))
    directional_check(loss_at, grad, x)


# ---------------------------------------------------------------- surrogates


def test_forward_only_surrogate_is_the_diffused_input_with_gradient_sqrt_alpha() -> None:
    purifier, (x, _) = tiny_diffpure(), tiny_batch()
    fwd = purifier.surrogate("forward-only")
    xr = x.clone().requires_grad_(True)
    out = fwd.purify(xr, gradient="exact", noise=PerExampleNoise(SEEDS))
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=x.dtype)
    (grad,) = torch.autograd.grad((out * v).sum(), xr)
    a = sde.alpha(torch.tensor(0.1, dtype=torch.float64))
    assert torch.allclose(grad, a.sqrt() * v)   # Eq. 3 in [0, 1] units: d x(t*)/dx = sqrt(alpha)
    x_c = sde.to_centered(x)
    eps = (sde.to_centered(out.detach()) - a.sqrt() * x_c) / (1 - a).sqrt()
    assert abs(float(eps.std()) - 1) < 0.2   # what is left is the Eq. 3 noise


def test_fewer_steps_surrogate_has_its_steps_and_exact_gradients() -> None:
    purifier, (x, _) = tiny_diffpure(), tiny_batch()
    fewer = purifier.surrogate("fewer-steps", steps=2)
    assert (fewer.n_steps, purifier.n_steps) == (2, 5) and fewer.score_model is purifier.score_model
    assert fewer.gradient_agreement(x)["exact"] > 0.999
    with pytest.raises(ValueError, match="1 <= steps <= 5"):
        purifier.surrogate("fewer-steps", steps=6)


def test_pgd_follows_the_surrogate_and_returns_a_real_defense_example(cnn, data, digits_diffpure) -> None:
    x, y = data[0][:8], data[1][:8]
    attack = build("pgd-eot", eps=0.15, steps=4, eot=1, surrogate={"kind": "fewer-steps", "steps": 1})
    model = DefendedModel(cnn, digits_diffpure)
    assert attack.view(model).purifier.n_steps == 1 and model.purifier.n_steps == 5
    run(model, attack, x, y)
    # Without a purifier (the host's attack-undefended check) the surrogate is the bare classifier.
    assert accuracy(DefendedModel(cnn), run(DefendedModel(cnn), build("pgd-eot", eps=0.3, steps=20, eot=1,
                    surrogate={"kind": "forward-only"}), *data).x_adv, data[1]) == 0.0


# ---------------------------------------------------------------- best iterate under the protocol


class Threshold(nn.Module):
    """Class 1 iff the image's mean exceeds 0.5."""

    def forward(self, x: Tensor) -> Tensor:
        m = x.flatten(1).mean(1, keepdim=True)
        return torch.cat([0.5 - m, m - 0.5], 1)


def test_best_iterate_keeps_the_first_iterate_with_the_fewest_correct_verdicts() -> None:
    model = DefendedModel(Threshold())
    x, y = torch.full((2, 1, 2, 2), 0.2), torch.tensor([0, 0])
    best = BestIterate(model, x, y, Protocol(3))
    for step, level in enumerate([0.2, 0.7, 0.3, 0.9]):
        z = x.clone()
        z[0] = level   # image 0 is broken at steps 1 and 3; image 1 never moves
        best(step, z)
    assert best.iteration.tolist() == [1, 0] and best.robust.tolist() == [False, True]
    assert torch.equal(best.examples[0], torch.full((1, 2, 2), 0.7))


@pytest.mark.parametrize("bad", [torch.tensor([0.5, 1.0]), torch.tensor([-1, 0]), torch.tensor([1])])
def test_a_malformed_iteration_fails_the_cell(bad) -> None:
    x = torch.zeros(2, 1, 2, 2)
    with pytest.raises(CellFailure, match="iteration must be"):
        check_result(AttackResult(x.clone(), iteration=bad), x, Linf(0.1))


SUITE = """
suite: sota_e2e
seed: 3
dataset: {plugin: digits, params: {split: test, n: 8}}
classifiers: [{id: cnn, plugin: digits-cnn}]
defenses:
  - {id: dp, plugin: diffpure, params: {score_model: digits-unet, t_star: 0.1, dt: 0.05}}
attacks:
  - {id: pgd-best, plugin: pgd-eot, params: {eps: 0.2, steps: 3, eot: 1, select: protocol}}
  - {id: pgd-adjoint, plugin: pgd-eot, params: {eps: 0.2, steps: 2, eot: 1, gradient: adjoint}}
  - {id: aa-adjoint, plugin: autoattack, params: {eps: 0.2, versions: [rand], eot: 1, n_iter: 2, gradient: adjoint}}
grid: all
eval: {batch_size: 8, repeats: 2}
checks: {enabled: []}
"""


def test_best_iterate_rows_and_the_adjoint_cosine_reach_the_store_and_the_report(tmp_path, plugin_manager,
                                                                                 one_thread, capsys) -> None:
    out = tmp_path / "run"
    assert main(["run", str(write(tmp_path / "s.yaml", SUITE)), "--out", str(out)]) == 0
    db = sqlite3.connect(out / "results.sqlite")
    rows = dict(db.execute("SELECT key, id FROM cells WHERE kind = 'attack'").fetchall())
    best = db.execute("SELECT iteration, attack_verdict, adv_flags FROM examples WHERE cell_id = ?",
                      (rows["cnn/dp/pgd-best"],)).fetchall()
    assert len(best) == 8 and all(0 <= it <= 3 for it, _, _ in best)
    # The attack's worst-of-N verdict (over its own draws) is never kinder than ... nothing: it is stored;
    # the host's own flags are its re-verification of the same example.
    assert {v for _, v, _ in best} <= {0, 1} and all(len(f) == 2 for _, _, f in best)
    # Checks are off, yet the adjoint cell's gradient was measured against the exact one.
    for key in ("cnn/dp/pgd-adjoint", "cnn/dp/aa-adjoint"):
        (name, numbers), = db.execute("SELECT name, numbers_json FROM checks WHERE cell_id = ?", (rows[key],)).fetchall()
        assert name == "gradient-correctness" and json.loads(numbers)["mode"] == "adjoint"
    assert db.execute("SELECT COUNT(*) FROM checks WHERE cell_id = ?", (rows["cnn/dp/pgd-best"],)).fetchone()[0] == 0
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    table = capsys.readouterr().out
    line = next(ln for ln in table.splitlines() if "pgd-adjoint" in ln)
    assert "adjoint · cos" in line
