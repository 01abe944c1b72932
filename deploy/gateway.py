"""The gateway: pyinfra inventories/<fleet>/inventory.py deploy/gateway.py

Gateway hosts get nginx in front of the engine instances the plan gives them (roles/gateway):
API keys, rate and connection limits per key, a global cap, streaming-safe proxying. Run
deploy/serving.py first so the instances answer. Run from the repository root.
"""

from pyinfra import host

from gpufleet.hostops import runs_systemd
from roles import gateway

if host.data.gpufleet.in_group("gateway") and runs_systemd():
    gateway.apply()
