"""DiffPure (Nie et al., ICML 2022): diffuse the input to t* (Eq. 3), integrate back to t = 0 (solver.py)."""
from __future__ import annotations

import copy
from typing import Callable, Literal

import torch
from torch import Tensor

from benchkit.defended import Purifier
from benchkit.noise import GLOBAL_NOISE, Noise, PerExampleNoise, derive_seed
from benchkit_diffpure import sde
from benchkit_diffpure.score import ScoreModel
from benchkit_diffpure.solver import DISCRETE_SAMPLERS, SAMPLERS, default_steps, integrate, solver_gradients


def defense_modes(sampler: str) -> tuple[str, ...]:
    """The gradient modes DiffPure implements for a sampler: exact, and adjoint where the solver has
    one (continuous samplers; a discrete ddpm / ddim chain has none). bpda / none come from the host."""
    return tuple(m for m in ("exact", "adjoint") if m in solver_gradients(sampler))


class DiffPure(Purifier):
    """x in [0, 1] -> [-1, 1] -> x(t*) -> reverse solve -> [0, 1] (clamped only if clamp=True: the
    authors classify the unclamped image, and a clamp zeroes the gradient of saturated pixels).

    stochastic is True for every sampler: even vp-ode and ddim (eta 0) start from a noisy x(t*) (Eq. 3);
    ld-sde has no forward diffusion (it starts from the input, Eq. 26) but Langevin noise. Randomness, in
    draw order and all through the host's Noise: one uniform per image for the randomised t* (only if
    t_delta > 0), the Eq. 3 noise, then one [B, ...] increment per noisy step.

    Forward noising (Eq. 3) uses alpha(t*) of the continuous VP-SDE (forward="continuous"), or the
    discrete 1000-step alpha-bar at index t* 1000 - 1 (forward="discrete", as the authors' code for every
    model: runners/diffpure_sde.py); discrete-time score models and the ddpm / ddim samplers always
    use the discrete one (those t* are on the 1/1000 grid).

    Randomised t* (paper Table 13), t* in [t_star - t_delta, t_star + t_delta]:
      per-image  each image draws its own t* ~ U (on the 1/1000 grid where the forward is discrete),
                 used for the forward noise and the reverse solve; all images run in lockstep with
                 N = round((t_star + t_delta)/dt) steps of t*_i/N each (see solver.py), so no image
                 steps coarser than dt and an image's result does not depend on the rest of its batch.
      per-call   the authors' semantics: one integer offset d in [-D, D - 1], D = t_delta 1000 (numpy's
                 randint(-D, D)) per call, for the forward noise only (t* + d/1000); the reverse solve
                 always starts from the nominal t_star. d is drawn from the first row's stream (one
                 uniform drawn per image keeps every image's stream in step), so EOT copies in one call
                 share it, as the authors' batch does.

    Gradient modes: exact (checkpointed backprop), adjoint (torchsde; for vp-ode the ODE adjoint, i.e.
    zero diffusion; not for ddpm / ddim), bpda, none. The score network is frozen: no parameter ever gets
    a gradient.
    """

    stochastic = True
    SURROGATES = ("fewer-steps", "forward-only")
    forward_only = False   # set on the forward-only surrogate (see surrogate)

    def __init__(self, score_model: ScoreModel, sampler: str = "vp-sde", t_star: float = 0.1, t_delta: float = 0.0,
                 dt: float = 1e-3, ld_sigma2: float = 100.0, ld_lambda: float = 0.1, ld_eta: float = 1.0,
                 ddim_eta: float = 0.0, forward: Literal["continuous", "discrete"] = "continuous",
                 clamp: bool = False, t_delta_mode: Literal["per-image", "per-call"] = "per-image"):
        super().__init__()
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
        if not 0.0 <= t_delta < t_star <= 1.0:
            raise ValueError(f"need 0 <= t_delta < t_star <= 1, got t_star={t_star}, t_delta={t_delta}")
        if forward not in ("continuous", "discrete") or t_delta_mode not in ("per-image", "per-call"):
            raise ValueError(f"forward must be continuous|discrete and t_delta_mode per-image|per-call, "
                             f"got {forward!r}, {t_delta_mode!r}")
        if t_delta_mode == "per-call" and t_delta > 0:
            if sampler == "ld-sde":
                raise ValueError("t_delta_mode per-call randomises the forward noise, which ld-sde does not have")
            if abs(t_delta * sde.DISCRETE_STEPS - round(t_delta * sde.DISCRETE_STEPS)) > 1e-6:
                raise ValueError(f"t_delta_mode per-call offsets whole steps of 1/1000 (the authors' integer "
                                 f"t_delta): t_delta={t_delta} is not a multiple of 0.001")
        self.score_model = score_model.requires_grad_(False).eval()
        self.sampler, self.t_star, self.t_delta, self.dt = sampler, t_star, t_delta, dt
        self.clamp, self.t_delta_mode = clamp, t_delta_mode
        self.ld = dict(ld_sigma2=ld_sigma2, ld_lambda=ld_lambda, ld_eta=ld_eta)
        self.ddim_eta = ddim_eta
        # Discrete forward noising, and t* on the 1/1000 grid.
        self.discrete = score_model.discrete_time or forward == "discrete" or sampler in DISCRETE_SAMPLERS
        self.gradient_modes = (*defense_modes(sampler), "bpda", "none")
        t_max = t_star + (t_delta if t_delta_mode == "per-image" else 0.0)
        self.n_steps = default_steps(sampler, t_max, dt)

    def _grid(self, t: Tensor) -> Tensor:
        if not self.discrete:
            return t
        n = sde.DISCRETE_STEPS
        return (torch.round(t * n) / n).clamp_min(1.0 / n)

    def _draw_t_star(self, x: Tensor, noise: Noise) -> tuple[Tensor, Tensor]:
        """(t* of the forward noise, t* the reverse solve starts from), per image."""
        t = torch.full((x.shape[0],), self.t_star, dtype=x.dtype, device=x.device)
        if self.t_delta == 0:
            t = self._grid(t)
            return t, t
        u = noise.rand((x.shape[0],), device=x.device, dtype=x.dtype)
        if self.t_delta_mode == "per-image":
            t = self._grid(t + self.t_delta * (2.0 * u - 1.0))
            return t, t
        d = round(self.t_delta * sde.DISCRETE_STEPS)
        offset = (torch.floor(u[0] * 2 * d) - d).clamp(-d, d - 1)  # uniform on -d..d-1
        t = self._grid(t)
        return t + offset / sde.DISCRETE_STEPS, t

    def _start(self, x: Tensor, noise: Noise) -> tuple[Tensor, Tensor, Tensor]:
        """(centred input, t* of the reverse solve per image, x(t*)); x(t*) is differentiable in x."""
        x_c, t_solve, x_t, _ = self._start_with_noise(x, noise)
        return x_c, t_solve, x_t

    def _alpha(self, t: Tensor) -> Tensor:
        """Eq. 3's alpha at forward times t: the VP-SDE's, or the discrete chain's alpha-bar (the authors'
        tables: RevVPSDE's for the VP samplers, SDEdit's for the ddpm runner's chain)."""
        if not self.discrete:
            return sde.alpha(t)
        linspace = torch.float64 if self.sampler in DISCRETE_SAMPLERS else torch.float32
        return sde.discrete_alpha_bar(t, linspace_dtype=linspace)

    def _start_with_noise(self, x: Tensor, noise: Noise) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """_start's values and the Eq. 3 noise eps (None for ld-sde, which does not diffuse)."""
        t_noise, t_solve = self._draw_t_star(x, noise)
        x_c = sde.to_centered(x)
        if self.sampler == "ld-sde":
            return x_c, t_solve, x_c, None
        eps = noise.randn(tuple(x.shape), device=x.device, dtype=x.dtype)
        return x_c, t_solve, sde.diffuse(x_c, self._alpha(t_noise), eps), eps

    def deviation_pairs(self, x: Tensor, *, noise: Noise, states: int,
                        gradient: str = "exact") -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """What DiffAttack's deviated-reconstruction loss compares (Kang et al. 2023, Eq. 8): the purified
        image ([0, 1]) and, at `states` (at most N) evenly spaced steps k = 0, N/states, ... of the reverse solve,
        (x'_k: the reverse state, x_k: the input diffused forward to the same time with the same Eq. 3
        noise), both centred. Differentiable in x (exact: the solve checkpointed segment by segment)."""
        if self.sampler == "ld-sde" or self.forward_only:
            raise ValueError(f"DiffAttack's deviation needs a forward diffusion and a reverse solve ({self.sampler})")
        if states < 1:
            raise ValueError(f"states must be >= 1, got {states}")
        states = min(states, self.n_steps)   # a short solve compares every state
        x_c, t_star, x_t, eps = self._start_with_noise(x, noise)
        steps = sorted({(self.n_steps * j) // states for j in range(states)})
        out, kept = integrate(self.score_model, x_t, t_star, sampler=self.sampler, n_steps=self.n_steps,
                              gradient=gradient, noise=noise, x_a=x_c, ddim_eta=self.ddim_eta, snapshots_grad=steps,
                              **self.ld)
        if self.sampler in DISCRETE_SAMPLERS:   # state k sits at level grid[k] of the chain
            grid = sde.level_grid(sde.levels_of(t_star), self.n_steps)
            times = [grid[k].to(x.dtype) / sde.DISCRETE_STEPS for k in steps]
        else:
            times = [self._grid(t_star * (1.0 - k / self.n_steps)) if self.discrete else t_star * (1.0 - k / self.n_steps)
                     for k in steps]
        pairs = [(state, sde.diffuse(x_c, self._alpha(t), eps)) for state, t in zip(kept, times)]
        out = sde.from_centered(out)
        return (out.clamp(0.0, 1.0) if self.clamp else out), pairs

    def _solve(self, x_c: Tensor, t_star: Tensor, x_t: Tensor, gradient: str, noise: Noise, **kw):
        return integrate(self.score_model, x_t, t_star, sampler=self.sampler, n_steps=self.n_steps,
                         gradient=gradient, noise=noise, x_a=x_c, ddim_eta=self.ddim_eta, **self.ld, **kw)

    def _purify(self, x: Tensor, *, gradient: str, noise: Noise) -> Tensor:
        x_c, t_star, x_t = self._start(x, noise)
        # forward-only: the diffused input itself (Eq. 3), the reverse solve skipped.
        out = sde.from_centered(x_t if self.forward_only else self._solve(x_c, t_star, x_t, gradient, noise))
        return out.clamp(0.0, 1.0) if self.clamp else out

    def surrogate(self, kind: str, *, steps: int | None = None) -> "DiffPure":
        """A cheaper stand-in for attacks to differentiate (the host still verifies on this defense),
        sharing the score model and drawing its noise in the same order:
          fewer-steps   the same sampler, t* and noise schedule with `steps` solver steps
                        (Lee & Kim 2023's surrogate process); exact gradients through it
          forward-only  the forward noising alone: the classifier sees x(t*) (Eq. 3), no reverse solve
                        (DiffBreak's forward_diff_only gradient mode)"""
        clone = copy.copy(self)   # shares the frozen score network
        if kind == "fewer-steps":
            if steps is None or not 1 <= steps <= self.n_steps:
                raise ValueError(f"fewer-steps surrogate needs 1 <= steps <= {self.n_steps} (this defense's steps), "
                                 f"got {steps}")
            clone.n_steps = steps   # ddpm / ddim: a respaced chain
        elif kind == "forward-only":
            if steps is not None:
                raise ValueError("the forward-only surrogate takes no steps")
            clone.forward_only = True
        else:
            raise ValueError(f"unknown surrogate {kind!r}; expected one of {self.SURROGATES}")
        return clone

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

    def gradient_agreement(self, x: Tensor, seed: int = 0, **kw) -> "GradientAgreement":
        """See `gradient_agreement` below: exact (and adjoint where it applies) against a reference."""
        return gradient_agreement(self._purify, self.gradient_modes, x, seed, **kw)


class GradientAgreement(dict):
    """{gradient mode: cosine with the reference}, plus how the reference was computed (`reference`,
    a phrase), on how many images (`images`) and, per mode, what it was compared with (`against`:
    "exact" where the trusted exact gradient served as the reference), for benchkit.checks'
    gradient-correctness verdict."""

    def __init__(self, cosines: dict[str, float], reference: str, images: int, against: dict[str, str] | None = None):
        super().__init__(cosines)
        self.reference, self.images = reference, images
        self.against = against or {m: "reference" for m in cosines}


# Central differences along random N(0, I) directions with this step per pixel: the directional
# derivative <g, u> is of order |g| while float32 round-off of a 100-step solve (~1e-5 per pixel, summed
# against the random output weights) stays near 1% of it; curvature at 1e-3 per pixel is far smaller.
FD_STEP = 1e-3
# An exact gradient this close to the finite differences serves as the full-gradient reference of the
# other modes (a projected cosine below 1 is a noisy estimate; the full one is not).
EXACT_TRUSTED = 0.99


def gradient_agreement(purify: Callable[..., Tensor], modes: tuple[str, ...], x: Tensor, seed: int = 0, *,
                       reference: Literal["finite-differences", "autograd"] = "finite-differences",
                       directions: int = 8, fd_step: float = FD_STEP) -> GradientAgreement:
    """Cosine similarity between each solver gradient mode's input gradient (exact, adjoint: those in
    `modes`) and a reference's, all with the same noise (per-image seeds), for the loss
    sum_b <v_b, purify(x)_b> with fixed random output weights v.

    reference "finite-differences" (default): the exact gradient's directional derivatives <g_b, u_bj>
    against central differences (L_b(x + h u) - L_b(x - h u))/2h of the no-grad purification along
    `directions` random N(0, I) directions u per image, as the cosine of the two vectors of B *
    directions derivatives: a correct gradient agrees to round-off whatever the directions, a wrong one
    (e.g. the identity through the solver) scores far lower. It costs one no-grad solve of 2 *
    directions * B rows and never keeps a graph, so it fits wherever purification does. Once exact
    agrees (>= EXACT_TRUSTED), adjoint is scored by its full cosine with exact; otherwise by its own
    projected cosine, whose estimate is rough below 1 (about +- sqrt((1 - c^2)/(B directions))).
    reference "autograd": the full gradients against plain autograd through the unrolled solver
    (memory grows with steps x activations: for small problems and tests).

    purify(x, gradient=..., noise=...) is the purifier's _purify (which accepts "autograd")."""
    modes = tuple(m for m in ("exact", "adjoint") if m in modes)
    g = torch.Generator().manual_seed(seed)  # CPU generator: the same directions on every device
    v = torch.randn(tuple(x.shape), generator=g, device="cpu").to(x)
    seeds = [derive_seed("gradient-agreement", seed, i) for i in range(x.shape[0])]
    cos = lambda a, b: float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))
    grads = {}
    for mode in modes + (("autograd",) if reference == "autograd" else ()):
        xr = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            out = purify(xr, gradient=mode, noise=PerExampleNoise(seeds))
            (grads[mode],) = torch.autograd.grad((out * v).sum(), xr)
    if reference == "autograd":
        return GradientAgreement({m: cos(grads[m], grads["autograd"]) for m in modes},
                                 "autograd through the unrolled solver", x.shape[0])

    us = torch.randn((directions, *x.shape), generator=g, device="cpu").to(x)
    with torch.no_grad():  # all 2 * directions perturbed copies in one batch, each row with its image's noise
        xs = torch.cat([x + fd_step * us, x - fd_step * us]).flatten(0, 1)
        out = purify(xs, gradient="none", noise=PerExampleNoise(seeds * 2 * directions))
        plus, minus = (out.view(2, directions, *x.shape) * v).flatten(3).sum(3)
        fd = (plus - minus) / (2 * fd_step)  # [directions, B]
    projected = {m: cos((grads[m] * us).flatten(2).sum(2), fd) for m in modes}
    how = f"central finite differences along {directions} random directions per image"
    if projected.get("exact", 0.0) < EXACT_TRUSTED or len(modes) == 1:
        return GradientAgreement(projected, how, x.shape[0])
    return GradientAgreement({m: projected[m] if m == "exact" else cos(grads[m], grads["exact"]) for m in modes},
                             f"exact vs {how}, {', '.join(m for m in modes if m != 'exact')} vs the exact gradient",
                             x.shape[0], {m: "reference" if m == "exact" else "exact" for m in modes})
