"""A suite resolved once: every plugin id found, every params model validated, every attack's budget
taken from its plugin's registered mapping, and the cells expanded. `validate`, `run`, `assets`,
`purify`, the checks and the Ray workers all work from a `ResolvedSuite`.

Cells come in two kinds: an attack cell (classifier, defense, attack) on the suite's images, and a
clean cell (classifier, defense) that measures standard accuracy on the dataset's whole split
(`eval.clean_on: split`). Both go through the same plan / shard / store path.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel
from torch import nn

from benchkit import registry
from benchkit.attack import Attack
from benchkit.dataset import Dataset
from benchkit.defended import DefendedModel, Purifier, default_gradient, supported_modes, unknown_modes
from benchkit.errors import BadInput
from benchkit.memory import Limits
from benchkit.suite import (ComponentSpec, DatasetSpec, DefenseSpec, EvalSpec, Suite, SuiteFile, coerced_booleans,
                            key_suffix, nonfinite, parse_suite, read_suite, stable_hash)
from benchkit.threat import ThreatModel

# The version of the way numbers are made (seeding, verification). It keys every stored cell, so
# results made under another protocol are recomputed, never silently reused.
# 4: a cell's config also holds the sha256 of every file its components declare and the versions of
# the plugins providing them (results made with other weights or other plugin code are not reused).
PROTOCOL = 4


@dataclass(frozen=True)
class Component:
    """One suite entry bound to its registry entry and validated params."""
    kind: str
    where: str
    spec: ComponentSpec | DatasetSpec
    entry: registry.Entry
    params: BaseModel

    def build(self) -> Any:
        return self.entry.build(self.params)


@dataclass(frozen=True)
class Cell:
    kind: Literal["attack", "clean"]
    classifier: ComponentSpec
    defense: DefenseSpec
    attack: ComponentSpec | None
    dataset: DatasetSpec

    @property
    def group(self) -> str:
        return f"{self.classifier.id}/{self.defense.id}"

    @property
    def key(self) -> str:
        """Unique in a suite: ids cannot contain '/', and clean cells have two parts, attack cells three."""
        return self.group if self.attack is None else f"{self.group}/{self.attack.id}"

    def config(self, suite: Suite) -> dict:
        """Everything that determines this cell's numbers (its hash keys the stored results): the
        resolved settings, the sha256 of every file its components declare (`files`: role -> {asset
        relpath: sha256}, only roles that declare files on disk) and the version of each plugin
        providing them (`plugins`: plugin name -> its distribution's version)."""
        dump = lambda c: None if c is None else c.model_dump(exclude={"description"})
        roles = {role: (kind, spec) for role, kind, spec in (
            ("dataset", "datasets", self.dataset), ("classifier", "classifiers", self.classifier),
            ("defense", "defenses", self.defense), ("attack", "attacks", self.attack)) if spec is not None}
        return {"protocol": PROTOCOL, "kind": self.kind, "dataset": self.dataset.model_dump(), "seed": suite.seed,
                "eval": numbers_config(suite.eval), "classifier": dump(self.classifier),
                "defense": dump(self.defense), "attack": dump(self.attack),
                "files": {role: files for role, (kind, spec) in roles.items() if (files := component_files(kind, spec))},
                "plugins": plugin_versions(roles.values())}

    def config_hash(self, suite: Suite) -> str:
        return stable_hash(self.config(suite))


def component_files(kind: str, spec: ComponentSpec | DatasetSpec) -> dict[str, str]:
    """{asset relpath: sha256} of the files a component declares for its params (registry `assets=`)
    that are on disk; hashed on the driver once per file (benchkit.assets' digest cache)."""
    from benchkit.assets import declared_digests

    entry = registry.get(kind).get(spec.plugin)
    if entry.assets is None:
        return {}
    return declared_digests(entry.assets(entry.validate(spec.params, f"{kind}: {spec.plugin}")))


def plugin_versions(components) -> dict[str, str | None]:
    """Plugin name -> the version of the distribution providing it, for (kind, spec) components:
    results computed with other plugin code are then another configuration."""
    from benchkit.plugins import plugin_info

    versions = {p["name"]: p["version"] for p in plugin_info()}
    names = {registry.get(kind).get(spec.plugin).plugin for kind, spec in components}
    return {name: versions.get(name) for name in sorted(names)}


def numbers_config(spec: EvalSpec) -> dict:
    """The eval settings that change a cell's numbers. Batch and shard sizes do not: every draw is
    seeded per image."""
    return {"repeats": spec.repeats, "verdict": spec.verdict.model_dump()}


@dataclass
class Components:
    """The built models of a suite on one device (a missing checkpoint fails before any cell runs)."""
    datasets: dict[str, Dataset]            # by the dataset spec's hash: the suite's images, the split
    classifiers: dict[str, nn.Module]
    defenses: dict[str, Purifier]
    attacks: dict[str, Attack]
    device: torch.device
    defense_gradients: dict[str, str | None] = field(default_factory=dict)
    # Clean verdicts per (group, image index, tag): every attack of a group shares them.
    clean_flags: dict[tuple, str] = field(default_factory=dict)
    # Per cell key, what it has learnt about memory (benchkit.memory): its shards and checks start there.
    memory_limits: dict[str, Limits] = field(default_factory=dict)

    def dataset(self, cell: Cell) -> Dataset:
        return self.datasets[stable_hash(cell.dataset.model_dump())]

    def defended(self, cell: Cell, attack: Attack | None = None) -> DefendedModel:
        purifier = self.defenses[cell.defense.id]
        gradient = ((attack.gradient if attack is not None else None) or self.defense_gradients.get(cell.defense.id)
                    or default_gradient(purifier))
        return DefendedModel(self.classifiers[cell.classifier.id], purifier, gradient=gradient,
                             limits=self.memory_limits.setdefault(cell.key, Limits()))


def describe_defense(spec: DefenseSpec, entry: registry.Entry | None) -> str:
    """The defense as problem lines name it, e.g. `defense 'gan' (gan-inversion, mode: opt)`: its
    params are shown when its gradient modes depend on them."""
    shown = "".join(f", {k}: {v}" for k, v in spec.params.items()) if entry and callable(entry.gradient_modes) else ""
    return f"defense '{spec.id}' ({spec.plugin}{shown})"


def _cell_names(suite: Suite) -> dict[tuple[str, str], list[str]]:
    """(defense id, attack id) -> how the suite file names the cells pairing them: cells[i], or the
    grid's cell keys."""
    names: dict[tuple[str, str], list[str]] = {}
    for i, c in enumerate(suite.cell_specs()):
        names.setdefault((c.defense, c.attack), []).append(
            f"cells[{i}]" if suite.cells is not None else f"{c.classifier}/{c.defense}/{c.attack}")
    return names


def gradient_problems(path: Path, suite: Suite, modes: dict[str, tuple[str, ...]], attacks: dict[str, Attack],
                      described: dict[str, str]) -> list[str]:
    """One line per defense whose `gradient:` setting it does not support, and per (defense, attack)
    pair whose attack fixes a gradient mode the defense does not support. `modes`: defense id -> its
    supported modes (defenses absent from it are not checked here). An attack without a mode of its
    own (gradient None: query and transfer attacks) sees the defense's setting or default, checked above."""
    lines = []
    for i, d in enumerate(suite.defenses):
        if d.id in modes and d.gradient and d.gradient not in modes[d.id]:
            lines.append(f"{path}: defenses[{i}].gradient: {described[d.id]} supports {', '.join(modes[d.id])}, "
                         f"not '{d.gradient}': set one of those, or leave gradient unset")
    for (d, a), names in _cell_names(suite).items():
        if d not in modes or a not in attacks:
            continue
        attack = attacks[a]
        fixed = dict.fromkeys(m for m in (attack.gradient, *(sub.gradient for _, sub in attack.variants())) if m)
        where = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        plugin = suite.component("attacks", a).plugin
        for mode in (m for m in fixed if m not in modes[d]):
            lines.append(f"{path}: {'grid: ' if suite.cells is None else ''}{where}: {described[d]} supports "
                         f"{', '.join(modes[d])}; attack '{a}' ({plugin}) differentiates with {mode}: use an attack "
                         f"in one of those modes (a BPDA attack for bpda), or a defense with {mode} gradients")
    return lines


def build_problems(where: str, declared: tuple[str, ...] | None, purifier: Purifier) -> list[str]:
    """The host trusts no plugin: a built purifier must name only real modes and offer every mode
    its plugin declared at registration (validate passed cells on that declaration)."""
    if bad := unknown_modes(purifier.gradient_modes):
        return [f"{where}: {type(purifier).__name__}.gradient_modes names {', '.join(map(repr, bad))}, "
                f"not a gradient mode (exact, adjoint; bpda and none are always there)"]
    lacking = [m for m in declared or () if m not in supported_modes(purifier)]
    if lacking:
        return [f"{where}: the plugin registered gradient_modes {', '.join(declared)}, but its "
                f"{type(purifier).__name__} supports only {', '.join(supported_modes(purifier))} "
                f"(no {', '.join(lacking)}): the plugin's registration is wrong"]
    return []


def _freeze(module: nn.Module, device: torch.device) -> nn.Module:
    module.to(device).eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


@dataclass
class ResolvedSuite:
    suite: Suite
    path: Path
    dataset: Component
    split: Component | None
    classifiers: dict[str, Component]
    defenses: dict[str, Component]
    attacks: dict[str, Component]
    threats: dict[str, ThreatModel]          # attack id -> the budget its examples are verified against
    attack_objects: dict[str, Attack]
    cells: list[Cell]
    # Defense id -> the gradient modes its plugin declared at registration for its params (None:
    # undeclared, checked once built).
    declared_modes: dict[str, tuple[str, ...] | None] = field(default_factory=dict)

    def cell(self, key: str) -> Cell:
        return next(c for c in self.cells if c.key == key)

    def components(self) -> list[Component]:
        return [self.dataset, *([self.split] if self.split else []), *self.classifiers.values(),
                *self.defenses.values(), *self.attacks.values()]

    def assets(self) -> list[tuple[str, Any, Path]]:
        """(where in the suite, asset, resolved path) for every file the components declare."""
        out = []
        for comp in self.components():
            if comp.entry.assets is None or comp is self.split:
                continue
            for asset, explicit in comp.entry.assets(comp.params):
                out.append((f"{self.path}: {comp.where}", asset, Path(explicit).expanduser() if explicit else asset.path))
        return out

    def build(self, device: torch.device) -> Components:
        """Every model on `device`; BadInput listing every component that cannot be built."""
        problems: list[str] = []

        def build(comp: Component):
            try:
                return comp.build()
            except (BadInput, FileNotFoundError) as exc:  # e.g. a missing checkpoint: say which entry needs it
                problems.extend(f"{self.path}: {comp.where}: {p}" for p in getattr(exc, "problems", [str(exc)]))
            return None

        datasets = {stable_hash(c.spec.model_dump()): build(c) for c in (self.dataset, self.split) if c is not None}
        classifiers = {k: build(c) for k, c in self.classifiers.items()}
        defenses = {k: build(c) for k, c in self.defenses.items()}
        undeclared = {}
        for k, purifier in defenses.items():
            if purifier is None:
                continue
            declared = self.declared_modes.get(k)
            problems.extend(build_problems(f"{self.path}: {self.defenses[k].where}", declared, purifier))
            if declared is None:   # resolve could not check its cells: do it now, before any runs
                undeclared[k] = supported_modes(purifier)
        problems.extend(gradient_problems(self.path, self.suite, undeclared, self.attack_objects,
                                          {k: describe_defense(c.spec, None) for k, c in self.defenses.items()}))
        if problems:
            raise BadInput(problems)
        return Components(datasets, {k: _freeze(v, device) for k, v in classifiers.items()},
                          {k: _freeze(v, device) for k, v in defenses.items()}, dict(self.attack_objects), device,
                          {d.id: d.gradient for d in self.suite.defenses})

    def rebuild_attack(self, attack_id: str, overrides: dict) -> tuple[Attack, ThreatModel]:
        """The attack with some params changed (checks), and the budget those params declare."""
        comp = self.attacks[attack_id]
        params = comp.entry.validate({**comp.spec.params, **overrides}, f"{self.path}: {comp.where}")
        return comp.entry.build(params), comp.entry.threat(params)


DEVICE_TYPES = ("cpu", "cuda", "mps")


def device_problem(name: str | None) -> str | None:
    """Why eval.device cannot name a device benchkit runs on, or None. Whether this machine has
    it is decided at run time (validate may run elsewhere)."""
    if name is None or name == "auto":
        return None
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        device = None
    if device is None or device.type not in DEVICE_TYPES:
        return f"'{name}' is not a device benchkit runs on (auto, cpu, cuda, cuda:N, mps)"
    return None


def plugin_params(kind: str, where: str, file: str, plugin: str, params: dict) -> tuple[registry.Entry, BaseModel]:
    """One suite entry's plugin id and params (`where`: e.g. attacks[1], in `file`). The host checks
    what the user wrote around the plugin's own model: numbers a float cannot hold are refused first
    (a model turns '1e400' into inf, and 10**400 overflows when made a float), and a boolean the model
    read as a number (`true` given for a float, as 1.0) after. Only here, on the user's params: the checks
    rebuild attacks through Entry.validate with budgets of their own. BadInput: every problem."""
    entry = registry.get(kind).get(plugin, where=f"{file}: {where}.plugin")
    prefix = f"{file}: {where}.params"
    flagged = [prefix + key_suffix(loc) for loc in nonfinite(params)]
    problems = [f"{key}: must be a finite number" for key in flagged]
    try:
        model = entry.validate(params, f"{file}: {where}")
    except BadInput as exc:
        # What the model says of a flagged value (or of its overflow) adds nothing to the line above.
        said = tuple(f"{key}{c}" for key in flagged for c in ":.[") + ((f"{prefix}:",) if flagged else ())
        raise BadInput(problems + [p for p in exc.problems if not p.startswith(said)]) from None
    problems += [f"{prefix}{key_suffix(loc)}: expected a number, got a boolean ({str(value).lower()})"
                 for loc, value in coerced_booleans(params, model)]
    if problems:
        raise BadInput(problems)
    return entry, model


def _entry_problems(file: SuiteFile) -> list[str]:
    """Plugin ids and params of every entry of a suite whose schema failed, where the entry is
    well-formed enough (a mapping with a string plugin and mapping params), so that one
    `validate` reports the schema's problems and the plugins' together."""
    entries = [("datasets", ("dataset",), file.data.get("dataset"))]
    for kind in ("classifiers", "defenses", "attacks"):
        items = file.data.get(kind)
        entries += [(kind, (kind, i), item) for i, item in enumerate(items)] if isinstance(items, list) else []
    problems = []
    for kind, loc, item in entries:
        if not isinstance(item, dict) or not isinstance(item.get("plugin"), str):
            continue
        params = item.get("params", {})
        if not isinstance(params, dict):
            continue
        where = f"{loc[0]}[{loc[1]}]" if len(loc) > 1 else loc[0]
        try:
            plugin_params(kind, where, file.source(loc), item["plugin"], params)
        except BadInput as exc:
            problems += exc.problems
    return problems


def resolve(suite: Suite, path: str | Path) -> ResolvedSuite:
    """Every plugin id, params model, budget mapping and cross-reference checked; BadInput with
    every problem at once."""
    from benchkit import checks  # the check names; checks imports this module

    path = Path(path)
    problems: list[str] = []

    def component(kind: str, where: str, spec, loc: tuple) -> Component | None:
        try:
            entry, params = plugin_params(kind, where, suite.source(loc, path), spec.plugin, spec.params)
            return Component(kind, where, spec, entry, params)
        except BadInput as exc:
            problems.extend(exc.problems)
        return None

    if (why := device_problem(suite.eval.device)) is not None:
        problems.append(f"{path}: eval.device: {why}")
    dataset = component("datasets", "dataset", suite.dataset, ("dataset",))
    split = None
    if suite.eval.clean_on == "split" and dataset is not None:
        if "n" not in dataset.entry.params.model_fields:
            problems.append(f"{path}: eval.clean_on: 'split' needs a dataset plugin with an 'n' param "
                            f"(unset for the whole split); '{suite.dataset.plugin}' has none")
        else:
            split = component("datasets", "dataset (eval.clean_on: split)", suite.dataset.whole_split(), ("dataset",))
    comps = {kind: {c.id: component(kind, f"{kind}[{i}]", c, (kind, i)) for i, c in enumerate(getattr(suite, kind))}
             for kind in ("classifiers", "defenses", "attacks")}
    threats, objects = {}, {}
    for i, (attack_id, comp) in enumerate(comps["attacks"].items()):
        if comp is None:
            continue
        where = f"{suite.source(('attacks', i), path)}: {comp.where}"
        try:
            threats[attack_id] = comp.entry.threat(comp.params)
            objects[attack_id] = attack = comp.build()
            if not attack.variants():
                problems.append(f"{where}: attack '{comp.spec.plugin}' has no variants to run")
        except BadInput as exc:
            problems.extend(f"{where}: {p}" for p in exc.problems)
        except Exception as exc:  # noqa: BLE001 - a plugin's bug in building an attack is reported, not raised
            problems.append(f"{where}: attack '{comp.spec.plugin}' could not be built: {type(exc).__name__}: {exc}")

    ids = {k: set(v) for k, v in comps.items()}
    if suite.cells is not None and suite.grid is not None:
        problems.append(f"{path}: grid: give either 'grid: all' or 'cells', not both")
    for i, cell in enumerate(suite.cells or []):
        for kind, val in (("classifiers", cell.classifier), ("defenses", cell.defense), ("attacks", cell.attack)):
            if val not in ids[kind]:
                problems.append(f"{path}: cells[{i}].{kind[:-1]}: unknown id '{val}' (defined: {', '.join(sorted(ids[kind]))})")
    for i, ref in enumerate(suite.references):
        if ref.defense is None or ref.attack is None:
            continue   # a labelled reference row matches no cell: its classifier is display text
        for kind, val in (("defenses", ref.defense), ("attacks", ref.attack), ("classifiers", ref.classifier)):
            if val is not None and val not in ids[kind]:
                problems.append(f"{path}: references[{i}].{kind[:-1]}: unknown id '{val}'")
    if suite.checks.enabled != "all":
        for name in suite.checks.enabled:
            if name not in checks.names():
                problems.append(f"{path}: checks.enabled: unknown check '{name}' (known: {', '.join(checks.names())})")
    for i, sweep in enumerate(suite.sweeps or []):
        for point in sweep.points:
            if point not in ids[sweep.over]:
                problems.append(f"{path}: sweeps[{i}].points: unknown {sweep.over[:-1]} id '{point}'")
    declared = {}
    for k, comp in comps["defenses"].items():
        try:
            declared[k] = None if comp is None else comp.entry.declared_modes(comp.params)
        except BadInput as exc:
            problems.extend(f"{path}: {comp.where}: {p}" for p in exc.problems)
    # Each cell's gradient mode against its defense's declaration (cells naming unknown ids are skipped).
    problems += gradient_problems(path, suite, {k: supported_modes(m) for k, m in declared.items() if m is not None},
                                  objects, {k: describe_defense(c.spec, c.entry) for k, c in comps["defenses"].items()
                                            if c is not None})
    if problems:
        raise BadInput(problems)

    cells = []
    for spec in suite.cell_specs():
        cells.append(Cell("attack", suite.component("classifiers", spec.classifier),
                          suite.component("defenses", spec.defense), suite.component("attacks", spec.attack),
                          suite.dataset))
    if split is not None:
        groups = dict.fromkeys((c.classifier.id, c.defense.id) for c in cells)
        cells += [Cell("clean", suite.component("classifiers", clf), suite.component("defenses", dfn), None,
                       split.spec) for clf, dfn in groups]
    return ResolvedSuite(suite, path, dataset, split, comps["classifiers"], comps["defenses"], comps["attacks"],
                         threats, objects, cells, declared)


def load(path: str | Path, *, seed: int | None = None) -> ResolvedSuite:
    """Load, validate and resolve a suite file (optionally under another seed). BadInput with every
    problem at once: the file's, the schema's and the plugins' (of each entry well-formed enough,
    when the schema fails)."""
    file = read_suite(path)   # a shipped suite may be named by its name
    suite, problems = parse_suite(file)
    if suite is None:
        raise BadInput(list(dict.fromkeys([*problems, *_entry_problems(file)])))
    if seed is not None:
        suite = suite.model_copy(update={"seed": seed})
    try:
        resolved = resolve(suite, file.path)
    except BadInput as exc:
        problems += exc.problems
    if problems:
        raise BadInput(list(dict.fromkeys(problems)))
    return resolved
