"""pyinfra facts the host roles read: what a GPU host is, and the state of its NVIDIA stack.

pyinfra 3 does not cache facts, so an operation that reads one at execute time sees what earlier
operations of the same run did. Every fact's command succeeds on a bare host (a missing tool or
file gives an empty answer, never an error), because roles read facts on hosts they have not
converged yet.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pyinfra.api import FactBase

NVIDIA_VENDOR = "0x10de"
DISPLAY_CLASSES = ("0x0300", "0x0302")  # VGA-compatible and 3D controllers; not audio or USB functions


@dataclass(frozen=True)
class OsInfo:
    id: str  # ubuntu, debian
    version_id: str  # 22.04, 12
    codename: str  # jammy, bookworm

    @property
    def repo_distro(self) -> str:
        """NVIDIA's name for it in repository URLs: ubuntu2204, ubuntu2404, debian12."""
        return f"{self.id}{self.version_id.replace('.', '')}"

    @property
    def label(self) -> str:
        return f"{self.id} {self.version_id}"


class OsRelease(FactBase[OsInfo | None]):
    """/etc/os-release's ID, VERSION_ID and VERSION_CODENAME."""

    def command(self) -> str:
        return "cat /etc/os-release 2>/dev/null || true"

    def process(self, output: list[str]) -> OsInfo | None:
        values: dict[str, str] = {}
        for line in output:
            key, sep, value = line.partition("=")
            if sep:
                values[key.strip()] = value.strip().strip('"')
        if "ID" not in values:
            return None
        return OsInfo(values["ID"], values.get("VERSION_ID", ""), values.get("VERSION_CODENAME", ""))


@dataclass(frozen=True)
class PciDevice:
    address: str  # 0000:01:00.0
    device: str  # 0x2685


class NvidiaPciDevices(FactBase[list[PciDevice]]):
    """NVIDIA display controllers on the PCI bus, from sysfs (no lspci needed on a minimal host)."""

    @staticmethod
    def default() -> list[PciDevice]:
        return []

    def command(self) -> str:
        return (
            "for d in /sys/bus/pci/devices/*; do "
            '[ -r "$d/vendor" ] && [ -r "$d/class" ] || continue; '
            'printf "%s %s %s %s\\n" "${d##*/}" "$(cat "$d/vendor")" '
            '"$(cat "$d/device" 2>/dev/null)" "$(cat "$d/class")"; '
            "done; true"
        )

    def process(self, output: list[str]) -> list[PciDevice]:
        devices = []
        for line in output:
            parts = line.split()
            if len(parts) == 4 and parts[1] == NVIDIA_VENDOR and parts[3].startswith(DISPLAY_CLASSES):
                devices.append(PciDevice(parts[0], parts[2]))
        return devices


class SecureBoot(FactBase[str]):
    """enabled, disabled, or legacy (no EFI): unsigned DKMS modules do not load with it enabled."""

    @staticmethod
    def default() -> str:
        return "legacy"

    def command(self) -> str:
        return (
            "if command -v mokutil >/dev/null 2>&1 && mokutil --sb-state 2>/dev/null | grep -qi 'enabled'; "
            "then echo enabled; "
            "elif [ -d /sys/firmware/efi ]; then "
            "f=$(ls /sys/firmware/efi/efivars/SecureBoot-* 2>/dev/null | head -n1); "
            'if [ -n "$f" ] && [ "$(od -An -t u1 -j4 -N1 "$f" 2>/dev/null | tr -d \' \')" = 1 ]; '
            "then echo enabled; else echo disabled; fi; "
            "else echo legacy; fi"
        )

    def process(self, output: list[str]) -> str:
        return output[0].strip() if output else "legacy"


class FreeDiskGib(FactBase[float | None]):
    """Free space of the filesystem holding `path` (its nearest existing parent), in GiB."""

    def command(self, path: str) -> str:
        return (
            f"p={path}; while [ ! -e \"$p\" ] && [ \"$p\" != / ]; do p=$(dirname \"$p\"); done; "
            "df -Pk \"$p\" 2>/dev/null | tail -n1"
        )

    def process(self, output: list[str]) -> float | None:
        parts = output[-1].split() if output else []
        if len(parts) < 4 or not parts[3].isdigit():
            return None
        return int(parts[3]) / (1024 * 1024)


class HeldPackages(FactBase[set[str]]):
    """Packages apt will not upgrade or remove (`apt-mark hold`)."""

    @staticmethod
    def default() -> set[str]:
        return set()

    def command(self) -> str:
        return "apt-mark showhold 2>/dev/null || true"

    def process(self, output: list[str]) -> set[str]:
        return {line.strip().split(":")[0] for line in output if line.strip()}


class InstalledDebVersions(FactBase[dict[str, str]]):
    """Installed Debian packages (held ones included) and their versions; half-installed ones are not."""

    @staticmethod
    def default() -> dict[str, str]:
        return {}

    def command(self) -> str:
        return "dpkg-query -W -f '${db:Status-Abbrev} ${Package} ${Version}\\n' 2>/dev/null || true"

    def process(self, output: list[str]) -> dict[str, str]:
        versions = {}
        for line in output:
            parts = line.split()
            # status "ii" (install, installed) or "hi" (held, installed): the second letter is the state
            if len(parts) == 3 and len(parts[0]) >= 2 and parts[0][1] == "i":
                versions[parts[1]] = parts[2]
        return versions


@dataclass(frozen=True)
class NvidiaSmiState:
    """What `nvidia-smi` says: the driver's health as an operator would diagnose it.

    status: ok (driver loaded and matching), absent (no nvidia-smi), no_driver (no kernel module
    loaded), mismatch (the loaded module is another version than the installed libraries: the
    classic state after an upgrade without a reboot), error (anything else; `detail` says what).
    """

    status: str
    driver_version: str | None = None
    gpu_names: tuple[str, ...] = ()
    detail: str = ""


class NvidiaSmi(FactBase[NvidiaSmiState]):
    """The driver's state as `nvidia-smi` reports it (see NvidiaSmiState)."""

    @staticmethod
    def default() -> NvidiaSmiState:
        return NvidiaSmiState("absent")
    def command(self) -> str:
        return (
            "if ! command -v nvidia-smi >/dev/null 2>&1; then echo 'rc=absent'; exit 0; fi; "
            "out=$(nvidia-smi --query-gpu=driver_version,name --format=csv,noheader 2>&1); rc=$?; "
            'printf "%s\\nrc=%s\\n" "$out" "$rc"'
        )

    def process(self, output: list[str]) -> NvidiaSmiState:
        lines = [line for line in output if line.strip()]
        rc = lines[-1].removeprefix("rc=") if lines and lines[-1].startswith("rc=") else "?"
        body = [line for line in lines if not line.startswith("rc=")]
        text = " ".join(body)
        if rc == "absent":
            return NvidiaSmiState("absent")
        if rc == "0":
            rows = [[cell.strip() for cell in line.split(",", 1)] for line in body]
            versions = {row[0] for row in rows if len(row) == 2}
            names = tuple(row[1] for row in rows if len(row) == 2)
            return NvidiaSmiState("ok", next(iter(versions)) if len(versions) == 1 else None, names, text)
        if "version mismatch" in text.lower():
            return NvidiaSmiState("mismatch", detail=text)
        if "couldn't communicate with the nvidia driver" in text.lower() or rc == "9":
            return NvidiaSmiState("no_driver", detail=text)
        return NvidiaSmiState("error", detail=f"exit {rc}: {text}")


class JsonFile(FactBase[Any]):
    """A JSON file's content: None when absent; `JsonFile.INVALID` when it does not parse."""

    INVALID = "<invalid JSON>"

    def command(self, path: str) -> str:
        return f"if [ -f {path} ]; then echo present; cat {path}; else echo absent; fi"

    def process(self, output: list[str]) -> Any:
        if not output or output[0] != "present":
            return None
        text = "\n".join(output[1:]).strip()
        if not text:
            return {}
        try:
            return json.loads(text)
        except ValueError:
            return self.INVALID


class LoadedKernelModules(FactBase[set[str]]):
    """Names of the loaded kernel modules (/proc/modules)."""

    @staticmethod
    def default() -> set[str]:
        return set()

    def command(self) -> str:
        return "cut -d' ' -f1 /proc/modules 2>/dev/null || true"

    def process(self, output: list[str]) -> set[str]:
        return {line.strip() for line in output if line.strip()}


class FileText(FactBase[str | None]):
    """A small text file's content, None when absent."""

    def command(self, path: str) -> str:
        return f"if [ -f {path} ]; then echo present; cat {path}; else echo absent; fi"

    def process(self, output: list[str]) -> str | None:
        if not output or output[0] != "present":
            return None
        return "\n".join(output[1:])
