"""Ansible-style inventories: structure, precedence and where each value came from."""

from __future__ import annotations

from gpufleet.inventory import load_inventory

NESTED_HOSTS = """
    all:
      vars:
        level: all
        section: {a: all, b: all}
      children:
        gpu:
          vars:
            level: gpu
          children:
            rack_b:
              vars: {level: rack_b, sibling: rack_b}
              hosts:
                gpu-01:
            rack_a:
              vars: {level: rack_a, sibling: rack_a}
              hosts:
                gpu-01:
                gpu-02: {level: inline-host}
        gateway:
          hosts:
            gw-01:
"""


def test_child_group_beats_parent_and_all(make_inventory, tmp_path):
    root = make_inventory({"hosts.yml": NESTED_HOSTS})
    inv = load_inventory(root)
    gpu01 = inv.hosts["gpu-01"]
    # racks are depth 2 (all -> gpu -> rack), so they beat gpu (depth 1) and all (depth 0)
    assert gpu01.vars["level"] == "rack_b"
    assert gpu01.groups == ["all", "gpu", "rack_a", "rack_b"]


def test_siblings_at_one_depth_merge_alphabetically(make_inventory):
    inv = load_inventory(make_inventory({"hosts.yml": NESTED_HOSTS}))
    # gpu-01 is in rack_a and rack_b; as in Ansible the later name (rack_b) wins
    assert inv.hosts["gpu-01"].vars["sibling"] == "rack_b"


def test_host_variables_beat_every_group(make_inventory):
    inv = load_inventory(make_inventory({"hosts.yml": NESTED_HOSTS}))
    assert inv.hosts["gpu-02"].vars["level"] == "inline-host"


def test_host_vars_file_beats_inline_host_variables(make_inventory):
    root = make_inventory({"hosts.yml": NESTED_HOSTS, "host_vars/gpu-02.yml": "level: host-file\n"})
    assert load_inventory(root).hosts["gpu-02"].vars["level"] == "host-file"


def test_group_vars_file_beats_inline_group_vars(make_inventory):
    root = make_inventory({"hosts.yml": NESTED_HOSTS, "group_vars/rack_a.yml": "sibling: from-file\n"})
    inv = load_inventory(root)
    # rack_a's file beats rack_a's inline vars, but rack_b still wins over rack_a for gpu-01
    assert inv.hosts["gpu-02"].vars["sibling"] == "from-file"
    assert inv.hosts["gpu-01"].vars["sibling"] == "rack_b"


def test_group_vars_directory_files_merge_in_name_order(make_inventory):
    root = make_inventory({
        "hosts.yml": NESTED_HOSTS,
        "group_vars/gpu/10-first.yml": "level: first\nonly_first: 1\n",
        "group_vars/gpu/20-second.yml": "level: second\n",
        "group_vars/gateway.yml": None,
    })
    inv = load_inventory(root)
    gw = inv.hosts["gw-01"]
    assert "only_first" not in gw.vars
    gpu02 = inv.hosts["gpu-02"]
    assert gpu02.vars["only_first"] == 1
    # group_vars/gpu/ is below the racks and the host, so check it on a key they don't set
    root2 = make_inventory({
        "hosts.yml": """
            all:
              children:
                gpu:
                  hosts: {gpu-01: }
        """,
        "group_vars/gpu.yml": "level: file\n",
        "group_vars/gpu/10-first.yml": "level: first\n",
        "group_vars/gpu/20-second.yml": "level: second\n",
        "group_vars/gateway.yml": None,
    }, name="second")
    assert load_inventory(root2).hosts["gpu-01"].vars["level"] == "second"


def test_mappings_merge_key_by_key(make_inventory):
    root = make_inventory({"hosts.yml": NESTED_HOSTS, "host_vars/gpu-01.yml": "section: {b: host}\n"})
    inv = load_inventory(root)
    assert inv.hosts["gpu-01"].vars["section"] == {"a": "all", "b": "host"}
    assert inv.hosts["gpu-02"].vars["section"] == {"a": "all", "b": "all"}


def test_role_defaults_are_the_lowest_layer(make_inventory):
    root = make_inventory()
    inv = load_inventory(root)
    gpu = inv.hosts["gpu-01"]
    assert gpu.vars["engine"]["port"] == 8000
    assert gpu.origin_of(("engine", "port")).file == "roles/inference/defaults.yml"
    assert gpu.vars["serving"]["max_num_seqs"] == 256
    assert gpu.origin_of(("serving", "gpu_memory_utilization")).file.endswith("fleet/group_vars/gpu.yml")


def test_origins_point_at_the_file_and_line_that_set_a_value(make_inventory):
    root = make_inventory({"hosts.yml": NESTED_HOSTS, "host_vars/gpu-01.yml": "# comment\nsection:\n  b: host\n"})
    gpu = load_inventory(root).hosts["gpu-01"]
    origin = gpu.origin_of(("section", "b"))
    assert (origin.file, origin.line) == (f"{root}/host_vars/gpu-01.yml", 3)
    origin_a = gpu.origin_of(("section", "a"))
    assert (origin_a.file, origin_a.line) == (f"{root}/hosts.yml", 4)


def test_top_level_groups_other_than_all_are_children_of_all(make_inventory):
    root = make_inventory({"hosts.yml": """
        gpu:
          hosts:
            gpu-01:
        gateway:
          hosts:
            gw-01:
    """})
    inv = load_inventory(root)
    assert set(inv.hosts) == {"gpu-01", "gw-01"}
    assert inv.groups["all"].children == ["gpu", "gateway"]
    assert inv.hosts["gpu-01"].vars["slo"]["ttft_p99_ms"] == 500  # group_vars/all still applies


def test_hosts_yaml_may_be_named_hosts_yaml(make_inventory):
    root = make_inventory()
    (root / "hosts.yml").rename(root / "hosts.yaml")
    assert set(load_inventory(root).hosts) == {"gpu-01", "gpu-02", "gw-01", "mon-01"}


def test_a_host_in_several_groups_gets_all_their_roles(make_inventory):
    root = make_inventory({"hosts.yml": """
        all:
          children:
            gpu:
              hosts: {box: }
            gateway:
              hosts: {box: }
    """, "group_vars/gateway.yml": "gateway: {api_keys_file: secrets/api_keys}\n"})
    host = load_inventory(root).hosts["box"]
    assert host.groups == ["all", "gateway", "gpu"]
