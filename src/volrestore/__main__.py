"""`python -m volrestore` runs the command-line interface."""

from .cli import main

main()
