"""Leaderboards from a results store: terminal tables (tabulate), JSON/CSV, and HTML (Jinja2).

Two uncertainties are shown and never mixed: "± s" is the standard deviation over evaluation
repeats (the defense's own randomness on these images), "[lo, hi]" the 95% Wilson interval over
the n images (how far another draw of n test images could land; see metrics.accuracy)."""
from __future__ import annotations

import base64
import csv
import html
import io
import json
from pathlib import Path

import jinja2
import markupsafe
from tabulate import tabulate

from benchkit import checks, memory, metrics, plots
from benchkit.checks import gradient_note
from benchkit.store import Store
from benchkit.text import printable   # also report.printable: what every terminal line and CSV field goes through

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"


def _fmt(acc: metrics.Accuracy | None, std: bool = True) -> str:
    if acc is None or acc.n == 0:
        return "-"
    return f"{acc.mean:.2f} ± {acc.std:.2f}" if std and acc.repeats > 1 else f"{acc.mean:.2f}"


def ci_text(acc: metrics.Accuracy | None) -> str:
    """'[93.10, 99.62]': the 95% confidence interval over images, '' without one."""
    if acc is None or acc.n == 0 or acc.ci_low != acc.ci_low:   # NaN: stored before the CI existed
        return ""
    return f"[{acc.ci_low:.2f}, {acc.ci_high:.2f}]"


def threat_text(threat: dict | None) -> str:
    """'Linf 8/255', 'Linf 0.3', 'L2 0.5', 'StAdv 0.05' ('' for runs that did not record it).

    An Linf budget is written in 255ths when that is what it is (8/255 = 0.0313725...); a budget
    that is a short decimal stays one, as written (0.2 is 51/255 too, but nobody means that)."""
    if not threat:
        return ""
    norm, eps = threat["norm"], float(threat["eps"])
    k = eps * 255
    if norm == "Linf" and float(f"{eps:.3g}") != eps and 0 < round(k) and abs(k - round(k)) < 1e-4:
        return f"Linf {round(k)}/255"
    return f"{norm} {eps:g}"


def _range(values: list[int]) -> str:
    return str(values[0]) if len(values) == 1 else f"{values[0]}–{values[-1]}"


def limit_info(data: dict) -> dict | None:
    """What --limit cut: {'limit', 'cells' (the keys it cut), 'n', 'n_of' (sorted distinct sizes after
    and before), 'text'}, or None when the run had no --limit or the limit cut no cell (a limit
    above every dataset size changes nothing). Runs recorded before dataset_n: None."""
    prov = data.get("provenance") or {}
    limit, cell_n, dataset_n = prov.get("limit"), prov.get("cell_n", {}), prov.get("dataset_n", {})
    if limit is None:
        return None
    cut = {k: (cell_n[k], total) for k, total in dataset_n.items() if k in cell_n and cell_n[k] < total}
    if not cut:
        return None
    n, n_of = sorted({a for a, _ in cut.values()}), sorted({b for _, b in cut.values()})
    return {"limit": limit, "cells": sorted(cut), "n": n, "n_of": n_of,
            "text": f"--limit {limit}: {_range(n)} of {_range(n_of)} images per cell; not comparable with a full run"}


def memory_lines(data: dict) -> list[str]:
    """One line per cell whose batches ran out of memory and were split (provenance memory_backoff)."""
    backoff = (data.get("provenance") or {}).get("memory_backoff") or {}
    return [memory.describe(key, record) for key, record in sorted(backoff.items()) if isinstance(record, dict)]


# Badge order: what needs attention first; skipped checks last (and muted on the page).
_STATUS_ORDER = {"fail": 0, "pass": 1, "skipped": 2}


def badges(cell_checks: list[dict]) -> list[dict]:
    """A cell's checks in badge order (failed, passed, skipped; stable within each), each with its
    short label, what it cost and, when failed, what to do about it."""
    out = []
    for c in sorted(cell_checks, key=lambda c: _STATUS_ORDER.get(c["status"], 0)):
        out.append(dict(c) | {"short": checks.SHORT.get(c["name"], c["name"]), "cost": check_cost(c),
                              "advice": checks.advice(c["name"], c["reason"]) if c["status"] == "fail" else ""})
    return out


def check_cost(c: dict) -> str:
    """'12.3 s, 0.08 of the cell' from a check's recorded seconds and cost ('' when not recorded)."""
    nums = c.get("numbers") or {}
    if nums.get("seconds") is None:
        return ""
    return f"{nums['seconds']:.1f} s" + (f", {nums['cost']:.2f} of the cell" if nums.get("cost") is not None else "")


def checks_cost(cell_checks: list[dict]) -> float | None:
    """What a cell's checks cost together, as a fraction of the cell's own seconds (None: not recorded)."""
    costs = [c["numbers"]["cost"] for c in cell_checks if (c.get("numbers") or {}).get("cost") is not None]
    return sum(costs) if costs else None


def check_advice(data: dict) -> list[str]:
    """One line per failing check of the run: the cell, the check, its reason and what to do."""
    lines = []
    for r in [*data["rows"], *data.get("split", [])]:
        for c in r["checks"]:
            if c["status"] == "fail":
                lines.append(printable(f"cell {r['key']}: {c['name']} failed: {c['reason'].rstrip('.')}. "
                                       f"What to do: {checks.advice(c['name'], c['reason'])}."))
    return lines


def collect(store: Store, run_id: int | None = None) -> dict:
    """The rows of a run's leaderboard: every cell of its suite, with what is stored for it."""
    run = store.latest_run() if run_id is None else store.run(run_id)
    if run is None:
        return {"run": None, "rows": [], "references": [], "groups": [], "split": [], "limit": None}
    suite = json.loads(run["suite_json"])
    prov = json.loads(run["provenance_json"])
    cell_ids, cell_n = prov.get("cell_ids", {}), prov.get("cell_n", {})
    threats, dataset_n = prov.get("threats", {}), prov.get("dataset_n", {})
    rows, split, robust_flags = [], [], {}
    for key, cell_id in cell_ids.items():
        cell = store.cell(cell_id)
        n_expected = cell_n.get(key, cell["n_images"])
        examples = [e for e in store.examples(cell_id) if e["image_index"] < n_expected]
        s = metrics.summarise(examples) if examples else None
        failures = [f["message"] for f in store.failures(cell_id, run["id"])]
        n = s["n"] if s else 0
        complete = n == n_expected and not failures
        # A cell without all its results is never shown as complete: failed, or not (fully) run.
        status = "failed" if failures else ("done" if complete else ("not run" if n == 0 else "partial"))
        row = {"key": key, "kind": cell["kind"], "classifier": cell["classifier"], "defense": cell["defense"],
               "attack": cell["attack"], "n": n, "n_expected": n_expected, "complete": complete, "status": status,
               # n_total: the dataset's size before --limit (None for runs that did not record it)
               "n_total": dataset_n.get(key), "threat": threats.get(cell["attack"]),
               "clean": s["clean"] if s else None, "robust": s["robust"] if s else None,
               "attack_verdict": s["attack_verdict"] if s else None,
               "per_variant": s["per_variant"] if s else {}, "failures": failures,
               "checks": [dict(c) | {"numbers": json.loads(c["numbers_json"])} for c in store.checks(cell_id)],
               "seconds": sum(sh["seconds"] for sh in store.shards(cell_id)), "cell_id": cell_id}
        (split if cell["kind"] == "clean" else rows).append(row)
        if s is not None:
            robust_flags[key] = s["robust_flags"]
    references = suite.get("references", [])
    for r in rows:
        r["paper"] = matching_reference(references, r)
    data = {"run": dict(run), "suite": suite, "provenance": prov, "rows": rows, "split": split,
            "references": references, "groups": worst_case_groups(rows, robust_flags)}
    return data | {"curves": curves(data), "strips": strips(store, rows), "limit": limit_info(data)}


def _sweep_groups(data: dict, over: str, param: str | None) -> list[tuple[str, tuple, list]]:
    """Cells whose `over` components (defenses or attacks) differ only in one numeric param, grouped
    with everything else equal (the other cell fields, plugin, gradient, other params); only groups
    with at least two values. With param None, every param that varies so is found. Returns
    (param, group key, [(value, row)])."""
    specs = {c["id"]: c for c in data["suite"].get(over, [])}
    fixed = ("classifier", "attack") if over == "defenses" else ("classifier", "defense")
    found: dict[tuple, list] = {}
    for r in data["rows"]:
        spec = specs.get(r[over[:-1]])
        if r["robust"] is None or spec is None:
            continue
        params = spec.get("params", {})
        for name in ([param] if param else sorted(params)):
            value = params.get(name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            rest = {k: v for k, v in spec.items() if k not in ("id", "description", "params")}
            rest["params"] = {k: v for k, v in params.items() if k != name}
            key = (name, *(r[f] for f in fixed), json.dumps(rest, sort_keys=True, default=str))
            found.setdefault(key, []).append((float(value), r))
    return [(k[0], k[1:3], sorted(v, key=lambda p: p[0])) for k, v in found.items() if len({x for x, _ in v}) > 1]


def curves(data: dict) -> list[dict]:
    """The run's sweeps as chart data: the suite's `sweeps:` if it has them, else every single
    numeric param that varies between otherwise identical defenses (standard and robust accuracy)
    or attacks (robust accuracy). Each point carries its 95% CI over images as an error bar."""
    declared = data["suite"].get("sweeps")
    sweeps = declared if declared is not None else [{"over": o, "param": None} for o in ("defenses", "attacks")]
    out = []
    for sw in sweeps:
        over = sw["over"]
        for param, (clf, other), cells in _sweep_groups(data, over, sw.get("param")):
            for comp_id, x in (sw.get("points") or {}).items():   # e.g. the undefended model at t* = 0
                extra = next((r for r in data["rows"] if r["robust"] is not None and r["classifier"] == clf
                              and r[over[:-1]] == comp_id and r["defense" if over == "attacks" else "attack"] == other), None)
                if extra is not None:
                    cells = sorted([*cells, (float(x), extra)], key=lambda p: p[0])
            label = sw.get("label") or param
            what = f"{clf} · {other}"
            series = [{"label": f"robust ({other})" if over == "defenses" else "robust",
                       "points": [(v, r["robust"].mean) for v, r in cells],
                       "errors": [(r["robust"].ci_low, r["robust"].ci_high) for _, r in cells]}]
            if over == "defenses":
                series.insert(0, {"label": "standard", "points": [(v, r["clean"].mean) for v, r in cells],
                                  "errors": [(r["clean"].ci_low, r["clean"].ci_high) for _, r in cells]})
            out.append({"kind": f"{over}:{param}", "title": f"{what}: accuracy vs {label}", "x_label": label,
                        "cells": [r["key"] for _, r in cells], "series": series})
    return out


def strips(store: Store, rows: list[dict]) -> list[dict]:
    """Stored purification frames (see evaluate.strip_samples) per cell, one row per image, with the
    image's label and in how many evaluation repeats it stayed correct under attack (all variants)."""
    out = []
    for r in rows:
        samples = store.samples(r["cell_id"])
        if not samples:
            continue
        verdicts: dict[int, tuple[int, list[str]]] = {}
        for e in store.examples(r["cell_id"]):
            verdicts.setdefault(e["image_index"], (e["label"], []))[1].append(e["adv_flags"])
        images: dict[int, list] = {}
        for s in samples:
            images.setdefault(s["image_index"], []).append((s["kind"], bytes(s["png"])))
        strip = []
        for idx, frames in images.items():
            label, flags = verdicts.get(idx, (None, []))
            robust = sum(all(f[k] == "1" for f in flags) for k in range(len(flags[0]))) if flags else None
            strip.append({"index": idx, "label": label, "robust": robust, "repeats": len(flags[0]) if flags else 0,
                          "frames": [png for _, png in frames]})
        out.append({"key": r["key"], "kinds": [k for k, _ in images[next(iter(images))]], "images": strip})
    return out


def matching_reference(references: list[dict], row: dict) -> dict | None:
    """The published numbers for this cell: same defense and attack, and same classifier where the
    reference names one. References without a defense and attack (label only) match no cell."""
    for ref in references:
        if ref.get("defense") is None or ref.get("attack") is None:
            continue
        if (ref["defense"], ref["attack"]) == (row["defense"], row["attack"]) and ref.get("classifier") in (None, row["classifier"]):
            return ref
    return None


def published(ref: dict | None, what: str) -> str:
    """A reference's standard or robust accuracy with its published ± ('' when it has none)."""
    if ref is None or ref.get(what) is None:
        return ""
    std = ref.get(f"{what}_std")
    return f"{ref[what]:.2f}" + ("" if std is None else f" ± {std:.2f}")


def reference_name(ref: dict) -> tuple[str, str, str]:
    """(classifier, defense, attack) columns of a reference row."""
    if ref.get("label"):
        return ref.get("classifier") or "", ref["label"], (ref.get("attack") or "") + " (reference)"
    return ref.get("classifier") or "", ref.get("defense") or "", f"{ref.get('attack') or ''} (reference)"


def verdict_text(v: dict | None) -> str:
    return "-" if v is None else f"{v['value']:.2f}"


def worst_case_groups(rows: list[dict], robust_flags: dict) -> list[dict]:
    """Per (classifier, defense): robust only if an image survives every attack of the suite.
    robust_flags: cell key -> its per-image, per-repeat robust flags (metrics.summarise)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["complete"] and r["n"]:
            groups.setdefault((r["classifier"], r["defense"]), []).append(r)
    out = []
    for (clf, dfn), cells in groups.items():
        if len(cells) < 2:
            continue
        mats = [robust_flags[r["key"]] for r in cells]
        if len({m.shape for m in mats}) != 1:
            continue
        out.append({"classifier": clf, "defense": dfn, "attacks": len(cells), "n_total": cells[0].get("n_total"),
                    "threats": list({json.dumps(r["threat"], sort_keys=True): r["threat"] for r in cells}.values()),
                    "clean": cells[0]["clean"], "robust": metrics.accuracy(metrics.worst_case(mats))})
    return out


def _published_pair(paper: dict | None) -> str:
    return "" if paper is None else f"{published(paper, 'standard') or '-'} / {published(paper, 'robust') or '-'}"


def _groups_threat(g: dict) -> str:
    return "; ".join(dict.fromkeys(threat_text(t) for t in g["threats"] if t))


TABLE_HEADERS = ["classifier", "defense", "attack", "threat", "n", "clean %", "clean 95% CI", "robust %", "robust 95% CI",
                 "robust worst-of-N", "robust majority", "attack's verdict %", "published std / robust %", "gradient",
                 "checks"]
# Columns right-aligned as numbers; every cell is formatted here (two decimals), never re-parsed by tabulate.
_NUMERIC = {"n", "clean %", "clean 95% CI", "robust %", "robust 95% CI", "robust worst-of-N", "robust majority",
            "attack's verdict %"}


def _two(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def table(data: dict, fmt: str = "table") -> str:
    """The leaderboard as a terminal table (fmt 'table'), JSON ('json', see as_json) or CSV ('csv',
    see csv_table). The terminal table starts with the --limit flag when the limit cut the run and
    ends with what '±' and '[lo, hi]' mean."""
    if fmt == "json":
        return json.dumps(as_json(data), indent=2)
    if fmt == "csv":
        return csv_table(data)
    body = []
    for r in data["rows"]:
        failed = [c["name"] for c in r["checks"] if c["status"] == "fail"]
        if r["status"] == "failed":
            flag = "FAILED: " + r["failures"][0]
        elif r["status"] != "done":
            flag = r["status"].upper()
        else:
            flag = ", ".join(f"! {f}" for f in failed) or ("ok" if r["checks"] else "no checks")
            if (cost := checks_cost(r["checks"])) is not None:
                flag += f" ({cost:.2f}x cell)"
        robust = r["robust"]
        body.append([r["classifier"], r["defense"], r["attack"], threat_text(r.get("threat")),
                     f"{r['n']}/{r['n_expected']}", _fmt(r["clean"]), ci_text(r["clean"]), _fmt(robust), ci_text(robust),
                     _two(robust and robust.worst), _two(robust and robust.majority), verdict_text(r.get("attack_verdict")),
                     _published_pair(r.get("paper")), gradient_note(r["checks"]), flag])
    for g in data["groups"]:
        body.append([g["classifier"], g["defense"], f"worst of {g['attacks']} attacks", _groups_threat(g), str(g["robust"].n),
                     _fmt(g["clean"]), ci_text(g["clean"]), _fmt(g["robust"]), ci_text(g["robust"]),
                     _two(g["robust"].worst), _two(g["robust"].majority), "", "", "", ""])
    for g in data.get("split", []):
        body.append([g["classifier"], g["defense"], "none (whole split)", "", f"{g['n']}/{g['n_expected']}", _fmt(g["clean"]),
                     ci_text(g["clean"]), "", "", "", "", "", "", "",
                     "FAILED: " + g["failures"][0] if g["failures"] else ("" if g["complete"] else g["status"])])
    for ref in data["references"]:
        body.append([*reference_name(ref), "", "", published(ref, "standard"), "", published(ref, "robust"), "", "", "",
                     "", "", "", ref["source"]])
    colalign = ["right" if h in _NUMERIC else "left" for h in TABLE_HEADERS]
    # Every cell may hold text from the suite or the store (a file someone else may have written).
    body = [[printable(c) if isinstance(c, str) else c for c in row] for row in body]
    text = tabulate(body, headers=TABLE_HEADERS, tablefmt="simple", disable_numparse=True, colalign=colalign)
    repeats = (data.get("suite") or {}).get("eval", {}).get("repeats")
    legend = (f"Accuracy in %. ±: std over {repeats or 'the'} evaluation repeats (stochastic defenses); "
              "95% CI [lo, hi]: Wilson score interval over the n images.")
    limit = data.get("limit")
    return "\n".join([*([printable(limit["text"])] if limit else []), text, printable(legend),
                      *map(printable, memory_lines(data))])


CSV_COLUMNS = ["classifier", "defense", "attack", "row", "status", "n", "n_total", "threat", "eps",
               "clean_mean", "clean_std", "clean_ci_low", "clean_ci_high", "clean_worst",
               "robust_mean", "robust_std", "robust_ci_low", "robust_ci_high", "robust_worst", "robust_majority",
               "attack_verdict", "published_standard", "published_standard_std", "published_robust",
               "published_robust_std", "gradient", "checks_failed", "failure"]


def _num(v) -> str:
    """A CSV number: plain digits ('' for missing or NaN); accuracies to 4 decimals, budgets exact."""
    if v is None or (isinstance(v, float) and v != v):
        return ""
    return str(round(v, 4)) if isinstance(v, float) else str(v)


def _acc_columns(prefix: str, a: metrics.Accuracy | None, worst: bool = True, majority: bool = False) -> dict:
    if a is None or a.n == 0:
        return {}
    out = {f"{prefix}_mean": a.mean, f"{prefix}_std": a.std, f"{prefix}_ci_low": a.ci_low, f"{prefix}_ci_high": a.ci_high}
    return out | ({f"{prefix}_worst": a.worst} if worst else {}) | ({f"{prefix}_majority": a.majority} if majority else {})


def _threat_columns(threats: list[dict | None]) -> dict:
    known = list({json.dumps(t, sort_keys=True): t for t in threats if t}.values())
    if not known:
        return {}
    return {"threat": "; ".join(threat_text(t) for t in known), "eps": repr(float(known[0]["eps"])) if len(known) == 1 else ""}


def csv_rows(data: dict) -> list[dict]:
    """The leaderboard as flat records of CSV_COLUMNS: one per cell ('row': cell), per worst case
    over a defense's attacks ('worst case'), per whole-split standard accuracy ('clean split') and
    per published reference ('reference'). Numbers are numbers; missing ones are absent."""
    out = []
    for r in data["rows"]:
        paper = r.get("paper") or {}
        out.append({"classifier": r["classifier"], "defense": r["defense"], "attack": r["attack"], "row": "cell",
                    "status": r["status"], "n": r["n"], "n_total": r.get("n_total")}
                   | _threat_columns([r.get("threat")]) | _acc_columns("clean", r["clean"])
                   | _acc_columns("robust", r["robust"], majority=True)
                   | {"attack_verdict": (r.get("attack_verdict") or {}).get("value"),
                      "published_standard": paper.get("standard"), "published_standard_std": paper.get("standard_std"),
                      "published_robust": paper.get("robust"), "published_robust_std": paper.get("robust_std"),
                      "gradient": gradient_note(r["checks"]),
                      "checks_failed": ";".join(c["name"] for c in r["checks"] if c["status"] == "fail"),
                      "failure": r["failures"][0] if r["failures"] else ""})
    for g in data["groups"]:
        out.append({"classifier": g["classifier"], "defense": g["defense"], "attack": f"worst of {g['attacks']} attacks",
                    "row": "worst case", "status": "done", "n": g["robust"].n, "n_total": g.get("n_total")}
                   | _threat_columns(g["threats"]) | _acc_columns("clean", g["clean"])
                   | _acc_columns("robust", g["robust"], majority=True))
    for g in data.get("split", []):
        out.append({"classifier": g["classifier"], "defense": g["defense"], "attack": "", "row": "clean split",
                    "status": g["status"], "n": g["n"], "n_total": g.get("n_total"),
                    "failure": g["failures"][0] if g["failures"] else ""} | _acc_columns("clean", g["clean"]))
    for ref in data["references"]:
        clf, dfn, _ = reference_name(ref)
        out.append({"classifier": clf, "defense": dfn, "attack": ref.get("attack") or "", "row": "reference",
                    "published_standard": ref.get("standard"), "published_standard_std": ref.get("standard_std"),
                    "published_robust": ref.get("robust"), "published_robust_std": ref.get("robust_std"),
                    "failure": ""})
    return out


def csv_table(data: dict) -> str:
    """csv_rows as CSV: numbers plain (accuracies to 4 decimals, eps exact), '' where missing."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    for rec in csv_rows(data):
        w.writerow({k: _num(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else printable(v or "")
                    for k, v in rec.items()})
    return buf.getvalue()


def acc_dict(a: metrics.Accuracy | None) -> dict | None:
    return None if a is None else a.as_dict()


def as_json(data: dict) -> dict:
    acc = acc_dict
    return {"run": data["run"] and {k: data["run"][k] for k in ("id", "suite_name", "suite_hash", "status")},
            "limit": data.get("limit"),
            "cells": [{k: (acc(v) if k in ("clean", "robust") else v) for k, v in r.items() if k != "per_variant"}
                      | {"per_variant": {k: acc(v) for k, v in r["per_variant"].items()},
                         "threat_text": threat_text(r.get("threat"))} for r in data["rows"]],
            "worst_case": [{**g, "clean": acc(g["clean"]), "robust": acc(g["robust"]), "threat_text": _groups_threat(g)}
                           for g in data["groups"]],
            "clean_split": [{**g, "clean": acc(g["clean"])} for g in data.get("split", [])],
            "curves": data.get("curves", []),
            "references": data["references"],
            "advice": check_advice(data)}


def environment() -> jinja2.Environment:
    from benchkit.plugins import get_plugin_manager

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)),
                             autoescape=jinja2.select_autoescape(["html", "xml"]), undefined=jinja2.StrictUndefined)
    env.filters["acc"] = _fmt
    env.filters["ci"] = ci_text
    env.globals.update(published=published, reference_name=reference_name, verdict_text=verdict_text,
                       gradient_note=gradient_note, threat_text=threat_text, badges=badges, memory_lines=memory_lines,
                       checks_cost=checks_cost)
    env.filters["chart"] = lambda c: markupsafe.Markup(plots.line_chart(
        c["series"], title=c["title"], x_label=c["x_label"], y_label="accuracy (%)", y_range=(0, 100)))
    env.filters["png_uri"] = lambda b: "data:image/png;base64," + base64.b64encode(b).decode()
    env.filters["tojson_pretty"] = lambda v: json.dumps(v, indent=2, sort_keys=True, default=str)
    get_plugin_manager().hook.prepare_jinja2_environment(env=env)
    return env


def render_html(data: dict, path: Path) -> Path:
    page = environment().get_template("leaderboard.html").render(data=data, escape=html.escape)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page)
    return path
