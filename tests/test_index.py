"""The index across runs (`benchkit report --index`): worst-case headline, pooling by configuration,
--limit flag, and its exports."""
from __future__ import annotations

import csv
import io
import json
import re
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from benchkit.cli import main
from conftest import write

LIMIT = 16   # of the 24 blobs images


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Under runs/: blobs seeds 3 and 4 (one configuration), blobs seed 5 with the strong attack's
    eps 0.01 (same suite name, another configuration), blobs seed 6 cut by --limit, another suite,
    and a copy of that suite's run with one cell's results partly deleted (an unfinished defense)."""
    from benchkit import plugins, registry
    from test_run import SUITE, LocalPlugin

    tmp = tmp_path_factory.mktemp("index")
    runs = tmp / "runs"
    suite = write(tmp / "s.yaml", SUITE)
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("BENCHKIT_LOAD_PLUGINS", raising=False)
        mp.delenv("BENCHKIT_DISABLE_PLUGINS", raising=False)
        plugins.reset_plugin_manager()
        plugins.get_plugin_manager().register(LocalPlugin(), name="local")
        registry.reset()
        try:
            for args in (["--seed", "3", "--out", str(runs / "seed3")],
                         ["--seed", "6", "--limit", str(LIMIT), "--out", str(runs / "limited")]):
                assert main(["run", str(suite), *args]) == 0
            mp.chdir(tmp)   # --seed without --out: runs/<suite>/seed<N>
            assert main(["run", str(suite), "--seed", "4"]) == 0
            (runs / "blobs" / "seed4").rename(runs / "seed4")
            (runs / "blobs").rmdir()
            eps = write(tmp / "eps.yaml", SUITE.replace("params: {eps: 0.2}", "params: {eps: 0.01}"))
            assert main(["run", str(eps), "--seed", "5", "--out", str(runs / "eps")]) == 0
            # Both attacks at the margin of the jittered classifier: each breaks a different, random
            # part of the images and repeats, so the per-image worst case is below either cell.
            other = write(tmp / "other.yaml", SUITE.replace("suite: blobs", "suite: other")
                          .replace("{eps: 0.2}", "{eps: 0.15}").replace("{eps: 1/255}", "{eps: 0.15}"))
            assert main(["run", str(other), "--out", str(runs / "nested" / "other")]) == 0
        finally:
            plugins.reset_plugin_manager()
            registry.reset()
    shutil.copytree(runs / "nested" / "other", runs / "nested" / "partial")
    db = sqlite3.connect(runs / "nested" / "partial" / "results.sqlite")
    with db:
        db.execute("DELETE FROM examples WHERE image_index >= 20 AND cell_id = "
                   "(SELECT id FROM cells WHERE key = 'near/jitter/weak')")
    db.close()
    return runs


def cli(capsys, *argv: str) -> str:
    capsys.readouterr()
    assert main(list(argv)) == 0
    return capsys.readouterr().out


def index_json(capsys, runs: Path, *extra: str) -> dict:
    return json.loads(cli(capsys, "report", "--index", str(runs), "--format", "json", *extra))


def run_of(idx: dict, folder: Path) -> dict:
    return next(r for r in idx["runs"] if Path(r["dir"]) == folder)


def per_image_worst_case(folder: Path, classifier: str, defense: str) -> float:
    """Robust accuracy in % of (classifier, defense) when an image counts only if it survives
    every attack cell and every variant, repeat by repeat: straight from the stored examples."""
    db = sqlite3.connect(folder / "results.sqlite")
    rows = db.execute("SELECT e.image_index, e.adv_flags FROM examples e JOIN cells c ON c.id = e.cell_id "
                      "WHERE c.classifier = ? AND c.defense = ? AND c.kind != 'clean'",
                      (classifier, defense)).fetchall()
    db.close()
    survives: dict[int, list[bool]] = {}
    for image, flags in rows:
        bits = [c == "1" for c in flags]
        survives[image] = [a and b for a, b in zip(survives.get(image, bits), bits)]
    m = np.array([survives[i] for i in sorted(survives)])
    return float(m.mean(0).mean() * 100)


def test_headline_is_the_per_image_worst_case_over_attacks(runs, capsys):
    idx = index_json(capsys, runs)
    for folder in (runs / "seed3", runs / "nested" / "other"):
        run = run_of(idx, folder)
        assert {(d["classifier"], d["defense"]) for d in run["defenses"]} == {("near", "none"), ("near", "jitter")}
        for d in run["defenses"]:
            assert d["status"] == "complete" and d["attacks"] == 2
            expected = per_image_worst_case(folder, d["classifier"], d["defense"])
            assert d["worst_case"]["mean"] == pytest.approx(expected)
            cells = {c["attack"]: c["robust"]["mean"] for c in d["cells"]}
            assert set(cells) == {"fgsm", "weak"}
            assert all(d["worst_case"]["mean"] <= v + 1e-9 for v in cells.values())
            assert d["lowest"] == {"attack": min(cells, key=cells.get), "robust": min(cells.values())}
    # Not the best cell: the weak attack leaves the undefended model far more accurate.
    none = next(d for d in run_of(idx, runs / "seed3")["defenses"] if d["defense"] == "none")
    assert none["worst_case"]["mean"] < max(c["robust"]["mean"] for c in none["cells"])
    # Not the lowest cell either: the two margin attacks on the jittered model break different images.
    jitter = next(d for d in run_of(idx, runs / "nested" / "other")["defenses"] if d["defense"] == "jitter")
    assert jitter["worst_case"]["mean"] < jitter["lowest"]["robust"] - 10

    table = cli(capsys, "report", "--index", str(runs))
    assert "worst-case robust %" in table and "best robust" not in table
    assert f"{none['worst_case']['mean']:.2f}" in table
    lines = table.splitlines()
    top = next(i for i, line in enumerate(lines) if "worst-case robust %" in line)
    col = lines[top].index("worst-case robust %")
    for line in lines[top + 2:]:
        if not line.strip():
            break   # the table across seeds follows
        value = line[col:].split()[0]
        assert value in ("incomplete",) or re.fullmatch(r"\d+\.\d\d", value), line


def test_unfinished_defense_is_marked_incomplete_never_a_worst_case(runs, capsys):
    idx = index_json(capsys, runs)
    partial = {d["defense"]: d for d in run_of(idx, runs / "nested" / "partial")["defenses"]}
    assert partial["jitter"]["status"] == "incomplete" and partial["jitter"]["worst_case"] is None
    assert partial["jitter"]["lowest"]["attack"] == "fgsm"   # the one complete cell, shown as such
    assert partial["none"]["status"] == "complete"
    table = cli(capsys, "report", "--index", str(runs))
    assert re.search(r"near\s+jitter\s+2\s+incomplete", table)
    rows = list(csv.DictReader(io.StringIO(cli(capsys, "report", "--index", str(runs), "--format", "csv"))))
    row = next(r for r in rows if r["row"] == "run" and r["folder"].endswith("partial") and r["defense"] == "jitter")
    assert row["complete"] == "False" and row["robust_mean"] == ""


def test_pooling_only_runs_of_one_configuration(runs, capsys):
    per_seed = {}
    for folder in ("seed3", "seed4"):
        data = json.loads(cli(capsys, "report", str(runs / folder), "--format", "json"))
        per_seed[folder] = {c["key"]: c["robust"]["mean"] for c in data["cells"]}
    idx = index_json(capsys, runs)
    blobs = [g for g in idx["configs"] if g["suite"] == "blobs"]
    assert len(blobs) == 3
    # Configurations are numbered in the order of the folders (eps, limited, ..., seed3).
    labels = {Path(r["dir"]).name: r["config"] for r in idx["runs"]}
    assert labels["seed3"] == labels["seed4"] == "blobs (config 3 of 3: attacks[0].params.eps 0.2, --limit none)"
    assert labels["eps"] == "blobs (config 1 of 3: attacks[0].params.eps 0.01, --limit none)"
    assert labels["limited"] == f"blobs (config 2 of 3: attacks[0].params.eps 0.2, --limit {LIMIT})"
    assert labels["other"] == labels["partial"] == "other"

    pooled = next(g for g in blobs if g["seeds"] == [3, 4])
    cells = {c["key"]: c for c in pooled["cells"]}
    assert set(cells) == set(per_seed["seed3"])
    for key, c in cells.items():
        values = [per_seed["seed3"][key], per_seed["seed4"][key]]
        assert c["values"] == values
        assert c["mean"] == pytest.approx(np.mean(values)) and c["std"] == pytest.approx(np.std(values, ddof=1))
    worst = {(w["classifier"], w["defense"]): w for w in pooled["worst_case"]}
    for d in run_of(idx, runs / "seed3")["defenses"]:
        values = [per_image_worst_case(runs / s, d["classifier"], d["defense"]) for s in ("seed3", "seed4")]
        w = worst[(d["classifier"], d["defense"])]
        assert w["seeds"] == [3, 4] and w["attacks"] == 2
        assert w["mean"] == pytest.approx(np.mean(values)) and w["std"] == pytest.approx(np.std(values, ddof=1))
    # The other configurations hold one seed each: nothing pooled, the eps 0.01 run is not among the seeds.
    for g in blobs:
        if g is not pooled:
            assert len(g["seeds"]) == 1 and g["cells"] == [] and g["worst_case"] == []
    assert not any(g["cells"] for g in idx["configs"] if g["suite"] == "other")   # seed 3 twice: one seed

    table = cli(capsys, "report", "--index", str(runs))
    jitter = cells["near/jitter/fgsm"]
    assert f"{jitter['mean']:.2f} ± {jitter['std']:.2f}" in table
    assert "blobs (config 1 of 3: attacks[0].params.eps 0.01, --limit none)" in table


def test_limit_is_flagged_in_every_format(runs, capsys, tmp_path):
    page = tmp_path / "index.html"
    idx = index_json(capsys, runs, "--html", str(page))
    flag = f"limit {LIMIT} of 24"
    flagged = run_of(idx, runs / "limited")["limit"]
    assert (flagged["limit"], flagged["n"], flagged["n_of"]) == (LIMIT, [LIMIT], [24])
    assert run_of(idx, runs / "limited")["limit_text"] == flag
    assert all(r["limit"] is None for r in idx["runs"] if not r["dir"].endswith("limited"))
    limited_line = next(line for line in cli(capsys, "report", "--index", str(runs)).splitlines() if "limited" in line)
    assert flag in limited_line
    rows = list(csv.DictReader(io.StringIO(cli(capsys, "report", "--index", str(runs), "--format", "csv"))))
    limited = [r for r in rows if r["row"] == "run" and r["folder"].endswith("limited")]
    assert limited and all(r["limit"] == str(LIMIT) and r["limit_of"] == "24" for r in limited)
    assert all(r["limit"] == "" for r in rows if r["row"] == "run" and not r["folder"].endswith("limited"))
    assert flag in page.read_text()


def test_csv_columns_are_numbers(runs, capsys):
    from benchkit.index import CSV_HEADERS

    idx = index_json(capsys, runs)
    text = cli(capsys, "report", "--index", str(runs), "--format", "csv")
    assert "±" not in text
    rows = list(csv.DictReader(io.StringIO(text)))
    assert list(rows[0]) == CSV_HEADERS
    numeric = [h for h in CSV_HEADERS if h.startswith(("robust_", "clean_", "lowest_robust", "mean_", "std_"))
               or h in ("seed", "limit", "attacks", "seeds")]
    for r in rows:
        for h in numeric:
            if r[h] != "":
                float(r[h])
    expected = {(r["folder"], d["defense"]): d["worst_case"] and d["worst_case"]["mean"]
                for r in idx["runs"] for d in r["defenses"]}
    got = {(r["folder"], r["defense"]): float(r["robust_mean"]) if r["robust_mean"] else None
           for r in rows if r["row"] == "run"}
    assert got == pytest.approx(expected)
    pooled = [r for r in rows if r["row"] == "pooled"]
    rows_expected = {(d, a) for d in ("none", "jitter") for a in ("", "fgsm", "weak")}   # "": the worst case
    assert {(r["defense"], r["attack"]) for r in pooled} == rows_expected
    assert all(r["seeds"] == "2" and float(r["std_over_seeds"]) >= 0 for r in pooled)


def test_html_page_headlines_the_worst_case(runs, capsys, tmp_path):
    page = tmp_path / "index.html"
    idx = index_json(capsys, runs, "--html", str(page))
    html = page.read_text()
    assert "worst-case robust %" in html and "best robust" not in html
    for r in idx["runs"]:
        for d in r["defenses"]:
            if d["worst_case"]:
                assert f"{d['worst_case']['mean']:.2f}" in html
    assert html.count(">incomplete<") == 1
    assert "blobs (config 1 of 3: attacks[0].params.eps 0.01, --limit none)" in html
    pooled = next(g for g in idx["configs"] if g["seeds"] == [3, 4])
    w = pooled["worst_case"][0]
    assert f"{w['mean']:.2f} ± {w['std']:.2f}" in html


def test_index_links_and_bad_input(runs, capsys, tmp_path):
    page = runs.parent / "index.html"
    cli(capsys, "report", "--index", str(runs), "--html", str(page))
    html = page.read_text()
    assert 'href="runs/seed4/leaderboard.html"' in html and 'href="runs/nested/other/leaderboard.html"' in html
    assert main(["report", "--index", str(tmp_path / "empty")]) == 2
    assert main(["report"]) == 2
    assert "give a run folder DIR or --index" in capsys.readouterr().err
