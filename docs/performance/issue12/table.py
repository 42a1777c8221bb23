#!/usr/bin/env python3
"""Prints docs/performance.md's issue 12 table from the bench_relay JSON files beside it:
median (range) over the runs of each set, per path and call count."""
import glob, json, os, statistics

HERE = os.path.dirname(os.path.abspath(__file__))
SETS = [("before", "before"), ("double-future", "after, future held twice"), ("after", "after")]


def rows(name):
    out = {}
    for f in sorted(glob.glob(os.path.join(HERE, f"{name}-*.json"))):
        for r in json.load(open(f))["results"]:
            key = (r["path"], r["calls"])
            out.setdefault(key, []).append(
                (r["relay"]["cpu_ms_per_call_sec"], r["rtt_ms"]["p99"], r["relay"]["rss_kib_per_call_load"])
            )
    return out


def cell(values, fmt):
    med = statistics.median(values)
    return f"{med:{fmt}} ({min(values):{fmt}}–{max(values):{fmt}})"


data = {name: rows(name) for name, _ in SETS}
print("| path, calls | set | runs | CPU-ms per call-second | p99 round trip ms | RSS KiB per call |")
print("|---|---|---|---|---|---|")
for key in sorted(data["before"]):
    for name, label in SETS:
        runs = data[name].get(key, [])
        if not runs:
            continue
        cpu, p99, rss = zip(*runs)
        print(f"| {key[0]} {key[1]} | {label} | {len(runs)} | {cell(cpu, '.2f')} | {cell(p99, '.1f')} | {cell(rss, '.1f')} |")
