"""`python -m supervisor` runs the command line."""

from .cli import main

main()
