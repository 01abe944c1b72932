"""The gateway exporter's command line, and that the package runs with nothing but the standard library
and prometheus_client (gateway hosts run it from a zipapp without gpufleet's other dependencies)."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gpufleet.cli.main import build_parser, main
from gpufleet.gatewaylog import cli

# the gpufleet modules the exporter may import besides its own package (all are in the zipapp)
OWN = ("gpufleet", "gpufleet.listen", "gpufleet.gatewaylog")

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "gpufleet" / "gatewaylog"

# Runs in a fresh interpreter: every import outside the standard library, prometheus_client,
# the `gpufleet` package's own __init__, gpufleet.listen and gpufleet.gatewaylog fails, as it would
# in the zipapp. (Keep the names in step with OWN.)
ISOLATED = textwrap.dedent(
    """
    import importlib.abc, sys, tempfile, os

    class OnlyWhatTheZipappHas(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            top = name.partition(".")[0]
            if top in sys.stdlib_module_names or top == "prometheus_client":
                return None
            own = ("gpufleet", "gpufleet.listen", "gpufleet.gatewaylog")
            if name in own or name.startswith("gpufleet.gatewaylog."):
                return None
            raise ModuleNotFoundError(f"not in the zipapp: {name}")

    sys.meta_path.insert(0, OnlyWhatTheZipappHas())
    import gpufleet.gatewaylog.cli, gpufleet.gatewaylog.service
    from prometheus_client import generate_latest

    folder = tempfile.mkdtemp()
    log = os.path.join(folder, "access.log")
    exporter = gpufleet.gatewaylog.service.GatewayLogExporter(log, "m")
    exporter.poll_once()
    with open(log, "ab") as f:
        f.write(b'{"status":200,"request_time":0.5,"client":"web"}\\n')
    exporter.poll_once()
    text = generate_latest(exporter.registry).decode()
    assert 'gpufleet_gateway_requests_total{client="web",model_name="m",status="200"} 1.0' in text, text
    try:
        gpufleet.gatewaylog.cli.main(["--help"])
    except SystemExit as exc:
        assert exc.code == 0
    loaded = sorted(n for n in sys.modules if n.startswith("gpufleet"))
    print(" ".join(loaded))
    """
)


def test_the_package_runs_with_only_the_standard_library_and_prometheus_client() -> None:
    result = subprocess.run([sys.executable, "-I", "-c", ISOLATED], capture_output=True, text=True, timeout=60,
                            cwd=REPO)
    assert result.returncode == 0, result.stderr
    loaded = result.stdout.strip().splitlines()[-1].split()
    assert "gpufleet.gatewaylog.follower" in loaded and "gpufleet.gatewaylog.collector" in loaded
    assert all(name in OWN or name.startswith("gpufleet.gatewaylog") for name in loaded), loaded


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def test_every_module_imports_only_what_the_zipapp_has() -> None:
    """Also imports inside functions, which the isolated run above may not reach."""
    files = [*PACKAGE.glob("*.py"), REPO / "gpufleet" / "cli" / "gateway_exporter_cmd.py"]
    assert len(files) >= 8
    for path in files:
        for name in _imports(path):
            top = name.partition(".")[0]
            assert (
                top in sys.stdlib_module_names or top in ("__future__", "prometheus_client")
                or name in OWN or name.startswith("gpufleet.gatewaylog.")
            ), f"{path.relative_to(REPO)} imports {name}"


def test_parse_listen() -> None:
    assert cli.parse_listen("127.0.0.1:9145") == ("127.0.0.1", 9145)
    assert cli.parse_listen("[::1]:9145") == ("::1", 9145)
    assert cli.parse_listen("0.0.0.0:0") == ("0.0.0.0", 0)
    for bad in ("9145", ":9145", "host:", "host:http", "h:70000", ""):
        with pytest.raises(ValueError, match="HOST:PORT"):
            cli.parse_listen(bad)


def test_the_subcommand_and_its_defaults() -> None:
    args = build_parser().parse_args(["gateway-exporter", "--model-name", "qwen2.5-7b-instruct"])
    assert args.log == "/var/log/nginx/gpufleet-access.log"
    assert args.listen == "127.0.0.1:9145"
    assert args.model_name == "qwen2.5-7b-instruct"
    assert args.log_level == "info"
    assert args.handler.__module__ == "gpufleet.cli.gateway_exporter_cmd"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ([], "the following arguments are required: --model-name"),
        (["--model-name", "m", "--listen", "nowhere"], "--listen 'nowhere': expected HOST:PORT"),
        (["--model-name", " "], "--model-name: give the gateway's served model name"),
        (["--model-name", "m", "--log", ""], "--log: give the access log's path"),
        (["--model-name", "m", "--log-level", "loud"], "invalid choice: 'loud'"),
        (["--model-name", "m", "--interval", "1"], "unrecognized arguments: --interval 1"),
    ],
)
def test_bad_flags_exit_2_before_anything_starts(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["gateway-exporter", *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error: " in err and message in err, err
    with pytest.raises(SystemExit) as standalone:
        cli.main(flags)
    assert standalone.value.code == 2
    assert message in capsys.readouterr().err
