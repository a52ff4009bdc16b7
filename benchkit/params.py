"""Reusable pydantic types for plugin params."""
from __future__ import annotations

from fractions import Fraction
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict


def _budget(v: object) -> float:
    """Accept 0.03, "0.03" or "8/255" (the field's usual notation); reject anything else."""
    if isinstance(v, bool):
        raise ValueError("expected a number or a fraction like '8/255'")
    if isinstance(v, (int, float)):
        value = float(v)
    elif isinstance(v, str):
        try:
            value = float(Fraction(v.replace(" ", "")))
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"expected a number or a fraction like '8/255', got {v!r}") from None
    else:
        raise ValueError(f"expected a number or a fraction like '8/255', got {type(v).__name__}")
    if not value >= 0:
        raise ValueError("must be >= 0")
    return value


Budget = Annotated[float, BeforeValidator(_budget)]


class Params(BaseModel):
    """Base of plugin params models: unknown keys are errors."""
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
