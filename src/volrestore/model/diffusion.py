"""Noise schedules, the preconditioned denoiser wrapper (edm / v / eps / regression), the training loss and the
samplers, all in the noise-level (sigma) form x = x0 + sigma * n of Karras et al. 2022 (EDM)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch

# A sampler's random numbers: noise_fn(step, shape) -> float32 tensor. The restorer keys it by (seed, sample, step,
# global voxel), so a voxel's noise never depends on the tile, batch or worker; samplers must draw nothing else.
NoiseFn = Callable[[int, tuple], torch.Tensor]
Denoise = Callable[[torch.Tensor, float, torch.Tensor], torch.Tensor]  # D(x, sigma, cond) -> x0_hat


@dataclass(frozen=True)
class Schedule:
    """Where noise levels come from, for training and sampling.

    kind "cosine": the paper's (Nichol & Dhariwal) variance-preserving x_t = alpha x0 + s eps with T = 200 discrete
    steps, seen here as sigma(t) = s/alpha (x_t / alpha = x0 + sigma eps, the same process); training draws t
    uniformly; sampling walks t from T to 0 (uniform: the paper's 200 ancestral steps; or "quad").
    kind "edm": training draws ln sigma ~ N(P_mean, P_std^2), where restoration is decided, instead of a uniform t
    that spends most of its samples at noise levels that drown the image; sampling uses Karras' rho-spaced sigmas
    between sigma_max and sigma_min, then 0.
    """

    kind: str = "edm"
    T: int = 200
    s: float = 0.008
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    P_mean: float = -1.2
    P_std: float = 1.2
    sigma_data: float = 0.5

    @classmethod
    def from_dict(cls, d: dict) -> "Schedule":
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)

    # -- the cosine schedule (the paper's), continuous in t in [0, T]
    def _f(self, t):
        return torch.cos((torch.as_tensor(t, dtype=torch.float64) / self.T + self.s) / (1 + self.s) * math.pi / 2) ** 2

    def alpha_bar(self, t) -> torch.Tensor:
        # The discrete schedule clips beta at 0.999, which only binds at t = T: the same floor keeps alpha(T) > 0.
        floor = (self._f(self.T - 1) / self._f(0)).item() * (1 - 0.999)
        return (self._f(t) / self._f(0)).clamp(min=floor, max=1.0)

    def sigma_of_t(self, t) -> torch.Tensor:
        ab = self.alpha_bar(t)
        return ((1 - ab) / ab).sqrt()

    def data_scale(self) -> float:
        """sigma_data of the preconditioning: the data's std for edm; 1 for cosine, where c_in = 1/sqrt(1 + sigma^2)
        is exactly the variance-preserving alpha, so eps / v nets see the x_t of the paper."""
        return self.sigma_data if self.kind == "edm" else 1.0

    def train_sigmas(self, generator: torch.Generator, n: int) -> torch.Tensor:
        """n training noise levels (float64) from `generator`."""
        if self.kind == "edm":
            return (self.P_mean + self.P_std * torch.randn(n, generator=generator, dtype=torch.float64)).exp()
        t = (1 - torch.rand(n, generator=generator, dtype=torch.float64)) * self.T  # (0, T]
        return self.sigma_of_t(t)

    def sigmas(self, steps: int | None = None, spacing: str | None = None) -> list[float]:
        """steps + 1 decreasing noise levels ending in 0 (the last step returns the denoiser's x0 estimate).

        cosine: t from T to 0, "uniform" (steps = T: the integer grid of full DDPM) or "quad" (t ~ (1 - i/n)^2,
        denser at low noise); karras: (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho."""
        spacing = spacing or ("karras" if self.kind == "edm" else "uniform")
        steps = steps or self.T
        if spacing == "karras":
            lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
            n = max(steps - 1, 1)
            return [(hi + i / n * (lo - hi)) ** self.rho for i in range(steps)] + [0.0]
        p = {"uniform": 1, "quad": 2}[spacing]
        ts = [self.T * (steps - i) ** p / steps**p for i in range(steps + 1)]
        return [float(self.sigma_of_t(t)) for t in ts[:-1]] + [0.0]

    def initial_scale(self, sigmas: list[float]) -> float:
        """Std of x at the first noise level: the data's spread plus the noise (x_T ~ N(0, I) in the VP picture)."""
        return math.sqrt(sigmas[0] ** 2 + self.data_scale() ** 2)


def preconditioning(objective: str, sigma: torch.Tensor, sigma_data: float):
    """(c_skip, c_out, c_in, c_noise) with D = c_skip x + c_out F(c_in x, c_noise): the one place the parameterisations
    differ. edm: EDM's, the net's target (x0 - c_skip x)/c_out has unit variance at every sigma. v: the same with
    sigma_data = 1 (v-prediction, up to sign). eps: c_skip = 1, c_out = -sigma (x0 = x - sigma eps): its x0 error is
    sigma times the net's, which is what sinks eps at high noise when it is sampled with few steps."""
    sd = sigma_data if objective == "edm" else 1.0
    c_in = 1 / (sigma**2 + sd**2).sqrt()
    c_noise = sigma.log() / 4
    if objective == "eps":
        return torch.ones_like(sigma), -sigma, c_in, c_noise
    c_skip = sd**2 / (sigma**2 + sd**2)
    c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
    return c_skip, (-c_out if objective == "v" else c_out), c_in, c_noise


def _bcast(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-sample (B,) values as (B, 1, 1, ...) to broadcast over x."""
    return a.to(device=x.device, dtype=torch.float32).reshape(-1, *([1] * (x.ndim - 1)))


def _sigma_vec(sigma, n: int) -> torch.Tensor:
    return torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(n)


# A regression net's embedding input: 0 for a blind model; for one conditioned on the noise level, a code of the
# photons at the image's reference (bright) intensity, log-scaled like EDM's c_noise = ln(sigma)/4 and 0 at 10 photons.
PHOTON_RANGE = (0.5, 5000.0)  # levels are clipped to this before coding (measured estimates can be wild)


def photon_code(photons) -> torch.Tensor:
    """(B,) float32 embedding input for photons at the reference intensity (scalar or (B,))."""
    p = torch.as_tensor(photons, dtype=torch.float64).reshape(-1).clamp(*PHOTON_RANGE)
    return ((p / 10.0).log() / 4).float()


class Denoiser:
    """Wraps a network as D(x, sigma, cond) -> x0_hat; x0_hat is clamped to `clip` (normalised units). With bf16
    autocast the network runs in bf16 while the sampler state stays fp32. `photons`: the image's noise level for a
    regression net conditioned on it (None: blind)."""

    def __init__(self, net, schedule: Schedule, objective: str, clip=(-1.0, 1.0), autocast: bool = False,
                 photons: float | None = None):
        self.net, self.schedule, self.objective, self.clip, self.autocast = net, schedule, objective, clip, autocast
        self.photons = photons

    def raw(self, x, c_noise, cond):
        with torch.autocast(cond.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return self.net(cond, x, c_noise.to(device=cond.device, dtype=torch.float32)).float()

    def __call__(self, x, sigma, cond):
        if self.objective == "regression":
            level = torch.zeros(1) if self.photons is None else photon_code(self.photons)
            return self.raw(None, level.expand(cond.shape[0]), cond).clamp(*self.clip)
        c_skip, c_out, c_in, c_noise = preconditioning(self.objective, _sigma_vec(sigma, x.shape[0]),
                                                       self.schedule.data_scale())
        out = self.raw(x * _bcast(c_in, x), c_noise, cond)
        return (_bcast(c_skip, x) * x + _bcast(c_out, x) * out).clamp(*self.clip)


# ---- test-time symmetrisation: D averaged over the symmetries the net was trained under (lateral dihedral, z flip).
# A transform is (quarter turns in y-x, flip x, flip z); ordered so the first 2, 4, 8 are each as spread as possible.
LATERAL = ((0, False), (2, False), (0, True), (2, True), (1, False), (3, False), (1, True), (3, True))
TTA_COUNTS = (1, 2, 4, 8, 16)


def symmetries(count: int, has_z: bool) -> list[tuple[int, bool, bool]]:
    """The first `count` of the 8 lateral dihedral transforms, then (has_z) the same 8 with z flipped."""
    group = [(k, fx, False) for k, fx in LATERAL] + ([(k, fx, True) for k, fx in LATERAL] if has_z else [])
    if count not in TTA_COUNTS or count > len(group):
        raise ValueError(f"tta must be one of {', '.join(map(str, TTA_COUNTS[:len(group).bit_length()]))}")
    return group[:count]


def _apply(t, g, z_dim: int):
    k, flip_x, flip_z = g
    if flip_z and t.shape[z_dim] > 1:
        t = t.flip(z_dim)
    if flip_x:
        t = t.flip(-1)
    return torch.rot90(t, k, dims=(-2, -1))


def _invert(t, g, z_dim: int):
    k, flip_x, flip_z = g
    t = torch.rot90(t, -k, dims=(-2, -1))
    if flip_x:
        t = t.flip(-1)
    return t.flip(z_dim) if flip_z and t.shape[z_dim] > 1 else t


class SymmetrisedDenoiser:
    """D'(x, sigma, cond) = mean over transforms g of g^-1 D(g x, sigma, g cond): the net's answer made exactly
    equivariant to the symmetries it was trained with, at one network evaluation per transform. z flips act on
    axis z_dim: the condition's channels for a 2.5D net (its z neighbours), spatial z for a 3D one. Every transform
    is a flip or quarter turn of the whole tile, so with tile sizes on the net's size multiple the pooling phase
    stays on the global grid and tiling invariance holds. Summed in a fixed order: deterministic."""

    def __init__(self, denoiser: Denoise, transforms, z_dim: int):
        self.denoiser, self.transforms, self.z_dim = denoiser, list(transforms), z_dim

    def __call__(self, x, sigma, cond):
        total = None
        for g in self.transforms:
            x_g = None if x is None else _apply(x, g, self.z_dim)
            out = _invert(self.denoiser(x_g, sigma, _apply(cond, g, self.z_dim)), g, self.z_dim)
            total = out if total is None else total + out
        return total / len(self.transforms)


def loss(net, x0, cond, schedule: Schedule, objective: str, sigma, noise, weight=None, photons=None) -> torch.Tensor:
    """EDM's weighted loss lambda(sigma) |D - x0|^2 with lambda = 1/c_out^2, i.e. the plain MSE of the net's output
    against its own target (eps for eps, v for v, unit-variance x0 mix for edm); sigma (B,) and noise from the
    caller's generator so training is reproducible. `weight` (B,), mean 1: a per-sample factor (see
    TrainConfig.noise_balance)."""
    if objective == "regression":
        level = torch.zeros(x0.shape[0]) if photons is None else photon_code(photons)
        err = net(cond, None, level.to(x0.device)) - x0
    else:
        c_skip, c_out, c_in, c_noise = preconditioning(objective, sigma, schedule.data_scale())
        x = x0 + _bcast(sigma, x0) * noise
        target = (x0 - _bcast(c_skip, x0) * x) / _bcast(c_out, x0)
        err = net(cond, x * _bcast(c_in, x0), c_noise.float().to(x0.device)) - target
    if weight is None:
        return torch.mean(err**2)
    return torch.mean(err.pow(2).flatten(1).mean(1) * weight.to(err))


def balance_weights(cond_centre: torch.Tensor, x0: torch.Tensor, exponent: float) -> torch.Tensor | None:
    """Per-sample weights (mean 1) = (MSE of the condition to the target)^-exponent; None for exponent 0."""
    if not exponent:
        return None
    w = (cond_centre - x0).pow(2).flatten(1).mean(1).clamp_min(1e-8).pow(-exponent)
    return w / w.mean()


# ---- samplers: pure functions of (denoiser, x_init, cond, sigmas, noise_fn); x_init = initial_scale * N(0, I).

@torch.no_grad()
def ancestral(D: Denoise, x, cond, sigmas, noise_fn: NoiseFn):
    """DDPM ancestral sampling (the paper's, with all T steps): a draw from q(x_s | x_t, x0_hat) at each step, which
    in sigma form is mean x0 + (s^2/t^2)(x - x0), variance s^2 (1 - s^2/t^2)."""
    for i, (s_t, s_s) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        x0 = D(x, s_t, cond)
        if s_s == 0:
            return x0
        r = (s_s / s_t) ** 2
        x = x0 + r * (x - x0) + s_s * math.sqrt(1 - r) * noise_fn(i + 1, tuple(x.shape)).to(x)
    return x


@torch.no_grad()
def ddim(D: Denoise, x, cond, sigmas, noise_fn: NoiseFn = None):
    """DDIM, eta = 0 (Euler on the probability-flow ODE; deterministic given x_init)."""
    for s_t, s_s in zip(sigmas[:-1], sigmas[1:]):
        x0 = D(x, s_t, cond)
        x = x0 + (s_s / s_t) * (x - x0)
    return x


@torch.no_grad()
def dpmpp2m(D: Denoise, x, cond, sigmas, noise_fn: NoiseFn = None):
    """DPM-Solver++ 2M (Lu et al. 2022, data prediction, multistep); first-order first and last steps."""
    x0_prev = h_prev = None
    for s_t, s_s in zip(sigmas[:-1], sigmas[1:]):
        x0 = D(x, s_t, cond)
        if s_s == 0:
            return x0
        h = math.log(s_t / s_s)  # step in -log sigma
        d = x0 if x0_prev is None else x0 + (x0 - x0_prev) * (h / (2 * h_prev))
        x = (s_s / s_t) * x - math.expm1(-h) * d
        x0_prev, h_prev = x0, h
    return x


@torch.no_grad()
def heun(D: Denoise, x, cond, sigmas, noise_fn: NoiseFn = None):
    """EDM's deterministic 2nd-order Heun sampler (2 evaluations per step, 1 for the last)."""
    for s_t, s_s in zip(sigmas[:-1], sigmas[1:]):
        d = (x - D(x, s_t, cond)) / s_t
        x_next = x + (s_s - s_t) * d
        if s_s > 0:
            x_next = x + (s_s - s_t) * (d + (x_next - D(x_next, s_s, cond)) / s_s) / 2
        x = x_next
    return x


SAMPLERS = {"ancestral": ancestral, "ddim": ddim, "dpmpp2m": dpmpp2m, "heun": heun}
EVALS_PER_STEP = {"ancestral": 1, "ddim": 1, "dpmpp2m": 1, "heun": 2}


def sample(D: Denoise, cond, schedule: Schedule, noise_fn: NoiseFn, sampler: str, steps: int | None = None,
           spacing: str | None = None):
    """One sample per row of cond (B, C, *spatial): x_init (B, 1, *spatial) from noise_fn(0) at the schedule's first
    level, then the sampler."""
    sigmas = schedule.sigmas(steps, spacing)
    x = noise_fn(0, (cond.shape[0], 1, *cond.shape[2:])).to(cond) * schedule.initial_scale(sigmas)
    return SAMPLERS[sampler](D, x, cond, sigmas, noise_fn)
