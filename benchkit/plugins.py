"""The plugin manager: built-ins and third-party plugins load through the same entry points.

BENCHKIT_LOAD_PLUGINS=a,b loads only the named entry points (empty: none);
BENCHKIT_DISABLE_PLUGINS=a,b skips the named ones.

A plugin may own a kind of component (DiffPure: score models): it declares the kind with the
``register_component_kinds`` hook and ships the hookspec in its own module, which the manager adds
after loading every plugin. Other plugins implement such a hook with ``@hookimpl(optionalhook=True)``:
when the owner is not loaded the implementation is simply never called, while ``check_pending``
still refuses misspelt hooks of every non-optional implementation.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from types import ModuleType

import importlib.metadata as md

import pluggy

from benchkit import hookspecs
from benchkit.errors import BadInput

ENTRY_POINT_GROUP = "benchkit"

# Hooks registered by no entry point (tests may register plugins directly with pm.register).
DEFAULT_PLUGINS: tuple[str, ...] = ()

# entry-point name -> (distribution, version), for `benchkit plugins` and run provenance.
_DISTS: dict[str, tuple[str, str]] = {}
# Entry points the environment kept out of the last manager: named when a component is missing.
_SKIPPED: list[str] = []


@dataclass(frozen=True)
class ComponentKind:
    """A kind of component declared by a plugin; the implementations of `hook` fill its registry."""

    kind: str
    hook: str
    description: str
    plugin: str


def _names(var: str) -> set[str] | None:
    raw = os.environ.get(var)
    if raw is None:
        return None
    return {n.strip() for n in raw.split(",") if n.strip()}


def make_plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager("benchkit")
    pm.add_hookspecs(hookspecs)
    for mod in DEFAULT_PLUGINS:
        pm.register(__import__(mod, fromlist=["_"]), name=mod)
    only, skip = _names("BENCHKIT_LOAD_PLUGINS"), _names("BENCHKIT_DISABLE_PLUGINS") or set()
    _SKIPPED.clear()
    for ep in md.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in skip or (only is not None and ep.name not in only):
            _SKIPPED.append(ep.name)
            continue
        if pm.get_plugin(ep.name):
            continue
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken plugin is bad input, reported in one line
            raise BadInput(f"plugin '{ep.name}' ({ep.value}, from {ep.dist.name if ep.dist else '?'}) "
                           f"failed to load: {type(exc).__name__}: {exc}") from None
        pm.register(plugin, name=ep.name)
        if ep.dist is not None:
            _DISTS[ep.name] = (ep.dist.name, ep.dist.version)
    # Plugin-owned hookspecs first: their implementations are pending until then.
    component_kinds(pm)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise BadInput(f"plugin '{pm.get_name(exc.plugin)}': {exc}") from None
    return pm


def component_kinds(pm: pluggy.PluginManager) -> dict[str, ComponentKind]:
    """The kinds the plugins of `pm` declare (``register_component_kinds``), each hookspec module
    added to `pm` once. Called again after a plugin is registered by hand, it adds that plugin's."""
    from benchkit.registry import KINDS

    kinds: dict[str, ComponentKind] = {}
    for impl in pm.hook.register_component_kinds.get_hookimpls():

        def register(kind: str, *, hookspecs: ModuleType, hook: str, description: str = "",
                     _plugin: str = impl.plugin_name) -> None:
            where = f"plugin '{_plugin}': register_component_kinds"
            if kind in KINDS or kind in kinds:
                owner = "the host" if kind in KINDS else f"plugin '{kinds[kind].plugin}'"
                raise BadInput(f"{where}: component kind '{kind}' is already declared by {owner}")
            if not hasattr(getattr(hookspecs, hook, None), "benchkit_spec"):
                raise BadInput(f"{where}: '{hook}' is not a benchkit hookspec of module {hookspecs.__name__}")
            _add_hookspecs(pm, hookspecs, hook, where)
            kinds[kind] = ComponentKind(kind, hook, description, _plugin)

        try:
            impl.function(register=register)
        except BadInput:
            raise
        except Exception as exc:
            raise BadInput(f"plugin '{impl.plugin_name}': register_component_kinds failed: "
                           f"{type(exc).__name__}: {exc}") from None
    return kinds


def _add_hookspecs(pm: pluggy.PluginManager, module: ModuleType, hook: str, where: str) -> None:
    caller = getattr(pm.hook, hook, None)
    if caller is not None and caller.spec is not None:
        if caller.spec.namespace is not module:  # two owners of one hook name
            raise BadInput(f"{where}: hook '{hook}' is already specified by {caller.spec.namespace.__name__}")
        return
    try:
        pm.add_hookspecs(module)
    except pluggy.PluginValidationError as exc:  # an implementation that does not match the spec
        raise BadInput(f"{where}: {exc}") from None


def not_loaded() -> list[str]:
    """Entry points that BENCHKIT_LOAD_PLUGINS / BENCHKIT_DISABLE_PLUGINS kept out of the manager."""
    return list(_SKIPPED)


_pm: pluggy.PluginManager | None = None


def get_plugin_manager() -> pluggy.PluginManager:
    global _pm
    if _pm is None:
        _pm = make_plugin_manager()
    return _pm


def reset_plugin_manager() -> None:
    """Forget the cached manager (tests that change the environment or register plugins)."""
    global _pm
    _pm = None
    from benchkit import registry
    registry.reset()


def plugin_info(pm: pluggy.PluginManager | None = None) -> list[dict]:
    pm = pm or get_plugin_manager()
    rows = []
    for name, plugin in sorted(pm.list_name_plugin(), key=lambda kv: kv[0]):
        if plugin is None:
            continue
        dist, version = _DISTS.get(name, (None, None))
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or [])
        rows.append({"name": name, "module": getattr(plugin, "__name__", repr(plugin)),
                     "distribution": dist, "version": version, "hooks": hooks})
    return rows
