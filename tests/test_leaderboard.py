"""The leaderboard a researcher reads: threat column, confidence intervals over images, error bars,
compact check badges with advice, the --limit flag, numeric CSV and a consistent terminal table.
Runs the tiny blobs suite of test_run (about a second)."""
from __future__ import annotations

import csv
import io
import json
import re
import sqlite3
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from scipy.stats import binomtest

from benchkit import checks, metrics, plots, report
from benchkit.cli import main
from benchkit.store import Store
from conftest import write

SVG = "{http://www.w3.org/2000/svg}"


# ------------------------------------------------------------------ confidence intervals over images

@pytest.mark.parametrize("k, n", [(0, 16), (3, 16), (8, 16), (16, 16), (61, 64), (1, 1), (5, 24)])
def test_ci_over_images_is_scipys_wilson_interval_for_one_repeat(k, n):
    m = (np.arange(n) < k)[:, None]                  # k correct images of n, one evaluation each
    acc = metrics.accuracy(m)
    ci = binomtest(k, n).proportion_ci(method="wilson")
    assert (acc.ci_low, acc.ci_high) == pytest.approx((ci.low * 100, ci.high * 100), abs=1e-9)
    assert acc.ci_low <= acc.mean <= acc.ci_high
    assert acc.as_dict()["ci_low"] == acc.ci_low and acc.as_dict()["ci_high"] == acc.ci_high


@pytest.mark.parametrize("k, n, low, high", [(81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605),
                                             (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718)])
def test_wilson_matches_newcombes_published_values(k, n, low, high):
    # Newcombe (1998), Statistics in Medicine 17:857, Table I, method 3 (score interval, no correction).
    assert metrics.wilson(k, n) == pytest.approx((low, high), abs=5e-5)


def test_ci_with_repeats_counts_each_image_by_its_mean_correctness():
    # 4 images x 2 repeats: per-image means 1, 0.5, 0, 1 -> 2.5 "successes" of 4.
    m = np.array([[1, 1], [1, 0], [0, 0], [1, 1]], dtype=bool)
    acc = metrics.accuracy(m)
    # By hand: p = 0.625, z^2 = 3.841459, center = (2*4*p + z^2) / (2*(4 + z^2)) = 0.563763,
    # half width = z / (2*(4 + z^2)) * sqrt(4*4*p*(1-p) + z^2) = 0.344338.
    assert acc.mean == 62.5 and acc.repeats == 2
    assert (acc.ci_low, acc.ci_high) == pytest.approx((21.9425, 90.8101), abs=1e-3)
    # Identical repeats carry no more information than one: the same interval as one evaluation.
    one = np.array([1, 0, 1, 1, 0, 1, 1, 1], dtype=bool)[:, None]
    assert (metrics.accuracy(np.repeat(one, 3, 1)).ci_low, metrics.accuracy(np.repeat(one, 3, 1)).ci_high) == \
        pytest.approx((metrics.accuracy(one).ci_low, metrics.accuracy(one).ci_high))
    assert np.isnan(metrics.accuracy(np.zeros((0, 2), dtype=bool)).ci_low)


def test_threat_text():
    t = report.threat_text
    assert t({"norm": "Linf", "eps": 8 / 255}) == "Linf 8/255"
    assert t({"norm": "Linf", "eps": 1 / 255}) == "Linf 1/255"
    assert t({"norm": "Linf", "eps": 0.3}) == "Linf 0.3"
    assert t({"norm": "Linf", "eps": 0.2}) == "Linf 0.2"      # 51/255, but written as 0.2
    assert t({"norm": "Linf", "eps": 0.0314}) == "Linf 0.0314"   # near 8/255, not it: shown as written
    assert t({"norm": "L2", "eps": 0.5}) == "L2 0.5"
    assert t({"norm": "StAdv", "eps": 0.05}) == "StAdv 0.05"
    assert t(None) == "" and t({}) == ""


# ------------------------------------------------------------------ error bars

def test_line_chart_draws_error_bars_at_the_intervals():
    series = [{"label": "robust", "points": [(0.1, 50.0), (0.05, 40.0), (0.2, 60.0)],
               "errors": [(30.0, 70.0), (20.0, 55.0), None]},
              {"label": "standard", "points": [(0.05, 90.0), (0.1, 95.0)]}]
    svg = plots.line_chart(series, title="t", x_label="t*", y_label="acc", y_range=(0, 100))
    root = ET.fromstring(svg)
    bars = root.findall(f".//{SVG}path[@class='errorbar']")
    assert len(bars) == 2                                  # one per interval; none for None or the bare series
    circles = {c.find(f"{SVG}title").text.split(": ", 1)[1]: c for c in root.findall(f".//{SVG}circle[@class='point']")}
    # y axis: 0 at the bottom of the plot, 100 at its top; a bar spans its interval in that scale
    top, bottom = 28, 300 - 44
    y = lambda v: top + (bottom - top) * (1 - v / 100)
    for bar, (x, lo, hi) in zip(bars, [(0.05, 20.0, 55.0), (0.1, 30.0, 70.0)]):    # drawn in x order
        first = re.match(r"M([\d.]+),([\d.]+) V([\d.]+)", bar.get("d"))
        assert float(first[2]) == pytest.approx(y(lo), abs=0.06) and float(first[3]) == pytest.approx(y(hi), abs=0.06)
        assert (float(bar.get("data-lo")), float(bar.get("data-hi"))) == (lo, hi)
        point = next(c for k, c in circles.items() if k.startswith(f"t* {x:g},") and "[" in k)
        assert float(first[1]) == pytest.approx(float(point.get("cx")), abs=0.06)   # one series with bars: no dodge
        assert f"[{lo:.2f}, {hi:.2f}]" in point.find(f"{SVG}title").text
    # Without a fixed range the axis covers the intervals, not just the points.
    free = ET.fromstring(plots.line_chart([{"label": "a", "points": [(1, 50), (2, 60)], "errors": [(10, 95), (40, 70)]}]))
    ticks = [float(t.text) for t in free.findall(f"{SVG}text") if t.get("text-anchor") == "end"]
    assert min(ticks) <= 10 and max(ticks) >= 95
    with pytest.raises(ValueError, match="1 intervals for 2 points"):
        plots.line_chart([{"label": "a", "points": [(1, 50), (2, 60)], "errors": [(10, 95)]}])


def test_curves_carry_each_points_ci():
    acc = lambda k: metrics.accuracy((np.arange(8) < k)[:, None])
    spec = lambda i, t: {"id": i, "plugin": "p", "params": {"t": t}}
    rows = [{"key": f"c/{d}/a", "classifier": "c", "defense": d, "attack": "a", "clean": acc(8), "robust": acc(k)}
            for d, k in (("d1", 2), ("d2", 5))]
    data = {"suite": {"defenses": [spec("d1", 0.1), spec("d2", 0.2)], "attacks": [{"id": "a", "plugin": "x"}]},
            "rows": rows}
    (curve,) = report.curves(data)
    standard, robust = curve["series"]
    assert robust["points"] == [(0.1, 25.0), (0.2, 62.5)]
    assert robust["errors"] == [(r["robust"].ci_low, r["robust"].ci_high) for r in rows]
    assert standard["errors"] == [(r["clean"].ci_low, r["clean"].ci_high) for r in rows]


# ------------------------------------------------------------------ checks: badges and advice

def test_every_check_has_a_short_label_and_advice():
    for name in [*checks.names(), "checks"]:
        assert 0 < len(checks.SHORT[name]) <= 10, name
        assert len(checks.ADVICE[name]) > 40, name
    assert checks.advice("eot-convergence", "check could not run: RuntimeError: x") == checks.ADVICE["checks"]


def test_badges_put_failures_first_and_skipped_last():
    cs = [{"name": n, "status": s, "reason": f"{n} {s}", "numbers": {}} for n, s in
          [("gradients", "skipped"), ("robust-le-clean", "pass"), ("eot-convergence", "fail"),
           ("attack-undefended", "pass"), ("unbounded-budget", "fail")]]
    b = report.badges(cs)
    assert [(c["name"], c["status"]) for c in b] == [
        ("eot-convergence", "fail"), ("unbounded-budget", "fail"), ("robust-le-clean", "pass"),
        ("attack-undefended", "pass"), ("gradients", "skipped")]
    assert b[0]["short"] == "EOT" and b[0]["advice"] == checks.ADVICE["eot-convergence"]
    assert [c["advice"] for c in b[2:]] == ["", "", ""]


# ------------------------------------------------------------------ end to end on the blobs suite

@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    """The blobs suite (4 cells, 24 images, the 'weak' attack fails attack-undefended), run in full
    and with --limit 5."""
    from benchkit import plugins, registry
    from test_run import SUITE, LocalPlugin

    plugins.reset_plugin_manager()
    plugins.get_plugin_manager().register(LocalPlugin(), name="local")
    registry.reset()
    tmp = tmp_path_factory.mktemp("leaderboard")
    suite = write(tmp / "s.yaml", SUITE)
    assert main(["run", str(suite), "--out", str(tmp / "full")]) == 0
    assert main(["run", str(suite), "--out", str(tmp / "limited"), "--limit", "5"]) == 0
    yield tmp
    plugins.reset_plugin_manager()
    registry.reset()


def _report(capsys, out, fmt: str) -> str:
    capsys.readouterr()
    assert main(["report", str(out), "--format", fmt]) == 0
    return capsys.readouterr().out


def _flags(out) -> dict[str, np.ndarray]:
    """Per cell, the stored robust flags [image, repeat] (one variant per cell here)."""
    db = sqlite3.connect(out / "results.sqlite")
    rows = db.execute("SELECT c.key, e.image_index, e.adv_flags FROM examples e JOIN cells c ON c.id = e.cell_id "
                      "WHERE e.adv_flags IS NOT NULL ORDER BY 1, 2").fetchall()
    by: dict[str, list] = {}
    for key, _, flags in rows:
        by.setdefault(key, []).append([c == "1" for c in flags])
    return {k: np.array(v) for k, v in by.items()}


def test_json_carries_threat_ci_and_limit(blobs, capsys):
    full = json.loads(_report(capsys, blobs / "full", "json"))
    cells = {c["key"]: c for c in full["cells"]}
    assert full["limit"] is None
    assert cells["near/none/fgsm"]["threat"] == {"norm": "Linf", "eps": 0.2}
    assert cells["near/none/weak"]["threat_text"] == "Linf 1/255"
    assert cells["near/jitter/fgsm"]["n_total"] == 24
    flags = _flags(blobs / "full")
    for key, c in cells.items():
        m = flags[key]
        if m.shape[1] == 1:          # deterministic defense: a binomial count of robust images
            ci = binomtest(int(m.sum()), len(m)).proportion_ci(method="wilson")
            assert (c["robust"]["ci_low"], c["robust"]["ci_high"]) == pytest.approx((ci.low * 100, ci.high * 100))
        else:                        # per image its mean correctness over the repeats
            lo, hi = metrics.wilson(float(m.mean(1).sum()), len(m))
            assert (c["robust"]["ci_low"], c["robust"]["ci_high"]) == pytest.approx((lo * 100, hi * 100))
    (worst,) = [g for g in full["worst_case"] if g["defense"] == "jitter"]
    both = flags["near/jitter/fgsm"] & flags["near/jitter/weak"]
    lo, hi = metrics.wilson(float(both.mean(1).sum()), len(both))
    assert (worst["robust"]["ci_low"], worst["robust"]["ci_high"]) == pytest.approx((lo * 100, hi * 100))
    assert worst["threat_text"] == "Linf 0.2; Linf 1/255"
    limited = json.loads(_report(capsys, blobs / "limited", "json"))
    assert {k: limited["limit"][k] for k in ("limit", "n", "n_of")} == {"limit": 5, "n": [5], "n_of": [24]}
    assert limited["limit"]["cells"] == sorted(cells)
    assert {c["n"] for c in limited["cells"]} == {5}


def test_check_advice_one_line_per_failing_check(blobs, capsys):
    data = report.collect(Store(blobs / "full" / "results.sqlite"))
    failing = [(r["key"], c) for r in data["rows"] for c in r["checks"] if c["status"] == "fail"]
    assert [k for k, _ in failing] == ["near/none/weak", "near/jitter/weak"]       # the 1/255 attack is too weak
    lines = report.check_advice(data)
    assert lines == [f"cell {k}: attack-undefended failed: {c['reason']}. What to do: "
                     f"{checks.ADVICE['attack-undefended']}." for k, c in failing]
    assert "too weak" in lines[0] and json.loads(_report(capsys, blobs / "full", "json"))["advice"] == lines


def test_csv_has_numeric_columns(blobs, capsys):
    full = json.loads(_report(capsys, blobs / "full", "json"))
    rows = list(csv.DictReader(io.StringIO(_report(capsys, blobs / "limited", "csv"))))
    assert list(rows[0]) == report.CSV_COLUMNS
    cells = {(r["defense"], r["attack"]): r for r in rows if r["row"] == "cell"}
    assert len(cells) == 4 and [r["row"] for r in rows].count("worst case") == 2
    numeric = [c for c in report.CSV_COLUMNS if c.startswith(("clean_", "robust_"))] + ["n", "n_total", "eps"]
    for r in cells.values():
        values = {c: float(r[c]) for c in numeric}         # every one a plain number
        assert values["n"] == 5 and values["n_total"] == 24
        assert values["robust_ci_low"] <= values["robust_mean"] <= values["robust_ci_high"]
        assert "±" not in "".join(r.values())
    assert float(cells[("none", "weak")]["eps"]) == 1 / 255 and cells[("none", "weak")]["threat"] == "Linf 1/255"
    assert cells[("none", "weak")]["checks_failed"] == "attack-undefended" and cells[("none", "fgsm")]["checks_failed"] == ""
    ref = next(r for r in rows if r["row"] == "reference")
    assert float(ref["published_robust"]) == 50.0 and ref["robust_mean"] == "" and ref["n"] == ""
    # the full run's numbers, to CSV precision
    full_rows = {(r["defense"], r["attack"]): r for r in csv.DictReader(io.StringIO(_report(capsys, blobs / "full", "csv")))
                 if r["row"] == "cell"}
    for c in full["cells"]:
        r = full_rows[(c["defense"], c["attack"])]
        for what in ("clean", "robust"):
            for k in ("mean", "std", "ci_low", "ci_high"):
                assert float(r[f"{what}_{k}"]) == pytest.approx(c[what][k], abs=1e-4)


def test_terminal_table_two_decimals_and_limit_line(blobs, capsys):
    text = _report(capsys, blobs / "limited", "table")
    lines = text.splitlines()
    assert lines[0] == "--limit 5: 5 of 24 images per cell; not comparable with a full run"
    assert lines[-1].startswith("Accuracy in %. ±: std over 4 evaluation repeats")
    assert "95% CI [lo, hi]: Wilson score interval over the n images" in lines[-1]
    header, rule = lines[1], lines[2]
    # column spans from the dashed rule under the header
    spans = [m.span() for m in re.finditer(r"-+", rule)]
    cols = {header[a:b].strip(): (a, b) for a, b in spans}
    pct = re.compile(r"^(-|\d+\.\d\d( ± \d+\.\d\d)?|\[\d+\.\d\d, \d+\.\d\d\])$")
    body = [ln for ln in lines[3:-1] if ln.startswith("near")]
    assert len(body) == 6
    seen = set()
    for ln in body:
        for name in ("clean %", "clean 95% CI", "robust %", "robust 95% CI", "robust worst-of-N", "robust majority"):
            a, b = cols[name]
            cell = ln[a:b].strip()
            assert pct.match(cell), (name, cell)
            seen.add(cell)
    assert "0.00" in seen and "100.00" in seen and "0" not in seen and "100" not in seen
    full = _report(capsys, blobs / "full", "table").splitlines()
    assert full[0].startswith("classifier") and not any("--limit" in ln for ln in full)
    assert all(ln.split()[3] == "Linf" for ln in full[2:6])     # the threat column, after the attack
    assert "Linf 1/255" in full[3] and "Linf 0.2" in full[2]


def test_html_threat_ci_badges_and_limit_banner(blobs):
    page = (blobs / "limited" / "leaderboard.html").read_text()
    assert page.count('id="limit-flag"') == 1
    assert "--limit 5: 5 of 24 images per cell; not comparable with a full run" in page
    assert 'id="limit-flag"' not in (blobs / "full" / "leaderboard.html").read_text()
    assert '<td class="threat" title="Linf eps = 0.00392156862745098">Linf 1/255</td>' in page
    data = report.collect(Store(blobs / "limited" / "results.sqlite"))
    rows = re.findall(r"<tr>\s*<td>near</td><td>(\w+)</td><td>(\w+)(.*?)</tr>", page, re.S)
    assert len(rows) == 4
    for (defense, attack, html), r in zip(rows, data["rows"]):
        assert (defense, attack) == (r["defense"], r["attack"])
        assert report.ci_text(r["clean"]) in html and report.ci_text(r["robust"]) in html
        # one badge per check, failed first, skipped last
        statuses = re.findall(r'<details class="check (\w+)"', html)
        assert len(statuses) == len(r["checks"]) == 6
        assert statuses == sorted(statuses, key=["fail", "pass", "skipped"].index)
        assert statuses[0] == ("fail" if attack == "weak" else "pass")
    badge = re.search(r'<details class="check fail" data-check="attack-undefended">(.*?)</details>', page, re.S)
    assert badge and "✗ undef" in badge[1] and "What to do:" in badge[1]
    assert checks.ADVICE["attack-undefended"] in badge[1].replace("&#39;", "'")
    assert "95% CI (images)" in page and "± std (repeats)" in page


def test_runs_without_threat_or_sizes_show_blanks(blobs, tmp_path, capsys):
    """A run recorded before the threat model and dataset sizes were (older stores): blank threat and
    n_total, no limit flag, and the report still renders."""
    import shutil

    shutil.copytree(blobs / "limited", tmp_path / "old")
    db = sqlite3.connect(tmp_path / "old" / "results.sqlite")
    prov = json.loads(db.execute("SELECT provenance_json FROM runs").fetchone()[0])
    for k in ("threats", "dataset_n", "limit"):
        del prov[k]
    db.execute("UPDATE runs SET provenance_json = ?", (json.dumps(prov),))
    db.commit()
    db.close()
    data = json.loads(_report(capsys, tmp_path / "old", "json"))
    assert data["limit"] is None and {c["threat_text"] for c in data["cells"]} == {""}
    rows = list(csv.DictReader(io.StringIO(_report(capsys, tmp_path / "old", "csv"))))
    assert {r["threat"] for r in rows} == {""} and {r["n_total"] for r in rows if r["row"] == "cell"} == {""}
    assert "--limit" not in _report(capsys, tmp_path / "old", "table").splitlines()[0]
