"""The leaderboard's visuals: SVG sweep charts, purification strips, the index across runs, and the
page rendered in headless Chromium."""
from __future__ import annotations

import base64
import re
import shutil
import sqlite3
import struct
import subprocess
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from benchkit import plots, png
from benchkit.cli import main
from conftest import ROOT, write

ARTIFACTS = ROOT / "test-artifacts"

# Two DiffPure defenses that differ only in t* and two attacks that differ only in eot: a t* curve
# (Figure 3; the suite's `sweeps:` puts the undefended cell at t* = 0) and an EOT curve (Figure 6)
# per group, and a purification strip per DiffPure cell. Seconds on a CPU.
DIGITS = f"""
suite: visuals
description: tiny DiffPure sweep for the rendering test
include: [{ROOT}/suites/_base/digits.yaml]
seed: 0
dataset: {{plugin: digits, params: {{split: test, n: 8}}}}
defenses:
  - {{id: none, plugin: identity}}
  - {{id: t0.05, plugin: diffpure, params: {{score_model: digits-unet, t_star: 0.05, dt: 0.01}}}}
  - {{id: t0.1, plugin: diffpure, params: {{score_model: digits-unet, t_star: 0.1, dt: 0.01}}}}
attacks:
  - {{id: eot1, plugin: bpda-eot, params: {{eps: 0.3, steps: 2, step_size: 0.1, eot: 1}}}}
  - {{id: eot2, plugin: bpda-eot, params: {{eps: 0.3, steps: 2, step_size: 0.1, eot: 2}}}}
cells:
  - {{classifier: cnn, defense: none, attack: eot1}}
  - {{classifier: cnn, defense: t0.05, attack: eot1}}
  - {{classifier: cnn, defense: t0.1, attack: eot1}}
  - {{classifier: cnn, defense: t0.05, attack: eot2}}
  - {{classifier: cnn, defense: t0.1, attack: eot2}}
eval: {{batch_size: 8, repeats: 2}}
checks: {{enabled: [robust-le-clean]}}
sweeps:
  - {{over: defenses, param: t_star, label: "t*", points: {{none: 0}}}}
  - {{over: attacks, param: eot, label: EOT samples}}
"""


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    from benchkit import plugins, registry

    plugins.reset_plugin_manager()
    registry.reset()
    tmp = tmp_path_factory.mktemp("visuals")
    assert main(["run", str(write(tmp / "visuals.yaml", DIGITS)), "--out", str(tmp / "run")]) == 0
    yield tmp / "run"
    plugins.reset_plugin_manager()
    registry.reset()


def test_line_chart_draws_every_point_and_escapes_labels():
    svg = plots.line_chart([{"label": "<script>alert(1)</script>", "points": [(0.1, 50), (0.05, 40), (0.3, 90)]},
                            {"label": "a & b", "points": [(0.1, 20), (0.2, 30)], "dash": True}],
                           title='t* "sweep" <b>', x_label="t*", y_label="acc", y_range=(0, 100))
    root = ET.fromstring(svg)                    # well-formed XML
    ns = "{http://www.w3.org/2000/svg}"
    assert len(root.findall(f".//{ns}circle[@class='point']")) == 5
    assert "<script>" not in svg and "&lt;script&gt;alert(1)&lt;/script&gt;" in svg
    assert "a &amp; b" in svg and "<b>" not in svg
    # points are joined in x order; ticks are round numbers covering the data
    line = root.findall(f".//{ns}polyline")[0].get("points").split()
    assert [float(p.split(",")[0]) for p in line] == sorted(float(p.split(",")[0]) for p in line)
    assert plots.nice_ticks(0.05, 0.3) == [0.05, 0.1, 0.15, 0.2, 0.25, 0.3]
    assert plots.nice_ticks(1, 2, integer=True) == [1, 2]
    assert plots.line_chart([]) == ""


def test_curves_follow_the_suite_params(digits_run):
    from benchkit import report
    from benchkit.store import Store

    data = report.collect(Store(digits_run / "results.sqlite"))
    by_kind = {}
    for c in data["curves"]:
        by_kind.setdefault(c["kind"], []).append(c)
    # one t* curve per attack, one EOT curve per defense
    assert set(by_kind) == {"defenses:t_star", "attacks:eot"}
    assert len(by_kind["defenses:t_star"]) == 2 and len(by_kind["attacks:eot"]) == 2
    t = next(c for c in by_kind["defenses:t_star"] if c["title"].startswith("cnn · eot1"))
    assert t["title"] == "cnn · eot1: accuracy vs t*" and t["x_label"] == "t*"
    rows = {r["key"]: r for r in data["rows"]}
    for series, acc in zip(t["series"], ("clean", "robust")):
        assert series["points"] == [(t_star, rows[f"cnn/{d}/eot1"][acc].mean) for t_star, d in
                                    ((0.0, "none"), (0.05, "t0.05"), (0.1, "t0.1"))]
    assert len(next(c for c in by_kind["defenses:t_star"] if c["title"].startswith("cnn · eot2"))["series"][0]["points"]) == 2
    e = next(c for c in by_kind["attacks:eot"] if "t0.1" in c["title"])
    assert [x for x, _ in e["series"][0]["points"]] == [1.0, 2.0] and e["x_label"] == "EOT samples"
    assert [y for _, y in e["series"][0]["points"]] == [rows[f"cnn/t0.1/{a}"]["robust"].mean for a in ("eot1", "eot2")]
    # Without `sweeps:` the report finds the same sweeps itself (the only varying numeric params),
    # without the undefended point it has no value for.
    found = report.curves({**data, "suite": {k: v for k, v in data["suite"].items() if k != "sweeps"}})
    assert sorted((c["kind"], [len(s["points"]) for s in c["series"]]) for c in found) == [
        ("attacks:eot", [2]), ("attacks:eot", [2]), ("defenses:t_star", [2, 2]), ("defenses:t_star", [2, 2])]
    html = (digits_run / "leaderboard.html").read_text()
    assert html.count('<svg xmlns="http://www.w3.org/2000/svg" class="chart"') == 4
    assert html.count('class="point"') == 2 * 3 + 2 * 2 + 2 * 2         # t*: 2 series x (3, 2) points; eot: 2 x 2


def test_strips_are_stored_with_the_shard_and_decode_to_the_image_size(digits_run):
    db = sqlite3.connect(digits_run / "results.sqlite")
    assert ("0002_samples",) in db.execute("SELECT name FROM migrations").fetchall()
    rows = db.execute("SELECT c.key, s.image_index, s.frame, s.kind, s.png FROM samples s JOIN cells c ON c.id = s.cell_id "
                      "ORDER BY 1, 2, 3").fetchall()
    assert len(rows) == 4 * 4 * 5                     # DiffPure cells x first 4 images x frames (identity: none)
    kinds = [k for key, i, _, k, _ in rows if key == "cnn/t0.1/eot1" and i == 0]
    # the defense's trajectory of the adversarial input (t* = 0.1, dt = 0.01: 10 solver steps), then the clean image
    assert kinds == ["input", "diffused (t*)", "step 5/10", "purified", "clean"]
    frames = {(key, i, k): png.decode(bytes(b)) for key, i, _, k, b in rows}
    assert {a.shape for a in frames.values()} == {(8, 8, 1)}
    f = lambda k: frames[("cnn/t0.1/eot1", 0, k)].astype(int)
    assert np.abs(f("diffused (t*)") - f("input")).mean() > 1   # noise was added, then removed
    assert not np.array_equal(f("purified"), f("input"))
    # the page embeds the same images
    html = (digits_run / "leaderboard.html").read_text()
    uris = re.findall(r'<img class="frame" src="data:image/png;base64,([^"]+)"', html)
    assert len(uris) == 80
    assert {png.decode(base64.b64decode(u)).shape for u in uris} == {(8, 8, 1)}


def test_no_strips_for_defenses_without_a_trajectory(tmp_path, plugin_manager):
    from benchkit import registry
    from test_run import SUITE, LocalPlugin

    plugin_manager.register(LocalPlugin(), name="local")
    registry.reset()
    assert main(["run", str(write(tmp_path / "s.yaml", SUITE)), "--out", str(tmp_path / "o")]) == 0
    db = sqlite3.connect(tmp_path / "o" / "results.sqlite")
    assert db.execute("SELECT count(*) FROM samples").fetchone()[0] == 0
    assert "Purification" not in (tmp_path / "o" / "leaderboard.html").read_text()


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--enable-logging=stderr", "--v=0"]


def _dom_rows(page: str) -> list[dict]:
    """The leaderboard's body rows in a dumped DOM: cell texts (tags stripped) and the check badges'
    statuses and labels, in page order."""
    body = page.split('<table id="leaderboard">', 1)[1].split("</tbody>", 1)[0].split("<tbody>", 1)[1]
    rows = []
    for cls, tr in re.findall(r"<tr( class=\"\w+\")?>(.*?)</tr>", body, re.S):
        tds = re.findall(r"<td[^>]*>(.*?)</td>", tr, re.S)
        rows.append({"class": cls.strip()[7:-1] if cls else "",
                     "cells": [" ".join(re.sub(r"<[^>]+>", " ", td).split()) for td in tds],
                     "badges": re.findall(r'<details class="check (\w+)" data-check="([\w-]+)">', tr)})
    return rows


def test_leaderboard_renders_in_headless_chromium(digits_run, tmp_path, plugin_manager):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium; .ci/run installs it when it can)")
    from benchkit import registry, report
    from benchkit.store import Store
    from test_run import SUITE, LocalPlugin

    ARTIFACTS.mkdir(exist_ok=True)
    shot, limit_shot = ARTIFACTS / "leaderboard.png", ARTIFACTS / "leaderboard-limit.png"
    for s in (shot, limit_shot):
        s.unlink(missing_ok=True)

    def chrome(page, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args,
                               page.resolve().as_uri()], capture_output=True, text=True, timeout=60)

    def dom(page) -> str:
        out = chrome(page, "--dump-dom")
        assert out.returncode == 0, out.stderr[-2000:]
        assert [line for line in out.stderr.splitlines() if ":CONSOLE" in line] == []   # no script errors or messages
        return out.stdout

    page = dom(digits_run / "leaderboard.html")
    assert '<table id="leaderboard">' in page and page.count("<tr>") >= 4
    assert page.count("<svg") == 4 and page.count('class="point"') == 14
    assert page.count('<img class="frame"') == 80
    assert "cnn/t0.1/eot2" in page and "accuracy vs t*" in page
    headers = [" ".join(re.sub(r"<[^>]+>", " ", h).split())
               for h in re.findall(r"<th[^>]*>(.*?)</th>", page.split('<table id="leaderboard">')[1].split("</thead>")[0], re.S)]
    assert headers[3] == "threat" and headers[5].startswith("clean ± std (repeats) [95% CI (images)]")
    data = report.collect(Store(digits_run / "results.sqlite"))
    rows = _dom_rows(page)
    cells, worst = [r for r in rows if not r["class"]], [r for r in rows if r["class"] == "worst"]
    assert len(cells) == 5 and len(worst) == 2
    for r, row in zip(data["rows"], cells):
        assert row["cells"][:4] == [r["classifier"], r["defense"], r["attack"], "Linf 0.3"]   # threat column
        # mean ± std over repeats, then the 95% CI over images
        assert row["cells"][5] == f"{report._fmt(r['clean'])} {report.ci_text(r['clean'])}"
        assert row["cells"][7] == f"{report._fmt(r['robust'])} {report.ci_text(r['robust'])}"
        assert re.fullmatch(r"\d+\.\d\d( ± \d+\.\d\d)? \[\d+\.\d\d, \d+\.\d\d\]", row["cells"][7])
        assert row["badges"] == [("pass", "robust-le-clean")]          # one compact badge per enabled check
    for g, row in zip(data["groups"], worst):
        assert row["cells"][3] == "Linf 0.3" and row["cells"][7] == f"{report._fmt(g['robust'])} {report.ci_text(g['robust'])}"
    # error bars: one per plotted point, each spanning that point's CI over images
    bars = re.findall(r'<path class="errorbar" d="[^"]+"[^>]*data-lo="([^"]+)" data-hi="([^"]+)"', page)
    assert len(bars) == 14
    cis = {(f"{r[a].ci_low:.4g}", f"{r[a].ci_high:.4g}") for r in data["rows"] for a in ("clean", "robust")}
    assert set(bars) <= cis
    assert 'id="limit-flag"' not in page
    run = chrome(digits_run / "leaderboard.html", f"--screenshot={shot}", "--window-size=1280,2000")
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    assert struct.unpack(">II", shot.read_bytes()[16:24]) == (1280, 2000)     # IHDR width, height

    # A --limit run (the blobs suite: about a second), whose weak attack fails a check.
    plugin_manager.register(LocalPlugin(), name="local")
    registry.reset()
    assert main(["run", str(write(tmp_path / "s.yaml", SUITE)), "--out", str(tmp_path / "lim"), "--limit", "4"]) == 0
    page = dom(tmp_path / "lim" / "leaderboard.html")
    flag = re.search(r'<div class="limit-banner" id="limit-flag" role="alert">(.*?)</div>', page)
    assert flag and flag[1] == "--limit 4: 4 of 24 images per cell; not comparable with a full run"
    assert page.index('id="limit-flag"') < page.index('<table id="leaderboard">')
    rows = [r for r in _dom_rows(page) if not r["class"]]
    assert [r["cells"][4] for r in rows] == ["4/4 of 24"] * 4                       # n of the dataset's 24
    assert [r["cells"][3] for r in rows] == ["Linf 0.2", "Linf 1/255", "Linf 0.2", "Linf 1/255"]
    for row in rows:
        statuses = [s for s, _ in row["badges"]]
        assert len(statuses) == 6 and statuses == sorted(statuses, key=["fail", "pass", "skipped"].index)
        assert (row["badges"][0] == ("fail", "attack-undefended")) == (row["cells"][2] == "weak")
        assert statuses[-2:] == ["skipped", "skipped"]                    # eot-convergence, gradient-correctness
    run = chrome(tmp_path / "lim" / "leaderboard.html", f"--screenshot={limit_shot}", "--window-size=1280,900")
    assert run.returncode == 0 and limit_shot.is_file(), run.stderr[-2000:]
