"""Leaderboards from a results store: terminal tables (tabulate), JSON/CSV, and HTML (Jinja2)."""
from __future__ import annotations

import csv
import html
import io
import json
from pathlib import Path

import jinja2
from tabulate import tabulate

from benchkit import metrics
from benchkit.store import Store

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"


def _fmt(acc: metrics.Accuracy | None, std: bool = True) -> str:
    if acc is None or acc.n == 0:
        return "-"
    return f"{acc.mean:.2f} ± {acc.std:.2f}" if std and acc.repeats > 1 else f"{acc.mean:.2f}"


def collect(store: Store, run_id: int | None = None) -> dict:
    """The rows of a run's leaderboard: every cell of its suite that has stored results."""
    run = store.latest_run() if run_id is None else store.db.execute("SELECT * FROM runs WHERE id=?", (run_id,)).fetchone()
    if run is None:
        return {"run": None, "rows": [], "references": [], "groups": []}
    suite = json.loads(run["suite_json"])
    cell_ids = json.loads(run["provenance_json"]).get("cell_ids", {})
    rows = []
    for key, cell_id in cell_ids.items():
        cell = store.cell(cell_id)
        examples = store.examples(cell_id)
        shards = store.shards(cell_id)
        s = metrics.summarise(examples) if examples else None
        failures = store.failures(cell_id)
        complete = len(shards) == cell["n_shards"]
        rows.append({
            "key": key, "classifier": cell["classifier"], "defense": cell["defense"], "attack": cell["attack"],
            "n": s["n"] if s else 0, "n_expected": cell["n_images"], "complete": complete,
            "clean": s["clean"] if s else None, "robust": s["robust"] if s else None,
            "per_variant": s["per_variant"] if s else {},
            "checks": [dict(c) | {"numbers": json.loads(c["numbers_json"])} for c in store.checks(cell_id)],
            "failures": [f["message"] for f in failures],
            "status": "failed" if failures and not complete else ("done" if complete else "partial"),
            "seconds": sum(sh["seconds"] for sh in shards),
        })
    return {"run": dict(run), "suite": suite, "provenance": json.loads(run["provenance_json"]),
            "rows": rows, "references": suite.get("references", []), "groups": worst_case_groups(store, rows, cell_ids)}


def worst_case_groups(store: Store, rows: list[dict], cell_ids: dict) -> list[dict]:
    """Per (classifier, defense): robust only if an image survives every attack of the suite."""
    groups: dict[tuple, list[int]] = {}
    for r in rows:
        if r["complete"] and r["n"]:
            groups.setdefault((r["classifier"], r["defense"]), []).append(cell_ids[r["key"]])
    out = []
    for (clf, dfn), ids in groups.items():
        if len(ids) < 2:
            continue
        per_cell = [metrics.summarise(store.examples(i)) for i in ids]
        mats = []
        for i in ids:
            ex = store.examples(i)
            by_var: dict[str, dict[int, str]] = {}
            for e in ex:
                by_var.setdefault(e["variant"], {})[e["image_index"]] = e["adv_flags"]
            images = sorted(next(iter(by_var.values())))
            mats += [metrics.flags_matrix([v[j] for j in images]) for v in by_var.values()]
        if len({m.shape for m in mats}) != 1:
            continue
        out.append({"classifier": clf, "defense": dfn, "attacks": len(ids),
                    "clean": per_cell[0]["clean"], "robust": metrics.accuracy(metrics.worst_case(mats))})
    return out


def table(data: dict, fmt: str = "table") -> str:
    headers = ["classifier", "defense", "attack", "n", "clean %", "robust %", "robust worst-of-N", "robust majority", "checks"]
    body = []
    for r in data["rows"]:
        failed = [c["name"] for c in r["checks"] if c["status"] == "fail"]
        flag = "FAILED: " + r["failures"][0] if r["status"] == "failed" else (", ".join(f"! {f}" for f in failed) or "ok")
        body.append([r["classifier"], r["defense"], r["attack"], f"{r['n']}/{r['n_expected']}", _fmt(r["clean"]),
                     _fmt(r["robust"]), _fmt(r["robust"], False) if r["robust"] is None else f"{r['robust'].worst:.2f}",
                     "-" if r["robust"] is None else f"{r['robust'].majority:.2f}", flag])
    for g in data["groups"]:
        body.append([g["classifier"], g["defense"], f"worst of {g['attacks']} attacks", g["robust"].n, _fmt(g["clean"]),
                     _fmt(g["robust"]), f"{g['robust'].worst:.2f}", f"{g['robust'].majority:.2f}", ""])
    for ref in data["references"]:
        body.append([ref.get("classifier") or "", ref["defense"], f"{ref['attack']} (reference)", "",
                     "" if ref.get("standard") is None else f"{ref['standard']:.2f}",
                     "" if ref.get("robust") is None else f"{ref['robust']:.2f}", "", "", ref["source"]])
    if fmt == "json":
        return json.dumps(as_json(data), indent=2)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(headers)
        w.writerows(body)
        return buf.getvalue()
    return tabulate(body, headers=headers, tablefmt="simple")


def as_json(data: dict) -> dict:
    def acc(a):
        return a.as_dict() if a is not None else None
    return {"run": data["run"] and {k: data["run"][k] for k in ("id", "suite_name", "suite_hash", "status")},
            "cells": [{k: (acc(v) if k in ("clean", "robust") else v) for k, v in r.items() if k != "per_variant"}
                      | {"per_variant": {k: acc(v) for k, v in r["per_variant"].items()}} for r in data["rows"]],
            "worst_case": [{**g, "clean": acc(g["clean"]), "robust": acc(g["robust"])} for g in data["groups"]],
            "references": data["references"]}


def environment() -> jinja2.Environment:
    from benchkit.plugins import get_plugin_manager

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)),
                             autoescape=jinja2.select_autoescape(["html", "xml"]), undefined=jinja2.StrictUndefined)
    env.filters["acc"] = _fmt
    env.filters["tojson_pretty"] = lambda v: json.dumps(v, indent=2, sort_keys=True, default=str)
    get_plugin_manager().hook.prepare_jinja2_environment(env=env)
    return env


def render_html(data: dict, path: Path) -> Path:
    page = environment().get_template("leaderboard.html").render(data=data, escape=html.escape)
    path.write_text(page)
    return path
