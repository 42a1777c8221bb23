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
import os
import re
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
    ("relay open FDs", "relay_fds", None),
    ("relay runtime tasks", "relay_tasks", None),
    ("relay threads", "relay_threads", None),
    ("control RSS", "control_rss_kib", "MiB"),
    ("control open FDs", "control_fds", None),
    ("Redis used_memory", "redis_used_kib", "MiB"),
]
SOAK_AFTER = {"relay_fds": "relay_fds", "relay_tasks": "relay_tasks", "control_fds": "control_fds"}


def render_soak(doc):
    slopes = doc["slopes_after_warmup"]
    after = doc.get("after_last_call", {})
    args = doc["args"]
    lines = [
        f"{args['calls']} call slots for {args['minutes']:g} minutes, warm-up "
        f"{args['warmup_minutes']:g} minutes: {thousands(doc['calls_completed'])} calls "
        f"completed, {doc['calls_failed']} failed.\n",
        "\n",
        "| Figure | mean after warm-up | slope (% of mean / 10 min) | verdict | after the last call |\n",
        "|---|---|---|---|---|\n",
    ]
    for name, key, unit in SOAK_SERIES:
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


RENDERERS = {"soak": render_soak, "faults": render_faults}


def rewrite(text, path):
    problems = []

    def one(m):
        kind, file = m.group("kind"), m.group("file")
        render = RENDERERS.get(kind)
        if render is None:
            problems.append(f"{path}: unknown table kind '{kind}'")
            return m.group(0)
        try:
            with open(os.path.join(ROOT, file), encoding="utf-8") as f:
                doc = json.load(f)
        except (OSError, ValueError) as e:
            problems.append(f"{path}: {file}: {e}")
            return m.group(0)
        return m.group(1) + render(doc) + m.group(5)

    return BLOCK.sub(one, text), problems


def main():
    check = "--check" in sys.argv[1:]
    docs = os.path.join(ROOT, "docs")
    drift, problems = [], []
    for dirpath, _, files in os.walk(docs):
        for name in sorted(files):
            if not name.endswith(".md"):
                continue
            path = os.path.join(dirpath, name)
            with open(path, encoding="utf-8") as f:
                text = f.read()
            new, errs = rewrite(text, os.path.relpath(path, ROOT))
            problems += errs
            if new != text:
                drift.append(os.path.relpath(path, ROOT))
                if not check:
                    with open(path, "w", encoding="utf-8") as f:
                        f.write(new)
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
