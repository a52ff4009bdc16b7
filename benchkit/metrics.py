"""Accuracy summaries from per-image, per-repeat correctness flags.

For a stochastic defense each final example is classified `repeats` times with fresh randomness:
  expected  mean (± std over repeats) of the per-repeat accuracy
  worst     worst-of-N: correct in every repeat
  majority  correct in more than half of the repeats
  ci_low, ci_high  95% Wilson score interval over the n images for `mean` (see wilson)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# The two-sided 95% normal quantile, norm.ppf(0.975) (as scipy's binomtest uses it).
Z95 = 1.959963984540054


@dataclass(frozen=True)
class Accuracy:
    n: int
    repeats: int
    mean: float
    std: float
    worst: float
    majority: float
    ci_low: float = float("nan")
    ci_high: float = float("nan")

    def as_dict(self) -> dict:
        return {"n": self.n, "repeats": self.repeats, "mean": self.mean, "std": self.std,
                "worst": self.worst, "majority": self.majority, "ci_low": self.ci_low, "ci_high": self.ci_high}


def wilson(k: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval (no continuity correction) for k successes in n trials, as
    fractions; k may be fractional (a sum of per-image mean correctness, see accuracy)."""
    if n <= 0:
        return float("nan"), float("nan")
    p = k / n
    center = (2 * n * p + z * z) / (2 * (n + z * z))
    delta = z / (2 * (n + z * z)) * math.sqrt(max(0.0, 4 * n * p * (1 - p) + z * z))
    # At k = 0 (k = n) the bound is exactly 0 (1) analytically; say so rather than keep float dust.
    return (0.0 if k <= 0 else max(0.0, center - delta)), (1.0 if k >= n else min(1.0, center + delta))


def flags_matrix(flags: list[str]) -> np.ndarray:
    """['101', '111'] -> bool array [n_images, repeats]."""
    if not flags:
        return np.zeros((0, 0), dtype=bool)
    return np.array([[c == "1" for c in f] for f in flags], dtype=bool)


def accuracy(m: np.ndarray) -> Accuracy:
    """m: bool [n_images, repeats], in percent.

    std is the spread over evaluation repeats (the defense's randomness on these images); the CI is
    the sampling error over images (how far another draw of n test images could land). With
    repeats > 1 each image counts by its mean correctness over the repeats, a number in [0, 1]
    whose variance is at most mean * (1 - mean): the Wilson interval for a Bernoulli per image is
    then conservative (at least as wide as it needs to be), never too narrow."""
    n, r = m.shape
    if n == 0:
        return Accuracy(0, r, *[float("nan")] * 6)
    per_repeat = m.mean(0) * 100
    lo, hi = wilson(float(m.mean(1).sum()), n)
    return Accuracy(n, r, float(per_repeat.mean()), float(per_repeat.std(ddof=1)) if r > 1 else 0.0,
                    float(m.all(1).mean() * 100), float((m.sum(1) * 2 > r).mean() * 100), lo * 100, hi * 100)


def worst_case(mats: list[np.ndarray]) -> np.ndarray:
    """Per image and repeat, robust only if robust against every attack (variant) listed."""
    out = mats[0].copy()
    for m in mats[1:]:
        out &= m
    return out


def summarise(rows: list) -> dict:
    """Clean and robust accuracy of one cell from its stored example rows.

    robust is the per-image worst case over the attack's variants (e.g. AutoAttack standard and
    rand); per_variant keeps each variant's own numbers; robust_flags is that worst case per image
    and repeat (bool [n_images, repeats]), for worst cases across cells; attack_verdict is the
    attack's own verdict (see attack_verdict), or None.
    """
    by_variant: dict[str, dict[int, str]] = {}
    claimed: dict[str, list] = {}
    clean: dict[int, str] = {}
    for r in rows:
        if r["adv_flags"] is not None:   # None: a clean cell's row (no attack)
            by_variant.setdefault(r["variant"], {})[r["image_index"]] = r["adv_flags"]
            claimed.setdefault(r["variant"], []).append(_get(r, "attack_verdict"))
        clean[r["image_index"]] = r["clean_flags"]
    images = sorted(clean)
    variants = sorted(by_variant)
    mats = {v: flags_matrix([by_variant[v][i] for i in images]) for v in variants}
    out = {"n": len(images), "clean": accuracy(flags_matrix([clean[i] for i in images])),
           "per_variant": {v: accuracy(m) for v, m in mats.items()}}
    out["robust_flags"] = worst_case(list(mats.values())) if mats else None
    out["robust"] = accuracy(out["robust_flags"]) if mats else None
    out["attack_verdict"] = attack_verdict(claimed)
    return out


def _get(row, key: str):
    try:
        return row[key]
    except (KeyError, IndexError):   # rows stored before the column existed
        return None


def attack_verdict(claimed: dict[str, list]) -> dict | None:
    """The attacks' own robust accuracy, as a paper reports it: per variant the share of images the
    attack itself judged robust, and over variants the lowest of those accuracies (the paper takes
    the lower of AutoAttack standard and rand, not a per-image worst case). None unless every
    example of every variant carries a verdict."""
    if not claimed or any(v is None for vs in claimed.values() for v in vs):
        return None
    per = {k: float(np.mean([bool(v) for v in vs]) * 100) for k, vs in claimed.items()}
    return {"per_variant": per, "value": min(per.values()), "n": len(next(iter(claimed.values())))}
