"""Read a container's memory, CPU and pids limits from inside it, on cgroup v1 or v2.

The test bed checks that containers started by the Docker inside a host get the limits they were
started with (`docker run --memory 64m --cpus 0.5 --pids-limit 50 ...`). CGROUP_LIMITS_SCRIPT runs
in the container (busybox sh is enough: cat, echo, test) and prints three lines that
parse_cgroup_limits turns into numbers, whichever cgroup version the host's Docker uses.
"""

from __future__ import annotations

# v2 when the container's cgroup root is a cgroup2 mount (it has cgroup.controllers), else the v1
# per-controller mounts Docker gives a container. cpu.max is "QUOTA PERIOD" (or "max PERIOD").
CGROUP_LIMITS_SCRIPT = """\
c=/sys/fs/cgroup
if [ -f $c/cgroup.controllers ]; then
  echo "memory $(cat $c/memory.max)"
  echo "cpu $(cat $c/cpu.max)"
  echo "pids $(cat $c/pids.max)"
else
  echo "memory $(cat $c/memory/memory.limit_in_bytes)"
  echo "cpu $(cat $c/cpu/cpu.cfs_quota_us) $(cat $c/cpu/cpu.cfs_period_us)"
  echo "pids $(cat $c/pids/pids.max)"
fi
"""



def container_limits_script(container_id: str) -> str:
    """CGROUP_LIMITS_SCRIPT's output for a container, read from outside it (on its Docker host).

    For containers one cannot `docker exec` into (in nested Docker, exec into a container whose
    processes run as a non-root user fails in runc's setns): the files are the same ones.
    """
    find = f'find /sys/fs/cgroup/$1 -maxdepth 5 -type d -name "*{container_id}*" 2>/dev/null | head -n1'
    return (
        f"dir() {{ {find}; }}\n"
        "if [ -f /sys/fs/cgroup/cgroup.controllers ]; then\n"
        "  d=$(dir .)\n"
        '  echo "memory $(cat $d/memory.max)"; echo "cpu $(cat $d/cpu.max)"; echo "pids $(cat $d/pids.max)"\n'
        "else\n"
        '  echo "memory $(cat $(dir memory)/memory.limit_in_bytes)"\n'
        '  echo "cpu $(cat $(dir cpu)/cpu.cfs_quota_us) $(cat $(dir cpu)/cpu.cfs_period_us)"\n'
        '  echo "pids $(cat $(dir pids)/pids.max)"\n'
        "fi\n"
    )


# cgroup v1 reports "no memory limit" as a huge page-aligned number, not "max".
_V1_UNLIMITED_MEMORY = 2**62


def parse_cgroup_limits(text: str) -> dict[str, float | int | None]:
    """{"memory_bytes": int, "cpus": float, "pids": int} from CGROUP_LIMITS_SCRIPT's output; None = unlimited."""
    fields = {key: value.split() for key, _, value in (line.strip().partition(" ") for line in text.splitlines())}
    missing = {"memory", "cpu", "pids"} - fields.keys()
    if missing:
        raise ValueError(f"no {', '.join(sorted(missing))} line in the cgroup limits output: {text!r}")
    (memory,), (quota, period), (pids,) = fields["memory"], fields["cpu"], fields["pids"]
    memory_bytes = None if memory == "max" or int(memory) >= _V1_UNLIMITED_MEMORY else int(memory)
    cpus = None if quota in ("max", "-1") else int(quota) / int(period)
    return {"memory_bytes": memory_bytes, "cpus": cpus, "pids": None if pids == "max" else int(pids)}
