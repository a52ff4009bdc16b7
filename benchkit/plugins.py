"""The plugin manager: built-ins and third-party plugins load through the same entry points.

BENCHKIT_LOAD_PLUGINS=a,b loads only the named entry points (empty: none);
BENCHKIT_DISABLE_PLUGINS=a,b skips the named ones.
"""
from __future__ import annotations

import os

import importlib.metadata as md

import pluggy

from benchkit import hookspecs
from benchkit.errors import BadInput

ENTRY_POINT_GROUP = "benchkit"

# Hooks registered by no entry point (tests may register plugins directly with pm.register).
DEFAULT_PLUGINS: tuple[str, ...] = ()

# entry-point name -> (distribution, version), for `benchkit plugins` and run provenance.
_DISTS: dict[str, tuple[str, str]] = {}


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
    for ep in md.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in skip or (only is not None and ep.name not in only) or pm.get_plugin(ep.name):
            continue
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken plugin is bad input, reported in one line
            raise BadInput(f"plugin '{ep.name}' ({ep.value}, from {ep.dist.name if ep.dist else '?'}) "
                           f"failed to load: {type(exc).__name__}: {exc}") from None
        pm.register(plugin, name=ep.name)
        if ep.dist is not None:
            _DISTS[ep.name] = (ep.dist.name, ep.dist.version)
    pm.check_pending()
    return pm


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
