"""The `gpufleet` command line.

`main` imports the commands only when called, so the host agent (gpufleet.agent), which ships a few
of these command modules without the controller's dependencies, can import them on their own.
"""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from gpufleet.cli.main import main as run

    return run(argv)


__all__ = ["main"]
