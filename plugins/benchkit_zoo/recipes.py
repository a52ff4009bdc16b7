"""Deterministic training recipes of the zoo's models, and the canonical weights writer.

Every recipe runs on CPU with 1 thread, torch.use_deterministic_algorithms(True), explicit seeded
generators for data order, augmentation and diffusion noise (dropout draws from the global RNG,
seeded too). On one machine and torch build a recipe is bit-reproducible, and `save_weights`
writes byte-identical files for identical weights, so a retrained model has the shipped sha256.
Another CPU (other SIMD kernels) or torch version may round differently.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import struct
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from safetensors.torch import save as st_save
from torch import Tensor, nn

from benchkit_zoo.nets import DigitsCNN, DigitsUNet

# One thread: on a small shared CPU, 2 OpenMP threads ran 4-6x slower (spin-waiting on a busy
# core), and a fixed single thread also keeps reduction order independent of the core count.
NUM_THREADS = 1

# Continuous VP-DSM hyper-parameters of train_digits_unet.
DSM_EPS = 1e-5  # lower end of t, as score_sde's continuous VP training
DSM_SMALL_T = 0.3  # the emphasised range [eps, 0.3] contains DiffPure's t* = 0.1
DSM_SMALL_T_FRACTION = 0.5

# The VP-SDE (Song et al. 2021) digits-unet is trained on, which DiffPure's ContinuousTimeScore
# assumes of every continuous-time score model. A copy of benchkit_diffpure.sde's alpha, op for op:
# the zoo may not import DiffPure, and the shipped weights depend on the rounding
# (tests/test_plugin_isolation.py checks the two agree bit for bit).
VP_BETA_MIN, VP_BETA_MAX = 0.1, 20.0


def vp_alpha(t: Tensor) -> Tensor:
    """alpha(t) = exp(-(beta_min t + (beta_max - beta_min) t^2 / 2)): x_t = sqrt(alpha) x0 + sqrt(1 - alpha) z."""
    return torch.exp(2.0 * (-0.25 * t**2 * (VP_BETA_MAX - VP_BETA_MIN) - 0.5 * t * VP_BETA_MIN))


def load_digits(split: str) -> tuple[Tensor, Tensor]:
    """The data plugin's digits split (images [N,1,8,8] in [0,1], labels), through the host registry:
    the zoo does not import other plugins. Without the data plugin: BadInput naming it."""
    from benchkit import registry

    ds = registry.get("datasets").get("digits").build({"split": split})
    return ds.get(range(len(ds)))


@contextlib.contextmanager
def deterministic(seed: int) -> Iterator[None]:
    """Seed, pin threads and demand deterministic kernels; restore the caller's settings after."""
    prev_threads = torch.get_num_threads()
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_rng = torch.get_rng_state()
    torch.set_num_threads(NUM_THREADS)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_num_threads(prev_threads)
        torch.use_deterministic_algorithms(prev_det)
        torch.set_rng_state(prev_rng)


def _record(model: nn.Module, recipe: str, seed: int, **extra: object) -> nn.Module:
    # save_weights writes this as the file's metadata, so a weights file names its own recipe.
    model.training_info = {"recipe": recipe, "seed": str(seed), **{k: str(v) for k, v in extra.items()}}
    return model


def _shift_augment(x: Tensor, gen: torch.Generator, max_shift: int = 1) -> Tensor:
    """Random translation by up to max_shift pixels per image (zero fill): digits vary in position."""
    b = x.shape[0]
    padded = F.pad(x, (max_shift,) * 4)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=gen)
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=gen)
    h, w = x.shape[-2:]
    rows = dy[:, None] + torch.arange(h)[None]  # [B, H]
    cols = dx[:, None] + torch.arange(w)[None]  # [B, W]
    bidx = torch.arange(b)[:, None, None]
    return padded[bidx, 0, rows[:, :, None], cols[:, None, :]].unsqueeze(1)


def train_digits_cnn(seed: int = 0, epochs: int = 40, batch_size: int = 64, lr: float = 1e-3) -> nn.Module:
    """Standard (non-adversarial) training of DigitsCNN on the digits train split.

    Adam with a cosine learning-rate decay, +-1 pixel random shifts. Returns the model in eval mode.
    """
    x, y = load_digits("train")
    with deterministic(seed):
        gen = torch.Generator().manual_seed(seed)
        model = DigitsCNN()
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        steps_per_epoch = -(-len(x) // batch_size)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
        model.train()
        for _ in range(epochs):
            perm = torch.randperm(len(x), generator=gen)
            for i in range(0, len(x), batch_size):
                idx = perm[i : i + batch_size]
                loss = F.cross_entropy(model(_shift_augment(x[idx], gen)), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    model.eval()
    return _record(model, "train_digits_cnn", seed, epochs=epochs, batch_size=batch_size, lr=lr)


def sample_dsm_times(n: int, gen: torch.Generator, small_t_fraction: float = DSM_SMALL_T_FRACTION) -> Tensor:
    """t for DSM: a small_t_fraction share ~ U[eps, 0.3], the rest ~ U[eps, 1].

    Plain U[eps, 1] would spend 70% of the budget on t > 0.3, which DiffPure (t* = 0.1) never
    visits; the mixture still covers all of [eps, 1] so the model is a full VP score model.
    """
    u = torch.rand(n, generator=gen)
    small = torch.rand(n, generator=gen) < small_t_fraction
    hi = torch.where(small, torch.full_like(u, DSM_SMALL_T), torch.ones_like(u))
    return DSM_EPS + u * (hi - DSM_EPS)


def dsm_loss(model: nn.Module, x0: Tensor, t: Tensor, z: Tensor) -> Tensor:
    """Noise-prediction DSM loss mean((eps(x_t, 999 t) - z)^2); the zero predictor scores 1.0.

    Equivalent to Song et al.'s DSM with lambda(t) = std(t)^2, per pixel instead of summed.
    """
    a = vp_alpha(t).view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1.0 - a).sqrt() * z
    return (model(x_t, t * DigitsUNet.TIME_SCALE) - z).pow(2).mean()


def train_digits_unet(
    seed: int = 0,
    steps: int = 4000,
    batch_size: int = 128,
    lr: float = 1e-3,
    warmup: int = 200,
    ema_decay: float = 0.999,
    small_t_fraction: float = DSM_SMALL_T_FRACTION,
    log_every: int = 0,
) -> nn.Module:
    """Continuous VP denoising score matching (Song et al. 2021) of DigitsUNet on the train split.

    x0 = 2 x - 1, t from `sample_dsm_times`, x_t = sqrt(alpha(t)) x0 + sqrt(1 - alpha(t)) z with
    alpha = `vp_alpha`, loss `dsm_loss`. Adam with linear warm-up and cosine decay,
    gradient clipping at 1; the returned model is the EMA of the weights (eval mode).
    """
    x, _ = load_digits("train")
    with deterministic(seed):
        x = 2.0 * x - 1.0  # the diffusion's centred [-1, 1] convention
        gen = torch.Generator().manual_seed(seed)
        model = DigitsUNet()
        ema = copy.deepcopy(model).requires_grad_(False)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt,
            lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1.0 + torch.cos(torch.tensor(torch.pi * s / steps)).item()),
        )
        model.train()
        perm, pos, running = torch.randperm(len(x), generator=gen), 0, 0.0
        for step in range(steps):
            if pos + batch_size > len(x):
                perm, pos = torch.randperm(len(x), generator=gen), 0
            x0 = x[perm[pos : pos + batch_size]]
            pos += batch_size
            t = sample_dsm_times(len(x0), gen, small_t_fraction)
            z = torch.randn(x0.shape, generator=gen)
            loss = dsm_loss(model, x0, t, z)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            with torch.no_grad():
                # Warm-up of the EMA decay so early random weights do not linger in it.
                d = min(ema_decay, (1 + step) / (10 + step))
                for pe, pm in zip(ema.parameters(), model.parameters()):
                    pe.lerp_(pm, 1.0 - d)
            running += loss.item()
            if log_every and (step + 1) % log_every == 0:
                print(f"step {step + 1}: dsm loss {running / log_every:.4f}", flush=True)
                running = 0.0
    ema.eval()
    return _record(
        ema,
        "train_digits_unet",
        seed,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        ema_decay=ema_decay,
        small_t_fraction=small_t_fraction,
    )


def _canonical_safetensors(tensors: dict[str, Tensor], metadata: dict[str, str]) -> bytes:
    """safetensors bytes with a sorted JSON header.

    safetensors writes __metadata__ in hash-map order, which changes from process to process;
    re-serialising the header with sorted keys makes the file (and its sha256) a function of
    the weights and metadata alone. Data offsets are unchanged, so any safetensors reader loads it.
    """
    raw = st_save(tensors, metadata=metadata)
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads the header so tensor data is 8-aligned
    return struct.pack("<Q", len(text)) + text + data


def save_weights(model: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> str:
    """Write model's state dict as safetensors (metadata: recipe, seed, torch version, ...).

    `metadata` defaults to what the recipe recorded on the model. Returns the file's sha256.
    """
    meta = dict(getattr(model, "training_info", {}) if metadata is None else metadata)
    meta["torch"] = torch.__version__
    meta["arch"] = type(model).__name__
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    blob = _canonical_safetensors(tensors, {k: str(v) for k, v in meta.items()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(blob)
    return hashlib.sha256(blob).hexdigest()
