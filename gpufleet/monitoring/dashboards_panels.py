"""Grafana dashboard JSON as plain dicts: panels, targets, thresholds, template variables, layout.

Only what gpufleet's dashboards use, in the shape Grafana 10/11 saves (schemaVersion 39), so a
provisioned dashboard is not rewritten when Grafana loads it. Every panel and target reads the
`datasource` template variable; dashboards.py builds the dashboards from these pieces.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

SCHEMA_VERSION = 39
TAGS = ("gpufleet",)
DATASOURCE_VARIABLE = "datasource"
DATASOURCE = {"type": "prometheus", "uid": f"${{{DATASOURCE_VARIABLE}}}"}
GRID_WIDTH = 24  # Grafana's grid is 24 columns wide

Panel = dict[str, Any]


@dataclass(frozen=True)
class Query:
    """One target of a panel: a PromQL expression and the legend of its series."""

    expr: str
    legend: str
    instant: bool = False  # tables read the latest value only


@dataclass(frozen=True)
class Thresholds:
    """Threshold steps: `base` below the first value, then each (value, colour) from that value up.

    Timeseries panels draw a line at each value; stat panels colour their background.
    """

    base: str = "green"
    steps: tuple[tuple[float, str], ...] = ()

    def json(self) -> dict[str, Any]:
        steps: list[dict[str, Any]] = [{"color": self.base, "value": None}]
        steps += [{"color": color, "value": value} for value, color in sorted(self.steps)]
        return {"mode": "absolute", "steps": steps}


def above(*limits: float, color: str = "red") -> Thresholds:
    """Bad above each of `limits` (one line per distinct limit)."""
    return Thresholds("green", tuple((limit, color) for limit in sorted(set(limits))))


def below(limit: float) -> Thresholds:
    """Bad below `limit`."""
    return Thresholds("red", ((limit, "green"),))


NO_THRESHOLDS = Thresholds()


def _targets(queries: Sequence[Query]) -> list[dict[str, Any]]:
    if not queries:
        raise ValueError("a panel needs at least one query")
    targets = []
    for index, query in enumerate(queries):
        target: dict[str, Any] = {
            "datasource": DATASOURCE,
            "editorMode": "code",
            "expr": query.expr,
            "legendFormat": query.legend,
            "range": not query.instant,
            "instant": query.instant,
            "refId": chr(ord("A") + index),
        }
        if query.instant:
            target["format"] = "table"
        targets.append(target)
    return targets


def _panel(
    kind: str, title: str, description: str, unit: str, queries: Sequence[Query], thresholds: Thresholds,
    width: int, height: int, custom: dict[str, Any], options: dict[str, Any], min_: float | None = None,
    max_: float | None = None,
) -> Panel:
    defaults: dict[str, Any] = {"unit": unit, "thresholds": thresholds.json(), "custom": custom}
    if kind != "table":
        defaults["color"] = {"mode": "thresholds" if kind == "stat" else "palette-classic"}
    if min_ is not None:
        defaults["min"] = min_
    if max_ is not None:
        defaults["max"] = max_
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": options,
        "targets": _targets(queries),
        "gridPos": {"h": height, "w": width, "x": 0, "y": 0},  # placed by dashboard()
    }


def timeseries(
    title: str, description: str, unit: str, queries: Sequence[Query], thresholds: Thresholds = NO_THRESHOLDS,
    *, width: int = 12, height: int = 8, min_: float | None = None, max_: float | None = None,
    stack: bool = False,
) -> Panel:
    custom = {
        "drawStyle": "line",
        "fillOpacity": 10,
        "lineWidth": 1,
        "showPoints": "never",
        "spanNulls": False,
        "stacking": {"group": "A", "mode": "normal" if stack else "none"},
        "thresholdsStyle": {"mode": "line" if thresholds.steps else "off"},
    }
    options = {
        "legend": {"calcs": ["lastNotNull", "max"], "displayMode": "table", "placement": "bottom", "showLegend": True},
        "tooltip": {"mode": "multi", "sort": "desc"},
    }
    return _panel("timeseries", title, description, unit, queries, thresholds, width, height, custom, options,
                  min_, max_)


def stat(
    title: str, description: str, unit: str, queries: Sequence[Query], thresholds: Thresholds = NO_THRESHOLDS,
    *, width: int = 6, height: int = 4, mappings: Sequence[dict[str, Any]] = (),
) -> Panel:
    options = {
        "colorMode": "background",
        "graphMode": "none",
        "justifyMode": "auto",
        "orientation": "auto",
        "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
        "textMode": "auto",
    }
    panel = _panel("stat", title, description, unit, queries, thresholds, width, height, {}, options)
    panel["fieldConfig"]["defaults"]["mappings"] = list(mappings)
    return panel


def table(
    title: str, description: str, unit: str, queries: Sequence[Query], *, width: int = 12, height: int = 8,
    hide_columns: Sequence[str] = ("Time",),
) -> Panel:
    options = {"cellHeight": "sm", "showHeader": True, "footer": {"show": False}}
    panel = _panel("table", title, description, unit, [Query(q.expr, q.legend, instant=True) for q in queries],
                   NO_THRESHOLDS, width, height, {"align": "auto"}, options)
    panel["transformations"] = [
        {"id": "organize", "options": {"excludeByName": dict.fromkeys(hide_columns, True)}},
    ]
    return panel


def row(title: str) -> Panel:
    """A row header: the panels after it, up to the next row, sit under it."""
    return {"type": "row", "title": title, "collapsed": False, "panels": [],
            "gridPos": {"h": 1, "w": GRID_WIDTH, "x": 0, "y": 0}}


UP_MAPPINGS = (
    {"type": "value", "options": {"0": {"text": "down", "color": "red", "index": 0},
                                  "1": {"text": "up", "color": "green", "index": 1}}},
)


def up_stat(title: str, description: str, expr: str, legend: str = "{{host}}", *, width: int = 6) -> Panel:
    """A 0/1 health series as a stat: "up" on green, "down" on red."""
    return stat(title, description, "none", [Query(expr, legend)], below(1), width=width, mappings=UP_MAPPINGS)


# ---- template variables ------------------------------------------------------------------------


def datasource_variable() -> dict[str, Any]:
    """The Prometheus data source every panel reads (the provisioned one by default)."""
    return {
        "name": DATASOURCE_VARIABLE,
        "label": "Data source",
        "type": "datasource",
        "query": "prometheus",
        "current": {},
        "hide": 0,
        "includeAll": False,
        "multi": False,
        "options": [],
        "refresh": 1,
        "regex": "",
        "skipUrlSync": False,
    }


@dataclass(frozen=True)
class Variable:
    """A query variable: the values of `label` on the series `selector` selects (`label_values`).

    Multi-valued with "All" (the regex `.*`), so the panels match on it with `=~"$name"`.
    """

    name: str
    label: str
    selector: str  # a PromQL series selector, may use the variables before it
    title: str = ""

    @property
    def query(self) -> str:
        return f"label_values({self.selector}, {self.label})"

    def json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "label": self.title or self.name,
            "type": "query",
            "datasource": DATASOURCE,
            "definition": self.query,
            "query": {"query": self.query, "refId": f"{self.name}-values"},
            "current": {},
            "hide": 0,
            "includeAll": True,
            "allValue": ".*",
            "multi": True,
            "options": [],
            "refresh": 2,  # on time range change: hosts and instances come and go
            "regex": "",
            "skipUrlSync": False,
            "sort": 1,
        }


# ---- the dashboard ---------------------------------------------------------------------------------


def dashboard(
    uid: str, title: str, description: str, variables: Sequence[Variable], panels: Iterable[Panel]
) -> dict[str, Any]:
    """The dashboard: ids and grid positions assigned in order, left to right, a new line when full."""
    placed = list(_layout(panels))
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": list(TAGS),
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "editable": False,
        "graphTooltip": 1,  # shared crosshair
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "timezone": "browser",
        "refresh": "30s",
        "liveNow": False,
        "fiscalYearStartMonth": 0,
        "weekStart": "",
        "annotations": {"list": [{
            "builtIn": 1,
            "datasource": {"type": "grafana", "uid": "-- Grafana --"},
            "enable": True,
            "hide": True,
            "iconColor": "rgba(0, 211, 255, 1)",
            "name": "Annotations & Alerts",
            "type": "dashboard",
        }]},
        "links": [{"type": "dashboards", "tags": list(TAGS), "asDropdown": True, "title": "gpufleet",
                   "includeVars": False, "keepTime": True, "icon": "external link", "targetBlank": False,
                   "tooltip": "", "url": ""}],
        "templating": {"list": [datasource_variable(), *(v.json() for v in variables)]},
        "panels": placed,
    }


def _layout(panels: Iterable[Panel]) -> Iterator[Panel]:
    x = y = line_height = 0
    for number, panel in enumerate(panels, start=1):
        pos = panel["gridPos"]
        if panel["type"] == "row" or x + pos["w"] > GRID_WIDTH:
            x, y, line_height = 0, y + line_height, 0
        panel["id"] = number
        panel["gridPos"] = {**pos, "x": x, "y": y}
        x += pos["w"]
        line_height = max(line_height, pos["h"])
        if panel["type"] == "row":
            x, y, line_height = 0, y + pos["h"], 0
        yield panel


def all_panels(board: dict[str, Any]) -> Iterator[Panel]:
    """Every panel that queries (rows' children included, rows themselves not)."""
    for panel in board["panels"]:
        if panel["type"] == "row":
            yield from panel.get("panels", [])
        else:
            yield panel
