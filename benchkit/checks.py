"""Evaluation sanity checks, run per cell and stored with it.

Each check returns a CheckResult: a name, pass / fail / skipped, the numbers behind it and a
one-line reason. A failed check does not change the numbers; it flags them in the leaderboard.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from benchkit import metrics
from benchkit.defended import DefendedModel, Identity
from benchkit.evaluate import attack_context, robust_accuracy
from benchkit.resolve import Cell, Components, ResolvedSuite


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


# ------------------------------------------------------------------ checks that attack again

def _subset(resolved: ResolvedSuite, comps: Components, cell: Cell):
    dataset = comps.dataset(cell)
    x, y = dataset.get(range(min(resolved.suite.checks.subset, len(dataset))))
    return x.to(comps.device), y.to(comps.device)


@check("attack-undefended")
def attack_undefended(resolved: ResolvedSuite, cell: Cell, comps: Components, **_) -> CheckResult:
    """The attack must break the undefended classifier on the same images (<= 1%)."""
    attack = comps.attacks[cell.attack.id]
    if attack.goal != "misclassify":
        return CheckResult("attack-undefended", "skipped", "the attack does not maximise misclassification "
                           "(e.g. it targets the purifier alone)")
    x, y = _subset(resolved, comps, cell)
    model = DefendedModel(comps.classifiers[cell.classifier.id], Identity())
    acc = robust_accuracy(model, attack, resolved.threats[cell.attack.id], x, y, attack_context(resolved, comps, cell),
                          (resolved.suite.seed, cell.key, "undefended"))
    nums = {"undefended_robust": acc, "n": int(x.shape[0])}
    if acc <= 1.0:
        return CheckResult("attack-undefended", "pass", f"undefended classifier at {acc:.1f}% (<= 1%)", nums)
    return CheckResult("attack-undefended", "fail", f"undefended classifier still at {acc:.1f}% (> 1%): attack too weak or broken", nums)


@check("unbounded-budget")
def unbounded_budget(resolved: ResolvedSuite, cell: Cell, comps: Components, **_) -> CheckResult:
    """With an unbounded budget a gradient attack must drive the defended model to <= 5% (else
    gradient masking)."""
    attack = comps.attacks[cell.attack.id]
    if attack.goal != "misclassify":
        return CheckResult("unbounded-budget", "skipped", "the attack does not maximise misclassification")
    if attack.access != "gradient":
        why = {"query": "query-limited", "transfer": "crafted on another model"}.get(attack.access, attack.access)
        return CheckResult("unbounded-budget", "skipped", f"the attack is {why}: an unbounded budget need not reach 0%")
    over = attack.params_for(unbounded=True)
    if over is None:
        return CheckResult("unbounded-budget", "skipped", "the attack has no budget to lift")
    lifted, threat = resolved.rebuild_attack(cell.attack.id, over)
    x, y = _subset(resolved, comps, cell)
    acc = robust_accuracy(comps.defended(cell, lifted), lifted, threat, x, y, attack_context(resolved, comps, cell),
                          (resolved.suite.seed, cell.key, "unbounded"), repeats=resolved.suite.eval.repeats)
    nums = {"unbounded_robust": acc, "overrides": over, "n": int(x.shape[0])}
    if acc <= 5.0:
        return CheckResult("unbounded-budget", "pass", f"unbounded budget drives the defended model to {acc:.1f}% (<= 5%)", nums)
    return CheckResult("unbounded-budget", "fail", f"defended model still at {acc:.1f}% with an unbounded budget: gradient masking suspected", nums)


@check("eot-convergence")
def eot_convergence(resolved: ResolvedSuite, cell: Cell, comps: Components, **_) -> CheckResult:
    """Robust accuracy with n and 2n EOT samples must agree within 2 points."""
    attack = comps.attacks[cell.attack.id]
    if not comps.defenses[cell.defense.id].stochastic:
        return CheckResult("eot-convergence", "skipped", "deterministic defense: EOT does not apply")
    n = attack.eot_samples()
    if n is None or attack.params_for(eot=2 * n) is None:
        return CheckResult("eot-convergence", "skipped", "the attack takes no EOT samples")
    x, y = _subset(resolved, comps, cell)
    accs = {}
    for k in (n, 2 * n):
        rebuilt, threat = resolved.rebuild_attack(cell.attack.id, attack.params_for(eot=k))
        accs[k] = robust_accuracy(comps.defended(cell, rebuilt), rebuilt, threat, x, y,
                                  attack_context(resolved, comps, cell), (resolved.suite.seed, cell.key, "eot"),
                                  repeats=resolved.suite.eval.repeats)
    nums = {"eot": n, f"robust_eot{n}": accs[n], f"robust_eot{2 * n}": accs[2 * n], "n": int(x.shape[0])}
    if abs(accs[n] - accs[2 * n]) < 2.0:
        return CheckResult("eot-convergence", "pass", f"EOT {n} vs {2 * n}: {accs[n]:.1f}% vs {accs[2 * n]:.1f}%", nums)
    images = int(x.shape[0])
    return CheckResult("eot-convergence", "fail", f"EOT not converged: {accs[n]:.1f}% with {n} samples vs "
                       f"{accs[2 * n]:.1f}% with {2 * n} on {images} images (one image: {100 / images:.1f} "
                       "points)", nums)


# Images the gradient-correctness check compares on: its reference costs a few solves per image.
GRADIENT_CHECK_IMAGES = 2


@check("gradient-correctness")
def gradient_correctness(resolved: ResolvedSuite, cell: Cell, comps: Components, **_) -> CheckResult:
    """exact / adjoint gradients against a reference with the same noise, for defenses that offer
    `gradient_agreement(x) -> {mode: cosine}` (DiffPure: central finite differences of the purification
    along random directions, so no graph through the unrolled solver is ever kept; the result may name
    its reference in `.reference`). On the first GRADIENT_CHECK_IMAGES images. The verdict is on the mode
    this cell's attack differentiates with; the others are reported."""
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
    "attack-undefended": "the attack does not break the undefended classifier on the same images, so it is too weak "
                         "at this budget or broken: raise its steps or restarts, check its step size against eps "
                         "and its loss; until this passes, the defended cell's robust accuracy is only an upper bound",
    "unbounded-budget": "with the budget lifted the attack should drive accuracy to about 0%; as it does not, the "
                        "gradients it follows are masked or obfuscated: attack with exact or BPDA gradients, more "
                        "EOT samples, or a gradient-free (query) attack, and treat this robust accuracy as unreliable",
    "eot-convergence": "robust accuracy still moves when the attack's EOT samples double, so the attack has not "
                       "averaged out the defense's randomness: raise the attack's EOT samples (e.g. double them) until "
                       "n and 2n samples agree within 2 points, and report that number; on a small check subset "
                       "(checks.subset) a single image moves it more than that, so check on more images first",
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


def run_checks(resolved: ResolvedSuite, comps: Components, cell: Cell, examples: list,
               shard_stats: list[dict]) -> list[CheckResult]:
    """Every enabled per-cell check on a complete attack cell (its stored example rows and
    per-shard attack stats); a check that itself fails is recorded as failed, never fatal."""
    summary = metrics.summarise(examples)
    results = []
    for name, fn in CHECKS.items():
        if not (enabled(resolved, name) or (name == "gradient-correctness" and _attacks_through_adjoint(comps, cell))):
            continue
        try:
            results.append(fn(resolved=resolved, cell=cell, comps=comps, summary=summary, shard_stats=shard_stats))
        except Exception as exc:  # noqa: BLE001 - a broken check must not lose the cell's results
            results.append(CheckResult(name, "fail", f"{CRASHED}: {type(exc).__name__}: {exc}"))
    return results


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
