"""Samplers against an exactly known posterior, schedules, preconditioning, determinism."""

import math

import pytest
import torch

from volrestore.model import diffusion as dfn
from volrestore.model import noise

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


def exact_denoiser(m, v):
    """E[x0 | x, y] for x = x0 + sigma n: the posterior N(m, v) times the likelihood."""
    m = m[:, None]  # rows of (B, 1): a (B,) mean would broadcast against x to (B, B)

    def D(x, sigma, cond):
        return (m / v + x / sigma**2) / (1 / v + 1 / sigma**2)
    return D


def noise_fn(seed):
    return lambda step, shape: torch.from_numpy(noise.normal(shape, seed, step))


# (schedule, sampler, steps, allowed |variance ratio - 1|). Ancestral sampling on the paper's cosine grid (and on
# EDM's) draws from the posterior up to a few per cent at 200 steps; the ODE solvers are checked for convergence below.
CASES = [("cosine", "ancestral", 200, 0.12), ("edm", "ancestral", 200, 0.12), ("edm", "ddim", 96, 0.08),
         ("edm", "dpmpp2m", 48, 0.05), ("edm", "heun", 48, 0.05), ("cosine", "dpmpp2m", 48, 0.08)]


def posterior_draw(kind, name, steps, s0=0.5, sn=0.5):
    """(mean, variance) of (sample - posterior mean) / posterior std: (0, 1) for an exact posterior sampler."""
    y, m, v = gaussian_problem(s0=s0, sn=sn)
    x = dfn.sample(exact_denoiser(m, v), y[:, None], dfn.Schedule(kind=kind), noise_fn(2), name, steps)[:, 0]
    r = (x - m) / math.sqrt(v)
    return r.mean().item(), r.var().item()


@pytest.mark.parametrize("s0,sn", [(0.5, 0.5), (0.3, 0.2)])
@pytest.mark.parametrize("kind,name,steps,var_tol", CASES)
def test_sampler_matches_gaussian_posterior(kind, name, steps, var_tol, s0, sn):
    mean, var = posterior_draw(kind, name, steps, s0, sn)
    assert abs(mean) < 0.05  # 5 standard errors of the mean at N = 20000
    assert abs(var - 1) < var_tol


@pytest.mark.parametrize("name,order", [("ddim", 1), ("dpmpp2m", 2), ("heun", 2)])
def test_ode_samplers_converge_at_their_order(name, order):
    # The probability-flow ODE maps N(0, 80^2) exactly onto the posterior, so the variance error is the solver's
    # discretisation error alone: doubling the steps divides it by about 2^order (measured: DDIM 0.23 -> 0.12 -> 0.06,
    # DPM-Solver++ 2M 0.074 -> 0.017, Heun 0.067 -> 0.016 from 24 to 48 steps).
    errors = [abs(posterior_draw("edm", name, steps)[1] - 1) for steps in (24, 48)]
    assert errors[1] < errors[0] * (0.65 if order == 1 else 0.35), errors


def test_sampler_deterministic_given_seed():
    schedule = dfn.Schedule(kind="cosine")
    y, m, v = gaussian_problem()
    D = exact_denoiser(m, v)
    a = dfn.sample(D, y[:, None], schedule, noise_fn(3), "ancestral", 50)
    b = dfn.sample(D, y[:, None], schedule, noise_fn(3), "ancestral", 50)
    c = dfn.sample(D, y[:, None], schedule, noise_fn(4), "ancestral", 50)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_schedules():
    sch = dfn.Schedule(kind="cosine", T=200, s=0.008)
    ab = sch.alpha_bar(torch.arange(0, 201.0))
    assert ab[0] == 1 and (ab[1:] < ab[:-1]).all() and 0 < ab[-1] < 1e-6
    beta = 1 - ab[1:] / ab[:-1]
    assert beta.max() <= 0.999 + 1e-9  # the discrete schedule's clip
    sig = sch.sigmas(200)
    assert len(sig) == 201 and sig[-1] == 0 and all(a > b for a, b in zip(sig, sig[1:]))
    assert sig[0] == pytest.approx(float(sch.sigma_of_t(200)))
    edm = dfn.Schedule()
    k = edm.sigmas(12)
    assert len(k) == 13 and k[0] == pytest.approx(80) and k[-2] == pytest.approx(0.002) and k[-1] == 0
    g = torch.Generator().manual_seed(0)
    ln = edm.train_sigmas(g, 20000).log()
    assert abs(ln.mean().item() + 1.2) < 0.03 and abs(ln.std().item() - 1.2) < 0.03  # log-normal P_mean, P_std


@pytest.mark.parametrize("objective", ["edm", "v", "eps"])
def test_parameterisations_agree_for_an_exact_network(objective):
    """A 'network' returning exactly its training target gives back x0 whatever the parameterisation, and that target
    is eps for eps and v = alpha eps - s x0 for v (the paper's / Salimans' definitions)."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 1, 8, 8, generator=g) * 1.6 - 0.8
    n = torch.randn(3, 1, 8, 8, generator=g)
    for sigma in (0.01, 0.3, 2.0, 40.0):
        x = x0 + sigma * n
        c_skip, c_out, c_in, c_noise = dfn.preconditioning(objective, torch.tensor([sigma], dtype=torch.float64), 0.5)
        target = ((x0 - c_skip.item() * x) / c_out.item())
        if objective == "eps":
            torch.testing.assert_close(target, n, atol=1e-4, rtol=0)
        if objective == "v":
            a, s = 1 / math.sqrt(1 + sigma**2), sigma / math.sqrt(1 + sigma**2)
            torch.testing.assert_close(target, a * n - s * x0, atol=1e-4, rtol=0)

        def net(cond, x_in, cn):
            assert cn.shape == (3,) and torch.allclose(x_in, x * c_in.item())
            return target

        x0_hat = dfn.Denoiser(net, dfn.Schedule(), objective, clip=(-5, 5))(x, sigma, x0)
        torch.testing.assert_close(x0_hat, x0, atol=1e-4, rtol=0)


@pytest.mark.parametrize("objective", ["edm", "v", "eps"])
def test_denoiser_returns_x_as_sigma_goes_to_zero(objective):
    """Whatever the (bounded) network says, x0_hat -> x at sigma -> 0: the skip connection carries the input."""
    x = torch.rand(2, 1, 8, 8) * 1.6 - 0.8
    D = dfn.Denoiser(lambda c, xi, cn: torch.randn_like(xi), dfn.Schedule(), objective, clip=(-5, 5))
    torch.testing.assert_close(D(x, 1e-6, x), x, atol=1e-5, rtol=0)


def test_unit_variance_target_under_edm():
    """EDM's point: the network's target has unit variance at every noise level (data of std sigma_data)."""
    g = torch.Generator().manual_seed(1)
    x0 = 0.5 * torch.randn(20000, generator=g)
    for sigma in (0.01, 0.1, 1.0, 10.0):
        c_skip, c_out, _, _ = dfn.preconditioning("edm", torch.tensor(sigma, dtype=torch.float64), 0.5)
        target = (x0 - c_skip * (x0 + sigma * torch.randn(20000, generator=g))) / c_out
        assert abs(target.std().item() - 1) < 0.03


@pytest.mark.parametrize("spatial,channels,count", [(2, 5, 16), (2, 1, 8), (3, 1, 16)])
def test_symmetrised_denoiser_is_exactly_equivariant(spatial, channels, count):
    # A random conv net is not equivariant to flips or turns; averaged over the group (--tta) it must be, for every
    # transform of the group: T(g cond) = g T(cond). 2.5D: z flips reverse the condition's channels (its z
    # neighbours); 3D: they flip spatial z.
    torch.manual_seed(0)
    conv = (torch.nn.Conv2d if spatial == 2 else torch.nn.Conv3d)(channels + 1, 1, 3, padding=1)

    def denoise(x, sigma, cond):
        return conv(torch.cat([cond, x], 1)) + x

    z_dim = 1 if channels > 1 else 2
    group = dfn.symmetries(count, has_z=count == 16)
    tta = dfn.SymmetrisedDenoiser(denoise, group, z_dim)
    shape = (2, 1, *(8,) * (spatial - 2), 12, 12)
    cond, x = torch.randn(shape[:1] + (channels,) + shape[2:]), torch.randn(shape)
    out = tta(x, 1.0, cond)
    assert not torch.allclose(dfn._apply(denoise(x, 1.0, cond), group[1], z_dim),
                              denoise(dfn._apply(x, group[1], z_dim), 1.0, dfn._apply(cond, group[1], z_dim)))
    for g in group:
        moved = tta(dfn._apply(x, g, z_dim), 1.0, dfn._apply(cond, g, z_dim))
        torch.testing.assert_close(moved, dfn._apply(out, g, z_dim), rtol=0, atol=1e-5)
    assert len(set(group)) == count
    with pytest.raises(ValueError, match="tta must be one of 1, 2, 4, 8$"):
        dfn.symmetries(16, has_z=False)
    with pytest.raises(ValueError, match="one of 1, 2, 4, 8, 16"):
        dfn.symmetries(3, has_z=True)
