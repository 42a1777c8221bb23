#!/usr/bin/env python3
"""Writes deploy/grafana/callbridge-dashboard.json (the committed file is this output).

    python3 scripts/deploy/gen_dashboard.py          # rewrite the dashboard
    python3 scripts/deploy/gen_dashboard.py --check  # exit 1 if the committed file differs

Generated rather than hand-edited so every panel has the same datasource, namespace filter
and layout rules, and so scripts/checks/deploy.sh can tell a hand edit from the source.
Series are filtered by the `namespace` and grouped by the `pod` labels that the usual
Prometheus kubernetes-pods scrape job adds (the prometheus-adapter rule relies on the same).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "callbridge-dashboard.json"
DS = {"type": "prometheus", "uid": "${datasource}"}
NS = 'namespace=~"$namespace"'

panels: list[dict] = []
_next_id = 1
_y = 0
_x = 0


def row(title: str) -> None:
    global _next_id, _y, _x
    if _x:
        _y += 8
        _x = 0
    panels.append({"type": "row", "title": title, "id": _next_id, "collapsed": False,
                   "gridPos": {"h": 1, "w": 24, "x": 0, "y": _y}, "panels": []})
    _next_id += 1
    _y += 1


def panel(title: str, desc: str, targets: list[tuple[str, str]], unit: str = "short",
          kind: str = "timeseries", width: int = 8) -> None:
    global _next_id, _y, _x
    if _x + width > 24:
        _y += 8
        _x = 0
    p = {
        "type": kind,
        "title": title,
        "description": desc,
        "id": _next_id,
        "datasource": DS,
        "gridPos": {"h": 8, "w": width, "x": _x, "y": _y},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "desc"}} if kind == "timeseries"
        else {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
              "colorMode": "value", "graphMode": "area", "textMode": "auto"},
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": DS, "expr": expr, "legendFormat": legend}
            for i, (expr, legend) in enumerate(targets)
        ],
    }
    panels.append(p)
    _next_id += 1
    _x += width


def quantiles(metric: str, by: str = "") -> list[tuple[str, str]]:
    group = f"le{', ' + by if by else ''}"
    return [
        (f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{{{NS}}}[5m])))",
         f"p{int(q * 100)}" + (f" {{{{{by}}}}}" if by else ""))
        for q in (0.5, 0.95, 0.99)
    ]


row("Calls")
panel("Active calls", "Calls carried by all relays now (callbridge_relay_active_calls summed).",
      [(f"sum(callbridge_relay_active_calls{{{NS}}})", "active calls")], kind="stat", width=6)
panel("Relays draining", "Relay pods that received SIGTERM and are finishing their calls.",
      [(f"sum(callbridge_relay_draining{{{NS}}})", "draining")], kind="stat", width=6)
panel("Calls attached to control", "Attach streams held by control replicas.",
      [(f"sum(callbridge_control_attached_calls{{{NS}}})", "attached")], kind="stat", width=6)
panel("Redis up", "0 on any control replica means it cannot reach Redis (health NOT_SERVING).",
      [(f"min(callbridge_control_redis_up{{{NS}}})", "redis up (min over replicas)")],
      kind="stat", width=6)
panel("Active calls per relay pod",
      "The HPA target metric. The HPA adds pods when the average passes its target (100).",
      [(f"sum by (pod) (callbridge_relay_active_calls{{{NS}}})", "{{pod}}")], width=12)
panel("Calls ended per minute, by reason", "callbridge_relay_calls_total by end reason.",
      [(f"sum by (reason) (rate(callbridge_relay_calls_total{{{NS}}}[5m])) * 60", "{{reason}}")],
      width=12)

row("Audio")
panel("Audio frames per second", "Frames forwarded, by direction (one frame is 20 ms of audio).",
      [(f"sum by (direction) (rate(callbridge_relay_frames_total{{{NS}}}[1m]))", "{{direction}}")])
panel("Dropped frames per second",
      "Frames dropped because a bounded per-call queue was full. Should be 0.",
      [(f"sum by (direction) (rate(callbridge_relay_frames_dropped_total{{{NS}}}[1m]))",
        "{{direction}}")])
panel("Time to first audio", "From the media stream start to the first model audio sent to the caller.",
      quantiles("callbridge_relay_time_to_first_audio_seconds"), unit="s")
panel("Barge-ins per minute", "Caller interrupted the agent (clear + truncate).",
      [(f"sum(rate(callbridge_relay_barge_ins_total{{{NS}}}[5m])) * 60", "barge-ins/min")])
panel("Model errors per minute", "Realtime API errors and failed model connections.",
      [(f"sum(rate(callbridge_relay_model_errors_total{{{NS}}}[5m])) * 60", "model errors/min")])
panel("Model outage: circuit breakers and calls sent to the fallback",
      "Relay pods whose model endpoint breaker is open (new calls get the fallback without a "
      "dial), and calls sent away per minute, at the webhook or at a stream's start.",
      [(f"sum(callbridge_relay_model_breaker_open{{{NS}}})", "pods with the breaker open"),
       (f"sum by (at) (rate(callbridge_relay_model_breaker_short_circuits_total{{{NS}}}[5m])) * 60",
        "sent to fallback/min ({{at}})")])
panel("Bad messages per minute, by side", "Malformed or unexpected messages, by the peer that sent them.",
      [(f"sum by (side) (rate(callbridge_relay_bad_messages_total{{{NS}}}[5m])) * 60", "{{side}}")])

row("Events and control")
panel("Event queue depth per relay pod",
      "Call events waiting for control's ack (event lag). Grows while control or Redis is slow.",
      [(f"max by (pod) (callbridge_relay_event_queue_depth{{{NS}}})", "{{pod}}")])
panel("Control reconnects and dropped events per minute",
      "Attach streams re-opened after losing control; events dropped because a call's "
      "unacked buffer was full (should be 0: each one is a transcript gap).",
      [(f"sum(rate(callbridge_relay_control_reconnects_total{{{NS}}}[5m])) * 60", "reconnects/min"),
       (f"sum(rate(callbridge_relay_events_overflow_total{{{NS}}}[5m])) * 60", "events dropped/min")])
panel("Events stored and duplicates per second",
      "Events written to Redis; duplicates are resends after a reconnect (harmless).",
      [(f"sum(rate(callbridge_control_events_stored_total{{{NS}}}[1m]))", "stored"),
       (f"sum(rate(callbridge_control_events_duplicate_total{{{NS}}}[1m]))", "duplicate")])
panel("RPCs per second, by code", "All gRPC calls served by control.",
      [(f"sum by (code) (rate(callbridge_control_rpc_total{{{NS}}}[5m]))", "{{code}}")])
panel("RPC errors per second, by method", "Calls that did not end OK, and bearer-token refusals by API.",
      [(f'sum by (service, method, code) (rate(callbridge_control_rpc_total{{{NS}, code!="Ok"}}[5m]))',
        "{{service}}/{{method}} {{code}}"),
       (f"sum by (api) (rate(callbridge_control_auth_refused_total{{{NS}}}[5m]))",
        "auth refused ({{api}})")])
panel("Commands routed and relays lost per minute",
      "Live commands delivered to the replica holding the call; calls ended relay_lost.",
      [(f"sum(rate(callbridge_control_commands_routed_total{{{NS}}}[5m])) * 60", "commands routed"),
       (f"sum(rate(callbridge_control_relay_lost_total{{{NS}}}[5m])) * 60", "relay lost")])
panel("Attached calls per control replica", "Attach streams held by each replica.",
      [(f"sum by (pod) (callbridge_control_attached_calls{{{NS}}})", "{{pod}}")], width=12)

row("Redis")
panel("Redis latency", "Round trip of control's Redis commands (the 1 s health-probe PING "
      "left out), and the p99 of each command.",
      [(f"histogram_quantile({q}, sum by (le) (rate(callbridge_control_redis_latency_seconds_bucket"
        f"{{{NS}, command!=\"ping\"}}[5m])))", f"p{int(q * 100)}") for q in (0.5, 0.99)]
      + [(f"histogram_quantile(0.99, sum by (le, command) (rate("
          f"callbridge_control_redis_latency_seconds_bucket{{{NS}}}[5m])))", "p99 {{command}}")],
      unit="s", width=12)
panel("Redis reachable, per control replica", "1 = reachable.",
      [(f"min by (pod) (callbridge_control_redis_up{{{NS}}})", "{{pod}}")], width=12)

dashboard = {
    "title": "callbridge",
    "uid": "callbridge-overview",
    "description": "callbridge relay and control plane: calls, audio, events, Redis.",
    "tags": ["callbridge"],
    "timezone": "utc",
    "schemaVersion": 39,
    "version": 1,
    "editable": True,
    "graphTooltip": 1,
    "refresh": "30s",
    "time": {"from": "now-3h", "to": "now"},
    "templating": {
        "list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Data source",
             "current": {}, "hide": 0},
            {"name": "namespace", "type": "query", "datasource": DS, "label": "Namespace",
             "query": {"query": "label_values(callbridge_relay_active_calls, namespace)",
                       "refId": "namespace"},
             "definition": "label_values(callbridge_relay_active_calls, namespace)",
             "includeAll": True, "multi": True, "allValue": ".*", "current": {}, "refresh": 2,
             "hide": 0},
        ]
    },
    "annotations": {"list": []},
    "panels": panels,
}

text = json.dumps(dashboard, indent=2, ensure_ascii=False) + "\n"
if "--check" in sys.argv:
    if not OUT.exists() or OUT.read_text() != text:
        print(f"{OUT} is not the output of {Path(__file__).name}: run it and commit", file=sys.stderr)
        sys.exit(1)
else:
    OUT.write_text(text)
