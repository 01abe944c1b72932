"""`python -m gpufleet.demo up|down`: see gpufleet.demo.run."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from gpufleet.demo.run import DEFAULT_INVENTORY, DEMO_RAMP, REPORTS, down, up
from gpufleet.errors import ConfigError
from gpufleet.testbed.hosts import HostError
from gpufleet.testbed.images import ImageError


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpufleet.demo",
                                     description="The whole chain on this machine's test bed (make demo).")
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    start = sub.add_parser("up", help="images, test bed hosts, deploy/site.py, the SLO ramp, the summary")
    start.add_argument("--inventory", type=Path, default=DEFAULT_INVENTORY)
    start.add_argument("--ramp", default=" ".join(DEMO_RAMP), metavar="OPTIONS",
                       help="gpufleet loadtest options for the ramp (default: %(default)s)")
    start.add_argument("--reports", type=Path, default=REPORTS, metavar="DIR",
                       help="where the run folder demo-<UTC>/ goes (default: reports/)")
    stop = sub.add_parser("down", help="remove the test bed hosts (with --all: keys, images, caches too)")
    stop.add_argument("--inventory", type=Path, default=DEFAULT_INVENTORY)
    stop.add_argument("--all", action="store_true", help="also the test bed's keys, images and cache folder")
    args = parser.parse_args(argv)
    try:
        if args.action == "up":
            return up(args.inventory, tuple(args.ramp.split()), args.reports.resolve())
        down(args.inventory, everything=args.all)
        return 0
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return 2
    except (HostError, ImageError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the step's command got the same Ctrl-C and stopped
        print("\ninterrupted: what is up stays up; make demo runs again from here, make demo-down removes it",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
