"""DiffPure purification speed and memory, ours against the reference's way, in one process.

Prints one JSON object. Ratios are the result (this machine is noisy); every comparison runs on
the same model and inputs in the same run.
  throughput   our fixed-step solver vs torchsde.sdeint_adjoint called as DiffPure's reference
               code calls it (Euler, dt = 1e-3, default adjoint method, BrownianInterval, network
               parameters left trainable): forward only, and forward + input gradient
  eot          n EOT samples as batched passes (DefendedModel.expectation) vs n sequential passes
  memory       peak resident memory above a same-model baseline, for exact / autograd (unrolled) /
               adjoint at 10, 100 and 1000 steps, each measured in a fresh subprocess
  overhead     how close the no-grad solve is to its network: network_fraction = network time / solve time
               (1.0 at the limit), where the network time is N calls of the wrapped ScoreModel.eps on x(t*)
               with the labels the solver passes (its ReverseField.table), in inference mode as the solve,
               and the solve time DiffPure.purify(x, gradient="none") including the forward noising, with
               the host's per-image noise (PerExampleNoise) and with the global RNG; for digits-unet and a
               DDPM++ stand-in (NCSNpp.from_config, random weights). overhead.network_fraction is the
               lowest of them. outside_network_s: the same solve with a network that costs nothing (its
               first answer returned for every call), i.e. the solver's own time, which a busy machine
               disturbs less than the difference of two large times
  options      the same no-grad solve (per-image noise) with each score-model option against fp32 eager:
               speedup (fp32 eager seconds / the option's), the one-time first-call seconds (compilation)
               and the largest deviation of the purified image from fp32 eager's (same noise, [0, 1] units)
Usage: python benchmarks/bench_purify.py [--batch 32] [--eot 16] [--repeats 3] [--skip-memory]
       [--overhead-repeats 7] [--ddpmpp small|full] [--ddpmpp-batch 8] [--ddpmpp-steps 20] [--ddpmpp-compile]
       [--skip-options]
The default DDPM++ stand-in is reduced (nf 32, 2 residual blocks per resolution, 20 steps) so that the
default run stays within minutes on one CPU thread; --ddpmpp full is the published size (nf 128, 8 blocks).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torchsde

ROOT = Path(__file__).resolve().parents[1]


def score_model():
    from benchkit_diffpure.score import ContinuousTimeScore
    try:
        from benchkit_zoo.catalog import load_zoo_model
        return ContinuousTimeScore(load_zoo_model("digits-unet")), "digits-unet", (1, 8, 8)
    except Exception:  # noqa: BLE001 - weights not built: a stand-in of similar size
        sys.path.insert(0, str(ROOT / "tests"))
        from diffpure_helpers import TinyConvScore
        return TinyConvScore(channels=1, hidden=64), "tiny-conv", (1, 8, 8)


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


class ReferenceRevVPSDE(torch.nn.Module):
    """DiffPure's RevVPSDE formulation: torchsde time t' = 1 - t, f = -(reverse drift), g = sqrt(beta)."""
    noise_type, sde_type = "diagonal", "ito"

    def __init__(self, score, shape):
        super().__init__()
        self.score, self.shape = score, shape

    def f(self, tp, x):
        from benchkit_diffpure import sde
        t = (1 - tp).expand(x.shape[0])
        xi = x.view(-1, *self.shape)
        return (-sde.reverse_sde_drift(xi, t, self.score.score(xi, t), sde.beta(t).view(-1, 1, 1, 1))).flatten(1)

    def g(self, tp, x):
        from benchkit_diffpure import sde
        return sde.beta(1 - tp).sqrt().expand_as(x)


def reference_purify(score, shape, x, t_star, grad: bool):
    from benchkit_diffpure import sde
    score.requires_grad_(True)  # the reference leaves the network trainable: the adjoint integrates its params
    try:
        xr = x.clone().requires_grad_(grad)
        x_t = sde.diffuse(sde.to_centered(xr), sde.alpha(t_star), torch.randn_like(x))
        ts = torch.tensor([1.0 - t_star, 1.0 - 1e-5])
        bm = torchsde.BrownianInterval(t0=ts[0], t1=ts[-1], size=(x.shape[0], x[0].numel()))
        with torch.set_grad_enabled(grad):
            out = torchsde.sdeint_adjoint(ReferenceRevVPSDE(score, shape), x_t.flatten(1), ts, method="euler", bm=bm, dt=1e-3)[-1]
            if grad:
                out.sum().backward()
    finally:
        score.requires_grad_(False)


def throughput(purifier, score, shape, x, repeats):
    def ours(grad):
        def run():
            if grad:
                xr = x.clone().requires_grad_(True)
                purifier.purify(xr, gradient="exact").sum().backward()
            else:
                purifier.purify(x, gradient="none")
        return run
    out = {}
    for name, grad in (("forward", False), ("forward_backward", True)):
        a = best_of(ours(grad), repeats)
        b = best_of(lambda: reference_purify(score, shape, x, purifier.t_star, grad), repeats)
        out[name] = {"ours_s": a, "reference_s": b, "speedup": b / a, "images_per_s": x.shape[0] / a}
    return out


def eot(purifier, x, n, repeats):
    from benchkit.defended import DefendedModel
    classifier = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(x[0].numel(), 10))
    model = DefendedModel(classifier, purifier, gradient="none", max_batch=x.shape[0] * n)
    y = torch.zeros(x.shape[0], dtype=torch.long)
    ce = lambda logits, yy: torch.nn.functional.cross_entropy(logits, yy, reduction="none")
    with torch.no_grad():
        batched = best_of(lambda: model.expectation(ce, x, y, n), repeats)
        sequential = best_of(lambda: [ce(model(x), y) for _ in range(n)], repeats)
    return {"n": n, "batched_s": batched, "sequential_s": sequential, "speedup": sequential / batched}


def ddpmpp_standin(size: str, precision: str = "fp32", compile: bool = False):
    """DDPM++ (NCSNpp, the published CIFAR-10 configuration's shape family) with random weights: the
    timing does not depend on the weights. small: nf 32 and 2 residual blocks per resolution. init_scale 1
    (the published 0 starts each block's last layer near zero) so that every layer contributes to eps, which
    is then of order 1 as a trained model's, and the options' deviations mean something."""
    import copy

    from benchkit_diffpure.architectures.ncsnpp import NCSNpp
    from benchkit_diffpure.plugin import DDPMPP_CONFIG
    from benchkit_diffpure.score import ContinuousTimeScore
    config = copy.deepcopy(DDPMPP_CONFIG)
    config["model"]["init_scale"] = 1.0
    if size == "small":
        config["model"].update(nf=32, num_res_blocks=2)
    torch.manual_seed(0)
    return ContinuousTimeScore(NCSNpp.from_config(config), precision=precision, compile=compile)


def digits_unet(precision: str = "fp32", compile: bool = False):
    from benchkit_diffpure.score import ContinuousTimeScore
    from benchkit_zoo.catalog import load_zoo_model
    return ContinuousTimeScore(load_zoo_model("digits-unet"), precision=precision, compile=compile)


def interleaved(fns: dict, repeats: int) -> dict:
    """Best of `repeats` seconds per function, run in turn so that a busy moment hits all of them."""
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def overhead_case(score, x, t_star: float, dt: float, repeats: int) -> dict:
    from benchkit.noise import GLOBAL_NOISE, PerExampleNoise
    from benchkit_diffpure.purifier import DiffPure
    from benchkit_diffpure.score import ScoreModel
    from benchkit_diffpure.solver import ReverseField
    purifier = DiffPure(score, t_star=t_star, dt=dt)
    seeds = list(range(x.shape[0]))
    _, t_solve, x_t = purifier._start(x, GLOBAL_NOISE)
    labels = [c.t for c in ReverseField(score, "vp-sde", t_solve, purifier.n_steps).table]

    def network():
        with torch.inference_mode():
            for t in labels:
                score.eps(x_t, t)

    class Free(ScoreModel):
        """The network's first answer for every call: the solve with a network that costs nothing."""
        def __init__(self, out):
            super().__init__()
            self.out = out

        def eps(self, x, t):
            return self.out

    with torch.no_grad():
        free = DiffPure(Free(score.eps(x_t, labels[0]).clone()), t_star=t_star, dt=dt)
    fns = {"network": network}
    for name, noise in (("per_example", lambda: PerExampleNoise(seeds)), ("global", lambda: GLOBAL_NOISE)):
        fns[name] = lambda noise=noise: purifier.purify(x, gradient="none", noise=noise())
        fns[f"{name}_free"] = lambda noise=noise: free.purify(x, gradient="none", noise=noise())
    fns["per_example"]()  # warm-up
    s = interleaved(fns, repeats)
    return {"batch": x.shape[0], "steps": purifier.n_steps, "network_s": s["network"],
            **{k: {"solve_s": s[k], "network_fraction": s["network"] / s[k], "outside_network_s": s[f"{k}_free"]}
               for k in ("per_example", "global")}}


def overhead(score, name: str, x, args) -> dict:
    out = {"network": "N calls of the wrapped ScoreModel.eps with the solver's labels, inference mode",
           name: overhead_case(score, x, args.t_star, 1e-3, args.overhead_repeats)}
    x = torch.rand(args.ddpmpp_batch, 3, 32, 32)
    out[f"ddpmpp-{args.ddpmpp}"] = overhead_case(ddpmpp_standin(args.ddpmpp), x, args.t_star,
                                                 args.t_star / args.ddpmpp_steps, args.overhead_repeats)
    out["network_fraction"] = min(c[n]["network_fraction"] for c in out.values() if isinstance(c, dict)
                                  for n in ("per_example", "global"))
    return out


OPTIONS = {"fp32": ("fp32", False), "bf16": ("bf16", False), "fp16": ("fp16", False),
           "compile": ("fp32", True), "compile+bf16": ("bf16", True)}


def options_case(build, names, x, t_star: float, dt: float, repeats: int) -> dict:
    from benchkit.noise import PerExampleNoise
    from benchkit_diffpure.purifier import DiffPure
    seeds = list(range(x.shape[0]))
    runs, first, outs = {}, {}, {}
    for name in names:
        purifier = DiffPure(build(*OPTIONS[name]), t_star=t_star, dt=dt)
        run = lambda p=purifier: p.purify(x, gradient="none", noise=PerExampleNoise(seeds))
        t0 = time.perf_counter()
        outs[name] = run()  # compiles, if it does
        first[name] = time.perf_counter() - t0
        runs[name] = run
    s = interleaved(runs, repeats)
    return {"batch": x.shape[0], "steps": purifier.n_steps, "fp32_s": s["fp32"],
            **{n: {"speedup": s["fp32"] / s[n], "seconds": s[n], "first_call_s": first[n],
                   "max_abs_diff": float((outs[n] - outs["fp32"]).abs().max())} for n in names if n != "fp32"}}


def options(x_digits, args) -> dict:
    eager = ["fp32", "bf16", "fp16"]
    out = {"digits-unet": options_case(digits_unet, [*eager, "compile", "compile+bf16"], x_digits, args.t_star,
                                       1e-3, args.repeats)}
    x = torch.rand(args.ddpmpp_batch, 3, 32, 32)
    names = [*eager, "compile", "compile+bf16"] if args.ddpmpp_compile else eager
    out[f"ddpmpp-{args.ddpmpp}"] = options_case(lambda *o: ddpmpp_standin(args.ddpmpp, *o), names, x, args.t_star,
                                                args.t_star / args.ddpmpp_steps, args.repeats)
    return out


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(mode: str, steps: int, batch: int) -> None:
    """One input-gradient computation; prints the peak resident memory it added (KiB), measured
    from a peak reset (/proc/self/clear_refs) after the model is loaded and warmed up."""
    from benchkit.noise import GLOBAL_NOISE
    from benchkit_diffpure.purifier import DiffPure
    torch.set_num_threads(1)
    score, _, shape = score_model()
    x = torch.rand(batch, *shape)
    p = DiffPure(score, t_star=steps * 1e-3, dt=1e-3)
    DiffPure(score, t_star=1e-3, dt=1e-3).purify(x, gradient="exact").sum()  # warm-up allocations
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS watermark
    before = _status_kib("VmRSS")
    xr = x.clone().requires_grad_(True)
    x_c, t_star, x_t = p._start(xr, GLOBAL_NOISE)
    p._solve(x_c, t_star, x_t, mode, GLOBAL_NOISE).sum().backward()
    print(_status_kib("VmHWM") - before)


def memory(batch: int) -> dict:
    def peak(mode, steps):
        r = subprocess.run([sys.executable, __file__, "--child", mode, str(steps), str(batch)],
                           capture_output=True, text=True, check=True)
        return int(r.stdout.strip().splitlines()[-1]) / 1024  # MiB
    out = {"unit": "MiB of peak resident memory added by one gradient computation"}
    for mode in ("exact", "autograd", "adjoint"):
        out[mode] = {str(n): round(peak(mode, n), 1) for n in (10, 100, 1000)}
    out["exact_growth_10_to_1000"] = out["exact"]["1000"] / max(out["exact"]["10"], 1e-9)
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        memory_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--eot", type=int, default=16)
    ap.add_argument("--t-star", type=float, default=0.1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--ddpmpp", choices=["small", "full"], default="small")
    ap.add_argument("--ddpmpp-batch", type=int, default=8)
    ap.add_argument("--ddpmpp-steps", type=int, default=20, help="solver steps for the DDPM++ stand-in (t*/dt)")
    ap.add_argument("--ddpmpp-compile", action="store_true", help="also time torch.compile on the DDPM++ stand-in")
    ap.add_argument("--skip-options", action="store_true")
    ap.add_argument("--overhead-repeats", type=int, default=7,
                    help="best of this many for overhead: a few percent, so more than the other keys need")
    args = ap.parse_args()
    from benchkit_diffpure.purifier import DiffPure
    torch.manual_seed(0)
    score, name, shape = score_model()
    x = torch.rand(args.batch, *shape)
    purifier = DiffPure(score, t_star=args.t_star)
    result = {"score_model": name, "batch": args.batch, "t_star": args.t_star, "steps": purifier.n_steps,
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "throughput": throughput(purifier, score, shape, x, args.repeats),
              "eot": eot(purifier, x[: max(1, args.batch // 4)], args.eot, args.repeats),
              "overhead": overhead(score, name, x, args)}
    if not args.skip_options:
        result["options"] = options(x, args)
    if not args.skip_memory:
        result["memory"] = memory(args.batch)
        # exact vs adjoint time at 100 steps (forward + backward)
        def grad_time(mode):
            def run():
                xr = x.clone().requires_grad_(True)
                purifier.purify(xr, gradient=mode).sum().backward()
            return best_of(run, args.repeats)
        result["exact_vs_adjoint_time"] = grad_time("exact") / grad_time("adjoint")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
