"""The fleet's service level objectives per served model, and how the alerts measure them.

Every host that serves a model (its GPU hosts) or fronts it (its gateways) carries the inventory's
`slo` section; they must agree, since one set of burn-rate alerts watches the model. Latency SLOs
are p99 objectives ("99 % of requests get their first token within ttft_p99_ms"), measured on the
engines' histograms: the share of observations in the bucket at the threshold. When the threshold
falls between two of vLLM's bucket boundaries, the nearest boundary is used (the larger one on a
tie) and the alerts say which.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from prometheus_client.utils import floatToGoString

from gpufleet.errors import ConfigError, Problem
from gpufleet.fleet import Fleet, FleetHost
from gpufleet.schema.sections import Slo
from gpufleet.sim.metrics import ITL_BUCKETS, TTFT_BUCKETS

LATENCY_OBJECTIVE = 0.99  # the schema's latency SLOs are 99th percentiles


@dataclass(frozen=True)
class BurnWindow:
    """One multi-window pair of the Google SRE workbook's table (chapter 5, "Alerting on SLOs")."""

    severity: str
    long: str
    short: str
    factor: float  # burn rate: how many times faster than the objective allows the budget is spent
    budget_spent: str  # the share of a 30-day budget spent when the long window fires


BURN_WINDOWS = (
    BurnWindow("page", "1h", "5m", 14.4, "2%"),
    BurnWindow("page", "6h", "30m", 6.0, "5%"),
    BurnWindow("ticket", "3d", "6h", 1.0, "10%"),
)
SLI_WINDOWS = ("5m", "30m", "1h", "6h", "3d")  # every window a burn pair reads


@dataclass(frozen=True)
class LatencyThreshold:
    """A latency SLO's threshold and the histogram bucket that measures it."""

    slo_ms: float
    bucket_s: float

    @property
    def le(self) -> str:
        """The bucket's `le` label as prometheus_client (vLLM, the simulator) writes it."""
        return floatToGoString(self.bucket_s)

    @property
    def exact(self) -> bool:
        return abs(self.bucket_s * 1000 - self.slo_ms) < 1e-9

    def note(self) -> str:
        """A sentence for the alerts when the bucket is not the threshold itself, else ''."""
        if self.exact:
            return ""
        return (f" The engines' histogram has no bucket at {self.slo_ms:g} ms: the nearest one, "
                f"{self.bucket_s * 1000:g} ms, measures it.")


def nearest_bucket(slo_ms: float, buckets: Sequence[float]) -> LatencyThreshold:
    seconds = slo_ms / 1000
    # compared in whole microseconds, so a threshold halfway between two buckets is a tie (the larger wins)
    bucket = min(buckets, key=lambda b: (round(abs(b - seconds) * 1e6), -b))
    return LatencyThreshold(slo_ms, bucket)


@dataclass(frozen=True)
class ModelSlo:
    """One served model's objectives, as the alerts use them."""

    model_name: str  # the engines' `model_name` label: the inventory's model.served_name
    slo: Slo
    hosts: tuple[str, ...]  # the GPU and gateway hosts serving it

    @property
    def ttft(self) -> LatencyThreshold:
        return nearest_bucket(self.slo.ttft_p99_ms, TTFT_BUCKETS)

    @property
    def itl(self) -> LatencyThreshold:
        return nearest_bucket(self.slo.itl_p99_ms, ITL_BUCKETS)


def model_slos(fleet: Fleet) -> list[ModelSlo]:
    """Each served model's SLO, in the order the inventory names the models; ConfigError if hosts disagree."""
    serving: dict[str, list[FleetHost]] = {}
    for host in fleet.hosts:
        name = host.plan.served_name if host.plan else host.gateway.served_name if host.gateway else None
        if name is not None:
            serving.setdefault(name, []).append(host)
    found: list[ModelSlo] = []
    problems: list[Problem] = []
    for name, hosts in serving.items():
        first = hosts[0]
        differing = [h for h in hosts if h.config.slo != first.config.slo]
        if differing:
            other = differing[0]
            field = next(k for k in Slo.model_fields if getattr(other.config.slo, k) != getattr(first.config.slo, k))
            origin = other.source.origin_of(("slo", field)) or other.source.defined_at
            problems.append(Problem(
                file=origin.file, line=origin.line, key=f"slo.{field}", host=other.name,
                message=f"is {getattr(other.config.slo, field)!r} on {other.name} but "
                f"{getattr(first.config.slo, field)!r} on {first.name}, and both serve {name!r}: one set of "
                "SLO alerts watches a model",
                fix="give every host serving the model the same slo (set it in group_vars/all.yml)",
            ))
            continue
        found.append(ModelSlo(name, first.config.slo, tuple(h.name for h in hosts)))
    if problems:
        raise ConfigError(problems)
    return found
