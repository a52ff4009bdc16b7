"""Transfer attack: craft examples on the undefended classifier (AttackContext.undefended) with any
attack of this plugin, then let the host evaluate them on the defended model."""
from __future__ import annotations

import copy
from typing import Any

from pydantic import Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError
from torch import Tensor

from benchkit.attack import Attack, AttackContext, AttackResult
from benchkit.defended import DefendedModel

from benchkit.params import Params


def _error(message: str) -> PydanticCustomError:
    # A custom error type keeps pydantic from prefixing the message with "Value error, ".
    return PydanticCustomError("source", message)


def _attacks() -> dict:
    from benchkit_attacks.plugin import ATTACKS  # the table lists transfer itself: import late

    return ATTACKS


class SourceSpec(Params):
    plugin: str
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _resolvable(self) -> "SourceSpec":
        table = _attacks()
        if self.plugin == "transfer":
            raise _error("a transfer attack cannot use transfer as its source")
        if self.plugin not in table:
            known = ", ".join(sorted(k for k in table if k != "transfer"))
            raise _error(f"unknown source attack {self.plugin!r} (known: {known})")
        try:
            table[self.plugin].params.model_validate(self.params)
        except ValidationError as exc:
            # One error under `source` that names every nested key (pydantic cannot nest them).
            raise _error("; ".join(f"{'.'.join(map(str, ('params', *e['loc'])))}: "
                                   f"{e['msg'].removeprefix('Value error, ')}" for e in exc.errors())) from None
        return self

    def build(self) -> Attack:
        entry = _attacks()[self.plugin]
        return entry.factory(entry.params.model_validate(self.params))

    def threat(self):
        entry = _attacks()[self.plugin]
        return entry.threat(entry.params.model_validate(self.params))


class TransferParams(Params):
    source: SourceSpec


class Transfer(Attack):
    gradient = None  # no gradient flows through the defended model
    access = "transfer"

    def __init__(self, source: Attack):
        self.source = source

    def run(self, model: DefendedModel, x: Tensor, y: Tensor, ctx: AttackContext) -> AttackResult:
        if ctx.undefended is None:
            raise ValueError("the transfer attack needs AttackContext.undefended (the bare classifier)")
        surrogate = DefendedModel(ctx.undefended, max_batch=model.max_batch)
        # The source's gradient mode was chosen for a defense; the surrogate has none to honour.
        source = copy.copy(self.source)
        source.gradient = None
        result = source.run(surrogate, x, y, ctx)
        return AttackResult(result.x_adv, extra=result.extra,
                            stats={f"source_{k}": v for k, v in result.stats.items()})


def make_transfer(params: TransferParams) -> Transfer:
    return Transfer(params.source.build())


def transfer_threat(params: TransferParams):
    """The source attack's budget: the examples are the source's."""
    return params.source.threat()
