"""The index across runs: every run folder under a parent, headlined by each defense's worst case.

A robustness index must not headline the best cell: an image counts as robust for a defense only
if it survives every attack of the suite (the per-image worst case, report.worst_case_groups).
Runs are pooled over seeds only when their resolved suites are equal but for `seed` and were cut
by the same --limit; runs of the same suite name with another configuration are listed apart,
labelled with what differs.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import time
from pathlib import Path
from urllib.parse import quote

import numpy as np
from tabulate import tabulate

from benchkit import metrics, report
from benchkit.errors import BadInput
from benchkit.store import Store
from benchkit.text import printable

ACC_FIELDS = [f.name for f in dataclasses.fields(metrics.Accuracy)]
MAX_DIFF = 3   # differing keys named in a config label; the rest are counted


# ------------------------------------------------------------------ one run

def defense_lines(data: dict) -> list[dict]:
    """Per (classifier, defense) of a run: its worst case over the suite's attacks, or why none.

    status: 'complete' (worst_case set), 'incomplete' (a cell failed or is not fully run: never
    shown as a worst case) or 'incomparable' (complete cells that do not hold the same images and
    repeats, so no per-image worst case exists)."""
    by_defense: dict[tuple[str, str], list[dict]] = {}
    for r in data["rows"]:
        by_defense.setdefault((r["classifier"], r["defense"]), []).append(r)
    groups = {(g["classifier"], g["defense"]): g for g in data["groups"]}
    lines = []
    for (clf, dfn), cells in by_defense.items():
        complete = all(r["complete"] and r["n"] and r["robust"] is not None for r in cells)
        worst = clean = None
        status = "complete" if complete else "incomplete"
        if complete and len(cells) == 1:
            worst, clean = cells[0]["robust"], cells[0]["clean"]
        elif complete:
            g = groups.get((clf, dfn))
            if g is not None and g["attacks"] == len(cells):
                worst, clean = g["robust"], g["clean"]
            else:
                status = "incomparable"
        done = [r for r in cells if r["complete"] and r["robust"] is not None and r["n"]]
        lowest = min(done, key=lambda r: r["robust"].mean, default=None)
        lines.append({"classifier": clf, "defense": dfn, "attacks": len(cells), "status": status,
                      "worst_case": worst, "clean": clean,
                      "lowest": lowest and {"attack": lowest["attack"], "robust": lowest["robust"].mean},
                      "cells": [{"key": r["key"], "attack": r["attack"], "complete": r["complete"],
                                 "robust": r["robust"]} for r in cells]})
    return lines


def limit_text(flag: dict | None) -> str:
    """'limit 16 of 64' for a run --limit cut (flag: report.limit_info), else ''."""
    return "" if flag is None else f"limit {flag['limit']} of {'/'.join(map(str, flag['n_of']))}"


def run_summary(db: Path, parent: Path) -> dict | None:
    """The index's view of a folder's latest run, or None when the store holds no run."""
    store = Store.read_only(db)   # an index only reads: never migrates or locks a run folder
    try:
        data = report.collect(store)
    finally:
        store.close()
    if data["run"] is None:
        return None
    config = {k: v for k, v in data["suite"].items() if k != "seed"}
    run = data["run"]
    return {"dir": db.parent, "folder": os.path.relpath(db.parent, parent), "suite": run["suite_name"],
            "seed": data["suite"].get("seed"), "started": run["started"], "status": run["status"],
            "cells": len(data["rows"]), "limit": data["limit"], "defenses": defense_lines(data),
            "page": db.parent / "leaderboard.html" if (db.parent / "leaderboard.html").is_file() else None,
            # What pools runs as seeds: the resolved suite without its seed, and the --limit
            # (index() groups by it, then drops it: the label says what differs).
            "_config": {"suite": config, "limit": data["provenance"].get("limit")}}


# ------------------------------------------------------------------ pooling by configuration

def _flatten(value, path: str = "") -> dict[str, object]:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out |= _flatten(v, f"{path}.{k}" if path else str(k))
        return out
    if isinstance(value, list):
        out = {}
        for i, v in enumerate(value):
            out |= _flatten(v, f"{path}[{i}]")
        return out or {path: []}
    return {path: value}


def config_diffs(configs: list[dict]) -> list[str]:
    """For configs of one suite name: per config, its values of the keys on which they differ."""
    flat = [_flatten(c["suite"]) | {"--limit": c["limit"]} for c in configs]
    keys = sorted({k for f in flat for k in f}, key=lambda k: (k == "--limit", k))
    differ = [k for k in keys if len({json.dumps(f.get(k, "unset"), sort_keys=True) for f in flat}) > 1]
    out = []
    for f in flat:
        parts = [f"{k} {'unset' if k not in f else ('none' if f[k] is None else f[k])}" for k in differ[:MAX_DIFF]]
        if len(differ) > MAX_DIFF:
            parts.append(f"+{len(differ) - MAX_DIFF} more")
        out.append(", ".join(parts))
    return out


def _stats(values: list[float]) -> dict:
    return {"n": len(values), "values": values, "mean": float(np.mean(values)), "std": float(np.std(values, ddof=1))}


def pool(members: list[dict]) -> dict:
    """Mean ± sample std (ddof=1) across the seeds of one configuration: per complete cell, and per
    defense of its complete worst cases. A value needs at least two seeds."""
    per_seed: dict = {}
    for r in sorted(members, key=lambda r: r["started"]):
        per_seed[r["seed"]] = r   # a later run of a seed replaces the earlier one
    per_seed = dict(sorted(per_seed.items(), key=lambda kv: (kv[0] is None, kv[0])))
    cells, worst = {}, {}
    for seed, r in per_seed.items():
        for d in r["defenses"]:
            who = {"classifier": d["classifier"], "defense": d["defense"]}
            for c in d["cells"]:
                if c["complete"] and c["robust"] is not None and c["robust"].n:
                    x = cells.setdefault(c["key"], {"key": c["key"], **who, "attack": c["attack"],
                                                    "seeds": [], "v": []})
                    x["seeds"].append(seed)
                    x["v"].append(c["robust"].mean)
            if d["worst_case"] is not None:
                x = worst.setdefault(tuple(who.values()), {**who, "attacks": d["attacks"], "seeds": [], "v": []})
                x["seeds"].append(seed)
                x["v"].append(d["worst_case"].mean)

    def finish(rows) -> list[dict]:
        return [{k: v for k, v in x.items() if k != "v"} | _stats(x["v"]) for x in rows if len(x["v"]) >= 2]
    return {"seeds": list(per_seed), "runs": [str(r["dir"]) for r in per_seed.values()],
            "cells": finish(cells.values()), "worst_case": finish(worst.values())}


def index(parent: Path) -> dict:
    """Every run folder (results.sqlite) under parent, its latest run; runs grouped by
    configuration, each group pooled over its seeds."""
    parent = Path(parent)
    runs, skipped = [], []
    for db in sorted(parent.rglob("results.sqlite")):
        try:
            if (summary := run_summary(db, parent)) is not None:
                runs.append(summary)
        except BadInput as exc:   # one unreadable folder is named and left out; the others are indexed
            skipped.extend(exc.problems)
    by_name: dict[str, list[dict]] = {}   # suite name -> its configurations, in order of first appearance
    for r in runs:
        configs = by_name.setdefault(r["suite"], [])
        match = next((c for c in configs if c["config"] == r["_config"]), None)
        if match is None:
            configs.append(match := {"config": r["_config"], "runs": []})
        match["runs"].append(r)
    groups = []
    for name, configs in by_name.items():
        diffs = config_diffs([c["config"] for c in configs]) if len(configs) > 1 else [""]
        for i, (c, diff) in enumerate(zip(configs, diffs), 1):
            label = name if len(configs) == 1 else f"{name} (config {i} of {len(configs)}: {diff})"
            for r in c["runs"]:
                r["config"] = label
            groups.append({"suite": name, "label": label, "diff": diff, "limit": c["config"]["limit"]}
                          | pool(c["runs"]))
    for r in runs:
        del r["_config"]
    return {"parent": str(parent), "runs": runs, "configs": groups, "skipped": skipped}


# ------------------------------------------------------------------ output

def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ts))


def _headline(d: dict) -> list[str]:
    """The worst case, its spread over repeats and its 95% interval over images, as printed."""
    if d["status"] != "complete":
        return [d["status"], "", ""]
    w = d["worst_case"]
    return [f"{w.mean:.2f}", f"{w.std:.2f}" if w.repeats > 1 else "-", f"{w.ci_low:.2f}-{w.ci_high:.2f}"]


def _lowest(d: dict) -> str:
    return "-" if d["lowest"] is None else f"{d['lowest']['attack']} {d['lowest']['robust']:.2f}"


def as_json(idx: dict) -> dict:
    def run(r: dict) -> dict:
        defenses = [d | {"worst_case": report.acc_dict(d["worst_case"]), "clean": report.acc_dict(d["clean"]),
                         "cells": [c | {"robust": report.acc_dict(c["robust"])} for c in d["cells"]]} for d in r["defenses"]]
        return r | {"dir": str(r["dir"]), "page": r["page"] and str(r["page"]), "defenses": defenses,
                    "limit_text": limit_text(r["limit"])}
    return {"parent": idx["parent"], "runs": [run(r) for r in idx["runs"]], "configs": idx["configs"]}


CSV_HEADERS = ["row", "suite", "config", "folder", "seed", "started", "status", "limit", "limit_of", "classifier",
               "defense", "attack", "attacks", "complete", "clean_mean", *(f"robust_{f}" for f in ACC_FIELDS),
               "lowest_attack", "lowest_robust", "seeds", "mean_over_seeds", "std_over_seeds"]


def csv_rows(idx: dict) -> list[dict]:
    """Numeric columns only hold numbers (or nothing). row 'run': a run's worst case for one
    (classifier, defense) over its `attacks` attacks (attack empty), robust_std over repeats;
    row 'pooled': one configuration across `seeds` seeds, per cell (attack set) or per defense's
    worst case (attack empty), mean and sample std over seeds."""
    out = []
    for r in idx["runs"]:
        base = {"row": "run", "suite": r["suite"], "config": r["config"], "folder": r["folder"], "seed": r["seed"],
                "started": _when(r["started"]), "status": r["status"],
                "limit": r["limit"]["limit"] if r["limit"] else "",
                "limit_of": "/".join(map(str, r["limit"]["n_of"])) if r["limit"] else ""}
        for d in r["defenses"]:
            w = d["worst_case"]
            out.append(base | {"classifier": d["classifier"], "defense": d["defense"], "attacks": d["attacks"],
                               "complete": d["status"] == "complete",
                               "clean_mean": "" if d["clean"] is None else d["clean"].mean,
                               "lowest_attack": d["lowest"]["attack"] if d["lowest"] else "",
                               "lowest_robust": d["lowest"]["robust"] if d["lowest"] else ""}
                       | {f"robust_{f}": ("" if w is None else getattr(w, f)) for f in ACC_FIELDS})
    for g in idx["configs"]:
        base = {"row": "pooled", "suite": g["suite"], "config": g["label"],
                "limit": "" if g["limit"] is None else g["limit"]}
        for c in [*g["worst_case"], *g["cells"]]:
            out.append(base | {"classifier": c["classifier"], "defense": c["defense"], "attack": c.get("attack", ""),
                               "attacks": c.get("attacks", 1), "complete": True, "seeds": c["n"],
                               "mean_over_seeds": c["mean"], "std_over_seeds": c["std"]})
    return out


def index_table(idx: dict, fmt: str = "table") -> str:
    """The index in the terminal (two decimals throughout), or as JSON or CSV."""
    if fmt == "json":
        return json.dumps(as_json(idx), indent=2)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=CSV_HEADERS, restval="", lineterminator="\n")   # as report's CSV
        w.writeheader()
        # Text fields come from the stores and their folder names, which anyone may have written.
        w.writerows({k: printable(v) if isinstance(v, str) else v for k, v in rec.items()} for rec in csv_rows(idx))
        return buf.getvalue()
    rows = []
    for r in idx["runs"]:
        head = [r["folder"], r["config"], "-" if r["seed"] is None else str(r["seed"]), _when(r["started"]),
                r["status"] + (f" ({limit_text(r['limit'])})" if r["limit"] else "")]
        if not r["defenses"]:
            rows.append([*head, *["-"] * 7])
        for i, d in enumerate(r["defenses"]):
            # The run's columns only on its first line: one run reads as one block.
            rows.append([*(head if i == 0 else [""] * len(head)), d["classifier"], d["defense"], str(d["attacks"]),
                         *_headline(d), _lowest(d)])
    headers = ["folder", "suite", "seed", "started", "status", "classifier", "defense", "attacks",
               "worst-case robust %", "± repeats", "95% CI images", "lowest single attack %"]
    rows = [[printable(c) for c in row] for row in rows]
    out = printable(f"runs under {idx['parent']}:") + "\n" + tabulate(rows, headers=headers, tablefmt="simple",
                                                                     disable_numparse=True)
    pooled = [[g["label"], ", ".join(map(str, g["seeds"])), f"{c['classifier']}/{c['defense']}",
               f"worst of {c['attacks']}" if "key" not in c else c["attack"], str(c["n"]),
               f"{c['mean']:.2f} ± {c['std']:.2f}", ", ".join(f"{v:.2f}" for v in c["values"])]
              for g in idx["configs"] for c in [*g["worst_case"], *g["cells"]]]
    pooled = [[printable(c) for c in row] for row in pooled]
    if pooled:
        out += "\n\nacross seeds (mean ± sample std, ddof=1; same configuration only):\n" + tabulate(
            pooled, headers=["suite", "seeds", "classifier/defense", "attack", "n seeds", "robust %", "per seed"],
            tablefmt="simple", disable_numparse=True)
    return out


def render_index(idx: dict, path: Path) -> Path:
    """The index page; links to each run's leaderboard.html are relative to the page."""
    link = lambda p: None if p is None else quote(os.path.relpath(p, path.resolve().parent))
    page = report.environment().get_template("index.html").render(idx=idx, when=_when, link=link,
                                                                   limit_text=limit_text)
    path.write_text(page)
    return path
