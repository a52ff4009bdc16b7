"""Leaderboards from a results store: terminal tables (tabulate), JSON/CSV, and HTML (Jinja2)."""
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

from benchkit import metrics, plots
from benchkit.checks import gradient_note
from benchkit.store import Store

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"


def _fmt(acc: metrics.Accuracy | None, std: bool = True) -> str:
    if acc is None or acc.n == 0:
        return "-"
    return f"{acc.mean:.2f} ± {acc.std:.2f}" if std and acc.repeats > 1 else f"{acc.mean:.2f}"


def collect(store: Store, run_id: int | None = None) -> dict:
    """The rows of a run's leaderboard: every cell of its suite, with what is stored for it."""
    run = store.latest_run() if run_id is None else store.run(run_id)
    if run is None:
        return {"run": None, "rows": [], "references": [], "groups": [], "split": []}
    suite = json.loads(run["suite_json"])
    prov = json.loads(run["provenance_json"])
    cell_ids, cell_n = prov.get("cell_ids", {}), prov.get("cell_n", {})
    rows, split = [], []
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
               "clean": s["clean"] if s else None, "robust": s["robust"] if s else None,
               "attack_verdict": s["attack_verdict"] if s else None,
               "per_variant": s["per_variant"] if s else {}, "failures": failures,
               "checks": [dict(c) | {"numbers": json.loads(c["numbers_json"])} for c in store.checks(cell_id)],
               "seconds": sum(sh["seconds"] for sh in store.shards(cell_id)), "cell_id": cell_id}
        (split if cell["kind"] == "clean" else rows).append(row)
    references = suite.get("references", [])
    for r in rows:
        r["paper"] = matching_reference(references, r)
    data = {"run": dict(run), "suite": suite, "provenance": prov, "rows": rows, "split": split,
            "references": references, "groups": worst_case_groups(store, rows)}
    return data | {"curves": curves(data), "strips": strips(store, rows)}


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
    or attacks (robust accuracy)."""
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
                       "points": [(v, r["robust"].mean) for v, r in cells]}]
            if over == "defenses":
                series.insert(0, {"label": "standard", "points": [(v, r["clean"].mean) for v, r in cells]})
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


def worst_case_groups(store: Store, rows: list[dict]) -> list[dict]:
    """Per (classifier, defense): robust only if an image survives every attack of the suite."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["complete"] and r["n"]:
            groups.setdefault((r["classifier"], r["defense"]), []).append(r)
    out = []
    for (clf, dfn), cells in groups.items():
        if len(cells) < 2:
            continue
        per_cell = [metrics.summarise([e for e in store.examples(r["cell_id"]) if e["image_index"] < r["n_expected"]])
                    for r in cells]
        mats = [c["robust_flags"] for c in per_cell]
        if len({m.shape for m in mats}) != 1:
            continue
        out.append({"classifier": clf, "defense": dfn, "attacks": len(cells),
                    "clean": per_cell[0]["clean"], "robust": metrics.accuracy(metrics.worst_case(mats))})
    return out


def table(data: dict, fmt: str = "table") -> str:
    headers = ["classifier", "defense", "attack", "n", "clean %", "robust %", "robust worst-of-N", "robust majority",
               "attack's verdict %", "published std / robust %", "gradient", "checks"]
    body = []
    for r in data["rows"]:
        failed = [c["name"] for c in r["checks"] if c["status"] == "fail"]
        if r["status"] == "failed":
            flag = "FAILED: " + r["failures"][0]
        elif r["status"] != "done":
            flag = r["status"].upper()
        else:
            flag = ", ".join(f"! {f}" for f in failed) or ("ok" if r["checks"] else "no checks")
        paper = r.get("paper")
        body.append([r["classifier"], r["defense"], r["attack"], f"{r['n']}/{r['n_expected']}", _fmt(r["clean"]),
                     _fmt(r["robust"]), _fmt(r["robust"], False) if r["robust"] is None else f"{r['robust'].worst:.2f}",
                     "-" if r["robust"] is None else f"{r['robust'].majority:.2f}", verdict_text(r.get("attack_verdict")),
                     "" if paper is None else f"{published(paper, 'standard') or '-'} / {published(paper, 'robust') or '-'}",
                     gradient_note(r["checks"]), flag])
    for g in data["groups"]:
        body.append([g["classifier"], g["defense"], f"worst of {g['attacks']} attacks", g["robust"].n, _fmt(g["clean"]),
                     _fmt(g["robust"]), f"{g['robust'].worst:.2f}", f"{g['robust'].majority:.2f}", "", "", "", ""])
    for g in data.get("split", []):
        body.append([g["classifier"], g["defense"], "none (whole split)", f"{g['n']}/{g['n_expected']}", _fmt(g["clean"]),
                     "", "", "", "", "", "", "FAILED: " + g["failures"][0] if g["failures"] else ("" if g["complete"] else g["status"])])
    for ref in data["references"]:
        body.append([*reference_name(ref), "", published(ref, "standard"), published(ref, "robust"), "", "", "", "", "",
                     ref["source"]])
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
            "clean_split": [{**g, "clean": acc(g["clean"])} for g in data.get("split", [])],
            "curves": data.get("curves", []),
            "references": data["references"]}


def environment() -> jinja2.Environment:
    from benchkit.plugins import get_plugin_manager

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)),
                             autoescape=jinja2.select_autoescape(["html", "xml"]), undefined=jinja2.StrictUndefined)
    env.filters["acc"] = _fmt
    env.globals.update(published=published, reference_name=reference_name, verdict_text=verdict_text,
                       gradient_note=gradient_note)
    env.filters["chart"] = lambda c: markupsafe.Markup(plots.line_chart(
        c["series"], title=c["title"], x_label=c["x_label"], y_label="accuracy (%)", y_range=(0, 100)))
    env.filters["png_uri"] = lambda b: "data:image/png;base64," + base64.b64encode(b).decode()
    env.filters["tojson_pretty"] = lambda v: json.dumps(v, indent=2, sort_keys=True, default=str)
    get_plugin_manager().hook.prepare_jinja2_environment(env=env)
    return env


def render_html(data: dict, path: Path) -> Path:
    page = environment().get_template("leaderboard.html").render(data=data, escape=html.escape)
    path.write_text(page)
    return path


# ------------------------------------------------------------------ index across runs

def index(parent: Path) -> dict:
    """Every run folder (results.sqlite) under parent: its latest run's summary, and, for suites
    run with several seeds into different folders, each complete cell's robust accuracy as mean ±
    sample std (ddof=1) across seeds (one run per seed: the most recent)."""
    import numpy as np

    runs = []
    for db in sorted(Path(parent).rglob("results.sqlite")):
        store = Store(db)
        try:
            data = collect(store)
        finally:
            store.close()
        if data["run"] is None:
            continue
        robust = {r["key"]: r["robust"].mean for r in data["rows"] if r["complete"] and r["robust"] is not None and r["n"]}
        best = max(robust.items(), key=lambda kv: kv[1], default=None)
        runs.append({"dir": db.parent, "suite": data["run"]["suite_name"], "seed": data["suite"].get("seed"),
                     "started": data["run"]["started"], "status": data["run"]["status"], "cells": len(data["rows"]),
                     "best": best and {"key": best[0], "robust": best[1]}, "robust": robust,
                     "page": db.parent / "leaderboard.html" if (db.parent / "leaderboard.html").is_file() else None})
    by_suite: dict[str, dict] = {}
    for r in sorted(runs, key=lambda r: r["started"]):
        by_suite.setdefault(r["suite"], {})[r["seed"]] = r   # later runs of a seed replace earlier ones
    seeds = []
    for suite, per_seed in by_suite.items():
        if len(per_seed) < 2:
            continue
        per_seed = dict(sorted(per_seed.items()))
        keys = dict.fromkeys(k for r in per_seed.values() for k in r["robust"])
        cells = []
        for key in keys:
            values = [r["robust"][key] for r in per_seed.values() if key in r["robust"]]
            if len(values) >= 2:
                cells.append({"key": key, "n": len(values), "values": values,
                              "mean": float(np.mean(values)), "std": float(np.std(values, ddof=1))})
        seeds.append({"suite": suite, "seeds": list(per_seed), "cells": cells})
    return {"parent": str(parent), "runs": runs, "seeds": seeds}


def _when(ts: float) -> str:
    import time
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ts))


def index_table(idx: dict, fmt: str = "table") -> str:
    if fmt == "json":
        plain = [{k: (str(v) if isinstance(v, Path) else v) for k, v in r.items()} for r in idx["runs"]]
        return json.dumps({"runs": plain, "seeds": idx["seeds"]}, indent=2)
    rows = [[str(r["dir"]), r["suite"], r["seed"], _when(r["started"]), r["status"], r["cells"],
             "-" if not r["best"] else f"{r['best']['robust']:.2f} ({r['best']['key']})"] for r in idx["runs"]]
    headers = ["folder", "suite", "seed", "started", "status", "cells", "best robust %"]
    seed_rows = [[s["suite"], c["key"], c["n"], f"{c['mean']:.2f} ± {c['std']:.2f}"] for s in idx["seeds"] for c in s["cells"]]
    seed_headers = ["suite", "cell", "seeds", "robust % mean ± std"]
    if fmt == "csv":
        buf = io.StringIO()
        csv.writer(buf).writerows([headers, *rows])
        return buf.getvalue()
    out = tabulate(rows, headers=headers, tablefmt="simple")
    return out + ("\n\n" + tabulate(seed_rows, headers=seed_headers, tablefmt="simple") if seed_rows else "")


def render_index(idx: dict, path: Path) -> Path:
    import os
    from urllib.parse import quote

    link = lambda p: None if p is None else quote(os.path.relpath(p, path.resolve().parent))
    page = environment().get_template("index.html").render(idx=idx, when=_when, link=link)
    path.write_text(page)
    return path
