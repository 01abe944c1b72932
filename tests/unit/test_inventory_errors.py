"""Malformed inventories: each fails with one ConfigError that names file, line, key, value and fix.

Every case asserts the whole rendered text, so a message that loses its file, line, key path,
bad value or fix (or gains a traceback, or a duplicate) fails here. `<root>` in an expected text
stands for the inventory folder; it is absolute because the tests run from a folder outside it.

Line numbers refer to the files the conftest base writes (hosts.yml, group_vars/all.yml, gpu.yml,
gateway.yml) or to the file a case writes; the base files are reproduced here for reference:

    hosts.yml                                   group_vars/gpu.yml
     1 all:                                      1 gpus:
     2   children:                               2   model: rtx-4090d
     3     gpu:                                  3   count: 4
     4       hosts:                              4 model:
     5         gpu-01: {ansible_host: ...11}     5   name: Qwen/Qwen2.5-7B-Instruct
     6         gpu-02: {ansible_host: ...12}     6   max_model_len: 32768
     7     gateway:                              7 serving:
     8       hosts:                              8   gpu_memory_utilization: 0.95
     9         gw-01: {ansible_host: ...10}      9   max_num_seqs: 256
    10     monitoring:                          10   max_num_batched_tokens: 4096
    11       hosts:                             11 layout:
    12         mon-01: {ansible_host: ...20}    12   instances: 1
                                                13   tensor_parallel_size: 4
                                                14 engine:
                                                15   listen_address: 0.0.0.0
    group_vars/all.yml          group_vars/gateway.yml
     1 slo:                      1 gateway:
     2   ttft_p99_ms: 500        2   api_keys_file: secrets/api_keys
     3   itl_p99_ms: 80
     4   max_error_rate: 0.01
     5   min_output_tokens_per_s: 500
     6   availability_target: 0.999
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gpufleet.errors import ConfigError
from gpufleet.fleet import load_fleet
from tests.conftest import base_file

HOSTS = base_file("hosts.yml")
GPU_VARS = base_file("group_vars/gpu.yml")
SLO_VARS = base_file("group_vars/all.yml")
GATEWAY_VARS = base_file("group_vars/gateway.yml")


def _replace(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


def _hosts(old: str, new: str) -> dict[str, str | None]:
    return {"hosts.yml": _replace(HOSTS, old, new)}


def _gpu(old: str, new: str) -> dict[str, str | None]:
    return {"group_vars/gpu.yml": _replace(GPU_VARS, old, new)}


def _slo(old: str, new: str) -> dict[str, str | None]:
    return {"group_vars/all.yml": _replace(SLO_VARS, old, new)}


def _gateway(extra: str) -> dict[str, str | None]:
    return {"group_vars/gateway.yml": GATEWAY_VARS + extra}


@pytest.fixture(autouse=True)
def _run_outside_the_inventory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # paths below the working directory are shown relative; from here every path is absolute
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)


def _error(root: Path) -> str:
    with pytest.raises(ConfigError) as caught:
        load_fleet(root)
    return caught.value.render()


def _expected(text: str, root: Path) -> str:
    return text.replace("<root>", str(root))


# The inventory folder and hosts.yml --------------------------------------------------------------

LOADER_CASES = [
    pytest.param(
        {"hosts.yml": None},
        "error: <root>/hosts.yml: is missing: an inventory folder needs a hosts.yml\n"
        "  fix: create hosts.yml with your groups under 'all: children:' (see inventories/example/hosts.yml)",
        id="hosts-yml-missing",
    ),
    pytest.param(
        {"hosts.yml": "# hosts come later\n"},
        "error: <root>/hosts.yml: is empty, so the inventory has no hosts\n"
        "  fix: start the file with 'all:' and put groups under 'children:' (see inventories/example/hosts.yml)",
        id="hosts-yml-empty",
    ),
    pytest.param(
        {"hosts.yml": "- gpu-01\n- gpu-02\n"},
        "error: <root>/hosts.yml: must be a mapping of groups starting with 'all:', got a list of 2 items\n"
        "  fix: start the file with 'all:' and put groups under 'children:' (see inventories/example/hosts.yml)",
        id="hosts-yml-not-a-mapping",
    ),
    pytest.param(
        _hosts("    gateway:\n      hosts:\n", "    gateway:\n      host:\n"),
        "error: <root>/hosts.yml:8: all.children.gateway.host: unknown group key 'host'\n"
        "  fix: did you mean 'hosts'? (valid group keys: children, hosts, vars); "
        "hosts go under 'hosts:' and sub-groups under 'children:'",
        id="unknown-group-key",
    ),
    pytest.param(
        _hosts("        gpu-02: {ansible_host: 192.0.2.12}\n",
               "        gpu-02: {ansible_host: 192.0.2.12}\n        gpu-01:\n"),
        "error: <root>/hosts.yml:7: all.children.gpu.hosts.gpu-01: duplicate key 'gpu-01' (first written on line 5)\n"
        "  fix: write 'gpu-01' once here: delete the entry on line 7 or merge it into line 5",
        id="duplicate-host-in-one-group",
    ),
    pytest.param(
        {"hosts.yml": HOSTS + "    rack_a:\n      children:\n        gpu:\n          hosts:\n            gpu-01:\n"},
        "error: <root>/hosts.yml:17: all.children.rack_a.children.gpu.hosts.gpu-01: "
        "host 'gpu-01' is listed twice in group 'gpu' (first on line 5)\n"
        "  fix: list 'gpu-01' once in group 'gpu': remove this entry or the one on line 5",
        id="host-listed-twice-in-a-group-written-twice",
    ),
    pytest.param(
        _hosts("        mon-01: {ansible_host: 192.0.2.20}\n",
               "        mon-01: {ansible_host: 192.0.2.20}\n        gpu-01: {ansible_host: 192.0.2.99}\n"),
        "error: <root>/hosts.yml:13: all.children.monitoring.hosts.gpu-01: "
        "host 'gpu-01' is defined with variables twice (first on line 5)\n"
        "  fix: give 'gpu-01' its variables in one place: one group's entry or host_vars/gpu-01.yml",
        id="host-variables-defined-twice",
    ),
    pytest.param(
        {"hosts.yml": HOSTS + "    rack_a:\n      children:\n        rack_b:\n"
                              "          children:\n            rack_a:\n"},
        "error: <root>/hosts.yml:17: all.children.rack_a.children.rack_b.children.rack_a: "
        "group cycle: all -> rack_a -> rack_b -> rack_a\n"
        "  fix: remove 'rack_a' from the children of 'rack_b'",
        id="group-cycle",
    ),
    pytest.param(
        {"hosts.yml": HOSTS + "    rack-a:\n      hosts:\n        gpu-01:\n"},
        "error: <root>/hosts.yml:13: all.children.rack-a: group name 'rack-a' has characters Ansible does not allow\n"
        "  fix: use letters, digits and underscores only, e.g. 'gpu_servers'",
        id="group-name-with-a-dash",
    ),
    pytest.param(
        {"group_vars/gpus.yml": "gpus:\n  count: 2\n"},
        "error: <root>/group_vars/gpus.yml: is for group 'gpus', which hosts.yml does not define\n"
        "  fix: did you mean 'gpu'? (valid groups: all, gateway, gpu, monitoring); "
        "rename the file or add the group to hosts.yml",
        id="group-vars-for-an-undefined-group",
    ),
    pytest.param(
        {"host_vars/gpu-03.yml": "gpus:\n  count: 2\n"},
        "error: <root>/host_vars/gpu-03.yml: is for host 'gpu-03', which hosts.yml does not list\n"
        "  fix: did you mean 'gpu-02'? (valid hosts: gpu-01, gpu-02, gw-01, mon-01); "
        "rename the file or add the host to a group in hosts.yml",
        id="host-vars-for-an-unknown-host",
    ),
]


@pytest.mark.parametrize(("files", "expected"), LOADER_CASES)
def test_inventory_structure_errors(make_inventory, files, expected):
    root = make_inventory(files)
    assert _error(root) == _expected(expected, root)


# YAML syntax -------------------------------------------------------------------------------------

YAML_CASES = [
    pytest.param(
        _gpu("  count: 4\n", "  count: [4\n"),
        "error: <root>/group_vars/gpu.yml:4: is not valid YAML: expected ',' or ']', but got ':' "
        "(while parsing a flow sequence that starts on line 3)\n"
        "  fix: correct the YAML syntax from line 3 to this line "
        "(indentation, a missing ':' or an unclosed quote or bracket)",
        id="unclosed-bracket",
    ),
    pytest.param(
        _gpu("  count: 4\n", "  count 4\n"),
        "error: <root>/group_vars/gpu.yml:4: is not valid YAML: could not find expected ':' "
        "(while scanning a simple key that starts on line 3)\n"
        "  fix: correct the YAML syntax from line 3 to this line "
        "(indentation, a missing ':' or an unclosed quote or bracket)",
        id="missing-colon",
    ),
    pytest.param(
        _gpu("  count: 4\n", "  count: 4\n   extra: 1\n"),
        "error: <root>/group_vars/gpu.yml:4: is not valid YAML: mapping values are not allowed here\n"
        "  fix: correct the YAML syntax at that line (indentation, a missing ':' or an unclosed quote)",
        id="bad-indentation",
    ),
    pytest.param(
        {"host_vars/gpu-01.yml": "gpus:\n\tcount: 4\n"},
        "error: <root>/host_vars/gpu-01.yml:2: is not valid YAML: found a tab character; "
        "YAML indents with spaces only\n"
        "  fix: replace the tab with spaces",
        id="tab-indentation",
    ),
    pytest.param(
        _gpu("  count: 4\n", "  count: 4\n  count: 2\n"),
        "error: <root>/group_vars/gpu.yml:4: gpus.count: duplicate key 'count' (first written on line 3)\n"
        "  fix: write 'count' once here: delete the entry on line 4 or merge it into line 3",
        id="duplicate-key",
    ),
    pytest.param(
        {"group_vars/all.yml": SLO_VARS + "  receivers:\n    - name: oncall\n      name: pager\n"},
        "error: <root>/group_vars/all.yml:11: monitoring.receivers.0.name: "
        "duplicate key 'name' (first written on line 10)\n"
        "  fix: write 'name' once here: delete the entry on line 11 or merge it into line 10",
        id="duplicate-key-in-a-list-item",
    ),
]


@pytest.mark.parametrize(("files", "expected"), YAML_CASES)
def test_yaml_errors_name_file_and_line(make_inventory, files, expected):
    root = make_inventory(files)
    assert _error(root) == _expected(expected, root)


# Typed sections ----------------------------------------------------------------------------------

SCHEMA_CASES = [
    pytest.param(
        {"group_vars/gateway.yml": "gatway:\n  api_keys_file: secrets/api_keys\n"},
        "error: <root>/group_vars/gateway.yml:1: gatway: unknown key 'gatway'\n"
        "  fix: did you mean 'gateway'? (valid keys: ansible_become, ansible_connection, ansible_host, "
        "ansible_port, ansible_ssh_private_key_file, ansible_user, container_toolkit, cuda, docker, engine, "
        "gateway, gpu_exporter, gpus, layout, limits, model, monitoring, nvidia_driver, preflight, serving, slo)",
        id="unknown-top-level-key",
    ),
    pytest.param(
        _gateway("  burts: 8\n"),
        "error: <root>/group_vars/gateway.yml:3: gateway.burts: unknown key 'burts'\n"
        "  fix: did you mean 'burst'? (valid keys: api_keys_file, backends, burst, fail_timeout_s, listen, "
        "max_body_size, max_concurrency, max_conns_per_key, max_fails, nodelay, rate_per_second, read_timeout_s, "
        "status_port, unlimited_clients)",
        id="unknown-nested-key",
    ),
    pytest.param(
        _gpu("  count: 4\n", "  cont: 4\n"),
        "error: <root>/group_vars/gpu.yml:3: gpus.cont: unknown key 'cont'\n"
        "  fix: did you mean 'count'? (valid keys: count, memory_mib, model)",
        id="misspelt-required-key-reported-once",
    ),
    pytest.param(
        {"host_vars/gpu-01.yml": "5: x\n"},
        "error: <root>/host_vars/gpu-01.yml:1: 5: unknown key 5 (YAML reads it as a number, not a name)\n"
        "  fix: use one of the valid keys: ansible_become, ansible_connection, ansible_host, ansible_port, "
        "ansible_ssh_private_key_file, ansible_user, container_toolkit, cuda, docker, engine, gateway, gpu_exporter, "
        "gpus, layout, limits, model, monitoring, nvidia_driver, preflight, serving, slo",
        id="number-as-key",
    ),
    pytest.param(
        _gpu("  count: 4\n", '  count: "four"\n'),
        "error: <root>/group_vars/gpu.yml:3: gpus.count: must be a whole number, got 'four'\n"
        "  fix: set gpus.count to a whole number (how many GPUs of that model the host has)",
        id="text-where-int-expected",
    ),
    pytest.param(
        _gpu("  max_num_seqs: 256\n", "  max_num_seqs: true\n"),
        "error: <root>/group_vars/gpu.yml:9: serving.max_num_seqs: must be a whole number, got true\n"
        "  fix: set serving.max_num_seqs to a whole number (most sequences batched at once; the seed uses 256)",
        id="bool-where-int-expected",
    ),
    pytest.param(
        {"host_vars/gpu-02.yml": "engine:\n  port: '8000'\n"},
        "error: <root>/host_vars/gpu-02.yml:2: engine.port: must be a whole number, got '8000'\n"
        "  fix: set engine.port to a whole number (loopback port of the first instance; instance i listens on "
        "port + i)",
        id="quoted-number",
    ),
    pytest.param(
        _slo("  ttft_p99_ms: 500\n", "  ttft_p99_ms: -500\n"),
        "error: <root>/group_vars/all.yml:2: slo.ttft_p99_ms: must be > 0, got -500\n"
        "  fix: set slo.ttft_p99_ms to a value > 0 (time to first token, 99th percentile, in milliseconds)",
        id="negative-slo",
    ),
    pytest.param(
        _slo("  max_error_rate: 0.01\n", "  max_error_rate: 5\n"),
        "error: <root>/group_vars/all.yml:4: slo.max_error_rate: must be <= 1, got 5\n"
        "  fix: set slo.max_error_rate to a value <= 1 (largest acceptable fraction of failed requests, e.g. 0.01)",
        id="error-rate-above-1",
    ),
    pytest.param(
        _gpu("  gpu_memory_utilization: 0.95\n", "  gpu_memory_utilization: 1.5\n"),
        "error: <root>/group_vars/gpu.yml:8: serving.gpu_memory_utilization: must be <= 1, got 1.5\n"
        "  fix: set serving.gpu_memory_utilization to a value <= 1 (fraction of each GPU's memory the engine may "
        "use; the seed uses 0.95)",
        id="gpu-memory-utilization-above-1",
    ),
    pytest.param(
        {"host_vars/gpu-01.yml": "engine:\n  kind: vlm\n"},
        "error: <root>/host_vars/gpu-01.yml:2: engine.kind: must be one of vllm, tgi, sim, got 'vlm'\n"
        "  fix: did you mean 'vllm'? (valid values: sim, tgi, vllm)",
        id="unknown-engine-kind",
    ),
    pytest.param(
        {"host_vars/gpu-01.yml": "engine:\n  image: vllm/vllm-openai:latest\n"},
        "error: <root>/host_vars/gpu-01.yml:2: engine.image: "
        "'vllm/vllm-openai:latest' is not pinned: 'latest' moves to a new release under you\n"
        "  fix: pin a version tag (e.g. vllm/vllm-openai:v0.11.0) or a digest (name@sha256:...)",
        id="image-latest",
    ),
    pytest.param(
        {"host_vars/gpu-01.yml": "engine:\n  image: ghcr.io/huggingface/text-generation-inference\n"},
        "error: <root>/host_vars/gpu-01.yml:2: engine.image: 'ghcr.io/huggingface/text-generation-inference' "
        "is not pinned: an image without a tag means 'latest', which moves\n"
        "  fix: pin a version tag (e.g. vllm/vllm-openai:v0.11.0) or a digest (name@sha256:...)",
        id="image-without-tag",
    ),
    pytest.param(
        _gpu("  instances: 1\n  tensor_parallel_size: 4\n",
             "  instances: 2\n  tensor_parallel_size: 2\n  gpu_indices: [[0, 1], [1, 2]]\n"),
        "error: <root>/group_vars/gpu.yml:14: layout.gpu_indices: GPU 1 is given to two instances "
        "([0, 1] and [1, 2])\n"
        "  fix: list 2 instances of 2 GPUs each, no GPU twice, e.g. [[0, 1], [2, 3]], "
        "or set gpu_indices to null to assign consecutive GPUs",
        id="gpu-indices-overlap",
    ),
    pytest.param(
        {"host_vars/gpu-01.yml": "layout:\n  gpu_indices: [[0, 1, 2]]\n"},
        "error: <root>/host_vars/gpu-01.yml:2: layout.gpu_indices: entry [0, 1, 2] has 3 GPUs "
        "but tensor_parallel_size is 4\n"
        "  fix: list 1 instance of 4 GPUs each, no GPU twice, e.g. [[0, 1, 2, 3]], "
        "or set gpu_indices to null to assign consecutive GPUs",
        id="gpu-indices-wrong-size",
    ),
    pytest.param(
        {"group_vars/gpu.yml": GPU_VARS + "limits:\n  cpuset: ['0-7']\n"},
        "error: <root>/group_vars/gpu.yml:17: limits.cpuset: is ['0-7'] but limits.cpus is also set (8): "
        "use cpus or cpuset, not both\n"
        "  fix: to pin CPUs, also set limits.cpus: null (cpus may come from another file or the role defaults); "
        "to keep the cpus limit, remove limits.cpuset",
        id="cpus-and-cpuset",
    ),
    pytest.param(
        {"group_vars/gpu.yml": GPU_VARS + "limits:\n  memory: 32 gigs\n"},
        "error: <root>/group_vars/gpu.yml:17: limits.memory: '32 gigs' is not a size\n"
        "  fix: write a number with a unit, e.g. '32g' or '512m'",
        id="bad-size",
    ),
    pytest.param(
        _gateway("  listen: 0.0.0.0:80800\n"),
        "error: <root>/group_vars/gateway.yml:3: gateway.listen: '0.0.0.0:80800' has no valid port (1-65535)\n"
        "  fix: write address:port, e.g. '0.0.0.0:8080'",
        id="bad-listen-port",
    ),
    pytest.param(
        _gateway("  listen: localhost\n"),
        "error: <root>/group_vars/gateway.yml:3: gateway.listen: 'localhost' has no port\n"
        "  fix: write address:port, e.g. '0.0.0.0:8080'",
        id="listen-without-port",
    ),
    pytest.param(
        {"group_vars/all.yml": SLO_VARS + "  receivers: []\n"},
        "error: <root>/group_vars/all.yml:9: monitoring.receivers: must have at least 1 item, got 0\n"
        "  fix: set monitoring.receivers to a list of at least 1 item (where alerts go; the first is the default "
        "route)",
        id="empty-receivers",
    ),
]


@pytest.mark.parametrize(("files", "expected"), SCHEMA_CASES)
def test_schema_errors_name_key_value_and_fix(make_inventory, files, expected):
    root = make_inventory(files)
    assert _error(root) == _expected(expected, root)


# Roles and hosts ---------------------------------------------------------------------------------

FLEET_CASES = [
    pytest.param(
        {"group_vars/gpu.yml": GPU_VARS.split("layout:")[0]},
        "error: <root>/hosts.yml:5: layout: is required for hosts in group 'gpu' but not set "
        "(hosts gpu-01, gpu-02)\n"
        "  fix: set layout in group_vars/gpu.yml or host_vars/<host>.yml (see inventories/example)",
        id="required-section-missing",
    ),
    pytest.param(
        {"group_vars/gpu.yml": GPU_VARS.replace("gpus:\n  model: rtx-4090d\n  count: 4\n", "gpus:\n")},
        "error: <root>/group_vars/gpu.yml:1: gpus: is empty (null), but hosts in group 'gpu' need it "
        "(hosts gpu-01, gpu-02)\n"
        "  fix: write the gpus settings under 'gpus:' (see inventories/example)",
        id="required-section-null",
    ),
    pytest.param(
        _hosts("    monitoring:\n",
               "    spare:\n      hosts:\n        spare-01: {ansible_host: 192.0.2.30}\n    monitoring:\n"),
        "error: <root>/hosts.yml:12: spare-01: host 'spare-01' is only in group 'spare', "
        "so no gpufleet role would run on it\n"
        "  fix: list it under one of the groups gpu, gateway, monitoring, or make 'spare' a child group of one",
        id="host-in-no-gpufleet-group",
    ),
    pytest.param(
        _hosts("gpu-02: {ansible_host: 192.0.2.12}", "gpu-02: {ansible_host: 192.0.2.11}"),
        "error: <root>/hosts.yml:6 (host gpu-02): ansible_host: "
        "hosts 'gpu-01' and 'gpu-02' both point at 192.0.2.11:22\n"
        "  fix: give each host its own ansible_host (or ansible_port), or remove the duplicate entry",
        id="two-hosts-one-address",
    ),
]


@pytest.mark.parametrize(("files", "expected"), FLEET_CASES)
def test_role_and_host_errors(make_inventory, files, expected):
    root = make_inventory(files)
    assert _error(root) == _expected(expected, root)


# The capacity planner ----------------------------------------------------------------------------

PLANNER_CASES = [
    pytest.param(
        _gpu("  instances: 1\n", "  instances: 2\n"),
        "error: <root>/group_vars/gpu.yml:12 (hosts gpu-01, gpu-02): layout.instances: "
        "the layout needs 8 GPUs (2 x TP4) but the host has 4 (gpus.count)\n"
        "  fix: set layout.instances to 1 (1 x TP4 uses 4 of the 4 GPUs)",
        id="layout-needs-more-gpus",
    ),
    pytest.param(
        {"host_vars/gpu-02.yml": "layout:\n  tensor_parallel_size: 8\n"},
        "error: <root>/host_vars/gpu-02.yml:2 (host gpu-02): layout.tensor_parallel_size: "
        "the layout needs 8 GPUs (1 x TP8) but the host has 4 (gpus.count)\n"
        "  fix: set layout.tensor_parallel_size to 4 or less",
        id="tensor-parallel-beyond-the-gpus",
    ),
    pytest.param(
        {"host_vars/gpu-01.yml": "layout:\n  gpu_indices: [[0, 1, 2, 4]]\n"},
        "error: <root>/host_vars/gpu-01.yml:2 (host gpu-01): layout.gpu_indices: "
        "GPU index 4 does not exist on a host with 4 GPUs (0-3)\n"
        "  fix: use GPU indices 0 to 3, or set layout.gpu_indices to null to assign consecutive GPUs",
        id="gpu-index-out-of-range",
    ),
    pytest.param(
        _gpu("  tensor_parallel_size: 4\n", "  tensor_parallel_size: 3\n"),
        "error: <root>/group_vars/gpu.yml:13 (hosts gpu-01, gpu-02): layout.tensor_parallel_size: "
        "tensor_parallel_size 3 does not divide the model's 28 attention heads\n"
        "  fix: nearest layout that works: 2 x TP2 (Qwen/Qwen2.5-7B-Instruct, max_model_len 32,768): "
        "519,296 KV tokens per instance, 15 concurrent at 32,768 tokens",
        id="tp-does-not-divide-heads",
    ),
    pytest.param(
        _gpu("  max_model_len: 32768\n", "  max_model_len: 65536\n"),
        "error: <root>/group_vars/gpu.yml:6 (hosts gpu-01, gpu-02): model.max_model_len: max_model_len 65,536 exceeds "
        "the model's 32,768-token context; longer contexts need model.rope_scaling\n"
        "  fix: lower model.max_model_len to 32768 or less, or add model.rope_scaling: "
        "{type: yarn, factor: 2.0, original_max_position_embeddings: 32768}",
        id="context-beyond-the-model-without-rope",
    ),
    pytest.param(
        _gpu("  max_model_len: 32768\n",
             "  max_model_len: 200000\n"
             "  rope_scaling: {type: yarn, factor: 4.0, original_max_position_embeddings: 32768}\n"),
        "error: <root>/group_vars/gpu.yml:6 (hosts gpu-01, gpu-02): model.max_model_len: max_model_len 200,000 exceeds "
        "the 131,072 tokens the model reaches with rope_scaling factor 4\n"
        "  fix: lower model.max_model_len to 131072 or less, or raise model.rope_scaling.factor to 7",
        id="context-beyond-the-rope-factor",
    ),
    pytest.param(
        {"host_vars/gpu-01.yml": "gpus:\n  count: 1\n"
                                 "model:\n  name: Qwen/Qwen2.5-72B-Instruct\n"
                                 "layout:\n  tensor_parallel_size: 1\n"},
        "error: <root>/host_vars/gpu-01.yml:6 (host gpu-01): layout.tensor_parallel_size: weights do not fit: "
        "135.43 GiB of weights per GPU at TP1 plus 1.00 GiB runtime exceed the 22.79 GiB the engine may use "
        "(0.95 x 23.99 GiB)\n"
        "  fix: no layout fits on 1 x rtx-4090d; with more GPUs the smallest that works is 1 x TP4 AWQ "
        "(Qwen/Qwen2.5-72B-Instruct-AWQ, max_model_len 32,768): 147,424 KV tokens per instance, "
        "4 concurrent at 32,768 tokens; use a host with 4 x rtx-4090d, larger GPUs, or a smaller model",
        id="weights-do-not-fit",
    ),
    pytest.param(
        _gpu("  model: rtx-4090d\n", "  model: rtx-4090ti\n"),
        "error: <root>/group_vars/gpu.yml:2 (hosts gpu-01, gpu-02): gpus.model: "
        "GPU 'rtx-4090ti' is not in the catalogue\n"
        "  fix: did you mean 'rtx-4090'? catalogue GPUs: rtx-4090, rtx-4090d, l40s, a100-40gb, a100-80gb, "
        "h100-80gb, h200; for another GPU also set gpus.memory_mib",
        id="unknown-gpu-model",
    ),
    pytest.param(
        _gpu("  name: Qwen/Qwen2.5-7B-Instruct\n", "  name: Qwen/Qwen2.5-7B-Instuct\n"),
        "error: <root>/group_vars/gpu.yml:5 (hosts gpu-01, gpu-02): model.name: "
        "model 'Qwen/Qwen2.5-7B-Instuct' is not in the catalogue\n"
        "  fix: did you mean 'Qwen/Qwen2.5-7B-Instruct'? For a model outside the catalogue set model.config_json "
        "to its config.json (gpufleet plan --catalogue lists the catalogue)",
        id="misspelt-model-name",
    ),
    pytest.param(
        _gpu("  name: Qwen/Qwen2.5-7B-Instruct\n", "  name: acme/house-model\n"),
        "error: <root>/group_vars/gpu.yml:5 (hosts gpu-01, gpu-02): model.name: "
        "model 'acme/house-model' is not in the catalogue\n"
        "  fix: use a catalogue model (gpufleet plan --catalogue lists the catalogue), "
        "or set model.config_json to the model's config.json",
        id="unknown-model-name",
    ),
    pytest.param(
        _gpu("  max_model_len: 32768\n", "  max_model_len: 32768\n  quantization: awq\n"),
        "error: <root>/group_vars/gpu.yml:7 (hosts gpu-01, gpu-02): model.quantization: "
        "Qwen/Qwen2.5-7B-Instruct holds full-precision weights; AWQ needs a quantized checkpoint\n"
        "  fix: set model.name to Qwen/Qwen2.5-7B-Instruct-AWQ, "
        "or set model.quantization to null to serve the full-precision weights",
        id="awq-on-full-precision-checkpoint",
    ),
    pytest.param(
        _gpu("  name: Qwen/Qwen2.5-7B-Instruct\n", "  name: Qwen/Qwen2.5-7B-Instruct-AWQ\n  quantization: gptq\n"),
        "error: <root>/group_vars/gpu.yml:6 (hosts gpu-01, gpu-02): model.quantization: "
        "Qwen/Qwen2.5-7B-Instruct-AWQ is an AWQ checkpoint, but model.quantization is 'gptq'\n"
        "  fix: set model.quantization to 'awq' or null, or set model.name to Qwen/Qwen2.5-7B-Instruct-GPTQ-Int4",
        id="gptq-on-awq-checkpoint",
    ),
    pytest.param(
        _gpu("  name: Qwen/Qwen2.5-7B-Instruct\n",
             "  name: acme/house-model\n  config_json: models/house-model/config.json\n"),
        "error: <root>/group_vars/gpu.yml:6 (hosts gpu-01, gpu-02): model.config_json: "
        "<root>/models/house-model/config.json does not exist\n"
        "  fix: download the model's config.json from its Hugging Face repository to that path, "
        "or correct model.config_json (it is relative to the inventory folder)",
        id="config-json-missing",
    ),
]


@pytest.mark.parametrize(("files", "expected"), PLANNER_CASES)
def test_planner_refusals_name_the_key_and_a_working_fix(make_inventory, files, expected):
    root = make_inventory(files)
    assert _error(root) == _expected(expected, root)


# The API keys file -------------------------------------------------------------------------------

VALID = "web sk-gf-0123456789abcdefghijklmnopqrstuvwxyz\n"

KEYS_CASES = [
    pytest.param(
        None,
        "error: <root>/group_vars/gateway.yml:2 (host gw-01): gateway.api_keys_file: "
        "the API keys file <root>/secrets/api_keys does not exist\n"
        "  fix: create it with: gpufleet keys add <root> <client-name>",
        id="keys-file-missing",
    ),
    pytest.param(
        VALID + "mobile sk-short\n",
        "error: <root>/secrets/api_keys:2: the key for 'mobile' is 8 characters; at least 24 are needed\n"
        "  fix: replace it: gpufleet keys add <root> mobile --replace",
        id="key-too-short",
    ),
    pytest.param(
        VALID + "web sk-gf-zyxwvutsrqponmlkjihgfedcba9876543210\n",
        "error: <root>/secrets/api_keys:2: client name 'web' is used twice (first on line 1)\n"
        "  fix: remove one of the two 'web' lines, or rename one: every client needs its own name",
        id="duplicate-client-name",
    ),
    pytest.param(
        "# no clients yet\n",
        "error: <root>/secrets/api_keys: holds no keys, so no client could call the gateway\n"
        "  fix: add one: gpufleet keys add <root> <client-name>",
        id="no-keys",
    ),
]


@pytest.mark.parametrize(("keys", "expected"), KEYS_CASES)
def test_api_keys_file_errors(make_inventory, keys, expected):
    root = make_inventory(keys=keys)
    assert _error(root) == _expected(expected, root)


def test_api_keys_file_readable_by_others(make_inventory):
    root = make_inventory()
    os.chmod(root / "secrets" / "api_keys", 0o644)
    assert _error(root) == (
        f"error: {root}/secrets/api_keys: gateway.api_keys_file: the API keys file is readable by others "
        "(mode 0644)\n"
        f"  fix: chmod 600 {root}/secrets/api_keys"
    )


def test_keys_file_problems_name_the_file_and_key(make_inventory):
    root = make_inventory(keys=None)
    with pytest.raises(ConfigError) as caught:
        load_fleet(root)
    (problem,) = caught.value.problems
    assert (problem.file, problem.line, problem.key, problem.host) == (
        f"{root}/group_vars/gateway.yml", 2, "gateway.api_keys_file", "gw-01"
    )


# Several problems at once ------------------------------------------------------------------------


def test_every_schema_problem_of_the_fleet_is_reported_at_once(make_inventory):
    root = make_inventory(
        {
            "group_vars/gpu.yml": _replace(GPU_VARS, "  count: 4\n", "  count: four\n"),
            "group_vars/all.yml": _replace(SLO_VARS, "  ttft_p99_ms: 500\n", "  ttft_p99_ms: 0\n"),
            "group_vars/gateway.yml": GATEWAY_VARS + "  burts: 8\n",
            "host_vars/mon-01.yml": "monitoring:\n  retention_days: -1\n",
        }
    )
    # the shared slo value fails on every host but is reported once
    assert _error(root) == (
        f"error: {root}/group_vars/gpu.yml:3: gpus.count: must be a whole number, got 'four'\n"
        "  fix: set gpus.count to a whole number (how many GPUs of that model the host has)\n"
        f"error: {root}/group_vars/all.yml:2: slo.ttft_p99_ms: must be > 0, got 0\n"
        "  fix: set slo.ttft_p99_ms to a value > 0 (time to first token, 99th percentile, in milliseconds)\n"
        f"error: {root}/group_vars/gateway.yml:3: gateway.burts: unknown key 'burts'\n"
        "  fix: did you mean 'burst'? (valid keys: api_keys_file, backends, burst, fail_timeout_s, listen, "
        "max_body_size, max_concurrency, max_conns_per_key, max_fails, nodelay, rate_per_second, read_timeout_s, "
        "status_port, unlimited_clients)\n"
        f"error: {root}/host_vars/mon-01.yml:2: monitoring.retention_days: must be >= 1, got -1\n"
        "  fix: set monitoring.retention_days to a value >= 1 (days of metrics Prometheus keeps)"
    )


def test_every_file_problem_of_the_inventory_is_reported_at_once(make_inventory):
    root = make_inventory(
        {
            "group_vars/all.yml": "slo: [\n",
            "group_vars/gpus.yml": "gpus:\n  count: 2\n",
            "host_vars/gw-02.yml": "gateway:\n  burst: 2\n",
            "host_vars/gpu-01.yml": "- not a mapping\n",
        }
    )
    assert _error(root) == (
        f"error: {root}/group_vars/all.yml:2: is not valid YAML: expected the node content, but found "
        "'<stream end>'\n"
        "  fix: correct the YAML syntax at that line (indentation, a missing ':' or an unclosed quote)\n"
        f"error: {root}/group_vars/gpus.yml: is for group 'gpus', which hosts.yml does not define\n"
        "  fix: did you mean 'gpu'? (valid groups: all, gateway, gpu, monitoring); "
        "rename the file or add the group to hosts.yml\n"
        f"error: {root}/host_vars/gpu-01.yml: must be a mapping of variable names to values, got list\n"
        "  fix: write one 'name: value' per line at the top level of the file\n"
        f"error: {root}/host_vars/gw-02.yml: is for host 'gw-02', which hosts.yml does not list\n"
        "  fix: did you mean 'gw-01'? (valid hosts: gpu-01, gpu-02, gw-01, mon-01); "
        "rename the file or add the host to a group in hosts.yml"
    )


def test_planner_refusals_and_host_problems_are_reported_together(make_inventory):
    root = make_inventory(
        {
            "host_vars/gpu-01.yml": "layout:\n  tensor_parallel_size: 3\n",
            "host_vars/gpu-02.yml": "layout:\n  instances: 2\n",
            "hosts.yml": HOSTS + "    spare:\n      hosts:\n        spare-01:\n",
        }
    )
    assert _error(root) == (
        f"error: {root}/host_vars/gpu-01.yml:2 (host gpu-01): layout.tensor_parallel_size: "
        "tensor_parallel_size 3 does not divide the model's 28 attention heads\n"
        "  fix: nearest layout that works: 2 x TP2 (Qwen/Qwen2.5-7B-Instruct, max_model_len 32,768): "
        "519,296 KV tokens per instance, 15 concurrent at 32,768 tokens\n"
        f"error: {root}/host_vars/gpu-02.yml:2 (host gpu-02): layout.instances: "
        "the layout needs 8 GPUs (2 x TP4) but the host has 4 (gpus.count)\n"
        "  fix: set layout.instances to 1 (1 x TP4 uses 4 of the 4 GPUs)\n"
        f"error: {root}/hosts.yml:15: spare-01: host 'spare-01' is only in group 'spare', "
        "so no gpufleet role would run on it\n"
        "  fix: list it under one of the groups gpu, gateway, monitoring, or make 'spare' a child group of one"
    )


def test_api_keys_problems_are_reported_together(make_inventory):
    root = make_inventory(keys=VALID + "mobile sk-short\nweb sk-gf-zyxwvutsrqponmlkjihgfedcba9876543210\nbad\n")
    assert _error(root) == (
        f"error: {root}/secrets/api_keys:2: the key for 'mobile' is 8 characters; at least 24 are needed\n"
        f"  fix: replace it: gpufleet keys add {root} mobile --replace\n"
        f"error: {root}/secrets/api_keys:3: client name 'web' is used twice (first on line 1)\n"
        "  fix: remove one of the two 'web' lines, or rename one: every client needs its own name\n"
        f"error: {root}/secrets/api_keys:4: a line must be '<name> <key>' (two words)\n"
        "  fix: write the client name, a space, then its key"
    )


# Regressions: inputs that used to crash or be rejected wrongly ----------------------------------


def test_a_folder_in_group_vars_without_yaml_files_is_ignored(make_inventory):
    root = make_inventory()
    (root / "group_vars" / "notes").mkdir()
    (root / "group_vars" / "notes" / "README.md").write_text("group notes\n")
    # used to fail with IndexError: a folder without YAML files counted as group 'notes' with no files
    assert [h.name for h in load_fleet(root).in_group("gpu")] == ["gpu-01", "gpu-02"]


def test_a_key_written_beside_a_yaml_merge_key_overrides_it(make_inventory):
    root = make_inventory(
        {
            "group_vars/gpu.yml": GPU_VARS + "limits: {memory: 16g, shm_size: 4g, pids: 4096}\n",
            "host_vars/gpu-02.yml": "limits:\n  <<: {memory: 16g, shm_size: 4g, pids: 4096}\n  memory: 24g\n",
        }
    )
    # YAML gives the written key precedence over the merged one; it is not a duplicate
    assert load_fleet(root).host("gpu-02").config.limits.memory == "24g"


def test_two_documents_in_one_file(make_inventory):
    root = make_inventory({"host_vars/gpu-01.yml": "gpus:\n  count: 4\n---\ngpus:\n  count: 2\n"})
    assert _error(root) == (
        f"error: {root}/host_vars/gpu-01.yml:3: holds a second YAML document ('---'); "
        "gpufleet reads one document per file\n"
        "  fix: remove the '---' and merge the two documents into one mapping"
    )


def test_api_keys_path_that_is_a_folder(make_inventory):
    root = make_inventory(keys=None)
    (root / "secrets" / "api_keys").mkdir(parents=True)
    assert _error(root) == (
        f"error: {root}/group_vars/gateway.yml:2 (host gw-01): gateway.api_keys_file: "
        f"the API keys file {root}/secrets/api_keys is not a file\n"
        f"  fix: create it with: gpufleet keys add {root} <client-name>"
    )
