"""benchmarks/bench_protocol.py on a tiny configuration: it runs both comparisons and reports the keys
the README quotes (no timing assertions)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("pyautoattack")
pytest.importorskip("torchsde")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_protocol  # noqa: E402


def resolve(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d[part]
    return d


def test_protocol_benchmark_reports_both_comparisons(plugin_manager, one_thread, capsys) -> None:
    result = bench_protocol.main(["--images", "2", "--n-iter", "1", "--steps", "1", "--eot", "2", "--dt", "0.05"])
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(result))   # one JSON object
    for name in ("autoattack_rand", "pgd_exact"):
        entry = resolve(result, f"protocol.{name}")
        assert min(entry["speedup"], entry["speedup_cpu"], entry["speedup_per_gradient_row"]) > 0
        for side in ("benchkit", "authors"):
            run = entry[side]
            assert run["seconds_per_image"] == pytest.approx(run["seconds"] / 2)
            assert 0 <= run["robust_accuracy"] <= 100 and run["classifier_rows"]["gradient"] > 0
        assert entry["robust_accuracy_gap"] == abs(entry["benchkit"]["robust_accuracy"]
                                                   - entry["authors"]["robust_accuracy"])
    # The same work on both sides of the PGD comparison: 2 images x 2 EOT samples x (1 step + 1).
    assert resolve(result, "protocol.pgd_exact.benchkit.classifier_rows") == {"gradient": 8, "no_gradient": 0}
    assert resolve(result, "protocol.pgd_exact.authors.classifier_rows") == {"gradient": 8, "no_gradient": 0}
    assert "attack_verdict_robust_accuracy" in resolve(result, "protocol.autoattack_rand.authors")
    settings = result["settings"]
    assert (settings["images"], settings["n_iter"], settings["steps"], settings["eot"]) == (2, 1, 1, 2)
    assert settings["solver_steps"] == 2 and settings["torch"] == torch.__version__
    assert set(result["legend"]) >= {"speedup", "seconds_per_image", "robust_accuracy", "schedule"}


def test_the_authors_model_leaves_benchkits_networks_frozen(plugin_manager, one_thread) -> None:
    classifier, purifier, x, _ = bench_protocol.build(torch.device("cpu"), 2, 0.1, 0.05)
    ref = bench_protocol.AuthorsDiffPure(classifier, purifier.score_model, tuple(x.shape[1:]), 0.1, 0.05, adjoint=True)
    assert all(p.requires_grad for p in ref.parameters())   # the authors' networks stay trainable
    assert not any(p.requires_grad for m in (classifier, purifier) for p in m.parameters())
    assert ref(x).shape == (2, 10)
