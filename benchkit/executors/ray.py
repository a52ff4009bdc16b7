"""Run (cell, shard) tasks on a Ray cluster; the driver alone writes the store.

`ray.init()` joins the cluster named by RAY_ADDRESS (Ray's own convention) or starts a local one.
Each task gets one GPU when the run's device is cuda. A worker process builds the suite's components
once (cached by suite hash and device) and evaluates shards with the same per-image seeds as the
local executor, so the numbers are identical to a local run's. A task whose worker dies is retried
(RETRIES times); an invalid example (CellFailure) is a verdict on the cell, not a crash: it is not
retried, the cell's pending shards are cancelled and the failure recorded. The checks of a complete
cell need its models, so they run as a task too; the cross-cell black-box check runs on the driver
from stored numbers.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch

from benchkit import checks
from benchkit.errors import BadInput
from benchkit.evaluate import CellFailure, Components, build_components, evaluate_shard, evaluate_split_shard
from benchkit.executors.local import Plan, Progress, SplitPlan, _black_box_checks, stored_inputs
from benchkit.store import Store
from benchkit.suite import Suite, expand, resolved_dict, stable_hash

RETRIES = 3
# What a worker must see as the driver does: where assets live, which plugins load, thread count.
FORWARDED_ENV = ("BENCHKIT_HOME", "BENCHKIT_LOAD_PLUGINS", "BENCHKIT_DISABLE_PLUGINS", "PYTHONPATH", "OMP_NUM_THREADS")
INSTALL_HINT = "pip install -e '.[ray]'"


@dataclass
class Failed:
    """A shard's CellFailure, returned rather than raised so that Ray does not retry it."""
    message: str


# ---------------------------------------------------------------- worker side

_COMPONENTS: dict[tuple[str, str], tuple[Suite, Components]] = {}


def _components(suite_json: dict, path: str, device: str) -> tuple[Suite, Components]:
    key = (stable_hash(suite_json), device)
    if key not in _COMPONENTS:
        _COMPONENTS.clear()  # one suite per worker at a time: models are large
        suite = Suite.model_validate(suite_json)
        _COMPONENTS[key] = (suite, build_components(suite, path, torch.device(device)))
    return _COMPONENTS[key]


def _cell(suite: Suite, key: str):
    return next(c for c in expand(suite) if c.key == key)


def shard_task(suite_json: dict, path: str, device: str, cell_key: str, indices: list[int]):
    suite, comps = _components(suite_json, path, device)
    try:
        return evaluate_shard(suite, _cell(suite, cell_key), comps, indices)
    except CellFailure as exc:
        return Failed(str(exc))


def split_task(suite_json: dict, path: str, device: str, classifier: str, defense: str, indices: list[int]):
    suite, comps = _components(suite_json, path, device)
    return evaluate_split_shard(suite, classifier, defense, comps, indices)


def checks_task(suite_json: dict, path: str, device: str, cell_key: str, examples: list[dict], shard_stats: list[dict]):
    suite, comps = _components(suite_json, path, device)
    return checks.run_checks(suite, _cell(suite, cell_key), comps, examples, shard_stats)


# ---------------------------------------------------------------- driver side

def import_ray():
    if importlib.util.find_spec("ray") is None:
        raise BadInput(f"--executor ray needs Ray: {INSTALL_HINT}")
    import ray

    return ray


def connect(device: torch.device):
    """Join (or start) the cluster; BadInput if the run's device cannot be served there."""
    ray = import_ray()
    if not ray.is_initialized():
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # else Ray writes an auth token under ~/.ray
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    if device.type == "cuda" and ray.cluster_resources().get("GPU", 0) < 1:
        # Tasks asking for a GPU the cluster does not have would wait forever.
        raise BadInput(f"--device cuda: the Ray cluster ({ray.get_runtime_context().gcs_address}) has no GPU; "
                       "use --device cpu or a cluster with GPUs (RAY_ADDRESS)")
    return ray


def _one_line(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None) or exc
    text = " ".join(str(cause).split())
    return f"{type(cause).__name__}: {text[:300]}"


def run(suite: Suite, plans: list[Plan], comps: Components, store: Store, run_id: int,
        split_plans: list[SplitPlan] = (), *, suite_path: str, device: torch.device) -> list[str]:
    """Same contract as executors.local.run: returns the failure messages."""
    ray = connect(device)
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    opts = {"num_cpus": 1, "num_gpus": 1 if device.type == "cuda" else 0, "max_retries": RETRIES,
            "retry_exceptions": False, "runtime_env": {"env_vars": env}}
    shard_fn, split_fn, checks_fn = (ray.remote(f).options(**opts) for f in (shard_task, split_task, checks_task))
    suite_ref, path, dev = ray.put(resolved_dict(suite)), str(suite_path), str(device)

    pending: dict = {}

    def submit_checks(p: Plan) -> None:
        pending[checks_fn.remote(suite_ref, path, dev, p.cell.key, *stored_inputs(store, p.cell_id))] = ("checks", p, None)

    for p in plans:
        for i in p.todo:
            pending[shard_fn.remote(suite_ref, path, dev, p.cell.key, p.shards[i])] = ("shard", p, i)
        if not p.todo and not store.checks(p.cell_id):
            submit_checks(p)
    for sp in split_plans:
        for i in sp.todo:
            pending[split_fn.remote(suite_ref, path, dev, sp.classifier, sp.defense, sp.shards[i])] = ("split", sp, i)

    left = {p.cell_id: set(p.todo) for p in plans}
    failures: list[str] = []
    progress = Progress(sum(len(p.shards[i]) for p in [*plans, *split_plans] for i in p.todo))
    while pending:
        (ref,), _ = ray.wait(list(pending), num_returns=1)
        kind, p, i = pending.pop(ref)
        try:
            res = ray.get(ref)
        except ray.exceptions.TaskCancelledError:
            continue
        except ray.exceptions.RayTaskError as exc:  # raised in the task: deterministic, not retried
            res = Failed(f"task raised {_one_line(exc)}")
        except ray.exceptions.RayError as exc:  # the worker or node was lost RETRIES + 1 times
            res = Failed(f"task lost after {RETRIES} retries: {_one_line(exc)}")
        if kind == "checks":
            if isinstance(res, Failed):
                res = [checks.CheckResult("checks", "fail", f"checks could not run: {res.message}")]
            store.save_checks(p.cell_id, run_id, res)
        elif kind == "split":
            if isinstance(res, Failed):
                failures.append(f"{p.key} (standard accuracy, whole split): {res.message}")
                continue
            store.commit_split_shard(p.group_id, i, run_id, res.rows, res.seconds)
            progress.update(len(p.shards[i]), f"{p.key} (standard, whole split)")
        elif isinstance(res, Failed):
            msg = f"attack {p.cell.attack.id} on images {p.shards[i][0]}..{p.shards[i][-1]}: {res.message}"
            store.record_failure(p.cell_id, run_id, i, msg)
            failures.append(f"{p.cell.key}: {msg}")
            for other, (k, q, _) in list(pending.items()):  # the cell cannot be trusted: stop its other shards
                if k == "shard" and q is p:
                    ray.cancel(other)
                    del pending[other]
        else:
            store.commit_shard(p.cell_id, i, run_id, p.shards[i][0], res.rows, res.seconds, res.stats, res.samples)
            progress.update(len(p.shards[i]), p.cell.key)
            left[p.cell_id].discard(i)
            if not left[p.cell_id]:
                submit_checks(p)
    progress.close()
    _black_box_checks(plans, store, run_id)
    return failures
