"""Out-of-memory backoff (benchkit.memory): a batch, an EOT group or an attack's images that run out of
memory are split in half, the run goes on with the same numbers, and the split is recorded.

Out of memory is simulated: a purifier (or an attack) that raises torch.OutOfMemoryError whenever it
is called with more than a cap of rows (images), after drawing its noise, as a real allocation
failure midway through a pass would leave the streams."""
from __future__ import annotations

import json
import sqlite3

import pytest
import torch
from pydantic import Field
from torch import nn

from benchkit import memory
from benchkit.cli import main
from benchkit.defended import DefendedModel, Purifier
from benchkit.evaluate import run_attack, verdicts
from benchkit.hookspecs import hookimpl
from benchkit.noise import PerExampleNoise, derive_seed
from benchkit.params import Params
from benchkit.threat import Linf
from benchkit_attacks.pgd import PGDEOT, PGDParams, norm_threat
from conftest import write


class Capped(Purifier):
    """x + sigma z, raising `error` when called with more than `cap` rows (None: never)."""
    stochastic = True
    gradient_modes = ("exact", "bpda", "none")

    def __init__(self, cap: int | None = None, error: type[Exception] = torch.OutOfMemoryError, sigma: float = 0.3):
        super().__init__()
        self.cap, self.error, self.sigma = cap, error, sigma
        self.calls: list[int] = []   # rows per call

    def _purify(self, x, *, gradient, noise):
        z = noise.randn_like(x)   # drawn first: the retry must not depend on what a failed pass drew
        self.calls.append(x.shape[0])
        if self.cap is not None and x.shape[0] > self.cap:
            raise self.error(f"simulated: {x.shape[0]} rows > {self.cap}")
        return (x + self.sigma * z).clamp(0, 1)


def linear():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 3))


def ce(logits, y):
    return nn.functional.cross_entropy(logits, y, reduction="none")


X = torch.rand(4, 1, 4, 4, generator=torch.Generator().manual_seed(1))
Y = torch.tensor([0, 1, 2, 0])
SEEDS = [derive_seed("oom", i) for i in range(4)]


def pair(cap: int, classifier: nn.Module | None = None, **kw) -> tuple[DefendedModel, DefendedModel]:
    """The same defended model without a cap and with one, each with its own per-image streams."""
    clf = classifier or linear()
    return (DefendedModel(clf, Capped(), **kw).for_images(X, SEEDS),
            DefendedModel(clf, Capped(cap), **kw).for_images(X, SEEDS))


# ------------------------------------------------------------------ what counts as out of memory

def test_out_of_memory_is_the_allocators_error_and_nothing_else():
    assert torch.cuda.OutOfMemoryError is torch.OutOfMemoryError   # torch >= 2.5: one class
    assert memory.is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    try:   # the CPU allocator's real error: far more than any machine has, refused before anything is touched
        torch.empty(2**50, dtype=torch.uint8)
    except RuntimeError as exc:
        cpu = exc
    assert "can't allocate memory" in str(cpu) and memory.is_out_of_memory(cpu)
    assert not memory.is_out_of_memory(RuntimeError("shape mismatch"))
    assert not memory.is_out_of_memory(ValueError("can't allocate memory"))   # only the allocator's RuntimeError


# ------------------------------------------------------------------ the splitting helper

def test_in_halves_splits_what_does_not_fit_and_raises_the_rest():
    tried, splits = [], []

    def run(lo, hi):
        tried.append((lo, hi))
        if hi - lo > 3:
            raise torch.OutOfMemoryError("simulated")
        return list(range(lo, hi))

    pieces = list(memory.in_halves(run, 0, 10, lambda a, b: splits.append((a, b))))
    assert [p for _, _, p in pieces] == [[0, 1, 2], [3, 4], [5, 6, 7], [8, 9]]   # in order, covering
    assert splits == [(10, 5), (5, 3), (5, 3)]
    assert tried[0] == (0, 10)
    # A piece of one unit that does not fit, and any other error, is raised (not split).
    def fail(error):
        def run(lo, hi):
            tried.append((lo, hi))
            raise error
        return run

    tried.clear()
    with pytest.raises(torch.OutOfMemoryError):
        list(memory.in_halves(fail(torch.OutOfMemoryError("x")), 0, 4, lambda a, b: None))
    assert tried == [(0, 4), (0, 2), (0, 1)]
    tried.clear()
    with pytest.raises(ValueError):
        list(memory.in_halves(fail(ValueError("bug")), 0, 4, lambda a, b: None))
    assert tried == [(0, 4)]
    # most() is asked as each piece starts, and split=False never retries.
    pieces = memory.in_halves(lambda lo, hi: None, 0, 5, None, most=lambda: 2)
    assert [(a, b) for a, b, _ in pieces] == [(0, 2), (2, 4), (4, 5)]
    with pytest.raises(torch.OutOfMemoryError):
        list(memory.in_halves(run, 0, 10, None, split=False))


def test_limits_record_and_merge():
    lim = memory.Limits()
    lim.shrink("eot_rows", 64, 32)
    lim.shrink("eot_rows", 32, 16)
    lim.shrink("verify_rows", 8, 4)
    assert lim.eot_rows == 16 and lim.cap("eot_rows", 100) == 16 and lim.cap("attack_images", 7) == 7
    record = lim.take()
    assert record == {"eot_rows": {"from": 64, "to": 16}, "verify_rows": {"from": 8, "to": 4}, "splits": 3}
    assert lim.take() == {} and lim.eot_rows == 16   # the limit stays, the record was taken
    merged = memory.merge(memory.merge({}, record), {"eot_rows": {"from": 16, "to": 8}, "splits": 1})
    assert merged == {"eot_rows": {"from": 64, "to": 8}, "verify_rows": {"from": 8, "to": 4}, "splits": 4}
    assert memory.describe("cnn/dp/pgd", merged) == ("cnn/dp/pgd: out of memory, split 4 times: rows per EOT pass "
                                                     "64 -> 8; rows per verification batch 8 -> 4")


# ------------------------------------------------------------------ EOT groups in the defended model

def test_split_eot_groups_bind_the_same_copies():
    """Purified rows are x + noise exactly: equal draws, copy by copy and row by row."""
    whole = DefendedModel(nn.Flatten(), Capped()).for_images(X, SEEDS)
    capped = DefendedModel(nn.Flatten(), Capped(cap=3)).for_images(X, SEEDS)
    a, b = whole.sample_logits(X, 6), capped.sample_logits(X, 6)
    assert torch.equal(a, b) and not torch.equal(a[0], a[1])   # distinct copies, each bound as unsplit
    # 6 copies of 4 rows (24) -> 12 -> 8 -> one copy, 4 rows -> 2; remembered: no further failures.
    assert capped.limits.eot_rows == 2 and capped.max_batch == 2
    assert capped.limits.take() == {"eot_rows": {"from": 24, "to": 2}, "splits": 4}
    capped.purifier.calls.clear()
    assert torch.equal(whole.sample_logits(X, 6), capped.sample_logits(X, 6))
    assert set(capped.purifier.calls) == {2} and capped.limits.take() == {}
    # A second evaluation of the same images (the streams count evaluations per image) stays aligned.
    assert torch.equal(whole.mean_logits(X, 5), capped.mean_logits(X, 5))


@pytest.mark.parametrize("cap", [8, 3])   # two copies per pass; rows of one copy split
def test_gradients_equal_the_unsplit_ones(cap):
    for average, gradient in [("loss", "exact"), ("logits", "exact"), ("logits", "bpda")]:
        whole, capped = pair(cap, gradient=gradient)
        lw, gw = whole.loss_and_grad(ce, X, Y, 6, average=average)
        lc, gc = capped.loss_and_grad(ce, X, Y, 6, average=average)
        assert torch.allclose(lw, lc, atol=1e-6) and torch.allclose(gw, gc, atol=1e-6), (average, gradient)
        assert gw.abs().sum() > 0 and capped.limits.take()["splits"] >= 1
    whole, capped = pair(cap)
    assert torch.allclose(whole.expectation(ce, X, Y, 5), capped.expectation(ce, X, Y, 5), atol=1e-6)
    assert torch.allclose(whole(X), capped(X), atol=1e-6)


def test_eot_loss_and_grad_splits_copies_but_never_the_rows_of_one():
    def row_loss(model):
        # A loss that needs whole copies of the batch (as plugins' losses may): never sees part of one.
        return lambda xr, noise: ce(model.classifier(model.purifier.purify(xr, gradient="exact", noise=noise)),
                                    Y.repeat(xr.shape[0] // 4))

    whole, capped = pair(8)
    lw, gw = whole.eot_loss_and_grad(row_loss(whole), X, 6)
    lc, gc = capped.eot_loss_and_grad(row_loss(capped), X, 6)
    assert torch.allclose(lw, lc, atol=1e-6) and torch.allclose(gw, gc, atol=1e-6)
    assert capped.limits.take() == {"eot_rows": {"from": 24, "to": 8}, "splits": 2}
    _, tiny = pair(3)
    with pytest.raises(torch.OutOfMemoryError):   # one copy does not fit: the host splits the images
        tiny.eot_loss_and_grad(row_loss(tiny), X, 2)


def test_noise_that_cannot_be_drawn_again_is_not_split():
    """Stateful per-row generators (or the global RNG) would draw other numbers on a retry."""
    model = DefendedModel(linear(), Capped(cap=3))
    with pytest.raises(torch.OutOfMemoryError):
        model.expectation(ce, X, Y, 2, noise=PerExampleNoise(SEEDS))
    assert model.limits.take() == {}


# ------------------------------------------------------------------ the host: verification and attacks

def test_verification_batches_halve_and_keep_each_rows_seed():
    whole, capped = pair(3)
    x = torch.rand(8, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    y = torch.arange(8) % 3
    args = (x, y, list(range(8)), ("seed", "cell"), 3, 8)
    assert verdicts(capped, *args) == verdicts(whole, *args)
    assert capped.limits.take() == {"verify_rows": {"from": 8, "to": 2}, "splits": 2}


class CappedPGD(PGDEOT):
    """pgd-eot that runs out of memory when given more than `images` images (0: never)."""
    def __init__(self, params, images: int = 0):
        super().__init__(params)
        self.images = images

    def run(self, model, x, y, ctx):
        if self.images and x.shape[0] > self.images:
            raise torch.OutOfMemoryError(f"simulated: {x.shape[0]} images > {self.images}")
        return super().run(model, x, y, ctx)


def test_an_attack_out_of_memory_runs_on_halves_of_the_images():
    params = PGDParams(norm="Linf", eps=0.3, steps=3, eot=2)
    x = torch.rand(5, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    y = torch.arange(5) % 3
    out = {}
    for images in (0, 2):
        model = DefendedModel(linear(), Capped())
        ctx = {"device": torch.device("cpu"), "batch_size": 5}
        [(_, x_adv, _, result)] = run_attack(model, CappedPGD(params, images), Linf(0.3), x, y, range(5), ctx, (7, "k"))
        out[images] = x_adv, result, model.limits.take()
    assert torch.equal(out[0][0], out[2][0]) and not torch.equal(out[0][0], x)
    assert out[2][2] == {"attack_images": {"from": 5, "to": 2}, "splits": 2}   # 5 -> 3 + 2 -> 2 + 1 + 2
    assert out[0][2] == {}
    # Stats are per-image means: the halves' weighted by their images.
    assert out[2][1].stats == pytest.approx(out[0][1].stats) and out[0][1].stats


# ------------------------------------------------------------------ end to end

class OOMPlugin:
    @hookimpl
    def register_defenses(self, register):
        class P(Params):
            rows: int = Field(-1, ge=-1, description="rows per call that still fit; -1: any")
            error: str = "oom"

        errors = {"oom": torch.OutOfMemoryError, "value": ValueError}
        register("capped-noise", lambda p: Capped(None if p.rows < 0 else p.rows, errors[p.error], sigma=0.1),
                 params=P, gradient_modes=("exact", "bpda", "none"))

    @hookimpl
    def register_attacks(self, register):
        class P(PGDParams):
            images: int = Field(0, ge=0)

        register("capped-pgd", lambda p: CappedPGD(PGDParams(**p.model_dump(exclude={"images"})), p.images),
                 params=P, threat=norm_threat)


@pytest.fixture
def oom_plugin(plugin_manager):
    from benchkit import registry
    plugin_manager.register(OOMPlugin(), name="oom")
    registry.reset()
    yield plugin_manager
    registry.reset()


SUITE = """
suite: oom
dataset: {plugin: digits, params: {split: test, n: 8}}
classifiers: [{id: cnn, plugin: digits-cnn}]
defenses: [{id: noisy, plugin: capped-noise, params: {rows: ROWS, error: ERROR}}]
attacks: [{id: pgd, plugin: capped-pgd, params: {norm: Linf, eps: 0.3, steps: 2, eot: 3, images: IMAGES}}]
grid: all
eval: {batch_size: 8, repeats: 2}
checks: {enabled: []}
"""


def run_suite(tmp_path, name, rows=-1, images=0, error="oom"):
    text = SUITE.replace("ROWS", str(rows)).replace("IMAGES", str(images)).replace("ERROR", error)
    out = tmp_path / name
    return main(["run", str(write(tmp_path / f"{name}.yaml", text)), "--out", str(out)]), out


def stored(out):
    db = sqlite3.connect(out / "results.sqlite")
    rows = db.execute("SELECT c.key, e.image_index, e.variant, e.label, e.clean_flags, e.adv_flags, e.distance "
                      "FROM examples e JOIN cells c ON c.id = e.cell_id ORDER BY 1, 2, 3").fetchall()
    prov = json.loads(db.execute("SELECT provenance_json FROM runs ORDER BY id DESC").fetchone()[0])
    return rows, prov


def test_a_run_that_runs_out_of_memory_finishes_with_the_same_rows(tmp_path, oom_plugin, one_thread, capsys):
    code, plain = run_suite(tmp_path, "plain")
    assert code == 0
    # Every pass over 3 rows and every attack call over 4 images runs out of memory.
    code, split = run_suite(tmp_path, "split", rows=3, images=4)
    assert code == 0
    (base, base_prov), (rows, prov) = stored(plain), stored(split)
    assert len(rows) == 8 and rows == base   # clean flags, adv flags, distances: all equal
    assert any(r[5] != "11" for r in rows) and any(r[6] > 0 for r in rows)   # the attack did something
    assert "memory_backoff" not in base_prov
    record = prov["memory_backoff"]["cnn/noisy/pgd"]
    assert record["verify_rows"] == {"from": 8, "to": 2}
    assert record["attack_images"] == {"from": 8, "to": 4}
    assert record["eot_rows"]["from"] >= 4 and record["eot_rows"]["to"] <= 3 and record["splits"] >= 4
    capsys.readouterr()
    assert main(["report", str(split), "--html", str(tmp_path / "r.html")]) == 0
    assert "cnn/noisy/pgd: out of memory, split" in capsys.readouterr().out
    assert '<p class="muted memory-backoff">cnn/noisy/pgd: out of memory, split' in (tmp_path / "r.html").read_text()


@pytest.mark.parametrize("rows, error, message", [(3, "value", "ValueError: simulated: 8 rows > 3"),
                                                  (0, "oom", "OutOfMemoryError: simulated: 1 rows > 0")])
def test_other_errors_and_a_single_row_that_does_not_fit_fail_the_cell(tmp_path, oom_plugin, capsys, rows, error,
                                                                       message):
    code, out = run_suite(tmp_path, "o", rows=rows, error=error)
    assert code == 1
    err = capsys.readouterr().err
    line = next(ln for ln in err.splitlines() if "cnn/noisy/pgd" in ln)
    assert message in line
    db = sqlite3.connect(out / "results.sqlite")
    [(stored_message,)] = db.execute("SELECT message FROM failures").fetchall()
    assert message in stored_message and "\n" not in stored_message
