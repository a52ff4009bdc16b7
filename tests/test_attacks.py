"""The attacks of plugins/benchkit_attacks against a small digits CNN, scored host-style: the test
classifies the returned examples itself and checks them against the threat model."""
from __future__ import annotations

import weakref

import pluggy
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import Tensor, nn

from benchkit import hookspecs
from benchkit.attack import Attack, AttackContext, AttackResult
from benchkit.defended import DefendedModel, Purifier
from benchkit.noise import Noise, PerExampleNoise, derive_seed
from benchkit.threat import L2, Linf, StAdvFlow, ThreatModel, warp

from benchkit_attacks import plugin
from benchkit.params import parse_budget
from benchkit_attacks.params import NormBudget
from benchkit_attacks.pgd import random_start
from benchkit_attacks.transfer import Transfer

N_IMAGES = 64


def make_ctx(seed: int = 0, undefended: nn.Module | None = None, indices: range | list[int] = range(N_IMAGES)
             ) -> AttackContext:
    """A fresh context as the host builds one: one random stream per image, seeded per image."""
    return AttackContext(device=torch.device("cpu"), seed=seed, undefended=undefended,
                         noise=PerExampleNoise([derive_seed(seed, i, "attack") for i in indices]))


# ---------------------------------------------------------------- fixtures


def _digits() -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    try:
        from benchkit_data.digits import load_digits_split

        return load_digits_split("train"), load_digits_split("test")
    except ImportError:  # the data plugin is optional for these tests
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16
        y = torch.tensor(d.target)
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
        return (x[perm[450:]], y[perm[450:]]), (x[perm[:450]], y[perm[:450]])


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 16, 3, padding=1), nn.Conv2d(16, 32, 3, padding=1)
        self.fc, self.out = nn.Linear(32 * 16, 64), nn.Linear(64, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.c1((x - 0.5) / 0.5))
        h = F.max_pool2d(F.relu(self.c2(h)), 2)
        return self.out(F.relu(self.fc(h.flatten(1))))


def _train_tiny_cnn(x: Tensor, y: Tensor) -> nn.Module:
    """~98% test accuracy in a few seconds (15 epochs of Adam)."""
    threads = torch.get_num_threads()
    with torch.random.fork_rng():
        torch.set_num_threads(1)  # tiny batches: more threads only contend on a shared machine
        torch.manual_seed(0)
        model, gen = TinyCNN(), torch.Generator().manual_seed(0)
        opt = torch.optim.Adam(model.parameters(), 3e-3)
        for _ in range(15):
            perm = torch.randperm(len(x), generator=gen)
            for i in range(0, len(x), 64):
                idx = perm[i:i + 64]
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
    torch.set_num_threads(threads)
    return model


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="session")
def data() -> tuple[Tensor, Tensor]:
    x, y = _digits()[1]
    return x[:N_IMAGES], y[:N_IMAGES]


@pytest.fixture(scope="session")
def cnn() -> nn.Module:
    try:
        from benchkit_zoo.catalog import load_zoo_model

        model = load_zoo_model("digits-cnn")
    except Exception:  # no shipped weights yet (or no zoo): a tiny CNN trained here does as well
        model = _train_tiny_cnn(*_digits()[0])
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# ---------------------------------------------------------------- test defenses


class Quantiser(Purifier):
    """Gradient masking: round to 4 levels, whose exact gradient is zero everywhere."""

    def _purify(self, x: Tensor, *, gradient: str, noise: Noise) -> Tensor:
        return torch.round(x * 4) / 4


class GaussianNoise(Purifier):
    """A randomised defense where one draw is a poor estimate of the expected loss."""

    stochastic = True

    def __init__(self, sigma: float):
        super().__init__()
        self.sigma = sigma

    def _purify(self, x: Tensor, *, gradient: str, noise: Noise) -> Tensor:
        return (x + self.sigma * noise.randn_like(x)).clamp(0, 1)


class BlurNoise(Purifier):
    stochastic = True

    def _purify(self, x: Tensor, *, gradient: str, noise: Noise) -> Tensor:
        out = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        return (out + 0.1 * noise.randn_like(x)).clamp(0, 1)


class SqrtPurifier(Purifier):
    """Infinite gradient at 0 (the digits' background): the attack must stay finite anyway."""

    def _purify(self, x: Tensor, *, gradient: str, noise: Noise) -> Tensor:
        return x.sqrt()


# ---------------------------------------------------------------- helpers


# The budget each attack built here is verified against: its plugin's registered `threat=` mapping
# of the same params (what the host uses), never the attack object's own `.threat`.
_THREATS: "weakref.WeakKeyDictionary[Attack, ThreatModel]" = weakref.WeakKeyDictionary()


def build(id: str, **params: object) -> Attack:
    spec = plugin.ATTACKS[id]
    p = spec.params.model_validate(params)
    attack = spec.factory(p)
    _THREATS[attack] = spec.threat(p)
    return attack


def run(model: DefendedModel, attack: Attack, x: Tensor, y: Tensor, *, seed: int = 0,
        ctx: AttackContext | None = None, threat: ThreatModel | None = None,
        indices: list[int] | None = None) -> AttackResult:
    """Runs as the host does: seeded global RNG (for libraries that use it), the model in the
    attack's gradient mode with one defense noise stream per image, the attack's own randomness
    drawn per image (ctx.noise), copies of x and y, then verification of every returned example
    against the registered threat model."""
    torch.manual_seed(seed)
    indices = list(range(x.shape[0])) if indices is None else indices
    ctx = ctx or make_ctx(seed, indices=indices)
    threat = threat or _THREATS[attack]
    m = model if attack.gradient is None else model.with_gradient(attack.gradient)
    m = m.for_images(x, [derive_seed(seed, i, "defense") for i in indices])
    result = attack.run(m, x.clone(), y.clone(), ctx)
    assert torch.isfinite(result.x_adv).all()
    assert threat.violations(x, result.x_adv, result.extra) == []
    return result


def accuracy(model: DefendedModel, x: Tensor, y: Tensor, draws: int = 1, seed: int = 1234) -> float:
    """Host-style re-evaluation: mean accuracy over fresh draws of a stochastic defense."""
    torch.manual_seed(seed)
    return sum(float((model.predict(x) == y).float().mean()) for _ in range(draws)) / draws


# ---------------------------------------------------------------- params and registration


def test_budget_parses_fractions_and_numbers() -> None:
    assert NormBudget(eps="8/255").eps == 8 / 255
    assert NormBudget(eps=" 8 / 255 ").eps == 8 / 255
    assert NormBudget(eps="0.5", norm="L2").eps == 0.5
    assert NormBudget(eps=1).eps == 1.0
    assert parse_budget("1/4") == 0.25
    for bad in ("abc", "1/0", -0.1, "inf", float("nan"), True):
        with pytest.raises(ValidationError):
            NormBudget(eps=bad)


@pytest.mark.parametrize("id", sorted(plugin.ATTACKS))
def test_unknown_params_are_rejected(id: str) -> None:
    with pytest.raises(ValidationError, match="extra|Extra"):
        plugin.ATTACKS[id].params.model_validate({"no_such_param": 1})


def test_l2_needs_an_explicit_eps() -> None:
    with pytest.raises(ValidationError, match="eps is required"):
        plugin.ATTACKS["pgd-eot"].params.model_validate({"norm": "L2"})
    assert plugin.ATTACKS["pgd-eot"].params.model_validate({"norm": "L2", "eps": 0.5}).eps == 0.5


def test_hook_registers_every_attack_with_threat_and_gradient() -> None:
    pm = pluggy.PluginManager("benchkit")
    pm.add_hookspecs(hookspecs)
    pm.register(plugin)
    got = {}
    pm.hook.register_attacks(register=lambda id, factory, params, threat, description:
                             got.__setitem__(id, (factory, params, threat)))
    assert set(got) >= {"stadv", "bpda-eot", "pgd-eot", "diffusion-mse", "transfer", "square", "diffattack",
                        "diffhammer", "lowfreq"}

    def make(id: str, **p: object) -> tuple[Attack, ThreatModel]:
        factory, params, threat = got[id]
        validated = params.model_validate(p)
        return factory(validated), threat(validated)

    a, t = make("stadv")
    assert isinstance(t, StAdvFlow) and t.eps == 0.05 and a.gradient == "exact" and a.access == "gradient"
    a, t = make("bpda-eot")
    assert isinstance(t, Linf) and t.eps == 8 / 255 and a.gradient == "bpda"
    assert a.params.steps == 50 and a.params.eot == 15 and a.params.resolved_step() == 2 / 255
    assert a.eot_samples() == 15 and a.goal == "misclassify"
    a, t = make("pgd-eot", norm="L2", eps=0.5, gradient="adjoint")
    assert isinstance(t, L2) and t.eps == 0.5 and a.gradient == "adjoint"
    assert make("pgd-eot")[0].params.steps == 200 and make("pgd-eot")[0].eot_samples() == 20
    a, t = make("diffusion-mse", gradient="adjoint")
    assert a.gradient == "adjoint" and a.goal == "other" and isinstance(t, Linf)
    a, t = make("square")
    assert a.params.n_queries == 5000 and a.gradient is None and a.access == "query" and isinstance(t, Linf)
    a, t = make("transfer", source={"plugin": "stadv", "params": {"bound": "1/10"}})
    assert isinstance(t, StAdvFlow) and t.eps == 0.1 and a.access == "transfer"
    with pytest.raises(ValidationError):  # bpda is its own attack id
        plugin.ATTACKS["pgd-eot"].params.model_validate({"gradient": "bpda"})


def test_transfer_source_is_validated() -> None:
    params = plugin.ATTACKS["transfer"].params
    with pytest.raises(ValidationError, match="unknown source attack 'pgd'"):
        params.model_validate({"source": {"plugin": "pgd"}})
    with pytest.raises(ValidationError, match="params.steps"):
        params.model_validate({"source": {"plugin": "pgd-eot", "params": {"steps": 0}}})
    with pytest.raises(ValidationError, match="cannot use transfer"):
        params.model_validate({"source": {"plugin": "transfer", "params": {}}})
    with pytest.raises(ValidationError):
        params.model_validate({})


# ---------------------------------------------------------------- attacks on the undefended CNN


UNDEFENDED = [
    ("stadv", {"bound": 0.2}),
    ("bpda-eot", {"eps": 0.3, "steps": 20}),
    ("pgd-eot", {"eps": 0.3, "steps": 20}),
    ("pgd-eot", {"norm": "L2", "eps": 2.0, "steps": 20}),
    ("pgd-eot", {"eps": 0.3, "steps": 10, "restarts": 2, "loss": "cw"}),
    ("square", {"eps": 0.3, "n_queries": 1000}),
    ("square", {"norm": "L2", "eps": 2.0, "n_queries": 1000}),
]


@pytest.mark.parametrize("id,params", UNDEFENDED, ids=[f"{i}-{p.get('norm', 'Linf')}" for i, p in UNDEFENDED])
def test_attack_breaks_the_undefended_cnn(cnn, data, id: str, params: dict) -> None:
    x, y = data
    model = DefendedModel(cnn)
    assert accuracy(model, x, y) > 0.9
    result = run(model, build(id, **params), x, y)
    assert accuracy(model, result.x_adv, y) < 0.05
    if id != "square":
        assert result.stats["zero_grad_frac"] == 0.0 and result.stats["nonfinite_grad_frac"] == 0.0


def test_stadv_returns_its_flow_within_the_paper_bound(cnn, data) -> None:
    # 0.05 (the paper's bound) moves a pixel of an 8x8 image by at most 0.175 px: valid but weak.
    x, y = data
    result = run(DefendedModel(cnn), build("stadv", bound=0.05), x, y)
    flow = result.extra["flow"]
    assert flow.shape == (x.shape[0], 2, 8, 8) and bool(flow.abs().max() <= torch.tensor(0.05))
    assert torch.equal(result.x_adv, warp(x, flow))


def test_stadv_flow_outside_the_bound_is_a_violation(data) -> None:
    x, _ = data
    flow = torch.full((x.shape[0], 2, 8, 8), 0.06)
    assert StAdvFlow(0.05).violations(x, warp(x, flow), {"flow": flow})


# ---------------------------------------------------------------- gradient masking and EOT


def test_quantiser_masks_pgd_and_bpda_breaks_it(cnn, data) -> None:
    x, y = data
    model = DefendedModel(cnn, Quantiser())
    assert accuracy(model, x, y) > 0.9
    masked = run(model, build("pgd-eot", eps=0.2, steps=10), x, y)
    assert masked.stats["zero_grad_frac"] == 1.0
    assert accuracy(model, masked.x_adv, y) > 0.8
    bpda = run(model, build("bpda-eot", eps=0.2, steps=20, eot=1), x, y)
    assert bpda.stats["zero_grad_frac"] == 0.0
    assert accuracy(model, bpda.x_adv, y) < 0.05


def test_eot_beats_a_single_draw_on_a_stochastic_defense(cnn, data) -> None:
    # sigma 0.3 noise, eps 0.1, 10 steps: far from saturation, so the gradient estimate matters.
    x, y = data
    model = DefendedModel(cnn, GaussianNoise(0.3))
    one = run(model, build("pgd-eot", eps=0.1, steps=10, eot=1), x, y)
    many = run(model, build("pgd-eot", eps=0.1, steps=10, eot=16), x, y)
    acc_one, acc_many = accuracy(model, one.x_adv, y, draws=16), accuracy(model, many.x_adv, y, draws=16)
    assert acc_many < acc_one - 0.05, (acc_one, acc_many)


def test_attacks_are_deterministic_under_a_seed(cnn, data) -> None:
    x, y = data
    model = DefendedModel(cnn, GaussianNoise(0.3))
    for id, params in (("pgd-eot", {"eps": 0.1, "steps": 3, "eot": 2}), ("square", {"eps": 0.1, "n_queries": 20})):
        a, b = run(model, build(id, **params), x, y, seed=5), run(model, build(id, **params), x, y, seed=5)
        assert torch.equal(a.x_adv, b.x_adv)


def test_random_starts_and_defense_noise_are_drawn_per_image(cnn, data) -> None:
    # An image's random start and its defense's noise come from its own seed: the same image in a
    # smaller batch, or beside other images, gets the same adversarial example.
    x, y = data
    seeds = [derive_seed(0, i, "attack") for i in range(N_IMAGES)]
    sub = list(range(8, 40, 2))
    for threat in (Linf(0.1), L2(1.0)):
        full = random_start(threat, x, PerExampleNoise(seeds))
        part = random_start(threat, x[sub], PerExampleNoise([seeds[i] for i in sub]))
        assert torch.equal(full[sub], part) and not torch.equal(full[sub], x[sub])
    model = DefendedModel(cnn, GaussianNoise(0.3))
    params = {"eps": 0.1, "steps": 3, "eot": 2}
    whole = run(model, build("pgd-eot", **params), x, y)
    alone = run(model, build("pgd-eot", **params), x[sub], y[sub], indices=sub)
    assert torch.allclose(whole.x_adv[sub], alone.x_adv, atol=1e-6)
    other = run(model, build("pgd-eot", **params), x, y, seed=1)
    assert not torch.allclose(whole.x_adv, other.x_adv)


def test_nonfinite_gradients_are_counted_and_contained(cnn, data) -> None:
    x, y = data
    result = run(DefendedModel(cnn, SqrtPurifier()), build("pgd-eot", eps=0.1, steps=3, random_start=False), x, y)
    assert result.stats["nonfinite_grad_frac"] == 1.0


def test_callback_sees_every_step(cnn, data) -> None:
    x, y = data
    attack, seen = build("pgd-eot", eps=0.1, steps=4, restarts=2), []
    attack.callback = lambda step, x_adv, loss, grad: seen.append((step, loss.shape, grad.shape))
    run(DefendedModel(cnn), attack, x, y)
    assert [s for s, _, _ in seen] == list(range(10))   # counted across restarts
    assert all(ls == (x.shape[0],) and gs == x.shape for _, ls, gs in seen)


# ---------------------------------------------------------------- diffusion-only and transfer


@pytest.mark.parametrize("norm,eps", [("Linf", 0.1), ("L2", 1.0)])
def test_diffusion_mse_beats_random_noise_of_the_same_budget(cnn, data, norm: str, eps: float) -> None:
    x, y = data
    model = DefendedModel(cnn, BlurNoise())
    attack = build("diffusion-mse", norm=norm, eps=eps, steps=20, eot=8)
    result = run(model, attack, x, y)
    torch.manual_seed(1)
    noise = torch.randn_like(x)
    random = _THREATS[attack].project(x, x + eps * (noise.sign() if norm == "Linf" else
                                                 noise / noise.flatten(1).norm(dim=1).view(-1, 1, 1, 1)))

    def mse(z: Tensor) -> float:
        torch.manual_seed(7)
        with torch.no_grad():
            return sum(float((model.purify(z) - x).pow(2).mean()) for _ in range(16)) / 16

    clean = mse(x)
    assert mse(result.x_adv) - clean > 1.5 * (mse(random) - clean) > 0


def test_transfer_from_the_undefended_cnn(cnn, data) -> None:
    x, y = data
    ctx = make_ctx(undefended=cnn)
    # The 'defended' model here is the CNN itself, so transferred examples must fool it.
    attack = build("transfer", source={"plugin": "pgd-eot", "params": {"eps": 0.3, "steps": 20, "gradient": "adjoint"}})
    result = run(DefendedModel(cnn), attack, x, y, ctx=ctx)
    assert accuracy(DefendedModel(cnn), result.x_adv, y) < 0.05
    assert result.stats["source_zero_grad_frac"] == 0.0
    # A flow-based source hands its flow through for the host's check.
    stadv = run(DefendedModel(cnn, Quantiser()), Transfer(build("stadv", bound=0.1, steps=5)), x, y,
                ctx=make_ctx(undefended=cnn), threat=StAdvFlow(0.1))
    assert "flow" in stadv.extra
    with pytest.raises(ValueError, match="undefended"):
        attack.run(DefendedModel(cnn), x, y, make_ctx())


# ---------------------------------------------------------------- reference defaults (slow)


@pytest.mark.slow
@pytest.mark.parametrize("id,params", [("stadv", {}), ("bpda-eot", {}), ("pgd-eot", {}), ("pgd-eot", {"norm": "L2", "eps": 1.0}),
                                       ("diffusion-mse", {}), ("square", {}),
                                       ("transfer", {"source": {"plugin": "pgd-eot", "params": {}}})])
def test_reference_defaults_on_a_stochastic_defense(cnn, data, id: str, params: dict) -> None:
    x, y = data
    ctx = make_ctx(undefended=cnn)
    model = DefendedModel(cnn, GaussianNoise(0.3))
    result = run(model, build(id, **params), x, y, ctx=ctx)
    if id in ("bpda-eot", "pgd-eot", "stadv"):
        assert accuracy(model, result.x_adv, y, draws=4) < accuracy(model, x, y, draws=4)
