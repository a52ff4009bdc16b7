"""One shard of one cell: clean verdicts, the attack, host-side verification, re-evaluation.

The attack gets copies of the images and labels and only proposes examples. The host checks each
one against its own untouched copies and the budget the suite's params declare (type, dtype, shape,
device, finite, in [0, 1], within budget with a tiny float tolerance: never clipped) and classifies
it itself, `repeats` times with per-image noise for stochastic defenses. Every random draw, the
attack's and the defense's, is seeded per image: (suite seed, cell, variant, image index, purpose).
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor

from benchkit import memory, png
from benchkit.attack import Attack, AttackContext, AttackResult
from benchkit.defended import DefendedModel, Purifier
from benchkit.noise import PerExampleNoise, derive_seed
from benchkit.protocol import Protocol, decide, tally
from benchkit.resolve import Cell, Components, ResolvedSuite
from benchkit.suite import VerdictSpec
from benchkit.threat import ThreatModel


class CellFailure(Exception):
    """The cell cannot produce trustworthy numbers (e.g. an example outside the threat model)."""


def _correct(model: DefendedModel, x: Tensor, y: Tensor, seeds: list[list[int]], batch_size: int,
             aggregate: str = "single") -> Tensor:
    """One verdict per image (bool, on the CPU): seeds[s][i] seeds image i's s-th purification,
    combined by the protocol's `aggregate` (benchkit.protocol)."""
    n, k = x.shape[0], len(seeds)
    # All k purifications of all images as one stream of rows (sample-major), in batch_size chunks;
    # a chunk that runs out of memory runs as its halves (each row keeps its seed), and the smaller
    # size is kept in the model's limits.
    rows = [(j, i) for j in range(k) for i in range(n)]

    def run(lo: int, hi: int) -> tuple[Tensor, Tensor]:
        images = torch.tensor([i for _, i in rows[lo:hi]], device=x.device)
        noise = PerExampleNoise([seeds[j][i] for j, i in rows[lo:hi]])
        with torch.inference_mode():
            return images, model.logits(x[images], noise=noise).float()

    total = None
    shrink = lambda tried, to: model.limits.shrink("verify_rows", tried, to)
    for _, _, (images, logits) in memory.in_halves(run, 0, len(rows), shrink,
                                                   most=lambda: model.limits.cap("verify_rows", batch_size)):
        with torch.inference_mode():
            if total is None:
                total = logits.new_zeros((n, logits.shape[1]))
            total.index_add_(0, images, tally(logits, aggregate))
    return decide(total, y, aggregate).cpu()


def _flags(columns: list[Tensor]) -> list[str]:
    m = torch.stack(columns, 1)
    return ["".join("1" if v else "0" for v in row) for row in m.tolist()]


def verdicts(model: DefendedModel, x: Tensor, y: Tensor, indices: Sequence[int], seed_parts: tuple,
             repeats: int, batch_size: int, verdict: VerdictSpec | None = None) -> list[str]:
    """Per image, '1'/'0' per repeat: correct or not under the verification protocol, the
    purification noise seeded (*seed_parts, index, repeat[, sample]). A deterministic defense
    gets one verdict from one pass."""
    verdict = verdict or VerdictSpec()
    if not model.stochastic:
        repeats, verdict = 1, VerdictSpec()
    k = verdict.samples

    def seeds(r: int) -> list[list[int]]:
        if k == 1:
            return [[derive_seed(*seed_parts, i, r) for i in indices]]
        return [[derive_seed(*seed_parts, i, r, "sample", j) for i in indices] for j in range(k)]

    return _flags([_correct(model, x, y, seeds(r), batch_size, verdict.aggregate) for r in range(repeats)])


def check_result(result: object, x: Tensor, threat: ThreatModel) -> tuple[Tensor, dict]:
    """The examples of an attack's result, or CellFailure naming the first broken rule."""
    if not isinstance(result, AttackResult):
        raise CellFailure(f"returned {type(result).__name__}, not an AttackResult")
    x_adv, extra = result.x_adv, result.extra
    if not isinstance(x_adv, Tensor):
        raise CellFailure(f"x_adv is a {type(x_adv).__module__}.{type(x_adv).__name__}, not a torch tensor")
    if x_adv.dtype != x.dtype:
        raise CellFailure(f"x_adv has dtype {x_adv.dtype}, expected {x.dtype} (the images' own)")
    if tuple(x_adv.shape) != tuple(x.shape):
        raise CellFailure(f"x_adv has shape {tuple(x_adv.shape)}, expected {tuple(x.shape)}")
    if x_adv.device != x.device:
        raise CellFailure(f"x_adv is on {x_adv.device}, expected {x.device}")
    if not isinstance(extra, dict) or not all(isinstance(v, Tensor) and v.shape[:1] == x.shape[:1] for v in extra.values()):
        raise CellFailure("extra must map names to tensors with one row per image")
    verdict = result.verdict
    if verdict is not None and not (isinstance(verdict, Tensor) and tuple(verdict.shape) == (x.shape[0],)
                                    and (verdict.dtype == torch.bool or bool(((verdict == 0) | (verdict == 1)).all()))):
        raise CellFailure(f"verdict must be a tensor of {x.shape[0]} booleans (robust per image), got "
                          f"{type(verdict).__name__}{' of shape ' + str(tuple(verdict.shape)) if isinstance(verdict, Tensor) else ''}")
    iteration = result.iteration
    if iteration is not None and not (isinstance(iteration, Tensor) and tuple(iteration.shape) == (x.shape[0],)
                                      and not iteration.is_floating_point() and iteration.dtype != torch.bool
                                      and bool((iteration >= 0).all())):
        raise CellFailure(f"iteration must be a tensor of {x.shape[0]} non-negative integers (the iteration that "
                          f"produced each example), got {type(iteration).__name__}"
                          f"{' ' + str(iteration.dtype) + ' of shape ' + str(tuple(iteration.shape)) if isinstance(iteration, Tensor) else ''}")
    x_adv = x_adv.detach()
    extra = {k: v.detach() for k, v in extra.items()}
    problems = threat.violations(x, x_adv, extra)
    if problems:
        raise CellFailure(f"returned invalid examples: {'; '.join(problems)}")
    return x_adv, extra


def _variant_progress(progress: Callable[[float], None] | None, k: int, n: int) -> Callable[[int, int], None] | None:
    """The AttackContext receiver of variant k of n: its (done, total) as a fraction of all variants."""
    if progress is None:
        return None
    return lambda done, total: progress((k + min(1.0, max(0.0, done / total))) / n)


def _piece_progress(report: Callable[[int, int], None] | None, lo: int, hi: int, n: int
                    ) -> Callable[[int, int], None] | None:
    """The AttackContext receiver of an attack run on images lo..hi-1 of n: its (done, total)
    as the share of all n images done, in images."""
    if report is None or (lo, hi) == (0, n):
        return report
    return lambda done, total: report(lo * total + (hi - lo) * min(done, total), n * total)


def _joined(pieces: list[tuple[int, int, object]], x: Tensor, threat: ThreatModel) -> AttackResult:
    """One AttackResult from an attack's results on consecutive parts of x, each verified on its
    own images first; stats averaged over the images (weighted by each part's count)."""
    checked = [(lo, hi, r, *check_result(r, x[lo:hi], threat)) for lo, hi, r in pieces]

    def cat(name: str) -> Tensor | None:
        parts = [getattr(r, name) for _, _, r, _, _ in checked]
        return None if any(p is None for p in parts) else torch.cat(parts)

    stats: dict[str, float] = {}
    for lo, hi, r, _, _ in checked:
        for key, v in (r.stats or {}).items():
            if isinstance(v, (int, float)):
                stats[key] = stats.get(key, 0.0) + v * (hi - lo) / x.shape[0]
    return AttackResult(torch.cat([a for *_, a, _ in checked]),
                        {key: torch.cat([e[key] for *_, e in checked]) for key in checked[0][4]},
                        stats, cat("verdict"), cat("iteration"))


def run_attack(model: DefendedModel, attack: Attack, threat: ThreatModel, x: Tensor, y: Tensor,
               indices: Sequence[int], ctx_base: dict, seed_parts: tuple,
               progress: Callable[[float], None] | None = None) -> Iterator[tuple[str, Tensor, dict, AttackResult]]:
    """Run every variant of an attack on copies of (x, y), its randomness and the defense's seeded
    per image, and verify each returned batch against `threat` and the host's own x.
    `progress` receives the fraction of the attack done, from the variants' `ctx.progress` reports.
    An attack that runs out of memory runs again on the two halves of the images (down to one
    image; the smaller size is kept in the model's limits): each image keeps its noise streams, so
    benchkit's attacks return the same examples; a library seeded once per call does not.
    Yields (variant, x_adv, extra, result)."""
    variants = attack.variants()
    n = x.shape[0]
    for k, (variant, sub) in enumerate(variants):
        parts = (*seed_parts, variant)
        base = model if sub.gradient is None else model.with_gradient(sub.gradient)
        report = _variant_progress(progress, k, len(variants))

        def run(lo: int, hi: int) -> object:
            # Only for libraries that draw from the global RNG (pyautoattack): ours draw per image.
            torch.manual_seed(derive_seed(*parts, "global"))
            attacked = base.for_images(x[lo:hi], [derive_seed(*parts, i, "defense") for i in indices[lo:hi]])
            ctx = AttackContext(seed=derive_seed(*parts) % 2**31,
                                noise=PerExampleNoise([derive_seed(*parts, i, "attack") for i in indices[lo:hi]]),
                                on_progress=_piece_progress(report, lo, hi, n), **ctx_base)
            return sub.run(attacked, x[lo:hi].clone(), y[lo:hi].clone(), ctx)

        shrink = lambda tried, to: model.limits.shrink("attack_images", tried, to)
        try:
            pieces = list(memory.in_halves(run, 0, n, shrink, most=lambda: model.limits.attack_images))
        except CellFailure:
            raise
        except Exception as exc:
            raise CellFailure(f"{'variant ' + variant + ': ' if variant else ''}{one_line(exc)}") from exc
        try:
            result = pieces[0][2] if len(pieces) == 1 else _joined(pieces, x, threat)
            x_adv, extra = check_result(result, x, threat)
        except CellFailure as exc:
            raise CellFailure(f"{'variant ' + variant + ' ' if variant else ''}{exc}") from None
        yield variant, x_adv, extra, result


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


STRIP_IMAGES = 4   # the first images of a cell kept as purification strips for the report
STRIP_FRAMES = 4   # asked of the defense's trajectory (input, intermediate states, purified)


def strip_samples(purifier: Purifier, seed: int, cell: Cell, indices: Sequence[int], x: Tensor,
                  x_adv: Tensor) -> list[tuple]:
    """(image_index, frame, label, png) rows showing how the defense purifies the adversarial
    examples of the cell's first STRIP_IMAGES images, for defenses that can show their work: a
    `trajectory(x, n_frames, noise=)` method returning ([n_frames, B, C, H, W] in [0, 1], a label
    per frame). The clean image is added last. Other defenses: no rows."""
    trajectory = getattr(purifier, "trajectory", None)
    keep = [i for i, idx in enumerate(indices) if idx < STRIP_IMAGES]
    if not callable(trajectory) or not keep:
        return []
    noise = PerExampleNoise([derive_seed(seed, cell.key, "strip", indices[i]) for i in keep])
    try:
        with torch.no_grad():
            frames, labels = trajectory(x_adv[keep], STRIP_FRAMES, noise=noise)
        frames = frames.cpu()
        if len(labels) != frames.shape[0]:
            raise ValueError(f"{frames.shape[0]} frames but {len(labels)} labels")
    except Exception as exc:  # noqa: BLE001 - a display aid must never cost the shard its results
        warnings.warn(f"{cell.key}: no purification strip: trajectory failed: {type(exc).__name__}: {exc}")
        return []
    frames = torch.cat([frames, x[keep].detach().cpu()[None]])
    labels = [str(lbl) for lbl in labels] + ["clean"]
    return [(int(indices[i]), f, label, png.from_tensor(frames[f, j]))
            for j, i in enumerate(keep) for f, label in enumerate(labels)]


@dataclass
class ShardResult:
    # (image_index, variant, label, clean_flags, adv_flags or None, distance or None,
    #  the attack's own verdict: 1 robust / 0 broken / None, the iteration that produced the example or None)
    rows: list[tuple]
    stats: dict
    seconds: float
    samples: list[tuple] = field(default_factory=list)   # (image_index, frame, label, png): see strip_samples
    # The clean verdicts this shard computed (images, seconds): what an image of its group's
    # whole-split standard-accuracy cell costs, known before that cell runs (progress estimates).
    clean_cost: tuple[int, float] = (0, 0.0)
    # What ran out of memory and was split in this shard (benchkit.memory.Limits.take; {}: nothing).
    memory: dict = field(default_factory=dict)


def attack_context(resolved: ResolvedSuite, comps: Components, cell: Cell) -> dict:
    """What every attack of a cell is told beyond its images (AttackContext's shared fields)."""
    ev = resolved.suite.eval
    return {"device": comps.device, "undefended": comps.classifiers[cell.classifier.id], "batch_size": ev.batch_size,
            "protocol": Protocol(ev.repeats, ev.verdict.aggregate, ev.verdict.samples)}


def _clean(resolved: ResolvedSuite, comps: Components, cell: Cell, model: DefendedModel, x: Tensor, y: Tensor,
           indices: Sequence[int]) -> tuple[list[str], tuple[int, float]]:
    """Clean verdicts depend on (classifier, defense, dataset, image) only: computed once per image
    of a group and shared by its attacks. Also returns what the ones computed here cost (images, seconds)."""
    suite = resolved.suite
    tag = "clean" if cell.kind == "attack" else "clean-split"
    todo = [k for k, i in enumerate(indices) if (cell.group, tag, i) not in comps.clean_flags]
    t0 = time.perf_counter()
    if todo:
        flags = verdicts(model, x[todo], y[todo], [indices[k] for k in todo], (suite.seed, cell.group, tag),
                         suite.eval.repeats, suite.eval.batch_size, suite.eval.verdict)
        comps.clean_flags.update({(cell.group, tag, indices[k]): f for k, f in zip(todo, flags)})
    return [comps.clean_flags[cell.group, tag, i] for i in indices], (len(todo), time.perf_counter() - t0)


def evaluate_shard(resolved: ResolvedSuite, comps: Components, cell: Cell, indices: Sequence[int],
                   progress: Callable[[float], None] | None = None) -> ShardResult:
    """Evaluate the images at `indices` for one cell. Raises CellFailure on an invalid example.
    `progress` receives the fraction of the attack done, as its variants report it."""
    t0 = time.perf_counter()
    suite, device = resolved.suite, comps.device
    x, y = comps.dataset(cell).get(indices)
    x, y = x.to(device), y.to(device)
    attack = comps.attacks[cell.attack.id] if cell.attack is not None else None
    # Clean verdicts predict without gradients: any mode serves. The cell's out-of-memory backoff
    # (comps.memory_limits) carries over from its earlier shards in this process.
    model = comps.defended(cell, attack)
    limits = model.limits
    clean_flags, clean_cost = _clean(resolved, comps, cell, model, x, y, indices)
    if attack is None:
        rows = [(int(idx), "", int(y[k]), clean_flags[k], None, None, None, None) for k, idx in enumerate(indices)]
        return ShardResult(rows, {}, time.perf_counter() - t0, clean_cost=clean_cost, memory=limits.take())
    threat = resolved.threats[cell.attack.id]
    ctx_base = attack_context(resolved, comps, cell)
    rows, stats, samples = [], {}, None
    for variant, x_adv, extra, result in run_attack(model, attack, threat, x, y, indices, ctx_base,
                                                    (suite.seed, cell.key), progress):
        if samples is None:  # the first variant's examples
            samples = strip_samples(model.purifier, suite.seed, cell, indices, x, x_adv)
        distance = threat.distance(x, x_adv, extra).cpu().tolist()
        adv_flags = verdicts(model, x_adv, y, indices, (suite.seed, cell.key, variant, "adv"), suite.eval.repeats,
                             suite.eval.batch_size, suite.eval.verdict)
        claimed = [None] * len(indices) if result.verdict is None else result.verdict.cpu().int().tolist()
        found = [None] * len(indices) if result.iteration is None else result.iteration.cpu().tolist()
        for k, idx in enumerate(indices):
            rows.append((int(idx), variant, int(y[k]), clean_flags[k], adv_flags[k], float(distance[k]), claimed[k],
                         found[k]))
        stats.update({f"{variant}.{k}" if variant else k: v for k, v in (result.stats or {}).items()
                      if isinstance(v, (int, float))})
    return ShardResult(rows, stats, time.perf_counter() - t0, samples or [], clean_cost, limits.take())
