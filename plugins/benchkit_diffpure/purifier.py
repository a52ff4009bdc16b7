"""DiffPure (Nie et al., ICML 2022): diffuse the input to t* (Eq. 3), integrate back to t = 0 (solver.py)."""
from __future__ import annotations

import torch
from torch import Tensor

from benchkit.defended import Purifier
from benchkit.noise import GLOBAL_NOISE, Noise, PerExampleNoise, derive_seed
from benchkit_diffpure import sde
from benchkit_diffpure.score import ScoreModel
from benchkit_diffpure.solver import SAMPLERS, integrate


class DiffPure(Purifier):
    """x in [0, 1] -> [-1, 1] -> x(t*) -> reverse solve -> [0, 1] (clamped).

    stochastic is True for every sampler: even vp-ode starts from a noisy x(t*) (Eq. 3); ld-sde has no
    forward diffusion (it starts from the input, Eq. 26) but Langevin noise. Randomness, in draw order and
    all through the host's Noise: per-image t* ~ U[t_star - t_delta, t_star + t_delta] (only if t_delta >
    0), the Eq. 3 noise, then one [B, ...] increment per step. All steps run in lockstep with
    N = round((t_star + t_delta)/dt) steps of t*_i/N each (see solver.py), so no image steps coarser
    than dt and an image's result does not depend on the rest of its batch.

    Gradient modes: exact (checkpointed backprop), adjoint (torchsde; for vp-ode the ODE adjoint, i.e.
    zero diffusion), bpda, none. The score network is frozen: no parameter ever gets a gradient.
    """

    stochastic = True
    gradient_modes = ("exact", "adjoint", "bpda", "none")

    def __init__(self, score_model: ScoreModel, sampler: str = "vp-sde", t_star: float = 0.1, t_delta: float = 0.0,
                 dt: float = 1e-3, ld_sigma2: float = 100.0, ld_lambda: float = 0.1, ld_eta: float = 1.0):
        super().__init__()
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
        if not 0.0 <= t_delta < t_star <= 1.0:
            raise ValueError(f"need 0 <= t_delta < t_star <= 1, got t_star={t_star}, t_delta={t_delta}")
        self.score_model = score_model.requires_grad_(False).eval()
        self.sampler, self.t_star, self.t_delta, self.dt = sampler, t_star, t_delta, dt
        self.ld = dict(ld_sigma2=ld_sigma2, ld_lambda=ld_lambda, ld_eta=ld_eta)
        self.n_steps = max(1, round((t_star + t_delta) / dt))

    def _draw_t_star(self, x: Tensor, noise: Noise) -> Tensor:
        t = torch.full((x.shape[0],), self.t_star, dtype=x.dtype, device=x.device)
        if self.t_delta > 0:
            t = t + self.t_delta * (2.0 * noise.rand((x.shape[0],), device=x.device, dtype=x.dtype) - 1.0)
        if self.score_model.discrete_forward:  # on the 1000-step grid, so Eq. 3 and the solve agree on t*
            n = sde.DISCRETE_STEPS
            t = (torch.round(t * n) / n).clamp_min(1.0 / n)
        return t

    def _start(self, x: Tensor, noise: Noise) -> tuple[Tensor, Tensor, Tensor]:
        """(centred input, t* per image, x(t*)); x(t*) is differentiable in x (reparameterisation)."""
        t_star = self._draw_t_star(x, noise)
        x_c = sde.to_centered(x)
        if self.sampler == "ld-sde":
            return x_c, t_star, x_c
        a = sde.discrete_alpha_bar(t_star.cpu()) if self.score_model.discrete_forward else sde.alpha(t_star)
        eps = noise.randn(tuple(x.shape), device=x.device, dtype=x.dtype)
        return x_c, t_star, sde.diffuse(x_c, a.to(device=x.device, dtype=x.dtype), eps)

    def _solve(self, x_c: Tensor, t_star: Tensor, x_t: Tensor, gradient: str, noise: Noise, **kw):
        return integrate(self.score_model, x_t, t_star, sampler=self.sampler, n_steps=self.n_steps,
                         gradient=gradient, noise=noise, x_a=x_c, **self.ld, **kw)

    def _purify(self, x: Tensor, *, gradient: str, noise: Noise) -> Tensor:
        x_c, t_star, x_t = self._start(x, noise)
        return sde.from_centered(self._solve(x_c, t_star, x_t, gradient, noise)).clamp(0.0, 1.0)

    @torch.no_grad()
    def trajectory(self, x: Tensor, n_frames: int = 4, *, noise: Noise | None = None) -> tuple[Tensor, list[str]]:
        """([n_frames, B, ...] in [0, 1], a label per frame): the input, x(t*), n_frames - 3 evenly
        spaced intermediate states, the purified image (the same draw purify would make with this
        noise). Frames are clamped for display."""
        if n_frames < 3:
            raise ValueError("n_frames >= 3: input, diffused, purified")
        noise = noise or GLOBAL_NOISE
        x_c, t_star, x_t = self._start(x, noise)
        mids = [round(self.n_steps * (i + 1) / (n_frames - 2)) for i in range(n_frames - 3)]
        out, frames = self._solve(x_c, t_star, x_t, "none", noise, snapshots=mids)
        labels = ["input", "diffused (t*)" if self.sampler != "ld-sde" else "start",
                  *(f"step {m}/{self.n_steps}" for m in mids), "purified"]
        return torch.stack([x, *(sde.from_centered(f) for f in (x_t, *frames, out))]).clamp(0.0, 1.0), labels

    def gradient_agreement(self, x: Tensor, seed: int = 0) -> dict[str, float]:
        """Cosine similarity between the input gradients of exact / adjoint and plain autograd through
        the unrolled solver, all with the same noise (for benchkit.checks' gradient-correctness)."""
        g = torch.Generator().manual_seed(seed)
        v = torch.randn(tuple(x.shape), generator=g).to(x)  # a random output direction
        seeds = [derive_seed("gradient-agreement", seed, i) for i in range(x.shape[0])]
        grads = {}
        for mode in ("autograd", "exact", "adjoint"):
            xr = x.detach().clone().requires_grad_(True)
            noise = PerExampleNoise(seeds)
            with torch.enable_grad():
                x_c, t_star, x_t = self._start(xr, noise)
                out = self._solve(x_c, t_star, x_t, mode, noise)
                (grads[mode],) = torch.autograd.grad((out * v).sum(), xr)
        ref = grads["autograd"].flatten()
        return {m: float(torch.nn.functional.cosine_similarity(grads[m].flatten(), ref, dim=0))
                for m in ("exact", "adjoint")}
