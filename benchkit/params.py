"""Reusable pydantic types for plugin params."""
from __future__ import annotations

import math
from fractions import Fraction
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

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


def type_name(annotation: Any) -> str:
    """A params annotation as a suite author writes values: Literal['a', 'b'] -> 'a' | 'b',
    Optional[int] -> int | null, Budget -> number or 'a/b'."""
    if annotation is type(None):
        return "null"
    if get_origin(annotation) is Annotated:
        args = get_args(annotation)
        parse = any(getattr(m, "func", None) is parse_budget for m in args[1:])
        return "number or 'a/b'" if parse else type_name(args[0])
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (Union, UnionType):
        return " | ".join(dict.fromkeys(type_name(a) for a in args))
    if origin in (list, tuple, set, dict):
        inner = ", ".join(type_name(a) for a in args if a is not Ellipsis)
        return f"{origin.__name__}[{inner}]" if inner else origin.__name__
    return getattr(annotation, "__name__", str(annotation).replace("typing.", ""))


def describe_fields(model: type[BaseModel], prefix: str = "") -> list[dict]:
    """Every parameter of a params model, nested models flattened ('surrogate.kind'): name, type,
    default ('required' when it has none) and the field's description."""
    rows = []
    for name, field in model.model_fields.items():
        if field.is_required():
            default = "required"
        else:
            value = field.get_default(call_default_factory=True)
            default = "null" if value is None else (value.model_dump() if isinstance(value, BaseModel) else value)
        rows.append({"name": prefix + name, "type": type_name(field.rebuild_annotation()),
                     "default": default, "description": field.description or ""})
        nested = [a for a in (field.annotation, *get_args(field.annotation))
                  if isinstance(a, type) and issubclass(a, BaseModel)]
        for sub in nested:
            rows += describe_fields(sub, prefix=f"{prefix}{name}.")
    return rows
