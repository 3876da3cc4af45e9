"""Command-line interface: thin click commands over the Python API; user errors become one line and exit code 2."""

import sys

import click

from . import __version__
from .errors import UserError


class _Group(click.Group):
    """A click group that turns UserError (from any command) into a one-line message and exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(UserError.exit_code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="volrestore")
def main():
    """Restore large 3D fluorescence volumes (OME-Zarr) with a conditional diffusion model on Dask."""


def command_line() -> str:
    """The command as the user typed it, for provenance."""
    return " ".join(["volrestore", *sys.argv[1:]])


# Commands are added below, one block per stage; keep each thin and call the Python API.
