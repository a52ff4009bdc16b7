"""Suites: YAML files naming a grid of (classifier, defense, attack) cells on one dataset.

`include:` pulls other YAML files in first (paths relative to the including file); the including
file's keys are deep-merged over them (mappings merge key by key, anything else replaces).
Unknown keys are errors; each plugin's params are validated by the plugin's own pydantic model.
Every problem is reported as one line `FILE: key.path: message`, all at once, FILE being the file
that set the key (an included one for the keys it set). Reading the YAML itself, with its limits
(size, encoding, nesting, alias expansion, duplicate keys), is benchkit.suite_yaml's.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import math
import numbers
import re
import sys
import unicodedata
from fractions import Fraction
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, ValidationError,
                      field_validator, model_validator)
from pydantic_core import PydanticCustomError

from benchkit import suite_yaml
from benchkit.errors import BadInput
from benchkit.suite_yaml import SuiteFile, deep_merge  # noqa: F401 - deep_merge is part of this module's API

GRADIENTS = Literal["exact", "adjoint", "bpda", "none"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DatasetSpec(_Strict):
    plugin: str
    params: dict[str, Any] = Field(default_factory=dict)

    def whole_split(self) -> "DatasetSpec":
        """The split this dataset draws its images from: the same plugin and params with n unset."""
        return self.model_copy(update={"params": {**self.params, "n": None}})


def has_control(value: str) -> bool:
    """Whether `value` holds a character a terminal or a line-based reader obeys rather than shows:
    C0 and C1 controls and DEL (Cc; U+009B alone is a CSI), format controls such as zero-width and
    bidirectional overrides and isolates (Cf), and the line and paragraph separators (Zl, Zp)."""
    return any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in value)


def check_id(value: str) -> str:
    """Ids name cells ('classifier/defense/attack') and reach terminals and CSV files."""
    if not value:
        raise ValueError("an id cannot be empty")
    if has_control(value):
        raise ValueError(f"control characters are not allowed in ids ({value!r})")
    if "/" in value:
        raise ValueError(f"'/' is not allowed in ids ('{value}'): cell keys join ids with '/'")
    return value


NAME = re.compile(r"[^\W][\w.-]{0,99}")   # \w: letters, digits and '_', in any script


def check_name(value: str) -> str:
    """A suite's name is the default output folder (runs/<suite>) that --fresh empties: a name,
    never a path."""
    if not NAME.fullmatch(value) or has_control(value):
        shown = value if len(value) <= 60 else value[:57] + "..."
        raise ValueError(f"{shown!r} is not a name (up to 100 letters, digits, '.', '_', '-', not starting with "
                         "'.' or '-'); the output folder is --out")
    return value


def _not_bool(value: Any) -> Any:
    # bool is an int: lax pydantic reads `seed: true` as 1 and `standard: false` as 0.0
    if isinstance(value, bool):
        raise PydanticCustomError("bool", "expected a number, got a boolean ({shown})", {"shown": str(value).lower()})
    return value


def _finite(value: int | float) -> int | float:
    if _beyond_float(value):
        raise PydanticCustomError("finite", "must be a finite number")
    return value


# The schema's numbers: a boolean is not one, and neither are inf, nan or an integer beyond floats.
Int = Annotated[int, BeforeValidator(_not_bool), AfterValidator(_finite)]
Float = Annotated[float, BeforeValidator(_not_bool), AfterValidator(_finite)]


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
    samples: Int = Field(1, ge=1, description="purifications per verdict (1 for single)")

    @model_validator(mode="after")
    def _single_is_one(self) -> "VerdictSpec":
        if self.aggregate == "single" and self.samples != 1:
            raise ValueError(f"aggregate 'single' takes one purification per verdict, not samples={self.samples}: "
                             "use mean-logits or majority")
        if self.aggregate != "single" and self.samples < 2:
            raise ValueError(f"aggregate '{self.aggregate}' needs samples >= 2")
        return self


class EvalSpec(_Strict):
    batch_size: Int = Field(64, ge=1)
    shard_size: Int | None = Field(None, ge=1, description="images per committed shard (default batch_size)")
    repeats: Int = Field(3, ge=1, description="independent verdicts on each final example, fresh randomness each")
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
    standard: Float | None = Field(None, ge=0, le=100)
    standard_std: Float | None = Field(None, ge=0, le=100)
    robust: Float | None = Field(None, ge=0, le=100)
    robust_std: Float | None = Field(None, ge=0, le=100)
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
    subset: Int = Field(16, ge=1, description="images used by the costlier checks")
    cost: Literal["bounded", "full"] = Field(
        "bounded", description="bounded: a cell's checks cost at most `budget` times the cell (fewer images or "
                               "iterations, see benchkit.checks); full: the whole subset at the attack's own iterations")
    budget: Float = Field(0.25, gt=0, description="with cost: bounded, the most a cell's checks may cost, as a "
                                                  "fraction of the cell's own compute seconds")

    @model_validator(mode="after")
    def _budget_is_bounded(self) -> "ChecksSpec":
        if self.cost == "full" and "budget" in self.model_fields_set:
            raise ValueError("budget bounds cost: bounded only; cost: full runs every check whole")
        return self


class SweepSpec(_Strict):
    """A plotted sweep: the cells whose `over` components differ only in params[param]. Without a
    `sweeps:` key the report finds them itself (any single numeric param that varies)."""
    over: Literal["defenses", "attacks"]
    param: str
    label: str | None = Field(None, description="axis label (default: the param's name)")
    points: dict[str, Float] = Field(default_factory=dict,
                                     description="other components of `over` placed on the axis, by id "
                                                 "(e.g. the undefended model at t* = 0)")


class Suite(_Strict):
    suite: str
    description: str = ""
    include: list[str] = Field(default_factory=list)
    seed: Int = 0
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

    # Key path -> the file of an include chain that set it (benchkit.suite_yaml.SuiteFile.origins).
    _sources: dict[tuple, str] = PrivateAttr(default_factory=dict)
    _shown: str | None = PrivateAttr(None)

    @field_validator("suite")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v)

    def source(self, loc: tuple | list, default: str | Path) -> str:
        """The file that set the value at `loc` (an included file, or `default`: the suite's own)."""
        found = suite_yaml.origin(self._sources, loc, str(default))
        return str(default) if found == self._shown else found

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


# ---------------------------------------------------------------- plugin params, as the user wrote them

def key_suffix(loc: tuple | list) -> str:
    """('eps',) -> '.eps', ('steps', 0) -> '.steps[0]': a key path to append to `attacks[1].params`."""
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc)


def _beyond_float(value: Any) -> bool:
    """A number a float cannot hold (inf, nan, |x| > 1.8e308), also when written as a string that a
    params model would read as one ('1e400' and 'nan' are strings to YAML, 'inf' to pydantic)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return abs(value) > sys.float_info.max
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, str):
        try:
            return not math.isfinite(float(value))
        except ValueError:
            pass
        if "/" in value:   # a budget fraction such as '8/255'
            try:
                return abs(Fraction(value.replace(" ", ""))) > sys.float_info.max
            except (ValueError, ZeroDivisionError):
                return False
    return False


def nonfinite(value: Any, loc: tuple = ()) -> list[tuple]:
    """Key paths (below `loc`) of the numbers in raw params that a float cannot hold."""
    if isinstance(value, dict):
        return [found for k, v in value.items() for found in nonfinite(v, (*loc, k))]
    if isinstance(value, list):
        return [found for i, v in enumerate(value) for found in nonfinite(v, (*loc, i))]
    return [loc] if _beyond_float(value) else []


def _child(validated: Any, key: Any) -> tuple[bool, Any]:
    if isinstance(validated, BaseModel):
        fields = type(validated).model_fields
        name = key if key in fields else next((n for n, f in fields.items() if f.alias == key), None)
        if name is not None:
            return True, getattr(validated, name)
        extra = validated.model_extra or {}
        return (True, extra[key]) if key in extra else (False, None)
    if isinstance(validated, dict) and key in validated:
        return True, validated[key]
    return False, None


def coerced_booleans(raw: Any, validated: Any, loc: tuple = ()) -> list[tuple[tuple, bool]]:
    """(key path, value) of every boolean in `raw` that validation turned into a number: lax
    pydantic reads `true` given for a float as 1.0. Raw and validated values are walked together, by key
    and by index, as far as their shapes agree."""
    if isinstance(raw, bool):
        return [(loc, raw)] if isinstance(validated, numbers.Number) and not isinstance(validated, bool) else []
    out = []
    if isinstance(raw, dict):
        for k, v in raw.items():
            found, sub = _child(validated, k)
            if found:
                out += coerced_booleans(v, sub, (*loc, k))
    elif isinstance(raw, list) and isinstance(validated, (list, tuple)) and len(raw) == len(validated):
        for i, (v, sub) in enumerate(zip(raw, validated)):
            out += coerced_booleans(v, sub, (*loc, i))
    return out


def stable_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- loading

def _loc(parts: tuple) -> str:
    return key_suffix(parts).removeprefix(".") or "(top level)"


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


def read_suite(path: str | Path) -> SuiteFile:
    """The suite file a user names, read and merged with its includes (benchkit.suite_yaml); BadInput
    when it cannot be read as a suite at all."""
    path = locate(path)
    if not path.is_file():
        names = [p.stem for p in shipped()]
        close = difflib.get_close_matches(path.stem, names, n=1, cutoff=0.6)
        hint = f"; did you mean the shipped suite '{close[0]}'?" if close else \
            " (name a YAML file, or a shipped suite: see `benchkit ls suites`)"
        raise BadInput(f"{path}: file not found{hint}")
    return suite_yaml.read(path)


def load_raw(path: str | Path) -> dict:
    return read_suite(path).data


def parse_suite(file: SuiteFile) -> tuple[Suite | None, list[str]]:
    """The schema checked: (the suite, or None when it fails; every problem of the file: duplicate
    keys, then the schema's, each naming the file that set the key)."""
    problems = list(file.problems)
    try:
        suite = Suite.model_validate(file.data)
    except ValidationError as exc:
        for err in exc.errors():
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
            problems.append(f"{file.source(err['loc'])}: {_loc(err['loc'])}: {msg}")
        return None, problems
    suite._sources = file.origins
    suite._shown = str(file.path)
    return suite, problems


def load_suite(path: str | Path) -> Suite:
    """Parse, merge includes and validate the schema (plugin ids and params: benchkit.resolve)."""
    suite, problems = parse_suite(read_suite(path))
    if problems:
        raise BadInput(problems)
    return suite


def resolved_dict(suite: Suite) -> dict:
    return suite.model_dump(mode="json")
