"""One cell shard: clean accuracy, the attack, host-side verification, re-evaluation.

The attack only proposes examples. The host checks each one against the threat model (finite,
in [0, 1], within budget, with a tiny float tolerance: never clipped) and classifies it itself,
`repeats` times with per-image noise for stochastic defenses.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from benchkit import png, registry
from benchkit.attack import Attack, AttackContext, AttackResult
from benchkit.dataset import Dataset
from benchkit.defended import DefendedModel, Purifier
from benchkit.errors import BadInput
from benchkit.noise import PerExampleNoise, derive_seed
from benchkit.suite import Cell, Suite


class CellFailure(Exception):
    """The cell cannot produce trustworthy numbers (e.g. an example outside the threat model)."""


@dataclass
class Components:
    """Everything a suite needs, built once before any cell runs (so a missing checkpoint fails
    before anything is computed)."""
    dataset: Dataset
    classifiers: dict[str, nn.Module]
    defenses: dict[str, Purifier]
    attacks: dict[str, Attack]
    device: torch.device
    defense_gradients: dict[str, str | None] = field(default_factory=dict)
    # Clean verdicts per (classifier/defense, shard indices): every attack of a group shares them.
    clean_flags: dict[tuple[str, tuple[int, ...]], list[str]] = field(default_factory=dict)
    # The dataset's whole split, for standard accuracy on it (eval.clean_on: split); else None.
    split: Dataset | None = None

    def defended(self, cell: Cell) -> DefendedModel:
        purifier = self.defenses[cell.defense.id]
        attack = self.attacks[cell.attack.id]
        gradient = attack.gradient or self.defense_gradients.get(cell.defense.id) or default_gradient(purifier)
        return DefendedModel(self.classifiers[cell.classifier.id], purifier, gradient=gradient)


def default_gradient(purifier: Purifier) -> str:
    for mode in ("exact", "adjoint", "bpda", "none"):
        if mode in purifier.gradient_modes:
            return mode
    return "none"


def _freeze(module: nn.Module, device: torch.device) -> nn.Module:
    module.to(device).eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def build_components(suite: Suite, path: str, device: torch.device) -> Components:
    problems: list[str] = []

    def build(kind: str, where: str, plugin: str, params: dict):
        try:
            entry = registry.get(kind).get(plugin, where=f"{path}: {where}.plugin")
            validated = entry.validate(params, f"{path}: {where}")
        except BadInput as exc:
            problems.extend(exc.problems)
            return None
        try:
            return entry.build(validated)
        except (BadInput, FileNotFoundError) as exc:  # e.g. a missing checkpoint: say which entry needs it
            problems.extend(f"{path}: {where}: {p}" for p in getattr(exc, "problems", [str(exc)]))
        return None

    dataset = build("datasets", "dataset", suite.dataset.plugin, suite.dataset.params)
    split = None
    if suite.eval.clean_on == "split":
        whole = suite.dataset.whole_split()
        split = build("datasets", "dataset (eval.clean_on: split)", whole.plugin, whole.params)
    classifiers = {c.id: build("classifiers", f"classifiers[{i}]", c.plugin, c.params) for i, c in enumerate(suite.classifiers)}
    defenses = {d.id: build("defenses", f"defenses[{i}]", d.plugin, d.params) for i, d in enumerate(suite.defenses)}
    attacks = {a.id: build("attacks", f"attacks[{i}]", a.plugin, a.params) for i, a in enumerate(suite.attacks)}
    for i, d in enumerate(suite.defenses):
        purifier = defenses.get(d.id)
        if purifier is not None and d.gradient and d.gradient not in purifier.gradient_modes:
            problems.append(f"{path}: defenses[{i}].gradient: '{d.id}' supports {', '.join(purifier.gradient_modes)}, not '{d.gradient}'")
    if problems:
        raise BadInput(problems)
    return Components(dataset, {k: _freeze(v, device) for k, v in classifiers.items()},
                      {k: _freeze(v, device) for k, v in defenses.items()}, attacks, device,
                      {d.id: d.gradient for d in suite.defenses}, split=split)


def _classify(model: DefendedModel, x: Tensor, y: Tensor, seeds: list[int], batch_size: int) -> Tensor:
    out = []
    for s in range(0, x.shape[0], batch_size):
        noise = PerExampleNoise(seeds[s:s + batch_size])
        with torch.inference_mode():
            out.append(model.predict(x[s:s + batch_size], noise=noise) == y[s:s + batch_size])
    return torch.cat(out).cpu()


def _flags(columns: list[Tensor]) -> list[str]:
    m = torch.stack(columns, 1)
    return ["".join("1" if v else "0" for v in row) for row in m.tolist()]


def clean_verdicts(model: DefendedModel, x: Tensor, y: Tensor, indices: Sequence[int], seed_parts: tuple,
                   tag: str, repeats: int, batch_size: int) -> list[str]:
    """Per image, '1'/'0' per repeat: correct on the unattacked input, noise seeded per image."""
    return _flags([_classify(model, x, y, [derive_seed(*seed_parts, i, tag, r) for i in indices], batch_size)
                   for r in range(repeats)])


def run_attack(model: DefendedModel, attack: Attack, x: Tensor, y: Tensor, ctx: AttackContext,
               seed_parts: tuple) -> Iterator[tuple[str, Attack, Tensor, "AttackResult"]]:
    """Run every variant of an attack, seeding the global RNG per variant, and verify each
    returned batch against the threat model; yields (variant, sub-attack, x_adv, result)."""
    for variant, sub in attack.variants():
        torch.manual_seed(derive_seed(*seed_parts, variant, ctx.seed))
        attacked = model if sub.gradient is None else model.with_gradient(sub.gradient)
        result = sub.run(attacked, x, y, ctx)
        x_adv = result.x_adv.detach().to(x.device)
        problems = sub.threat.violations(x, x_adv, result.extra)
        if problems:
            raise CellFailure(f"{'variant ' + variant + ' ' if variant else ''}returned invalid examples: {'; '.join(problems)}")
        yield variant, sub, x_adv, result


def robust_accuracy(model: DefendedModel, attack: Attack, x: Tensor, y: Tensor, ctx: AttackContext,
                    seed_parts: tuple, repeats: int = 1) -> float:
    """Per-image worst case over the attack's variants, mean over `repeats` re-evaluations, in %."""
    robust = torch.ones(x.shape[0], dtype=torch.bool)
    for variant, _, x_adv, _ in run_attack(model, attack, x, y, ctx, seed_parts):
        reps = repeats if model.stochastic else 1
        hits = torch.stack([_classify(model, x_adv, y, [derive_seed(*seed_parts, variant, i, r) for i in range(x.shape[0])],
                                      x.shape[0]) for r in range(reps)]).float().mean(0)
        robust &= hits > 0.5
    return float(robust.float().mean() * 100)


STRIP_IMAGES = 4   # the first images of a cell kept as purification strips for the report
STRIP_FRAMES = 4   # adversarial, diffused x(t*), mid-way, purified (then the clean image)


def strip_samples(purifier: Purifier, seed: int, cell: Cell, indices: Sequence[int], x: Tensor,
                  x_adv: Tensor) -> list[tuple]:
    """(image_index, frame, kind, png) rows showing how the defense purifies the adversarial
    examples of the cell's first STRIP_IMAGES images, for defenses that can show their work: a
    `trajectory(x, n_frames, noise=)` method returning [n_frames, B, C, H, W] in [0, 1], from
    the input through intermediate states to the purified image. Other defenses: no rows."""
    trajectory = getattr(purifier, "trajectory", None)
    keep = [i for i, idx in enumerate(indices) if idx < STRIP_IMAGES]
    if not callable(trajectory) or not keep:
        return []
    noise = PerExampleNoise([derive_seed(seed, cell.key, "strip", indices[i]) for i in keep])
    try:
        with torch.no_grad():
            frames = trajectory(x_adv[keep], STRIP_FRAMES, noise=noise).cpu()
    except Exception as exc:  # noqa: BLE001 - a display aid must never cost the shard its results
        warnings.warn(f"{cell.key}: no purification strip: trajectory failed: {type(exc).__name__}: {exc}")
        return []
    n = frames.shape[0]
    kinds = ["adversarial", "diffused (t*)", *["mid-way"] * (n - 3), "purified"]
    frames = torch.cat([frames, x[keep].detach().cpu()[None]])
    return [(int(indices[i]), f, kind, png.from_tensor(frames[f, j]))
            for j, i in enumerate(keep) for f, kind in enumerate([*kinds, "clean"])]


@dataclass
class ShardResult:
    rows: list[tuple]
    stats: dict
    seconds: float
    samples: list[tuple] = field(default_factory=list)   # (image_index, frame, kind, png): see strip_samples


def evaluate_shard(suite: Suite, cell: Cell, comps: Components, indices: Sequence[int],
                   repeats: int | None = None) -> ShardResult:
    """Evaluate the images at `indices` for one cell. Raises CellFailure on an invalid example."""
    t0 = time.perf_counter()
    device, bs = comps.device, suite.eval.batch_size
    x, y = comps.dataset.get(indices)
    x, y = x.to(device), y.to(device)
    model = comps.defended(cell)
    reps = (repeats or suite.eval.repeats) if model.stochastic else 1
    group = f"{cell.classifier.id}/{cell.defense.id}"
    # Clean verdicts depend on (classifier, defense, image) only: identical across attacks, so
    # they are computed once per shard of a group.
    key = (group, tuple(indices))
    if key not in comps.clean_flags:
        comps.clean_flags[key] = clean_verdicts(model, x, y, indices, (suite.seed, group), "clean", reps, bs)
    clean_flags = comps.clean_flags[key]
    attack = comps.attacks[cell.attack.id]
    ctx = AttackContext(device=device, seed=derive_seed(suite.seed, cell.key, indices[0]) % 2**31,
                        undefended=comps.classifiers[cell.classifier.id], batch_size=bs)
    rows, stats, samples = [], {}, None
    for variant, sub, x_adv, result in run_attack(model, attack, x, y, ctx, (suite.seed, cell.key)):
        if samples is None:  # the first variant's examples
            samples = strip_samples(model.purifier, suite.seed, cell, indices, x, x_adv)
        distance = sub.threat.distance(x, x_adv, result.extra).cpu().tolist()
        adv = [_classify(model, x_adv, y, [derive_seed(suite.seed, cell.key, variant, i, "adv", r) for i in indices], bs)
               for r in range(reps)]
        adv_flags = _flags(adv)
        for i, idx in enumerate(indices):
            rows.append((int(idx), variant, int(y[i]), clean_flags[i], adv_flags[i], float(distance[i])))
        stats.update({f"{variant}.{k}" if variant else k: v for k, v in result.stats.items()})
    return ShardResult(rows, stats, time.perf_counter() - t0, samples or [])


def evaluate_split_shard(suite: Suite, classifier: str, defense: str, comps: Components,
                         indices: Sequence[int]) -> ShardResult:
    """Standard accuracy of (classifier, defense) on the whole split's images at `indices`:
    rows (image_index, label, flags), `repeats` verdicts each for a stochastic defense."""
    t0 = time.perf_counter()
    x, y = comps.split.get(indices)
    x, y = x.to(comps.device), y.to(comps.device)
    purifier = comps.defenses[defense]
    model = DefendedModel(comps.classifiers[classifier], purifier, gradient=default_gradient(purifier))
    reps = suite.eval.repeats if model.stochastic else 1
    flags = clean_verdicts(model, x, y, indices, (suite.seed, f"{classifier}/{defense}"), "clean-split", reps,
                           suite.eval.batch_size)
    rows = [(int(idx), int(y[k]), flags[k]) for k, idx in enumerate(indices)]
    return ShardResult(rows, {}, time.perf_counter() - t0)
