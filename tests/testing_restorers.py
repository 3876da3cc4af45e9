"""Test-only restorers: test-identity, test-gaussian and test-randcnn compute exactly what identity, gaussian and
randcnn do, and can also wait (`sleep=S` seconds per call: interruption tests) or raise torch's CUDA out-of-memory
error for calls of `oom_at` or more tiles (batch halving, on a CPU). Both knobs are build extras, so they never enter
provenance or block --resume. Importing this module registers them (workers unpickle the class from here)."""

import time

from volrestore.model import registry, simple
from volrestore.model.restorer import RestorerSpec

HOOKS = ("sleep", "oom_at")


def hooks(tiles, sleep, oom_at):
    """The test behaviour around every call (tests may replace it in a threads-only cluster)."""
    time.sleep(sleep)
    if oom_at and len(tiles) >= oom_at:
        import torch

        raise torch.cuda.OutOfMemoryError(f"test: {len(tiles)} tiles >= oom_at={oom_at}")


class Hooked:
    """A simple restorer `base` with the test hooks around each call."""

    def __init__(self, base, sleep=0.0, oom_at=0, **options):
        self.inner = simple.CLASSES[base](**options)
        self.sleep, self.oom_at = sleep, oom_at
        for attr in ("spatial_dims", "size_multiple", "outputs", "z_context"):
            setattr(self, attr, getattr(self.inner, attr))

    def __call__(self, tiles, origins, seed):
        hooks(tiles, self.sleep, self.oom_at)
        return self.inner(tiles, origins, seed)


def _resolver(base):
    def resolve(ref):
        extras = {k: ref.options[k] for k in HOOKS if k in ref.options}
        spec = simple.resolve(ref.model_copy(update={"name": base, "options": {k: v for k, v in ref.options.items()
                                                                             if k not in HOOKS}}))
        return RestorerSpec(**{**spec.__dict__, "name": ref.name, "restorer": Hooked,
                               "extras": tuple(sorted({**extras, "base": base}.items()))})
    return resolve


for _base in simple.CLASSES:
    registry.register(f"test-{_base}", _resolver(_base))


# test-failing: identity whose every call raises the error named by `fail` (a build extra), for the one-line reports
# of block failures (tests/test_runner.py, tests/test_bad_inputs.py).
FAILURES = {
    "memory": lambda: MemoryError("test: cannot allocate the tiles"),
    "disk-full": lambda: OSError(28, "No space left on device", "test-out.ome.zarr/0/c/0/0/0"),
    "permission": lambda: PermissionError(13, "Permission denied", "test-out.ome.zarr/0/c/0/0/0"),
    "value": lambda: ValueError("test: broken tile"),
}


class Failing(Hooked):
    """test-identity that raises FAILURES[fail] on every call."""

    def __init__(self, base="identity", fail="value", **options):
        super().__init__(base, **options)
        self.fail = fail

    def __call__(self, tiles, origins, seed):
        raise FAILURES[self.fail]()


def _resolve_failing(ref):
    fail = ref.options.get("fail", "value")
    spec = _resolver("identity")(ref.model_copy(update={"options": {k: v for k, v in ref.options.items()
                                                                    if k != "fail"}}))
    return RestorerSpec(**{**spec.__dict__, "name": ref.name, "restorer": Failing,
                           "extras": tuple(sorted({**dict(spec.extras), "fail": fail}.items()))})


registry.register("test-failing", _resolve_failing)
