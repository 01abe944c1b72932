"""`python -m gpufleet.testbed.standin build OUTDIR [--kernel-release R]`: build (or find up to date) the mirror."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from gpufleet.testbed.standin import StandinError, build_mirror


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gpufleet.testbed.standin",
        description="Build the test bed's mirror of stand-in NVIDIA and Grafana packages, served as-is over HTTP.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build OUTDIR unless it is up to date")
    build.add_argument("outdir", type=Path, help="the mirror's root (created; only its cuda/, libnvidia-container/, "
                       "testbed/ and grafana/ folders are replaced)")  # fmt: skip
    build.add_argument("--kernel-release", help="for linux-headers-<R> (default: this machine's uname -r)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        info = build_mirror(args.outdir, args.kernel_release)
    except StandinError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    state = "built" if info.built else "up to date"
    print(f"{info.out}: {state} in {time.monotonic() - started:.2f}s (content {info.content_hash[:12]}, "
          f"key {info.key_fingerprint}, linux-headers-{info.kernel_release})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
