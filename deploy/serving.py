"""Serve the models: pyinfra inventories/<fleet>/inventory.py deploy/serving.py

GPU hosts get one engine container per instance of their planned layout (roles/inference),
recreated only when its spec changed, and checked healthy and answering. Run deploy/gpu.py
first (Docker and the NVIDIA container toolkit). Run from the repository root.
"""

from pyinfra import host

from roles import inference

if host.data.gpufleet.in_group("gpu"):
    inference.apply()
