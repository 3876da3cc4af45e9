"""volrestore: restore large 3D fluorescence volumes in OME-Zarr with a conditional diffusion model on Dask."""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("volrestore")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

from volrestore.errors import UserError  # noqa: E402


def open(path, level=0):  # noqa: A001 - mirrors xarray/zarr naming on purpose
    """Open an OME-Zarr image level as a lazy, dask-backed xarray.DataArray with physical coordinates."""
    from volrestore.io.ngff import open_image

    return open_image(path, level=level)


def restore(*args, **kwargs):
    """Restore an OME-Zarr image blockwise on a Dask cluster; see volrestore.blockwise.restore.restore."""
    from volrestore.blockwise.restore import restore as _restore

    return _restore(*args, **kwargs)


__all__ = ["UserError", "__version__", "open", "restore"]
