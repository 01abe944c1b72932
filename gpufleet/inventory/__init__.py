"""Ansible-style inventories: hosts.yml, group_vars/, host_vars/, merged with Ansible's precedence."""

from gpufleet.inventory.loader import load_inventory
from gpufleet.inventory.model import Group, Inventory, InventoryHost, Origin

__all__ = ["Group", "Inventory", "InventoryHost", "Origin", "load_inventory"]
