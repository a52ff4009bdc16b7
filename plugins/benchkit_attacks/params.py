"""Pydantic building blocks shared by the attack params models."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError

from benchkit.params import Budget, Params


Norm = Literal["Linf", "L2"]
LossName = Literal["ce", "cw", "dlr"]
GradientMode = Literal["exact", "adjoint"]
# What EOT averages: the samples' losses, or their logits before one loss (Hill et al. 2021's
# BPDA+EOT code, which DiffPure's BPDA evaluation runs: eot_attack_ave 'logits').
EOTAverage = Literal["loss", "logits"]
# Which iterate an attack returns per image: the one with the highest EOT loss, or the one the suite's
# verification protocol judges best (fewest correct verdicts, DiffHammer's N-evaluation), re-judged with
# fresh purifications every `select_every` steps.
Select = Literal["loss", "protocol"]


class SurrogateSpec(Params):
    """A cheaper stand-in for the defense that the attack differentiates (the host verifies on the
    real one), as the defense offers it: DiffPure's `fewer-steps` solver (Lee & Kim 2023's surrogate
    process) or `forward-only` (the gradient of the forward noising alone)."""

    kind: Literal["fewer-steps", "forward-only"]
    steps: int | None = Field(None, ge=1, description="solver steps of the fewer-steps surrogate")

    @model_validator(mode="after")
    def _steps(self) -> "SurrogateSpec":
        if (self.kind == "fewer-steps") != (self.steps is not None):
            raise PydanticCustomError("surrogate_steps", "steps is required for fewer-steps and not allowed for forward-only")
        return self



class NormBudget(Params):
    """norm + eps, where the 8/255 default only makes sense for Linf: an L2 attack must say eps."""

    norm: Norm = Field("Linf", description="the threat model's norm")
    eps: Budget = Field(8 / 255, description="the budget in [0, 1] pixel units, e.g. 8/255 (required for L2)")

    @model_validator(mode="after")
    def _l2_needs_eps(self) -> "NormBudget":
        if self.norm == "L2" and "eps" not in self.model_fields_set:
            raise PydanticCustomError("missing_eps", "eps is required for norm L2 (the default 8/255 is a Linf budget)")
        return self


class PGDSchedule(NormBudget):
    steps: int = Field(200, ge=1, description="iterations per restart")
    # None: eps / 4 (2/255 at the 8/255 default, the BPDA+EOT reference step; ~Lee & Kim's 0.007).
    step_size: Budget | None = Field(None, description="step per iteration (null: eps / 4)")
    eot: int = Field(20, ge=1, description="defense samples averaged per gradient (Expectation over Transformation)")
    restarts: int = Field(1, ge=1, description="runs from fresh random starts; each image keeps its best")
    random_start: bool = Field(True, description="start from a uniform point of the eps-ball")
    select: Select = Field("loss", description="the iterate returned per image: highest EOT loss, or the one the "
                                               "suite's verification protocol judges best")
    select_every: int = Field(1, ge=1, description="with select: protocol, judge every this many steps")

    def resolved_step(self) -> float:
        return self.step_size if self.step_size is not None else self.eps / 4
