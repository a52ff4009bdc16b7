"""Suites: YAML files naming a grid of (classifier, defense, attack) cells on one dataset.

`include:` pulls other YAML files in first (paths relative to the including file); the including
file's keys are deep-merged over them (mappings merge key by key, anything else replaces).
Unknown keys are errors; each plugin's params are validated by the plugin's own pydantic model.
Every problem is reported as one line `FILE: key.path: message`, all at once.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from benchkit import registry
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


class ComponentSpec(_Strict):
    id: str
    plugin: str
    params: dict[str, Any] = Field(default_factory=dict)
    description: str = ""


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


@dataclass(frozen=True)
class Cell:
    classifier: ComponentSpec
    defense: DefenseSpec
    attack: ComponentSpec

    @property
    def key(self) -> str:
        return f"{self.classifier.id}/{self.defense.id}/{self.attack.id}"

    def config(self, suite: Suite) -> dict:
        """Everything that determines this cell's numbers (its hash keys the stored results)."""
        return {"dataset": suite.dataset.model_dump(), "seed": suite.seed,
                "eval": numbers_config(suite.eval),
                "classifier": self.classifier.model_dump(exclude={"description"}),
                "defense": self.defense.model_dump(exclude={"description"}),
                "attack": self.attack.model_dump(exclude={"description"})}

    def config_hash(self, suite: Suite) -> str:
        return stable_hash(self.config(suite))


def numbers_config(spec: EvalSpec) -> dict:
    """The eval settings that change a cell's numbers (not where it runs, nor the extra split groups)."""
    return {k: v for k, v in spec.model_dump().items() if k not in ("device", "clean_on")}


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


def load_suite(path: str | Path, *, resolve: bool = True) -> Suite:
    """Parse, merge includes, validate the schema and (with resolve) every plugin id and params."""
    path = Path(path)
    raw = load_raw(path)
    try:
        suite = Suite.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            lines.append(f"{path}: {_loc(err['loc'])}: {msg}")
        raise BadInput(lines) from None
    if resolve:
        problems = resolve_problems(suite, path)
        if problems:
            raise BadInput(problems)
    return suite


def resolve_problems(suite: Suite, path: Path) -> list[str]:
    """Every plugin id, params model and cross-reference checked; all problems returned."""
    problems: list[str] = []

    def check(kind: str, where: str, plugin: str, params: dict) -> None:
        try:
            registry.get(kind).get(plugin, where=f"{path}: {where}.plugin").validate(params, f"{path}: {where}")
        except BadInput as exc:
            problems.extend(exc.problems)

    check("datasets", "dataset", suite.dataset.plugin, suite.dataset.params)
    if suite.eval.clean_on == "split":
        try:
            fields = registry.get("datasets").get(suite.dataset.plugin).params.model_fields
        except (BadInput, AttributeError):
            fields = {"n": None}  # an unknown plugin is reported above
        if "n" not in fields:
            problems.append(f"{path}: eval.clean_on: 'split' needs a dataset plugin with an 'n' param "
                            f"(unset for the whole split); '{suite.dataset.plugin}' has none")
    for kind in ("classifiers", "defenses", "attacks"):
        for i, comp in enumerate(getattr(suite, kind)):
            check(kind, f"{kind}[{i}]", comp.plugin, comp.params)
    ids = {k: {c.id for c in getattr(suite, k)} for k in ("classifiers", "defenses", "attacks")}
    if suite.cells is not None and suite.grid is not None:
        problems.append(f"{path}: grid: give either 'grid: all' or 'cells', not both")
    for i, cell in enumerate(suite.cells or []):
        for kind, val in (("classifiers", cell.classifier), ("defenses", cell.defense), ("attacks", cell.attack)):
            if val not in ids[kind]:
                problems.append(f"{path}: cells[{i}].{kind[:-1]}: unknown id '{val}' (defined: {', '.join(sorted(ids[kind]))})")
    for i, ref in enumerate(suite.references):
        for kind, val in (("defenses", ref.defense), ("attacks", ref.attack), ("classifiers", ref.classifier)):
            if val is not None and val not in ids[kind]:
                problems.append(f"{path}: references[{i}].{kind[:-1]}: unknown id '{val}'")
    return problems


def expand(suite: Suite) -> list[Cell]:
    return [Cell(suite.component("classifiers", c.classifier), suite.component("defenses", c.defense),
                 suite.component("attacks", c.attack)) for c in suite.cell_specs()]


def resolved_dict(suite: Suite) -> dict:
    return suite.model_dump(mode="json")
