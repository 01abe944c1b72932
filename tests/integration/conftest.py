"""Run gpufleet and pyinfra as a user would: real processes, real files, exit codes and output."""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "inventories" / "example"
BIN = Path(sys.executable).parent


@dataclass
class Result:
    code: int
    out: str
    err: str


def run(*args: str, cwd: Path = REPO, timeout: int = 120) -> Result:
    proc = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=timeout)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def gpufleet(*args: str, cwd: Path = REPO) -> Result:
    return run(str(BIN / "gpufleet"), *args, cwd=cwd)


def pyinfra(*args: str) -> Result:
    return run(str(BIN / "pyinfra"), *args)


@pytest.fixture
def example_copy(tmp_path: Path) -> Path:
    """The example inventory copied to a temporary folder, without secrets."""
    target = tmp_path / "example"
    shutil.copytree(EXAMPLE, target, ignore=shutil.ignore_patterns("secrets"))
    return target
