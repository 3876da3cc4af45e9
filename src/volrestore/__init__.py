"""volrestore: restore large 3D fluorescence volumes in OME-Zarr with a conditional diffusion model on Dask."""

from volrestore.errors import UserError
from volrestore.provenance import __version__


def open(path, level=0):  # noqa: A001 - mirrors xarray/zarr naming on purpose
    """Open an OME-Zarr image level as a lazy, dask-backed xarray.DataArray with physical coordinates."""
    from volrestore.io.ngff import open_image

    return open_image(path, level=level)


def write_image(path, data, **kwargs):
    """Write a numpy array as a complete OME-Zarr image; see volrestore.io.images.write_image for the options."""
    from volrestore.io.images import write_image as _write_image

    return _write_image(path, data, **kwargs)


def restore(*args, **kwargs):
    """Restore an OME-Zarr image blockwise on a Dask cluster; see volrestore.blockwise.restore.restore."""
    from volrestore.blockwise.restore import restore as _restore

    return _restore(*args, **kwargs)


__all__ = ["UserError", "__version__", "open", "restore", "write_image"]
