"""Suites: YAML files naming a grid of (classifier, defense, attack) cells on one dataset.

`include:` pulls other YAML files in first (paths relative to the including file); the including
file's keys are deep-merged over them (mappings merge key by key, anything else replaces).
Unknown keys are errors; each plugin's params are validated by the plugin's own pydantic model.
Every problem is reported as one line `FILE: key.path: message`, all at once.
"""
from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

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


class VerdictSpec(_Strict):
    """How one verdict on an example is reached: one purification (single), or `samples`
    purifications whose logits are averaged (mean-logits, the paper's BPDA protocol) or whose
    predicted labels vote (majority: correct only if the true label has strictly the most votes)."""
    aggregate: Literal["single", "mean-logits", "majority"] = "single"
    samples: int = Field(1, ge=1, description="purifications per verdict (1 for single)")

    @model_validator(mode="after")
    def _single_is_one(self) -> "VerdictSpec":
        if self.aggregate == "single" and self.samples != 1:
            raise ValueError(f"aggregate 'single' takes one purification per verdict, not samples={self.samples}: "
                             "use mean-logits or majority")
        if self.aggregate != "single" and self.samples < 2:
            raise ValueError(f"aggregate '{self.aggregate}' needs samples >= 2")
        return self


class EvalSpec(_Strict):
    batch_size: int = Field(64, ge=1)
    shard_size: int | None = Field(None, ge=1, description="images per committed shard (default batch_size)")
    repeats: int = Field(3, ge=1, description="independent verdicts on each final example, fresh randomness each")
    verdict: VerdictSpec = Field(default_factory=VerdictSpec,
                                 description="how each of the `repeats` verdicts aggregates purifications")
    device: str | None = None
    clean_on: Literal["subset", "split"] = Field(
        "subset", description="standard accuracy on the attacked images only, or also on the dataset's whole "
                              "split (the dataset plugin rebuilt with n unset), as the paper reports it")


class ReferenceSpec(_Strict):
    """A published number shown beside the suite's own. With defense and attack (and classifier,
    unless any classifier will do) it is compared with that cell; otherwise it needs a `label` and
    is shown as a row of its own (e.g. an adversarial-training baseline the suite does not run).
    Accuracies in %, each ± only beside its mean; `source` names the publication, table and row."""
    classifier: str | None = None
    defense: str | None = None
    attack: str | None = None
    label: str | None = Field(None, description="display name of a reference that matches no cell")
    standard: float | None = Field(None, ge=0, le=100)
    standard_std: float | None = Field(None, ge=0, le=100)
    robust: float | None = Field(None, ge=0, le=100)
    robust_std: float | None = Field(None, ge=0, le=100)
    source: str = Field(min_length=1, description="publication, table and row, e.g. \"Nie et al. 2022, Table 1, "
                                                  "row 'WideResNet-28-10 / (Gowal et al., 2020)'\"")

    @model_validator(mode="after")
    def _placed_and_paired(self) -> "ReferenceSpec":
        if self.label is None and (self.defense is None or self.attack is None):
            raise ValueError("a reference needs a defense and an attack (to compare with that cell) or a label "
                             "(shown as a row of its own)")
        if self.label is not None and not self.label.strip():
            raise ValueError("label cannot be empty")
        for what in ("standard", "robust"):
            if getattr(self, f"{what}_std") is not None and getattr(self, what) is None:
                raise ValueError(f"{what}_std without {what}: a ± needs its mean")
        if not self.source.strip():
            raise ValueError("source cannot be blank: name the publication, table and row")
        return self


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


# The suites shipped with benchkit (read from the checkout, as the templates are: README installs editable).
SHIPPED = Path(__file__).resolve().parent.parent / "suites"


def shipped() -> list[Path]:
    """The shipped suites, by name (includes under _base/ are not suites)."""
    return sorted(SHIPPED.glob("*.yaml"))


def locate(name: str | Path) -> Path:
    """The suite file a user names: the path as given when it exists, else the shipped suite of that
    name (`digits_quick` or `digits_quick.yaml`), so suites can be named from any folder."""
    path = Path(name)
    if path.is_file() or path.parent != Path("."):
        return path
    candidate = SHIPPED / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
    return candidate if candidate.is_file() else path


def load_raw(path: str | Path) -> dict:
    path = locate(path)
    if not path.is_file():
        names = [p.stem for p in shipped()]
        close = difflib.get_close_matches(path.stem, names, n=1, cutoff=0.6)
        hint = f"; did you mean the shipped suite '{close[0]}'?" if close else \
            " (name a YAML file, or a shipped suite: see `benchkit ls suites`)"
        raise BadInput(f"{path}: file not found{hint}")
    return _read_yaml(path.resolve(), ())


def load_suite(path: str | Path) -> Suite:
    """Parse, merge includes and validate the schema (plugin ids and params: benchkit.resolve)."""
    path = locate(path)
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
