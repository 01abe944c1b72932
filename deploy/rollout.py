"""Rolling update: pyinfra inventories/<fleet>/inventory.py deploy/rollout.py

Change the inventory first (engine image, model, flags, limits); this replaces the instances
whose container spec differs, one at a time across the fleet, taking each out of its gateways
while it is replaced, and rolls an instance back (and stops) when its new spec does not become
healthy. Instances already at their spec are left alone. `--limit` picks GPU hosts; the gateways
fronting them must be in the run too. See roles/inference/rollout.py and docs/serving.md.
"""

from roles.inference import rollout

rollout.apply()
