"""The stand-in programs, run as shipped (rendered from the catalogue) against a temporary state root.

Every program honours GPUFLEET_STANDIN_ROOT, so each test lays out a host's state under tmp_path:
the simulated GPUs, the installed and the loaded driver, Docker's daemon.json, CDI specs.
nvidia-smi and the loader are POSIX sh: they run under dash and under busybox (the container
hook copies nvidia-smi into busybox-only images). The host-side tools run with Debian's python3.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from gpufleet.testbed.standin import packages

NEW, OLD = packages.DRIVER_VERSIONS  # 580.126.20-1, 580.105.08-1
NEW_UP, OLD_UP = packages.upstream(NEW), packages.upstream(OLD)
TOOLKIT = packages.TOOLKIT_VERSIONS[0]
GPUS = [
    ("0", "NVIDIA GeForce RTX 4090 D", "GPU-11111111-aaaa-4bbb-8ccc-000000000000", "24564", "00000000:01:00.0"),
    ("1", "NVIDIA GeForce RTX 4090 D", "GPU-22222222-aaaa-4bbb-8ccc-000000000001", "24564", "00000000:41:00.0"),
    ("2", "NVIDIA H100 80GB HBM3", "GPU-33333333-aaaa-4bbb-8ccc-000000000002", "81559", "00000000:81:00.0"),
]
NO_DRIVER = (
    "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
    "Make sure that the latest NVIDIA driver is installed and running."
)
SHELLS = {"dash": ["sh"], "busybox": ["busybox", "sh"]}

Result = subprocess.CompletedProcess[str]
Run = Callable[..., Result]


def shipped(path: str, version: str = NEW) -> bytes:
    """The file at `path` exactly as the catalogue puts it into the package of that version."""
    candidates = [*packages.driver_packages(version), *packages.toolkit_packages(version)]
    for package in candidates:
        for entry in package.files:
            if entry.path == path:
                return entry.data
    raise AssertionError(f"no package of version {version} ships {path}")


def host_python() -> str:
    """Debian's python3 (the test bed hosts' interpreter) when this machine has it."""
    return "/usr/bin/python3" if Path("/usr/bin/python3").is_file() else sys.executable


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A host with three simulated GPUs and no driver loaded."""
    state = tmp_path / "root"
    (state / "etc/gpufleet-testbed").mkdir(parents=True)
    (state / "etc/gpufleet-testbed/gpus").write_text("".join("|".join(gpu) + "\n" for gpu in GPUS))
    return state


def load(root: Path, version: str = NEW_UP, flavour: str = "open") -> None:
    module = root / "run/gpufleet-standin/nvidia-module"
    module.parent.mkdir(parents=True, exist_ok=True)
    module.write_text(f"{version} {flavour}\n")


def install_driver(root: Path, version: str = NEW_UP, flavour: str = "open") -> None:
    installed = root / "usr/lib/gpufleet-standin/driver-version"
    installed.parent.mkdir(parents=True, exist_ok=True)
    installed.write_text(f"{version} {flavour}\n")


def write_program(folder: Path, name: str, data: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(data)
    path.chmod(0o755)
    return path


def runner(root: Path, prefix: list[str], program: Path) -> Run:
    def run(*args: str, stdin: str | None = None, env: dict[str, str] | None = None) -> Result:
        full_env = {"PATH": os.environ["PATH"], "GPUFLEET_STANDIN_ROOT": str(root), **(env or {})}
        return subprocess.run(
            [*prefix, str(program), *args], capture_output=True, text=True, timeout=30, env=full_env, input=stdin
        )

    return run


@pytest.fixture(params=sorted(SHELLS))
def shell(request: pytest.FixtureRequest) -> list[str]:
    prefix = SHELLS[request.param]
    if shutil.which(prefix[0]) is None:
        pytest.fail(f"{prefix[0]} is needed to test the POSIX sh stand-ins; install it (scripts/bootstrap.sh)")
    return prefix


@pytest.fixture
def smi(root: Path, tmp_path: Path, shell: list[str]) -> Run:
    return runner(root, shell, write_program(tmp_path / "bin", "nvidia-smi", shipped("/usr/bin/nvidia-smi")))


@pytest.fixture
def python_tool(root: Path, tmp_path: Path) -> Callable[[str], Run]:
    def make(path: str) -> Run:
        program = write_program(tmp_path / "bin", Path(path).name, shipped(path, TOOLKIT))
        return runner(root, [host_python()], program)

    return make


# --- nvidia-smi: the three module states ----------------------------------------------------------


def test_smi_without_loaded_module_fails_like_the_real_one(smi: Run) -> None:
    result = smi()
    assert (result.returncode, result.stdout.strip()) == (9, NO_DRIVER)


def test_smi_with_another_version_loaded_reports_a_mismatch(smi: Run, root: Path) -> None:
    load(root, OLD_UP)
    result = smi("-L")
    assert result.returncode == 18
    assert result.stdout.splitlines() == [
        "Failed to initialize NVML: Driver/library version mismatch",
        f"NVML library version: {NEW_UP}",
    ]


def test_smi_with_its_version_loaded_lists_the_gpus(smi: Run, root: Path) -> None:
    load(root)
    result = smi("-L")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"GPU {index}: {name} (UUID: {uuid})" for index, name, uuid, _, _ in GPUS]


def test_smi_version_has_the_real_layout_and_says_stand_in(smi: Run, root: Path) -> None:
    load(root)
    result = smi("--version")
    assert result.returncode == 0
    assert result.stdout.splitlines() == [
        f"NVIDIA-SMI version  : {NEW_UP}",
        f"NVML version        : {NEW_UP}",
        f"DRIVER version      : {NEW_UP}",
        "CUDA Version        : 13.0",
        "gpufleet stand-in: no GPU, no NVIDIA driver",
    ]


def test_smi_with_module_but_no_gpus_finds_no_devices(smi: Run, root: Path) -> None:
    load(root)
    (root / "etc/gpufleet-testbed/gpus").unlink()
    result = smi("-L")
    assert (result.returncode, result.stdout.strip()) == (6, "No devices were found")


# --- nvidia-smi: queries ------------------------------------------------------------------------------

ALL_FIELDS = "index,name,uuid,driver_version,memory.total,pci.bus_id,persistence_mode,count"


def test_smi_csv_query_with_header_and_units(smi: Run, root: Path) -> None:
    load(root)
    result = smi(f"--query-gpu={ALL_FIELDS}", "--format=csv")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "index, name, uuid, driver_version, memory.total [MiB], pci.bus_id, persistence_mode, count"
    assert lines[1:] == [
        f"{index}, {name}, {uuid}, {NEW_UP}, {memory} MiB, {bus}, Disabled, 3"
        for index, name, uuid, memory, bus in GPUS
    ]


def test_smi_csv_noheader_nounits(smi: Run, root: Path) -> None:
    load(root)
    result = smi("--query-gpu=memory.total,name", "--format=csv,noheader,nounits")
    assert result.stdout.splitlines() == ["24564, NVIDIA GeForce RTX 4090 D"] * 2 + ["81559, NVIDIA H100 80GB HBM3"]


def test_smi_nounits_keeps_the_unit_in_the_header(smi: Run, root: Path) -> None:
    load(root)
    result = smi("--query-gpu", "memory.total", "--format", "csv,nounits")
    assert result.stdout.splitlines() == ["memory.total [MiB]", "24564", "24564", "81559"]


def test_smi_query_selects_gpus_by_index_or_uuid(smi: Run, root: Path) -> None:
    load(root)
    result = smi("--query-gpu=index,uuid", "--format=csv,noheader", "-i", f"2,{GPUS[0][2]}")
    assert result.stdout.splitlines() == [f"0, {GPUS[0][2]}", f"2, {GPUS[2][2]}"]


def test_smi_unknown_field_and_option_exit_2(smi: Run, root: Path) -> None:
    load(root)
    field = smi("--query-gpu=index,temperature.gpu", "--format=csv")
    assert field.returncode == 2
    assert 'Field "temperature.gpu" is not a valid field to query.' in field.stderr
    option = smi("-q")
    assert option.returncode == 2
    assert '"-q" is not simulated by the gpufleet stand-in' in option.stderr
    assert "supports only" in option.stderr


def test_smi_query_needs_a_format(smi: Run, root: Path) -> None:
    load(root)
    result = smi("--query-gpu=index")
    assert result.returncode == 2
    assert "--format" in result.stderr


# --- nvidia-smi: persistence ----------------------------------------------------------------------------


def persistence(smi: Run) -> list[str]:
    return smi("--query-gpu=persistence_mode", "--format=csv,noheader").stdout.splitlines()


def test_smi_pm_records_persistence_and_the_query_reflects_it(smi: Run, root: Path) -> None:
    load(root)
    enabled = smi("-pm", "1")
    assert enabled.returncode == 0, enabled.stderr
    expected = [f"Enabled persistence mode for GPU {gpu[4]}." for gpu in GPUS]
    assert enabled.stdout.splitlines() == [*expected, "All done."]
    assert (root / "run/gpufleet-standin/persistence").read_text().strip() == "1"
    assert persistence(smi) == ["Enabled"] * 3
    disabled = smi("-pm", "0")
    assert disabled.stdout.splitlines()[0] == f"Disabled persistence mode for GPU {GPUS[0][4]}."
    assert persistence(smi) == ["Disabled"] * 3


def test_smi_counts_a_running_persistenced_as_enabled(smi: Run, root: Path, tmp_path: Path) -> None:
    load(root)
    daemon = write_program(tmp_path / "sbin", "nvidia-persistenced", shipped("/usr/bin/nvidia-persistenced"))
    env = {"PATH": os.environ["PATH"], "GPUFLEET_STANDIN_ROOT": str(root)}
    process = subprocess.Popen(["sh", str(daemon), "--verbose"], env=env, stderr=subprocess.PIPE, text=True)
    pid_file = root / "run/nvidia-persistenced/nvidia-persistenced.pid"
    try:
        deadline = time.monotonic() + 10
        while not (pid_file.is_file() and pid_file.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert pid_file.read_text().strip() == str(process.pid)  # exec sleep: the pid stays the daemon's
        assert persistence(smi) == ["Enabled"] * 3
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=10)
    assert "gpufleet stand-in" in process.stderr.read()
    assert persistence(smi) == ["Disabled"] * 3  # a stale pid file does not count


def test_smi_table_has_the_real_frame_and_a_stand_in_banner(smi: Run, root: Path) -> None:
    load(root)
    result = smi()
    assert result.returncode == 0, result.stderr
    frame = [line for line in result.stdout.splitlines() if line[:1] in ("|", "+")]
    assert {len(line) for line in frame} == {91}
    text = result.stdout
    assert f"NVIDIA-SMI {NEW_UP}" in text and f"Driver Version: {NEW_UP}" in text and "CUDA Version: 13.0" in text
    assert "gpufleet STAND-IN: no GPU, no NVIDIA driver" in text
    for _, name, _, memory, bus in GPUS:
        assert name in text and bus in text and f"{memory}MiB" in text


# --- the module loader ------------------------------------------------------------------------------------


@pytest.fixture
def loader(root: Path, tmp_path: Path, shell: list[str]) -> Run:
    program = write_program(tmp_path / "lib", "load-module", shipped(f"{packages.STANDIN_LIB}/load-module"))
    return runner(root, shell, program)


def loaded(root: Path) -> str | None:
    module = root / "run/gpufleet-standin/nvidia-module"
    return module.read_text().strip() if module.exists() else None


def test_loader_records_the_installed_version_and_flavour(loader: Run, root: Path) -> None:
    install_driver(root, NEW_UP, "proprietary")
    result = loader("nvidia")
    assert result.returncode == 0, result.stderr
    assert loaded(root) == f"{NEW_UP} proprietary"
    assert loader("nvidia_uvm", "nvidia_modeset", "nvidia_drm").returncode == 0  # same version: nothing to do
    assert loaded(root) == f"{NEW_UP} proprietary"


def test_loader_refuses_to_replace_a_loaded_version(loader: Run, root: Path) -> None:
    load(root, OLD_UP)
    install_driver(root, NEW_UP)
    result = loader("nvidia")
    assert result.returncode == 1
    assert "modprobe: ERROR: could not insert 'nvidia': File exists" in result.stderr
    assert loaded(root) == f"{OLD_UP} open"
    assert loader("--remove", "nvidia").returncode == 0
    assert loaded(root) is None
    assert loader("nvidia").returncode == 0
    assert loaded(root) == f"{NEW_UP} open"


def test_loader_refuses_another_flavour_of_the_same_version(loader: Run, root: Path) -> None:
    load(root, NEW_UP, "open")
    install_driver(root, NEW_UP, "proprietary")
    assert loader("nvidia").returncode == 1
    assert loaded(root) == f"{NEW_UP} open"


def test_loader_without_gpus_or_driver_loads_nothing(loader: Run, root: Path) -> None:
    missing = loader("nvidia")
    assert missing.returncode == 1
    assert "modprobe: FATAL: Module nvidia not found" in missing.stderr
    install_driver(root)
    (root / "etc/gpufleet-testbed/gpus").unlink()
    no_gpu = loader("nvidia")
    assert no_gpu.returncode == 1
    assert "could not insert 'nvidia': No such device" in no_gpu.stderr
    assert loaded(root) is None


def test_modprobe_config_routes_every_module_to_the_loader() -> None:
    config = shipped("/etc/modprobe.d/gpufleet-standin-nvidia.conf").decode()
    rules = {tuple(line.split()[:2]): line for line in config.splitlines() if line and not line.startswith("#")}
    for module in ("nvidia", "nvidia_uvm", "nvidia_modeset", "nvidia_drm"):
        assert rules[("install", module)] == f"install {module} /usr/lib/gpufleet-standin/load-module {module}"
        assert rules[("remove", module)] == f"remove {module} /usr/lib/gpufleet-standin/load-module --remove {module}"


# --- nvidia-ctk ----------------------------------------------------------------------------------------------


@pytest.fixture
def ctk(python_tool: Callable[[str], Run]) -> Run:
    return python_tool("/usr/bin/nvidia-ctk")


NVIDIA_RUNTIME = {"args": [], "path": "nvidia-container-runtime"}


def test_ctk_version(ctk: Run) -> None:
    result = ctk("--version")
    assert result.stdout.splitlines()[0] == f"NVIDIA Container Toolkit CLI version {packages.upstream(TOOLKIT)}"


def test_ctk_runtime_configure_keeps_user_keys_and_is_idempotent(ctk: Run, tmp_path: Path) -> None:
    config = tmp_path / "daemon.json"
    config.write_text(json.dumps({"log-opts": {"max-size": "100m"}, "runtimes": {"crun": {"path": "/usr/bin/crun"}}}))
    first = ctk("runtime", "configure", "--runtime=docker", f"--config={config}")
    assert first.returncode == 0, first.stderr
    assert first.stderr.splitlines() == [
        f"INFO[0000] Wrote updated config to {config}",
        "INFO[0000] It is recommended that docker daemon be restarted.",
    ]
    written = config.read_bytes()
    assert json.loads(written) == {
        "log-opts": {"max-size": "100m"},
        "runtimes": {"crun": {"path": "/usr/bin/crun"}, "nvidia": NVIDIA_RUNTIME},
    }
    assert written.decode().startswith('{\n    "log-opts": {\n        "max-size": "100m"')  # indent 4, sorted keys
    mtime = config.stat().st_mtime_ns
    second = ctk("runtime", "configure", "--runtime", "docker", "--config", str(config))
    assert second.returncode == 0
    assert config.read_bytes() == written
    assert config.stat().st_mtime_ns == mtime


def test_ctk_runtime_configure_set_as_default_creates_the_default_file(ctk: Run, root: Path) -> None:
    result = ctk("runtime", "configure", "--runtime=docker", "--set-as-default")
    assert result.returncode == 0, result.stderr
    config = root / "etc/docker/daemon.json"
    assert json.loads(config.read_text()) == {"default-runtime": "nvidia", "runtimes": {"nvidia": NVIDIA_RUNTIME}}
    assert "Config file does not exist; using empty config" in result.stderr


def test_ctk_cdi_generate_and_list(ctk: Run, root: Path) -> None:
    load(root)
    spec = root / "etc/cdi/nvidia.yaml"
    generated = ctk("cdi", "generate", f"--output={spec}")
    assert generated.returncode == 0, generated.stderr
    text = spec.read_text()
    assert text.startswith("# gpufleet STAND-IN CDI spec")
    assert "\ncdiVersion: 0.5.0\n" in text and "\nkind: nvidia.com/gpu\n" in text
    # the driver's version is in the spec (as in the real one's library paths): that is how a stale spec shows
    assert f"  - containerPath: /usr/lib/x86_64-linux-gnu/libnvidia-ml.so.{NEW_UP}\n" in text
    for index, _, uuid, _, _ in GPUS:
        assert f'  name: "{index}"\n' in text and f"  name: {uuid}\n" in text
    listed = ctk("cdi", "list")
    assert listed.returncode == 0, listed.stderr
    expected = [f"nvidia.com/gpu={index}" for index in "012"] + [f"nvidia.com/gpu={g[2]}" for g in GPUS]
    assert listed.stdout.splitlines() == [*expected, "nvidia.com/gpu=all"]
    assert "Found 7 CDI devices" in listed.stderr


def test_ctk_runtime_configure_refuses_a_broken_config(ctk: Run, tmp_path: Path) -> None:
    config = tmp_path / "daemon.json"
    config.write_text("{not json")
    result = ctk("runtime", "configure", f"--config={config}")
    assert result.returncode == 1
    assert "unable to load config" in result.stderr
    assert config.read_text() == "{not json"


def test_ctk_cdi_list_reads_var_run_cdi(ctk: Run, root: Path) -> None:
    load(root)
    assert ctk("cdi", "generate", f"--output={root / 'var/run/cdi/nvidia.yaml'}").returncode == 0
    assert "nvidia.com/gpu=all" in ctk("cdi", "list").stdout.splitlines()


def test_ctk_cdi_generate_needs_the_driver(ctk: Run, root: Path) -> None:
    result = ctk("cdi", "generate", f"--output={root / 'etc/cdi/nvidia.yaml'}")
    assert result.returncode == 1
    assert "ERROR_DRIVER_NOT_LOADED" in result.stderr
    assert not (root / "etc/cdi/nvidia.yaml").exists()


def test_ctk_unknown_commands_exit_1(ctk: Run) -> None:
    for args in (["system", "create-device-nodes"], [], ["runtime", "configure", "--bogus"]):
        result = ctk(*args)
        assert result.returncode == 1, args
        assert "gpufleet stand-in" in result.stderr


# --- nvidia-container-runtime-hook -------------------------------------------------------------------------


@pytest.fixture
def hook(python_tool: Callable[[str], Run], root: Path) -> Run:
    write_program(root / "usr/bin", "nvidia-smi", shipped("/usr/bin/nvidia-smi"))  # the host's, to be copied
    return python_tool("/usr/bin/nvidia-container-runtime-hook")


def bundle(tmp_path: Path, env: list[str], root_path: str = "rootfs") -> Path:
    folder = tmp_path / "bundle"
    (folder / "rootfs").mkdir(parents=True)
    spec = {"ociVersion": "1.0.2", "root": {"path": root_path}, "process": {"env": ["PATH=/bin", *env]}}
    (folder / "config.json").write_text(json.dumps(spec))
    return folder


def state(folder: Path, key: str = "bundle") -> str:
    return json.dumps({"ociVersion": "1.0.2", "id": "c1", "status": "creating", "pid": 1, key: str(folder)})


def test_hook_copies_only_the_requested_gpu_into_the_rootfs(hook: Run, root: Path, tmp_path: Path) -> None:
    load(root)
    folder = bundle(tmp_path, ["NVIDIA_VISIBLE_DEVICES=1"])
    result = hook("prestart", stdin=state(folder))
    assert result.returncode == 0, result.stderr
    rootfs = folder / "rootfs"
    assert (rootfs / "usr/bin/nvidia-smi").read_bytes() == (root / "usr/bin/nvidia-smi").read_bytes()
    assert os.access(rootfs / "usr/bin/nvidia-smi", os.X_OK)
    gpu_rows = [line for line in (rootfs / "etc/gpufleet-testbed/gpus").read_text().splitlines() if line[:1] != "#"]
    assert gpu_rows == ["0|" + "|".join(GPUS[1][1:])]  # GPU 1 only, numbered from 0 as in a container
    assert (rootfs / "run/gpufleet-standin/nvidia-module").read_text() == f"{NEW_UP} open\n"
    # the copied nvidia-smi works inside the container's root, under busybox
    inside = runner(rootfs, ["busybox", "sh"], rootfs / "usr/bin/nvidia-smi")("-L")
    assert inside.stdout.splitlines() == [f"GPU 0: {GPUS[1][1]} (UUID: {GPUS[1][2]})"]


def test_hook_takes_uuids_all_bundlepath_and_absolute_roots(hook: Run, root: Path, tmp_path: Path) -> None:
    load(root)
    absolute = tmp_path / "elsewhere"
    folder = bundle(tmp_path, [f"NVIDIA_VISIBLE_DEVICES={GPUS[2][2]}"], root_path=str(absolute))
    assert hook("prestart", stdin=state(folder, key="bundlePath")).returncode == 0
    assert (absolute / "etc/gpufleet-testbed/gpus").read_text().splitlines()[1:] == ["0|" + "|".join(GPUS[2][1:])]
    spec = json.loads((folder / "config.json").read_text())
    spec["process"]["env"].append("NVIDIA_VISIBLE_DEVICES=all")
    (folder / "config.json").write_text(json.dumps(spec))
    assert hook("prestart", stdin=state(folder)).returncode == 0
    assert len((absolute / "etc/gpufleet-testbed/gpus").read_text().splitlines()) == 1 + len(GPUS)


def test_hook_without_loaded_module_fails_like_the_real_one(hook: Run, tmp_path: Path) -> None:
    folder = bundle(tmp_path, ["NVIDIA_VISIBLE_DEVICES=all"])
    result = hook("prestart", stdin=state(folder))
    assert result.returncode == 1
    assert result.stderr.strip() == "nvidia-container-cli: initialization error: nvml error: driver not loaded"
    assert list((folder / "rootfs").iterdir()) == []


@pytest.mark.parametrize("env", [[], ["NVIDIA_VISIBLE_DEVICES=void"], ["NVIDIA_VISIBLE_DEVICES=none"]])
def test_hook_without_a_request_does_nothing(hook: Run, tmp_path: Path, env: list[str]) -> None:
    folder = bundle(tmp_path, env)  # no module loaded either: nothing is asked, so nothing fails
    assert hook("prestart", stdin=state(folder)).returncode == 0
    assert list((folder / "rootfs").iterdir()) == []


def test_hook_rejects_unknown_devices(hook: Run, root: Path, tmp_path: Path) -> None:
    load(root)
    result = hook("prestart", stdin=state(bundle(tmp_path, ["NVIDIA_VISIBLE_DEVICES=7"])))
    assert result.returncode == 1
    assert result.stderr.strip() == "nvidia-container-cli: device error: 7: unknown device"


def test_hook_never_writes_outside_the_rootfs(hook: Run, root: Path, tmp_path: Path) -> None:
    load(root)
    folder = bundle(tmp_path, ["NVIDIA_VISIBLE_DEVICES=0"])
    outside = tmp_path / "host-usr"
    outside.mkdir()
    (folder / "rootfs/usr").symlink_to(outside)  # an image's absolute symlink, pointing at a host path
    assert hook("prestart", stdin=state(folder)).returncode == 0, "the symlink is resolved inside the rootfs"
    assert list(outside.iterdir()) == []
    assert (folder / "rootfs" / str(outside).lstrip("/") / "bin/nvidia-smi").is_file()


# --- nvidia-container-runtime ---------------------------------------------------------------------------------


@pytest.fixture
def fake_runc(tmp_path: Path) -> Path:
    """A runc that records its arguments and the bundle's config.json as it got them."""
    folder = tmp_path / "fake-bin"
    script = (
        '#!/bin/sh\nprintf "%s\\n" "$@" > "$RUNC_LOG"\n'
        '[ -z "$BUNDLE" ] || cp "$BUNDLE/config.json" "$RUNC_LOG.json"\n'
    )
    write_program(folder, "runc", script.encode())
    return folder


def run_runtime(python_tool: Callable[[str], Run], fake_runc: Path, tmp_path: Path, *args: str, bundle_dir: Path
                ) -> tuple[list[str], dict]:  # fmt: skip
    log = tmp_path / "runc.log"
    env = {"PATH": f"{fake_runc}:{os.environ['PATH']}", "RUNC_LOG": str(log), "BUNDLE": str(bundle_dir)}
    result = python_tool("/usr/bin/nvidia-container-runtime")(*args, env=env)
    assert result.returncode == 0, result.stderr
    return log.read_text().splitlines(), json.loads(Path(f"{log}.json").read_text())


def test_runtime_execs_runc_and_adds_the_hook_for_gpu_containers(
    python_tool: Callable[[str], Run], fake_runc: Path, tmp_path: Path
) -> None:
    folder = bundle(tmp_path, ["NVIDIA_VISIBLE_DEVICES=all"])
    args = ["--root", "/run/runc", "--log-format", "json", "create", "--bundle", str(folder), "--pid-file", "p", "c1"]
    argv, spec = run_runtime(python_tool, fake_runc, tmp_path, *args, bundle_dir=folder)
    assert argv == args
    hooks = spec["hooks"]["prestart"]
    assert [hook["args"] for hook in hooks] == [["nvidia-container-runtime-hook", "prestart"]]
    assert hooks[0]["path"].endswith("/nvidia-container-runtime-hook")
    run_runtime(python_tool, fake_runc, tmp_path, *args, bundle_dir=folder)  # again: no second hook
    assert len(json.loads((folder / "config.json").read_text())["hooks"]["prestart"]) == 1


def test_runtime_leaves_other_containers_alone(
    python_tool: Callable[[str], Run], fake_runc: Path, tmp_path: Path
) -> None:
    folder = bundle(tmp_path, [])
    before = (folder / "config.json").read_text()
    argv, _ = run_runtime(python_tool, fake_runc, tmp_path, "create", f"--bundle={folder}", "c2", bundle_dir=folder)
    assert argv == ["create", f"--bundle={folder}", "c2"]
    assert (folder / "config.json").read_text() == before


# --- nvidia-container-cli, nvidia-persistenced, nvcc ----------------------------------------------------------


def test_container_cli_info_list_and_version(python_tool: Callable[[str], Run], root: Path) -> None:
    cli = python_tool("/usr/bin/nvidia-container-cli")
    failed = cli("info")
    assert (failed.returncode, failed.stderr.strip()) == (
        1,
        "nvidia-container-cli: initialization error: nvml error: driver not loaded",
    )
    load(root)
    info = cli("--load-kmods", "info")
    assert info.returncode == 0, info.stderr
    assert info.stdout.splitlines()[:2] == [f"NVRM version:   {NEW_UP}", "CUDA version:   13.0"]
    assert f"GPU UUID:       {GPUS[2][2]}" in info.stdout and f"Bus Location:   {GPUS[1][4]}" in info.stdout
    assert cli("list").stdout.splitlines()[0] == f"{root}/usr/bin/nvidia-smi"
    assert cli("--version").stdout.splitlines()[0] == f"cli-version: {packages.upstream(TOOLKIT)}"


def test_persistenced_version(root: Path, tmp_path: Path) -> None:
    daemon = write_program(tmp_path / "bin", "nvidia-persistenced", shipped("/usr/bin/nvidia-persistenced", OLD))
    result = runner(root, ["sh"], daemon)("--version")
    assert result.returncode == 0
    assert f"nvidia-persistenced:  version {OLD_UP}" in result.stdout.splitlines()
    assert "gpufleet stand-in" in result.stdout


def test_nvcc_prints_the_real_version_text_and_compiles_nothing(root: Path, tmp_path: Path) -> None:
    nvcc_data = next(
        entry.data for entry in packages.cuda_toolkit_package().files if entry.path.endswith("/bin/nvcc")
    )
    nvcc = runner(root, ["sh"], write_program(tmp_path / "bin", "nvcc", nvcc_data))
    version = nvcc("--version")
    assert version.returncode == 0
    assert "Cuda compilation tools, release 12.8, V12.8.93" in version.stdout.splitlines()
    assert version.stdout.splitlines()[-1].startswith("gpufleet stand-in")
    assert nvcc("-o", "x", "x.cu").returncode == 1
