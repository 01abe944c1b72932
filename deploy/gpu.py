"""Provision GPU hosts: pyinfra inventories/<fleet>/inventory.py deploy/gpu.py

preflight -> NVIDIA driver -> CUDA toolkit (optional) -> Docker -> NVIDIA container toolkit,
each role changing only what differs, so a second run reports no change. A host that fails a
step stops there with the reason; the others carry on. Run from the repository root.
Reboots (only when a loaded driver module must be replaced, with nvidia_driver.reboot: auto)
are safest host by host: add --serial, or limit a run to a batch (--limit 'gpu-0[1-4]').
"""

from pyinfra import host

from roles import container_toolkit, cuda, docker, nvidia_driver, preflight

if host.data.gpufleet.in_group("gpu"):
    preflight.apply()
    nvidia_driver.apply()
    cuda.apply()
    docker.apply()
    container_toolkit.apply()
