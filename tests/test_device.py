"""Device placement, tested on a CPU-only machine, and the CLI's choice of device.

On a GPU run, a tensor made without `device=` lands on the CPU (torch's default device) while the
images and models sit on the GPU; combining the two raises, and `.numpy()` of a GPU tensor raises.
Nothing has to run on a GPU to catch the first kind: `implicit_device_elsewhere` makes every
tensor constructor called without a device (torch.zeros, torch.ones, torch.tensor of Python data,
torch.randn, ...) put its tensor on the 'meta' device instead, while the run's device is the CPU.
A tensor made without a device and then mixed with the run's tensors now raises here as it would
on a GPU ("Tensor on device meta is not on the expected device cpu"), and so does reading one
back (`float()`, `.tolist()`). The rule the tests enforce: during evaluation, the host and
benchkit's own plugins name the device of every tensor they create (the run's device, or "cpu"
for host-side bookkeeping), and the numbers are exactly those of a plain run.

Third-party code (pyautoattack, torch.optim) creates tensors and then moves them, which is fine on
a GPU, so the suites here use benchkit's own PGD attacks.
"""
from __future__ import annotations

import sqlite3
from contextlib import contextmanager

import pytest
import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from benchkit.cli import best_device, local_device, main
from benchkit.errors import BadInput
from conftest import ROOT, write

try:  # the constructors torch.set_default_device redirects (private, stable since torch 2.0)
    from torch.utils._device import _device_constructors
except ImportError:  # pragma: no cover
    _device_constructors = None


class ImplicitDeviceElsewhere(TorchFunctionMode):
    """Tensor constructors called without a device create on 'meta'. Unlike
    torch.set_default_device('meta'), converting an existing tensor (torch.as_tensor(t),
    torch.tensor(t)) keeps its device, as it does on a real GPU run."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if (func in _device_constructors() and kwargs.get("device") is None
                and not (args and isinstance(args[0], Tensor))):
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


@contextmanager
def implicit_device_elsewhere(monkeypatch):
    """Every task the local executor runs (shards, checks) under ImplicitDeviceElsewhere; building
    the models stays outside it (their parameters are created without a device, then moved)."""
    from benchkit.executors.local import LocalExecutor

    run_task = LocalExecutor.next

    def next_task(self):
        with ImplicitDeviceElsewhere():
            return run_task(self)

    monkeypatch.setattr(LocalExecutor, "next", next_task)
    yield
    monkeypatch.setattr(LocalExecutor, "next", run_task)


needs_constructor_list = pytest.mark.skipif(_device_constructors is None,
                                            reason="torch.utils._device._device_constructors is gone")

SUITE = f"""
suite: devices
include: [{ROOT}/suites/_base/digits.yaml]
dataset: {{plugin: digits, params: {{n: 4}}}}
defenses:
  - {{id: none, plugin: identity}}
  - {{id: diffpure, plugin: diffpure, gradient: exact,
     params: {{score_model: digits-unet, sampler: vp-sde, t_star: 0.1, dt: 0.05}}}}
  - {{id: adjoint, plugin: diffpure, gradient: adjoint,
     params: {{score_model: digits-unet, sampler: vp-sde, t_star: 0.1, t_delta: 0.02, dt: 0.05}}}}
attacks:
  - {{id: pgd, plugin: pgd-eot, params: {{norm: Linf, eps: 0.3, steps: 2, eot: 2}}}}
  - {{id: bpda, plugin: bpda-eot, params: {{eps: 0.3, steps: 2, step_size: 0.1, eot: 2}}}}
grid: all
eval: {{batch_size: 4, repeats: 2, device: cpu}}
checks: {{enabled: [{{checks}}], subset: 4}}
"""
STORED_CHECKS = "robust-le-clean, gradients"
ATTACKING_CHECKS = "attack-undefended, unbounded-budget, eot-convergence"


def stored(out) -> tuple[list, list]:
    db = sqlite3.connect(out / "results.sqlite")
    rows = db.execute("SELECT c.key, e.image_index, e.variant, e.clean_flags, e.adv_flags, e.distance FROM examples e "
                      "JOIN cells c ON c.id = e.cell_id ORDER BY 1, 2, 3").fetchall()
    checks = db.execute("SELECT c.key, k.name, k.status, k.reason FROM checks k JOIN cells c ON c.id = k.cell_id "
                        "ORDER BY 1, 2").fetchall()
    return rows, checks


def run(tmp_path, name: str, checks: str, capsys) -> tuple[list, list]:
    suite = write(tmp_path / f"{name}.yaml", SUITE.replace("{checks}", checks))
    code = main(["run", str(suite), "--out", str(tmp_path / name)])
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    return stored(tmp_path / name)


@needs_constructor_list
def test_cells_need_no_tensor_on_the_implicit_device(tmp_path, plugin_manager, monkeypatch, capsys, one_thread):
    """Shards (clean verdicts, PGD and BPDA with EOT through DiffPure's exact and adjoint
    (torchsde) gradients, random t*, re-evaluation with per-image noise, purification strips) and
    the stored-row checks, with the implicit device elsewhere: the same rows and checks as a plain
    run."""
    plain = run(tmp_path, "plain", STORED_CHECKS, capsys)
    with implicit_device_elsewhere(monkeypatch):
        elsewhere = run(tmp_path, "elsewhere", STORED_CHECKS, capsys)
    assert len(plain[0]) == 3 * 2 * 4 and elsewhere == plain   # defenses x attacks x images
    assert not [c for c in elsewhere[1] if "could not run" in c[3]]


@needs_constructor_list
def test_checks_that_attack_again_need_no_tensor_on_the_implicit_device(tmp_path, plugin_manager, monkeypatch,
                                                                         capsys, one_thread):
    """attack-undefended, unbounded-budget and eot-convergence (checks.robust_flags)."""
    plain = run(tmp_path, "plain", ATTACKING_CHECKS, capsys)
    assert not [c for c in plain[1] if "could not run" in c[3]]
    with implicit_device_elsewhere(monkeypatch):
        elsewhere = run(tmp_path, "elsewhere", ATTACKING_CHECKS, capsys)
    assert [c for c in elsewhere[1] if "could not run" in c[3]] == [] and elsewhere == plain


@needs_constructor_list
def test_the_harness_catches_a_mask_made_without_a_device(one_thread):
    """What the mode is for: a mask made without a device, combined with a tensor on the run's
    device, raises (as CPU and CUDA tensors do) where a plain CPU run would not notice."""
    on_device = torch.tensor([True, False, True], device="cpu")   # stands for the run's device
    mask = torch.ones(3, dtype=torch.bool)
    mask &= on_device                                              # silently fine on a CPU-only run
    with ImplicitDeviceElsewhere(), pytest.raises(RuntimeError, match="not on the expected device"):
        mask = torch.ones(3, dtype=torch.bool)
        mask &= on_device
    with ImplicitDeviceElsewhere():                                # named devices are left alone
        mask = torch.ones(3, dtype=torch.bool, device=on_device.device)
        mask &= on_device
        assert torch.as_tensor(on_device).device == on_device.device


def test_per_example_noise_draws_on_the_cpu_whatever_the_default_device(one_thread):
    """The host's noise comes from CPU generators: a default device set by a user's script
    (torch.set_default_device('cuda') is common) must not move the draw away from its generator."""
    from benchkit.noise import ImageStreams, PerExampleNoise

    want = PerExampleNoise([1, 2]).randn((2, 3), device="cpu", dtype=torch.float32)
    with torch.device("meta"):
        got = PerExampleNoise([1, 2]).randn((2, 3), device="cpu", dtype=torch.float32)
        streams = ImageStreams(torch.zeros(2, 3, device="cpu"), [1, 2])
        streams.bind(streams.open(torch.zeros(2, 3, device="cpu")), range(1))
        drawn = streams.rand((2, 3), device="cpu", dtype=torch.float32)
    assert torch.equal(got, want) and drawn.device.type == "cpu"


def test_tensor_dataset_indexes_on_its_own_device():
    from benchkit.dataset import TensorDataset

    ds = TensorDataset(torch.rand(5, 1, 2, 2), torch.arange(5), name="t")
    with torch.device("meta"):
        x, y = ds.get([4, 0])
    assert y.tolist() == [4, 0] and x.device.type == "cpu"


# ---------------------------------------------------------------- the CLI's device

@pytest.fixture
def no_accelerator(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


def test_auto_picks_cuda_then_mps_then_cpu(monkeypatch, no_accelerator):
    assert best_device() == torch.device("cpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert best_device() == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert best_device() == torch.device("cuda")


def test_device_precedence_flag_then_suite_then_auto(monkeypatch, no_accelerator):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert local_device(None, None) == torch.device("cuda")           # auto
    assert local_device(None, "cpu") == torch.device("cpu")           # the suite's eval.device
    assert local_device("cuda", "cpu") == torch.device("cuda")        # the flag beats the suite
    assert local_device("auto", "cpu") == torch.device("cuda")        # an explicit --device auto too
    assert local_device(None, "auto") == torch.device("cuda")
    with pytest.raises(BadInput, match=r"^eval.device cuda:3: this machine has 1 CUDA device\(s\)$"):
        local_device(None, "cuda:3")


def test_ray_drops_the_cuda_index_and_keeps_explicit_devices():
    from benchkit.executors.ray import cluster_device

    # each Ray task sees only the GPU it was given, as cuda:0
    assert cluster_device("cuda", None) == cluster_device(None, "cuda:1") == torch.device("cuda")
    assert cluster_device("cpu", "cuda") == torch.device("cpu")


QUICK = f"""
suite: quick
include: [{ROOT}/suites/_base/digits.yaml]
dataset: {{plugin: digits, params: {{n: 2}}}}
defenses: [{{id: none, plugin: identity}}]
attacks: [{{id: pgd, plugin: pgd-eot, params: {{norm: Linf, eps: 0.3, steps: 1, eot: 1}}}}]
grid: all
checks: {{enabled: [robust-le-clean]}}
"""


def test_run_names_its_device_and_defaults_to_auto(tmp_path, plugin_manager, capsys, no_accelerator):
    suite = write(tmp_path / "q.yaml", QUICK)
    assert main(["run", str(suite), "--out", str(tmp_path / "o")]) == 0
    header = [line for line in capsys.readouterr().err.splitlines() if line.startswith("benchkit: quick:")]
    assert header == [f"benchkit: quick: 1 cells, 1 shard(s) to compute -> {tmp_path / 'o'} (device: cpu)"]
    assert main(["run", str(suite), "--out", str(tmp_path / "o"), "--device", "auto"]) == 0


def test_missing_cuda_is_refused_in_one_line(tmp_path, plugin_manager, capsys, no_accelerator):
    suite = write(tmp_path / "q.yaml", QUICK)
    assert main(["run", str(suite), "--out", str(tmp_path / "o"), "--device", "cuda"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "benchkit: error: --device cuda: no CUDA device is available on this machine"]
    on_cuda = write(tmp_path / "c.yaml", QUICK + "eval: {device: cuda}\n")
    assert main(["run", str(on_cuda), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "benchkit: error: eval.device cuda: no CUDA device is available on this machine"]
    assert main(["run", str(on_cuda), "--out", str(tmp_path / "o"), "--device", "cpu"]) == 0   # the flag wins


def test_unknown_suite_device_is_refused_at_validate(tmp_path, plugin_manager, capsys):
    suite = write(tmp_path / "t.yaml", QUICK + "eval: {device: 'tpu:7'}\n")
    assert main(["validate", str(suite)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"benchkit: error: {suite}: eval.device: 'tpu:7' is not a device benchkit runs on "
        "(auto, cpu, cuda, cuda:N, mps)"]


def test_purify_defaults_to_auto_and_refuses_missing_cuda(tmp_path, plugin_manager, capsys, no_accelerator):
    import numpy as np

    from benchkit import png

    suite = write(tmp_path / "q.yaml", QUICK)
    (tmp_path / "a.png").write_bytes(png.encode(np.zeros((8, 8), np.uint8)))
    args = ["purify", "--suite", str(suite), "--defense", "none", str(tmp_path / "a.png"), "--out", str(tmp_path / "p")]
    assert main(args) == 0 and main([*args, "--device", "auto"]) == 0
    capsys.readouterr()
    assert main([*args, "--device", "cuda"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "benchkit: error: --device cuda: no CUDA device is available on this machine"]
