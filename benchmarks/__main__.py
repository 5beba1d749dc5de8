"""Entry point: `python -m benchmarks`."""

from benchmarks.run import cli

cli()
