"""Built-in plugins stand alone: each imports only the host and its own package, a kind of component
only one plugin uses is declared by that plugin (register_component_kinds), and with any one
built-in disabled the others still load while suites that need it fail validation naming it."""
from __future__ import annotations

import ast
import importlib.metadata as md
import sys

import pytest
import torch

from benchkit import hookspecs, plugins, registry
from benchkit.cli import main
from benchkit.errors import BadInput
from benchkit.hookspecs import hookimpl, hookspec
from conftest import ROOT

BUILTINS = {ep.name: ep.value.split(".")[0] for ep in md.entry_points(group=plugins.ENTRY_POINT_GROUP)
            if ep.dist is not None and ep.dist.name == "benchkit"}
SUITE = ROOT / "suites" / "digits_quick.yaml"

# What digits_quick.yaml loses with each built-in disabled: one stderr line per missing component.
# What validate says of digits_quick with one built-in disabled: (the file that sets the key, line).
# Keys set by an included file are reported against that file.
BASE = ROOT / "suites" / "_base"
MISSING_IN_QUICK = {
    "data": [(BASE / "digits.yaml", "dataset.plugin: unknown dataset plugin 'digits'")],
    "zoo": [(BASE / "digits.yaml", "classifiers[0].plugin: unknown classifier plugin 'digits-cnn'"),
            (BASE / "digits_diffpure.yaml",
             "defenses[1].params.score_model: Value error, unknown score-model plugin 'digits-unet'")],
    "baselines": [(BASE / "digits_diffpure.yaml", "defenses[0].plugin: unknown defense plugin 'identity'")],
    "autoattack": [(SUITE, "attacks[0].plugin: unknown attack plugin 'autoattack'")],
    "diffpure": [(BASE / "digits_diffpure.yaml", "defenses[1].plugin: unknown defense plugin 'diffpure'")],
    "attacks": [(SUITE, "attacks[1].plugin: unknown attack plugin 'pgd-eot'"),
                (SUITE, "attacks[2].plugin: unknown attack plugin 'bpda-eot'")],
}


def test_every_builtin_is_covered():
    assert set(BUILTINS) == set(MISSING_IN_QUICK)


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_builtin_imports_only_the_host_and_itself(name):
    package = BUILTINS[name]
    bad = []
    for path in sorted((ROOT / "plugins" / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules = [node.module or ""]
            else:
                continue
            for mod in modules:
                top = mod.split(".")[0]
                if top.startswith("benchkit_") and top != package:
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: imports {mod}")
    assert not bad, "\n".join(bad)


def _components() -> tuple[dict[tuple[str, str], str], dict[str, str]]:
    """(kind, id) -> plugin that registered it, and kind -> its owner ('host' or a plugin)."""
    plugins.reset_plugin_manager()
    owners = {k: "host" for k in registry.KINDS}
    owners |= {k: d.plugin for k, d in plugins.component_kinds(plugins.get_plugin_manager()).items()}
    return {(k, e.id): e.plugin for k in registry.kinds() for e in registry.get(k)}, owners


@pytest.fixture(scope="module")
def everything():
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("BENCHKIT_LOAD_PLUGINS", raising=False)
        mp.delenv("BENCHKIT_DISABLE_PLUGINS", raising=False)
        yield _components()
    plugins.reset_plugin_manager()


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_disabling_one_builtin_leaves_the_others_working(name, everything, monkeypatch, capsys):
    all_components, owners = everything
    monkeypatch.delenv("BENCHKIT_LOAD_PLUGINS", raising=False)
    monkeypatch.setenv("BENCHKIT_DISABLE_PLUGINS", name)
    try:
        components, _ = _components()
        loaded = {n for n, p in plugins.get_plugin_manager().list_name_plugin() if p is not None}
        assert loaded == set(BUILTINS) - {name}
        # Everything the other plugins register is still there, unless its kind belongs to `name`.
        expected = {key: plugin for key, plugin in all_components.items()
                    if plugin != name and owners[key[0]] != name}
        assert components == expected

        assert main(["validate", str(SUITE)]) == 2
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == len(MISSING_IN_QUICK[name]), lines
        for line, (origin, missing) in zip(lines, MISSING_IN_QUICK[name]):
            assert line.startswith(f"benchkit: error: {origin}: {missing}"), line
            assert line.endswith(f"(plugins not loaded: {name})")
    finally:
        plugins.reset_plugin_manager()


def test_plugin_owned_kinds(plugin_manager):
    assert not hasattr(hookspecs, "register_score_models")  # DiffPure's, not the host's
    declared = plugins.component_kinds(plugin_manager)
    assert {k: (d.hook, d.plugin) for k, d in declared.items()} == {
        "score-models": ("register_score_models", "diffpure"),
        "generative-models": ("register_generative_models", "baselines")}
    assert list(registry.kinds()) == [*registry.KINDS, "generative-models", "score-models"]
    assert registry.get("score-models").get("digits-unet").plugin == "zoo"
    assert registry.get("generative-models").get("digits-vae").plugin == "zoo"


def test_missing_kind_is_one_line(monkeypatch, capsys):
    monkeypatch.delenv("BENCHKIT_LOAD_PLUGINS", raising=False)
    monkeypatch.setenv("BENCHKIT_DISABLE_PLUGINS", "diffpure")
    plugins.reset_plugin_manager()
    try:
        with pytest.raises(BadInput) as exc:
            registry.get("score-models")
        (line,) = exc.value.problems
        assert line.startswith("unknown component kind 'score-models' (known: datasets, classifiers, defenses, "
                               "attacks, generative-models)") and line.endswith("(plugins not loaded: diffpure)")
        assert main(["ls", "score-models"]) == 2   # argparse: not a choice without DiffPure
        assert "invalid choice: 'score-models'" in capsys.readouterr().err
        assert main(["ls"]) == 0
        assert "score-models" not in capsys.readouterr().out
    finally:
        plugins.reset_plugin_manager()


@hookspec
def register_toy_models(register):
    """Register toy models: ``register(id, factory, ...)``; a hookspec owned by the Owner plugin below."""


class Owner:
    @hookimpl
    def register_component_kinds(self, register):
        register("toy-models", hookspecs=sys.modules[__name__], hook="register_toy_models",
                 description="toys for the tests")


class Provider:
    """A third party adding components to plugin-owned kinds; loads whether or not the owner is there."""

    @hookimpl(optionalhook=True)
    def register_toy_models(self, register):
        register("toy", lambda params: "a toy", description="a toy model")

    @hookimpl(optionalhook=True)
    def register_score_models(self, register):
        register("toy-score", lambda params: torch.nn.Identity(), description="not a score model")

    @hookimpl(optionalhook=True)
    def register_generative_models(self, register):
        register("toy-vae", lambda params: torch.nn.Identity(), description="not a VAE")


def test_third_party_kind_and_optional_implementations(plugin_manager, capsys):
    plugin_manager.register(Provider(), name="provider")
    plugin_manager.check_pending()  # its hook has no owner yet: optional, so not an error
    registry.reset()
    with pytest.raises(BadInput, match="unknown component kind 'toy-models'"):
        registry.get("toy-models")
    assert {"toy-score", "digits-unet"} <= {e.id for e in registry.get("score-models")}
    assert "toy-vae" in registry.get("generative-models")

    plugin_manager.register(Owner(), name="owner")
    registry.reset()
    assert registry.get("toy-models").get("toy").build() == "a toy"
    assert main(["ls", "toy-models"]) == 0
    assert "  toy  a toy model  [provider]" in capsys.readouterr().out.splitlines()

    # DiffPure refuses, in one line, a score model that is neither a ScoreModel nor a noise predictor.
    from benchkit_diffpure.plugin import build_score_model

    with pytest.raises(BadInput, match="score model 'toy-score': its factory returned Identity"):
        build_score_model("toy-score", {})


def test_third_party_implementation_without_owner(monkeypatch):
    monkeypatch.delenv("BENCHKIT_LOAD_PLUGINS", raising=False)
    monkeypatch.setenv("BENCHKIT_DISABLE_PLUGINS", "diffpure,baselines")
    plugins.reset_plugin_manager()
    try:
        pm = plugins.get_plugin_manager()
        pm.register(Provider(), name="provider")
        pm.check_pending()
        registry.reset()
        assert "score-models" not in registry.kinds() and "generative-models" not in registry.kinds()
        assert "digits-cnn" in registry.get("classifiers")  # the zoo, whose optional hooks went unused
    finally:
        plugins.reset_plugin_manager()


def test_kind_declarations_are_checked(plugin_manager):
    class Twice:
        @hookimpl
        def register_component_kinds(self, register):
            register("defenses", hookspecs=sys.modules[__name__], hook="register_toy_models")

    class NoSpec:
        @hookimpl
        def register_component_kinds(self, register):
            register("toys", hookspecs=sys.modules[__name__], hook="register_toys")

    plugin_manager.register(Twice(), name="twice")
    with pytest.raises(BadInput, match="plugin 'twice': register_component_kinds: component kind 'defenses' "
                                       "is already declared by the host"):
        plugins.component_kinds(plugin_manager)
    plugin_manager.unregister(name="twice")
    plugin_manager.register(NoSpec(), name="nospec")
    with pytest.raises(BadInput, match="'register_toys' is not a benchkit hookspec of module"):
        plugins.component_kinds(plugin_manager)


# ---------------------------------------------------------------- what the zoo no longer imports

def test_zoo_copies_of_diffpure_math_are_bit_identical():
    """The zoo keeps its own VP-SDE alpha and time embedding (it may not import DiffPure); the shipped
    digits-unet weights depend on their rounding, so they must stay DiffPure's op for op."""
    from benchkit_diffpure import sde
    from benchkit_diffpure.architectures.layers import timestep_embedding
    from benchkit_zoo import nets, recipes

    t = torch.cat([torch.rand(4096, generator=torch.Generator().manual_seed(0)), torch.tensor([0.0, 1e-5, 0.3, 1.0])])
    assert torch.equal(recipes.vp_alpha(t), sde.alpha(t))
    assert (recipes.VP_BETA_MIN, recipes.VP_BETA_MAX) == (sde.BETA_MIN, sde.BETA_MAX)
    for dim in (8, 32, 64):
        assert torch.equal(nets.timestep_embedding(t * 999, dim), timestep_embedding(t * 999, dim))


def test_zoo_models_through_other_plugins_hooks(plugin_manager):
    from benchkit_diffpure.plugin import build_score_model
    from benchkit_diffpure.score import ContinuousTimeScore
    from benchkit_zoo.catalog import load_zoo_model

    score = build_score_model("digits-unet", {})
    assert isinstance(score, ContinuousTimeScore) and score.label_scale == 999.0
    x, t = torch.rand(3, 1, 8, 8) * 2 - 1, torch.tensor([0.05, 0.1, 0.5])
    with torch.no_grad():
        assert torch.equal(score.eps(x, t), ContinuousTimeScore(load_zoo_model("digits-unet")).eps(x, t))
    vae = registry.get("generative-models").get("digits-vae").build({})
    assert not vae.training and hasattr(vae, "encode")


def test_zoo_gets_digits_through_the_registry(monkeypatch):
    from benchkit_data.digits import load_digits_split
    from benchkit_zoo.recipes import load_digits

    plugins.reset_plugin_manager()
    try:
        x, y = load_digits("train")
        ref_x, ref_y = load_digits_split("train")
        assert torch.equal(x, ref_x) and torch.equal(y, ref_y) and x.dtype == ref_x.dtype
        monkeypatch.setenv("BENCHKIT_DISABLE_PLUGINS", "data")
        plugins.reset_plugin_manager()
        with pytest.raises(BadInput, match=r"unknown dataset plugin 'digits'.*\(plugins not loaded: data\)"):
            load_digits("train")
    finally:
        plugins.reset_plugin_manager()


def test_celeba_attribute_of_the_classifier_is_checked_through_the_registry(plugin_manager):
    entry = registry.get("classifiers").get("celebahq-attribute")
    assert entry.validate({"attribute": "Smiling"}, "c").attribute == "Smiling"
    with pytest.raises(BadInput, match=r"c.params.attribute: Value error, unknown CelebA attribute 'smiling'; "
                                       r"did you mean 'Smiling'\?"):
        entry.validate({"attribute": "smiling"}, "c")
