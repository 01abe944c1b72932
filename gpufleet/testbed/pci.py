"""Simulated NVIDIA GPUs for the test bed's hosts: a PCI device tree and the GPU list.

A host container sees the machine's real PCI bus in /sys (sysfs is not namespaced), so the harness
bind-mounts a generated folder read-only over /sys/bus/pci/devices instead: one directory per
simulated GPU, named by its PCI address, holding what the roles' preflight and `lspci` read
(vendor, device, class, config space, ...). Plain directories, not the real tree's symlinks into
/sys/devices, which a container cannot add to.

The same GPUs, with deterministic UUIDs, go to /etc/gpufleet-testbed/gpus (`gpus_file`), one line
per GPU, `index|name|uuid|memory_total_MiB|pci_bus_id`, for the stand-in nvidia-smi.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

NVIDIA_VENDOR = 0x10DE
VGA_CLASS = 0x030000  # GeForce boards: "VGA compatible controller"
THREE_D_CLASS = 0x030200  # data-center boards: "3D controller"
MAX_GPUS = 16  # one bus per GPU, buses 01..10 (hex); more than any server gpufleet plans for

# PCI device ID and class by the name nvidia-smi reports. Unknown names need an explicit device ID.
KNOWN_GPUS: dict[str, tuple[int, int]] = {
    "NVIDIA GeForce RTX 4090 D": (0x2685, VGA_CLASS),
    "NVIDIA GeForce RTX 4090": (0x2684, VGA_CLASS),
    "NVIDIA A10": (0x2236, THREE_D_CLASS),
    "NVIDIA A100-SXM4-80GB": (0x20B2, THREE_D_CLASS),
    "NVIDIA H100 80GB HBM3": (0x2330, THREE_D_CLASS),
}

# Fixed namespace: a host's GPU UUIDs stay the same across runs, as a real server's do.
_UUID_NAMESPACE = uuid.UUID("7b1c3f0e-9d0a-4c55-8f0e-6a1d2b3c4d5e")


@dataclass(frozen=True)
class SimulatedGpu:
    """One simulated GPU of a host; bus number = index + 1 (0000:01:00.0, 0000:02:00.0, ...)."""

    index: int
    name: str
    uuid: str
    memory_mib: int
    pci_device: int
    pci_class: int

    @property
    def pci_address(self) -> str:
        """The sysfs name: 0000:01:00.0."""
        return f"0000:{self.index + 1:02x}:00.0"

    @property
    def bus_id(self) -> str:
        """nvidia-smi's pci.bus_id: 00000000:01:00.0 (an 8-digit domain)."""
        return f"0000{self.pci_address}"

    def gpus_line(self) -> str:
        return f"{self.index}|{self.name}|{self.uuid}|{self.memory_mib}|{self.bus_id}"


def gpu_uuid(host: str, index: int) -> str:
    """A deterministic nvidia-smi style UUID (GPU-xxxxxxxx-...) from the host name and GPU index."""
    return f"GPU-{uuid.uuid5(_UUID_NAMESPACE, f'{host}/{index}')}"


def simulated_gpus(
    host: str, count: int, *, name: str, memory_mib: int, pci_device: int | None = None
) -> list[SimulatedGpu]:
    """`count` identical GPUs for `host`; the PCI device ID and class come from KNOWN_GPUS unless given."""
    if not 0 <= count <= MAX_GPUS:
        raise ValueError(f"a test bed host has 0 to {MAX_GPUS} GPUs, not {count}")
    known = KNOWN_GPUS.get(name)
    if pci_device is None:
        if known is None:
            raise ValueError(f"no PCI device ID known for {name!r}; pass pci_device (known: {', '.join(KNOWN_GPUS)})")
        pci_device = known[0]
    pci_class = known[1] if known else THREE_D_CLASS  # an unknown board: data-center class, as most are
    return [
        SimulatedGpu(index=i, name=name, uuid=gpu_uuid(host, i), memory_mib=memory_mib, pci_device=pci_device,
                     pci_class=pci_class)
        for i in range(count)
    ]  # fmt: skip


def gpus_file(gpus: Sequence[SimulatedGpu]) -> str:
    """The text of /etc/gpufleet-testbed/gpus (empty for a host without GPUs)."""
    return "".join(f"{gpu.gpus_line()}\n" for gpu in gpus)


def config_space(gpu: SimulatedGpu) -> bytes:
    """A 256-byte type-0 PCI configuration header, enough for `lspci -nn -v` (no BARs, no capabilities)."""
    header = bytearray(256)
    struct.pack_into("<HHHH", header, 0x00, NVIDIA_VENDOR, gpu.pci_device, 0x0006, 0x0000)  # ids, command, status
    struct.pack_into("<I", header, 0x08, (gpu.pci_class << 8) | 0xA1)  # class code and revision
    struct.pack_into("<HH", header, 0x2C, NVIDIA_VENDOR, gpu.pci_device)  # subsystem vendor, subsystem
    struct.pack_into("<BB", header, 0x3C, 0xFF, 0x01)  # interrupt line (none), pin INTA
    return bytes(header)


def device_files(gpu: SimulatedGpu) -> dict[str, bytes]:
    """The sysfs attribute files of one device, as the kernel formats them."""
    modalias = (
        f"pci:v{NVIDIA_VENDOR:08X}d{gpu.pci_device:08X}sv{NVIDIA_VENDOR:08X}sd{gpu.pci_device:08X}"
        f"bc{gpu.pci_class >> 16:02X}sc{(gpu.pci_class >> 8) & 0xFF:02X}i{gpu.pci_class & 0xFF:02X}"
    )
    text = {
        "vendor": f"0x{NVIDIA_VENDOR:04x}",
        "device": f"0x{gpu.pci_device:04x}",
        "class": f"0x{gpu.pci_class:06x}",
        "subsystem_vendor": f"0x{NVIDIA_VENDOR:04x}",
        "subsystem_device": f"0x{gpu.pci_device:04x}",
        "revision": "0xa1",
        "irq": "0",
        "enable": "1",
        "numa_node": "-1",
        "modalias": modalias,
        "resource": "\n".join(["0x0000000000000000 0x0000000000000000 0x0000000000000000"] * 13),
    }
    files = {name: f"{value}\n".encode() for name, value in text.items()}
    files["config"] = config_space(gpu)
    return files


def write_pci_tree(root: Path, gpus: Sequence[SimulatedGpu]) -> None:
    """Write the folder to mount over /sys/bus/pci/devices: exactly these GPUs, nothing else."""
    root.mkdir(parents=True, exist_ok=True)
    for gpu in gpus:
        device = root / gpu.pci_address
        device.mkdir()
        for name, data in device_files(gpu).items():
            (device / name).write_bytes(data)
