"""The paper's evaluation protocol end to end: benchkit against the authors' way, in one process.

The digits DiffPure (classifier digits-cnn; defense diffpure {score_model: digits-unet, sampler: vp-sde,
t_star: --t-star, dt: --dt}: 100 reverse steps at the defaults), built through benchkit's registry, on
the first --images digits of the embedded test split, Linf eps --eps. Two comparisons, each side with
the same images, iterations, EOT samples and attack seeds:

  autoattack_rand  AutoAttack rand: APGD-CE then APGD-DLR, --n-iter iterations, --eot EOT samples per
                   gradient (the paper: 100 and 20)
    benchkit       the autoattack plugin run host-style (benchkit.evaluate.run_attack): exact gradients
                   (checkpointed solver), EOT samples in large batches (BatchedEOT), per-image noise
    authors        pyautoattack's AutoAttack(version='rand') on classifier(purify(x)) as DiffPure's code
                   computes it (runners/diffpure_sde.py, eval_sde_adv.py): the authors' RevVPSDE through
                   torchsde.sdeint_adjoint, Euler, its default BrownianInterval, network parameters left
                   trainable (the adjoint integrates their gradients too); EOT as AutoAttack's own loop,
                   one model call per sample
  pgd_exact        PGD-EOT (benchkit_attacks.pgd.pgd: random start, --steps sign steps of eps/4, CE, the
                   iterate with the best EOT loss), --eot samples per gradient
    benchkit       the pgd-eot plugin host-style: exact gradients (checkpointed solver), EOT batched
    authors        the same pgd loop; each EOT sample one call of the same reference model with
                   torchsde.sdeint (plain autograd through the unrolled solver), gradients summed in turn

Every run's examples are judged afterwards, outside the timing, by the host's verdicts on benchkit's
model with the same judge noise for all four runs. Times are wall seconds (what a user waits for) and
this process's CPU seconds (the same on a quiet machine at --threads 1, and little disturbed by others). The defaults are a short schedule (the full protocol
takes hours on a CPU): the speedup is per gradient evaluation, so it carries over to more iterations;
--eot and --images change how many rows a batched pass holds, so run --eot 20 for the paper's ratio.
Prints one JSON object; its `legend` says what each key means.
Usage: python benchmarks/bench_protocol.py [--images 16] [--n-iter 1] [--steps 1] [--eot 4] [--eps 0.3]
                                           [--t-star 0.1] [--dt 0.001] [--threads 1] [--seed 0] [--device cpu]
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torchsde
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_attacks  # noqa: E402  the digits DiffPure as the other benchmarks build it
from bench_purify import ReferenceRevVPSDE  # noqa: E402  the authors' RevVPSDE

CLASSIFIER = bench_attacks.CLASSIFIER
SCORE_MODEL = bench_attacks.DEFENSE["score_model"]
T_END = 1e-5   # the authors integrate t' = 1 - t up to 1 - 1e-5 (the score is singular at t = 0)

LEGEND = {
    "speedup": "authors' seconds per image / benchkit's, same images, iterations, EOT samples and attack seeds",
    "speedup_per_gradient_row": "the speedup per classifier row differentiated (an image's EOT sample through "
                                "one gradient): corrects for AutoAttack's APGD-DLR running only on the images "
                                "APGD-CE left robust, which may differ between the sides",
    "seconds": "wall time of the attack over all images (benchkit: host-style, incl. its example checks)",
    "seconds_per_image": "seconds / images",
    "cpu_seconds": "CPU time of this process during the run (all its threads)",
    "speedup_cpu": "the speedup in CPU seconds: what the wall-time speedup is on a quiet machine with --threads 1, "
                   "and far less disturbed than it by other processes sharing the cores",
    "classifier_rows": "classifier batch rows: `gradient` under autograd (one per image, EOT sample and "
                       "gradient evaluation), `no_gradient` the attack's plain predictions",
    "robust_accuracy": "% of images the host's verdict (one purification, the same judge noise for every run) "
                       "finds correct on the run's examples; both sides run the same attack with different "
                       "noise draws, so they should be close: one image is 100/images points",
    "attack_verdict_robust_accuracy": "% AutoAttack itself counted robust (its robust flags during the run)",
    "robust_accuracy_gap": "|benchkit - authors| robust accuracy, in points",
    "schedule": "the default is a short schedule: the speedup is per gradient evaluation and carries over to "
                "the full --n-iter 100 / --steps; --eot and --images change the rows of a batched pass, "
                "so the paper's ratio needs --eot 20 --images 16",
}


class AuthorsDiffPure(nn.Module):
    """classifier(DiffPure(x)) as the authors' code computes it (runners/diffpure_sde.py): x(t*) with Eq. 3's
    continuous alpha, then their RevVPSDE integrated over t' in [1 - t*, 1 - 1e-5] by torchsde, Euler, step
    dt, with torchsde's default BrownianInterval. adjoint: sdeint_adjoint (the authors'), whose default
    adjoint parameters are the network's, left trainable as theirs are; else sdeint, plain autograd through
    torchsde's unrolled loop. Copies of the networks, so benchkit's stay frozen."""

    def __init__(self, classifier: nn.Module, score_model: nn.Module, shape: tuple[int, ...], t_star: float,
                 dt: float, adjoint: bool):
        super().__init__()
        self.classifier = copy.deepcopy(classifier).requires_grad_(True)
        self.sde = ReferenceRevVPSDE(copy.deepcopy(score_model).requires_grad_(True), shape)
        self.t_star, self.dt, self.adjoint = t_star, dt, adjoint

    def forward(self, x: Tensor) -> Tensor:
        from benchkit_diffpure import sde

        x_t = sde.diffuse(sde.to_centered(x), sde.alpha(self.t_star), torch.randn_like(x))
        ts = torch.tensor([1.0 - self.t_star, 1.0 - T_END], device=x.device)
        bm = torchsde.BrownianInterval(t0=ts[0], t1=ts[-1], size=(x.shape[0], x[0].numel()), device=x.device)
        solve = torchsde.sdeint_adjoint if self.adjoint else torchsde.sdeint
        out = solve(self.sde, x_t.flatten(1), ts, method="euler", bm=bm, dt=self.dt)[-1]
        return self.classifier(sde.from_centered(out.view(x.shape)))


class RowCounter:
    """Batch rows through a module's forward, split by whether autograd was recording."""

    def __init__(self, module: nn.Module):
        self.handle = module.register_forward_hook(self._count)
        self.gradient = self.no_gradient = 0

    def _count(self, module, inputs, output) -> None:
        if torch.is_grad_enabled():
            self.gradient += int(inputs[0].shape[0])
        else:
            self.no_gradient += int(inputs[0].shape[0])

    def rows(self) -> dict[str, int]:
        return {"gradient": self.gradient, "no_gradient": self.no_gradient}


def counted(module: nn.Module, fn: Callable[[], Any]) -> tuple[Any, tuple[float, float], dict[str, int]]:
    """(fn(), (wall seconds, this process's CPU seconds), the classifier rows it ran)."""
    counter = RowCounter(module)
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        return out, (time.perf_counter() - t0, time.process_time() - c0), counter.rows()
    finally:
        counter.handle.remove()


def build(device: torch.device, images: int, t_star: float, dt: float):
    """(classifier, DiffPure, x, y) as bench_attacks builds them, at this t* and dt."""
    return bench_attacks.build(device, images, bench_attacks.DEFENSE | {"t_star": t_star, "dt": dt})


def benchkit_run(model, attack_id: str, params: dict, x: Tensor, y: Tensor, seed_parts: tuple, device):
    """One registered attack host-style: (examples, the attack's own verdict or None)."""
    from benchkit import registry
    from benchkit.evaluate import run_attack
    from benchkit.protocol import Protocol

    entry = registry.get("attacks").entries[attack_id]
    p = entry.validate(params, attack_id)
    ctx = {"device": device, "undefended": model.classifier, "batch_size": x.shape[0], "protocol": Protocol()}
    (_, x_adv, _, result), = run_attack(model, entry.build(p), entry.threat(p), x, y, list(range(x.shape[0])),
                                        ctx, seed_parts)
    return x_adv, result.verdict


def authors_autoattack(ref: nn.Module, x: Tensor, y: Tensor, eps: float, n_iter: int, eot: int, seed_parts: tuple,
                       device) -> tuple[Tensor, Tensor]:
    """AutoAttack rand as eval_sde_adv.py runs it: (examples, AutoAttack's robust flags). Seeded as
    benchkit.evaluate.run_attack seeds the plugin's rand variant, so APGD starts from the same points."""
    from pyautoattack import AutoAttack
    from benchkit.noise import derive_seed
    from benchkit_autoattack.plugin import _set_apgd_iterations

    parts = (*seed_parts, "rand")
    torch.manual_seed(derive_seed(*parts, "global"))
    adversary = AutoAttack(ref, norm="Linf", eps=eps, version="rand", seed=derive_seed(*parts) % 2**31, device=device)
    adversary.verbose = False
    adversary.apgd.eot_iter = eot
    _set_apgd_iterations(adversary.apgd, n_iter)
    x_adv, y_adv = adversary.run_standard_evaluation(x, y, batch_size=x.shape[0])
    return x_adv.detach(), y_adv == y


def authors_pgd(ref: nn.Module, x: Tensor, y: Tensor, params, seed_parts: tuple) -> Tensor:
    """benchkit_attacks' pgd loop with the authors' gradients: each EOT sample one autograd pass
    through the unrolled solver, summed in turn; random starts drawn as the host draws the plugin's."""
    from benchkit.noise import PerExampleNoise, derive_seed
    from benchkit.threat import make_threat
    from benchkit_attacks.losses import LOSSES
    from benchkit_attacks.pgd import pgd

    loss_fn = LOSSES[params.loss]

    def objective(z: Tensor) -> tuple[Tensor, Tensor]:
        loss, grad = torch.zeros(z.shape[0], device=z.device), torch.zeros_like(z)
        for _ in range(params.eot):
            zr = z.detach().clone().requires_grad_(True)
            with torch.enable_grad():
                sample = loss_fn(ref(zr), y)
                (g,) = torch.autograd.grad(sample.sum(), zr)
            loss, grad = loss + sample.detach(), grad + g
        return loss / params.eot, grad / params.eot

    parts = (*seed_parts, "")   # pgd-eot's one variant is named ""
    noise = PerExampleNoise([derive_seed(*parts, i, "attack") for i in range(x.shape[0])])
    out = pgd(objective, x, make_threat(params.norm, params.eps), steps=params.steps, step_size=params.resolved_step(),
              noise=noise, restarts=params.restarts, random_init=params.random_start)
    return out.x_adv


def robust_accuracy(model, x_adv: Tensor, y: Tensor, seed: int) -> float:
    """% correct under the host's verdict, one purification per image with the judge's noise."""
    from benchkit.evaluate import verdicts

    flags = verdicts(model, x_adv, y, list(range(x_adv.shape[0])), (seed, "judge"), 1, x_adv.shape[0])
    return 100.0 * sum(f == "1" for f in flags) / len(flags)


def side(seconds: tuple[float, float], images: int, rows: dict, robust: float, verdict: Tensor | None = None) -> dict:
    wall, cpu = seconds
    out = {"seconds": wall, "seconds_per_image": wall / images, "cpu_seconds": cpu, "classifier_rows": rows,
           "robust_accuracy": robust}
    if verdict is not None:
        out["attack_verdict_robust_accuracy"] = 100.0 * float(verdict.float().mean())
    return out


def compare(bk: dict, authors: dict) -> dict:
    per_row = lambda s: s["seconds"] / max(1, s["classifier_rows"]["gradient"])
    return {"benchkit": bk, "authors": authors,
            "speedup": authors["seconds_per_image"] / bk["seconds_per_image"],
            "speedup_cpu": authors["cpu_seconds"] / bk["cpu_seconds"],
            "speedup_per_gradient_row": per_row(authors) / per_row(bk),
            "robust_accuracy_gap": abs(bk["robust_accuracy"] - authors["robust_accuracy"])}


def run(images: int = 16, n_iter: int = 1, steps: int = 1, eot: int = 4, eps: float = 0.3, t_star: float = 0.1,
        dt: float = 1e-3, threads: int = 1, seed: int = 0, device: str = "cpu") -> dict:
    """Both comparisons; the JSON object the script prints."""
    from benchkit import registry
    from benchkit.defended import DefendedModel

    torch.set_num_threads(threads)
    dev = torch.device(device)
    classifier, purifier, x, y = build(dev, images, t_star, dt)
    model = DefendedModel(classifier, purifier, gradient="exact")
    shape = tuple(x.shape[1:])

    def authors(adjoint: bool) -> AuthorsDiffPure:
        return AuthorsDiffPure(classifier, purifier.score_model, shape, t_star, dt, adjoint).to(dev)

    with torch.no_grad():   # warm-up: first-call allocations out of the timings
        model.logits(x[:2])
        authors(True)(x[:2])

    out: dict[str, Any] = {}
    # AutoAttack rand.
    parts = (seed, "autoattack_rand")
    aa = {"norm": "Linf", "eps": eps, "versions": ["rand"], "eot": eot, "n_iter": n_iter}
    (x_bk, v_bk), s_bk, r_bk = counted(classifier, lambda: benchkit_run(model, "autoattack", aa, x, y, parts, dev))
    ref = authors(adjoint=True)
    (x_au, v_au), s_au, r_au = counted(ref.classifier, lambda: authors_autoattack(
        ref, x, y, eps, n_iter, eot, parts, dev))
    out["autoattack_rand"] = compare(side(s_bk, images, r_bk, robust_accuracy(model, x_bk, y, seed), v_bk),
                                     side(s_au, images, r_au, robust_accuracy(model, x_au, y, seed), v_au))
    # PGD-EOT, exact gradients.
    parts = (seed, "pgd_exact")
    pg = {"norm": "Linf", "eps": eps, "steps": steps, "eot": eot, "gradient": "exact"}
    (x_bk, _), s_bk, r_bk = counted(classifier, lambda: benchkit_run(model, "pgd-eot", pg, x, y, parts, dev))
    ref = authors(adjoint=False)
    params = registry.get("attacks").entries["pgd-eot"].validate(pg, "pgd-eot")
    x_au, s_au, r_au = counted(ref.classifier, lambda: authors_pgd(ref, x, y, params, parts))
    out["pgd_exact"] = compare(side(s_bk, images, r_bk, robust_accuracy(model, x_bk, y, seed)),
                               side(s_au, images, r_au, robust_accuracy(model, x_au, y, seed)))
    return {"protocol": out,
            "settings": {"images": images, "n_iter": n_iter, "steps": steps, "eot": eot, "eps": eps, "norm": "Linf",
                         "t_star": t_star, "dt": dt, "solver_steps": purifier.n_steps, "classifier": CLASSIFIER,
                         "score_model": SCORE_MODEL, "threads": torch.get_num_threads(), "torch": torch.__version__,
                         "device": str(dev), "seed": seed, "max_batch": model.max_batch},
            "legend": LEGEND}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--n-iter", type=int, default=1, help="AutoAttack's APGD iterations (the paper: 100)")
    ap.add_argument("--steps", type=int, default=1, help="PGD-EOT steps")
    ap.add_argument("--eot", type=int, default=4, help="EOT samples per gradient (the paper: 20)")
    ap.add_argument("--eps", type=float, default=0.3, help="Linf budget (the digits suites' 0.3)")
    ap.add_argument("--t-star", type=float, default=0.1)
    ap.add_argument("--dt", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    if min(args.images, args.n_iter, args.steps, args.eot, args.threads) < 1:
        ap.error("--images, --n-iter, --steps, --eot and --threads must be >= 1")
    if not (0 < args.dt <= args.t_star <= 1):
        ap.error("need 0 < --dt <= --t-star <= 1")
    result = run(args.images, args.n_iter, args.steps, args.eot, args.eps, args.t_star, args.dt, args.threads,
                 args.seed, args.device)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
