"""The digits split, the zoo's shipped weights and their integrity checks.

Measured numbers (CPU, torch 2.13.0, the shipped weights) are pinned so any change shows up.
"""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from safetensors import safe_open

from benchkit_data.digits import digits_split_indices, load_digits_split
from benchkit_diffpure import sde
from benchkit_zoo import catalog, recipes
from benchkit_zoo.catalog import CATALOG, ZooIntegrityError, load_zoo_model, train_zoo_model

TEST_INDICES_SHA256 = "35bfb87569662852617e271894b7d62dac9e7b7b9a17d5863fa823003a28155e"
CNN_TEST_CORRECT = 445  # of 450
UNET_MSE_T01 = 0.2176  # noise-prediction MSE at t=0.1, test split, noise seed 0
TWEEDIE_CORRECT = 439  # digits-cnn on the one-step Tweedie estimate at t=0.1, noise seed 0


def test_digits_split_is_fixed():
    x_tr, y_tr = load_digits_split("train")
    x_te, y_te = load_digits_split("test")
    assert x_tr.shape == (1347, 1, 8, 8) and x_te.shape == (450, 1, 8, 8)
    assert x_tr.dtype == x_te.dtype == torch.float32
    assert y_tr.dtype == y_te.dtype == torch.int64
    assert float(x_tr.min()) == 0.0 and float(x_tr.max()) == 1.0
    tr, te = digits_split_indices("train"), digits_split_indices("test")
    assert len(np.intersect1d(tr, te)) == 0
    assert np.array_equal(np.sort(np.concatenate([tr, te])), np.arange(1797))
    assert torch.equal(torch.bincount(y_te), torch.full((10,), 45))
    assert torch.bincount(y_tr).min() >= 129
    assert hashlib.sha256(te.astype("<i8").tobytes()).hexdigest() == TEST_INDICES_SHA256
    with pytest.raises(ValueError, match="unknown digits split"):
        load_digits_split("val")


def test_shipped_weights_are_small_and_self_describing():
    for name, entry in CATALOG.items():
        path = catalog.weights_path(name)
        assert path.stat().st_size < 2_000_000
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        assert meta["recipe"] == entry.recipe.__name__ and meta["seed"] == "0"
        assert meta["arch"] == type(entry.builder()).__name__ and "torch" in meta


def test_digits_cnn_clean_accuracy():
    model = load_zoo_model("digits-cnn")
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    x, y = load_digits_split("test")
    correct = int((model(x).argmax(1) == y).sum())
    assert correct == CNN_TEST_CORRECT
    assert correct / 450 >= 0.97


def test_tampered_weights_are_refused(tmp_path):
    src = catalog.weights_path("digits-cnn")
    blob = bytearray(src.read_bytes())
    blob[-1] ^= 0x01  # one bit of one weight: still a valid safetensors file
    (tmp_path / src.name).write_bytes(bytes(blob))
    actual = hashlib.sha256(bytes(blob)).hexdigest()
    with pytest.raises(ZooIntegrityError) as err:
        load_zoo_model("digits-cnn", weights_dir=tmp_path)
    msg = str(err.value)
    assert str(tmp_path / src.name) in msg and CATALOG["digits-cnn"].sha256 in msg and actual in msg


def test_missing_weights_name_the_path_and_the_command(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_zoo_model("digits-unet", weights_dir=tmp_path)
    assert str(tmp_path / "digits_unet.safetensors") in str(err.value)
    assert "benchkit zoo train digits-unet" in str(err.value)


def test_unknown_zoo_model():
    with pytest.raises(KeyError, match="digits-cnn"):
        load_zoo_model("mnist-cnn")


def test_save_weights_is_canonical(tmp_path):
    # safetensors itself orders __metadata__ by hash map; ours must not depend on it.
    model = load_zoo_model("digits-cnn")
    meta = {f"k{i}": str(i) for i in range(8)}
    h1 = recipes.save_weights(model, tmp_path / "a.safetensors", meta)
    h2 = recipes.save_weights(model, tmp_path / "b.safetensors", dict(reversed(list(meta.items()))))
    assert h1 == h2 == hashlib.sha256((tmp_path / "a.safetensors").read_bytes()).hexdigest()
    with safe_open(str(tmp_path / "a.safetensors"), "pt") as f:
        assert f.metadata()["k7"] == "7" and torch.equal(f.get_tensor("fc2.bias"), model.fc2.bias)


def _diffused_test_digits(t: float):
    x, y = load_digits_split("test")
    x0 = sde.to_centered(x)
    z = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    tt = torch.full((len(x0),), t)
    return x0, y, z, tt, sde.diffuse(x0, sde.alpha(tt), z)


def test_digits_unet_denoises_at_small_t():
    model = load_zoo_model("digits-unet")
    _, _, z, t, x_t = _diffused_test_digits(0.1)
    mse = float((model(x_t, t * model.TIME_SCALE) - z).pow(2).mean())
    assert mse == pytest.approx(UNET_MSE_T01, abs=1e-4)  # measured 0.217555
    assert mse < 0.3  # the zero predictor scores 1.0


def test_tweedie_denoise_then_classify():
    unet, cnn = load_zoo_model("digits-unet"), load_zoo_model("digits-cnn")
    _, y, _, t, x_t = _diffused_test_digits(0.1)
    a = sde.alpha(t).view(-1, 1, 1, 1)
    x0_hat = (x_t - (1 - a).sqrt() * unet(x_t, t * unet.TIME_SCALE)) / a.sqrt()
    correct = int((cnn(sde.from_centered(x0_hat).clamp(0, 1)).argmax(1) == y).sum())
    assert correct == TWEEDIE_CORRECT
    assert correct / 450 >= 0.95


@pytest.mark.slow
def test_digits_cnn_recipe_reproduces_shipped_weights(tmp_path):
    # Bit-reproducible on the reference CPU setup (1 thread, deterministic kernels): the
    # retrained file has the shipped sha256, hence the same accuracy.
    path, sha = train_zoo_model("digits-cnn", weights_dir=tmp_path, seed=0)
    assert sha == CATALOG["digits-cnn"].sha256
    model = load_zoo_model("digits-cnn", weights_dir=tmp_path)
    x, y = load_digits_split("test")
    assert int((model(x).argmax(1) == y).sum()) == CNN_TEST_CORRECT


@pytest.mark.slow
def test_digits_unet_recipe_reproduces_shipped_weights(tmp_path):
    # About 5 CPU-minutes (8 wall-minutes measured on a busy 2-core machine).
    _, sha = train_zoo_model("digits-unet", weights_dir=tmp_path, seed=0)
    assert sha == CATALOG["digits-unet"].sha256
