"""`python -m sdsurgery ...` runs the command line (the same as the `sdsurgery` script)."""
from cli import run

run()
