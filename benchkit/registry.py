"""Plugin-provided components by id: a lazy factory plus the pydantic model of its params."""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, ValidationError

from benchkit.errors import BadInput

KINDS = {
    "datasets": "register_datasets",
    "classifiers": "register_classifiers",
    "defenses": "register_defenses",
    "attacks": "register_attacks",
    "score-models": "register_score_models",
}


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
                lines.append(f"{key}: {msg}")
            raise BadInput(lines) from None

    def build(self, params: dict | BaseModel | None = None, where: str = "params") -> Any:
        if not isinstance(params, BaseModel):
            params = self.validate(params, where)
        return self.factory(params)


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self.entries: dict[str, Entry] = {}

    def add(self, id: str, factory: Callable, *, params: type[BaseModel] = NoParams,
            description: str = "", plugin: str = "?", assets: Callable[[Any], list] | None = None) -> None:
        if id in self.entries:
            other = self.entries[id].plugin
            raise ValueError(f"{self.kind[:-1]} id '{id}' registered twice (by {other} and {plugin})")
        self.entries[id] = Entry(self.kind, id, factory, params, description, plugin, assets)

    def get(self, id: str, where: str = "") -> Entry:
        if id in self.entries:
            return self.entries[id]
        close = difflib.get_close_matches(id, list(self.entries), n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else f"; known: {', '.join(sorted(self.entries)) or 'none'}"
        prefix = f"{where}: " if where else ""
        raise BadInput(f"{prefix}unknown {self.kind[:-1]} plugin '{id}'{hint}")

    def __contains__(self, id: str) -> bool:
        return id in self.entries

    def __iter__(self):
        return iter(sorted(self.entries.values(), key=lambda e: e.id))


_registries: dict[str, Registry] | None = None


def _collect() -> dict[str, Registry]:
    from benchkit.plugins import get_plugin_manager

    pm = get_plugin_manager()
    regs = {}
    for kind, hook_name in KINDS.items():
        reg = Registry(kind)
        hook = getattr(pm.hook, hook_name)
        for impl in hook.get_hookimpls():
            plugin_name = impl.plugin_name

            def register(id: str, factory: Callable, params: type[BaseModel] = NoParams,
                         description: str = "", assets: Callable[[Any], list] | None = None,
                         _reg=reg, _name=plugin_name) -> None:
                _reg.add(id, factory, params=params, description=description, plugin=_name, assets=assets)

            try:
                impl.function(register=register)
            except BadInput:
                raise
            except Exception as exc:
                raise BadInput(f"plugin '{plugin_name}': {hook_name} failed: {type(exc).__name__}: {exc}") from None
        regs[kind] = reg
    return regs


def get(kind: str) -> Registry:
    global _registries
    if _registries is None:
        _registries = _collect()
    return _registries[kind]


def reset() -> None:
    global _registries
    _registries = None
