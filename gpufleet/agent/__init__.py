"""The host agent: the few gpufleet commands that run as services on the fleet's hosts.

`gpufleet exporter` (GPU hosts) and `gpufleet gateway-exporter` (gateway hosts) are shipped as one
self-contained zipapp (bundle.py) that needs only the host's python3: no pip, no index, no network,
and exactly the code of the controller that deployed it. main.py is its entry point.
"""
