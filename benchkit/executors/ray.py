"""Run the runner's tasks on a Ray cluster; the driver alone writes the store.

`ray.init()` joins the cluster named by RAY_ADDRESS (Ray's own convention) or starts a local one.
Each task gets one GPU when the run's device is cuda. A worker resolves the suite and builds its
models once (cached by suite hash and device) and runs `benchkit.runner.execute`, the same function
the local executor runs, so the numbers are identical. A task whose worker dies is retried
(RETRIES times); an exception inside a task comes back as the runner's `Failed`, never retried.
"""
from __future__ import annotations

import importlib.util
import os

import torch

from benchkit.errors import BadInput
from benchkit.evaluate import one_line
from benchkit.resolve import Components, ResolvedSuite, resolve
from benchkit.runner import Failed, Task, execute
from benchkit.suite import Suite, resolved_dict, stable_hash

RETRIES = 3
# What a worker must see as the driver does: where assets live, which plugins load, thread count.
FORWARDED_ENV = ("BENCHKIT_HOME", "BENCHKIT_LOAD_PLUGINS", "BENCHKIT_DISABLE_PLUGINS", "PYTHONPATH", "OMP_NUM_THREADS")
INSTALL_HINT = "pip install -e '.[ray]'"

# ---------------------------------------------------------------- worker side

_SESSION: dict[tuple[str, str], tuple[ResolvedSuite, Components]] = {}


def _session(suite_json: dict, path: str, device: str) -> tuple[ResolvedSuite, Components]:
    key = (stable_hash(suite_json), device)
    if key not in _SESSION:
        _SESSION.clear()  # one suite per worker at a time: models are large
        resolved = resolve(Suite.model_validate(suite_json), path)
        _SESSION[key] = (resolved, resolved.build(torch.device(device)))
    return _SESSION[key]


def ray_task(suite_json: dict, path: str, device: str, task: Task):
    try:
        resolved, comps = _session(suite_json, path, device)
    except BadInput as exc:  # e.g. a checkpoint missing on this node
        return Failed(f"worker cannot build the suite: {'; '.join(exc.problems)}")
    return execute(task, resolved, comps)


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


def cluster_device(flag: str | None, suite_device: str | None) -> torch.device:
    """The device tasks run on: --device if given, else the suite's eval.device, else auto (cuda
    when the cluster has a GPU, else cpu; the driver's own hardware does not matter). Each task
    is given one GPU, which Ray makes its only visible one, so a CUDA index is dropped: 'cuda:1'
    would not exist on the worker."""
    name = flag or suite_device or "auto"
    if name == "auto":
        return torch.device("cuda" if connect(torch.device("cpu")).cluster_resources().get("GPU", 0) >= 1 else "cpu")
    device = torch.device(name)
    return torch.device("cuda") if device.type == "cuda" else device


def _one_line(exc: BaseException) -> str:
    """The task's own exception where Ray wraps it (RayTaskError.cause), as one line."""
    return one_line(getattr(exc, "cause", None) or exc)


def remote_task(ray, device: torch.device, fn=ray_task):
    """`fn` as a Ray task of one CPU (and one GPU on cuda), retried when its worker dies. max_calls=0
    lets a worker run any number of tasks and so keep the models it built (_SESSION): Ray's default
    for a task declared with a GPU is one task per worker process, which would re-import torch and
    rebuild every model for each shard."""
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    opts = {"num_cpus": 1, "num_gpus": 1 if device.type == "cuda" else 0, "max_retries": RETRIES,
            "retry_exceptions": False, "runtime_env": {"env_vars": env}}
    return ray.remote(max_calls=0)(fn).options(**opts)


class RayExecutor:
    def __init__(self, resolved: ResolvedSuite, device: torch.device):
        self.ray = ray = connect(device)
        self.fn = remote_task(ray, device)
        self.args = (ray.put(resolved_dict(resolved.suite)), str(resolved.path), str(device))
        self.pending: dict = {}

    def submit(self, task: Task, *, urgent: bool = False) -> None:
        self.pending[self.fn.remote(*self.args, task)] = task

    def cancel(self, cell_key: str) -> None:
        for ref, task in list(self.pending.items()):
            if task.kind == "shard" and task.cell_key == cell_key:
                self.ray.cancel(ref)
                del self.pending[ref]

    def next(self) -> tuple[Task, object] | None:
        ray = self.ray
        while self.pending:
            (ref,), _ = ray.wait(list(self.pending), num_returns=1)
            task = self.pending.pop(ref)
            try:
                return task, ray.get(ref)
            except ray.exceptions.TaskCancelledError:
                continue
            except ray.exceptions.RayTaskError as exc:  # raised outside execute: deterministic, not retried
                return task, Failed(f"task raised {_one_line(exc)}")
            except ray.exceptions.RayError as exc:  # the worker or node was lost RETRIES + 1 times
                return task, Failed(f"task lost after {RETRIES} retries: {_one_line(exc)}")
        return None

    def close(self) -> None:
        for ref in self.pending:
            self.ray.cancel(ref)
        self.pending.clear()
