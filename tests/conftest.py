"""Shared fixtures: a fresh plugin manager per test and paths to ../shared reference data."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# Tests never read or write the user's BENCHKIT_HOME (checkpoints, the digest cache): a test that
# needs files there sets its own; the rest share this empty one.
os.environ["BENCHKIT_HOME"] = tempfile.mkdtemp(prefix="benchkit-tests-home-")


def needs_shared(path: Path) -> list:
    """Marks for tests that read reference data from ../shared (never copied into the repo): the
    `shared` marker (`pytest -m shared` selects them) and a skip that says what is missing."""
    return [pytest.mark.shared, pytest.mark.skipif(not path.exists(), reason=f"{path} not found: these tests read "
                                                   "../shared beside the checkout (reference data, not copied here)")]


@pytest.fixture
def one_thread():
    """One intra-op thread for modules of many tiny ops: on a shared 2-core machine a second
    thread only adds synchronisation (measured up to 25x slower)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture
def plugin_manager(monkeypatch):
    """The host's plugin manager, rebuilt for this test; plugins registered on it are forgotten after."""
    from benchkit import plugins

    monkeypatch.delenv("BENCHKIT_LOAD_PLUGINS", raising=False)
    monkeypatch.delenv("BENCHKIT_DISABLE_PLUGINS", raising=False)
    plugins.reset_plugin_manager()
    yield plugins.get_plugin_manager()
    plugins.reset_plugin_manager()


@pytest.fixture
def standin_weights(monkeypatch):
    """Random weights saved under a published file name (resnet50-0676ba61.pth) test the loading code;
    their sha256 cannot match the prefix the name carries, so that check (tested on its own in
    test_weights_integrity) is off for the test."""
    from benchkit.assets import Asset

    monkeypatch.setattr(Asset, "_verify_digest", lambda self, path: None)


def randomize_bn(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial batch-norm statistics (random weights alone leave mean 0 / var 1), eval mode."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


# The smallest runnable suite: 4 digits, the undefended CNN, a 2-step PGD, one repeat, no checks.
TINY_SUITE = """
suite: tiny
dataset: {plugin: digits, params: {split: test, n: 4}}
classifiers: [{id: cnn, plugin: digits-cnn}]
defenses: [{id: none, plugin: identity}]
attacks: [{id: pgd, plugin: pgd-eot, params: {norm: Linf, eps: 0.3, steps: 2, eot: 1}}]
grid: all
eval: {batch_size: 4, repeats: 1}
checks: {enabled: []}
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
