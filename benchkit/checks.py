"""Evaluation sanity checks, run per cell and stored with it.

Each check returns a CheckResult: a name, pass / fail / skipped, the numbers behind it and a
one-line reason. A failed check does not change the numbers; it flags them in the leaderboard.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from benchkit import metrics, registry
from benchkit.attack import AttackContext
from benchkit.defended import DefendedModel, Identity
from benchkit.evaluate import robust_accuracy
from benchkit.noise import derive_seed


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

def _subset(ctx: dict):
    suite, comps = ctx["suite"], ctx["comps"]
    n = min(suite.checks.subset, len(comps.dataset))
    x, y = comps.dataset.get(range(n))
    return x.to(comps.device), y.to(comps.device)


def _rebuild_attack(cell, overrides: dict):
    """The cell's attack with some params changed, or None if its params have no such keys."""
    entry = registry.get("attacks").get(cell.attack.plugin)
    if not all(k in entry.params.model_fields for k in overrides):
        return None
    return entry.build({**cell.attack.params, **overrides})


def _attack_ctx(ctx: dict, tag: str) -> AttackContext:
    suite, cell, comps = ctx["suite"], ctx["cell"], ctx["comps"]
    return AttackContext(device=comps.device, seed=derive_seed(suite.seed, cell.key, tag) % 2**31,
                         undefended=comps.classifiers[cell.classifier.id], batch_size=suite.eval.batch_size)


@check("attack-undefended")
def attack_undefended(suite, cell, comps, **ctx) -> CheckResult:
    """The attack must break the undefended classifier on the same images (<= 1%)."""
    ctx = dict(ctx, suite=suite, cell=cell, comps=comps)
    attack = comps.attacks[cell.attack.id]
    if not getattr(attack, "attacks_classifier", True):
        return CheckResult("attack-undefended", "skipped", "the attack targets the purifier alone, not the classifier")
    x, y = _subset(ctx)
    model = DefendedModel(comps.classifiers[cell.classifier.id], Identity())
    acc = robust_accuracy(model, attack, x, y, _attack_ctx(ctx, "undefended"), (suite.seed, cell.key, "undefended"))
    nums = {"undefended_robust": acc, "n": int(x.shape[0])}
    if acc <= 1.0:
        return CheckResult("attack-undefended", "pass", f"undefended classifier at {acc:.1f}% (<= 1%)", nums)
    return CheckResult("attack-undefended", "fail", f"undefended classifier still at {acc:.1f}% (> 1%): attack too weak or broken", nums)


def _unbounded_overrides(attack) -> dict | None:
    name = attack.threat.name
    if name == "Linf":
        return {"eps": 1.0}
    if name == "L2":
        return {"eps": 1e3}
    if name == "StAdv":
        return {"bound": 1.0}
    return None


@check("unbounded-budget")
def unbounded_budget(suite, cell, comps, **ctx) -> CheckResult:
    """With an unbounded budget the defended model must fall to <= 5% (else gradient masking)."""
    ctx = dict(ctx, suite=suite, cell=cell, comps=comps)
    over = _unbounded_overrides(comps.attacks[cell.attack.id])
    attack = _rebuild_attack(cell, over) if over else None
    if attack is None:
        return CheckResult("unbounded-budget", "skipped", "the attack has no budget parameter to lift")
    x, y = _subset(ctx)
    acc = robust_accuracy(comps.defended(cell), attack, x, y, _attack_ctx(ctx, "unbounded"),
                          (suite.seed, cell.key, "unbounded"), repeats=suite.eval.repeats)
    nums = {"unbounded_robust": acc, "overrides": over, "n": int(x.shape[0])}
    if acc <= 5.0:
        return CheckResult("unbounded-budget", "pass", f"unbounded budget drives the defended model to {acc:.1f}% (<= 5%)", nums)
    return CheckResult("unbounded-budget", "fail", f"defended model still at {acc:.1f}% with an unbounded budget: gradient masking suspected", nums)


@check("eot-convergence")
def eot_convergence(suite, cell, comps, **ctx) -> CheckResult:
    """Robust accuracy with n and 2n EOT samples must agree within 2 points."""
    ctx = dict(ctx, suite=suite, cell=cell, comps=comps)
    model = comps.defended(cell)
    if not model.stochastic:
        return CheckResult("eot-convergence", "skipped", "deterministic defense: EOT does not apply")
    entry = registry.get("attacks").get(cell.attack.plugin)
    if "eot" not in entry.params.model_fields:
        return CheckResult("eot-convergence", "skipped", "the attack has no eot parameter")
    n = int(entry.validate(cell.attack.params, cell.attack.id).eot)
    x, y = _subset(ctx)
    accs = {}
    for k in (n, 2 * n):
        accs[k] = robust_accuracy(model, _rebuild_attack(cell, {"eot": k}), x, y, _attack_ctx(ctx, f"eot{k}"),
                                  (suite.seed, cell.key, "eot"), repeats=suite.eval.repeats)
    diff = accs[n] - accs[2 * n]
    nums = {"eot": n, f"robust_eot{n}": accs[n], f"robust_eot{2 * n}": accs[2 * n], "n": int(x.shape[0])}
    if abs(diff) < 2.0:
        return CheckResult("eot-convergence", "pass", f"EOT {n} vs {2 * n}: {accs[n]:.1f}% vs {accs[2 * n]:.1f}%", nums)
    return CheckResult("eot-convergence", "fail", f"EOT not converged: {accs[n]:.1f}% with {n} samples vs {accs[2 * n]:.1f}% with {2 * n}", nums)


@check("gradient-correctness")
def gradient_correctness(suite, cell, comps, **ctx) -> CheckResult:
    """exact / adjoint gradients against autograd through the unrolled solver (same noise).
    The verdict is on the mode this cell's attack differentiates with; the others are reported."""
    purifier = comps.defenses[cell.defense.id]
    agreement = getattr(purifier, "gradient_agreement", None)
    if agreement is None:
        return CheckResult("gradient-correctness", "skipped", "the defense offers no solver gradients to compare")
    x, _ = _subset(dict(ctx, suite=suite, comps=comps))
    cos = agreement(x[: min(4, x.shape[0])])
    nums = {f"cosine_{m}": c for m, c in cos.items()}
    summary = ", ".join(f"{m} cosine {c:.3f}" for m, c in cos.items())
    used = comps.defended(cell).gradient
    if used not in cos:
        return CheckResult("gradient-correctness", "skipped", f"the attack uses '{used}' gradients ({summary})", nums)
    nums["mode"] = used
    if cos[used] < 0.9:
        return CheckResult("gradient-correctness", "fail", f"{used} gradient has cosine {cos[used]:.3f} (< 0.9) with "
                           f"autograd through the unrolled solver ({summary})", nums)
    return CheckResult("gradient-correctness", "pass", summary, nums)


def run_checks(suite, cell, comps, examples: list, shard_stats: list[dict]) -> list[CheckResult]:
    """Every enabled per-cell check on a complete cell (its stored example rows and per-shard attack
    stats); a check that itself fails is recorded as failed, never fatal."""
    enabled = suite.checks.enabled
    summary = metrics.summarise(examples)
    ctx = {"suite": suite, "cell": cell, "comps": comps, "summary": summary, "shard_stats": shard_stats}
    results = []
    for name, fn in CHECKS.items():
        if enabled != "all" and name not in enabled:
            continue
        try:
            results.append(fn(**ctx))
        except Exception as exc:  # noqa: BLE001 - a broken check must not lose the cell's results
            results.append(CheckResult(name, "fail", f"check could not run: {type(exc).__name__}: {exc}"))
    return results


def black_box_vs_white_box(rows: list[dict], square_plugins: tuple[str, ...] = ("square",)) -> dict[str, CheckResult]:
    """Per (classifier, defense): black-box robust accuracy may not be lower than the best
    white-box one by more than 2 points. Returns results keyed by the black-box cell key."""
    out = {}
    for r in rows:
        if r["plugin"] not in square_plugins or r["robust"] is None:
            continue
        wb = [o for o in rows if o["classifier"] == r["classifier"] and o["defense"] == r["defense"]
              and o["plugin"] not in square_plugins and o["robust"] is not None]
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
