"""benchkit.resolve: every plugin id, params model, budget mapping and reference resolved once,
every problem reported at once."""
from __future__ import annotations

import pytest

from benchkit import resolve
from benchkit.errors import BadInput
from benchkit.threat import Linf
from conftest import write
from test_suite import BASE, suite_text


def test_cells_and_budgets_resolved_once(tmp_path, plugin_manager):
    write(tmp_path / "base.yaml", BASE)
    r = resolve.load(write(tmp_path / "s.yaml", suite_text("eval: {clean_on: split}")))
    assert [(c.kind, c.key) for c in r.cells] == [("attack", "cnn/none/aa"), ("clean", "cnn/none")]
    assert isinstance(r.threats["aa"], Linf) and r.threats["aa"].eps == 8 / 255
    assert r.cells[1].dataset.params == {"split": "test", "n": None}   # the whole split
    # Batch and shard sizes do not key the numbers (seeds are per image); repeats do.
    other = resolve.load(write(tmp_path / "t.yaml", suite_text("eval: {clean_on: split, batch_size: 3, shard_size: 1}")))
    assert other.cells[0].config_hash(other.suite) == r.cells[0].config_hash(r.suite)
    third = resolve.load(write(tmp_path / "u.yaml", suite_text("eval: {clean_on: split, repeats: 4}")))
    assert third.cells[0].config_hash(third.suite) != r.cells[0].config_hash(r.suite)


def test_seed_override(tmp_path, plugin_manager):
    write(tmp_path / "base.yaml", BASE)
    assert resolve.load(write(tmp_path / "s.yaml", suite_text()), seed=7).suite.seed == 7


def test_every_problem_reported_at_once(tmp_path, plugin_manager):
    write(tmp_path / "base.yaml", BASE)
    p = write(tmp_path / "s.yaml", suite_text(attack="{id: aa, plugin: autoatack, params: {eps: 0.1}}").replace(
        "plugin: identity}", "plugin: identity, params: {strength: 2}}"))
    with pytest.raises(BadInput) as exc:
        resolve.load(p)
    problems = exc.value.problems
    assert any("defenses[0].params.strength: unknown parameter for defense 'identity'" in l for l in problems)
    assert any("attacks[0].plugin: unknown attack plugin 'autoatack'; did you mean 'autoattack'?" in l for l in problems)
    assert all(l.startswith(str(p)) for l in problems)


def test_wrong_param_types(tmp_path, plugin_manager):
    write(tmp_path / "base.yaml", BASE)
    p = write(tmp_path / "s.yaml", suite_text(attack="{id: aa, plugin: autoattack, params: {eps: eight, versions: [strong]}}"))
    with pytest.raises(BadInput) as exc:
        resolve.load(p)
    text = "\n".join(exc.value.problems)
    assert "attacks[0].params.eps: expected a number or a fraction like '8/255', got 'eight'" in text
    assert "attacks[0].params.versions.0:" in text


def test_cells_must_reference_defined_ids(tmp_path, plugin_manager):
    write(tmp_path / "base.yaml", BASE)
    p = write(tmp_path / "s.yaml", suite_text().replace("grid: all", "cells: [{classifier: cnn, defense: nope, attack: aa}]"))
    with pytest.raises(BadInput, match=r"cells\[0\].defense: unknown id 'nope'"):
        resolve.load(p)


