"""Samplers against an exactly known posterior, schedule, denoiser parameterisations, determinism."""

import math

import pytest
import torch

from volrestore import diffusion as dfn
from volrestore import noise

torch.set_num_threads(1)
N = 20000  # i.i.d. "pixels": standard error of a variance ratio ~ sqrt(2/N) = 1 %


def gaussian_problem(mu=0.2, s0=0.5, sn=0.5, seed=0):
    """x0 ~ N(mu, s0^2), condition y = x0 + N(0, sn^2): the posterior x0 | y is N(m(y), v), known exactly."""
    g = torch.Generator().manual_seed(seed)
    x0 = mu + s0 * torch.randn(N, generator=g)
    y = x0 + sn * torch.randn(N, generator=g)
    v = 1 / (1 / s0**2 + 1 / sn**2)
    m = v * (mu / s0**2 + y / sn**2)
    return y, m, v


def exact_denoiser(m, v, schedule):
    """E[x0 | x_t, y]: the prior N(m, v) times the likelihood x_t = a x0 + s eps."""
    def D(x, t, cond):
        a, s = (z.item() for z in schedule.alpha_sigma(t))
        return (m / v + a * x / s**2) / (1 / v + a * a / s**2)
    return D


def noise_fn(seed):
    return lambda step, shape: torch.from_numpy(noise.normal(shape, seed, step))


# (sampler, steps, allowed |variance ratio - 1|). Measured at posterior std 0.35 / 0.17: ancestral-200 0.97 / 0.90
# (converges to 1 as T grows: 0.98 at T = 1000; T = 200 is the paper's discretisation), DDIM-20 0.87 / 0.84 (eta = 0
# is first order and under-disperses), DPM-Solver++ 2M 0.98-1.07 at 10-20 steps.
CASES = [("ancestral", 200, 0.12), ("ddim", 20, 0.20), ("dpmpp2m", 20, 0.08), ("dpmpp2m", 10, 0.10)]


@pytest.mark.parametrize("s0,sn", [(0.5, 0.5), (0.3, 0.2)])
@pytest.mark.parametrize("name,steps,var_tol", CASES)
def test_sampler_matches_gaussian_posterior(name, steps, var_tol, s0, sn):
    schedule = dfn.CosineSchedule()
    y, m, v = gaussian_problem(s0=s0, sn=sn)
    x_T = torch.from_numpy(noise.normal((N,), 1, 0))
    x = dfn.SAMPLERS[name](exact_denoiser(m, v, schedule), x_T, y, schedule, noise_fn(2), steps)
    r = (x - m) / math.sqrt(v)  # ~ N(0, 1) if the sampler draws from the posterior
    assert abs(r.mean().item()) < 0.05  # 5 standard errors of the mean at N = 20000
    assert abs(r.var().item() - 1) < var_tol


def test_sampler_deterministic_given_seed():
    schedule = dfn.CosineSchedule()
    y, m, v = gaussian_problem()
    D = exact_denoiser(m, v, schedule)
    x_T = torch.from_numpy(noise.normal((N,), 1, 0))
    a = dfn.ancestral(D, x_T.clone(), y, schedule, noise_fn(3), 50)
    b = dfn.ancestral(D, x_T.clone(), y, schedule, noise_fn(3), 50)
    c = dfn.ancestral(D, x_T.clone(), y, schedule, noise_fn(4), 50)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_schedule_endpoints_and_subsets():
    sch = dfn.CosineSchedule(T=200, s=0.008)
    ab = sch.alpha_bar(torch.arange(0, 201.0))
    assert ab[0] == 1 and (ab[1:] < ab[:-1]).all() and 0 < ab[-1] < 1e-6
    beta = 1 - ab[1:] / ab[:-1]
    assert beta.max() <= 0.999 + 1e-9  # the discrete schedule's clip
    assert sch.timesteps(200) == [float(200 - i) for i in range(201)]
    assert sch.timesteps(10, "quad")[0] == 200 and sch.timesteps(10, "quad")[-1] == 0


@pytest.mark.parametrize("objective", ["eps", "v"])
def test_denoiser_inverts_parameterisation(objective):
    """A 'network' returning the true eps / v target must give back x0 exactly (up to the clamp)."""
    sch = dfn.CosineSchedule()
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 1, 8, 8, generator=g) * 1.6 - 0.8
    eps = torch.randn(3, 1, 8, 8, generator=g)
    t = 37.5
    a, s = (z.item() for z in sch.alpha_sigma(t))
    x_t = a * x0 + s * eps

    def net(cond, x, tt):
        assert tt.ndim == 1 and tt.shape[0] == 3
        return eps if objective == "eps" else a * eps - s * x0

    x0_hat = dfn.Denoiser(net, sch, objective)(x_t, t, x0)
    torch.testing.assert_close(x0_hat, x0, atol=1e-5, rtol=0)
