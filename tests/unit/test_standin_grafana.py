"""The stand-in `grafana` package: catalogue entry, deb, repository layout, maintainer script and server internals.

The deb is built with dpkg-deb alone (no key); the repository indexes are written without signing.
The server's pure functions (its settings, its YAML subset, Grafana's interval variables) are
exercised by loading the rendered program as a module; tests/integration/test_standin_grafana.py
runs it as a server.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from gpufleet.testbed.standin import MirrorInfo, debs, packages, repo

pytestmark = pytest.mark.unit

VERSION = "12.2.1"
HOME = "/usr/share/grafana"
PROGRAMS = {f"{HOME}/bin/grafana", "/usr/sbin/grafana-server", "/usr/sbin/grafana-cli"}
CONFFILES = ["/etc/default/grafana-server", "/etc/grafana/grafana.ini"]


@pytest.fixture(scope="module")
def grafana() -> packages.Package:
    return packages.grafana_package()


@pytest.fixture(scope="module")
def deb(grafana: packages.Package, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("deb")
    return debs.build_deb(grafana, folder, folder / "scratch")


@pytest.fixture(scope="module")
def server(grafana: packages.Package, tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    """The stand-in server program, as shipped, loaded as a module."""
    path = tmp_path_factory.mktemp("program") / "grafana_standin.py"
    path.write_bytes(next(entry.data for entry in grafana.files if entry.path == f"{HOME}/bin/grafana"))
    spec = importlib.util.spec_from_file_location("grafana_standin", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shipped(package: packages.Package, path: str) -> str:
    return next(entry.data for entry in package.files if entry.path == path).decode()


# --- the catalogue ----------------------------------------------------------------------------------------


def test_catalogue_entry_has_the_real_name_version_and_depends(grafana: packages.Package) -> None:
    assert (grafana.name, grafana.version, grafana.arch) == ("grafana", VERSION, "amd64")
    assert packages.GRAFANA_VERSION == VERSION
    assert grafana.depends == ("adduser", "python3")
    assert grafana.filename == "grafana_12.2.1_amd64.deb"


def test_description_says_it_is_a_stand_in(grafana: packages.Package) -> None:
    assert grafana.description.startswith("gpufleet STAND-IN for the test bed (not Grafana: no UI, no database, ")
    assert "Never install it on a real host." in " ".join(packages.LONG_DESCRIPTION)


def test_files_follow_the_real_package_layout(grafana: packages.Package) -> None:
    files = {entry.path: entry for entry in grafana.files}
    assert set(files) == PROGRAMS | {
        f"{HOME}/README.standin", "/usr/sbin/grafana", "/lib/systemd/system/grafana-server.service", *CONFFILES,
    }  # fmt: skip
    assert {path for path, entry in files.items() if entry.mode == 0o755} == PROGRAMS
    assert files["/usr/sbin/grafana"].link == f"{HOME}/bin/grafana"
    assert [entry.path for entry in grafana.files if entry.conffile] == CONFFILES
    assert [name for name, _ in grafana.scripts] == ["postinst", "prerm"]


def test_templates_are_fully_rendered(grafana: packages.Package) -> None:
    for data in [entry.data for entry in grafana.files] + [script for _, script in grafana.scripts]:
        assert re.search(rb"@[A-Z_]+@", data) is None


def test_unit_runs_the_server_as_grafana_with_the_defaults_file(grafana: packages.Package) -> None:
    unit = shipped(grafana, "/lib/systemd/system/grafana-server.service")
    lines = (
        "User=grafana",
        "Group=grafana",
        "EnvironmentFile=-/etc/default/grafana-server",
        "Type=simple",
        "WorkingDirectory=/usr/share/grafana",
        "RuntimeDirectory=grafana",
        "WantedBy=multi-user.target",
    )
    for line in lines:
        assert re.search(rf"^{re.escape(line)}$", unit, flags=re.MULTILINE), line
    exec_start = re.search(r"^ExecStart=((?:.*\\\n)*.*)$", unit, flags=re.MULTILINE)
    assert exec_start
    words = exec_start.group(1).replace("\\\n", " ").split()
    assert words[:2] == ["/usr/share/grafana/bin/grafana", "server"]
    assert {"--config=${CONF_FILE}", "--homepath=/usr/share/grafana", "--packaging=deb",
            "cfg:default.paths.provisioning=${PROVISIONING_CFG_DIR}", "cfg:default.paths.data=${DATA_DIR}",
            "cfg:default.paths.logs=${LOG_DIR}"} <= set(words)  # fmt: skip


def test_defaults_file_names_the_package_folders(grafana: packages.Package) -> None:
    text = shipped(grafana, "/etc/default/grafana-server")
    values = dict(line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert values["CONF_FILE"] == "/etc/grafana/grafana.ini"
    assert values["PROVISIONING_CFG_DIR"] == "/etc/grafana/provisioning"
    assert (values["DATA_DIR"], values["LOG_DIR"]) == ("/var/lib/grafana", "/var/log/grafana")
    assert (values["GRAFANA_USER"], values["GRAFANA_GROUP"]) == ("grafana", "grafana")


def test_grafana_ini_is_all_commented_defaults(grafana: packages.Package, server: ModuleType, tmp_path: Path) -> None:
    text = shipped(grafana, "/etc/grafana/grafana.ini")
    assert "gpufleet STAND-IN" in text
    settings = [line for line in text.splitlines() if line.strip() and line.lstrip()[0] not in "#;["]
    assert settings == []
    (tmp_path / "grafana.ini").write_text(text)
    parsed = server.read_ini(tmp_path / "grafana.ini")
    assert {"paths", "server", "security", "auth.anonymous"} <= set(parsed)
    assert all(values == {} for values in parsed.values())


# --- the deb and its repository ---------------------------------------------------------------------------


def test_deb_metadata_and_contents(deb: Path, tmp_path: Path) -> None:
    field = lambda name: subprocess.run(["dpkg-deb", "-f", str(deb), name], capture_output=True, text=True,  # noqa: E731
                                        check=True).stdout.strip()  # fmt: skip
    assert (field("Package"), field("Version"), field("Depends")) == ("grafana", VERSION, "adduser, python3")
    assert field("Maintainer") == "gpufleet test bed"
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True).stdout
    modes = {line.split()[5].removeprefix("."): line.split()[0] for line in listing.splitlines()}
    for program in PROGRAMS:
        assert modes[program] == "-rwxr-xr-x", program
    assert modes["/usr/sbin/grafana"].startswith("l")
    control = tmp_path / "control"
    subprocess.run(["dpkg-deb", "-e", str(deb), str(control)], check=True)
    assert (control / "conffiles").read_text().splitlines() == CONFFILES
    assert (control / "postinst").stat().st_mode & 0o777 == 0o755


def test_shipped_program_prints_its_version(deb: Path, tmp_path: Path) -> None:
    subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp_path)], check=True)
    program = tmp_path / "usr/share/grafana/bin/grafana"
    for args in (["--version"], ["server", "-v"], ["server", "--config=/nonexistent", "-v"]):
        result = subprocess.run([sys.executable, str(program), *args], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"Version {VERSION} (gpufleet stand-in: not Grafana"), args
    assert (program.read_text().splitlines()[0]) == "#!/usr/bin/python3"
    cli = subprocess.run(
        [sys.executable, str(program), "cli", "admin", "reset-admin-password", "x"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert cli.returncode == 1 and "grafana cli is not provided by the gpufleet stand-in" in cli.stderr


def test_repository_is_laid_out_as_apt_grafana_com(grafana: packages.Package) -> None:
    found = [r for r in packages.repositories(b"key", "6.1.0-18-amd64") if r.path == "grafana/deb"]
    assert len(found) == 1
    grafana_repo = found[0]
    assert (grafana_repo.suite, grafana_repo.component, grafana_repo.architecture) == ("stable", "main", "amd64")
    assert not grafana_repo.flat
    assert grafana_repo.packages == (grafana,)
    assert grafana_repo.deb_path(grafana) == "pool/main/g/grafana/grafana_12.2.1_amd64.deb"
    assert (grafana_repo.release_dir, grafana_repo.index_dir) == ("dists/stable", "main/binary-amd64")


def test_flat_repositories_keep_their_layout() -> None:
    for flat in [r for r in packages.repositories(b"key", "6.1.0-18-amd64") if r.path != "grafana/deb"]:
        assert flat.flat and flat.release_dir == flat.index_dir == ""
        assert all(flat.deb_path(p) == p.filename for p in flat.packages)


def test_dists_indexes_name_the_pool_and_the_suite(grafana: packages.Package, deb: Path, tmp_path: Path) -> None:
    grafana_repo = next(r for r in packages.repositories(b"key", "6.1.0-18-amd64") if r.path == "grafana/deb")
    pool = tmp_path / grafana_repo.deb_path(grafana)
    pool.parent.mkdir(parents=True)
    pool.write_bytes(deb.read_bytes())
    index = repo.write_packages(tmp_path, grafana_repo)
    assert index == tmp_path / "dists/stable/main/binary-amd64"
    stanza = (index / "Packages").read_text()
    assert "Filename: pool/main/g/grafana/grafana_12.2.1_amd64.deb\n" in stanza
    assert f"SHA256: {hashlib.sha256(deb.read_bytes()).hexdigest()}\n" in stanza
    release = repo.release_text(tmp_path, grafana_repo)
    for line in ("Suite: stable", "Codename: stable", "Components: main", "Architectures: amd64",
                 "Origin: gpufleet test bed"):  # fmt: skip
        assert f"{line}\n" in release
    size = len((index / "Packages").read_bytes())
    assert re.search(rf"^ [0-9a-f]{{64}} +{size} main/binary-amd64/Packages$", release, flags=re.MULTILINE)


def test_mirror_info_gives_the_grafana_urls() -> None:
    info = MirrorInfo(Path("/srv/mirror"), "h", "F" * 40, "6.1.0-18-amd64", built=False)
    assert info.grafana_repo_url("http://127.0.0.1:8765/") == "http://127.0.0.1:8765/grafana/deb"
    assert info.grafana_gpgkey_url("http://127.0.0.1:8765") == "http://127.0.0.1:8765/grafana/gpg.key"


# --- the maintainer script ----------------------------------------------------------------------------------

STUBS = {"getent": 2, "id": 1, "addgroup": 0, "adduser": 0, "mkdir": 0, "chown": 0, "chmod": 0, "find": 0,
         "systemctl": 0}  # fmt: skip


def run_postinst(grafana: packages.Package, tmp_path: Path, *args: str) -> tuple[str, list[str]]:
    """The postinst under sh with every command it changes the system with replaced by a stub that logs its call."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    calls = tmp_path / "calls"
    for name, code in STUBS.items():
        (bin_dir / name).write_text(f'#!/bin/sh\necho "{name} $*" >>"{calls}"\nexit {code}\n')
        (bin_dir / name).chmod(0o755)
    script = tmp_path / "postinst"  # reading a defaults file of ours, not this machine's
    text = dict(grafana.scripts)["postinst"].decode()
    script.write_text(text.replace("/etc/default/grafana-server", str(tmp_path / "grafana-server.default")))
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path)}
    result = subprocess.run(["sh", str(script), *args], capture_output=True, text=True, env=env, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout, calls.read_text().splitlines() if calls.exists() else []


def test_postinst_creates_the_user_and_folders_and_does_not_start(grafana: packages.Package, tmp_path: Path) -> None:
    output, calls = run_postinst(grafana, tmp_path, "configure", "")
    assert "addgroup --system grafana --quiet" in calls
    assert ("adduser --system --home /usr/share/grafana --no-create-home --ingroup grafana --disabled-password "
            "--shell /bin/false grafana") in calls  # fmt: skip
    assert "mkdir -p /var/log/grafana /var/lib/grafana" in calls
    assert "chown -R grafana:grafana /var/log/grafana /var/lib/grafana" in calls
    assert ("mkdir -p /etc/grafana/provisioning/dashboards /etc/grafana/provisioning/datasources "
            "/etc/grafana/provisioning/plugins /etc/grafana/provisioning/alerting") in calls  # fmt: skip
    assert not [call for call in calls if call.startswith("systemctl")], "the package must not start grafana-server"
    assert "### NOT starting on installation" in output
    assert "sudo /bin/systemctl enable grafana-server" in output


def test_postinst_on_upgrade_restarts_as_the_defaults_file_says(grafana: packages.Package, tmp_path: Path) -> None:
    (tmp_path / "grafana-server.default").write_text(shipped(grafana, "/etc/default/grafana-server"))
    _, calls = run_postinst(grafana, tmp_path, "configure", "12.2.0")
    assert [call for call in calls if call.startswith("systemctl")] == [
        "systemctl daemon-reload",
        "systemctl restart grafana-server",
    ]


# --- the server's internals ---------------------------------------------------------------------------------


def test_settings_follow_grafanas_order(server: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ini = tmp_path / "grafana.ini"
    (tmp_path / "secret").write_text("from-a-file\n")
    monkeypatch.setenv("GPUFLEET_TEST_ADMIN", "ops")
    ini.write_text(f"[paths]\ndata = /srv/data\n[security]\nadmin_user = $__env{{GPUFLEET_TEST_ADMIN}}\n"
                   f"admin_password = $__file{{{tmp_path / 'secret'}}}\n[server]\nhttp_port = 3001 ; inline comment\n"
                   'domain = """a;b#c"""\n')  # fmt: skip
    settings = server.load_settings(str(ini), "/home/g", [
        "cfg:default.paths.data=/var/lib/grafana", "cfg:default.paths.provisioning=/etc/grafana/provisioning",
        "cfg:server.http_addr=127.0.0.1",
    ])  # fmt: skip
    assert settings["paths"]["data"] == "/srv/data"  # the ini file beats cfg:default.
    assert settings["paths"]["provisioning"] == "/etc/grafana/provisioning"
    assert settings["paths"]["logs"] == "/home/g/data/log"  # relative to the home path
    assert settings["server"] == {"http_addr": "127.0.0.1", "http_port": "3001", "domain": "a;b#c"}
    assert (settings["security"]["admin_user"], settings["security"]["admin_password"]) == ("ops", "from-a-file")
    monkeypatch.setenv("GF_SECURITY_ADMIN_PASSWORD", "from-env")
    monkeypatch.setenv("GF_AUTH_ANONYMOUS_ENABLED", "true")
    settings = server.load_settings(str(ini), "/home/g", ["cfg:security.admin_password=from-cli"])
    assert settings["security"]["admin_password"] == "from-cli"  # cfg: beats GF_* beats the file
    assert settings["auth.anonymous"]["enabled"] == "true"


def test_settings_errors_are_fatal(server: ModuleType, tmp_path: Path) -> None:
    with pytest.raises(server.Fatal, match="failed to parse"):
        server.load_settings(str(tmp_path / "missing.ini"), "/", [])
    (tmp_path / "bad.ini").write_text("[server]\nhttp_port\n")
    with pytest.raises(server.Fatal, match=r"bad.ini:2: key-value delimiter not found"):
        server.load_settings(str(tmp_path / "bad.ini"), "/", [])
    (tmp_path / "file.ini").write_text(f"[security]\nadmin_password = $__file{{{tmp_path / 'nope'}}}\n")
    with pytest.raises(server.Fatal, match=r"\[security\] admin_password: could not expand \$__file"):
        server.load_settings(str(tmp_path / "file.ini"), "/", [])
    with pytest.raises(server.Fatal, match="expected cfg:"):
        server.load_settings(None, "/", ["paths.data=/x"])


DATASOURCES = """\
# Grafana provisioning, as a role writes it
apiVersion: 1

deleteDatasources:
  - name: Old
    orgId: 1
datasources:
- name: Prometheus   # the fleet's
  type: prometheus
  uid: "prom-1"
  url: http://127.0.0.1:9090
  isDefault: true
  jsonData:
    timeInterval: 15s
    customQueryParameters: 'a=b#c'
    tags: [gpu, "slo, p99", 3]
    exemplars: []
    nested: {"x": [1, 2]}
    flow: {httpMethod: GET, url: 'http://127.0.0.1:1', 'a, b': "c, d", empty:}
  secureJsonData: {}
-
  name: 'It''s empty'
  type: testdata
"""


def test_yaml_subset_reads_provisioning_files(server: ModuleType) -> None:
    doc = server.Yaml(DATASOURCES).document()
    flow = {"httpMethod": "GET", "url": "http://127.0.0.1:1", "a, b": "c, d", "empty": None}
    assert doc["datasources"][0]["jsonData"].pop("flow") == flow
    assert doc == {
        "apiVersion": 1,
        "deleteDatasources": [{"name": "Old", "orgId": 1}],
        "datasources": [
            {"name": "Prometheus", "type": "prometheus", "uid": "prom-1", "url": "http://127.0.0.1:9090",
             "isDefault": True, "jsonData": {"timeInterval": "15s", "customQueryParameters": "a=b#c",
                                             "tags": ["gpu", "slo, p99", 3], "exemplars": [], "nested": {"x": [1, 2]}},
             "secureJsonData": {}},
            {"name": "It's empty", "type": "testdata"},
        ],
    }  # fmt: skip
    assert server.Yaml("# only comments\n\n").document() is None
    assert server.Yaml("---\na: ~\nb:\nc: -1.5\n").document() == {"a": None, "b": None, "c": -1.5}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: 1\n  b: 2\n", "line 2: bad indentation"),
        ("a:\n\t- 1\n", "line 2: tabs cannot indent YAML"),
        ("a: 1\na: 2\n", "line 2: mapping key 'a' already defined"),
        ("a: &x 1\n", "anchors, aliases, tags and block scalars"),
        ("a: |\n  text\n", "anchors, aliases, tags and block scalars"),
        ("a: 'open\n", "unterminated string"),
        ("a: 1\n---\nb: 2\n", "one document per file"),
        ("a: [1, [2]\n", "flow collections in JSON, or one level deep"),
        ("a: {b}\n", "expected `key: value` pairs"),
    ],
)
def test_yaml_subset_refuses_what_it_does_not_read(server: ModuleType, text: str, message: str) -> None:
    with pytest.raises(server.YamlError, match=re.escape(message)):
        server.Yaml(text).document()


def test_interpolation_in_provisioning_values(server: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROM_PORT", "9090")
    value = {"url": "http://127.0.0.1:$PROM_PORT/${PROM_PORT}", "cost": "$$5", "n": 3, "list": ["$__env{PROM_PORT}"]}
    assert server.interpolate(value, "x") == {"url": "http://127.0.0.1:9090/9090", "cost": "$5", "n": 3,
                                              "list": ["9090"]}  # fmt: skip


def test_generated_datasource_uid_is_grafanas(server: ModuleType) -> None:
    """What Grafana's safeUIDFromName gives "Prometheus": the uid dashboards everywhere carry for it."""
    assert server.safe_uid("Prometheus") == "PBFA97CFB590B2093"


@pytest.mark.parametrize(
    ("seconds", "interval", "go"),
    [(0.5, "500ms", "500ms"), (15, "15s", "15s"), (60, "1m", "1m0s"), (75, "1m", "1m15s"), (90, "1m", "1m30s"),
     (3600, "1h", "1h0m0s"), (86400 * 2, "2d", "48h0m0s")],
)  # fmt: skip
def test_interval_formats(server: ModuleType, seconds: float, interval: str, go: str) -> None:
    assert server.format_interval(seconds) == interval
    assert server.go_duration(seconds) == go


def test_variables_are_substituted_longest_name_first(server: ModuleType) -> None:
    expr = "rate(x[$__rate_interval]) / $__interval_ms + ${__interval} + $__range + $__range_s + $__unknown"
    assert server.substitute(expr, 30, 60, 3600) == "rate(x[1m0s]) / 30000 + 30s + 3600s + 3600 + $__unknown"


def test_time_parsing(server: ModuleType) -> None:
    now = 1_700_000_000.0
    assert server.parse_time("now", now) == now
    assert server.parse_time("now-5m", now) == now - 300
    assert server.parse_time("now+1h", now) == now + 3600
    assert server.parse_time("1699999999500", now) == 1699999999.5
    with pytest.raises(ValueError, match="invalid time"):
        server.parse_time("yesterday", now)
    assert server.parse_duration(">30s") == 30
    assert server.parse_duration("250ms") == 0.25
