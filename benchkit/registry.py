"""Plugin-provided components by id: a lazy factory plus the pydantic model of its params."""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, ValidationError

from benchkit.errors import BadInput

# The host's kinds. Plugins declare more with the register_component_kinds hook (see kinds()).
KINDS = {
    "datasets": "register_datasets",
    "classifiers": "register_classifiers",
    "defenses": "register_defenses",
    "attacks": "register_attacks",
}


# Errors of a number's bounds: given a boolean, they mean the boolean was read as a number.
_NUMBER_BOUNDS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "multiple_of",
                  "finite_number"}


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class Entry:
    kind: str
    id: str
    factory: Callable[[Any], Any]
    params: type[BaseModel]
    description: str
    plugin: str
    # Files the component needs for given params (benchkit.assets.Asset list), checked before a run.
    assets: Callable[[Any], list] | None = None
    # Attacks: params -> the benchkit.threat.ThreatModel the host verifies every example against
    # (never what the attack object says about itself).
    threat: Callable[[Any], Any] | None = None
    # Defenses: the gradient modes the purifier implements beyond bpda / none (which every purifier
    # has), as a tuple or params -> tuple, so `validate` checks each cell's mode before building
    # anything; None: only known once the purifier is built.
    gradient_modes: tuple[str, ...] | Callable[[Any], tuple[str, ...]] | None = None

    def validate(self, params: dict | None, where: str) -> BaseModel:
        """Params checked by the plugin's own model; problems raised as 'where.params.key: msg'."""
        try:
            return self.params.model_validate(params or {})
        except ValidationError as exc:
            lines = []
            for err in exc.errors():
                loc = ".".join(str(p) for p in err["loc"])
                key = f"{where}.params.{loc}" if loc else f"{where}.params"
                msg = err["msg"]
                if err["type"] == "extra_forbidden":
                    allowed = ", ".join(self.params.model_fields) or "none"
                    msg = f"unknown parameter for {self.kind[:-1]} '{self.id}' (allowed: {allowed})"
                elif isinstance(err.get("input"), bool) and err["type"] in _NUMBER_BOUNDS:
                    # lax pydantic read the boolean as 0 or 1 and then found it out of bounds
                    msg = f"expected a number, got a boolean ({str(err['input']).lower()})"
                lines.append(f"{key}: {msg}")
            raise BadInput(lines) from None
        except BadInput:
            raise
        except Exception as exc:  # noqa: BLE001 - e.g. an OverflowError a model's validator lets out: one line
            first = (str(exc).splitlines() or [""])[0]
            raise BadInput(f"{where}.params: {self.kind[:-1]} '{self.id}' could not check its params: "
                           f"{type(exc).__name__}: {first}") from None

    def declared_modes(self, params: BaseModel) -> tuple[str, ...] | None:
        """The gradient modes this defense declared at registration for `params` (None: undeclared);
        BadInput (one line) when the declaration fails or names a mode that does not exist."""
        if self.gradient_modes is None:
            return None
        if not callable(self.gradient_modes):
            return self.gradient_modes   # checked when registered
        where = f"defense plugin '{self.id}' ({self.plugin})"
        try:
            modes = self.gradient_modes(params)
        except Exception as exc:  # noqa: BLE001 - a plugin's bug is reported as its own, in one line
            raise BadInput(f"{where}: gradient_modes failed: {type(exc).__name__}: {exc}") from None
        try:
            return as_modes(modes)
        except (TypeError, ValueError) as exc:
            raise BadInput(f"{where}: {exc}") from None

    def build(self, params: dict | BaseModel | None = None, where: str = "params") -> Any:
        if not isinstance(params, BaseModel):
            params = self.validate(params, where)
        return self.factory(params)


def as_modes(value: Any) -> tuple[str, ...]:
    """A defense's declared gradient modes as a tuple; ValueError naming what is wrong."""
    from benchkit.defended import GRADIENT_MODES, unknown_modes

    if isinstance(value, str):   # ("exact") is a string, not a tuple: say so rather than split it
        raise ValueError(f"gradient_modes must be a tuple of modes, not the string {value!r}")
    modes = tuple(value)
    if bad := unknown_modes(modes):
        raise ValueError(f"gradient_modes names {', '.join(map(repr, bad))}, not one of {', '.join(GRADIENT_MODES)}")
    return modes


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self.entries: dict[str, Entry] = {}

    def add(self, id: str, factory: Callable, *, params: type[BaseModel] = NoParams,
            description: str = "", plugin: str = "?", assets: Callable[[Any], list] | None = None,
            threat: Callable[[Any], Any] | None = None,
            gradient_modes: tuple[str, ...] | Callable[[Any], tuple[str, ...]] | None = None) -> None:
        if id in self.entries:
            other = self.entries[id].plugin
            raise ValueError(f"{self.kind[:-1]} id '{id}' registered twice (by {other} and {plugin})")
        if self.kind == "attacks" and threat is None:
            raise ValueError(f"attack '{id}' registered without threat= (params -> the threat model the host "
                             "verifies its examples against)")
        if gradient_modes is not None:
            if self.kind != "defenses":
                raise ValueError(f"{self.kind[:-1]} '{id}': gradient_modes= is for defenses")
            if not callable(gradient_modes):   # a callable one is checked when a suite gives it params
                try:
                    gradient_modes = as_modes(gradient_modes)
                except ValueError as exc:
                    raise ValueError(f"defense '{id}': {exc}") from None
        self.entries[id] = Entry(self.kind, id, factory, params, description, plugin, assets, threat, gradient_modes)

    def get(self, id: str, where: str = "") -> Entry:
        if id in self.entries:
            return self.entries[id]
        close = difflib.get_close_matches(id, list(self.entries), n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else f"; known: {', '.join(sorted(self.entries)) or 'none'}"
        prefix = f"{where}: " if where else ""
        raise BadInput(f"{prefix}unknown {self.kind[:-1]} plugin '{id}'{hint}{_not_loaded_hint()}")

    def __contains__(self, id: str) -> bool:
        return id in self.entries

    def __iter__(self):
        return iter(sorted(self.entries.values(), key=lambda e: e.id))


_registries: dict[str, Registry] | None = None


def _not_loaded_hint() -> str:
    # A component of a disabled plugin is not a typo: say which plugins were left out.
    from benchkit.plugins import not_loaded

    skipped = not_loaded()
    return f" (plugins not loaded: {', '.join(sorted(skipped))})" if skipped else ""


def kinds() -> dict[str, str]:
    """Every kind of component of the loaded plugins, kind -> the hook filling it: the host's KINDS,
    then, by name, the kinds plugins declare with register_component_kinds (score-models with DiffPure)."""
    from benchkit.plugins import component_kinds, get_plugin_manager

    declared = component_kinds(get_plugin_manager())
    return {**KINDS, **{k: declared[k].hook for k in sorted(declared)}}


def _collect() -> dict[str, Registry]:
    from benchkit.plugins import get_plugin_manager

    pm = get_plugin_manager()
    regs = {}
    for kind, hook_name in kinds().items():
        reg = Registry(kind)
        hook = getattr(pm.hook, hook_name)
        for impl in hook.get_hookimpls():
            plugin_name = impl.plugin_name

            def register(id: str, factory: Callable, params: type[BaseModel] = NoParams,
                         description: str = "", assets: Callable[[Any], list] | None = None,
                         threat: Callable[[Any], Any] | None = None,
                         gradient_modes: tuple[str, ...] | Callable[[Any], tuple[str, ...]] | None = None,
                         _reg=reg, _name=plugin_name) -> None:
                _reg.add(id, factory, params=params, description=description, plugin=_name, assets=assets,
                         threat=threat, gradient_modes=gradient_modes)

            try:
                impl.function(register=register)
            except BadInput:
                raise
            except Exception as exc:
                raise BadInput(f"plugin '{plugin_name}': {hook_name} failed: {type(exc).__name__}: {exc}") from None
        regs[kind] = reg
    return regs


def get(kind: str) -> Registry:
    """The registry of one kind; BadInput (one line) when no loaded plugin provides the kind."""
    global _registries
    if _registries is None:
        _registries = _collect()
    if kind not in _registries:
        raise BadInput(f"unknown component kind '{kind}' (known: {', '.join(_registries)}){_not_loaded_hint()}")
    return _registries[kind]


def reset() -> None:
    global _registries
    _registries = None
