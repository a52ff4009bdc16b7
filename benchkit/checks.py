"""Evaluation sanity checks, run per cell and stored with it.

Each check returns a CheckResult: a name, pass / fail / skipped, the numbers behind it and a
one-line reason. A failed check does not change the numbers; it flags them in the leaderboard.

What the checks cost. gradient-correctness and the checks that attack again (attack-undefended,
unbounded-budget, eot-convergence) cost compute of their own. With `checks: {cost: bounded}` (the
default) a cell's checks together may cost `checks.budget` (0.25) times the cell's own compute
seconds (its stored shards'), or check_budget.FREE_SECONDS if that is more: each attacking check estimates its
cost before it runs, as the cell's seconds per image times its `Demand` (per image, in images of
the cell), and runs on fewer images and then fewer iterations to fit its share (`Budget`, `allot`,
`fit`), or is skipped as over budget.
`cost: full` runs each on the whole `checks.subset` at the attack's own iterations. Every costly
check records `images`, `iterations` (and the attack's own, `attack_iterations`), `seconds` and
`cost` (seconds / the cell's seconds).

Verdicts. The attacking checks are exact tests at ALPHA = 0.05 on per-image robust flags (robust:
the majority of an image's verification repeats correct under every variant, as the cell counts it),
so a small subset can pass a weak attack but never fails a sound one by chance more than 1 in 20:
their reasons say how many images they had and what it would have taken to fail.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from benchkit import metrics
from benchkit.check_budget import Budget, Demand, Plan, CHECK_ITERATIONS
from benchkit.attack import Attack
from benchkit.defended import DefendedModel, Identity
from benchkit.evaluate import attack_context, run_attack, verdicts
from benchkit.noise import PerExampleNoise, derive_seed
from benchkit.resolve import Cell, Components, ResolvedSuite
from benchkit.suite import EvalSpec
from benchkit.threat import ThreatModel


@dataclass
class CheckResult:
    name: str
    status: str  # "pass" | "fail" | "skipped"
    reason: str
    numbers: dict = field(default_factory=dict)


CheckFn = Callable[..., CheckResult]
CHECKS: dict[str, CheckFn] = {}


def check(name: str):
    def deco(fn: CheckFn) -> CheckFn:
        CHECKS[name] = fn
        return fn
    return deco


# ------------------------------------------------------------------ exact tests

ALPHA = 0.05                 # every test's one-sided significance level
UNDEFENDED_LIMIT = 0.01      # attack-undefended: robust share the bare classifier may keep
UNBOUNDED_LIMIT = 0.05       # unbounded-budget: robust share the defended model may keep
EOT_DROP = 2.0               # eot-convergence: points 2n samples must gain, besides significance


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), exactly: sum_{i=k..n} C(n, i) p^i (1 - p)^(n - i)
    (scipy.stats.binomtest(k, n, p, alternative='greater').pvalue)."""
    if k <= 0:
        return 1.0
    return min(1.0, sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k, n + 1)))


def fewest_failing(n: int, p: float) -> int | None:
    """The fewest of n images whose count is significant (binomial_tail < ALPHA) against rate p:
    what it takes to fail on n images (None: n images can never fail)."""
    return next((k for k in range(n + 1) if binomial_tail(k, n, p) < ALPHA), None)


def robust_flags(model: DefendedModel, attack: Attack, threat: ThreatModel, x: torch.Tensor, y: torch.Tensor,
                 ctx_base: dict, seed_parts: tuple, ev: EvalSpec) -> list[bool]:
    """Per image: robust under every variant of the attack, i.e. the majority of its `ev.repeats`
    verdicts under the suite's verification protocol correct (the rule of stored_robust)."""
    indices = list(range(x.shape[0]))
    robust = [True] * len(indices)
    for variant, x_adv, _, _ in run_attack(model, attack, threat, x, y, indices, ctx_base, seed_parts):
        flags = verdicts(model, x_adv, y, indices, (*seed_parts, variant, "adv"), ev.repeats, ev.batch_size, ev.verdict)
        robust = [r and _majority(f) for r, f in zip(robust, flags)]
    return robust


def stored_robust(examples: list, images: int) -> list[bool]:
    """The cell's own per-image robust flags for its first `images` images, from its stored rows."""
    robust = [True] * images
    for r in examples:
        if r["adv_flags"] is not None and r["image_index"] < images:
            robust[r["image_index"]] &= _majority(r["adv_flags"])
    return robust


def _majority(flags: str) -> bool:
    return flags.count("1") * 2 > len(flags)


def rate_verdict(name: str, robust: list[bool], limit: float, subject: str, failing: str, nums: dict) -> CheckResult:
    """Fail when the share of robust images is significantly above `limit`: one-sided exact
    binomial test of H0 rate <= limit, p = P(X >= robust | images, limit) < ALPHA."""
    m, r = len(robust), sum(robust)
    acc = 100 * r / m if m else float("nan")
    p = binomial_tail(r, m, limit)
    need = fewest_failing(m, limit)
    evidence = (f"{r} of {m} images robust, exact binomial test against {limit:.0%}: p = {p:.3g}; "
                + (f"{need} robust would fail" if need is not None else f"{m} images can never fail it"))
    nums |= {"robust_images": r, "images": m, "p_value": p, "limit": 100 * limit}
    if p < ALPHA:
        return CheckResult(name, "fail", f"{subject} still at {acc:.1f}%, significantly above {limit:.0%} "
                                         f"({evidence}): {failing}", nums)
    return CheckResult(name, "pass", f"{subject} at {acc:.1f}%, not significantly above {limit:.0%} ({evidence})", nums)


def eot_verdict(at_n: list[bool], at_2n: list[bool], n: int, nums: dict, how: str = "") -> CheckResult:
    """Paired comparison of per-image robust flags with n and 2n EOT samples on the same images.
    Fail only when 2n is significantly stronger: of the discordant images, more broken only at 2n
    (`gained`) than only at n (`lost`), one-sided exact sign test p = P(X >= gained | gained + lost,
    1/2) < ALPHA, and robust accuracy at least EOT_DROP points lower with 2n."""
    m = len(at_n)
    gained = sum(a and not b for a, b in zip(at_n, at_2n))
    lost = sum(b and not a for a, b in zip(at_n, at_2n))
    acc_n, acc_2n = 100 * sum(at_n) / m, 100 * sum(at_2n) / m
    p = binomial_tail(gained, gained + lost, 0.5)
    # The fewest images broken at 2n only (none the other way) that fail on m images.
    need = next((g for g in range(1, m + 1) if binomial_tail(g, g, 0.5) < ALPHA and 100 * g / m >= EOT_DROP), None)
    nums |= {"eot": n, f"robust_eot{n}": acc_n, f"robust_eot{2 * n}": acc_2n, "broken_only_2n": gained,
             "broken_only_n": lost, "p_value": p, "images": m}
    evidence = (f"{acc_n:.1f}% at EOT {n} vs {acc_2n:.1f}% at EOT {2 * n} on {m} images{how}; {gained} broken "
                f"only at EOT {2 * n}, {lost} only at EOT {n} (one-sided sign test p = {p:.3g}; "
                + (f"failing takes >= {need} one way)" if need is not None else f"{m} images can never fail it)"))
    if p < ALPHA and acc_n - acc_2n >= EOT_DROP:
        return CheckResult("eot-convergence", "fail", f"EOT not converged: {evidence}", nums)
    return CheckResult("eot-convergence", "pass", f"no significant gain from more EOT samples: {evidence}", nums)


def _planned(plan: Plan, own: int | None) -> dict:
    return {"images": plan.images, "iterations": plan.iterations, "attack_iterations": own}


def _how(plan: Plan, own: int | None) -> str:
    return "" if plan.iterations == own else f", {plan.iterations} of the attack's {own} iterations"


# ------------------------------------------------------------------ checks on the stored rows

@check("robust-le-clean")
def robust_le_clean(summary: dict, **_) -> CheckResult:
    clean, robust = summary["clean"].mean, summary["robust"].mean
    nums = {"clean": clean, "robust": robust}
    if robust <= clean + 1e-9:
        return CheckResult("robust-le-clean", "pass", f"robust {robust:.2f}% <= clean {clean:.2f}%", nums)
    return CheckResult("robust-le-clean", "fail", f"robust {robust:.2f}% exceeds clean {clean:.2f}%: attack or evaluation broken", nums)


@check("gradients")
def gradients(shard_stats: list[dict], **_) -> CheckResult:
    keys = [k for s in shard_stats for k in s if k.endswith("zero_grad_frac") or k.endswith("nonfinite_grad_frac")]
    if not keys:
        return CheckResult("gradients", "skipped", "the attack reports no gradient statistics")
    worst = {}
    for s in shard_stats:
        for k, v in s.items():
            if k in keys:
                worst[k] = max(worst.get(k, 0.0), float(v))
    bad = {k: v for k, v in worst.items() if v > 0.01}
    if bad:
        k, v = max(bad.items(), key=lambda kv: kv[1])
        return CheckResult("gradients", "fail", f"{k.split('.')[-1].replace('_frac', '')} on {v:.0%} of images (> 1%): gradient masking suspected", worst)
    return CheckResult("gradients", "pass", "gradients finite and non-zero on >= 99% of images", worst)


# ------------------------------------------------------------------ checks that compute again

def _subset(resolved: ResolvedSuite, comps: Components, cell: Cell, images: int | None = None):
    dataset = comps.dataset(cell)
    n = min(resolved.suite.checks.subset if images is None else images, len(dataset))
    x, y = dataset.get(range(n))
    return x.to(comps.device), y.to(comps.device)


def _undefended_skip(cell: Cell, comps: Components) -> str | None:
    if comps.attacks[cell.attack.id].goal != "misclassify":
        return "the attack does not maximise misclassification (e.g. it targets the purifier alone)"
    return None


def _unbounded_skip(cell: Cell, comps: Components) -> str | None:
    attack = comps.attacks[cell.attack.id]
    if attack.goal != "misclassify":
        return "the attack does not maximise misclassification"
    if attack.access != "gradient":
        why = {"query": "query-limited", "transfer": "crafted on another model"}.get(attack.access, attack.access)
        return f"the attack is {why}: an unbounded budget need not reach 0%"
    if attack.params_for(unbounded=True) is None:
        return "the attack has no budget to lift"
    return None


def _eot_skip(cell: Cell, comps: Components) -> str | None:
    attack = comps.attacks[cell.attack.id]
    if not comps.defenses[cell.defense.id].stochastic:
        return "deterministic defense: EOT does not apply"
    n = attack.eot_samples()
    if n is None or attack.params_for(eot=2 * n) is None:
        return "the attack takes no EOT samples"
    return None


def _overrides(attack: Attack, plan: Plan, **what) -> dict:
    """params_for(**what), with the plan's iterations when it cuts them."""
    over = dict(attack.params_for(**what) or {})
    if plan.iterations is not None and plan.iterations != attack.iterations():
        over |= attack.params_for(iterations=plan.iterations) or {}
    return over


def bare_share(bare: DefendedModel, defended: DefendedModel, x: torch.Tensor, seed: int) -> float:
    """What the bare classifier costs per image relative to the defended model (at most 1), from one
    forward pass of each on the same images (all the check may use: on two, fixed per-call costs
    overstate it several times): attack-undefended's cost in images of the cell."""
    noise = PerExampleNoise([derive_seed(seed, "probe", i) for i in range(x.shape[0])])
    with torch.inference_mode():
        t0 = time.perf_counter()
        bare.logits(x)
        t1 = time.perf_counter()
        defended.logits(x, noise=noise)
        t2 = time.perf_counter()
    return min(1.0, (t1 - t0) / max(t2 - t1, 1e-9))


@check("attack-undefended")
def attack_undefended(resolved: ResolvedSuite, cell: Cell, comps: Components, examples: list, budget: Budget,
                      **_) -> CheckResult:
    """The attack must break the undefended classifier on the same images: fail when the share of
    images it leaves robust is significantly above UNDEFENDED_LIMIT (1%), by a one-sided exact
    binomial test at ALPHA (rate_verdict). On an undefended cell its own rows are the answer."""
    name, attack = "attack-undefended", comps.attacks[cell.attack.id]
    if why := _undefended_skip(cell, comps):
        return CheckResult(name, "skipped", why)
    subject, failing = "undefended classifier", "attack too weak or broken"
    own = attack.iterations()
    if _undefended_cell(cell, comps):
        images = metrics.summarise(examples)["n"]
        r = stored_robust(examples, images)
        nums = {"undefended_robust": 100 * sum(r) / max(images, 1), "iterations": own, "attack_iterations": own,
                "reused": "the cell's own rows (no defense)"}
        return rate_verdict(name, r, UNDEFENDED_LIMIT, subject, failing, nums)
    plan, multiplier = budget.plan(name), budget.demands[name].multiplier
    if plan is None:
        return CheckResult(name, "skipped", budget.refusal(name), {"multiplier": multiplier})
    x, y = _subset(resolved, comps, cell, plan.images)
    r = robust_flags(_bare(comps, cell), attack, resolved.threats[cell.attack.id], x, y,
                     attack_context(resolved, comps, cell), (resolved.suite.seed, cell.key, "undefended"),
                     resolved.suite.eval)
    nums = {"undefended_robust": 100 * sum(r) / len(r), "multiplier": multiplier} | _planned(
        Plan(plan.images, own, plan.seconds), own)
    return rate_verdict(name, r, UNDEFENDED_LIMIT, subject, failing, nums)


def _undefended_cell(cell: Cell, comps: Components) -> bool:
    return isinstance(comps.defenses[cell.defense.id], Identity)


def _bare(comps: Components, cell: Cell) -> DefendedModel:
    return DefendedModel(comps.classifiers[cell.classifier.id], Identity())


def _undefended_demand(resolved: ResolvedSuite, cell: Cell, comps: Components, examples: list) -> Demand | None:
    """The whole subset at the attack's own iterations (fewer would weaken the attack it judges),
    each image costing what the bare classifier costs against the defended model (bare_share,
    rounded up to a power of two so that timing noise does not move the plan); None on an
    undefended cell, whose own rows answer the check."""
    if _undefended_cell(cell, comps):
        return None
    x, _ = _subset(resolved, comps, cell)
    share = bare_share(_bare(comps, cell), comps.defended(cell, comps.attacks[cell.attack.id]), x, resolved.suite.seed)
    return Demand(x.shape[0], 2.0 ** math.ceil(math.log2(max(share, 2.0 ** -20))))


@check("unbounded-budget")
def unbounded_budget(resolved: ResolvedSuite, cell: Cell, comps: Components, budget: Budget, **_) -> CheckResult:
    """With an unbounded budget a gradient attack must drive the defended model to about 0% (else
    gradient masking): fail when the share of robust images is significantly above UNBOUNDED_LIMIT
    (5%), by a one-sided exact binomial test at ALPHA (rate_verdict). A bounded run takes at most
    CHECK_ITERATIONS iterations: with the budget lifted, an attack that sees true gradients breaks
    every image within a few steps."""
    name, attack = "unbounded-budget", comps.attacks[cell.attack.id]
    if why := _unbounded_skip(cell, comps):
        return CheckResult(name, "skipped", why)
    own, plan = attack.iterations(), budget.plan(name)
    if plan is None:
        return CheckResult(name, "skipped", budget.refusal(name))
    over = _overrides(attack, plan, unbounded=True)
    lifted, threat = resolved.rebuild_attack(cell.attack.id, over)
    x, y = _subset(resolved, comps, cell, plan.images)
    r = robust_flags(comps.defended(cell, lifted), lifted, threat, x, y, attack_context(resolved, comps, cell),
                     (resolved.suite.seed, cell.key, "unbounded"), resolved.suite.eval)
    nums = {"unbounded_robust": 100 * sum(r) / len(r), "overrides": over} | _planned(plan, own)
    return rate_verdict(name, r, UNBOUNDED_LIMIT, f"with an unbounded budget{_how(plan, own)}, the defended model",
                        "gradient masking suspected", nums)


@check("eot-convergence")
def eot_convergence(resolved: ResolvedSuite, cell: Cell, comps: Components, examples: list, budget: Budget,
                    **_) -> CheckResult:
    """More EOT samples must not make the attack significantly stronger: the cell's own per-image
    robust flags (n samples) against a rerun with 2n on the same images (eot_verdict: a one-sided
    exact sign test on the discordant images at ALPHA, and a drop of at least EOT_DROP points); the
    rerun costs 2n/n = 2 images of the cell per image. A bounded rerun may take fewer iterations than
    the cell did: that can only weaken the 2n side, so a significant gain still fails the check, and
    no gain is weaker evidence (its reason says so)."""
    name, attack = "eot-convergence", comps.attacks[cell.attack.id]
    if why := _eot_skip(cell, comps):
        return CheckResult(name, "skipped", why)
    n, own, plan = attack.eot_samples(), attack.iterations(), budget.plan(name)
    if plan is None:
        return CheckResult(name, "skipped", budget.refusal(name))
    x, y = _subset(resolved, comps, cell, plan.images)
    rebuilt, threat = resolved.rebuild_attack(cell.attack.id, _overrides(attack, plan, eot=2 * n))
    at_2n = robust_flags(comps.defended(cell, rebuilt), rebuilt, threat, x, y, attack_context(resolved, comps, cell),
                         (resolved.suite.seed, cell.key, "eot"), resolved.suite.eval)
    how = "" if plan.iterations == own else (f", EOT {2 * n} at {plan.iterations} of the attack's {own} iterations "
                                             "(the cell's own at all of them)")
    return eot_verdict(stored_robust(examples, plan.images), at_2n, n, _planned(plan, own), how)


def _unbounded_demand(resolved: ResolvedSuite, cell: Cell, comps: Components, examples: list) -> Demand:
    """The whole subset at most CHECK_ITERATIONS iterations: with the budget lifted, true gradients
    break an image within a few steps."""
    n = min(resolved.suite.checks.subset, len(comps.dataset(cell)))
    return Demand(n, 1.0, comps.attacks[cell.attack.id].iterations(), cap=CHECK_ITERATIONS)


def _eot_demand(resolved: ResolvedSuite, cell: Cell, comps: Components, examples: list) -> Demand:
    """The subset's images the cell has stored, each rerun with twice its EOT samples."""
    stored = metrics.summarise(examples)["n"]
    return Demand(min(resolved.suite.checks.subset, stored), 2.0, comps.attacks[cell.attack.id].iterations())


# Images the gradient-correctness check compares on: its reference costs a few solves per image.
GRADIENT_CHECK_IMAGES = 2


@check("gradient-correctness")
def gradient_correctness(resolved: ResolvedSuite, cell: Cell, comps: Components, **_) -> CheckResult:
    """exact / adjoint gradients against a reference with the same noise, for defenses that offer
    `gradient_agreement(x) -> {mode: cosine}` (DiffPure: central finite differences of the purification
    along random directions, so no graph through the unrolled solver is ever kept; the result may name
    its reference in `.reference`). On the first GRADIENT_CHECK_IMAGES images, whatever the budget (it
    cannot be cut; its seconds come off the other checks' budget). The verdict is on the mode this
    cell's attack differentiates with; the others are reported."""
    purifier, attack = comps.defenses[cell.defense.id], comps.attacks[cell.attack.id]
    if attack.access != "gradient":
        return CheckResult("gradient-correctness", "skipped", "the attack does not differentiate the defense")
    agreement = getattr(purifier, "gradient_agreement", None)
    if agreement is None:
        return CheckResult("gradient-correctness", "skipped", "the defense offers no solver gradients to compare")
    x, _ = _subset(resolved, comps, cell)
    x = x[: min(GRADIENT_CHECK_IMAGES, x.shape[0])]
    cos = agreement(x)
    how = (f"reference: {getattr(cos, 'reference', 'autograd through the unrolled solver')}; "
           f"{x.shape[0]} image(s), same noise")
    nums = {f"cosine_{m}": c for m, c in cos.items()} | {"reference": how, "n": int(x.shape[0])}
    summary = ", ".join(f"{m} cosine {c:.3f}" for m, c in cos.items())
    defended = comps.defended(cell, attack)
    used = defended.gradient
    if attack.view(defended).purifier is not defended.purifier:
        nums["mode"] = "surrogate"
        return CheckResult("gradient-correctness", "skipped", f"the attack follows a surrogate of the defense, not "
                           f"the defense's own gradient ({summary}; {how})", nums)
    if used not in cos:
        return CheckResult("gradient-correctness", "skipped", f"the attack uses '{used}' gradients ({summary}; {how})", nums)
    nums["mode"], nums["against"] = used, getattr(cos, "against", {}).get(used, "reference")
    if cos[used] < 0.9:
        return CheckResult("gradient-correctness", "fail", f"{used} gradient has cosine {cos[used]:.3f} (< 0.9) "
                           f"with the reference ({summary}; {how})", nums)
    return CheckResult("gradient-correctness", "pass", f"{summary} ({how})", nums)


def _attacks_through_adjoint(comps: Components, cell: Cell) -> bool:
    """The paper's adjoint gradient can be far from the solver's true one (cosine ~0.02 at 10 steps
    on the digits DiffPure): every cell that attacks through it gets its gradient measured, checks on
    or off, so its number is never shown without that caveat. (Checks run on complete cells only, whose
    defended model was built.)"""
    return comps.defended(cell, comps.attacks[cell.attack.id]).gradient == "adjoint"


def gradient_note(checks: list[dict]) -> str:
    """'adjoint · cos 0.02 vs exact' from a cell's stored gradient-correctness check ('' without one)."""
    c = next((c for c in checks if c["name"] == "gradient-correctness"), None)
    nums = (c or {}).get("numbers") or {}
    mode = nums.get("mode")
    if mode == "surrogate":
        return "surrogate (its own solve)"
    if mode is None or f"cosine_{mode}" not in nums:
        return ""
    return f"{mode} · cos {nums[f'cosine_{mode}']:.2f} vs {nums.get('against', 'reference')}"


# ------------------------------------------------------------------ what the leaderboard says about a check

# Badge labels: the leaderboard shows one badge per check, so each label stays a few characters.
SHORT = {"robust-le-clean": "rob≤clean", "gradients": "grads", "attack-undefended": "undef",
         "unbounded-budget": "unbounded", "eot-convergence": "EOT", "gradient-correctness": "grad-cos",
         "black-box-vs-white-box": "bb≤wb", "checks": "checks"}

# What a researcher can do about a failing check: one sentence or two, printed after the check's reason.
ADVICE = {
    "robust-le-clean": "more images survive the attack than are classified correctly without it, so the attack or "
                       "the evaluation is broken: check that the attack maximises the loss (the sign of its step) "
                       "and returns its examples in the order of its inputs; do not report this cell's numbers",
    "gradients": "the attack got zero or non-finite gradients on many images, the mark of gradient masking (a "
                 "non-differentiable, saturating or quantising step in the defense): attack through BPDA "
                 "(an attack in bpda mode, or `gradient: bpda` on the defense) or with a gradient-free (query) attack "
                 "and report the lower number, or fix the defense's backward pass",
    "attack-undefended": "the attack leaves significantly more than 1% of the undefended classifier's images robust "
                         "(one-sided exact binomial test at the 5% level), so it is too weak at this budget or broken: raise "
                         "its steps or restarts, check its step size against eps and its loss; until this passes, the "
                         "defended cell's robust accuracy is only an upper bound",
    "unbounded-budget": "with the budget lifted the attack should drive accuracy to about 0%; it leaves significantly "
                        "more than 5% robust (one-sided exact binomial test at the 5% level), so the gradients it follows are "
                        "masked or obfuscated: attack with exact or BPDA gradients, more EOT samples, or a "
                        "gradient-free (query) attack, and treat this robust accuracy as unreliable",
    "eot-convergence": "doubling the attack's EOT samples breaks significantly more images than it spares (one-sided "
                       "exact sign test on the images whose verdict changes at the 5% level, and at least 2 points lower), so "
                       "the attack has not averaged out the defense's randomness: raise the attack's EOT samples (e.g. "
                       "double them) until this passes, and report that number; a bounded check that cut iterations "
                       "says so in its reason: confirm with checks.cost: full",
    "gradient-correctness": "the gradient the attack follows disagrees with the solver's true gradient (cosine "
                            "< 0.9), so the attack is misled: attack with `gradient: exact` on the defense (or more "
                            "solver steps for adjoint) and report that robust accuracy",
    "black-box-vs-white-box": "a query-only attack beats the best gradient attack on this defense, so the gradients "
                              "are unreliable (masked): trust the lower number, and strengthen the white-box attack "
                              "(exact or BPDA gradients, more EOT samples, more steps)",
    "checks": "the checks themselves raised an error (see the reason): fix the plugin or setting it names; the "
              "cell's numbers stand, but unchecked",
}

# A check that raised is recorded as failed with a reason starting so (run_checks): its advice is about
# the crash, not the check.
CRASHED = "check could not run"


def advice(name: str, reason: str) -> str:
    """What to do about a failing check, from its name and reason."""
    if reason.startswith(CRASHED):
        return ADVICE["checks"]
    return ADVICE.get(name, "see the check's reason and numbers, and rerun once the cause is fixed")


CROSS_CELL = ("black-box-vs-white-box",)


def names() -> list[str]:
    """Every check a suite may enable."""
    return [*CHECKS, *CROSS_CELL]


def enabled(resolved: ResolvedSuite, name: str) -> bool:
    return resolved.suite.checks.enabled == "all" or name in resolved.suite.checks.enabled


# The checks whose seconds are recorded; the ones that share the budget (their skip reason, their demand).
COSTLY = ("gradient-correctness", "attack-undefended", "unbounded-budget", "eot-convergence")
POOLED = {"attack-undefended": (_undefended_skip, _undefended_demand),
          "unbounded-budget": (_unbounded_skip, _unbounded_demand), "eot-convergence": (_eot_skip, _eot_demand)}


def run_checks(resolved: ResolvedSuite, comps: Components, cell: Cell, examples: list,
               shard_stats: list[dict], *, cell_seconds: float) -> list[CheckResult]:
    """Every enabled per-cell check on a complete attack cell (its stored example rows, per-shard
    attack stats and compute seconds), within the checks' budget; a check that itself fails is
    recorded as failed, never fatal. Costly checks record their `seconds` (with what estimating
    their demand took) and `cost`."""
    summary = metrics.summarise(examples)
    demands, spent, crashed = {}, {}, {}
    for name, (skip, demand) in POOLED.items():
        if enabled(resolved, name) and skip(cell, comps) is None:
            t0 = time.perf_counter()
            try:
                if (d := demand(resolved, cell, comps, examples)) is not None:
                    demands[name] = d
            except Exception as exc:  # noqa: BLE001 - as a check's own failure below
                crashed[name] = exc
            spent[name] = time.perf_counter() - t0
    budget = Budget(resolved.suite.checks, cell_seconds, summary["n"], demands)
    results = []
    # gradient-correctness first: its seconds, which cannot be cut, come off the others' budget.
    for name in sorted(CHECKS, key=lambda n: n != "gradient-correctness"):
        fn = CHECKS[name]
        if not (enabled(resolved, name) or (name == "gradient-correctness" and _attacks_through_adjoint(comps, cell))):
            continue
        t0 = time.perf_counter()
        try:
            if name in crashed:
                raise crashed[name]
            result = fn(resolved=resolved, cell=cell, comps=comps, summary=summary, shard_stats=shard_stats,
                        examples=examples, budget=budget)
        except Exception as exc:  # noqa: BLE001 - a broken check must not lose the cell's results
            result = CheckResult(name, "fail", f"{CRASHED}: {type(exc).__name__}: {exc}")
        seconds = time.perf_counter() - t0 + spent.get(name, 0.0)
        if name == "gradient-correctness":
            budget.spend(seconds)
        if name in COSTLY and (result.status != "skipped" or result.numbers):
            result.numbers = result.numbers | {"seconds": seconds, "cost": seconds / cell_seconds if cell_seconds else None}
        result.numbers = result.numbers | {"settings": settings(resolved)}
        results.append(result)
    return results


def settings(resolved: ResolvedSuite) -> dict:
    """The suite's checks settings a stored check was computed under: changing any of them (e.g.
    `cost: full`) reruns the checks of finished cells, whose images are not recomputed."""
    return resolved.suite.checks.model_dump(mode="json")


def stale(stored: list, resolved: ResolvedSuite) -> bool:
    """Whether a finished cell's stored checks (store rows) must run again: none stored, or
    computed under other checks settings."""
    now = settings(resolved)
    return not stored or any(json.loads(c["numbers_json"]).get("settings") != now for c in stored)


def black_box_vs_white_box(rows: list[dict]) -> dict[str, CheckResult]:
    """Per (classifier, defense): a query-limited (black-box) attack's robust accuracy may not be
    lower than the best gradient attack's by more than 2 points. rows: {key, classifier, defense,
    access, goal, robust}. Returns results keyed by the black-box cell's key."""
    out = {}
    white = [o for o in rows if o["access"] == "gradient" and o["goal"] == "misclassify" and o["robust"] is not None]
    for r in rows:
        if r["access"] != "query" or r["robust"] is None:
            continue
        wb = [o for o in white if (o["classifier"], o["defense"]) == (r["classifier"], r["defense"])]
        if not wb:
            continue
        best = min(wb, key=lambda o: o["robust"])
        gap = best["robust"] - r["robust"]
        nums = {"black_box": r["robust"], "white_box": best["robust"], "white_box_attack": best["key"]}
        status = "pass" if gap <= 2.0 else "fail"
        reason = (f"black-box {r['robust']:.1f}% vs white-box {best['robust']:.1f}%"
                  + ("" if status == "pass" else ": black-box stronger, white-box gradients unreliable"))
        out[r["key"]] = CheckResult("black-box-vs-white-box", status, reason, nums)
    return out
