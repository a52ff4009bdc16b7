"""Registers this plugin's attacks with the benchkit host."""
from __future__ import annotations

from typing import Callable, NamedTuple

from pydantic import BaseModel

from benchkit.hookspecs import hookimpl

from benchkit_attacks.diffattack import DiffAttackParams, make_diffattack
from benchkit_attacks.diffhammer import DiffHammerParams, make_diffhammer
from benchkit_attacks.diffusion_mse import DiffusionMSEParams, make_diffusion_mse
from benchkit_attacks.lowfreq import LowFreqParams, make_lowfreq
from benchkit_attacks.pgd import BPDAParams, PGDParams, make_bpda_eot, make_pgd_eot, norm_threat
from benchkit_attacks.square import SquareParams, make_square
from benchkit_attacks.stadv import StAdvParams, make_stadv, stadv_threat
from benchkit_attacks.transfer import TransferParams, make_transfer, transfer_threat


class AttackSpec(NamedTuple):
    factory: Callable
    params: type[BaseModel]
    threat: Callable
    description: str


ATTACKS: dict[str, AttackSpec] = {
    "stadv": AttackSpec(make_stadv, StAdvParams, stadv_threat,
                        "StAdv spatial flow attack (Xiao et al. 2018), perceptual-advex settings, EOT"),
    "bpda-eot": AttackSpec(make_bpda_eot, BPDAParams, norm_threat,
                           "PGD with BPDA (identity backward through the purifier) and EOT"),
    "pgd-eot": AttackSpec(make_pgd_eot, PGDParams, norm_threat,
                          "PGD with exact or adjoint gradients through the defense, EOT, restarts"),
    "diffusion-mse": AttackSpec(make_diffusion_mse, DiffusionMSEParams, norm_threat,
                                "PGD on the purifier alone, maximising MSE(purify(x_adv), x), EOT"),
    "transfer": AttackSpec(make_transfer, TransferParams, transfer_threat,
                           "craft with another attack on the undefended classifier, evaluate defended"),
    "diffattack": AttackSpec(make_diffattack, DiffAttackParams, norm_threat,
                             "DiffAttack (Kang et al. 2023): APGD-EOT on the classifier loss plus the deviated-"
                             "reconstruction loss on the purifier's intermediate states, exact segment-wise gradients"),
    "diffhammer": AttackSpec(make_diffhammer, DiffHammerParams, norm_threat,
                             "DiffHammer (Wang et al. 2024): selective EM attack with gradient grafting and an "
                             "in-loop worst-of-N evaluation keeping each image's best iterate"),
    "square": AttackSpec(make_square, SquareParams, norm_threat,
                         "Square Attack (black-box, pyautoattack), one draw per query"),
    "lowfreq": AttackSpec(make_lowfreq, LowFreqParams, norm_threat,
                          "low-frequency PGD-EOT (after DiffBreak's LF, Kassis et al. 2025): perturbations in "
                          "the lowest DCT frequencies, scaled into the norm ball, exact gradients"),
}


@hookimpl
def register_attacks(register: Callable) -> None:
    for id, spec in ATTACKS.items():
        register(id, spec.factory, params=spec.params, threat=spec.threat, description=spec.description)
