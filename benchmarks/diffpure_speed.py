"""DiffPure speed and memory: our choices against their baselines, measured in the same run.

Prints one JSON object. Ratios, not absolute seconds, are the result (this machine is noisy):
  solver_overhead      fixed-step purify (no grad) vs torchsde.sdeint on the same SDE and noise grid
  eot_batching         DefendedModel.expectation(n) in large batches vs n sequential passes
  exact_vs_unrolled    checkpointed exact gradient vs plain autograd through the unrolled solver:
                       time ratio and bytes saved for backward (saved_tensors_hooks)
Usage: python benchmarks/diffpure_speed.py [--batch 32] [--eot 16] [--t-star 0.1] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torchsde

from benchkit.defended import DefendedModel
from benchkit_diffpure import sde
from benchkit_diffpure.purifier import DiffPure
from benchkit_diffpure.score import ContinuousTimeScore


def score_model():
    try:
        from benchkit_zoo.catalog import load_zoo_model
        return ContinuousTimeScore(load_zoo_model("digits-unet")), "digits-unet", (1, 8, 8)
    except Exception:  # noqa: BLE001 - fall back to a stand-in of similar cost
        import sys
        sys.path.insert(0, "tests")
        from diffpure_helpers import TinyConvScore
        return TinyConvScore(channels=1, hidden=64), "tiny-conv", (1, 8, 8)


def best_of(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


class TorchsdeReverse(torch.nn.Module):
    """The reference's formulation: torchsde SDE class in the reversed clock t' = 1 - t."""
    noise_type, sde_type = "diagonal", "ito"

    def __init__(self, score, shape):
        super().__init__()
        self.score, self.shape = score, shape

    def f(self, tp, x):
        t = (1 - tp).expand(x.shape[0])
        xi = x.view(-1, *self.shape)
        b = sde.beta(t).view(-1, 1, 1, 1)
        return (-sde.reverse_sde_drift(xi, t, self.score.score(xi, t), b)).flatten(1)

    def g(self, tp, x):
        return sde.beta(1 - tp).sqrt().expand_as(x)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--eot", type=int, default=16)
    ap.add_argument("--t-star", type=float, default=0.1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    score, name, shape = score_model()
    x = torch.rand(args.batch, *shape)
    y = torch.randint(0, 10, (args.batch,))
    purifier = DiffPure(score, t_star=args.t_star)
    out = {"score_model": name, "batch": args.batch, "t_star": args.t_star, "steps": purifier.n_steps,
           "threads": torch.get_num_threads()}

    # 1. solver overhead: our loop vs torchsde.sdeint (same Euler grid, no gradient).
    ours = best_of(lambda: purifier.purify(x, gradient="none"), args.repeats)
    ts = torch.tensor([1 - args.t_star, 1 - 1e-5])
    ref_sde = TorchsdeReverse(score, shape)

    def reference():
        with torch.no_grad():
            x_t = sde.diffuse(sde.to_centered(x), sde.alpha(args.t_star), torch.randn_like(x))
            torchsde.sdeint(ref_sde, x_t.flatten(1), ts, method="euler", dt=1e-3)
    theirs = best_of(reference, args.repeats)
    out["solver_overhead"] = {"ours_s": ours, "torchsde_s": theirs, "speedup": theirs / ours}

    # 2. EOT: batched expectation vs sequential passes.
    classifier = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(int(torch.tensor(shape).prod()), 10))
    model = DefendedModel(classifier, purifier, gradient="none", max_batch=max(args.batch * args.eot, 1))
    ce = lambda logits, yy: torch.nn.functional.cross_entropy(logits, yy, reduction="none")
    with torch.no_grad():
        batched = best_of(lambda: model.expectation(ce, x, y, args.eot), args.repeats)
        sequential = best_of(lambda: [ce(model(x), y) for _ in range(args.eot)], args.repeats)
    out["eot_batching"] = {"n": args.eot, "batched_s": batched, "sequential_s": sequential, "speedup": sequential / batched}

    # 3. exact (checkpointed) vs unrolled autograd: time and saved-for-backward bytes.
    def grad_with(mode):
        saved = [0]

        def pack(t):
            saved[0] += t.numel() * t.element_size()
            return t
        xr = x.clone().requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            x_c, t_star, x_t = purifier._start(xr, purifier_noise())
            res = purifier._solve(x_c, t_star, x_t, mode, purifier_noise())
        res.sum().backward()
        return saved[0]

    from benchkit.noise import PerExampleNoise
    purifier_noise = lambda: PerExampleNoise(list(range(args.batch)))
    mem = {m: grad_with(m) for m in ("exact", "autograd")}
    t_exact = best_of(lambda: grad_with("exact"), args.repeats)
    t_auto = best_of(lambda: grad_with("autograd"), args.repeats)
    out["exact_vs_unrolled"] = {"exact_s": t_exact, "unrolled_s": t_auto, "time_ratio": t_exact / t_auto,
                                "exact_saved_mb": mem["exact"] / 2**20, "unrolled_saved_mb": mem["autograd"] / 2**20,
                                "memory_ratio": mem["exact"] / mem["autograd"]}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
