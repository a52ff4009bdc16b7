"""Cost of each attack against the digits DiffPure, in seconds and in network evaluations, in one process.

Every attack configuration of CONFIGS runs host-style (benchkit.evaluate.run_attack: copies of the
images, per-image noise for the attack and the defense, every example checked against the registered
threat model) against the digits DiffPure of suites/_base/digits_diffpure.yaml (classifier digits-cnn,
defense diffpure {score_model: digits-unet, t_star: 0.1, dt: 0.01}: N = 10 reverse steps), all built
through benchkit's registry, on the first --images digits of the embedded test split. Budgets are
small and equalised so that per-iteration costs compare: --steps iterations (APGD / PGD steps;
AutoAttack's n_iter) and --eot samples per gradient (EOT; DiffHammer's N purifications), one restart,
one loss (one variant) per attack, Linf eps --eps.

Timing, as in the other benchmarks, is a ratio against a baseline measured in the same run on the same
images: one purification + classification (no gradient) of the --images digits. Counts are exact and
seeded (the same on every run and repeat), from hooks on the two networks:
  score_net / classifier rows   batch rows through the network's forward, split by whether autograd
                                was recording (`graph`: a pass whose graph is then differentiated, e.g.
                                the checkpointed solver's backward recomputing each step) or not
                                (`no_graph`: the checkpointed forward solve, no-grad purifications);
                                `backward` rows: a full backward hook, one row per row whose input
                                gradient went back through the network
  gradient_evaluations          nominal loss-and-gradient evaluations of the attack's loop: (steps + 1)
                                per restart and variant (the last scores the final iterate); for
                                AutoAttack rand its APGD-CE and APGD-DLR (n_iter + 1 each; APGD-DLR only
                                on the images APGD-CE left robust, so its rows per evaluation can be lower)
  purification_equivalents      score-net forward rows / (images x N): how many baseline purifications
                                the attack's forward work amounts to (its count-based ratio)
Prints one JSON object; its `legend` says what each key means. Exit status 1 if a configuration failed
(its entry then holds `error`, one line), else 0.
Usage: python benchmarks/bench_attacks.py [--images 8] [--steps 5] [--eot 2] [--eps 0.3] [--attacks a,b]
                                          [--threads 1] [--repeats 3] [--baseline-repeats 5] [--device cpu]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch

# Which params of each attack id take the iteration count and the EOT count.
STEPS_KEY = {"autoattack": "n_iter"}
EOT_KEY = {"diffhammer": "n"}
ONE_LOSS = {"diffattack": {"losses": ["ce"]}, "diffhammer": {"losses": ["ce"]}}

# name, attack id, params besides norm / eps / steps / eot, and why it is here.
CONFIGS: list[dict[str, Any]] = [
    {"name": "pgd-eot-exact", "attack": "pgd-eot", "params": {"gradient": "exact"},
     "note": "PGD-EOT, exact gradients: checkpointed backprop through the 10-step solver"},
    {"name": "pgd-eot-adjoint", "attack": "pgd-eot", "params": {"gradient": "adjoint"},
     "note": "PGD-EOT, torchsde adjoint gradients (the paper's)"},
    {"name": "pgd-eot-fewer-steps-2", "attack": "pgd-eot", "params": {"surrogate": {"kind": "fewer-steps", "steps": 2}},
     "note": "PGD-EOT differentiating a 2-step solver surrogate (Lee & Kim 2023)"},
    {"name": "pgd-eot-forward-only", "attack": "pgd-eot", "params": {"surrogate": {"kind": "forward-only"}},
     "note": "PGD-EOT differentiating the forward noising alone (no reverse solve)"},
    {"name": "pgd-eot-targeted", "attack": "pgd-eot", "params": {"targeted": "second"},
     "note": "targeted PGD-EOT (most likely wrong class); + one EOT-averaged clean pass to choose targets"},
    {"name": "bpda-eot", "attack": "bpda-eot", "params": {},
     "note": "BPDA+EOT: no-grad purification forward, identity backward"},
    {"name": "diffattack", "attack": "diffattack", "params": {},
     "note": "DiffAttack, CE only (one variant), deviation loss on the 10 reverse states, segment-wise exact"},
    {"name": "diffhammer", "attack": "diffhammer", "params": {"restarts": 1},
     "note": "DiffHammer, CE only, one restart: N no-grad purifications + one grafted exact backward per step"},
    {"name": "lowfreq", "attack": "lowfreq", "params": {}, "optional": True,
     "note": "low-frequency PGD-EOT (DCT band), exact gradients; skipped when not registered"},
    {"name": "autoattack-rand", "attack": "autoattack", "params": {"versions": ["rand"]},
     "note": "AutoAttack rand (APGD-CE then APGD-DLR with EOT, pyautoattack; its EOT samples in batched passes)"},
]

DEFENSE = {"score_model": "digits-unet", "sampler": "vp-sde", "t_star": 0.1, "dt": 0.01}
CLASSIFIER = "digits-cnn"
DATASET = {"split": "test"}

LEGEND = {
    "baseline": "one purification + classification (no gradient) of the same images; best of --baseline-repeats",
    "baseline_gradient": "one exact input gradient (purify + classify + backward, one sample) of the same images",
    "seconds": "wall time of the attack over all images (best of --repeats), host-style incl. example checks",
    "seconds_per_image": "seconds / images",
    "ratio_to_baseline": "seconds / baseline seconds",
    "ratio_per_evaluation": "ratio_to_baseline / gradient_evaluations",
    "rows": "network batch rows summed over the attack run (forward: no_graph + graph; backward)",
    "per_image": "rows / images",
    "per_image_per_evaluation": "rows / (images x gradient_evaluations)",
    "purification_equivalents": "score-net forward rows / (images x solver steps): baseline purifications' worth",
    "counts_repeatable": "every repeat counted the same rows",
}


class RowCounter:
    """Batch rows through a module: forward (with / without autograd recording) and backward."""

    def __init__(self, module: torch.nn.Module):
        self.handles = [module.register_forward_hook(self._forward),
                        module.register_full_backward_hook(self._backward)]
        self.reset()

    def reset(self) -> None:
        self.no_graph = self.graph = self.backward = 0

    def _forward(self, module, inputs, output) -> None:
        rows = int(inputs[0].shape[0])
        if torch.is_grad_enabled():
            self.graph += rows
        else:
            self.no_graph += rows

    def _backward(self, module, grad_input, grad_output) -> None:
        self.backward += int(grad_output[0].shape[0])

    def snapshot(self) -> dict[str, int]:
        return {"forward": self.no_graph + self.graph, "forward_no_graph": self.no_graph,
                "forward_graph": self.graph, "backward": self.backward}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def attack_params(cfg: dict, steps: int, eot: int, eps: float) -> dict:
    aid = cfg["attack"]
    return {"norm": "Linf", "eps": eps, STEPS_KEY.get(aid, "steps"): steps, EOT_KEY.get(aid, "eot"): eot,
            **ONE_LOSS.get(aid, {}), **cfg["params"]}


def gradient_evaluations(cfg: dict, attack, steps: int) -> int:
    """Nominal loss-and-gradient evaluations: (steps + 1) per restart and variant (module docstring)."""
    restarts = int(getattr(getattr(attack, "params", None), "restarts", 1) or 1)
    return len(attack.variants()) * (2 if cfg["attack"] == "autoattack" else 1) * restarts * (steps + 1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def build(device: torch.device, images: int, defense: dict | None = None):
    """(classifier, purifier, x, y) through benchkit's registry, frozen as the host freezes them;
    `defense`: diffpure params other than DEFENSE."""
    from benchkit import plugins, registry

    plugins.get_plugin_manager()
    classifier = registry.get("classifiers").get(CLASSIFIER).build({})
    purifier = registry.get("defenses").get("diffpure").build(defense or DEFENSE)
    for m in (classifier, purifier):
        m.to(device).eval()
        for p in m.parameters():
            p.requires_grad_(False)
    data = registry.get("datasets").get("digits").build(DATASET | {"n": images})
    x, y = data.get(range(images))
    return classifier, purifier, x.to(device), y.to(device)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5, help="iterations of every attack (AutoAttack: n_iter)")
    ap.add_argument("--eot", type=int, default=2, help="EOT samples per gradient (DiffHammer: N)")
    ap.add_argument("--eps", type=float, default=0.3, help="Linf budget (the digits suites' 0.3)")
    ap.add_argument("--attacks", default=None,
                    help="comma-separated subset of: " + ", ".join(c["name"] for c in CONFIGS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="attack runs per configuration (best time kept)")
    ap.add_argument("--baseline-repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    names = [c["name"] for c in CONFIGS]
    chosen = names if args.attacks is None else [a.strip() for a in args.attacks.split(",") if a.strip()]
    unknown = [a for a in chosen if a not in names]
    if unknown:
        ap.error(f"unknown attack configuration(s) {', '.join(unknown)}; known: {', '.join(names)}")
    if min(args.images, args.steps, args.eot, args.threads, args.repeats, args.baseline_repeats) < 1:
        ap.error("--images, --steps, --eot, --threads, --repeats and --baseline-repeats must be >= 1")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    from benchkit import registry
    from benchkit.defended import DefendedModel
    from benchkit.evaluate import one_line, run_attack
    from benchkit.noise import derive_seed
    from benchkit.protocol import Protocol

    torch.manual_seed(args.seed)
    classifier, purifier, x, y = build(device, args.images)
    b, n_steps = x.shape[0], purifier.n_steps
    score_net = getattr(purifier.score_model, "net", purifier.score_model)
    counters = {"score_net": RowCounter(score_net), "classifier": RowCounter(classifier)}
    try:
        def counts() -> dict:
            return {k: c.snapshot() for k, c in counters.items()}

        def reset() -> None:
            for c in counters.values():
                c.reset()

        # Baselines: the same images, per-image noise seeded as the host seeds a defense.
        seeds = [derive_seed(args.seed, "baseline", i) for i in range(b)]
        model = DefendedModel(classifier, purifier, gradient="exact")

        def purify_classify():
            model.for_images(x, seeds).logits(x)

        def one_gradient():
            xr = x.clone().requires_grad_(True)
            with torch.enable_grad():
                logits = model.for_images(x, seeds)(xr)
                torch.nn.functional.cross_entropy(logits, y, reduction="sum").backward()

        result: dict[str, Any] = {
            "device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__, "seed": args.seed,
            "classifier": CLASSIFIER, "defense": {"plugin": "diffpure", **DEFENSE}, "solver_steps": n_steps,
            "images": b, "steps": args.steps, "eot": args.eot, "eps": args.eps, "norm": "Linf"}
        for key, fn in (("baseline", purify_classify), ("baseline_gradient", one_gradient)):
            fn()   # warm-up
            reset()
            fn()
            counted = counts()
            s = timed(fn, device, args.baseline_repeats)
            result[key] = {"seconds": s, "seconds_per_image": s / b, "rows": counted}
        base = result["baseline"]["seconds"]
        result["baseline_gradient"]["ratio_to_baseline"] = result["baseline_gradient"]["seconds"] / base

        attacks, skipped = {}, {}
        entries = registry.get("attacks").entries
        ctx_base = {"device": device, "undefended": classifier, "batch_size": b, "protocol": Protocol()}
        for cfg in (c for c in CONFIGS if c["name"] in chosen):
            name = cfg["name"]
            if cfg["attack"] not in entries:
                if cfg.get("optional"):
                    skipped[name] = f"attack '{cfg['attack']}' is not registered"
                    continue
                attacks[name] = {"error": f"attack '{cfg['attack']}' is not registered"}
                continue
            entry = entries[cfg["attack"]]
            params = attack_params(cfg, args.steps, args.eot, args.eps)
            out: dict[str, Any] = {"attack": cfg["attack"], "params": params, "note": cfg["note"]}
            try:
                p = entry.validate(params, name)
                attack, threat = entry.build(p), entry.threat(p)
                evaluations = gradient_evaluations(cfg, attack, args.steps)
                best, seen = float("inf"), []
                for _ in range(args.repeats):
                    reset()
                    _sync(device)
                    t0 = time.perf_counter()
                    for _ in run_attack(model, attack, threat, x, y, list(range(b)), ctx_base, (args.seed, name)):
                        pass   # each variant's examples, already checked against the registered threat
                    _sync(device)
                    best = min(best, time.perf_counter() - t0)
                    seen.append(counts())
            except Exception as exc:  # noqa: BLE001 - one failed configuration does not end the benchmark
                attacks[name] = out | {"error": one_line(exc)}
                continue
            rows = seen[-1]
            per = lambda d: {net: {k: v / d for k, v in r.items()} for net, r in rows.items()}
            out |= {"gradient_evaluations": evaluations, "seconds": best, "seconds_per_image": best / b,
                    "ratio_to_baseline": best / base, "ratio_per_evaluation": best / base / evaluations,
                    "rows": rows, "per_image": per(b), "per_image_per_evaluation": per(b * evaluations),
                    "purification_equivalents": rows["score_net"]["forward"] / (b * n_steps),
                    "counts_repeatable": all(s == rows for s in seen)}
            attacks[name] = out
    finally:
        for c in counters.values():
            c.remove()
    result["attacks"] = attacks
    if skipped:
        result["skipped"] = skipped
    result["legend"] = LEGEND
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    sys.exit(1 if any("error" in a for a in main()["attacks"].values()) else 0)
