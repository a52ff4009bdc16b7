"""benchmarks/bench_executors.py: the Table 1 estimate against a hand computation from the paper's
figures, the JSON of a tiny local-executor run, and (slow) the same with a local Ray cluster, plus
the Ray executor's task keeping its worker (and so its built models) when it holds a GPU.
No timing is asserted (the machine is shared): only that every time is a positive number."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os

import pytest
import torch

from conftest import ROOT

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs Ray (pip install -e '.[ray]')")

TINY = ["--images", "4", "--steps", "1", "--eot", "1", "--batch", "2", "--overhead-images", "2",
        "--overhead-repeats", "1", "--no-flops", "--gpus", "1,8"]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_executors", ROOT / "benchmarks" / "bench_executors.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_main(bench, argv: list[str]) -> dict:
    """bench.main on a fresh plugin manager, one thread; what it returns is what it prints."""
    from benchkit import plugins

    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("BENCHKIT_LOAD_PLUGINS", raising=False)
        mp.delenv("BENCHKIT_DISABLE_PLUGINS", raising=False)
        mp.setenv("OMP_NUM_THREADS", "1")
        plugins.reset_plugin_manager()
        threads, buf = torch.get_num_threads(), io.StringIO()
        try:
            with contextlib.redirect_stdout(buf):
                out = bench.main(argv)
        finally:
            torch.set_num_threads(threads)
            plugins.reset_plugin_manager()
    assert json.loads(buf.getvalue()) == json.loads(json.dumps(out))
    return out


def test_table1_estimate_by_hand(bench) -> None:
    est = bench.table1_estimate(per_task_s=0.01, startup_s=10.0, gpus=(1, 8, 64),
                                score_flops=37e9, classifier_flops=10e9)
    # Table 14: 10.56 s per image at t* = 0.1 (100 steps of dt = 1e-3), 0.055 s for the classifier alone.
    assert est["steps"] == 100
    assert est["s_per_score_eval"] == pytest.approx(0.10505)
    assert est["s_per_forward"] == pytest.approx(10.56) and est["s_per_gradient"] == pytest.approx(21.12)
    rand, std, verify = (est["per_image"][k] for k in ("autoattack_rand", "autoattack_standard", "verify"))
    assert rand["gradients"] == 4040 and rand["forwards"] == 0                  # 2 attacks x 101 x EOT 20
    assert std["gradients"] == 101 + 9 * 101 + 9 * 100 and std["forwards"] == 9 * 100 + 5000
    assert verify == pytest.approx({"gradients": 0, "forwards": 9, "score_evaluations": 900, "seconds": 95.04})
    assert rand["score_evaluations"] == 4040 * 200 and std["score_evaluations"] == 1910 * 200 + 5900 * 100
    s_image = 5950 * 21.12 + 5909 * 10.56                                       # 188,063.04 s: 52.2 h
    assert est["s_per_image"] == pytest.approx(188_063.04) == s_image
    assert est["split_s"] == pytest.approx(316_800.0)                           # 10,000 x 3 x 10.56
    assert est["gpu_hours"] == pytest.approx((512 * 188_063.04 + 316_800) / 3600)
    # 64 GPUs, one shard of 8 images each; the split in 157 shards; 64 + 157 + 1 tasks, 4 per GPU.
    assert est["hours"]["64"] == pytest.approx((8 * 188_063.04 + 157 * 3 * 10.56 + 4 * 0.01 + 10) / 3600)
    assert est["hours"]["8"] == pytest.approx((64 * 188_063.04 + 1250 * 3 * 10.56 + 21 * 0.01 + 10) / 3600)
    assert est["hours"]["1"] == pytest.approx((512 * 188_063.04 + 10_000 * 3 * 10.56 + 159 * 0.01 + 10) / 3600)
    # Shards of 64: 8 of them, so 64 GPUs finish no sooner than 8 do on the attack.
    assert est["hours_shard_64"]["64"] == pytest.approx((64 * 188_063.04 + 157 * 3 * 10.56 + 3 * 0.01 + 10) / 3600)
    forward = 100 * 37e9 + 10e9
    floor = (5950 * 4 * forward + 5909 * forward) / 15.7e12
    assert est["floor"]["s_per_image"] == pytest.approx(floor)
    assert est["floor"]["batch1_over_floor"] == pytest.approx(188_063.04 / floor)
    k4 = bench.table1_estimate(per_task_s=0.0, startup_s=0.0, evals_per_step=4.0)
    assert k4["s_per_image"] == pytest.approx(5950 * 42.24 + 5909 * 10.56)
    assert "floor" not in k4


@pytest.mark.usefixtures("one_thread")
def test_local_run_json(bench) -> None:
    out = run_main(bench, [*TINY, "--no-ray", "--no-2threads"])
    assert {"config", "legend", "workload", "overhead", "table1_estimate", "contention", "seconds_total", "ok"} <= set(out)
    wl = out["workload"]
    assert wl["tasks"] == {"shards": 4, "checks": 2, "total": 6}                # 2 cells x 2 shards, 1 checks task each
    run = wl["local_1thread"]
    assert run["tasks"] == 6 and run["images"] == 8 and run["wall_s"] > 0
    assert run["images_per_s"] == pytest.approx(8 / run["wall_s"], rel=1e-3)
    assert wl["speedup"] == wl["identical"] == {} and "ray_workers" not in wl and "local_2threads" not in wl
    local = out["overhead"]["local"]
    assert local["shard_1"]["tasks"] == 3 and local["one_shard"]["tasks"] == 2   # 2 images: 2 shards or 1, + checks
    assert local["per_task_s"] == pytest.approx(local["shard_1"]["wall_s"] - local["one_shard"]["wall_s"], abs=1e-3)
    assert out["overhead"]["model_build_s"] > 0 and out["ok"] is True
    est = out["table1_estimate"]
    assert set(est["hours"]) == {"1", "8"} and est["inputs"]["startup_s"] == 0.0
    assert est["inputs"]["per_task_s"] == max(local["per_task_s"], 0.0)
    assert set(est["sensitivity"]["evals_per_step_4"]["hours"]) == {"1", "8"}


@needs_ray
@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_ray_run_json(bench, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))       # Ray writes nothing under the real home
    out = run_main(bench, [*TINY, "--noop-calls", "5", "--no-2threads"])
    wl, overhead = out["workload"], out["overhead"]
    assert wl["identical"] == {"ray_vs_local_1thread": True, "ray_vs_local_overhead_suite": True} and out["ok"] is True
    assert wl["ray_workers"]["tasks"] == 6 and wl["ray_workers"]["workers"] == 2
    assert set(wl["speedup"]) == {"ray_vs_local_1thread", "ray_with_startup_vs_local_1thread"}
    assert overhead["ray_startup_s"] > 0 and overhead["ray_noop"]["roundtrip_s"] > 0
    assert overhead["ray"]["shard_1_cold"]["tasks"] == overhead["ray"]["shard_1"]["tasks"] == 3
    assert out["table1_estimate"]["inputs"]["per_task_s"] == max(overhead["ray"]["per_task_s"], 0.0)


@needs_ray
@pytest.mark.slow
def test_ray_gpu_task_keeps_its_worker(monkeypatch, tmp_path) -> None:
    """A task holding a (logical) GPU runs again in the same worker process, which keeps the models it
    built; Ray's default for GPU tasks would start a fresh process, and rebuild them, for each shard."""
    import ray

    from benchkit.executors.ray import remote_task

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             object_store_memory=128 * 2**20)
    try:
        task = remote_task(ray, torch.device("cuda"), fn=lambda: (os.getpid(), ray.get_gpu_ids()))
        calls = [ray.get(task.remote()) for _ in range(6)]
    finally:
        ray.shutdown()
    assert all(len(gpus) == 1 for _, gpus in calls)                 # each call held one GPU
    assert len({pid for pid, _ in calls}) <= 2                      # at most one process per worker slot
