"""Suites: YAML files naming a grid of (classifier, defense, attack) cells on one dataset.

`include:` pulls other YAML files in first (paths relative to the including file); the including
file's keys are deep-merged over them (mappings merge key by key, anything else replaces).
Unknown keys are errors; each plugin's params are validated by the plugin's own pydantic model.
Every problem is reported as one line `FILE: key.path: message`, all at once.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from benchkit.errors import BadInput

GRADIENTS = Literal["exact", "adjoint", "bpda", "none"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DatasetSpec(_Strict):
    plugin: str
    params: dict[str, Any] = Field(default_factory=dict)

    def whole_split(self) -> "DatasetSpec":
        """The split this dataset draws its images from: the same plugin and params with n unset."""
        return self.model_copy(update={"params": {**self.params, "n": None}})


def check_id(value: str) -> str:
    """Ids name cells ('classifier/defense/attack') and reach terminals and CSV files."""
    if not value:
        raise ValueError("an id cannot be empty")
    if "/" in value:
        raise ValueError(f"'/' is not allowed in ids ('{value}'): cell keys join ids with '/'")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError(f"control characters are not allowed in ids ({value!r})")
    return value


class ComponentSpec(_Strict):
    id: str
    plugin: str
    params: dict[str, Any] = Field(default_factory=dict)
    description: str = ""

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        return check_id(v)


class DefenseSpec(ComponentSpec):
    # The gradient mode attacks see unless an attack fixes its own (BPDA fixes 'bpda').
    gradient: GRADIENTS | None = None


class CellSpec(_Strict):
    classifier: str
    defense: str
    attack: str


class EvalSpec(_Strict):
    batch_size: int = Field(64, ge=1)
    shard_size: int | None = Field(None, ge=1, description="images per committed shard (default batch_size)")
    repeats: int = Field(3, ge=1, description="re-evaluations of each final example with fresh randomness")
    device: str | None = None
    clean_on: Literal["subset", "split"] = Field(
        "subset", description="standard accuracy on the attacked images only, or also on the dataset's whole "
                              "split (the dataset plugin rebuilt with n unset), as the paper reports it")


class ReferenceSpec(_Strict):
    defense: str
    attack: str
    classifier: str | None = None
    standard: float | None = None
    robust: float | None = None
    source: str


class ChecksSpec(_Strict):
    enabled: list[str] | Literal["all"] = "all"
    subset: int = Field(16, ge=1, description="images used by the costlier checks")


class SweepSpec(_Strict):
    """A plotted sweep: the cells whose `over` components differ only in params[param]. Without a
    `sweeps:` key the report finds them itself (any single numeric param that varies)."""
    over: Literal["defenses", "attacks"]
    param: str
    label: str | None = Field(None, description="axis label (default: the param's name)")
    points: dict[str, float] = Field(default_factory=dict,
                                     description="other components of `over` placed on the axis, by id "
                                                 "(e.g. the undefended model at t* = 0)")


class Suite(_Strict):
    suite: str
    description: str = ""
    include: list[str] = Field(default_factory=list)
    seed: int = 0
    dataset: DatasetSpec
    classifiers: list[ComponentSpec]
    defenses: list[DefenseSpec]
    attacks: list[ComponentSpec]
    grid: Literal["all"] | None = None
    cells: list[CellSpec] | None = None
    eval: EvalSpec = Field(default_factory=EvalSpec)
    checks: ChecksSpec = Field(default_factory=ChecksSpec)
    sweeps: list[SweepSpec] | None = None
    references: list[ReferenceSpec] = Field(default_factory=list)

    @field_validator("classifiers", "defenses", "attacks")
    @classmethod
    def _unique_ids(cls, items: list[ComponentSpec]) -> list[ComponentSpec]:
        seen: set[str] = set()
        for it in items:
            if it.id in seen:
                raise ValueError(f"duplicate id '{it.id}'")
            seen.add(it.id)
        return items

    def cell_specs(self) -> list[CellSpec]:
        if self.cells is not None:
            return list(self.cells)
        return [CellSpec(classifier=c.id, defense=d.id, attack=a.id)
                for c in self.classifiers for d in self.defenses for a in self.attacks]

    def component(self, kind: str, id: str) -> ComponentSpec:
        return next(c for c in getattr(self, kind) if c.id == id)


def stable_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- loading

def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(path: Path, chain: tuple[Path, ...]) -> dict:
    where = chain[-1] if chain else None
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise BadInput(f"{where}: include: include cycle {cycle}")
    if not path.is_file():
        raise BadInput(f"{where or path}: include: file not found: {path}" if where else f"{path}: file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        pos = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise BadInput(f"{path}: {pos}malformed YAML: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise BadInput(f"{path}: the top level must be a mapping, not {type(data).__name__}")
    includes = data.get("include", [])
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list):
        raise BadInput(f"{path}: include: must be a list of paths")
    merged: dict = {}
    for inc in includes:
        merged = deep_merge(merged, _read_yaml((path.parent / str(inc)).resolve(), (*chain, path)))
    merged = deep_merge(merged, {k: v for k, v in data.items() if k != "include"})
    merged["include"] = [str(i) for i in includes]
    return merged


def _loc(parts: tuple) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def load_raw(path: str | Path) -> dict:
    return _read_yaml(Path(path).resolve(), ())


def load_suite(path: str | Path) -> Suite:
    """Parse, merge includes and validate the schema (plugin ids and params: benchkit.resolve)."""
    path = Path(path)
    raw = load_raw(path)
    try:
        return Suite.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
            lines.append(f"{path}: {_loc(err['loc'])}: {msg}")
        raise BadInput(lines) from None


def resolved_dict(suite: Suite) -> dict:
    return suite.model_dump(mode="json")
