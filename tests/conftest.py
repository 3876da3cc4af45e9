"""Fixtures shared by the test modules: Dask clusters, and the tiny trained models (trained once per session, on
first use, so `pytest -m "not slow"` pays only for the ones its tests need)."""

import pytest

from volrestore.cluster.client import keep_freed_memory

keep_freed_memory()  # the in-process training and restores of the tests reuse freed memory as the workers do

# The tiny-2.5d models (tests/test_tiling.py, tests/test_train.py): trained on phantom 3, degraded as below.
TINY_DEGRADE = "poisson:photons=10,read=1"
# Fewer iterations fail tests/test_tiling.py's comparison with the best Gaussian filter (measured against it: edm 300
# -0.2 dB, 200 -4.9 dB, allowed -0.6; regression 150 +0.8 dB, 100 -0.8 dB, required +0.4).
TINY_ITERATIONS = {"edm": 300, "regression": 150}


@pytest.fixture(scope="module")
def cluster():
    """Two local worker processes (one torch thread each), shared by a module's tests (passed as a Client)."""
    from volrestore.cluster.client import connect

    with connect("local", workers=2, echo=lambda *_: None) as client:
        yield client


@pytest.fixture(scope="session")
def session_cluster():
    """Two local worker processes for the whole session, for tests that only need somewhere to run a restore
    (starting and closing a local cluster costs 10-15 s on the 2-core CI machine). Tests must not restart or close it:
    those that do use `cluster`."""
    from volrestore.cluster.client import connect

    with connect("local", workers=2, echo=lambda *_: None) as client:
        yield client


def tiny_sampler():
    """The training patches of the tiny-2.5d models: phantom 3 (12 x 128 x 128), 32 x 32 patches with 2 z-slices of
    context on each side, batch 8; no validation region (every row trains). `.ref` is the photon reference."""
    from volrestore.model import patches
    from volrestore.simulate import synthetic
    from volrestore.simulate.degrade import Degradation

    return patches.PatchSampler(synthetic.phantom((12, 128, 128), seed=3),
                                degrade=Degradation.parse(TINY_DEGRADE + ",seed=1"), patch=(32, 32), batch=8, seed=0,
                                z_context=2, val_fraction=0)


def tiny_validation(ref):
    """4 validation patches from another phantom (4), degraded like the training data: validation runs after the last
    iteration only, so it adds `val_psnr` to the history without changing the weights."""
    from volrestore.model import patches
    from volrestore.simulate import synthetic
    from volrestore.simulate.degrade import Degradation

    return patches.PatchSampler(synthetic.phantom((12, 96, 64), seed=4),
                                degrade=Degradation.parse(TINY_DEGRADE + ",seed=2"), patch=(32, 32), batch=8, seed=0,
                                z_context=2, val_fraction=0.5, ref=ref).validation(4)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """`get(objective)` -> path of a tiny-2.5d checkpoint ("edm" or "regression", TINY_ITERATIONS), trained on first
    use and then shared by every module: enough to be far from identity and to beat the noisy input, not to be good.
    `get.ref` is the photon reference of the training data (degrade held-out phantoms with it); `get.returned` holds
    what train() returned (the final checkpoint dict)."""
    from volrestore.config import TrainConfig
    from volrestore.model import train

    d = tmp_path_factory.mktemp("tiny_models")
    sampler, paths = tiny_sampler(), {}

    def get(objective):
        if objective not in paths:
            iterations = TINY_ITERATIONS[objective]
            cfg = TrainConfig(preset="tiny-2.5d", objective=objective, iterations=iterations, warmup=20, lr=1e-2,
                              checkpoint_every=iterations)
            get.returned[objective] = train.train(sampler, d / f"{objective}.pt", cfg, sampler.fit_normalisation(),
                                                  val=tiny_validation(sampler.ref) if objective == "edm" else None)
            paths[objective] = d / f"{objective}.pt"
        return paths[objective]

    get.ref, get.returned = sampler.ref, {}
    return get
