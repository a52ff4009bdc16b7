"""The README's example defense plugin and its suite, taken from README.md as they stand, validate and
run; the stored verdicts match an independent computation of the classifier on the purified images."""
from __future__ import annotations

import importlib.util
import sqlite3

import numpy as np
import pytest
import torch
from scipy.ndimage import median_filter

from benchkit import registry
from benchkit.cli import main
from benchkit.defended import supported_modes
from benchkit.noise import PerExampleNoise
from conftest import ROOT, write

HEADING = "### Example: a defense plugin"


def readme_blocks() -> dict[str, str]:
    """The fenced blocks (language -> code) between the example's heading and the next heading
    (a '#' line outside a fence: the Python block's comments are not headings)."""
    lines = (ROOT / "README.md").read_text().splitlines()
    assert HEADING in lines, f"README.md lost its '{HEADING}' section"
    blocks: dict[str, list[str]] = {}
    language = None
    for line in lines[lines.index(HEADING) + 1:]:
        if language is None and line.startswith("#"):
            break
        if line.startswith("```"):   # a fence opens (```python) or closes (```)
            language = (line[3:].strip() or "text") if language is None else None
            if language is not None:
                assert language not in blocks, f"two {language} blocks in the README's example"
                blocks[language] = []
        elif language is not None:
            blocks[language].append(line)
    assert set(blocks) == {"python", "yaml"}, f"expected one python and one yaml block, got {sorted(blocks)}"
    return {k: "\n".join(v) + "\n" for k, v in blocks.items()}


def load_module(tmp_path, code: str):
    path = write(tmp_path / "median_defense.py", code)
    spec = importlib.util.spec_from_file_location("median_defense", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def median_blend(x: torch.Tensor, weight: float, clamp: bool = True) -> torch.Tensor:
    """(1 - w) x + w median3x3(x), the median by scipy (edge pixels repeated: mode='nearest')."""
    median = np.stack([[median_filter(ch.numpy(), size=3, mode="nearest") for ch in img] for img in x])
    out = (1 - weight) * x + weight * torch.from_numpy(median)
    return out.clamp(0, 1) if clamp else out


@pytest.fixture
def example(tmp_path, plugin_manager, monkeypatch):
    """The README's module registered as a third-party plugin, and its suite written beside it."""
    blocks = readme_blocks()
    plugin_manager.register(load_module(tmp_path, blocks["python"]), name="median")
    registry.reset()
    monkeypatch.chdir(tmp_path)
    return write(tmp_path / "median_digits.yaml", blocks["yaml"])


def independent_clean_flags(n: int, weight: float) -> np.ndarray:
    """Per image: the digits CNN right on the median-blended test digit."""
    x, y = registry.get("datasets").get("digits").build({"split": "test", "n": n}).get(range(n))
    classifier = registry.get("classifiers").get("digits-cnn").build({}).eval()
    with torch.no_grad():
        return (classifier(median_blend(x, weight)).argmax(1) == y).numpy()


def test_readme_example_plugin_validates_and_runs(example, tmp_path, capsys):
    assert main(["validate", str(example)]) == 0
    assert "ok (2 cells)" in capsys.readouterr().out
    out = tmp_path / "out"
    assert main(["run", str(example), "--out", str(out)]) == 0

    db = sqlite3.connect(out / "results.sqlite")
    rows = db.execute("SELECT c.key, e.image_index, e.clean_flags, e.adv_flags FROM examples e "
                      "JOIN cells c ON c.id = e.cell_id ORDER BY 1, 2").fetchall()
    cells = {}
    for key, index, clean, adv in rows:
        cells.setdefault(key, {})[index] = (clean, adv)
    assert sorted(cells) == ["cnn/median/bpda", "cnn/median/pgd"]

    expected = independent_clean_flags(32, weight=0.5)
    for key, by_image in cells.items():
        assert sorted(by_image) == list(range(32)), key
        # A deterministic defense: one verdict per image ('1' right, '0' wrong), exactly the independent one.
        clean = np.array([by_image[i][0] == "1" for i in range(32)])
        robust = np.array([by_image[i][1] == "1" for i in range(32)])
        assert np.array_equal(clean, expected), key
        assert robust.mean() <= clean.mean(), key
    # The numbers the README quotes: all 32 digits clean, 2 survive PGD (6.25%), 3 survive BPDA (9.38%).
    survivors = {key: sum(adv == "1" for _, adv in by_image.values()) for key, by_image in cells.items()}
    assert expected.sum() == 32 and survivors == {"cnn/median/pgd": 2, "cnn/median/bpda": 3}


def test_readme_example_noise_comes_from_the_host(tmp_path):
    """With sigma > 0 the example is stochastic and draws from the noise it is given: per-image
    seeds reproduce it, and it equals the median blend of x + sigma * that noise's own draw."""
    module = load_module(tmp_path, readme_blocks()["python"])
    purifier = module.MedianBlend(module.MedianParams(weight=0.7, sigma=0.1))
    assert purifier.stochastic and supported_modes(purifier) == ("exact", "bpda", "none")
    x = torch.rand(3, 2, 6, 5, generator=torch.Generator().manual_seed(0))
    out = purifier.purify(x, gradient="none", noise=PerExampleNoise([11, 12, 13]))
    noisy = x + 0.1 * PerExampleNoise([11, 12, 13]).randn_like(x)
    assert torch.allclose(out, median_blend(noisy, 0.7), atol=1e-6)
    assert not torch.allclose(out, purifier.purify(x, gradient="none", noise=PerExampleNoise([21, 22, 23])))
    # exact: autograd through the median; each output pixel left unclamped passes one unit of weight
    # back (0.3 to its own input pixel, 0.7 to the pixel the median selected).
    xr = x.clone().requires_grad_(True)
    purifier.purify(xr, gradient="exact", noise=PerExampleNoise([11, 12, 13])).sum().backward()
    unclamped = median_blend(noisy, 0.7, clamp=False)
    assert float(xr.grad.sum()) == pytest.approx(float(((unclamped > 0) & (unclamped < 1)).sum()), abs=1e-4)
