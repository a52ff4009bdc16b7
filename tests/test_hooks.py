"""Every hookspec, the host's and those plugins own, is documented and exercised by a test;
plugins load as third parties do."""
from __future__ import annotations

import inspect
import re

import pytest

from benchkit import hookspecs, plugins, registry
from benchkit.errors import BadInput
from conftest import ROOT


def _specs(module) -> dict:
    return {n: f for n, f in inspect.getmembers(module, inspect.isfunction) if hasattr(f, "benchkit_spec")}


def _plugin_specs() -> dict:
    """The hookspecs the installed plugins declare with register_component_kinds (score models, ...)."""
    pm = plugins.make_plugin_manager()
    modules = {getattr(pm.hook, d.hook).spec.namespace for d in plugins.component_kinds(pm).values()}
    return {n: f for m in modules for n, f in _specs(m).items()}


HOST_SPECS = _specs(hookspecs)
PLUGIN_SPECS = _plugin_specs()
SPECS = {**HOST_SPECS, **PLUGIN_SPECS}
HOOKS = sorted(SPECS)


def test_plugin_owned_specs_are_found_and_not_host_hooks():
    assert {"register_score_models", "register_generative_models"} <= set(PLUGIN_SPECS)
    assert not set(PLUGIN_SPECS) & set(HOST_SPECS)


def test_hook_names_follow_convention():
    assert HOOKS and all(n.startswith(("register_", "prepare_")) for n in HOOKS)


@pytest.mark.parametrize("name", HOOKS)
def test_hook_is_documented(name):
    doc = inspect.getdoc(SPECS[name]) or ""
    assert len(doc) > 40, f"hookspec {name} needs a docstring saying what it receives and returns"
    readme = (ROOT / "README.md").read_text()
    assert f"`{name}" in readme, f"README.md must document hook {name}"


@pytest.mark.parametrize("name", HOOKS)
def test_hook_is_tested(name):
    """Some test implements the hook (def <name>(...)) in an outside plugin."""
    pattern = re.compile(rf"def {name}\(")
    tests = [p for p in (ROOT / "tests").glob("test_*.py") if pattern.search(p.read_text())]
    assert tests, f"no test implements hook {name}"


def test_builtins_come_from_entry_points(plugin_manager):
    names = {n for n, _ in plugin_manager.list_name_plugin()}
    assert {"data", "zoo", "baselines", "autoattack", "diffpure", "attacks"} <= names


def test_disable_and_load_only(monkeypatch):
    from benchkit import plugins

    monkeypatch.setenv("BENCHKIT_DISABLE_PLUGINS", "autoattack")
    plugins.reset_plugin_manager()
    try:
        assert "autoattack" not in registry.get("attacks")
        with pytest.raises(BadInput, match="unknown attack plugin 'autoattack'"):
            registry.get("attacks").get("autoattack")
        monkeypatch.delenv("BENCHKIT_DISABLE_PLUGINS")
        monkeypatch.setenv("BENCHKIT_LOAD_PLUGINS", "data")
        plugins.reset_plugin_manager()
        assert [e.id for e in registry.get("datasets")] == ["celebahq", "cifar10", "digits", "imagenet"]
        assert list(registry.get("defenses")) == []
    finally:
        plugins.reset_plugin_manager()


def test_duplicate_ids_are_refused(plugin_manager):
    from benchkit.defended import Identity
    from benchkit.hookspecs import hookimpl

    class Dup:
        @hookimpl
        def register_defenses(self, register):
            register("identity", lambda p: Identity())

    plugin_manager.register(Dup(), name="dup")
    registry.reset()
    with pytest.raises(BadInput, match="registered twice"):
        registry.get("defenses")
