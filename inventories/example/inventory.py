"""pyinfra inventory of this fleet, read from hosts.yml, group_vars/ and host_vars/ beside it.

    pyinfra inventories/example/inventory.py deploy/site.py

The whole inventory is validated and planned before pyinfra contacts any host; a problem stops
here with the file, key and fix, and exit code 2.
"""

from gpufleet.inventory.pyinfra_groups import pyinfra_groups

globals().update(pyinfra_groups(__file__))
