"""Reusable pydantic types for plugin params."""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from pydantic_core import PydanticCustomError


def parse_budget(value: object) -> float:
    """A budget as a float: numbers as they are, strings like "8/255" or "0.5" exactly as written,
    so suites state budgets the way papers do without rounding them by hand."""
    if isinstance(value, bool):  # bool is an int subclass; True is never a meaningful budget
        raise PydanticCustomError("budget", "expected a number or a fraction like '8/255', not a boolean")
    if isinstance(value, str):
        try:
            value = float(Fraction(value.replace(" ", "")))
        except (ValueError, ZeroDivisionError):
            raise PydanticCustomError("budget", "expected a number or a fraction like '8/255', got {value}",
                                      {"value": repr(value)}) from None
    if isinstance(value, (int, float)) and not math.isfinite(float(value)):
        raise PydanticCustomError("budget", "budget must be finite")
    return value  # type: ignore[return-value]  # pydantic checks the float type and the bound next


# A non-negative finite float that also accepts "a/b" strings.
Budget = Annotated[float, BeforeValidator(parse_budget), Field(ge=0)]


class Params(BaseModel):
    """Base of plugin params models: unknown keys are errors."""
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
