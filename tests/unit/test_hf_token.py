"""The Hugging Face token (engine.hf_token_file): checked before any host is contacted, mounted
into the engine containers by path, and never part of their spec: not in an argument, an
environment value, a label or the spec hash.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from gpufleet.apikeys import add_api_key
from gpufleet.errors import ConfigError
from gpufleet.fleet import FleetHost, load_fleet
from gpufleet.paths import REPO_ROOT
from gpufleet.sim.server import hf_token_status
from roles.inference import HF_TOKEN_FILE
from roles.inference.spec import HF_TOKEN_PATH, container_specs

TOKEN = "hf_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789"
OTHER_TOKEN = "hf_ZyXwVuTsRqPoNmLkJiHgFeDcBa9876543210"
SETTING = "engine:\n  hf_token_file: secrets/hf_token\n"


def write_token(root: Path, text: str, mode: int = 0o600) -> Path:
    path = root / "secrets" / "hf_token"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    os.chmod(path, mode)
    return path


def example_with_token(tmp_path: Path, token: str | None, name: str = "example") -> FleetHost:
    """gpu-01 of a copy of the example inventory, with engine.hf_token_file holding `token` (None: unset)."""
    root = tmp_path / name
    shutil.copytree(REPO_ROOT / "inventories" / "example", root, ignore=shutil.ignore_patterns("secrets"))
    if token is not None:
        gpu_vars = root / "group_vars" / "gpu.yml"
        gpu_vars.write_text(gpu_vars.read_text() + SETTING.replace("engine:", "\nengine:"))
        write_token(root, token + "\n")
    add_api_key(root / "secrets" / "api_keys", "web")
    return load_fleet(root).host("gpu-01")


def every_string(spec) -> str:
    return "\n".join([spec.name, spec.image, spec.spec_hash, *spec.options, *spec.command, *spec.create_args()])


# the container spec -------------------------------------------------------------------------------


def test_the_engine_gets_the_token_file_read_only_and_its_path_not_its_value(tmp_path: Path) -> None:
    host = example_with_token(tmp_path, TOKEN)
    assert host.hf_token == TOKEN
    [spec] = container_specs(host.config, host.plan, hf_token=HF_TOKEN_FILE)
    options = list(spec.options)
    volumes = [options[i + 1] for i, flag in enumerate(options) if flag == "--volume"]
    envs = [options[i + 1] for i, flag in enumerate(options) if flag == "--env"]
    assert f"{HF_TOKEN_FILE}:/run/secrets/hf_token:ro" in volumes
    assert "HF_TOKEN_PATH=/run/secrets/hf_token" in envs and HF_TOKEN_PATH == "/run/secrets/hf_token"
    assert TOKEN not in every_string(spec)
    assert not any(env.startswith(("HF_TOKEN=", "HUGGING_FACE_HUB_TOKEN=")) for env in envs)


def test_tgi_also_gets_the_token_where_its_launcher_reads_it(tmp_path: Path) -> None:
    host = example_with_token(tmp_path, TOKEN)
    tgi = host.config.model_copy(update={"engine": host.config.engine.model_copy(update={"kind": "tgi"})})
    [spec] = container_specs(tgi, host.plan, hf_token=HF_TOKEN_FILE)
    volumes = [spec.options[i + 1] for i, flag in enumerate(spec.options) if flag == "--volume"]
    assert f"{HF_TOKEN_FILE}:/run/secrets/hf_token:ro" in volumes
    assert f"{HF_TOKEN_FILE}:/data/token:ro" in volumes  # hf-hub reads $HF_HOME/token; HF_HOME=/data in TGI


def test_no_token_file_no_mount(tmp_path: Path) -> None:
    host = example_with_token(tmp_path, None)
    assert host.hf_token is None
    [spec] = container_specs(host.config, host.plan)
    assert "hf_token" not in every_string(spec) and "HF_TOKEN_PATH" not in every_string(spec)


def test_the_spec_hash_moves_with_the_token_file_but_not_with_its_value(tmp_path: Path) -> None:
    without = example_with_token(tmp_path, None, "without")
    first = example_with_token(tmp_path, TOKEN, "first")
    second = example_with_token(tmp_path, OTHER_TOKEN, "second")
    assert first.hf_token != second.hf_token
    [plain] = container_specs(without.config, without.plan)
    [one] = container_specs(first.config, first.plan, hf_token=HF_TOKEN_FILE)
    [two] = container_specs(second.config, second.plan, hf_token=HF_TOKEN_FILE)
    assert one.spec_hash != plain.spec_hash  # adding or removing the token recreates the engines
    assert one == two  # a new token value does not: the same spec, hash included


# checked before any host is contacted -----------------------------------------------------------


def _error(root: Path) -> str:
    with pytest.raises(ConfigError) as caught:
        load_fleet(root)
    return caught.value.render()


def _expected(root: Path, what: str, fix: str | None = None) -> str:
    token = root / "secrets" / "hf_token"
    fix = fix or (
        f"write the token alone on one line: run (umask 077; read -rs t; printf '%s\\n' \"$t\" > {token}) and paste it"
    )
    return (
        f"error: {root}/host_vars/gpu-01.yml:2 (host gpu-01): engine.hf_token_file: "
        f"the Hugging Face token file {token} {what}\n  fix: {fix}"
    )


@pytest.fixture
def token_inventory(make_inventory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    elsewhere = tmp_path / "elsewhere"  # paths are shown absolute from outside the inventory
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    return make_inventory({"host_vars/gpu-01.yml": SETTING})


def test_a_missing_token_file(token_inventory: Path) -> None:
    assert _error(token_inventory) == _expected(token_inventory, "does not exist")


def test_a_token_file_readable_by_others(token_inventory: Path) -> None:
    path = write_token(token_inventory, TOKEN + "\n", mode=0o644)
    assert _error(token_inventory) == _expected(
        token_inventory, "is readable by others (mode 0644)", f"chmod 600 {path}"
    )


def test_an_empty_token_file(token_inventory: Path) -> None:
    write_token(token_inventory, "\n  \n")
    assert _error(token_inventory) == _expected(token_inventory, "is empty")


def test_a_token_file_of_two_lines(token_inventory: Path) -> None:
    write_token(token_inventory, f"# my token\n{TOKEN}\n")
    error = _error(token_inventory)
    assert error == _expected(token_inventory, "holds 2 lines; a token file holds the token alone on one line")
    assert TOKEN not in error


def test_a_token_with_a_space(token_inventory: Path) -> None:
    write_token(token_inventory, f"token {TOKEN}\n")
    error = _error(token_inventory)
    assert error == _expected(token_inventory, "holds a line with spaces; a token has none")
    assert TOKEN not in error


def test_a_folder_where_the_token_file_should_be(token_inventory: Path) -> None:
    (token_inventory / "secrets" / "hf_token").mkdir(parents=True)
    assert _error(token_inventory) == _expected(token_inventory, "is not a file")


def test_a_good_token_file_is_read_once_for_every_host(make_inventory) -> None:
    root = make_inventory({"host_vars/gpu-01.yml": SETTING, "host_vars/gpu-02.yml": SETTING})
    write_token(root, f"  {TOKEN}  \n")
    fleet = load_fleet(root)
    assert [h.hf_token for h in fleet.in_group("gpu")] == [TOKEN, TOKEN]
    assert TOKEN not in repr(fleet.host("gpu-01"))
    assert load_fleet(root, check_secrets=False).host("gpu-01").hf_token is None  # `gpufleet plan` needs no secrets


# the simulator's start-up line --------------------------------------------------------------------


def test_the_simulator_says_whether_it_can_read_the_token_never_what_it_is(tmp_path: Path) -> None:
    path = write_token(tmp_path, TOKEN + "\n")
    line = hf_token_status({"HF_TOKEN_PATH": str(path)})
    assert line == f"HF_TOKEN_PATH {path}: readable, a token of {len(TOKEN)} characters"
    assert (
        hf_token_status({"HF_TOKEN_PATH": str(tmp_path / "none")}) == f"HF_TOKEN_PATH {tmp_path / 'none'}: no such file"
    )
    assert hf_token_status({}) is None
