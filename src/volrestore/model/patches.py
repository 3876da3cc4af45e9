"""Training patches: random (condition, target) batches read lazily from array-likes, a held-out validation region, augmentation."""

from __future__ import annotations

import numpy as np

from volrestore.blockwise.grid import reflect
from volrestore.errors import UserError
from volrestore.model.checkpoint import Normalisation
from volrestore.simulate.degrade import Degradation, crop


class PatchSampler:
    """Random (cond, target) patch batches from array-likes of shape (z, y, x) or (y, x) with numpy slicing (numpy,
    zarr.Array, ...); only the patches' regions (plus the blur halo) are read.

    The last `val_fraction` of the y axis is held out for validation: training patches, and the context read around
    them for blurring, never touch it. Batches depend only on (seed, iteration), so a resumed run sees the same data.
    Augmentation: the 8 lateral dihedral transforms (4 rotations x flip; 2 rotations when y != x), and z flips in 3D.
    2D patches are single z-slices. `z_strides` (2.5D only): a training patch's z neighbours are taken that many
    slices apart, one stride drawn per patch, so a net trained on finely sampled z stacks also meets neighbours that
    differ from the centre slice as much as they do in coarsely sampled ones; (1,), the default, draws nothing.
    Either `cond` (a registered low-quality image of the same shape) or `degrade` (made from the target) is needed.
    """

    def __init__(self, target, cond=None, *, degrade: Degradation | None = None, patch: tuple[int, ...],
                 batch: int, seed: int = 0, val_fraction: float = 0.1, ref: float | None = None, z_context: int = 0,
                 z_strides: tuple[int, ...] = (1,)):
        if (cond is None) == (degrade is None):
            raise UserError("give either a paired input image or a degradation model, not both or neither")
        if cond is not None and tuple(cond.shape) != tuple(target.shape):
            raise UserError(f"input shape {tuple(cond.shape)} differs from target shape {tuple(target.shape)}: "
                            "register and crop them to the same grid")
        self.target, self.cond, self.degrade = target, cond, degrade
        self.ndim = len(target.shape)
        self.z_context = int(z_context) if self.ndim == 3 and len(patch) == 2 else 0
        self.z_strides = tuple(int(s) for s in z_strides)
        if not self.z_strides or min(self.z_strides) < 1:
            raise UserError(f"z strides must be positive integers, got {z_strides}")
        self.patch = tuple(int(p) for p in patch)
        self.spatial_dims = len(self.patch)
        self.full = (1,) * (3 - self.spatial_dims) + self.patch if self.ndim == 3 else self.patch  # z, y, x extent
        self.batch, self.seed = int(batch), int(seed)
        shape = tuple(target.shape)
        if len(self.patch) > self.ndim or self.ndim not in (2, 3):
            raise UserError(f"a {len(self.patch)}D model needs a 3D image, this one has shape {shape}: use a 2D preset")
        if any(p > s for p, s in zip(self.full, shape)):
            raise UserError(f"patch {self.patch} does not fit into the volume of shape {shape}: use a smaller --patch")
        ny = shape[-2]
        self.y_split = ny - int(round(ny * val_fraction)) if val_fraction > 0 else ny
        if self.y_split < self.full[-2] or (val_fraction > 0 and ny - self.y_split < self.full[-2]):
            raise UserError(f"volume y size {ny} is too small for patch y {self.full[-2]} in both the training and "
                            f"the held-out validation region (val fraction {val_fraction}): use a smaller patch")
        # Photon budget reference: fixed for the volume so every patch sees the same noise level.
        self.ref = ref
        if degrade is not None and ref is None:
            self.ref = float(np.percentile(self._sample_voxels(target), 99.9))

    def _sample_voxels(self, arr, n=16):
        rng = np.random.default_rng([self.seed, 7])
        return np.concatenate([np.asarray(arr[self._region(rng, 0, self.y_split)]).ravel() for _ in range(n)])

    def _region(self, rng, y_lo, y_hi):
        starts = [int(rng.integers(0, s - p + 1)) for s, p in zip(self.target.shape, self.full)]
        starts[-2] = int(rng.integers(y_lo, y_hi - self.full[-2] + 1))
        return tuple(slice(a, a + p) for a, p in zip(starts, self.full))

    def _read(self, region, y_lo, y_hi, counter):
        target = np.asarray(self.target[region], dtype=np.float32)
        if self.cond is not None:
            return np.asarray(self.cond[region], dtype=np.float32), target
        # Read the blur context inside [y_lo, y_hi) and the volume; reflect where it would leave them.
        halo = self.degrade.halo(self.ndim)
        bounds = [(0, s) for s in self.target.shape]
        bounds[-2] = (y_lo, y_hi)
        big = tuple(slice(max(r.start - h, lo), min(r.stop + h, hi)) for r, h, (lo, hi) in zip(region, halo, bounds))
        pad = [(h - (r.start - b.start), h - (b.stop - r.stop)) for r, h, b in zip(region, halo, big)]
        clean = np.pad(np.asarray(self.target[big], dtype=np.float32), pad, mode="reflect")
        return crop(self.degrade(clean, counter, self.ref), halo), target

    def _draw(self, rng, y_lo, y_hi, counter, augment):
        region = self._region(rng, y_lo, y_hi)
        if self.z_context:
            # 2.5D: the slice's neighbours come along as condition channels, reflected at the volume's z ends as
            # the engine reflects them; the target stays the centre slice.
            z = region[0].start
            # The stride is drawn only when there is a choice: (1,) keeps every earlier run's patches bit for bit.
            stride = self.z_strides[int(rng.integers(len(self.z_strides)))] if augment and len(self.z_strides) > 1 \
                else 1
            zs = reflect(z + stride * np.arange(-self.z_context, self.z_context + 1), self.target.shape[0])
            z_lo, z_hi = int(zs.min()), int(zs.max()) + 1
            cond, target = self._read((slice(z_lo, z_hi), *region[1:]), y_lo, y_hi, counter)
            cond, target = cond[zs - z_lo], target[z - z_lo].reshape(self.patch)
        else:
            cond, target = self._read(region, y_lo, y_hi, counter)
            cond, target = cond.reshape(self.patch), target.reshape(self.patch)
        if augment:
            square = self.patch[-1] == self.patch[-2]
            k, flip = int(rng.integers(4)) if square else 2 * int(rng.integers(2)), bool(rng.integers(2))
            cond, target = (np.rot90(a, k, axes=(-2, -1)) for a in (cond, target))
            if flip:
                cond, target = cond[..., ::-1], target[..., ::-1]
            if (self.spatial_dims == 3 or self.z_context) and rng.integers(2):  # z flips: the PSF is symmetric in z
                cond, target = cond[::-1], (target[::-1] if self.spatial_dims == 3 else target)
        return np.ascontiguousarray(cond), np.ascontiguousarray(target)

    def __call__(self, iteration: int, lo: int = 0, hi: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Samples lo..hi (default: all B) of the training batch for `iteration`: (cond, target), float32
        (hi - lo, *patch). A DDP rank takes its slice of the global batch, which is the same whoever reads it."""
        return self._batch(1, iteration, lo, self.batch if hi is None else hi)

    def _batch(self, stream: int, iteration: int, lo: int, hi: int, val: bool = False):
        y_lo, y_hi = (self.y_split, self.target.shape[-2]) if val else (0, self.y_split)
        # One generator per sample, keyed by its index in the global batch, so any slice of the batch can be drawn
        # alone (exact sharding across DDP ranks) and gives the same patches as drawing the whole batch.
        pairs = [self._draw(np.random.default_rng([self.seed, stream, iteration, b]), y_lo, y_hi,
                            (stream, iteration, b), not val) for b in range(lo, hi)]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])

    def levels(self, iteration: int, lo: int = 0, hi: int | None = None, *, val: bool = False) -> np.ndarray:
        """(photons at the reference intensity, read noise in photons) that the degradation drew for samples lo..hi
        of `iteration`'s batch (val: of the validation patches), float64 (hi - lo, 2)."""
        if self.degrade is None:
            raise UserError("a paired input image has no known noise level: train with --degrade to condition on it")
        stream, iteration = (2, 0) if val else (1, iteration)
        hi = self.batch if hi is None else hi
        return np.array([self.degrade.level((stream, iteration, b)) for b in range(lo, hi)], np.float64)

    def photons(self, iteration: int, lo: int = 0, hi: int | None = None, *, val: bool = False) -> np.ndarray:
        """What a model conditioned on the noise level is told for these samples: the noise variance at the
        reference intensity in photons (drawn photons + read noise²), which is what
        evaluation.metrics.shot_noise_photons measures on such an image. (hi - lo,)"""
        levels = self.levels(iteration, lo, hi, val=val)
        return levels[:, 0] + levels[:, 1] ** 2

    def validation(self, n: int = 8) -> tuple[np.ndarray, np.ndarray]:
        """n fixed patches from the held-out region."""
        if self.y_split == self.target.shape[-2]:
            raise UserError("no validation region: set a validation fraction > 0")
        return self._batch(2, 0, 0, n, val=True)

    def fit_normalisation(self, n_batches: int = 4) -> Normalisation:
        """Percentile normalisation from a few training batches (never the validation region)."""
        batches = [self._batch(3, i, 0, self.batch) for i in range(n_batches)]
        return Normalisation.fit(np.concatenate([b[0].ravel() for b in batches]),
                                 np.concatenate([b[1].ravel() for b in batches]))
