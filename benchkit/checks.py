"""Evaluation sanity checks, run per cell and stored with it.

Each check returns a CheckResult: a name, pass / fail / skipped, the numbers behind it and a
one-line reason. A failed check does not change the numbers; it flags them in the leaderboard.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable

from benchkit import metrics


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


def run_checks(suite, cell, cell_id: int, comps, store) -> list[CheckResult]:
    enabled = suite.checks.enabled
    summary = metrics.summarise(store.examples(cell_id))
    shard_stats = [json.loads(s["stats_json"]) for s in store.shards(cell_id)]
    ctx = {"suite": suite, "cell": cell, "comps": comps, "summary": summary, "shard_stats": shard_stats}
    results = []
    for name, fn in CHECKS.items():
        if enabled != "all" and name not in enabled:
            continue
        results.append(fn(**ctx))
    return results
