"""Verification protocols (single, mean logits, majority) and the attacks' own verdicts (the
paper's): each against an independent computation."""
from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch import Tensor, nn

from benchkit import metrics, provenance, report
from benchkit.attack import AttackResult
from benchkit.defended import DefendedModel, Identity
from benchkit.evaluate import CellFailure, check_result, verdicts
from benchkit.noise import PerExampleNoise, derive_seed
from benchkit.store import Store
from benchkit.suite import Suite, VerdictSpec, resolved_dict
from benchkit.threat import Linf
from test_attacks import GaussianNoise, build, cnn, data, run  # noqa: F401 - fixtures

pytestmark = pytest.mark.usefixtures("one_thread")

GEN = torch.Generator().manual_seed(0)
X = torch.rand(7, 1, 4, 4, generator=GEN)
Y = torch.randint(0, 3, (7,), generator=GEN)


def linear_head() -> nn.Module:
    head = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    with torch.no_grad():
        head[1].weight.copy_(torch.randn(3, 16, generator=torch.Generator().manual_seed(1)))
        head[1].bias.zero_()
    return head.eval()


def by_hand(head: nn.Module, sigma: float, x: Tensor, parts: tuple, indices: list[int], r: int, k: int) -> Tensor:
    """[n, k, classes] logits, one image and one purification at a time, with the seeds the host
    promises: (*parts, index, repeat, 'sample', j)."""
    out = torch.empty(x.shape[0], k, 3)
    with torch.no_grad():
        for n, i in enumerate(indices):
            for j in range(k):
                noise = PerExampleNoise([derive_seed(*parts, i, r, "sample", j)])
                z = noise.randn((1, *x.shape[1:]), device=x.device, dtype=x.dtype)
                out[n, j] = head((x[n:n + 1] + sigma * z).clamp(0, 1))[0]
    return out


@pytest.mark.parametrize("aggregate", ["mean-logits", "majority"])
def test_aggregated_verdicts_equal_a_computation_by_hand(aggregate):
    head, sigma, parts, indices, k = linear_head(), 0.4, (3, "cell", "adv"), [10, 11, 12, 13, 14, 15, 16], 2
    model = DefendedModel(head, GaussianNoise(sigma))
    got = {bs: verdicts(model, X, Y, indices, parts, 3, bs, VerdictSpec(aggregate=aggregate, samples=k))
           for bs in (3, 64)}
    assert got[3] == got[64]          # the batch size never changes a verdict
    ties = 0
    for r in range(3):
        logits = by_hand(head, sigma, X, parts, indices, r, k)
        if aggregate == "mean-logits":
            want = logits.mean(1).argmax(1) == Y
        else:
            votes = torch.nn.functional.one_hot(logits.argmax(2), 3).sum(1)
            true = votes.gather(1, Y[:, None]).squeeze(1)
            others = votes.scatter(1, Y[:, None], -1).amax(1)
            want = true > others          # a tie is not correct
            ties += int((true == others).sum())
        assert [f[r] for f in got[3]] == ["1" if w else "0" for w in want.tolist()]
    if aggregate == "majority":
        assert ties > 0                   # the tie rule was exercised


def test_single_verdicts_keep_one_purification_per_repeat():
    head = linear_head()
    model = DefendedModel(head, GaussianNoise(0.4))
    flags = verdicts(model, X, Y, list(range(7)), (0, "c"), 2, 4)
    for r in range(2):
        noise = PerExampleNoise([derive_seed(0, "c", i, r) for i in range(7)])
        want = model.predict(X, noise=noise) == Y
        assert [f[r] for f in flags] == ["1" if w else "0" for w in want.tolist()]


def test_a_deterministic_defense_gets_one_verdict():
    model = DefendedModel(linear_head(), Identity())
    flags = verdicts(model, X, Y, list(range(7)), (0,), 5, 4, VerdictSpec(aggregate="mean-logits", samples=9))
    assert all(len(f) == 1 for f in flags)


@pytest.mark.parametrize("spec, message", [
    ({"aggregate": "single", "samples": 3}, "takes one purification"),
    ({"aggregate": "mean-logits", "samples": 1}, "needs samples >= 2"),
    ({"aggregate": "vote"}, "Input should be"),
])
def test_verdict_spec_is_validated(spec, message):
    with pytest.raises(ValidationError, match=message):
        VerdictSpec.model_validate(spec)


# ---------------------------------------------------------------- the attack's own verdict


@pytest.mark.parametrize("verdict, rule", [
    (torch.ones(3, dtype=torch.bool), "verdict must be a tensor of 4 booleans"),
    (torch.full((4,), 0.5), "verdict must be a tensor of 4 booleans"),
    ([True] * 4, "verdict must be a tensor of 4 booleans"),
])
def test_a_malformed_attack_verdict_fails_the_cell(verdict, rule):
    x = torch.rand(4, 1, 3, 3)
    with pytest.raises(CellFailure, match=rule):
        check_result(AttackResult(x.clone(), verdict=verdict), x, Linf(0.1))


def test_attack_verdict_is_the_lower_of_the_variants_like_the_paper():
    rows = [{"image_index": i, "variant": v, "clean_flags": "1", "adv_flags": "1", "attack_verdict": c}
            for v, claims in (("rand", [1, 1, 0, 1]), ("standard", [1, 0, 0, 1])) for i, c in enumerate(claims)]
    s = metrics.summarise(rows)
    assert s["attack_verdict"] == {"per_variant": {"rand": 75.0, "standard": 50.0}, "value": 50.0, "n": 4}
    rows[0]["attack_verdict"] = None      # one example without a verdict: no verdict for the cell
    assert metrics.summarise(rows)["attack_verdict"] is None


@pytest.mark.parametrize("average", ["loss", "logits"])
def test_bpda_iterate_verdict_is_any_iterate_broken(cnn, data, average):
    """On a deterministic defense the paper's BPDA verdict is: broken iff some iterate is
    misclassified; a broken image's example is the first such iterate."""
    x, y = data[0][:16], data[1][:16]
    attack = build("bpda-eot", eps=0.15, steps=6, step_size=0.03, eot=2, random_start=False, iterate_samples=3,
                   eot_average=average)
    seen: list[Tensor] = []
    attack.callback = lambda t, x_adv, loss, g: seen.append(x_adv.clone())
    result = run(DefendedModel(cnn, Identity()), attack, x, y)
    with torch.no_grad():
        wrong = torch.stack([cnn(it).argmax(1) != y for it in seen])      # [iterates, images]
    assert len(seen) == 7
    broken = wrong.any(0)
    assert torch.equal(~result.verdict, broken) and 0 < int(broken.sum()) < 16
    first = wrong.float().argmax(0)
    for i in broken.nonzero().flatten().tolist():
        assert torch.equal(result.x_adv[i], seen[int(first[i])][i])
    assert result.stats["iterate_verdict_robust"] == pytest.approx(100 * float((~broken).float().mean()))


def test_bpda_iterate_verdict_on_a_stochastic_defense_only_breaks_what_mean_logits_confirm(cnn, data):
    x, y = data[0][:12], data[1][:12]
    attack = build("bpda-eot", eps=0.2, steps=4, eot=3, random_start=False, iterate_samples=8, eot_average="logits")
    result = run(DefendedModel(cnn, GaussianNoise(0.1)), attack, x, y)
    assert result.verdict.dtype == torch.bool and result.verdict.shape == (12,)
    # Every image found broken was verified on purpose (screen wrong, then 8 purifications wrong).
    assert result.stats["iterate_verifications"] >= int((~result.verdict).sum())


def test_autoattack_verdict_is_its_own_robust_flags(cnn, data):
    """On a deterministic model AutoAttack's verdict is exactly: its returned example is classified
    correctly."""
    from benchkit_autoattack.plugin import AutoAttackParams, AutoAttackSuite

    x, y = data[0][:8], data[1][:8]
    attack = AutoAttackSuite(AutoAttackParams(eps=0.1, versions=["standard"], n_iter=3, n_queries=20))
    _, sub = attack.variants()[0]
    result = run(DefendedModel(cnn, Identity()), sub, x, y, threat=Linf(0.1))
    assert 0 < int(result.verdict.sum()) < 8
    with torch.no_grad():
        assert torch.equal(result.verdict, cnn(result.x_adv).argmax(1) == y)


# ---------------------------------------------------------------- the leaderboard


def test_leaderboard_shows_the_attack_verdict_and_published_numbers_with_their_std(tmp_path):
    store = Store(tmp_path / "results.sqlite")
    suite = resolved_dict(Suite(suite="s", dataset={"plugin": "digits"}, classifiers=[], defenses=[], attacks=[],
                                eval={"repeats": 1}))
    suite["references"] = [
        {"classifier": "c", "defense": "d", "attack": "a", "standard": 89.02, "standard_std": 0.21, "robust": 70.64,
         "robust_std": 0.39, "source": "Table 1, row 'X'"},
        {"label": "Wu et al. 2020 (adv. training)", "classifier": "wrn", "standard": 88.25, "robust": 62.11,
         "source": "Table 1, row 'Wu et al.'"}]
    cell = store.ensure_cell("c/d/a", "h", "attack", "c", "d", "a", {}, ["rand", "standard"], 2, 1)
    prov = provenance.collect(torch.device("cpu"), "h", 0) | {"cell_ids": {"c/d/a": cell}, "cell_n": {"c/d/a": 2}}
    run_id = store.start_run("s", None, "h", suite, prov)
    store.commit_shard(cell, run_id, [(0, "rand", 1, "1", "1", 0.0, 1, None), (1, "rand", 1, "1", "0", 0.0, 0, None),
                                      (0, "standard", 1, "1", "1", 0.0, 1, None), (1, "standard", 1, "1", "1", 0.0, 1, None)],
                       1.0, {})
    data_ = report.collect(store)
    text = report.table(data_)
    row = next(line for line in text.splitlines() if line.startswith("c "))
    assert "50.00" in row and "89.02 ± 0.21 / 70.64 ± 0.39" in row
    assert any("Wu et al. 2020 (adv. training)" in line and "88.25" in line and "62.11" in line for line in text.splitlines())
    path = report.render_html(data_, tmp_path / "leaderboard.html")
    page = path.read_text()
    assert "attack&#39;s verdict" in page or "attack's verdict" in page
    assert "70.64 ± 0.39" in page and "Wu et al. 2020 (adv. training)" in page
