"""Transfer attack: craft examples on the undefended classifier (AttackContext.undefended) with any
registered attack (this plugin's, AutoAttack, ...), then let the host evaluate them on the defended
model. A source with variants (AutoAttack's versions) gives a transfer variant per source variant,
so the host takes the per-image worst case over them as it does for the source itself."""
from __future__ import annotations

import copy
from typing import Any

from pydantic import Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError
from torch import Tensor

from benchkit.attack import Attack, AttackContext, AttackResult
from benchkit.defended import DefendedModel
from benchkit.errors import BadInput

from benchkit.params import Params


def _error(message: str) -> PydanticCustomError:
    # A custom error type keeps pydantic from prefixing the message with "Value error, ".
    return PydanticCustomError("source", message)


def _attacks() -> dict:
    """Source attacks by id: every attack of the host's registry (all loaded plugins), over this
    plugin's own table (which serves alone where no host registry can be built)."""
    from benchkit_attacks.plugin import ATTACKS  # the table lists transfer itself: import late

    table: dict = dict(ATTACKS)
    try:
        from benchkit import registry

        table.update({e.id: e for e in registry.get("attacks")})
    except BadInput:
        pass
    return table


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

    def variants(self) -> list[tuple[str, Attack]]:
        subs = self.source.variants()
        if len(subs) == 1 and subs[0][1] is self.source:
            return [(subs[0][0], self)]
        return [(name, Transfer(sub)) for name, sub in subs]

    def run(self, model: DefendedModel, x: Tensor, y: Tensor, ctx: AttackContext) -> AttackResult:
        if ctx.undefended is None:
            raise ValueError("the transfer attack needs AttackContext.undefended (the bare classifier)")
        surrogate = DefendedModel(ctx.undefended, max_batch=model.max_batch)
        # The source's gradient mode was chosen for a defense; the surrogate has none to honour.
        source = copy.copy(self.source)
        source.gradient = None
        result = source.run(surrogate, x, y, ctx)
        # The source's own verdict (if any) was on the surrogate, not on this defense: not passed on.
        return AttackResult(result.x_adv, extra=result.extra,
                            stats={f"source_{k}": v for k, v in result.stats.items()})


def make_transfer(params: TransferParams) -> Transfer:
    return Transfer(params.source.build())


def transfer_threat(params: TransferParams):
    """The source attack's budget: the examples are the source's."""
    return params.source.threat()
