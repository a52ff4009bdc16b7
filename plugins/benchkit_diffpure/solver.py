"""Fixed-step reverse-time integration for DiffPure, from t* down to 0.

Samplers (every formula in sde.py):
  vp-sde  reverse VP-SDE (Eq. 4-5), Euler-Maruyama
  vp-ode  probability-flow ODE (Eq. 28), Euler, deterministic
  ld-sde  Langevin dynamics (Eq. 26) on s(x, LD_SCORE_TIME), attracted to the input x_a, started from x_a.
          Horizon t* as in the reference (runners/diffpure_ldsde.py integrates t' over [1 - t*, 1 - 1e-5]),
          with the common `dt` (the reference's LD-SDE uses dt = 1e-2: 10 steps for t* = 0.1).
  ddpm    the discrete DDPM ancestral chain (Ho et al. 2020) with fixedsmall variance, as SDEdit and the
          authors' CelebA-HQ runner (runners/diffpure_ddpm.py): x <- 1/sqrt(alpha_i)(x - beta_i/sqrt(1 -
          abar_i) eps(x, i)) + sqrt(beta_tilde_i) z for i = K-1..0, no noise into the data (i = 0)
  ddim    DDIM (Song et al. 2021) on the same chain, eta = ddim_eta (0: deterministic; 1: ddpm)

Time, continuous samplers. Image i runs N steps on its own grid t_i(s) = t*_i (1 - s/N), s = 0..N (step
h_i = t*_i/N), so a batch with per-image t* runs in lockstep, one network call per step for the whole
batch. The integrand is written per unit of s, a step is x <- x + F(s, x) + G(s) z_s with z_s ~ N(0, I),
and torchsde sees the increasing time s in [0, N] with dt = 1: integer times (exact float arithmetic, no
accumulated steps). This is the reference's t' = 1 - t re-parameterisation normalised per image (s/N =
1 - t/t*). N is chosen by the caller (DiffPure: round((t_bar + delta)/dt), independent of the batch).
A discrete-time network (score.DiscreteTimeScore) gets the step floor(t_i(s) 1000) as the reference
feeds it, computed in integers: floor(K_i (N - s)/N) with K_i = t*_i 1000, so each of K..1 is called
exactly once when N = K (no float floor that skips a step and repeats the next).

Time, discrete samplers. Levels (sde.py): image i goes from level K_i = t*_i 1000 to 0 in N lockstep steps
on the integer levels ceil(K_i (N - k)/N); N = K_i is the reference's full chain, N < K_i a respaced one
(guided-diffusion's respacing for ddpm, evenly spaced timesteps for ddim). The network sees step index
level - 1; a continuous-time model t = level/1000 (ScoreModel.eps_index).

Gradients:
  none     the same steps in inference mode, each step's coefficients tabulated up front (ReverseField.table,
           DiscreteChain.coef) and the increments drawn many steps per call (Noise.randn_steps: the same
           numbers as step-by-step draws)
  exact    one autograd.Function over the whole solve that saves only the N input states (and the
           pre-drawn increments) and recomputes each step's network call in backward (any sampler)
  autograd plain autograd through the unrolled loop (reference for tests; memory grows with activations)
  adjoint  torchsde.sdeint_adjoint (method and adjoint_method euler, dt 1 in s-units) with a Brownian
           motion that replays the same pre-drawn increments, so forward values equal the exact mode's.
           Continuous samplers only: a discrete chain has no continuous-time adjoint.
Increments are drawn through `noise` in the same order in every mode ([B, ...] per noisy step), so the
path is the same whatever the gradient mode, and PerExampleNoise keeps each image's path its own. ddpm and
ddim (eta > 0) draw none for their last step, whose noise the reference masks out.
"""
from __future__ import annotations

from typing import Iterator, NamedTuple, Sequence

import torch
import torchsde
from torch import Tensor

from benchkit.noise import GLOBAL_NOISE, Noise
from benchkit_diffpure import sde
from benchkit_diffpure.score import ScoreModel

CONTINUOUS_SAMPLERS = ("vp-sde", "vp-ode", "ld-sde")
DISCRETE_SAMPLERS = ("ddpm", "ddim")
SAMPLERS = CONTINUOUS_SAMPLERS + DISCRETE_SAMPLERS
SOLVER_GRADIENTS = ("none", "exact", "autograd", "adjoint")
# Smallest time at which the score is evaluated: torchsde's adjoint evaluates the drift at the right end of
# each step, i.e. at t = 0 where std(0) = 0; the reference stops at t = 1e-5 for the same reason.
T_EPS = 1e-5


def solver_gradients(sampler: str) -> tuple[str, ...]:
    """The gradient modes `integrate` offers for a sampler (adjoint: continuous samplers only)."""
    return SOLVER_GRADIENTS if sampler in CONTINUOUS_SAMPLERS else ("none", "exact", "autograd")


def default_steps(sampler: str, t_max: float, dt: float) -> int:
    """N = round(t_max/dt) steps, for ddpm / ddim at most one per level of the chain (t_max 1000)."""
    n = max(1, round(t_max / dt))
    return min(n, round(t_max * sde.DISCRETE_STEPS)) if sampler in DISCRETE_SAMPLERS else n


def _col(v: Tensor, x: Tensor) -> Tensor:
    """A per-image [B] value as [B, 1, ...] against x."""
    return v.view(-1, *([1] * (x.dim() - 1)))


class StepCoefficients(NamedTuple):
    """What a step of a continuous sampler needs per image ([B] each): the forward time t at which the
    score is taken, std(t), beta(t) (vp samplers), the network's step index (discrete-time networks)
    and the diffusion G with sqrt(h) folded in (None for the ODE)."""
    t: Tensor
    std: Tensor
    beta: Tensor | None
    index: Tensor | None
    g: Tensor | None


class ReverseField:
    """Drift F and diffusion G of one continuous sampler per unit of the step index s (see module docstring).

    The coefficients of every step are tabulated up front (`table`), with the same arithmetic as at any
    other s (`coefficients`), which torchsde's adjoint evaluates at its own (tensor) times."""

    def __init__(self, model: ScoreModel, sampler: str, t_star: Tensor, n_steps: int, x_a: Tensor | None = None,
                 ld_sigma2: float = 100.0, ld_lambda: float = 0.1, ld_eta: float = 1.0):
        if sampler not in CONTINUOUS_SAMPLERS:
            raise ValueError(f"unknown continuous sampler {sampler!r}; expected one of {CONTINUOUS_SAMPLERS}")
        if sampler == "ld-sde" and x_a is None:
            raise ValueError("ld-sde needs the input x_a it is attracted to")
        self.model, self.sampler, self.t_star, self.n = model, sampler, t_star, n_steps
        self.x_a, self.sigma2, self.lam, self.eta = x_a, ld_sigma2, ld_lambda, ld_eta
        self.h = t_star / n_steps  # per-image step in t
        self.noise_steps = 0 if sampler == "vp-ode" else n_steps
        # Integer levels K_i = t*_i 1000 for a discrete-time network (ld-sde calls it at a fixed step).
        self.levels = sde.levels_of(t_star) if model.discrete_time and sampler != "ld-sde" else None
        # ld-sde's coefficients do not depend on s.
        self.table = ([self.coefficients(0.0)] * n_steps if sampler == "ld-sde" else
                      [self.coefficients(float(k)) for k in range(n_steps)])

    def time(self, s: Tensor | float) -> Tensor:
        """Forward time t_i(s) = t*_i (1 - s/N) per image, kept >= T_EPS."""
        return (self.t_star * (1.0 - s / self.n)).clamp_min(T_EPS)

    def coefficients(self, s: Tensor | float) -> StepCoefficients:
        if self.sampler == "ld-sde":  # Eq. 26's score s(x, 0), taken at LD_SCORE_TIME (sde.py)
            t = torch.full_like(self.t_star, sde.LD_SCORE_TIME)
            index = torch.full_like(self.t_star, sde.LD_SCORE_INDEX, dtype=torch.long) if self.model.discrete_time else None
            return StepCoefficients(t, sde.marginal_std(t), None, index,
                                    sde.langevin_diffusion(self.lam, self.eta) * self.h.sqrt())
        t = self.time(s)
        beta_t = sde.beta(t)
        # floor(t_i(s) 1000) = floor(K_i (N - s)/N), in integers (s is on the integer grid)
        index = None if self.levels is None else (self.levels * (self.n - round(float(s)))) // self.n
        g = None if self.sampler == "vp-ode" else sde.reverse_sde_diffusion(beta_t * self.h)
        return StepCoefficients(t, sde.marginal_std(t), beta_t, index, g)

    def _drift(self, c: StepCoefficients, x: Tensor, x_a: Tensor | None) -> Tensor:
        h = _col(self.h, x)
        eps = self.model.eps(x, c.t) if c.index is None else self.model.eps_index(x, c.index)
        score = sde.score_of_eps(eps, _col(c.std, x))
        if self.sampler == "ld-sde":
            x_a = (self.x_a if x_a is None else x_a).view_as(x)
            return h * sde.langevin_drift(x, x_a, score, self.lam, self.sigma2)
        beta_t = _col(c.beta, x)
        # dt < 0 in forward time: x(t - h) = x(t) - f(x, t) h.
        if self.sampler == "vp-sde":
            return -h * sde.reverse_sde_drift(x, c.t, score, beta_t)
        return -h * sde.probability_flow_drift(x, c.t, score, beta_t)

    def drift(self, s: Tensor | float, x: Tensor, x_a: Tensor | None = None) -> Tensor:
        return self._drift(self.coefficients(s), x, x_a)

    def diffusion(self, s: Tensor | float, x: Tensor) -> Tensor | None:
        """G with sqrt(h) folded in ([B, 1, ...]), or None for the ODE."""
        g = self.coefficients(s).g
        return None if g is None else _col(g, x)

    def step(self, k: int, x: Tensor, z: Tensor | None, x_a: Tensor | None = None) -> Tensor:
        """One Euler(-Maruyama) step from s = k to k + 1."""
        c = self.table[k]
        x_next = x + self._drift(c, x, x_a)
        return x_next if c.g is None or z is None else x_next + _col(c.g, x) * z


class DiscreteChain:
    """ddpm / ddim steps between integer levels (module docstring), with the same step interface as
    ReverseField. Coefficients for every step and image are tabulated up front ([N, B], on x's device)."""

    x_a = None

    def __init__(self, model: ScoreModel, sampler: str, t_star: Tensor, n_steps: int, ddim_eta: float = 0.0):
        if sampler not in DISCRETE_SAMPLERS:
            raise ValueError(f"unknown discrete sampler {sampler!r}; expected one of {DISCRETE_SAMPLERS}")
        if not 0.0 <= ddim_eta <= 1.0:
            raise ValueError(f"ddim_eta must be in [0, 1], got {ddim_eta}")
        self.model, self.sampler, self.n = model, sampler, n_steps
        grid = sde.level_grid(sde.levels_of(t_star), n_steps)
        la, lb = grid[:-1], grid[1:]
        self.index = la - 1  # the network's step index of each step's start level
        if sampler == "ddpm":
            self.coef = sde.ddpm_coefficients(la, lb)
        else:
            self.coef = sde.ddim_coefficients(la, lb, ddim_eta)
        self.coef = tuple(c.to(t_star.dtype) for c in self.coef)
        # Every step into level 0 (the last, for every image) is noise-free: no draw for it.
        self.noise_steps = 0 if sampler == "ddim" and ddim_eta == 0 else n_steps - 1

    def step(self, k: int, x: Tensor, z: Tensor | None, x_a: Tensor | None = None) -> Tensor:
        eps = self.model.eps_index(x, self.index[k])
        c = [_col(v[k], x) for v in self.coef]
        return (sde.ddpm_step if self.sampler == "ddpm" else sde.ddim_step)(x, eps, z, *c)


class _Segment:
    """Steps start..stop-1 of a field as a field of its own (step k of the segment is the field's
    start + k; its increments are zs[start:stop])."""

    def __init__(self, field, start: int, stop: int):
        self.field, self.start, self.n = field, start, stop - start

    def step(self, k: int, x: Tensor, z: Tensor | None, x_a: Tensor | None = None) -> Tensor:
        return self.field.step(self.start + k, x, z, x_a)


def _z(zs: Tensor | None, k: int) -> Tensor | None:
    return zs[k] if zs is not None and k < len(zs) else None


class _Checkpointed(torch.autograd.Function):
    """The whole solve (any field: ReverseField, DiscreteChain) as one node: saves the N input states,
    recomputes each step in backward."""

    @staticmethod
    def forward(ctx, field, zs: Tensor | None, x: Tensor, x_a: Tensor | None) -> Tensor:
        states = [x]
        for k in range(field.n):
            states.append(field.step(k, states[-1], _z(zs, k), x_a))
        ctx.field = field
        ctx.save_for_backward(zs, x_a, *states[:-1])
        return states[-1]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        field = ctx.field
        zs, x_a, *states = ctx.saved_tensors
        need_xa = x_a is not None and ctx.needs_input_grad[3]
        xa_leaf = x_a.detach().requires_grad_(need_xa) if x_a is not None else None
        grad_xa = torch.zeros_like(x_a) if need_xa else None
        for k in range(field.n - 1, -1, -1):
            xk = states[k].detach().requires_grad_(True)
            with torch.enable_grad():
                out = field.step(k, xk, _z(zs, k), xa_leaf)
            grads = torch.autograd.grad(out, (xk, xa_leaf) if need_xa else (xk,), grad)
            grad = grads[0]
            if need_xa:
                grad_xa = grad_xa + grads[1]
        return None, None, grad, grad_xa


class _ReplayBrownian(torchsde.BaseBrownian):
    """Brownian motion on the integer grid s = 0..N whose unit increments are the pre-drawn z_k.

    torchsde's Euler (forward solve, and the adjoint's backward solve through ReverseBrownian) only asks
    for whole steps [k, k+1], so the adjoint samples exactly the path of the other gradient modes."""

    __slots__ = ("zs", "_shape", "_dtype", "_device")

    def __init__(self, zs: Tensor | None, shape: tuple[int, int], dtype: torch.dtype, device: torch.device):
        self.zs, self._shape, self._dtype, self._device = zs, shape, dtype, device

    def __call__(self, ta, tb=None, return_U=False, return_A=False):
        if return_U or return_A:
            raise ValueError("only Euler is supported: no space-time Levy area")
        ta, tb = (0.0, float(ta)) if tb is None else (float(ta), float(tb))
        i, j = round(ta), round(tb)
        if abs(ta - i) > 1e-4 or abs(tb - j) > 1e-4:
            raise ValueError(f"query [{ta}, {tb}] is off the integer step grid")
        if self.zs is None or i == j:
            return torch.zeros(self._shape, dtype=self._dtype, device=self._device)
        return self.zs[i] if j == i + 1 else self.zs[i:j].sum(0)

    def __repr__(self):
        return f"{type(self).__name__}(steps={None if self.zs is None else len(self.zs)}, shape={self._shape})"

    dtype = property(lambda self: self._dtype)
    device = property(lambda self: self._device)
    shape = property(lambda self: self._shape)
    levy_area_approximation = property(lambda self: "none")


class _TorchsdeSDE(torch.nn.Module):
    """ReverseField on flat [B, D] states for torchsde (diagonal Ito noise, as the reference)."""

    noise_type = "diagonal"
    sde_type = "ito"

    def __init__(self, field: ReverseField, shape: torch.Size):
        super().__init__()
        self.field, self.shape = field, shape

    def f(self, s: Tensor, y: Tensor) -> Tensor:
        return self.field.drift(s, y.view(self.shape)).flatten(1)

    def g(self, s: Tensor, y: Tensor) -> Tensor:
        g = self.field.diffusion(s, y.view(self.shape))
        return torch.zeros_like(y) if g is None else g.expand(self.shape).flatten(1)


def _adjoint(field: ReverseField, zs: Tensor | None, x: Tensor) -> Tensor:
    shape = x.shape
    sde_ = _TorchsdeSDE(field, shape)
    bm = _ReplayBrownian(None if zs is None else zs.flatten(2), (shape[0], shape[1:].numel()), x.dtype, x.device)
    ts = torch.tensor([0.0, float(field.n)], dtype=x.dtype, device=x.device)
    # Gradients w.r.t. the input only: no network parameter is integrated; for LD also the attraction
    # target x_a (which the reference's default adjoint_params = sde.parameters() leaves out).
    params = (field.x_a,) if field.x_a is not None and field.x_a.requires_grad else ()
    ys = torchsde.sdeint_adjoint(sde_, x.flatten(1), ts, bm=bm, method="euler", adjoint_method="euler",
                                 dt=1.0, adjoint_params=params)
    return ys[-1].view(shape)


# Increments are drawn this many bytes at a time: one draw per generator for a small problem, a bounded
# transient for a large one (ImageNet: 3 MiB per image and step).
NOISE_CHUNK_BYTES = 64 << 20


def _increment_chunks(field, x: Tensor, noise: Noise) -> Iterator[tuple[int, Tensor]]:
    """(first step, [steps, *x.shape]) for the noisy steps, NOISE_CHUNK_BYTES at a time."""
    chunk = max(1, NOISE_CHUNK_BYTES // max(1, x.numel() * x.element_size()))
    for start in range(0, field.noise_steps, chunk):
        steps = min(chunk, field.noise_steps - start)
        yield start, noise.randn_steps(steps, tuple(x.shape), device=x.device, dtype=x.dtype)


def _increments(field, x: Tensor, noise: Noise) -> Iterator[Tensor | None]:
    """z_k for k = 0..N-1, None for the noise-free steps."""
    for _, zs in _increment_chunks(field, x, noise):
        yield from zs
    for _ in range(field.noise_steps, field.n):
        yield None


def _all_increments(field, x: Tensor, noise: Noise) -> Tensor | None:
    """[noise_steps, *x.shape], the same values as _increments."""
    if not field.noise_steps:
        return None
    out = x.new_empty((field.noise_steps, *x.shape))
    for start, zs in _increment_chunks(field, x, noise):
        out[start:start + len(zs)] = zs
    return out


def _solve_no_grad(field, x: Tensor, noise: Noise, snapshots: Sequence[int]) -> Tensor | tuple[Tensor, list[Tensor]]:
    """The steps of the other modes (the same values), in inference mode with the noise drawn in chunks."""
    kept: dict[int, Tensor] = {}
    with torch.inference_mode():
        for k, z in enumerate(_increments(field, x, noise)):
            if k in snapshots:
                kept[k] = x
            x = field.step(k, x, z)
    kept[field.n] = x
    # Back to ordinary tensors: the host purifies inside autograd contexts (bpda, a classifier whose
    # parameters want gradients), where an inference tensor cannot be saved for backward.
    kept = {k: v.clone() if v.is_inference() else v for k, v in kept.items()}
    return (kept[field.n], [kept[k] for k in snapshots]) if snapshots else kept[field.n]


def integrate(model: ScoreModel, x: Tensor, t_star: Tensor | float, *, sampler: str = "vp-sde",
              n_steps: int | None = None, dt: float = 1e-3, gradient: str = "none", noise: Noise | None = None,
              x_a: Tensor | None = None, ld_sigma2: float = 100.0, ld_lambda: float = 0.1, ld_eta: float = 1.0,
              ddim_eta: float = 0.0, snapshots: Sequence[int] = (),
              snapshots_grad: Sequence[int] = ()) -> Tensor | tuple[Tensor, list[Tensor]]:
    """Integrate from x = x(t*) (centred, [-1, 1] convention) back to t = 0.

    t_star: scalar or one value per image (on the 1/1000 grid for ddpm, ddim and discrete-time
    models); n_steps defaults to round(max t*/dt), for ddpm/ddim at most max t* 1000 (pass it
    explicitly when t* varies per image, or the result of one image depends on the others' t*).
    For ld-sde, x_a defaults to x. snapshots (gradient "none" only): also return the states after
    those step counts (0..N); snapshots_grad (gradient "exact"): the same, differentiable, the solve
    checkpointed segment by segment between them.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
    if gradient not in solver_gradients(sampler):
        why = " (a discrete chain has no continuous-time adjoint)" if gradient in SOLVER_GRADIENTS else ""
        raise ValueError(f"gradient {gradient!r} is not available for sampler {sampler!r}{why}; "
                         f"expected one of {solver_gradients(sampler)}")
    noise = noise or GLOBAL_NOISE
    t_star = torch.as_tensor(t_star, dtype=x.dtype, device=x.device).expand(x.shape[0]).contiguous()
    if n_steps is None:
        n_steps = default_steps(sampler, float(t_star.max()), dt)
    if sampler in DISCRETE_SAMPLERS:
        field = DiscreteChain(model, sampler, t_star, n_steps, ddim_eta)
    else:
        if sampler == "ld-sde" and x_a is None:
            x_a = x
        field = ReverseField(model, sampler, t_star, n_steps, x_a if sampler == "ld-sde" else None,
                             ld_sigma2, ld_lambda, ld_eta)
    n = field.n

    if gradient == "none":
        return _solve_no_grad(field, x, noise, snapshots)
    if snapshots:
        raise ValueError("snapshots are only available with gradient='none' (snapshots_grad: exact)")
    if snapshots_grad and (gradient != "exact" or any(not 0 <= k <= n for k in snapshots_grad)):
        raise ValueError(f"snapshots_grad needs gradient='exact' and steps in 0..{n}, got {gradient!r}, {snapshots_grad}")
    zs = _all_increments(field, x, noise)  # up front, so that backward replays the sampled path
    if gradient == "exact" and snapshots_grad:
        # Segment-wise (DiffAttack's memory bound): one checkpointed node per segment between the
        # requested states, so a loss on every state backpropagates through each step once.
        kept, start = {}, 0
        for stop in sorted(set(snapshots_grad) | {n}):
            if stop > start:
                x = _Checkpointed.apply(_Segment(field, start, stop), None if zs is None else zs[start:stop], x, field.x_a)
            kept[stop], start = x, stop
        return x, [kept[k] for k in snapshots_grad]
    if gradient == "exact":
        return _Checkpointed.apply(field, zs, x, field.x_a)
    if gradient == "adjoint":
        return _adjoint(field, zs, x)
    for k in range(n):  # "autograd": plain backpropagation through the unrolled loop
        x = field.step(k, x, _z(zs, k))
    return x
