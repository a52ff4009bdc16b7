"""The paper's Table 14: seconds to classify one image with DiffPure against t*, per paper model.

Full-size architectures with random weights (timing does not depend on the weights): the score
model and the classifier of each row, batch 1, no gradient, on the best available device. On a
slow machine the reverse solve is timed at two short step counts and extended linearly to the
N = t*/dt steps of each t* (every step costs the same network call; the fit's intercept holds
the forward noising and the classifier); `--full` times every t* end to end instead.

Prints one JSON object: per row and t*, our seconds, the paper's V100 seconds and their ratio.
Usage: python benchmarks/bench_table14.py [--rows cifar10,imagenet,celebahq] [--full] [--device auto]
"""
from __future__ import annotations

import argparse
import json
import time

import torch

# Nie et al. 2022, Table 14 (NVIDIA V100, one image): seconds at t* = 0, 0.05, 0.1, 0.15.
PAPER = {"cifar10": {0.0: 0.055, 0.05: 5.12, 0.1: 10.56, 0.15: 15.36},
         "imagenet": {0.0: 0.062, 0.05: 5.58, 0.1: 11.13, 0.15: 17.14}}
T_STARS = (0.05, 0.1, 0.15)
# The sampler each row's authors purified with (CelebA-HQ: SDEdit's DDPM ancestral chain).
SAMPLER = {"cifar10": "vp-sde", "imagenet": "vp-sde", "celebahq": "ddpm"}


def key(t: float) -> str:
    return f"t_star_{t:g}"


def build(row: str, device: torch.device):
    """(score model, classifier, image shape, score-model input size, dt) of a Table 14 row."""
    from benchkit_diffpure import plugin as dp
    from benchkit_diffpure.score import ContinuousTimeScore, DiscreteTimeScore

    if row == "cifar10":
        from benchkit_baselines.cifar_wideresnet import WideResNet
        from benchkit_diffpure.architectures.ncsnpp import NCSNpp

        return ContinuousTimeScore(NCSNpp.from_config(dp.DDPMPP_CONFIG)), WideResNet(28, 10), (3, 32, 32), 1e-3
    if row == "imagenet":
        import torchvision

        from benchkit_diffpure.architectures.guided_unet import GuidedUNet

        return (DiscreteTimeScore(GuidedUNet.from_config(dp.ADM_CONFIG), eps_channels=3),
                torchvision.models.resnet50(weights=None), (3, 256, 256), 1e-3)
    if row == "celebahq":
        from benchkit_baselines.attribute_net import AttributeNet
        from benchkit_diffpure.architectures.ddpm_unet import DDPMUNet

        return (DiscreteTimeScore(DDPMUNet.from_config(dp.CELEBAHQ_CONFIG), eps_channels=3), AttributeNet(),
                (3, 256, 256), 1e-3)
    raise SystemExit(f"unknown row {row!r}: expected cifar10, imagenet or celebahq")


def seconds(fn, device: torch.device, repeats: int = 2) -> float:
    fn()   # warm-up (kernels, allocator)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def time_row(row: str, device: torch.device, full: bool, short: tuple[int, int]) -> dict:
    from benchkit.noise import PerExampleNoise
    from benchkit_diffpure.purifier import DiffPure

    score, clf, shape, dt = build(row, device)
    score, clf = score.to(device).eval(), clf.to(device).eval()
    x = torch.rand(1, *shape, device=device)

    def classify_with(t_star: float | None):
        purifier = None if t_star is None else DiffPure(score, sampler=SAMPLER[row], t_star=t_star, dt=dt).to(device)

        def go():
            with torch.inference_mode():
                z = x if purifier is None else purifier.purify(x, gradient="none", noise=PerExampleNoise([0]))
                clf(z)
        return go

    out = {key(0): seconds(classify_with(None), device)}
    if full:
        for t in T_STARS:
            out[key(t)] = seconds(classify_with(t), device, repeats=1)
        out["method"] = "timed end to end"
    else:
        k1, k2 = short
        s1, s2 = (seconds(classify_with(k * dt), device) for k in (k1, k2))
        per_step = (s2 - s1) / (k2 - k1)
        fixed = s1 - per_step * k1
        for t in T_STARS:
            out[key(t)] = fixed + per_step * round(t / dt)
        out["method"] = f"{k1} and {k2} steps timed, extended linearly to t*/dt steps"
        out["seconds_per_step"] = per_step
    if row in PAPER:
        out["paper_v100"] = {key(t): s for t, s in PAPER[row].items()}
        out["ratio_to_paper"] = {key(t): out[key(t)] / s for t, s in PAPER[row].items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="cifar10,imagenet,celebahq")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--full", action="store_true", help="time every t* end to end (needs a GPU to be quick)")
    ap.add_argument("--short", default="2,4", help="step counts timed when not --full")
    args = ap.parse_args()
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    short = tuple(int(k) for k in args.short.split(","))
    result = {"device": str(device), "threads": torch.get_num_threads(),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "rows": {row: time_row(row, device, args.full, short) for row in args.rows.split(",")}}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
