"""benchkit.suite: YAML loading, includes with deep merge, the strict schema, all problems at once.
(Plugin ids and params are resolved by benchkit.resolve: tests/test_resolve.py.)"""
from __future__ import annotations

import pytest

from benchkit.cli import main
from benchkit.errors import BadInput
from benchkit.suite import deep_merge, load_suite
from conftest import ROOT, write

BASE = """
dataset: {plugin: digits, params: {split: test, n: 8}}
classifiers: [{id: cnn, plugin: digits-cnn}]
eval: {batch_size: 8, repeats: 2}
"""


def suite_text(extra: str = "", attack: str = "{id: aa, plugin: autoattack, params: {eps: 8/255}}") -> str:
    return f"""
suite: t
include: [base.yaml]
defenses: [{{id: none, plugin: identity}}]
attacks: [{attack}]
grid: all
{extra}
"""


def test_deep_merge_merges_mappings_and_replaces_lists():
    assert deep_merge({"a": {"b": 1, "c": [1]}, "d": 1}, {"a": {"c": [2], "e": 3}}) == {"a": {"b": 1, "c": [2], "e": 3}, "d": 1}


def test_include_deep_merges_and_file_wins(tmp_path, plugin_manager):
    write(tmp_path / "base.yaml", BASE)
    p = write(tmp_path / "s.yaml", suite_text("eval: {repeats: 5}"))
    s = load_suite(p)
    assert s.eval.repeats == 5 and s.eval.batch_size == 8  # merged, not replaced
    assert s.dataset.params == {"split": "test", "n": 8}
    assert s.attacks[0].params["eps"] == "8/255"


def test_include_cycle_is_reported(tmp_path):
    write(tmp_path / "a.yaml", "include: [b.yaml]\n")
    write(tmp_path / "b.yaml", "include: [a.yaml]\n")
    with pytest.raises(BadInput, match="include cycle"):
        load_suite(tmp_path / "a.yaml")


def test_malformed_yaml_names_file_and_line(tmp_path):
    p = write(tmp_path / "bad.yaml", "suite: x\ndataset: {plugin: digits\n")
    with pytest.raises(BadInput) as exc:
        load_suite(p)
    (line,) = exc.value.problems
    assert str(p) in line and "line" in line and "malformed YAML" in line


def test_schema_problems_come_first(tmp_path, plugin_manager):
    write(tmp_path / "base.yaml", BASE)
    p = write(tmp_path / "s.yaml", suite_text(
        "colour: red", attack="{id: aa, plugin: autoatack, params: {eps: 0.1}}"))
    with pytest.raises(BadInput) as exc:
        load_suite(p)
    assert exc.value.problems == [f"{p}: colour: unknown key"]


def test_cli_validate_exit_2_one_line_per_problem(tmp_path, plugin_manager, capsys):
    write(tmp_path / "base.yaml", BASE)
    bad = write(tmp_path / "s.yaml", suite_text("seed: zero"))
    good = ROOT / "suites" / "digits_quick.yaml"
    assert main(["validate", str(good), str(bad)]) == 2
    out, err = capsys.readouterr()
    assert "digits_quick.yaml: ok" in out
    assert err.strip().splitlines() == [f"benchkit: error: {bad}: seed: Input should be a valid integer, unable to parse string as an integer"]
    assert "Traceback" not in err


def test_every_shipped_suite_validates(plugin_manager, capsys):
    suites = sorted(str(p) for p in (ROOT / "suites").glob("*.yaml"))
    assert suites
    assert main(["validate", *suites]) == 0
