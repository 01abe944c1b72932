
from gpufleet.fleet import load_fleet


def test_base_inventory_is_valid(make_inventory):
    fleet = load_fleet(make_inventory())
    assert [h.name for h in fleet.in_group("gpu")] == ["gpu-01", "gpu-02"]
    assert [k.name for k in fleet.api_keys] == ["web"]
