"""`python -m embedq` runs the command line."""

from embedq.cli import main

main()
