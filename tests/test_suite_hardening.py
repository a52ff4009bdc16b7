"""Suite input hardening: the YAML reader's limits (size, encoding, nesting, alias expansion,
duplicate keys), which file of an include chain set a key, the host's checks on the numbers a user
writes in params, and names and ids. The one-line messages of the CLI are in the malformed corpus
(tests/malformed/suites.yaml)."""
from __future__ import annotations

import pytest
from pydantic import BaseModel, field_validator

from benchkit import registry, resolve, suite_yaml
from benchkit.errors import BadInput
from benchkit.suite import check_id, check_name, coerced_booleans, load_suite, nonfinite, read_suite
from benchkit.suite_yaml import MAX_FILE_BYTES, MAX_VALUES, expansion_problem, parse
from conftest import write

TINY = """
dataset: {plugin: digits, params: {split: test, n: 4}}
classifiers: [{id: cnn, plugin: digits-cnn}]
defenses: [{id: none, plugin: identity}]
attacks: [{id: pgd, plugin: pgd-eot, params: {norm: Linf, eps: 0.3, steps: 2, eot: 1}}]
grid: all
"""


def bomb(levels: int = 9, key: str = "lol") -> str:
    """A "billion laughs": 10 ** levels values from about 100 bytes a level."""
    lines = [f"{key}:", "  l0: &l0 {" + ", ".join(f"k{j}: x" for j in range(10)) + "}"]
    for i in range(1, levels):
        lines.append(f"  l{i}: &l{i} {{" + ", ".join(f"k{j}: *l{i - 1}" for j in range(10)) + "}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- duplicate keys, merge keys

def test_duplicate_keys_are_found_at_every_level_with_lines():
    data, problems = parse("a: 1\nb:\n  c: 1\n  d: [{e: 1, e: 2}]\n  c: 3\na: 2\n", "s.yaml")
    assert problems == ["s.yaml: line 4: duplicate key 'e' (first at line 4)",
                        "s.yaml: line 5: duplicate key 'c' (first at line 3)",
                        "s.yaml: line 6: duplicate key 'a' (first at line 1)"]
    assert data == {"a": 2, "b": {"c": 3, "d": [{"e": 2}]}}   # the data stays usable; the problems say why not


def test_merge_keys_are_not_duplicates():
    text = ("base: &b {x: 1, y: 2}\nmore: &m {z: 3}\n"
            "one: {<<: *b, y: 5}\n"                 # a mapping's own key overrides a merged one
            "two: {<<: [*b, *m], x: 0}\n")
    data, problems = parse(text, "s.yaml")
    assert problems == []
    assert data["one"] == {"x": 1, "y": 5} and data["two"] == {"x": 0, "y": 2, "z": 3}


def test_duplicate_inside_a_merged_mapping_is_found():
    _, problems = parse("one: {<<: {x: 1, x: 2}, y: 1}\n", "s.yaml")
    assert problems == ["s.yaml: line 1: duplicate key 'x' (first at line 1)"]


def test_duplicate_keys_of_an_aliased_mapping_are_reported_once():
    _, problems = parse("a: &a {x: 1, x: 2}\nb: [*a, *a, *a]\n", "s.yaml")
    assert problems == ["s.yaml: line 1: duplicate key 'x' (first at line 1)"]


def test_duplicate_keys_are_reported_with_the_plugins_problems(tmp_path, plugin_manager):
    p = write(tmp_path / "s.yaml", "suite: x\nseed: 1\nseed: 2\n" + TINY.replace("eps: 0.3", "eps: abc"))
    with pytest.raises(BadInput) as exc:
        resolve.load(p)
    assert exc.value.problems == [
        f"{p}: line 3: duplicate key 'seed' (first at line 2)",
        f"{p}: attacks[0].params.eps: expected a number or a fraction like '8/255', got 'abc'"]


# ---------------------------------------------------------------- nesting and expansion

def test_nesting_is_bounded_while_composing_with_the_line():
    with pytest.raises(BadInput) as exc:
        parse("a: " + "[" * 5000 + "\n", "s.yaml")   # PyYAML alone: RecursionError
    assert exc.value.problems == ["s.yaml: line 1, column 35: nested deeper than 32 levels of mappings and lists"]
    data, _ = parse("a: " + "[" * 31 + "]" * 31 + "\n", "s.yaml")   # 32 levels with the top mapping
    assert expansion_problem(data) is None


def test_expansion_counter_stops_at_the_cap():
    data, _ = parse(bomb(9), "s.yaml")   # parsing shares the aliased mappings: fast
    assert expansion_problem(data) == (f"the suite expands to more than {MAX_VALUES} values "
                                       "(YAML aliases nested in aliases?)")
    small, _ = parse(bomb(4), "s.yaml")  # 1 + 10 + ... + 10^4 < 100000: shared subtrees are fine
    assert expansion_problem(small) is None


def test_expansion_counter_looks_inside_pairs_and_sets():
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    data, _ = parse("\n".join(lines) + "\np: !!pairs [{k: *a8}]\n", "s.yaml")
    del data["a8"], data["a7"], data["a6"], data["a5"], data["a4"]   # only the pairs hold the big one
    assert "expands to more than" in expansion_problem(data)


def test_expansion_counter_ends_self_referencing_aliases():
    data, _ = parse("a: &a [*a]\n", "s.yaml")
    assert "nested deeper than 32 levels" in expansion_problem(data)


@pytest.mark.timeout(20)
def test_alias_bomb_split_across_an_include_is_refused_before_the_merge(tmp_path):
    # The including file overrides a key of the bomb: merging it would walk all of it.
    write(tmp_path / "lol.yaml", bomb(9))
    top = write(tmp_path / "top.yaml", "include: [lol.yaml]\nsuite: x\n" + bomb(9))
    with pytest.raises(BadInput) as exc:
        load_suite(top)
    assert exc.value.problems == [f"{top}: the suite expands to more than {MAX_VALUES} values "
                                  "(YAML aliases nested in aliases?)"]
    top.write_text("include: [lol.yaml]\nsuite: x\nlol: {l8: {k0: {k0: y}}}\n")
    with pytest.raises(BadInput) as exc:
        load_suite(top)
    assert exc.value.problems == [f"{tmp_path / 'lol.yaml'}: the suite expands to more than {MAX_VALUES} values "
                                  "(YAML aliases nested in aliases?)"]


# ---------------------------------------------------------------- size and encoding

def test_a_file_just_over_the_cap_is_refused_before_it_is_read(tmp_path):
    p = tmp_path / "big.yaml"
    p.write_bytes(b"suite: x\n" + b"#" * (MAX_FILE_BYTES - 8))
    with pytest.raises(BadInput) as exc:
        read_suite(p)
    assert exc.value.problems == [f"{p}: {MAX_FILE_BYTES + 1} bytes; a suite file is at most 1 MiB"]


def test_not_utf8_names_line_and_column(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_bytes(b"suite: x\ndescription: d\xc3\xa9j\xc3\xa0 \xe9t\xc3\xa9\n")   # 'deja' in UTF-8, then latin-1
    with pytest.raises(BadInput) as exc:
        read_suite(p)
    # the column counts characters: 'déjà ' before the bad byte is valid UTF-8
    assert exc.value.problems == [f"{p}: line 2, column 19: not UTF-8 text (byte 0xe9); save the file as UTF-8"]


# ---------------------------------------------------------------- includes: where each key came from

def test_origin_of_each_key_through_two_levels_of_include(tmp_path):
    write(tmp_path / "base" / "leaf.yaml", "eval: {batch_size: 4, repeats: 2}\ndataset: {plugin: digits}\n")
    write(tmp_path / "base" / "mid.yaml", "include: [leaf.yaml]\neval: {repeats: 3}\nclassifiers: []\n")
    top = write(tmp_path / "top.yaml", "include: [base/mid.yaml]\nsuite: x\ndataset: {params: {n: 4}}\n")
    f = read_suite(top)
    leaf, mid = str(tmp_path / "base" / "leaf.yaml"), str(tmp_path / "base" / "mid.yaml")
    assert f.data["eval"] == {"batch_size": 4, "repeats": 3}
    assert f.source(("eval", "batch_size")) == leaf
    assert f.source(("eval", "repeats")) == mid
    assert f.source(("eval",)) == mid                     # the last file that set the mapping
    assert f.source(("classifiers", 0, "id")) == mid      # a list comes whole from one file
    assert f.source(("dataset", "plugin")) == leaf
    assert f.source(("dataset", "params", "n")) == str(top)
    assert f.source(("suite",)) == str(top) and f.source(("nowhere",)) == str(top)


def test_a_replaced_mapping_forgets_the_origins_under_it(tmp_path):
    write(tmp_path / "base.yaml", "eval: {batch_size: 4}\n")
    top = write(tmp_path / "top.yaml", "include: [base.yaml]\neval: 7\n")
    f = read_suite(top)
    assert f.data["eval"] == 7 and ("eval", "batch_size") not in f.origins
    assert f.source(("eval",)) == str(top)


def test_schema_problems_name_the_included_file(tmp_path, plugin_manager):
    base = write(tmp_path / "base.yaml", TINY + "eval: {batch_sise: 4}\n")
    top = write(tmp_path / "top.yaml", "include: [base.yaml]\nsuite: x\nseed: true\n")
    with pytest.raises(BadInput) as exc:
        load_suite(top)
    assert exc.value.problems == [f"{top}: seed: expected a number, got a boolean (true)",
                                  f"{base}: eval.batch_sise: unknown key"]


def test_a_file_included_twice_is_read_once_and_includes_are_bounded(tmp_path, monkeypatch):
    write(tmp_path / "c.yaml", "seed: 1\n")
    write(tmp_path / "b.yaml", "include: [c.yaml, c.yaml]\n")
    top = write(tmp_path / "a.yaml", "include: [b.yaml, b.yaml, c.yaml]\nsuite: x\n")
    parsed = []
    real = suite_yaml.parse
    monkeypatch.setattr(suite_yaml, "parse", lambda text, name: parsed.append(name) or real(text, name))
    assert read_suite(top).data["seed"] == 1
    assert sorted(parsed) == sorted([str(top), str(tmp_path / "b.yaml"), str(tmp_path / "c.yaml")])
    monkeypatch.setattr(suite_yaml, "MAX_INCLUDES", 3)
    with pytest.raises(BadInput, match=r"b\.yaml: include: more than 3 includes in all"):
        read_suite(top)


# ---------------------------------------------------------------- numbers and booleans in params

def test_nonfinite_finds_what_a_float_cannot_hold():
    params = {"a": 1e308, "b": float("inf"), "c": [1, 10 ** 400], "d": {"e": "1e400", "f": "8/255", "g": "nan"},
              "h": True, "i": "Linf", "j": "1" + "0" * 400 + "/3", "k": "1/0"}
    assert nonfinite(params) == [("b",), ("c", 1), ("d", "e"), ("d", "g"), ("j",)]


def test_coerced_booleans_walks_raw_and_validated_together():
    class Inner(BaseModel):
        w: float = 0.0
        flag: bool = False

    class P(BaseModel):
        t: float = 0.1
        on: bool = True
        xs: list[float] = []
        inner: Inner = Inner()
        free: dict = {}

    raw = {"t": True, "on": False, "xs": [1.0, False], "inner": {"w": True, "flag": True}, "free": {"k": True}}
    assert coerced_booleans(raw, P.model_validate(raw)) == [(("t",), True), (("xs", 1), False), (("inner", "w"), True)]


def test_entry_validate_turns_a_models_overflow_into_one_line():
    class P(BaseModel):
        x: float = 0

        @field_validator("x", mode="before")
        @classmethod
        def _big(cls, v):
            return float(v) * 1   # float(10**400): OverflowError, which pydantic does not catch

    entry = registry.Entry("attacks", "a", lambda p: p, P, "", "test")
    with pytest.raises(BadInput) as exc:
        entry.validate({"x": 10 ** 400}, "s.yaml: attacks[0]")
    assert exc.value.problems == ["s.yaml: attacks[0].params: attack 'a' could not check its params: "
                                  "OverflowError: int too large to convert to float"]


def test_booleans_out_of_a_params_bounds_say_boolean(plugin_manager):
    entry = registry.get("defenses").get("diffpure")
    with pytest.raises(BadInput) as exc:
        entry.validate({"score_model": "digits-unet", "t_star": False}, "s.yaml: defenses[0]")
    assert exc.value.problems == ["s.yaml: defenses[0].params.t_star: expected a number, got a boolean (false)"]


def test_checks_still_rebuild_attacks_with_their_own_budgets(tmp_path, plugin_manager):
    # The finite and boolean checks are the host's on the user's params (resolve), not Entry.validate's.
    r = resolve.load(write(tmp_path / "s.yaml", "suite: x\n" + TINY))
    attack, threat = r.rebuild_attack("pgd", r.attack_objects["pgd"].params_for(unbounded=True))
    assert threat.eps >= 1.0


# ---------------------------------------------------------------- names and ids

@pytest.mark.parametrize("value", ["digits_quick", "cifar10-linf.v2", "caf\u00e9", "_x", "a" * 100])
def test_names(value):
    assert check_name(value) == value


@pytest.mark.parametrize("value", ["/abs/path", "../x", "a/b", ".hidden", "-x", "", "a b", "a" * 101,
                                   "x\u202e", "x\u009b", "x\n"])
def test_not_names(value):
    with pytest.raises(ValueError, match="is not a name"):
        check_name(value)


@pytest.mark.parametrize("value", ["a\x1b[2J", "a\x7f", "a\x85", "a\x9b2J", "a\u200b", "a\u200f", "a\u202a",
                                   "a\u202e", "a\u2066", "a\u2069", "a\u2028", "a\ufeff"])
def test_ids_refuse_controls_of_every_kind(value):
    with pytest.raises(ValueError, match="control characters are not allowed in ids"):
        check_id(value)
    assert check_id("pgd-eot_0.1 \u00e9") == "pgd-eot_0.1 \u00e9"
