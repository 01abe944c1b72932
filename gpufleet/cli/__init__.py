"""The `gpufleet` command line."""

from gpufleet.cli.main import main

__all__ = ["main"]
