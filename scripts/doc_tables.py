#!/usr/bin/env python3
"""Writes the docs' measured tables from the committed result files, so that no figure
in them is copied by hand.

A generated table sits between two markers in a Markdown file under docs/:

    <!-- table: KIND RESULT_FILE -->
    ...written by this script...
    <!-- /table -->

KIND names a renderer below (`soak`, `faults`); RESULT_FILE is a JSON result file written
by the bench binary (`--out`), committed under docs/results/. Each table ends with a line
naming the command, commit and machine that produced it.

    python3 scripts/doc_tables.py           # rewrite the tables in place
    python3 scripts/doc_tables.py --check   # exit 1 naming every table that differs

Standard library only.
"""
import datetime
import json
import math
import os
import re
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCK = re.compile(
    r"(<!-- table: (?P<kind>\w+) (?P<file>\S+) -->\n)(?P<body>.*?)(<!-- /table -->)",
    re.S,
)


def thousands(n):
    return f"{n:,}"


def source_line(doc):
    prov = doc.get("provenance", {})
    machine = doc.get("machine", {})
    when = datetime.datetime.fromtimestamp(prov.get("finished_unix", 0), datetime.timezone.utc)
    dirty = " (with uncommitted changes)" if prov.get("dirty") else ""
    start = machine.get("load_average_at_start")
    end = doc.get("load_average_at_end")
    load = f"load average {start:.1f} at the start, {end:.1f} at the end" if start is not None and end is not None else "load average not recorded"
    cmd = prov.get("command", "?")
    return (
        f"*Source:* `{cmd}` at commit `{prov.get('commit', 'unknown')[:10]}`{dirty}, "
        f"finished {when:%Y-%m-%d %H:%M} UTC; {machine.get('cores', '?')} cores "
        f"({machine.get('cpu', '?')}), {load}.\n"
    )


SOAK_SERIES = [
    ("relay RSS", "relay_rss_kib", "MiB"),
    ("relay RSS anonymous", "relay_anon_kib", "MiB"),
    ("relay open FDs", "relay_fds", None),
    ("relay runtime tasks", "relay_tasks", None),
    ("relay threads", "relay_threads", None),
    ("control RSS", "control_rss_kib", "MiB"),
    ("control RSS anonymous", "control_anon_kib", "MiB"),
    ("control open FDs", "control_fds", None),
    ("Redis used_memory", "redis_used_kib", "MiB"),
]
SOAK_AFTER = {"relay_fds": "relay_fds", "relay_tasks": "relay_tasks", "control_fds": "control_fds"}


def render_soak(doc):
    slopes = doc["slopes_after_warmup"]
    after = doc.get("after_last_call", {})
    args = doc["args"]
    control_env = args.get("control_env") or []
    env_text = f" Control ran with `{' '.join(control_env)}`." if control_env else ""
    lines = [
        f"{args['calls']} call slots for {args['minutes']:g} minutes, warm-up "
        f"{args['warmup_minutes']:g} minutes: {thousands(doc['calls_completed'])} calls "
        f"completed, {doc['calls_failed']} failed.{env_text}\n",
        "\n",
        "| Figure | mean after warm-up | slope (% of mean / 10 min) | verdict | after the last call |\n",
        "|---|---|---|---|---|\n",
    ]
    for name, key, unit in SOAK_SERIES:
        if name not in slopes:
            continue  # a series older result files did not record
        s = slopes.get(name, {})
        mean, pct = s.get("mean"), s.get("slope_pct_per_10min")
        if mean is None:
            mean_text = "n/a"
        elif unit == "MiB":
            mean_text = f"{mean / 1024:.1f} MiB"
        else:
            mean_text = f"{mean:,.0f}"
        if pct is None:
            pct_text, verdict = "n/a", "n/a"
        else:
            pct_text = f"{pct:+.2f} %"
            verdict = "flat" if abs(pct) < 1.0 else ("grows" if pct > 0 else "falls")
        value = after.get(SOAK_AFTER.get(key, ""))
        after_text = "—" if value is None else f"{value:,.0f}"
        lines.append(f"| {name} | {mean_text} | {pct_text} | {verdict} | {after_text} |\n")
    lines.append("\n")
    lines.append(source_line(doc))
    return "".join(lines)


FAULT_NAMES = {
    "sigterm": "Relay SIGTERM (hand-off)",
    "sigkill": "Relay SIGKILL",
    "control": "Control killed and restarted",
    "redis": "Redis SIGTERM and restart (AOF `everysec`)",
    "model": "Model socket closed every 4 s",
}


def render_faults(doc):
    lines = [
        "| Fault | calls completed | frames lost (sent − received) | switch gap p50 / p99 | acknowledged events lost | transcript lines missing |\n",
        "|---|---|---|---|---|---|\n",
    ]
    for r in doc["rows"]:
        gap = r["switch_gap_ms"]
        if gap["n"] == 0:
            gap_text = "— (audio goes on)"
        else:
            gap_text = f"{gap['p50']:.1f} / {gap['p99']:.1f} ms (n={gap['n']})"
        lost = r["frames_sent"] - r["frames_received"]
        lost_text = f"{lost:,} of {r['frames_sent']:,}"
        if lost < 0:
            lost_text += " (resent)"
        lines.append(
            f"| {FAULT_NAMES.get(r['fault'], r['fault'])} | {r['completed']} of {r['calls']} | "
            f"{lost_text} | {gap_text} | {r['acked_events_lost']} of {r['acked_events_before']} | "
            f"{r['transcript_lines_missing']} |\n"
        )
    lines.append("\n")
    lines.append(source_line(doc))
    return "".join(lines)


def num(x, fmt):
    """A number in `fmt`, or an em dash when it was not measured."""
    if x is None or (isinstance(x, float) and x != x):
        return "—"
    return format(x, fmt)


def span(values, fmt):
    """`a–b` of the values (one value: itself); em dash when there are none."""
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    lo, hi = min(values), max(values)
    return format(lo, fmt) if format(lo, fmt) == format(hi, fmt) else f"{lo:{fmt}}–{hi:{fmt}}"


# === bench_relay (docs/results/relay.json) ===

HANGUP_NAMES = [
    ("close_before_start", "close before `start`"),
    ("close_right_after_start", "close right after `start`"),
    ("close_idle_after_start", "idle close"),
    ("stop_mid_media", "`stop` mid-media"),
    ("drop_tcp_mid_media", "TCP drop mid-media"),
]


def relay_rows(doc):
    return [r for r in doc["results"] if "error" not in r]


def relay_full_rate(doc, r):
    """Frames a level would send at 50 frames/s per call over the load window."""
    return r["calls"] * doc["args"]["secs"] * 50


def sent_in_load(r):
    """Frames sent in the load window (later files also stream through a counting window)."""
    return r["frames"].get("sent_in_load_window", r["frames"]["sent"])


def render_relay(doc):
    args = doc["args"]
    lines = [
        f"Levels {', '.join(thousands(n) for n in args['calls'])} calls; paths "
        f"{', '.join(args['paths'])}; {args['secs']} s load window, {args['idle_secs']} s idle "
        f"window, ramp {args['ramp_per_sec']} calls/s"
        f"{'; every caller speaking (`--speaking`)' if args.get('speaking') else ''}"
        f"{'; TLS on every internal hop' if doc.get('tls') else ''}.\n",
        "\n",
        "| path | calls | sent (% of full rate) | lost | RTT p50 / p99 / max (ms) | added p99 | relay CPU-ms / call-s | RSS KiB/call idle / load | gen% | fake% | open after | load avg |\n",
        "|---|---:|---:|---:|---|---:|---:|---|---:|---:|---:|---:|\n",
    ]
    for r in doc["results"]:
        if "error" in r:
            lines.append(f"| {r['path']} | {thousands(r['calls'])} | failed: {r['error']} |||||||||\n")
            continue
        fr = r["frames"]
        rtt = r["rtt_ms"]
        relay = r.get("relay") or {}
        baseline = r["path"] == "baseline"
        added = None if baseline else r.get("added_p99_ms")
        pct = 100.0 * sent_in_load(r) / relay_full_rate(doc, r)
        rss = "—" if baseline else f"{relay['rss_kib_per_call_idle']:.0f} / {relay['rss_kib_per_call_load']:.0f}"
        lines.append(
            f"| {r['path']} | {thousands(r['calls'])} | {thousands(sent_in_load(r))} ({pct:.0f} %) | "
            f"{thousands(fr['lost'])} | {rtt['p50']:.2f} / {rtt['p99']:.2f} / {rtt['max']:.1f} | "
            f"{num(added, '.2f')} | {num(relay.get('cpu_ms_per_call_sec'), '.2f')} | {rss} | "
            f"{r['loadgen_cpu_pct']:.0f} | {r['fake_cpu_pct']:.0f} | {r['upstream_open_after_end']} | "
            f"{num(r.get('load_average'), '.1f')} |\n"
        )
    lines.append("\n")
    ratios = doc.get("production_vs_standalone") or []
    if ratios:
        lines.append(
            "Production / standalone relay CPU: "
            + ", ".join(f"{x['cpu_ratio']:.2f}" for x in ratios)
            + "; RSS per call under load: "
            + ", ".join(f"{x['rss_ratio']:.2f}" for x in ratios)
            + f" (at {', '.join(thousands(x['calls']) for x in ratios)} calls).\n\n"
        )
    hang = doc.get("hangup_phases")
    if isinstance(hang, dict) and "error" not in hang:
        parts = [
            f"{label} {hang[k]['model_sockets_opened']} opened / {hang[k]['model_sockets_open_after']} open after"
            for k, label in HANGUP_NAMES
            if k in hang
        ]
        calls = next(iter(hang.values()))["calls"]
        lines.append(f"Hang-up check ({calls} calls per kind, model sockets): " + "; ".join(parts) + ".\n\n")
    elif hang:
        lines.append(f"Hang-up check failed: {hang.get('error')}.\n\n")
    cold = doc.get("coldstart")
    if isinstance(cold, dict) and "error" not in cold:
        parts = []
        for path, c in cold.items():
            if "skipped" in c:
                continue
            fe = c["first_echo_ms"]
            parts.append(
                f"{path}: {thousands(c['frames']['received'])} of {thousands(c['frames']['sent'])} frames "
                f"echoed ({c['frames']['lost']} lost), first frame back on {c['first_frame_back']} of "
                f"{c['calls']} calls after {num(fe['p50'], '.1f')} ms (p50) / {num(fe['max'], '.1f')} ms "
                f"(max), {c['upstream_open_after_end']} model sockets open after"
            )
        dial = next(iter(cold.values())).get("model_dial_ms")
        lines.append(f"Cold-start check (model dial held {dial} ms): " + "; ".join(parts) + ".\n\n")
    elif cold:
        lines.append(f"Cold-start check failed: {cold.get('error')}.\n\n")
    lines.append(source_line(doc))
    return "".join(lines)


def relay_at(doc, path, calls):
    for r in relay_rows(doc):
        if r["path"] == path and r["calls"] == calls:
            return r
    return None


def render_relay_targets(doc):
    levels = doc["args"]["calls"]
    top = max(levels)
    paths = [p for p in ("standalone", "production") if p in doc["args"]["paths"]]
    lines = ["| target | result | verdict |\n", "|---|---|---|\n"]

    def per_level(metric, fmt, limit):
        cells, met_at, missed_at = [], [], []
        for n in levels:
            vals = [metric(relay_at(doc, p, n)) for p in paths if relay_at(doc, p, n)]
            vals = [v for v in vals if v is not None]
            if not vals:
                continue
            cells.append(f"{thousands(n)}: " + " / ".join(format(v, fmt) for v in vals))
            (met_at if all(v <= limit for v in vals) else missed_at).append(thousands(n))
        return cells, met_at, missed_at

    def verdict(met_at, missed_at):
        if not missed_at:
            return "**met**"
        if not met_at:
            return "**not met**"
        return f"**met at {', '.join(met_at)} calls; not met at {', '.join(missed_at)}**"

    who = " / ".join(paths)
    # Frames lost and full rate at the largest level.
    tops = [relay_at(doc, p, top) for p in paths]
    tops = [r for r in tops if r]
    lost = sum(r["frames"]["lost"] + r["frames"]["misrouted"] for r in tops)
    connected = all(r["connected"] == r["calls"] for r in tops)
    offered = " / ".join(f"{100.0 * sent_in_load(r) / relay_full_rate(doc, r):.0f} %" for r in tops)
    lines.append(
        f"| {thousands(top)} concurrent calls through one relay, zero frames lost | "
        f"{'every call connected' if connected else 'not every call connected'}; {lost} frames lost or "
        f"misrouted; the box offered {offered} ({who}) of the full 50 frames/s per call | "
        f"{'**met**' if connected and lost == 0 else '**not met**'}"
        f"{'' if all(sent_in_load(r) >= 0.99 * relay_full_rate(doc, r) for r in tops) else ' (full rate not shown on this box)'} |\n"
    )
    cells, met, missed = per_level(lambda r: r.get("added_p99_ms"), ".2f", 5.0)
    lines.append(f"| added round-trip p99 ≤ 5 ms (ms, {who}) | {'; '.join(cells) or '— (no baseline path)'} | {verdict(met, missed) if cells else '—'} |\n")
    cells, met, missed = per_level(lambda r: r["relay"]["cpu_ms_per_call_sec"], ".2f", 1.0)
    lines.append(f"| ≤ 1 CPU-ms per call-second ({who}) | {'; '.join(cells)} | {verdict(met, missed)} |\n")
    rss = [f"{r['path']} {r['relay']['rss_kib_per_call_load']:.0f} KiB" for r in tops]
    rss_met = all(r["relay"]["rss_kib_per_call_load"] <= 64 for r in tops)
    speaking = " (every caller speaking)" if doc["args"].get("speaking") else " (listening callers)"
    lines.append(f"| ≤ 64 KiB RSS per call at {thousands(top)} calls, under load{speaking} | {', '.join(rss)} | {'**met**' if rss_met else '**not met**'} |\n")
    open_after = sum(r["upstream_open_after_end"] for r in relay_rows(doc))
    hang = doc.get("hangup_phases")
    hang_open = None
    if isinstance(hang, dict) and "error" not in hang:
        hang_open = sum(h["model_sockets_open_after"] for h in hang.values())
    cold = doc.get("coldstart")
    cold_rows = [c for c in cold.values() if "skipped" not in c] if isinstance(cold, dict) and "error" not in cold else []
    cold_open = sum(c["upstream_open_after_end"] for c in cold_rows)
    text = f"{open_after} after the levels"
    text += f", {hang_open} after the hang-up kinds" if hang_open is not None else ", hang-up check not run"
    text += f", {cold_open} after the cold-start calls" if cold_rows else ""
    all_open = open_after + (hang_open or 0) + cold_open
    lines.append(f"| no model socket open after any way a call ends | {text} | {'**met**' if all_open == 0 and hang_open is not None else ('**not met**' if all_open else '—')} |\n")
    if cold_rows:
        lost = sum(c["frames"]["lost"] for c in cold_rows)
        firsts = all(c["first_frame_back"] == c["calls"] for c in cold_rows)
        parts = ", ".join(
            f"{path} {c['frames']['received']:,} of {c['frames']['sent']:,}"
            for path, c in cold.items()
            if "skipped" not in c
        )
        lines.append(f"| no frame dropped at call start | frames echoed: {parts}; first frame back on every call: {'yes' if firsts else 'no'} | {'**met**' if lost == 0 and firsts else '**not met**'} |\n")
    ratios = doc.get("production_vs_standalone") or []
    if ratios:
        cpu = ", ".join(f"{x['cpu_ratio']:.2f}" for x in ratios)
        rss = ", ".join(f"{x['rss_ratio']:.2f}" for x in ratios)
        cpu_met = all(x["cpu_ratio"] <= 1.10 for x in ratios)
        rss_met = all(x["rss_ratio"] <= 1.10 for x in ratios)
        lines.append(
            f"| production costs ≤ 10 % more than standalone | CPU ×{cpu}; RSS per call ×{rss} "
            f"(at {', '.join(thousands(x['calls']) for x in ratios)} calls) | CPU: "
            f"{'**met**' if cpu_met else '**not met**'}; memory: {'**met**' if rss_met else '**not met**'} |\n"
        )
    lines.append("\n")
    lines.append(source_line(doc))
    return "".join(lines)


# Before/after comparisons: a folder of bench_relay result files named SET-N.json.
SET_LABELS = {
    "before": "before",
    "double-future": "after, future held twice",
    "after": "after",
}


def render_relay_sets(docs):
    sets = {}
    loads = []
    for name, doc in sorted(docs.items()):
        set_name = name.rsplit("-", 1)[0]
        loads.append(doc["machine"].get("load_average_at_start"))
        for r in relay_rows(doc):
            if r["path"] == "baseline":
                continue
            key = (r["path"], r["calls"], r.get("delta_ms") or 0)
            sets.setdefault(set_name, {}).setdefault(key, []).append(r)
    order = [s for s in SET_LABELS if s in sets] + sorted(s for s in sets if s not in SET_LABELS)
    has_added = any(r.get("added_p99_ms") is not None for s in sets.values() for rs in s.values() for r in rs)
    head = "| path, calls | set | runs | CPU-ms per call-second | p99 round trip ms |"
    head += " added p99 ms |" if has_added else ""
    head += " RSS KiB per call under load |\n"
    lines = [
        "Median (range) over the runs of each set:\n",
        "\n",
        head,
        "|---|---|---|---|---|" + ("---|" if has_added else "") + "---|\n",
    ]
    keys = sorted({k for s in sets.values() for k in s})

    def cell(values, fmt):
        values = [v for v in values if v is not None]
        if not values:
            return "—"
        return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}–{max(values):{fmt}})"

    for key in keys:
        for s in order:
            runs = sets[s].get(key, [])
            if not runs:
                continue
            deltas = f", {key[2]} ms deltas" if key[2] else ""
            row = (
                f"| {key[0]} {key[1]}{deltas} | {SET_LABELS.get(s, s)} | {len(runs)} | "
                f"{cell([r['relay']['cpu_ms_per_call_sec'] for r in runs], '.2f')} | "
                f"{cell([r['rtt_ms']['p99'] for r in runs], '.1f')} |"
            )
            if has_added:
                row += f" {cell([r.get('added_p99_ms') for r in runs], '.1f')} |"
            row += f" {cell([r['relay']['rss_kib_per_call_load'] for r in runs], '.1f')} |\n"
            lines.append(row)
    cpu = {d["machine"].get("cpu", "?") for d in docs.values()}
    counts = ", ".join(f"{s} ×{len({n for n in docs if n.rsplit('-', 1)[0] == s})}" for s in order)
    lines.append("\n")
    provs = [d.get("provenance") for d in docs.values()]
    if all(provs):
        commits = sorted({p.get("commit", "unknown")[:10] for p in provs})
        dirty = " (with uncommitted changes)" if any(p.get("dirty") for p in provs) else ""
        bins = sorted({f"{name.rsplit('-', 1)[0]}: `{d.get('bin_dir') or 'its own build'}`" for name, d in docs.items()})
        where = (
            f"`{provs[0].get('command', '?')}` at commit {', '.join(f'`{c}`' for c in commits)}{dirty}; "
            f"relay and control binaries from {'; '.join(bins)}"
        )
    else:
        where = "without provenance (written before the bench recorded it)"
    lines.append(
        f"*Source:* {len(docs)} `bench_relay --out` files ({counts}), {where}; "
        f"{', '.join(sorted(cpu))}, load average {span(loads, '.1f')} at their starts.\n"
    )
    return "".join(lines)


# === bench_control (docs/results/control.json) ===


def us_ms(q, key):
    v = q.get(key)
    return "—" if v is None else f"{v / 1000:.2f}"


def render_control(doc):
    lines = [
        f"Throughput: window {doc['window']} unacknowledged events per stream, calls spread over "
        f"{doc['connections']} HTTP/2 connections"
        f"{'; TLS on both hops' if doc.get('tls') else ''}:\n",
        "\n",
        "| calls | events | events/s acknowledged | send → ack p50 / p99 ms | control CPU | Redis CPU | bench client CPU | Redis commands per event |\n",
        "|---:|---:|---:|---|---:|---:|---:|---:|\n",
    ]
    for t in doc["throughput"]:
        q = t["send_to_ack_under_load"]
        lines.append(
            f"| {thousands(t['calls'])} | {thousands(t['events'])} | {t['events_per_sec']:,.0f} | "
            f"{us_ms(q, 'p50_us')} / {us_ms(q, 'p99_us')} | {t['control_cpu_percent']:.0f} % | "
            f"{t['redis_cpu_percent']:.0f} % | {t['bench_client_cpu_percent']:.0f} % | "
            f"{t['redis_commands_per_event']:.2f} |\n"
        )
    w = doc["watch"]
    sw, sa = w["send_to_watch"], w["send_to_ack"]
    lines += [
        "\n",
        f"Watch latency: {thousands(w['calls'])} calls × {w['events_per_call_per_sec']} events/s "
        f"({thousands(w['offered_events_per_sec'])} events/s offered), {thousands(w['events'])} events, "
        f"each watched by a `WatchCall` opened before its relay stream:\n",
        "\n",
        "| send → watcher p50 ms | p99 ms | max ms | send → ack p99 ms | control CPU | Redis commands per event |\n",
        "|---:|---:|---:|---:|---:|---:|\n",
        f"| {us_ms(sw, 'p50_us')} | {us_ms(sw, 'p99_us')} | {us_ms(sw, 'max_us')} | {us_ms(sa, 'p99_us')} | "
        f"{w['control_cpu_percent']:.0f} % | {w['redis_commands_per_event']:.2f} |\n",
        "\n",
    ]
    bulk = doc.get("bulk") or {}
    parts = []
    if "create_calls" in bulk:
        c, lc = bulk["create_calls"], bulk["list_calls"]
        parts.append(
            f"`CreateCalls` of {thousands(c['calls'])} calls (batches of {c['batch']}) {c['ms']:.0f} ms "
            f"({c['calls_per_sec']:,.0f} calls/s, control CPU {c['control_cpu_ms']:.0f} ms); `ListCalls` "
            f"of them {lc['ms']:.0f} ms ({lc['pages']} requests of up to {lc['page_size']}, control CPU "
            f"{lc['control_cpu_ms']:.0f} ms)"
        )
    if "serial_events" in bulk:
        s = bulk["serial_events"]
        parts.append(
            f"{thousands(s['events'])} serial events (one in flight) {s['us_per_event']:.0f} µs per event "
            f"(send → ack p50 {us_ms(s['send_to_ack'], 'p50_us')} ms, p99 {us_ms(s['send_to_ack'], 'p99_us')} ms; "
            f"control CPU {s['control_cpu_us_per_event']:.0f} µs per event)"
        )
    if parts:
        lines.append("Bulk and serial, one client, nothing else in flight: " + "; ".join(parts) + ".\n\n")
    rb = doc.get("redis_benchmark") or []
    if rb:
        lines.append(
            "Redis alone (`redis-benchmark` XADD, same server and socket): "
            + ", ".join(f"{r['xadd_per_sec']:,.0f}/s with {r['clients']} clients and pipeline {r['pipeline']}" for r in rb)
            + ".\n\n"
        )
    lines.append(source_line(doc))
    return "".join(lines)


def render_control_targets(doc):
    rates = {t["calls"]: t["events_per_sec"] for t in doc["throughput"]}
    at = [(n, rates[n]) for n in (10, 100) if n in rates]
    met = bool(at) and all(r >= 50_000 for _, r in at)
    w = doc["watch"]
    p99 = w["send_to_watch"].get("p99_us")
    p99_ms = None if p99 is None else p99 / 1000
    load = doc["machine"].get("load_average_at_start")
    lines = [
        "| target | result | verdict |\n",
        "|---|---|---|\n",
        f"| ≥ 50,000 events/s acknowledged with one control process, at 10 and 100 calls | "
        + "; ".join(f"{r:,.0f} events/s at {n} calls" for n, r in at)
        + f" | {'**met**' if met else '**not met**'} |\n",
        f"| watch p99 < 5 ms at {w['calls']} calls (send → watcher) | {num(p99_ms, '.2f')} ms "
        f"(load average {num(load, '.1f')} at the start) | "
        f"{'**met**' if p99_ms is not None and p99_ms < 5 else '**not met**'} |\n",
        "\n",
        source_line(doc),
    ]
    return "".join(lines)


# === bench_survive (docs/results/survive.json) ===

SURVIVE_GAPS = [
    ("reconnect_gap", "reconnect gap", "model socket closed → the new session receives the caller's audio"),
    ("handoff_gap", "hand-off gap", "old stream closed (1000, after HANDOFF) → new stream open on another relay"),
    ("failover_gap", "failover gap", "relay SIGKILLed, stream dropped → new stream open on another relay"),
]
SURVIVE_OUTAGE = [
    ("outage_no_breaker", "breaker off (`RELAY_MODEL_BREAKER_FAILURES=0`): every call dials"),
    ("outage_opening", "breaker at 2: the calls that open it"),
    ("outage_open", "breaker at 2: the calls after, answered the fallback by the webhook"),
]


def gap_cells(g):
    if not g.get("n"):
        return "0 | — | — | —"
    return f"{g['n']} | {g['p50_ms']:.1f} ms | {g['p99_ms']:.1f} ms | {g['max_ms']:.1f} ms"


def render_survive_gaps(doc):
    f = doc["figures"]
    a = doc["args"]
    lines = ["| Figure | What is measured | n | p50 | p99 | max |\n", "|---|---|---|---|---|---|\n"]
    for key, name, what in SURVIVE_GAPS:
        lines.append(f"| {name} | {what} | {gap_cells(f[key])} |\n")
    moved, fin = doc["calls_moved"], doc["finished_by_caller"]
    lines += [
        "\n",
        f"Calls moved: hand-off {moved['handoff']} of {a['calls']}, failover {moved['failover']} of "
        f"{a['calls']}; ended by the caller: hand-off {fin['handoff']} of {a['calls']}, failover "
        f"{fin['failover']} of {a['calls']}. {a['profile'].capitalize()} build.\n",
        "\n",
        source_line(doc),
    ]
    return "".join(lines)


def render_survive_outage(doc):
    f = doc["figures"]
    lines = ["| Figure | n | p50 | p99 | max |\n", "|---|---|---|---|---|\n"]
    for key, name in SURVIVE_OUTAGE:
        lines.append(f"| {name} | {gap_cells(f[key])} |\n")
    lines += ["\n", source_line(doc)]
    return "".join(lines)


# === TLS on the internal hops: a folder with relay-plain, relay-tls, control-plain and
# control-tls result files (bench_relay / bench_control with and without --tls) ===


def render_tls_cost(docs):
    need = ["relay-plain", "relay-tls", "control-plain", "control-tls"]
    missing = [n for n in need if n not in docs]
    if missing:
        raise ValueError(f"missing {', '.join(n + '.json' for n in missing)}")
    for n in need:
        if bool(docs[n].get("tls")) != n.endswith("-tls"):
            raise ValueError(f"{n}.json: tls is {docs[n].get('tls')}, the name says otherwise")
    lines = ["| figure | without TLS | with TLS |\n", "|---|---:|---:|\n"]
    plain, tls = docs["relay-plain"], docs["relay-tls"]
    for r in relay_rows(plain):
        if r["path"] != "production":
            continue
        t = relay_at(tls, "production", r["calls"])
        if t is None:
            continue
        lines.append(
            f"| relay CPU-ms per call-second, production, {thousands(r['calls'])} calls | "
            f"{r['relay']['cpu_ms_per_call_sec']:.2f} | {t['relay']['cpu_ms_per_call_sec']:.2f} |\n"
        )
        lines.append(
            f"| relay RSS KiB per call under load, production, {thousands(r['calls'])} calls | "
            f"{r['relay']['rss_kib_per_call_load']:.1f} | {t['relay']['rss_kib_per_call_load']:.1f} |\n"
        )
    plain, tls = docs["control-plain"], docs["control-tls"]
    tls_rates = {x["calls"]: x for x in tls["throughput"]}
    for x in plain["throughput"]:
        y = tls_rates.get(x["calls"])
        if y is None:
            continue
        lines.append(
            f"| control: events/s acknowledged at {thousands(x['calls'])} calls | "
            f"{x['events_per_sec']:,.0f} | {y['events_per_sec']:,.0f} |\n"
        )
    a, b = (plain.get("bulk") or {}).get("serial_events"), (tls.get("bulk") or {}).get("serial_events")
    if a and b:
        lines.append(
            f"| control: one event's store-and-ack round trip (window 1), p50 ms | "
            f"{us_ms(a['send_to_ack'], 'p50_us')} | {us_ms(b['send_to_ack'], 'p50_us')} |\n"
        )
    lines.append("\n")
    for n in need:
        lines.append(f"{n}: " + source_line(docs[n]) + ("\n" if n != need[-1] else ""))
    return "".join(lines)


# === Redis per call (scripts/deploy/validate.py --redis-out), docs/operations.md ===

# A typical 3-minute call, and a retention example: arithmetic on the measured figures,
# labelled as estimates where they are printed.
TYPICAL_CALL_EVENTS = 60
EXAMPLE_CALLS_PER_DAY = 10_000
EXAMPLE_RETENTION_DAYS = 7


def render_redis_per_call(doc):
    keys = doc["keys"]

    def pick(pattern):
        found = [(k, v) for k, v in keys.items() if re.fullmatch(pattern, k)]
        if not found:
            raise ValueError(f"no key matching {pattern}")
        return found

    calls = pick(r"cb:call:\{[^}]*\}")
    n = len(calls)
    call_hash = sum(v["bytes"] for _, v in calls) / n
    events = pick(r"cb:call:\{[^}]*\}:events")
    ev_bytes = sum(v["bytes"] for _, v in events)
    ev_count = sum(v.get("entries", 0) for _, v in events)
    per_event = ev_bytes / ev_count
    creds = [v for k, v in keys.items() if re.fullmatch(r"cb:call:\{[^}]*\}:cred:.*", k)]
    cred = sum(v["bytes"] for v in creds) / n if creds else 0
    sid = sum(v["bytes"] for _, v in pick(r"cb:sid:\{[^}]*\}")) / n
    index = sum(v["bytes"] for _, v in pick(r"cb:calls")) / n
    sample = call_hash + ev_bytes / n + cred + sid + index
    fixed = call_hash + cred + sid + index
    typical = fixed + TYPICAL_CALL_EVENTS * per_event
    kept = EXAMPLE_CALLS_PER_DAY * EXAMPLE_RETENTION_DAYS
    total_gib = kept * typical / 2**30
    lines = [
        f"Measured with `MEMORY USAGE` after {n} simulated call{'s' if n != 1 else ''} (the "
        f"built-in sample conversation: greeting plus two turns, {ev_count // n} events per call):\n",
        "\n",
        "| key | measured | note |\n",
        "|---|---|---|\n",
        f"| `cb:call:{{callId}}` hash | {call_hash:,.0f} B | grows a little with app metadata |\n",
        f"| `cb:call:{{callId}}:events` stream | {ev_bytes / n:,.0f} B for {ev_count // n} events ≈ **{per_event:,.0f} B per event** | transcript events with longer lines cost more |\n",
        f"| `cb:call:{{callId}}:cred:…` (the stream credential) | {cred:,.0f} B | |\n",
        f"| `cb:sid:{{CallSid}}` (Twilio call sid → call id) | {sid:,.0f} B | |\n",
        f"| `cb:calls` sorted set, per call | {index:,.0f} B | with one call this includes the set's own overhead; a campaign call's entry in `cb:campaign:{{id}}` is not measured |\n",
        f"| **the sample call** | **≈ {sample / 1024:.1f} KiB** | the keys above |\n",
        f"| **a typical 3-minute call**, ~{TYPICAL_CALL_EVENTS} events (estimate from the above) | **≈ {typical / 1024:.0f} KiB** | {fixed / 1024:.1f} KiB + {TYPICAL_CALL_EVENTS} × {per_event:,.0f} B |\n",
        "\n",
        f"For example (estimate), {thousands(EXAMPLE_CALLS_PER_DAY)} calls a day kept for "
        f"{EXAMPLE_RETENTION_DAYS} days (`CONTROL_RETENTION_SECS={EXAMPLE_RETENTION_DAYS * 86400}`) hold "
        f"about {thousands(kept)} calls × {typical / 1024:.0f} KiB ≈ {total_gib:.1f} GiB.\n",
        "\n",
        source_line(doc),
    ]
    return "".join(lines)


# === HPA and pod requests, from bench_relay's production path ===

HPA_YAML = "deploy/k8s/base/relay/hpa.yaml"
RELAY_DEPLOYMENT = "deploy/k8s/base/relay/deployment.yaml"
# Memory request: twice the measured need (allocator slack, a burst of calls still being
# set up), rounded up to this step.
MEMORY_HEADROOM = 2.0
MEMORY_STEP_MIB = 16
CPU_STEP_M = 50


def read_text(rel):
    with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        return f.read()


def hpa_targets():
    text = read_text(HPA_YAML)
    calls = re.search(r'averageValue:\s*"?(\d+)"?', text)
    util = re.search(r"averageUtilization:\s*(\d+)", text)
    if not calls or not util:
        raise ValueError(f"{HPA_YAML}: no averageValue or averageUtilization")
    return int(calls.group(1)), int(util.group(1))


# The relay container's `requests:` block: cpu and memory lines right under it.
REQUESTS = re.compile(r"(requests:\n\s+cpu:\s*)(\S+)(\n\s+memory:\s*)(\S+)")


def hpa_derivation(doc):
    calls, util = hpa_targets()
    row = relay_at(doc, "production", calls)
    if row is None:
        raise ValueError(f"no production level at {calls} calls (the HPA target in {HPA_YAML}); run bench_relay with --calls including {calls}")
    relay = row["relay"]
    cpu_ms = relay["cpu_ms_per_call_sec"]
    cores = cpu_ms * calls / 1000
    cpu_m = math.ceil(cores / (util / 100) * 1000 / CPU_STEP_M) * CPU_STEP_M
    need_mib = (relay["rss_kib_before"] + calls * relay["rss_kib_per_call_load"]) / 1024
    mem_mib = math.ceil(need_mib * MEMORY_HEADROOM / MEMORY_STEP_MIB) * MEMORY_STEP_MIB
    return {
        "calls": calls,
        "util": util,
        "cpu_ms": cpu_ms,
        "cores": cores,
        "cpu": f"{cpu_m}m",
        "cpu_m": cpu_m,
        "rss_before_mib": relay["rss_kib_before"] / 1024,
        "rss_per_call": relay["rss_kib_per_call_load"],
        "need_mib": need_mib,
        "memory": f"{mem_mib}Mi",
        "trips_at": cpu_m * util / 100 / cpu_ms,
    }


def render_hpa(doc):
    d = hpa_derivation(doc)
    return (
        f"- HPA target (`{HPA_YAML}`): {d['calls']} calls per pod (`averageValue`), CPU "
        f"{d['util']} % of the request (`averageUtilization`).\n"
        f"- Measured, production path at {d['calls']} calls: {d['cpu_ms']:.2f} CPU-ms per "
        f"call-second, so {d['calls']} calls need {d['cores']:.3f} cores. The fresh relay's RSS is "
        f"{d['rss_before_mib']:.1f} MiB and each call adds {d['rss_per_call']:.1f} KiB under load: "
        f"{d['need_mib']:.1f} MiB at {d['calls']} calls.\n"
        f"- CPU request = {d['cores']:.3f} / {d['util'] / 100:.2f}, rounded up to {CPU_STEP_M}m: "
        f"**{d['cpu']}**. With it the CPU fallback trips at about {d['trips_at']:.0f} calls per pod, "
        f"so the calls metric, not CPU, decides.\n"
        f"- Memory request = {MEMORY_HEADROOM:g} × {d['need_mib']:.1f} MiB, rounded up to "
        f"{MEMORY_STEP_MIB} Mi: **{d['memory']}**.\n"
        f"- `{RELAY_DEPLOYMENT}` requests `cpu: {d['cpu']}`, `memory: {d['memory']}` "
        f"(`scripts/doc_tables.py` writes them there and `--check` fails when they differ).\n"
        "\n" + source_line(doc)
    )


def sync_deployment(doc, check):
    """Writes (or, with check, compares) the relay's requests in the base manifest."""
    d = hpa_derivation(doc)
    text = read_text(RELAY_DEPLOYMENT)
    found = list(REQUESTS.finditer(text))
    if len(found) != 1:
        return [f"{RELAY_DEPLOYMENT}: expected one `requests:` block with cpu and memory (the relay container's), found {len(found)}"]
    m = found[0]
    if (m.group(2), m.group(4)) == (d["cpu"], d["memory"]):
        return []
    if check:
        return [
            f"{RELAY_DEPLOYMENT}: requests cpu {m.group(2)}, memory {m.group(4)}; the derivation from "
            f"the relay result file gives cpu {d['cpu']}, memory {d['memory']}; run python3 scripts/doc_tables.py"
        ]
    new = text[: m.start()] + m.group(1) + d["cpu"] + m.group(3) + d["memory"] + text[m.end():]
    with open(os.path.join(ROOT, RELAY_DEPLOYMENT), "w", encoding="utf-8") as f:
        f.write(new)
    print(f"doc tables: rewrote {RELAY_DEPLOYMENT} requests (cpu {d['cpu']}, memory {d['memory']})")
    return []


def relay_level(doc, path, calls, delta):
    for r in relay_rows(doc):
        if r["path"] == path and r["calls"] == calls and r.get("delta_ms", 20) == delta:
            return r
    return None


def arrow(before, after, fmt):
    if before is None and after is None:
        return "—"
    if before is None:
        return f"— → {after:{fmt}}"
    if after is None:
        return f"{before:{fmt}} → —"
    return f"{before:{fmt}} → {after:{fmt}}"


def per_frame(r, *keys):
    v = r
    for k in keys:
        v = (v or {}).get(k) if isinstance(v, dict) else None
    return v


def render_relay_before_after(docs):
    """A folder with `before.json` and `after.json`: the same bench, one sitting, two builds."""
    before, after = docs["before"], docs["after"]
    lines = [
        "Relay pinned to one core (`--relay-cpus 1`, one runtime worker), the bench on the other; "
        f"{after['args']['secs']} s load window per level; counts per 20 ms caller frame and its "
        "echo (messages and writes from the relay's own counters; system calls, context switches "
        "and allocations from `perf stat` over a "
        f"{after['args'].get('count_secs', 0)} s window after the load window).\n",
        "\n",
        "| deltas | calls | path | CPU-ms / call-s | ratio | added p99 ms | lost | RSS KiB/call (load) | messages | writes | system calls | context switches | allocations |\n",
        "|---:|---:|---|---|---:|---|---|---|---:|---:|---|---|---|\n",
    ]
    deltas = after["args"].get("delta_ms", [20])
    for d in deltas:
        for n in after["args"]["calls"]:
            for path in ("standalone", "production"):
                a = relay_level(after, path, n, d)
                b = relay_level(before, path, n, d)
                if a is None or b is None:
                    continue
                cpu_b = b["relay"]["cpu_ms_per_call_sec"]
                cpu_a = a["relay"]["cpu_ms_per_call_sec"]
                lost = lambda r: r["frames"]["lost"] + r["frames"]["misrouted"]
                pf = lambda r, k: per_frame(r, "counted", "per_frame", k)
                lines.append(
                    f"| {d} ms | {thousands(n)} | {path} | {cpu_b:.2f} → {cpu_a:.2f} | {cpu_a / cpu_b:.2f} | "
                    f"{arrow(b.get('added_p99_ms'), a.get('added_p99_ms'), '.1f')} | {lost(b)} → {lost(a)} | "
                    f"{b['relay']['rss_kib_per_call_load']:.0f} → {a['relay']['rss_kib_per_call_load']:.0f} | "
                    f"{num(per_frame(a, 'per_frame', 'messages'), '.2f')} | {num(per_frame(a, 'per_frame', 'writes'), '.2f')} | "
                    f"{arrow(pf(b, 'syscalls'), pf(a, 'syscalls'), '.2f')} | "
                    f"{arrow(pf(b, 'context_switches'), pf(a, 'context_switches'), '.2f')} | "
                    f"{arrow(pf(b, 'allocations'), pf(a, 'allocations'), '.2f')} |\n"
                )
    lines.append("\n")
    lines.append("*Before:* " + source_line(before) + f"relay and control from `{before.get('bin_dir') or 'the same build'}`.\n")
    lines.append("\n")
    lines.append("*After:* " + source_line(after))
    return "".join(lines)


def render_relay_issue16_targets(docs):
    """The performance round's targets, checked against `after.json` (and `before.json`)."""
    before, after = docs["before"], docs["after"]
    lines = ["| target | result | verdict |\n", "|---|---|---|\n"]
    paths = ("standalone", "production")

    def met(ok):
        return "**met**" if ok else "**not met**"

    def cpu_target(delta, limit):
        rows = [relay_level(after, p, 300, delta) for p in paths]
        rows = [r for r in rows if r]
        if not rows:
            return
        vals = [r["relay"]["cpu_ms_per_call_sec"] for r in rows]
        lines.append(
            f"| ≤ {limit} CPU-ms per call-second at 300 calls, {delta} ms deltas | "
            + " / ".join(f"{v:.2f}" for v in vals)
            + f" ({' / '.join(r['path'] for r in rows)}) | {met(all(v <= limit for v in vals))} |\n"
        )

    cpu_target(20, 1.2)
    cpu_target(100, 0.8)
    top = [relay_level(after, p, 400, 20) for p in paths]
    top = [r for r in top if r]
    if top:
        lost = [r["frames"]["lost"] + r["frames"]["misrouted"] for r in top]
        added = [r.get("added_p99_ms") for r in top]
        ok = all(l == 0 for l in lost) and all(a is not None and a <= 5.0 for a in added)
        lines.append(
            "| 400 calls on one core: 0 frames lost, added p99 ≤ 5 ms, both paths (20 ms deltas) | "
            + "; ".join(f"{r['path']}: {l} lost, +{num(a, '.1f')} ms" for r, l, a in zip(top, lost, added))
            + f" | {met(ok)} |\n"
        )
    ratios = [x for x in after.get("production_vs_standalone", []) if x.get("calls") in (300, 400)]
    if ratios:
        cpu = [x["cpu_ratio"] for x in ratios]
        rss = [x["rss_ratio"] for x in ratios]
        where = ", ".join(f"{x['calls']}/{x.get('delta_ms', 20)} ms" for x in ratios)
        lines.append(
            f"| production/standalone ≤ 1.10 CPU | {min(cpu):.2f}–{max(cpu):.2f} ({where}) | {met(max(cpu) <= 1.10)} |\n"
        )
        lines.append(
            f"| production/standalone ≤ 1.15 memory per call | {min(rss):.2f}–{max(rss):.2f} | {met(max(rss) <= 1.15)} |\n"
        )
    # No regression in the hang-up and cold-start checks.
    hb, ha = before.get("hangup_phases") or {}, after.get("hangup_phases") or {}
    if ha and hb:
        open_b = sum(v.get("model_sockets_open_after", 0) for v in hb.values() if isinstance(v, dict))
        open_a = sum(v.get("model_sockets_open_after", 0) for v in ha.values() if isinstance(v, dict))
        lines.append(
            f"| hang-up check: no model socket left open | {open_b} before, {open_a} after ({len(ha)} ways, "
            f"{next(iter(ha.values())).get('calls', '?')} calls each) | {met(open_a <= open_b and open_a == 0)} |\n"
        )
    cb, ca = before.get("coldstart") or {}, after.get("coldstart") or {}
    for path in paths:
        b, a = cb.get(path) or {}, ca.get(path) or {}
        if "frames" in a and "frames" in b:
            ok = a["frames"]["lost"] <= b["frames"]["lost"] and a["first_frame_back"] >= b["first_frame_back"]
            lines.append(
                f"| cold start ({path}): frames lost, first frames back | {b['frames']['lost']} → {a['frames']['lost']}, "
                f"{b['first_frame_back']} → {a['first_frame_back']} of {a['calls']} | {met(ok)} |\n"
            )
    lines.append("\n")
    lines.append(source_line(after))
    return "".join(lines)


def render_dialer(doc):
    """bench_dialer: the dialer's pace per configured rate, from the fake Twilio's log."""
    args = doc["args"]
    lines = [
        f"{thousands(args['numbers'])} numbers queued per campaign, {args['secs']} s of "
        f"dialling per rate, at most {args['max_concurrent']} live, every number busy after "
        f"{args['ring_ms']} ms.\n",
        "\n",
        "| configured calls/s | creates | sustained calls/s | ratio | most in 1 s (bound) "
        "| gap ideal / p50 / p99 / max (ms) | refused | control CPU ms per create |\n",
        "|---|---|---|---|---|---|---|---|\n",
    ]
    for r in doc["rates"]:
        lines.append(
            f"| {r['configured_cps']:g} | {thousands(r['creates'])} | {r['sustained_cps']:.2f} "
            f"| {r['accuracy']:.3f} | {r['max_starts_in_1s']} ({r['bucket_bound_1s']}) "
            f"| {r['gap_ideal_ms']:.1f} / {num(r['gap_p50_ms'], '.1f')} / "
            f"{num(r['gap_p99_ms'], '.1f')} / {num(r['gap_max_ms'], '.1f')} "
            f"| {r['creates_refused']} | {num(r['control_cpu_ms_per_create'], '.3f')} |\n"
        )
    lines.append("\n")
    lines.append(source_line(doc))
    return "".join(lines)


RENDERERS = {
    "dialer": render_dialer,
    "relay_before_after": render_relay_before_after,
    "relay_issue16_targets": render_relay_issue16_targets,
    "soak": render_soak,
    "faults": render_faults,
    "relay": render_relay,
    "relay_targets": render_relay_targets,
    "relay_sets": render_relay_sets,
    "control": render_control,
    "control_targets": render_control_targets,
    "survive_gaps": render_survive_gaps,
    "survive_outage": render_survive_outage,
    "hpa": render_hpa,
    "tls_cost": render_tls_cost,
    "redis_per_call": render_redis_per_call,
}


def load(file):
    """A result file, or for a folder every `*.json` in it by name (without `.json`)."""
    full = os.path.join(ROOT, file)
    if os.path.isdir(full):
        docs = {}
        for name in sorted(os.listdir(full)):
            if name.endswith(".json"):
                with open(os.path.join(full, name), encoding="utf-8") as f:
                    docs[name[: -len(".json")]] = json.load(f)
        if not docs:
            raise ValueError("no .json result files in the folder")
        return docs
    with open(full, encoding="utf-8") as f:
        return json.load(f)


def rewrite(text, path, hpa_docs):
    problems = []

    def one(m):
        kind, file = m.group("kind"), m.group("file")
        render = RENDERERS.get(kind)
        if render is None:
            problems.append(f"{path}: unknown table kind '{kind}'")
            return m.group(0)
        try:
            doc = load(file)
            body = render(doc)
        except (OSError, ValueError, KeyError, TypeError) as e:
            problems.append(f"{path}: {kind} {file}: {type(e).__name__}: {e}")
            return m.group(0)
        if kind == "hpa":
            hpa_docs.append(doc)
        return m.group(1) + body + m.group(5)

    return BLOCK.sub(one, text), problems


def main():
    check = "--check" in sys.argv[1:]
    docs = os.path.join(ROOT, "docs")
    drift, problems, hpa_docs = [], [], []
    for dirpath, _, files in os.walk(docs):
        for name in sorted(files):
            if not name.endswith(".md"):
                continue
            path = os.path.join(dirpath, name)
            with open(path, encoding="utf-8") as f:
                text = f.read()
            new, errs = rewrite(text, os.path.relpath(path, ROOT), hpa_docs)
            problems += errs
            if new != text:
                drift.append(os.path.relpath(path, ROOT))
                if not check:
                    with open(path, "w", encoding="utf-8") as f:
                        f.write(new)
    # The manifest's requests follow the derivation (the first `hpa` block's file).
    if hpa_docs:
        try:
            problems += sync_deployment(hpa_docs[0], check)
        except (OSError, ValueError, KeyError) as e:
            problems.append(f"{RELAY_DEPLOYMENT}: {e}")
    for p in problems:
        print(f"doc tables: {p}", file=sys.stderr)
    if check and drift:
        for d in drift:
            print(f"doc tables: {d} differs from its result files; run python3 scripts/doc_tables.py", file=sys.stderr)
        return 1
    if not check:
        for d in drift:
            print(f"doc tables: rewrote {d}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
