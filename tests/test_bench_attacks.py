"""benchmarks/bench_attacks.py on 2 digits and 1 step: the JSON it prints, and its network-evaluation
counts against counts derived independently from how the solver and the attacks spend their calls.
No timing is asserted (the machine is shared): only that every time is a positive number."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json

import pytest
import torch

from conftest import ROOT

pytestmark = pytest.mark.usefixtures("one_thread")

B, S, E = 2, 1, 2      # images, attack steps, EOT samples (DiffHammer: N purifications)
N = 10                 # reverse steps of the digits DiffPure: round(t_star / dt) = round(0.1 / 0.01)
ATTACKS = ["pgd-eot-exact", "pgd-eot-fewer-steps-2", "bpda-eot", "diffhammer"]


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_attacks", ROOT / "benchmarks" / "bench_attacks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return load_bench()


@pytest.fixture(scope="module")
def result(bench):
    """One run for the whole module, on a freshly built plugin manager (as conftest's plugin_manager)."""
    from benchkit import plugins

    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("BENCHKIT_LOAD_PLUGINS", raising=False)
        mp.delenv("BENCHKIT_DISABLE_PLUGINS", raising=False)
        plugins.reset_plugin_manager()
        threads, buf = torch.get_num_threads(), io.StringIO()
        try:
            with contextlib.redirect_stdout(buf):
                out = bench.main(["--images", str(B), "--steps", str(S), "--eot", str(E), "--attacks",
                                  ",".join(ATTACKS), "--threads", "1", "--repeats", "2", "--baseline-repeats", "1"])
        finally:
            torch.set_num_threads(threads)
            plugins.reset_plugin_manager()
    assert json.loads(buf.getvalue()) == json.loads(json.dumps(out))   # what main returns is what it prints
    return out


def rows(no_graph: int, graph: int, backward: int) -> dict:
    return {"forward": no_graph + graph, "forward_no_graph": no_graph, "forward_graph": graph, "backward": backward}


def test_json_structure(result) -> None:
    assert (result["images"], result["steps"], result["eot"], result["solver_steps"]) == (B, S, E, N)
    assert result["threads"] == 1 and result["defense"]["score_model"] == "digits-unet"
    assert list(result["attacks"]) == ATTACKS   # the subset, in CONFIGS order
    for key in ("baseline", "baseline_gradient"):
        assert result[key]["seconds"] > 0 and result[key]["seconds_per_image"] > 0
    for name, a in result["attacks"].items():
        assert "error" not in a, (name, a.get("error"))
        assert a["gradient_evaluations"] == S + 1
        assert a["seconds"] > 0 and a["ratio_to_baseline"] > 0 and a["ratio_per_evaluation"] > 0
        assert a["seconds_per_image"] == pytest.approx(a["seconds"] / B)
        assert a["counts_repeatable"] is True
        assert set(a["rows"]) == {"score_net", "classifier"}
        for net, r in a["rows"].items():
            assert r["forward"] == r["forward_no_graph"] + r["forward_graph"]
            assert a["per_image"][net]["forward"] == pytest.approx(r["forward"] / B)
            assert a["per_image_per_evaluation"][net]["backward"] == pytest.approx(r["backward"] / (B * (S + 1)))
        assert a["purification_equivalents"] == pytest.approx(a["rows"]["score_net"]["forward"] / (B * N))
    assert set(result["legend"]) >= {"baseline", "rows", "purification_equivalents"}


def test_baseline_counts(result) -> None:
    # One no-grad purification: N score calls of B rows, then one classification.
    assert result["baseline"]["rows"] == {"score_net": rows(B * N, 0, 0), "classifier": rows(B, 0, 0)}
    # One exact gradient: the checkpointed forward solve (no graph), then in backward each step
    # recomputed with a graph and backpropagated once.
    assert result["baseline_gradient"]["rows"] == {"score_net": rows(B * N, B * N, B * N),
                                                   "classifier": rows(0, B, B)}


def test_pgd_eot_exact_counts(result) -> None:
    # PGD makes S + 1 loss-and-gradient evaluations (the last scores the final iterate), each on E
    # stacked EOT copies of the B images. solver._Checkpointed runs the N steps inside
    # Function.forward (autograd not recording), saves the N input states, and in backward recomputes
    # each step's network call under enable_grad and backpropagates through it once.
    rows_per_solve = (S + 1) * E * B * N
    assert result["attacks"]["pgd-eot-exact"]["rows"] == {
        "score_net": rows(rows_per_solve, rows_per_solve, rows_per_solve),
        "classifier": rows(0, (S + 1) * E * B, (S + 1) * E * B)}


def test_surrogate_and_bpda_counts(result) -> None:
    evals = (S + 1) * E * B
    # The fewer-steps surrogate: the same checkpointed solve with 2 steps, the real defense never called.
    assert result["attacks"]["pgd-eot-fewer-steps-2"]["rows"]["score_net"] == rows(evals * 2, evals * 2, evals * 2)
    # BPDA: a no-grad solve, the identity backward: no score-net graph or backward at all.
    assert result["attacks"]["bpda-eot"]["rows"] == {"score_net": rows(evals * N, 0, 0),
                                                     "classifier": rows(0, evals, evals)}


def test_diffhammer_counts(result) -> None:
    # Per evaluation: E no-grad purifications of the B images (classified with a graph to the purified
    # images), then one grafted exact backward through one purification per image.
    per = S + 1
    assert result["attacks"]["diffhammer"]["rows"] == {
        "score_net": rows(per * (E * B * N + B * N), per * B * N, per * B * N),
        "classifier": rows(0, per * E * B, per * E * B)}


def test_unknown_attack_is_a_usage_error(bench, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        bench.main(["--attacks", "pgd-eot-exact,nope"])
    assert exc.value.code == 2 and "nope" in capsys.readouterr().err
