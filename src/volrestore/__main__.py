"""`python -m volrestore` runs the command-line interface."""

from volrestore.cli import main

main()
