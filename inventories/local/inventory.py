"""pyinfra inventory of the one-machine test bed (see hosts.yml).

    pyinfra -y inventories/local/inventory.py deploy/gpu.py
"""

from gpufleet.inventory.pyinfra_groups import pyinfra_groups

globals().update(pyinfra_groups(__file__))
