"""The shipped suites, checked without running anything: every suite validates; each CIFAR-10 paper
suite stops at once with the missing-asset checklist on an empty BENCHKIT_HOME; every paper suite
(Nie et al. 2022, "Diffusion Models for Adversarial Purification": cifar10_*, imagenet_*, celebahq_*)
runs the paper's settings, and carries exactly the published numbers listed here, each with its ±
and the table and row it comes from.

The settings and numbers below are written out from the paper's text (its tables, Section 5,
Appendices B-C) and the authors' run scripts (NVlabs/DiffPure run_scripts/, README), not derived
from the suites; `test_published_numbers_are_the_papers` checks the numbers against the paper's
text in ../shared/paper. Fast: no model is built."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import pytest

from benchkit import registry, resolve
from benchkit.cli import main
from conftest import ROOT, SHARED, needs_shared

SUITES = sorted((ROOT / "suites").glob("*.yaml"))
PAPER_PREFIXES = ("cifar10_", "imagenet_", "celebahq_")
# Suites that reproduce later papers' attacks on DiffPure (DiffAttack, DiffHammer, DiffBreak), not Nie
# et al.'s own tables: tests/test_sota_suites.py checks their settings and published numbers.
SOTA = {"cifar10_diffattack", "cifar10_diffhammer", "cifar10_diffbreak"}
PAPER = [p for p in SUITES if p.name.startswith(PAPER_PREFIXES) and p.stem not in SOTA]
CIFAR10 = [p for p in SUITES if p.name.startswith("cifar10_")]
PAPER_TEXT = SHARED / "paper" / "000_0c768a3d796ff983.txt"

# ---------------------------------------------------------------- the paper's settings

# Images: the authors' own, data seeds x images per seed (run_scripts: --num_sub / --adv_batch_size
# x GPUs; README: data seeds 0..7 on CIFAR-10, 0..4 for BPDA, 0..31 on ImageNet, 0..63 on CelebA-HQ).
CIFAR_512 = ("cifar10", 512, 64)       # 8 x 64
CIFAR_BPDA = ("cifar10", 1000, 200)    # 5 x 200 (run_cifar_bpda_eot.sh --num_sub 200)
IMAGENET_512 = ("imagenet", 512, 16)   # 32 x 16 (run_in_*.sh --num_sub 16)
CELEBA_512 = ("celebahq", 512, 8)      # 64 x 8 (--adv_batch_size 2 on 4 GPUs)
CELEBA_FIGURE = ("celebahq", 8, 8)     # a few faces for the figures' strips (no numbers published)

# Verification: AutoAttack and the rest: 3 one-purification verdicts per example; BPDA: one verdict
# from the mean logits of eot_defense_reps purifications (150 CIFAR-10, 20 CelebA-HQ).
SINGLE = (3, "single", 1)
BPDA_CIFAR = (1, "mean-logits", 150)
BPDA_CELEBA = (1, "mean-logits", 20)

DT = 0.001   # App. B.1: Euler-Maruyama with dt = 1e-3 for every experiment


def vp(t_star: float, sampler: str = "vp-sde", **extra) -> dict:
    """A DiffPure defense with the CIFAR-10 DDPM++ model: diffused with the discrete alpha-bar and
    not clamped, as the authors' code."""
    return {"score_model": "ddpmpp", "sampler": sampler, "t_star": t_star, "dt": DT, "forward": "discrete",
            "clamp": False, "t_delta": 0.0, **extra}


def adm(t_star: float = 0.15) -> dict:
    """ImageNet: guided-diffusion's 256x256 unconditional ADM in fp16 (use_fp16), 224 -> 256 -> 224."""
    return {"score_model": "adm", "score_params": {"precision": "fp16"}, "sampler": "vp-sde", "t_star": t_star,
            "dt": DT, "image_size": 256, "clamp": False, "t_delta": 0.0}


def ddpm(t_star: float) -> dict:
    """CelebA-HQ: SDEdit's DDPM with DDPM ancestral steps (fixedsmall), the authors' CelebA-HQ path."""
    return {"score_model": "ddpm", "sampler": "ddpm", "t_star": t_star, "dt": DT, "clamp": False, "t_delta": 0.0}


LD_SDE = {"score_model": "ddpmpp", "sampler": "ld-sde", "t_star": 0.1, "dt": 0.01, "ld_sigma2": 100.0,
          "ld_lambda": 0.1, "ld_eta": 1.0, "clamp": False}   # App. B.4 grid-search best; diffpure_ldsde.py dt 1e-2


def aa(norm: str, eps: float, versions: tuple[str, ...] = ("standard", "rand"), eot: int = 20) -> tuple:
    p = {"norm": norm, "eps": eps, "versions": list(versions)}
    if "rand" in versions:
        p["eot"] = eot
    return ("autoattack", p)


def bpda(eps: float, iterate_samples: int) -> tuple:
    """bpda_eot_attack.py: 50 steps of 2/255 from the clean image, cross-entropy of the mean logits of
    15 EOT samples."""
    return ("bpda-eot", {"norm": "Linf", "eps": eps, "steps": 50, "step_size": 2 / 255, "eot": 15,
                         "random_start": False, "loss": "ce", "eot_average": "logits",   # eot_attack_ave 'logits'
                         "iterate_samples": iterate_samples})


def stadv(eot: int = 20) -> tuple:
    """perceptual-advex StAdv as DiffPure's stadv_eot: flow bound 0.05, 100 iterations."""
    return ("stadv", {"bound": 0.05, "steps": 100, "eot": eot, "gradient": "adjoint"})


def transfer(source: tuple) -> tuple:
    return ("transfer", {"source": source})


AA_LINF, AA_L2 = aa("Linf", 8 / 255), aa("L2", 0.5)
NONE = None   # the identity defense


@dataclass
class Expect:
    data: tuple
    defenses: dict
    attacks: dict
    verdict: tuple = SINGLE
    classifiers: set = field(default_factory=set)


EXPECTED: dict[str, Expect] = {
    "cifar10_linf_aa": Expect(CIFAR_512, {"none": NONE, "diffpure": vp(0.1)}, {"aa-linf": AA_LINF},
                              classifiers={"wrn-28-10", "wrn-70-16"}),
    "cifar10_l2_aa": Expect(CIFAR_512, {"none": NONE, "diffpure": vp(0.075)}, {"aa-l2": AA_L2},
                            classifiers={"wrn-28-10", "wrn-70-16"}),
    "cifar10_unseen": Expect(CIFAR_512, {"none": NONE, "diffpure": vp(0.125)},
                             {"aa-linf": AA_LINF, "aa-l2": aa("L2", 1.0), "stadv": stadv()}, classifiers={"resnet-50"}),
    "cifar10_bpda": Expect(CIFAR_BPDA, {"none": NONE, "diffpure-t0.075": vp(0.075), "diffpure-t0.1": vp(0.1)},
                           {"bpda-eot": bpda(8 / 255, 150)}, BPDA_CIFAR, {"wrn-28-10"}),
    "cifar10_samplers": Expect(CIFAR_512, {"vp-sde": vp(0.1), "vp-ode": vp(0.1, "vp-ode"), "ld-sde": LD_SDE},
                               {"aa-linf": AA_LINF}, classifiers={"wrn-28-10"}),
    "cifar10_tstar": Expect(CIFAR_512, {"none": NONE, **{f"t{t}": vp(t) for t in
                                                        (0.025, 0.05, 0.075, 0.1, 0.125, 0.15, 0.175, 0.2)}},
                            {"aa-linf": AA_LINF, "aa-l2": AA_L2, "stadv": stadv()}, classifiers={"wrn-28-10"}),
    "cifar10_eot": Expect(CIFAR_512, {"diffpure": vp(0.1)},
                          {**{f"aa-linf-eot{k}": aa("Linf", 8 / 255, ("rand",), k) for k in (1, 5, 10, 20, 40)},
                           **{f"aa-l2-eot{k}": aa("L2", 0.5, ("rand",), k) for k in (1, 5, 10, 20, 40)},
                           **{f"stadv-eot{k}": stadv(k) for k in (1, 5, 10, 20, 40)}}, classifiers={"wrn-28-10"}),
    "cifar10_advtrain_plus_diffpure": Expect(
        CIFAR_512, {"none": NONE, "diffpure-t0.1": vp(0.1), "diffpure-t0.075": vp(0.075)},
        {"aa-linf": AA_LINF, "aa-l2": AA_L2}, classifiers={"rebuffi-70-16-linf", "rebuffi-70-16-l2"}),
    "cifar10_transfer": Expect(
        CIFAR_512, {"none": NONE, "diffpure-t0.1": vp(0.1), "diffpure-t0.075": vp(0.075)},
        {"transfer-aa-linf": transfer(aa("Linf", 8 / 255, ("standard",))),
         "transfer-aa-l2": transfer(aa("L2", 0.5, ("standard",)))}, classifiers={"wrn-28-10"}),
    "cifar10_square": Expect(
        CIFAR_512, {"none": NONE, "diffpure-t0.1": vp(0.1), "diffpure-t0.075": vp(0.075)},
        {"square-linf": ("square", {"norm": "Linf", "eps": 8 / 255, "n_queries": 5000}),
         "square-l2": ("square", {"norm": "L2", "eps": 0.5, "n_queries": 5000}), "aa-linf": AA_LINF, "aa-l2": AA_L2},
        classifiers={"wrn-28-10"}),
    "cifar10_random_tstar": Expect(
        CIFAR_512, {"fixed-t0.1": vp(0.1), "rand-d0.015": vp(0.1, t_delta=0.015, t_delta_mode="per-call"),
                    "rand-d0.025": vp(0.1, t_delta=0.025, t_delta_mode="per-call")},
        {"aa-rand": aa("Linf", 8 / 255, ("rand",))}, classifiers={"wrn-28-10"}),
    "cifar10_diffusion_only": Expect(
        CIFAR_512, {"none": NONE, "diffpure-t0.1": vp(0.1), "diffpure-t0.075": vp(0.075)},
        {"diffusion-mse-linf": ("diffusion-mse", {"norm": "Linf", "eps": 8 / 255, "eot": 20, "gradient": "adjoint"}),
         "diffusion-mse-l2": ("diffusion-mse", {"norm": "L2", "eps": 0.5, "eot": 20, "gradient": "adjoint"}),
         "pgd-linf": ("pgd-eot", {"norm": "Linf", "eps": 8 / 255, "eot": 20, "loss": "ce", "gradient": "adjoint"}),
         "pgd-l2": ("pgd-eot", {"norm": "L2", "eps": 0.5, "eot": 20, "loss": "ce", "gradient": "adjoint"})},
        classifiers={"wrn-28-10"}),
    "cifar10_pgd_exact": Expect(   # Lee & Kim 2023's evaluation of the paper's defense
        CIFAR_512, {"none": NONE, "diffpure": vp(0.1)},
        {"pgd-exact": ("pgd-eot", {"norm": "Linf", "eps": 8 / 255, "steps": 200, "step_size": 0.007, "eot": 20,
                                   "gradient": "exact"}),
         "pgd-adjoint": ("pgd-eot", {"norm": "Linf", "eps": 8 / 255, "steps": 200, "step_size": 0.007, "eot": 20,
                                     "gradient": "adjoint"})}, classifiers={"wrn-28-10"}),
    "cifar10_robustbench_linf": Expect(CIFAR_512, {"none": NONE}, {"aa-linf": aa("Linf", 8 / 255, ("standard",))}),
    "cifar10_robustbench_l2": Expect(CIFAR_512, {"none": NONE}, {"aa-l2": aa("L2", 0.5, ("standard",))}),
    "imagenet_linf_aa": Expect(IMAGENET_512, {"none": NONE, "diffpure": adm()}, {"aa-linf": aa("Linf", 4 / 255)},
                               classifiers={"resnet50", "wrn50-2", "deit-s"}),
    "imagenet_transfer": Expect(IMAGENET_512, {"none": NONE, "diffpure": adm()},
                                {"transfer-aa-linf": transfer(aa("Linf", 4 / 255, ("standard",)))},
                                classifiers={"resnet50"}),
    "imagenet_square": Expect(IMAGENET_512, {"none": NONE, "diffpure": adm()},
                              {"square-linf": ("square", {"norm": "Linf", "eps": 4 / 255, "n_queries": 5000})},
                              classifiers={"resnet50"}),
    "imagenet_robustbench_linf": Expect(IMAGENET_512, {"none": NONE}, {"aa-linf": aa("Linf", 4 / 255, ("standard",))}),
    "celebahq_bpda": Expect(CELEBA_512, {"none": NONE, "diffpure-t0.4": ddpm(0.4), "diffpure-t0.5": ddpm(0.5)},
                            {"bpda-eot": bpda(16 / 255, 20)}, BPDA_CELEBA, {"eyeglasses"}),
    "celebahq_bpda_smiling": Expect(CELEBA_512, {"none": NONE, "diffpure-t0.4": ddpm(0.4), "diffpure-t0.5": ddpm(0.5)},
                                    {"bpda-eot": bpda(16 / 255, 20)}, BPDA_CELEBA, {"smiling"}),
    # Figures 2 and 7: PGD Linf 16/255 on the attribute classifier, purified at t* = 0.3.
    "celebahq_pgd_eyeglasses": Expect(CELEBA_FIGURE, {"none": NONE, "diffpure-t0.3": ddpm(0.3)},
                                      {"transfer-pgd": transfer(("pgd-eot", {"norm": "Linf", "eps": 16 / 255}))},
                                      classifiers={"eyeglasses"}),
    "celebahq_pgd_smiling": Expect(CELEBA_FIGURE, {"none": NONE, "diffpure-t0.3": ddpm(0.3)},
                                   {"transfer-pgd": transfer(("pgd-eot", {"norm": "Linf", "eps": 16 / 255}))},
                                   classifiers={"smiling"}),
}

# ---------------------------------------------------------------- the published numbers

# (cell 'classifier/defense/attack' or None for a reference row of its own, table, row, column,
#  standard, robust) with "mean±std" where the paper gives one: every published number of
# Tables 1-15 a suite reproduces (Table 14, timings, is not a suite's).
_R = tuple[str | None, str, str, str | None, str | None, str | None]


def _baselines(table: str, attack: str, rows: list[tuple[str, str, str]], column: str | None = None) -> list[_R]:
    return [(None, table, row, column, std, rob) for row, std, rob in rows]


T1_BASELINES = [
    ("WideResNet-28-10 / (Zhang et al., 2020), extra data", "89.36", "59.96"),
    ("WideResNet-28-10 / (Wu et al., 2020), extra data", "88.25", "62.11"),
    ("WideResNet-28-10 / (Gowal et al., 2020), extra data", "89.48", "62.70"),
    ("WideResNet-28-10 / (Wu et al., 2020), no extra data", "85.36", "59.18"),
    ("WideResNet-28-10 / (Rebuffi et al., 2021), no extra data", "87.33", "61.72"),
    ("WideResNet-28-10 / (Gowal et al., 2021), no extra data", "87.50", "65.24"),
    ("WideResNet-70-16 / (Gowal et al., 2020), extra data", "91.10", "66.02"),
    ("WideResNet-70-16 / (Rebuffi et al., 2021), extra data", "92.23", "68.56"),
    ("WideResNet-70-16 / (Gowal et al., 2020), no extra data", "85.29", "59.57"),
    ("WideResNet-70-16 / (Rebuffi et al., 2021), no extra data", "88.54", "64.46"),
    ("WideResNet-70-16 / (Gowal et al., 2021), no extra data", "88.74", "66.60"),
]
T2_BASELINES = [
    ("WideResNet-28-10 / (Augustin et al., 2020)*, extra data", "92.23", "77.93"),
    ("WideResNet-28-10 / (Rony et al., 2019), no extra data", "89.05", "66.41"),
    ("WideResNet-28-10 / (Ding et al., 2020), no extra data", "88.02", "67.77"),
    ("WideResNet-28-10 / (Wu et al., 2020)*, no extra data", "88.51", "72.85"),
    ("WideResNet-28-10 / (Sehwag et al., 2021)*, no extra data", "90.31", "75.39"),
    ("WideResNet-28-10 / (Rebuffi et al., 2021), no extra data", "91.79", "78.32"),
    ("WideResNet-70-16 / (Gowal et al., 2020), extra data", "94.74", "79.88"),
    ("WideResNet-70-16 / (Rebuffi et al., 2021), extra data", "95.74", "81.44"),
    ("WideResNet-70-16 / (Gowal et al., 2020), no extra data", "90.90", "74.03"),
    ("WideResNet-70-16 / (Rebuffi et al., 2021), no extra data", "92.41", "80.86"),
]
T3_BASELINES = [
    ("ResNet-50 / (Engstrom et al., 2019)", "62.56", "31.06"),
    ("ResNet-50 / (Wong et al., 2020)", "55.62", "26.95"),
    ("ResNet-50 / (Salman et al., 2020)", "64.02", "37.89"),
    ("ResNet-50 / (Bai et al., 2021)†", "67.38", "35.51"),
    ("WideResNet-50-2 / (Salman et al., 2020)", "68.46", "39.25"),
    ("DeiT-S / (Bai et al., 2021)†", "66.50", "35.50"),
]
# Table 4: (method, standard, Linf, L2, StAdv)
T4_BASELINES = [
    ("Adv. Training with Linf (Laidlaw et al., 2021)", "86.8", "49.0", "19.2", "4.8"),
    ("Adv. Training with L2 (Laidlaw et al., 2021)", "85.0", "39.5", "47.8", "7.8"),
    ("Adv. Training with StAdv (Laidlaw et al., 2021)", "86.2", "0.1", "0.2", "53.9"),
    ("PAT-self (Laidlaw et al., 2021)", "82.4", "30.2", "34.9", "46.4"),
    ("Adv. CRAIG (Dolatabadi et al., 2021)", "83.2", "40.0", "33.9", "49.6"),
    ("Adv. GradMatch (Dolatabadi et al., 2021)", "83.1", "39.2", "34.1", "48.9"),
]
# Tables 5a / 12: (method / purification, standard, robust)
T5A_BASELINES = [("(Vahdat & Kautz, 2020) / VAE", "99.43", "0.00"), ("(Karras et al., 2020) / GAN+OPT", "97.76", "10.80"),
                 ("(Chai et al., 2021) / GAN+ENC+OPT", "99.37", "26.37"), ("(Richardson et al., 2021) / GAN+ENC", "93.95", "75.00")]
T12_BASELINES = [("(Vahdat & Kautz, 2020) / VAE", "93.55", "0.00"), ("(Karras et al., 2020) / GAN+OPT", "93.49", "3.41"),
                 ("(Chai et al., 2021) / GAN+ENC+OPT", "93.68", "0.78"), ("(Richardson et al., 2021) / GAN+ENC", "90.55", "40.40")]
# Tables 7 / 10 / 11: (row, RobustBench id, standard (Tables 1-3), from RobustBench, from our experiments)
T7 = [("WideResNet-28-10 / (Zhang et al., 2020), extra data", "Zhang2020Geometry", "89.36", "59.64", "59.96"),
      ("WideResNet-28-10 / (Wu et al., 2020), extra data", "Wu2020Adversarial_extra", "88.25", "60.04", "62.11"),
      ("WideResNet-28-10 / (Gowal et al., 2020), extra data", "Gowal2020Uncovering_28_10_extra", "89.48", "62.80", "62.70"),
      ("WideResNet-28-10 / (Wu et al., 2020), no extra data", "Wu2020Adversarial", "85.36", "56.17", "59.18"),
      ("WideResNet-28-10 / (Rebuffi et al., 2021), no extra data", "Rebuffi2021Fixing_28_10_cutmix_ddpm", "87.33", "60.75", "61.72"),
      ("WideResNet-28-10 / (Gowal et al., 2021), no extra data", "Gowal2021Improving_28_10_ddpm_100m", "87.50", "63.44", "65.24"),
      ("WideResNet-70-16 / (Gowal et al., 2020), extra data", "Gowal2020Uncovering_70_16_extra", "91.10", "65.88", "66.02"),
      ("WideResNet-70-16 / (Rebuffi et al., 2021), extra data", "Rebuffi2021Fixing_70_16_cutmix_extra", "92.23", "66.58", "68.56"),
      ("WideResNet-70-16 / (Gowal et al., 2020), no extra data", "Gowal2020Uncovering_70_16", "85.29", "57.20", "59.57"),
      ("WideResNet-70-16 / (Rebuffi et al., 2021), no extra data", "Rebuffi2021Fixing_70_16_cutmix_ddpm", "88.54", "64.25", "64.46"),
      ("WideResNet-70-16 / (Gowal et al., 2021), no extra data", "Gowal2021Improving_70_16_ddpm_100m", "88.74", "66.11", "66.60")]
T10 = [("WideResNet-28-10 / (Augustin et al., 2020)*, extra data", "Augustin2020Adversarial_34_10_extra", "92.23", "76.25", "77.93"),
       ("WideResNet-28-10 / (Rony et al., 2019), no extra data", "Rony2019Decoupling", "89.05", "66.44", "66.41"),
       ("WideResNet-28-10 / (Ding et al., 2020), no extra data", "Ding2020MMA", "88.02", "66.09", "67.77"),
       ("WideResNet-28-10 / (Wu et al., 2020)*, no extra data", "Wu2020Adversarial", "88.51", "73.66", "72.85"),
       ("WideResNet-28-10 / (Sehwag et al., 2021)*, no extra data", "Sehwag2021Proxy", "90.31", "76.12", "75.39"),
       ("WideResNet-28-10 / (Rebuffi et al., 2021), no extra data", "Rebuffi2021Fixing_28_10_cutmix_ddpm", "91.79", "78.80", "78.32"),
       ("WideResNet-70-16 / (Gowal et al., 2020), extra data", "Gowal2020Uncovering_extra", "94.74", "80.53", "79.88"),
       ("WideResNet-70-16 / (Rebuffi et al., 2021), extra data", "Rebuffi2021Fixing_70_16_cutmix_extra", "95.74", "82.32", "81.44"),
       ("WideResNet-70-16 / (Gowal et al., 2020), no extra data", "Gowal2020Uncovering", "90.90", "74.50", "74.03"),
       ("WideResNet-70-16 / (Rebuffi et al., 2021), no extra data", "Rebuffi2021Fixing_70_16_cutmix_ddpm", "92.41", "80.42", "80.86")]
T11 = [("ResNet-50 / (Engstrom et al., 2019)", "Engstrom2019Robustness", "62.56", "29.22", "31.06"),
       ("ResNet-50 / (Wong et al., 2020)", "Wong2020Fast", "55.62", "26.24", "26.95"),
       ("ResNet-50 / (Salman et al., 2020)", "Salman2020Do_R50", "64.02", "34.96", "37.89"),
       ("WideResNet-50-2 / (Salman et al., 2020)", "Salman2020Do_50_2", "68.46", "38.14", "39.25")]


def _robustbench(table: str, rows: list, attack: str) -> list[_R]:
    out: list[_R] = []
    for row, model, std, leaderboard, ours in rows:
        out.append((f"{model}/none/{attack}", table, row, "from our experiments", std, ours))
        out.append((None, table, row, "from RobustBench", None, leaderboard))
    return out


def _unseen_baselines() -> list[_R]:
    return [(None, "Table 4", row, col, std, rob) for row, std, *robs in T4_BASELINES
            for col, rob in zip(("Linf", "L2", "StAdv"), robs)]


EXPECTED_REFERENCES: dict[str, list[_R]] = {
    "cifar10_linf_aa": [
        ("wrn-28-10/diffpure/aa-linf", "Table 1", "WideResNet-28-10 / Ours", None, "89.02±0.21", "70.64±0.39"),
        ("wrn-70-16/diffpure/aa-linf", "Table 1", "WideResNet-70-16 / Ours", None, "90.07±0.97", "71.29±0.55"),
        *_baselines("Table 1", "aa-linf", T1_BASELINES)],
    "cifar10_l2_aa": [
        ("wrn-28-10/diffpure/aa-l2", "Table 2", "WideResNet-28-10 / Ours", None, "91.03±0.35", "78.58±0.40"),
        ("wrn-70-16/diffpure/aa-l2", "Table 2", "WideResNet-70-16 / Ours", None, "92.68±0.56", "80.60±0.57"),
        *_baselines("Table 2", "aa-l2", T2_BASELINES)],
    "imagenet_linf_aa": [
        ("resnet50/diffpure/aa-linf", "Table 3", "ResNet-50 / Ours", None, "67.79±0.43", "40.93±1.96"),
        ("wrn50-2/diffpure/aa-linf", "Table 3", "WideResNet-50-2 / Ours", None, "71.16±0.75", "44.39±0.95"),
        ("deit-s/diffpure/aa-linf", "Table 3", "DeiT-S / Ours", None, "73.63±0.62", "43.18±1.27"),
        *_baselines("Table 3", "aa-linf", T3_BASELINES)],
    "cifar10_unseen": [
        ("resnet-50/diffpure/aa-linf", "Table 4", "Ours", "Linf", "88.2±0.8", "70.0±1.2"),
        ("resnet-50/diffpure/aa-l2", "Table 4", "Ours", "L2", "88.2±0.8", "70.9±0.6"),
        ("resnet-50/diffpure/stadv", "Table 4", "Ours", "StAdv", "88.2±0.8", "55.0±0.7"),
        *_unseen_baselines()],
    "celebahq_bpda": [
        ("eyeglasses/diffpure-t0.4/bpda-eot", "Table 5a", "Ours (t* = 0.4) / Diffusion", None, "93.87±0.18", "89.47±1.18"),
        ("eyeglasses/diffpure-t0.5/bpda-eot", "Table 5a", "Ours (t* = 0.5) / Diffusion", None, "93.77±0.30", "90.63±1.10"),
        *_baselines("Table 5a", "bpda-eot", T5A_BASELINES)],
    "celebahq_bpda_smiling": [
        ("smiling/diffpure-t0.4/bpda-eot", "Table 12", "Ours (t* = 0.4) / Diffusion", None, "89.78±0.14", "55.73±0.97"),
        ("smiling/diffpure-t0.5/bpda-eot", "Table 12", "Ours (t* = 0.5) / Diffusion", None, "87.62±0.22", "59.12±0.37"),
        *_baselines("Table 12", "bpda-eot", T12_BASELINES)],
    "cifar10_bpda": [
        ("wrn-28-10/diffpure-t0.075/bpda-eot", "Table 5b", "Ours (t* = 0.075)", None, "91.03±0.35", "77.43±0.19"),
        ("wrn-28-10/diffpure-t0.1/bpda-eot", "Table 5b", "Ours (t* = 0.1)", None, "89.02±0.21", "81.40±0.16"),
        (None, "Table 5b", "(Song et al., 2018) / Gibbs Update", None, "95.00", "9.00"),
        (None, "Table 5b", "(Yang et al., 2019) / Mask+Recon.", None, "94.00", "15.00"),
        (None, "Table 5b", "(Hill et al., 2021) / EBM+LD", None, "84.12", "54.90"),
        (None, "Table 5b", "(Yoon et al., 2021) / DSM+LD*", None, "86.14", "70.01")],
    "cifar10_samplers": [
        ("wrn-28-10/ld-sde/aa-linf", "Table 6", "LD-SDE", None, "87.36±0.09", "38.54±1.55"),
        ("wrn-28-10/vp-ode/aa-linf", "Table 6", "VP-ODE", None, "90.79±0.12", "39.86±0.98"),
        ("wrn-28-10/vp-sde/aa-linf", "Table 6", "VP-SDE (Ours)", None, "89.02±0.21", "70.64±0.39")],
    "cifar10_robustbench_linf": _robustbench("Table 7", T7, "aa-linf"),
    "cifar10_robustbench_l2": _robustbench("Table 10", T10, "aa-l2"),
    "imagenet_robustbench_linf": _robustbench("Table 11", T11, "aa-linf"),
    "cifar10_transfer": [
        ("wrn-28-10/none/transfer-aa-linf", "Table 8", "CIFAR-10 / WRN-28-10 / Linf", "Static Model", None, "0.00"),
        ("wrn-28-10/diffpure-t0.1/transfer-aa-linf", "Table 8", "CIFAR-10 / WRN-28-10 / Linf", "Ours", None, "89.58±0.49"),
        ("wrn-28-10/none/transfer-aa-l2", "Table 8", "CIFAR-10 / WRN-28-10 / L2", "Static Model", None, "0.00"),
        ("wrn-28-10/diffpure-t0.075/transfer-aa-l2", "Table 8", "CIFAR-10 / WRN-28-10 / L2", "Ours", None, "90.37±0.24")],
    "imagenet_transfer": [
        ("resnet50/none/transfer-aa-linf", "Table 8", "ImageNet / ResNet-50 / Linf", "Static Model", None, "0.00"),
        ("resnet50/diffpure/transfer-aa-linf", "Table 8", "ImageNet / ResNet-50 / Linf", "Ours", None, "67.01±0.97")],
    "cifar10_square": [
        ("wrn-28-10/none/square-linf", "Table 9", "CIFAR-10 / WRN-28-10 / Linf", "Static Model", None, "0.33"),
        ("wrn-28-10/diffpure-t0.1/square-linf", "Table 9", "CIFAR-10 / WRN-28-10 / Linf", "Ours", None, "85.42±0.65"),
        ("wrn-28-10/none/square-l2", "Table 9", "CIFAR-10 / WRN-28-10 / L2", "Static Model", None, "21.42"),
        ("wrn-28-10/diffpure-t0.075/square-l2", "Table 9", "CIFAR-10 / WRN-28-10 / L2", "Ours", None, "88.02±0.23"),
        ("wrn-28-10/diffpure-t0.1/aa-linf", "Table 1", "WideResNet-28-10 / Ours", None, "89.02±0.21", "70.64±0.39"),
        ("wrn-28-10/diffpure-t0.075/aa-l2", "Table 2", "WideResNet-28-10 / Ours", None, "91.03±0.35", "78.58±0.40")],
    "imagenet_square": [
        ("resnet50/none/square-linf", "Table 9", "ImageNet / ResNet-50 / Linf", "Static Model", None, "9.25"),
        ("resnet50/diffpure/square-linf", "Table 9", "ImageNet / ResNet-50 / Linf", "Ours", None, "62.88±0.65")],
    "cifar10_random_tstar": [
        ("wrn-28-10/fixed-t0.1/aa-rand", "Table 13", "Delta_t = 0", None, "89.02±0.21", "70.64±0.39"),
        ("wrn-28-10/rand-d0.015/aa-rand", "Table 13", "Delta_t = 0.015", None, "88.86±0.22", "72.14±1.45"),
        ("wrn-28-10/rand-d0.025/aa-rand", "Table 13", "Delta_t = 0.025", None, "88.04±0.33", "69.21±2.74")],
    "cifar10_diffusion_only": [
        ("wrn-28-10/diffpure-t0.1/diffusion-mse-linf", "Table 15", "Linf (eps=8/255) / WRN-28-10 / t* = 0.1",
         "Diffusion only", None, "85.04±0.86"),
        ("wrn-28-10/diffpure-t0.1/pgd-linf", "Table 15", "Linf (eps=8/255) / WRN-28-10 / t* = 0.1",
         "Diffusion+Clf", None, "75.91±0.74"),
        ("wrn-28-10/diffpure-t0.075/diffusion-mse-l2", "Table 15", "L2 (eps=0.5) / WRN-28-10 / t* = 0.075",
         "Diffusion only", None, "90.82±0.42"),
        ("wrn-28-10/diffpure-t0.075/pgd-l2", "Table 15", "L2 (eps=0.5) / WRN-28-10 / t* = 0.075",
         "Diffusion+Clf", None, "84.83±0.09")],
    "cifar10_advtrain_plus_diffpure": [   # Figure 4's "Adv Train" bars, published in Tables 1 and 2
        ("rebuffi-70-16-linf/none/aa-linf", "Table 1", "WideResNet-70-16 / (Rebuffi et al., 2021), extra data", None,
         "92.23", "68.56"),
        ("rebuffi-70-16-l2/none/aa-l2", "Table 2", "WideResNet-70-16 / (Rebuffi et al., 2021), extra data", None,
         "95.74", "81.44")],
}
# Tables 7, 10 and 11 give robust accuracies only; the same rows' standard accuracies are in Tables 1-3.
STANDARD_FROM = {"Table 7": "Table 1", "Table 10": "Table 2", "Table 11": "Table 3"}
NO_PUBLISHED_NUMBERS = {"cifar10_tstar", "cifar10_eot", "cifar10_pgd_exact", "celebahq_pgd_eyeglasses",
                        "celebahq_pgd_smiling"}   # Figures 2, 3, 6, 7 (charts / images) and Lee & Kim

SOURCE = re.compile(r"^Nie et al\. 2022, (Table \d+[ab]?|Figure \d+), row '([^']+)'(?:, column '([^']+)')?")


def _split(value: str | None) -> tuple[float | None, float | None]:
    if value is None:
        return None, None
    mean, _, std = value.partition("±")
    return float(mean), (float(std) if std else None)


def _published(ref) -> tuple:
    m = SOURCE.match(ref.source)
    assert m, f"source must start \"Nie et al. 2022, Table N, row '...'\": {ref.source!r}"
    cell = f"{ref.classifier}/{ref.defense}/{ref.attack}" if ref.defense is not None and ref.attack is not None else None
    return (cell, *m.groups(), ref.standard, ref.standard_std, ref.robust, ref.robust_std)


def _expected(r: _R) -> tuple:
    cell, table, row, column, std, rob = r
    return (cell, table, row, column, *_split(std), *_split(rob))


# ---------------------------------------------------------------- tests


def test_every_paper_suite_is_checked():
    assert {p.stem for p in PAPER} == set(EXPECTED)
    assert set(EXPECTED_REFERENCES) | NO_PUBLISHED_NUMBERS == set(EXPECTED)
    assert not set(EXPECTED_REFERENCES) & NO_PUBLISHED_NUMBERS


@pytest.mark.parametrize("path", SUITES, ids=lambda p: p.name)
def test_suite_validates(path, plugin_manager, capsys):
    assert main(["validate", str(path)]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.startswith(f"{path}: ok")


@pytest.mark.parametrize("path", CIFAR10, ids=lambda p: p.name)
def test_run_without_assets_prints_the_checklist(path, tmp_path, monkeypatch, plugin_manager, capsys):
    """Nothing is downloaded or run: exit 2 at once, one line per missing file, no traceback."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("BENCHKIT_HOME", str(home))
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "test_batch" in err and "[MISSING]" in err, err
    if any(d["plugin"] == "diffpure" for d in _raw(path)["defenses"]):
        assert "checkpoint_8.pth" in err, err
    assert not out.exists()


def _raw(path):
    from benchkit.suite import load_raw

    return load_raw(path)


def _dump(model) -> dict:
    return model.model_dump() if hasattr(model, "model_dump") else dict(model)


def _subset(actual: dict, expected: dict, where: str) -> None:
    for key, want in expected.items():
        assert key in actual, f"{where}: no param {key!r}"
        got = actual[key]
        if isinstance(want, float):
            assert got == pytest.approx(want), f"{where}.{key}: {got} != {want}"
        elif isinstance(want, dict):
            assert isinstance(got, dict), f"{where}.{key}: {got!r} is not a mapping"
            _subset(got, want, f"{where}.{key}")
        else:
            assert got == want, f"{where}.{key}: {got!r} != {want!r}"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_paper_settings(name, plugin_manager):
    """Images, t*, sampler, dt, budgets, attack versions, EOT, steps and the verification protocol
    are the paper's."""
    resolved = resolve.load(ROOT / "suites" / f"{name}.yaml")
    suite, want = resolved.suite, EXPECTED[name]
    # The authors' images: their data seeds, no benchkit subset_seed.
    plugin, n, per_seed = want.data
    ds = _dump(resolved.dataset.params)
    assert suite.dataset.plugin == plugin
    assert ds["authors_subset"] is True and ds["n"] == n and ds["authors_batch"] == per_seed
    assert ds.get("subset_seed") is None and "subset_seed" not in suite.dataset.params
    if plugin == "cifar10":
        assert ds["split"] == "test"
    if plugin == "celebahq":
        assert ds["split"] == "val"
    # Verification: repeats x verdict; the device is the CLI's choice.
    repeats, aggregate, samples = want.verdict
    assert (suite.eval.repeats, suite.eval.verdict.aggregate, suite.eval.verdict.samples) == (repeats, aggregate, samples)
    assert suite.eval.device is None
    # Standard accuracy on the whole split, as the paper; on the attacked images only for the
    # figures' few faces and under the BPDA suites' mean-logits verdict (K purifications per image).
    subset = want.data == CELEBA_FIGURE or aggregate == "mean-logits"
    assert suite.eval.clean_on == ("subset" if subset else "split")
    if want.classifiers:
        assert {c.id for c in suite.classifiers} == want.classifiers
    # Defenses.
    assert set(resolved.defenses) == set(want.defenses)
    for did, params in want.defenses.items():
        comp = resolved.defenses[did]
        if params is None:
            assert comp.spec.plugin == "identity", did
            continue
        assert comp.spec.plugin == "diffpure", did
        _subset(_dump(comp.params), params, f"{name}: defenses.{did}")
    # Attacks: plugin, params, and the budget the host verifies against.
    assert set(resolved.attacks) == set(want.attacks)
    for aid, (aplugin, params) in want.attacks.items():
        comp = resolved.attacks[aid]
        assert comp.spec.plugin == aplugin, aid
        got = _dump(comp.params)
        if aplugin == "transfer":
            src_plugin, src_params = params["source"]
            assert got["source"]["plugin"] == src_plugin
            entry = registry.get("attacks").get(src_plugin)
            _subset(_dump(entry.params.model_validate(got["source"]["params"])), src_params, f"{name}: {aid}.source")
            eps = src_params.get("eps")
        else:
            _subset(got, params, f"{name}: attacks.{aid}")
            eps = params.get("eps", params.get("bound"))
        assert resolved.threats[aid].eps == pytest.approx(eps), (name, aid)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_references_are_the_published_numbers(name, plugin_manager):
    """Exactly the listed numbers, each on its cell (or as a labelled row), with its ± and a source
    naming the table and row: a dropped, moved or mistyped reference fails."""
    resolved = resolve.load(ROOT / "suites" / f"{name}.yaml")
    suite = resolved.suite
    cells = {c.key for c in resolved.cells if c.kind == "attack"}
    got = [_published(r) for r in suite.references]
    want = [_expected(r) for r in EXPECTED_REFERENCES.get(name, [])]
    assert len(got) == len(set(got)), "a reference is listed twice"
    assert sorted(got, key=repr) == sorted(want, key=repr)
    for ref, (cell, *_rest) in zip(suite.references, got):
        assert cell is None or cell in cells, f"{name}: reference for {cell}, which the suite does not run"
        if cell is None:
            assert ref.label, f"{name}: a reference without a cell needs a label ({ref.source})"
        assert ref.standard is not None or ref.robust is not None
        table = _rest[0]
        if table in STANDARD_FROM and ref.standard is not None:
            assert f"standard accuracy: {STANDARD_FROM[table]}, same row" in ref.source, ref.source


def _reads_the_paper(fn):
    for mark in needs_shared(PAPER_TEXT):
        fn = mark(fn)
    return fn


@_reads_the_paper
def test_published_numbers_are_the_papers():
    """Every number listed above, "mean±std" as printed, is in its table of the paper's text."""
    text = PAPER_TEXT.read_text()

    def section(table: str) -> str:
        number = int(re.match(r"Table (\d+)", table).group(1))
        start = re.search(rf"^\s*Table {number}\. ", text, re.M)
        assert start, table
        end = re.search(rf"^\s*Table {number + 1}\. ", text[start.end():], re.M)
        return text[start.end(): start.end() + end.start()] if end else text[start.end():]

    missing = []
    for name, refs in EXPECTED_REFERENCES.items():
        for cell, table, row, column, std, rob in refs:
            for value, where in ((std, STANDARD_FROM.get(table, table)), (rob, table)):
                if value is not None and value not in section(where):
                    missing.append(f"{name}: {where} {row} {column or ''}: {value}")
    assert not missing, "\n".join(missing)


@pytest.mark.parametrize("ref,problem", [
    ({"defense": "d", "source": "s"}, "needs a defense and an attack"),
    ({"attack": "a", "robust": 1.0, "source": "s"}, "needs a defense and an attack"),
    ({"label": " ", "robust": 1.0, "source": "s"}, "label cannot be empty"),
    ({"label": "x", "robust_std": 0.5, "source": "s"}, "robust_std without robust"),
    ({"defense": "d", "attack": "a", "standard_std": 0.5, "robust": 1.0, "source": "s"}, "standard_std without standard"),
    ({"label": "x", "robust": 100.5, "source": "s"}, "less than or equal to 100"),
    ({"label": "x", "robust": 50.0, "robust_std": -1.0, "source": "s"}, "greater than or equal to 0"),
    ({"label": "x", "robust": 50.0, "source": "  "}, "source cannot be blank"),
    ({"label": "x", "robust": 50.0}, "source"),
])
def test_reference_schema_rejects(ref, problem):
    from pydantic import ValidationError

    from benchkit.suite import ReferenceSpec

    with pytest.raises(ValidationError, match=problem):
        ReferenceSpec.model_validate(ref)


def test_reference_schema_accepts_cells_and_labelled_rows():
    from benchkit.suite import ReferenceSpec

    cell = ReferenceSpec.model_validate({"classifier": "c", "defense": "d", "attack": "a", "standard": 89.02,
                                         "standard_std": 0.21, "robust": 70.64, "robust_std": 0.39, "source": "s"})
    assert (cell.label, cell.robust_std) == (None, 0.39)
    row = ReferenceSpec.model_validate({"label": "AT baseline", "attack": "a", "standard": 89.36, "robust": 59.96,
                                        "source": "s"})
    assert row.defense is None and row.standard_std is None
