"""`python -m sdsurgery ...` runs the command line (the same as the `sdsurgery` script)."""
from sdsurgery_cli import run

run()
