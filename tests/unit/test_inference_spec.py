"""Engine container specs: the seed layouts get the right GPUs, ports and limits, and the spec
hash moves exactly when something the container is created with moves."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from gpufleet.fleet import FleetHost, load_fleet
from gpufleet.hostops import deep_merge
from gpufleet.paths import REPO_ROOT
from roles.inference.spec import SPEC_HASH_LABEL, container_specs, cpusets

EXAMPLE = REPO_ROOT / "inventories" / "example"


def _layout_block(title: str) -> str:
    """A commented alternative layout of the example's group_vars/gpu.yml, as YAML."""
    text = (EXAMPLE / "group_vars" / "gpu.yml").read_text()
    lines = []
    for line in text[text.index(f"# {title}"):].splitlines()[1:]:
        if line.strip() == "#":
            break
        lines.append(line[2:] if line.startswith("# ") else line[1:])
    return "\n".join(lines) + "\n"


def example_host(tmp_path: Path, host_vars: str | None = None, host: str = "gpu-01") -> FleetHost:
    root = tmp_path / "example"
    shutil.copytree(EXAMPLE, root, ignore=shutil.ignore_patterns("secrets"))
    if host_vars is not None:  # merged into the example's own host_vars (its engine.listen_address stays)
        path = root / "host_vars" / "gpu-01.yml"
        merged = deep_merge(yaml.safe_load(path.read_text()), yaml.safe_load(host_vars))
        path.write_text(yaml.safe_dump(merged))
    return load_fleet(root, check_secrets=False).host(host)


def option(spec, flag: str) -> list[str]:
    """Every value given to `flag` in the spec's options."""
    opts = spec.options
    return [opts[i + 1] for i, value in enumerate(opts) if value == flag]


def test_the_seed_layout_a_is_one_container_on_all_four_gpus(tmp_path: Path) -> None:
    host = example_host(tmp_path)
    [spec] = container_specs(host.config, host.plan)
    assert spec.name == "gpufleet-engine-0" and spec.image == "vllm/vllm-openai:v0.11.0"
    assert option(spec, "--gpus") == ['"device=0,1,2,3"']
    assert option(spec, "--publish") == ["198.51.100.11:8000:8000"]  # the private address only (gw-01 is remote)
    assert option(spec, "--memory") == ["32g"] and option(spec, "--memory-swap") == ["32g"]
    assert option(spec, "--cpus") == ["8"] and option(spec, "--pids-limit") == ["4096"]
    assert option(spec, "--shm-size") == ["8g"]
    assert option(spec, "--ulimit") == ["memlock=-1", "stack=67108864"]
    assert option(spec, "--restart") == ["unless-stopped"]
    assert option(spec, "--log-opt") == ["max-size=100m", "max-file=3"]
    command = list(spec.command)
    assert command[command.index("--tensor-parallel-size") + 1] == "4"
    assert command[-4:] == ["--host", "0.0.0.0", "--port", "8000"]
    assert f"{SPEC_HASH_LABEL}={spec.spec_hash}" in option(spec, "--label")


@pytest.mark.parametrize(("title", "gpus"), [("Layout B", [(0, 1), (2, 3)]), ("Layout C", [(0,), (1,), (2,), (3,)])])
def test_the_seed_alternative_layouts_pin_each_instance_to_its_gpus(tmp_path: Path, title: str, gpus) -> None:
    host = example_host(tmp_path, _layout_block(title))
    specs = container_specs(host.config, host.plan)
    assert [spec.gpus for spec in specs] == gpus
    assert [option(spec, "--gpus") for spec in specs] == [[f'"device={",".join(map(str, g))}"'] for g in gpus]
    assert [spec.host_port for spec in specs] == [8000 + i for i in range(len(gpus))]
    published = [f"198.51.100.11:{8000 + i}:8000" for i in range(len(gpus))]  # gpu-01's private address
    assert [option(spec, "--publish")[0] for spec in specs] == published
    assert len({spec.name for spec in specs}) == len(gpus)


def test_cpuset_auto_splits_the_hosts_cores_across_instances(tmp_path: Path) -> None:
    layout_b = _layout_block("Layout B").replace("  cpus: 4\n", "  cpus: null\n  cpuset: auto\n")
    host = example_host(tmp_path, layout_b)
    specs = container_specs(host.config, host.plan, host_cpus=32)
    assert [option(spec, "--cpuset-cpus") for spec in specs] == [["0-15"], ["16-31"]]
    assert all(not option(spec, "--cpus") for spec in specs)
    assert cpusets(4, 4) == ["0", "1", "2", "3"]
    with pytest.raises(ValueError, match="needs the host's CPU count"):
        container_specs(host.config, host.plan)
    with pytest.raises(ValueError, match="cannot be split"):
        cpusets(2, 4)


def test_ipc_host_replaces_the_shared_memory_size(tmp_path: Path) -> None:
    host = example_host(tmp_path, "limits: {ipc_host: true}\n")
    [spec] = container_specs(host.config, host.plan)
    assert option(spec, "--ipc") == ["host"] and not option(spec, "--shm-size")


def test_the_simulator_gets_the_gpu_indices_in_its_environment(tmp_path: Path) -> None:
    host = example_host(tmp_path, "engine: {kind: sim, image: 'gpufleet/sim:0.1.0'}\n")
    [spec] = container_specs(host.config, host.plan)
    assert not option(spec, "--gpus")
    assert option(spec, "--env") == ["CUDA_VISIBLE_DEVICES=0,1,2,3"]
    assert list(spec.command[:6]) == ["--host", "0.0.0.0", "--port", "8000", "--gpu", "rtx-4090d"]
    assert "--health-cmd" not in spec.options  # the simulator image has its own HEALTHCHECK


def test_tgi_listens_on_its_port_and_caches_models_in_data(tmp_path: Path) -> None:
    image = "ghcr.io/huggingface/text-generation-inference:3.3.5"
    host = example_host(
        tmp_path, f"engine: {{kind: tgi, image: '{image}'}}\nmodel: {{max_model_len: 32768, rope_scaling: null}}\n"
    )
    [spec] = container_specs(host.config, host.plan)
    assert option(spec, "--publish") == ["198.51.100.11:8000:80"]
    assert option(spec, "--volume") == ["/var/lib/gpufleet/model-cache:/data"]
    assert "--num-shard" in spec.command


def test_the_spec_hash_moves_with_the_spec_and_only_then(tmp_path: Path) -> None:
    base = example_host(tmp_path / "a")
    same = example_host(tmp_path / "b")
    more_memory = example_host(tmp_path / "c", "limits: {memory: 48g}\n")
    new_image = example_host(tmp_path / "d", "engine: {image: 'vllm/vllm-openai:v0.11.1'}\n")
    first = container_specs(base.config, base.plan)[0].spec_hash
    assert container_specs(same.config, same.plan)[0].spec_hash == first
    assert container_specs(more_memory.config, more_memory.plan)[0].spec_hash != first
    assert container_specs(new_image.config, new_image.plan)[0].spec_hash != first
    # another host of the fleet (gpu-02, its own port) keeps its spec when gpu-01's memory changes
    other_before = example_host(tmp_path / "e", host="gpu-02")
    other_after = example_host(tmp_path / "f", "limits: {memory: 48g}\n", host="gpu-02")
    before = container_specs(other_before.config, other_before.plan)[0]
    assert container_specs(other_after.config, other_after.plan)[0].spec_hash == before.spec_hash
    assert before.spec_hash != first and before.host_port == 8100
