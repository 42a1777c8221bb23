#!/usr/bin/env python3
"""Checks deploy/ against the Kubernetes schemas and against the code it deploys.

Run by scripts/checks/deploy.sh inside target/deploy-venv (PyYAML, kubernetes-validate, h2).
Exits 1 on any failure, listing every one of them; prints SKIP for what cannot be checked
yet and WARN for drift that must not block anyone (a new metric not yet documented).

    validate.py              everything below
    validate.py --no-live    without starting any process
    validate.py --measure N  only the compose replay, with N concurrent calls; prints figures
    validate.py --redis-out FILE  also writes the Redis figures of the replay to FILE (JSON,
                             with provenance) for scripts/doc_tables.py

What it checks:
  render    every kustomize overlay renders with the real kustomize (`kubectl kustomize`)
  schema    every rendered object validates, strictly, against the Kubernetes JSON
            schemas of the oldest version we support (1.30: the preStop `sleep` action)
            and the newest one kubernetes-validate ships
  policy    no Secret objects; every pod non-root, read-only root, no capabilities,
            RuntimeDefault seccomp, requests set, no service-account token; relay probes,
            preStop and terminationGracePeriodSeconds vs RELAY_DRAIN_GRACE_SECS; control
            replicas, probes (grpc, or GET /readyz and /healthz on the metrics port, which
            TLS gRPC requires), a required (never optional) Redis reference; Services,
            Ingress, HPA, PDB and NetworkPolicy selectors and ports resolve to real pods
            and ports; Ingress host == RELAY_PUBLIC_URL host; every referenced Secret key
            is created by a `kubectl create secret` command in docs/operations.md
  code      every env var a manifest, compose service or env example sets is read by the
            binary it is given to (string literals in relay/src, control/src,
            tests/testkit/src); probe and ingress paths are routes in relay/src; ports
            match the listen addresses; metric names in the dashboard, HPA, adapter rule
            and docs/metrics.md exist in the code; binaries the Dockerfile copies are bin
            targets of the workspace (cargo metadata)
  docker    Dockerfile targets, distroless runtime, numeric non-root USER, EXPOSE, every
            workspace member's manifest in the dependency-caching layer, and that layer
            replayed (its COPYs and stub loop) and loaded by cargo --locked;
            the built binaries need no shared library distroless/cc lacks (readelf)
  compose   build targets exist, env names and CLI flags of every service, depends_on,
            Redis AOF
  tls       cert-manager Issuers/Certificates resolve; every PEM file setting is a file
            mounted from a Secret a Certificate writes; a TLS control is dialled over
            https:// by a name in its certificate, with its CA
  self-test each of ~23 deliberately broken copies of the manifests must be caught
  live      with the debug binaries built: control (on a throwaway redis-server) and the
            relay on 127.0.0.1:0 with the dev overlay's ConfigMap values: grpc.health.v1
            SERVING, the token rules, /healthz, /readyz, /metrics, 404 elsewhere, SIGTERM
  replay    deploy/compose.yaml's stack from the same binaries on loopback: seed agent,
            one simulated call, SIGTERM mid-call (readiness 503, liveness 200, the call
            finishes, clean exit), call_id on every call log line, Redis bytes per call

A crate whose src/ is still a placeholder is skipped (reported as SKIP), so the check can
land before the code it checks; once the code lands the skip turns into a real check.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import urlparse

import yaml

ROOT = Path(__file__).resolve().parents[2]
# The 1-minute load average when the check started (for a `--redis-out` result file).
try:
    START_LOAD: float | None = float(Path("/proc/loadavg").read_text().split()[0])
except (OSError, ValueError, IndexError):
    START_LOAD = None
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
RENDER_DIR = ROOT / "target" / "deploy-rendered"
DEBUG_BIN = ROOT / "target" / "debug"

# The oldest Kubernetes we support (lifecycle.preStop.sleep is on by default from 1.30)
# and the newest schema set kubernetes-validate ships.
K8S_VERSIONS = ("1.30.0", "1.37.0")

# Which crate reads the environment of which container / compose service, keyed by the
# image name the manifests use.
IMAGE_CRATE = {
    "callbridge-relay": "relay",
    "callbridge-control": "control",
    "callbridge-testkit": "testkit",
}
BINARY_PACKAGE = {
    "callbridge-relay": "callbridge-relay",
    "callbridge-control": "callbridge-control",
    "fake-realtime": "callbridge-testkit",
    "sim-caller": "callbridge-testkit",
}
# Probe and routing paths the relay must serve (design.md "Surfaces").
RELAY_PROBE_PATHS = {"readiness": "/readyz", "liveness": "/healthz"}
# Metrics every operator view relies on (task list; docs/metrics.md documents them).
REQUIRED_DASHBOARD_METRICS = {
    "callbridge_relay_active_calls",
    "callbridge_relay_frames_total",
    "callbridge_relay_frames_dropped_total",
    "callbridge_relay_barge_ins_total",
    "callbridge_relay_model_errors_total",
    "callbridge_relay_time_to_first_audio_seconds",
    "callbridge_relay_event_queue_depth",
    "callbridge_relay_events_overflow_total",
    "callbridge_control_redis_latency_seconds",
}
SECRET_DOC = ROOT / "docs" / "operations.md"
CERT_MANAGER_GROUP = "cert-manager.io"
# Settings naming a PEM file the binary reads: each must be mounted from a Secret.
TLS_FILE_SETTINGS = (
    "CONTROL_TLS_CERT_FILE", "CONTROL_TLS_KEY_FILE", "CONTROL_TLS_CLIENT_CA_FILE",
    "CONTROL_CA_FILE", "CONTROL_CLIENT_CERT_FILE", "CONTROL_CLIENT_KEY_FILE",
    "REDIS_CA_FILE", "REDIS_CERT_FILE", "REDIS_KEY_FILE",
)
METRICS_DOC = ROOT / "docs" / "metrics.md"


# === report ===


@dataclass
class Report:
    failures: list[str] = field(default_factory=list)
    skips: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    passed: int = 0

    def check(self, cond: bool, what: str) -> bool:
        if cond:
            self.passed += 1
        else:
            self.failures.append(what)
        return cond

    def fail(self, what: str) -> None:
        self.failures.append(what)

    def skip(self, what: str) -> None:
        if what not in self.skips:
            self.skips.append(what)


R = Report()


# === the code being deployed ===


@dataclass
class Crate:
    name: str
    path: Path
    literals: set[str]
    text: str
    landed: bool


def load_crate(name: str, rel: str) -> Crate:
    src = ROOT / rel / "src"
    files = sorted(src.rglob("*.rs")) if src.is_dir() else []
    text = "\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    code_lines = [
        line for line in text.splitlines() if line.strip() and not line.strip().startswith("//")
    ]
    # The workspace skeleton ships `fn main() {}` placeholders: not yet the real thing.
    landed = len(code_lines) >= 30
    literals = set(re.findall(r'"((?:[^"\\\n]|\\.)*)"', text))
    return Crate(name, ROOT / rel, literals, text, landed)


CRATES = {
    "relay": load_crate("callbridge-relay", "relay"),
    "control": load_crate("callbridge-control", "control"),
    "testkit": load_crate("callbridge-testkit", "tests/testkit"),
}


def crate_reads_env(crate: Crate, name: str, where: str) -> None:
    if not crate.landed:
        R.skip(f"env names for {crate.name}: its src/ is still a placeholder")
        return
    R.check(
        name in crate.literals,
        f"{where}: sets {name}, but {crate.name} never mentions \"{name}\" in {crate.path.name}/src",
    )


# The relay's URL path segments are defined once in callbridge_proto::paths (shared with
# control), so its routes are checked against that module's literals as well.
PATH_LITERALS = set(
    re.findall(
        r'"((?:[^"\\\n]|\\.)*)"',
        (ROOT / "proto/src/paths.rs").read_text(encoding="utf-8", errors="replace")
        if (ROOT / "proto/src/paths.rs").is_file()
        else "",
    )
)


def crate_serves_path(crate: Crate, path: str, where: str) -> None:
    if not crate.landed or not re.search(r"warp::path|path!\(", crate.text):
        R.skip(f"route paths for {crate.name}: its src/ has no warp routes yet")
        return
    literals = crate.literals | PATH_LITERALS
    if path in literals:
        R.passed += 1
        return
    segments = [s for s in path.strip("/").split("/") if s and not s.startswith("{")]
    missing = [s for s in segments if s not in literals]
    R.check(
        not missing,
        f"{where}: path {path} is not a route of {crate.name} (no literal {missing} in src)",
    )


def metric_candidates(metric: str) -> set[str]:
    """The literals a prometheus-client registration of `metric` could use."""
    base = metric[: -len("_total")] if metric.endswith("_total") else metric
    out = {metric, base}
    for prefix in ("callbridge_relay_", "callbridge_control_"):
        if base.startswith(prefix):
            out.add(base[len(prefix) :])
    for name in list(out):
        if name.endswith("_seconds"):
            out.add(name[: -len("_seconds")])
    return out


def crate_for_metric(metric: str) -> Crate | None:
    if metric.startswith("callbridge_relay_"):
        return CRATES["relay"]
    if metric.startswith("callbridge_control_"):
        return CRATES["control"]
    return None


def crate_exports_metric(metric: str, where: str) -> None:
    crate = crate_for_metric(metric)
    if crate is None:
        R.fail(f"{where}: {metric} is not a callbridge metric name")
        return
    if not crate.landed or "prometheus_client" not in crate.text:
        R.skip(f"metric names for {crate.name}: its src/ registers no metrics yet")
        return
    R.check(
        bool(metric_candidates(metric) & crate.literals),
        f"{where}: metric {metric} is not registered anywhere in {crate.name}",
    )


def workspace_bins() -> dict[str, set[str]] | None:
    try:
        out = subprocess.run(
            ["cargo", "metadata", "--no-deps", "--offline", "--format-version", "1"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as err:
        R.fail(f"cargo metadata failed: {err}")
        return None
    meta = json.loads(out)
    return {
        pkg["name"]: {t["name"] for t in pkg["targets"] if "bin" in t["kind"]}
        for pkg in meta["packages"]
    }


# === rendering ===


def kustomize_cmd() -> list[str] | None:
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    return None


def render(directory: Path) -> list[dict[str, Any]]:
    cmd = kustomize_cmd()
    if cmd is None:
        R.fail("neither kubectl nor kustomize is installed: cannot render the overlays")
        return []
    proc = subprocess.run(
        [*cmd, str(directory)], capture_output=True, text=True, timeout=60, check=False
    )
    rel = directory.relative_to(ROOT)
    if not R.check(proc.returncode == 0, f"render {rel}: {proc.stderr.strip()}"):
        return []
    RENDER_DIR.mkdir(parents=True, exist_ok=True)
    (RENDER_DIR / (str(rel).replace("/", "_") + ".yaml")).write_text(proc.stdout)
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def validate_schemas(name: str, objs: list[dict[str, Any]]) -> None:
    import kubernetes_validate

    for version in K8S_VERSIONS:
        for obj in objs:
            if str(obj.get("apiVersion", "")).startswith(CERT_MANAGER_GROUP + "/"):
                continue  # a CRD: kubernetes-validate has no schema; check_cert_manager does
            label = f"{name}: {obj.get('kind')}/{obj.get('metadata', {}).get('name')} (k8s {version})"
            try:
                kubernetes_validate.validate(obj, version, strict=True)
                R.passed += 1
            except kubernetes_validate.ValidationError as err:
                path = "/".join(str(p) for p in err.path)
                R.fail(f"{label}: schema: {err.message} at {path}")
            except Exception as err:  # noqa: BLE001 - unknown kind or schema: report it
                R.fail(f"{label}: schema: {type(err).__name__}: {err}")


# === manifest model ===


def by_kind(objs: Iterable[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o.get("kind") == kind]


def find(objs: Iterable[dict[str, Any]], kind: str, name: str) -> dict[str, Any] | None:
    for o in objs:
        if o.get("kind") == kind and o["metadata"]["name"] == name:
            return o
    return None


def find_service_by_dns(objs: list[dict[str, Any]], host: str) -> dict[str, Any] | None:
    """The Service a cluster DNS name resolves to: `name`, or `name.<ns>.svc` with an
    optional `.cluster.local`, where <ns> is the Service's namespace."""
    labels = host.removesuffix(".cluster.local").split(".")
    if len(labels) == 3 and labels[2] == "svc":
        svc = find(objs, "Service", labels[0])
        ns = (svc or {}).get("metadata", {}).get("namespace")
        return svc if ns == labels[1] else None
    return find(objs, "Service", host) if len(labels) == 1 else None


def workloads(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objs if o.get("kind") in ("Deployment", "StatefulSet", "DaemonSet")]


def selects(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    if not selector:
        return True
    match = selector.get("matchLabels", {})
    if any(labels.get(k) != v for k, v in match.items()):
        return False
    for expr in selector.get("matchExpressions", []):
        val = labels.get(expr["key"])
        op = expr["operator"]
        if op == "In" and val not in expr["values"]:
            return False
        if op == "NotIn" and val in expr["values"]:
            return False
        if op == "Exists" and val is None:
            return False
        if op == "DoesNotExist" and val is not None:
            return False
    return True


def pod_labels(w: dict[str, Any]) -> dict[str, str]:
    return w["spec"]["template"]["metadata"].get("labels", {})


def container_ports(w: dict[str, Any]) -> dict[str | int, int]:
    out: dict[str | int, int] = {}
    for c in w["spec"]["template"]["spec"]["containers"]:
        for p in c.get("ports", []):
            out[p["containerPort"]] = p["containerPort"]
            if "name" in p:
                out[p["name"]] = p["containerPort"]
    return out


def image_name(image: str) -> str:
    """registry.example.com/callbridge/relay:0.1.0 -> the base image name it came from."""
    last = image.rsplit("/", 1)[-1].split(":")[0].split("@")[0]
    return {"relay": "callbridge-relay", "control": "callbridge-control"}.get(last, last)


def container_env(
    objs: list[dict[str, Any]], container: dict[str, Any]
) -> dict[str, str | None]:
    """Every env var a container gets (envFrom ConfigMaps included); secret values are None."""
    env: dict[str, str | None] = {}
    for src in container.get("envFrom", []):
        ref = src.get("configMapRef")
        if ref:
            cm = find(objs, "ConfigMap", ref["name"])
            if R.check(cm is not None, f"envFrom: ConfigMap {ref['name']} is not in the render"):
                env.update(cm.get("data", {}))
        if src.get("secretRef"):
            R.fail(f"container {container['name']}: envFrom secretRef hides which names are set")
    for e in container.get("env", []):
        env[e["name"]] = e.get("value")
    return env


def listen_port(addr: str | None) -> int | None:
    if not addr:
        return None
    try:
        return int(addr.rsplit(":", 1)[1])
    except (IndexError, ValueError):
        return None


# === checks on one rendered overlay ===


def check_pod_security(name: str, w: dict[str, Any]) -> None:
    where = f"{name}: {w['kind']}/{w['metadata']['name']}"
    spec = w["spec"]["template"]["spec"]
    psc = spec.get("securityContext", {})
    R.check(psc.get("runAsNonRoot") is True, f"{where}: pod securityContext.runAsNonRoot")
    R.check(
        psc.get("seccompProfile", {}).get("type") == "RuntimeDefault",
        f"{where}: seccompProfile RuntimeDefault",
    )
    R.check(spec.get("automountServiceAccountToken") is False, f"{where}: token not mounted")
    for c in spec["containers"] + spec.get("initContainers", []):
        csc = c.get("securityContext", {})
        cw = f"{where} container {c['name']}"
        R.check(csc.get("readOnlyRootFilesystem") is True, f"{cw}: readOnlyRootFilesystem")
        R.check(csc.get("allowPrivilegeEscalation") is False, f"{cw}: allowPrivilegeEscalation")
        R.check("ALL" in csc.get("capabilities", {}).get("drop", []), f"{cw}: drop ALL caps")
        req = c.get("resources", {}).get("requests", {})
        R.check("cpu" in req and "memory" in req, f"{cw}: cpu and memory requests")
        R.check("memory" in c.get("resources", {}).get("limits", {}), f"{cw}: memory limit")
        image = c.get("image", "")
        R.check(
            ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"),
            f"{cw}: image {image!r} must carry a pinned tag",
        )


def check_env_vs_code(name: str, objs: list[dict[str, Any]], w: dict[str, Any]) -> None:
    for c in w["spec"]["template"]["spec"]["containers"]:
        crate_key = IMAGE_CRATE.get(image_name(c["image"]))
        if crate_key is None:
            continue
        for var in container_env(objs, c):
            crate_reads_env(CRATES[crate_key], var, f"{name}: container {c['name']}")


def probe_of(c: dict[str, Any], kind: str) -> dict[str, Any]:
    return c.get(f"{kind}Probe") or {}


def check_relay(name: str, objs: list[dict[str, Any]]) -> None:
    dep = find(objs, "Deployment", "relay")
    if not R.check(dep is not None, f"{name}: Deployment/relay missing"):
        return
    c = dep["spec"]["template"]["spec"]["containers"][0]
    env = container_env(objs, c)
    ports = container_ports(dep)
    port = listen_port(env.get("RELAY_LISTEN")) or 8080
    R.check(port in ports.values(), f"{name}: relay containerPort != RELAY_LISTEN port {port}")
    for kind, path in RELAY_PROBE_PATHS.items():
        get = probe_of(c, kind).get("httpGet", {})
        R.check(get.get("path") == path, f"{name}: relay {kind}Probe must GET {path}")
        R.check(ports.get(get.get("port")) == port, f"{name}: relay {kind}Probe port")
        crate_serves_path(CRATES["relay"], path, f"{name}: relay {kind}Probe")
    ann = dep["spec"]["template"]["metadata"].get("annotations", {})
    # /metrics has its own listener (RELAY_METRICS_ADDR), never the public port.
    metrics_port = listen_port(env.get("RELAY_METRICS_ADDR")) or 9091
    R.check(metrics_port != port, f"{name}: relay RELAY_METRICS_ADDR must not be the public port")
    R.check(metrics_port in ports.values(), f"{name}: relay containerPort for RELAY_METRICS_ADDR")
    R.check(
        ann.get("prometheus.io/port") == str(metrics_port)
        and ann.get("prometheus.io/path") == "/metrics",
        f"{name}: relay scrape annotations must point at {metrics_port}/metrics",
    )
    crate_serves_path(CRATES["relay"], "/metrics", f"{name}: relay scrape annotation")

    # Drain: the kubelet's clock covers preStop and the whole drain.
    grace = int(env.get("RELAY_DRAIN_GRACE_SECS") or 30)
    # Then Twilio's action requests of the calls the drain ended (relay/src/drain.rs).
    action_wait = int(env.get("RELAY_DRAIN_ACTION_WAIT_SECS") or 5)
    pre = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    tgps = dep["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
    # After the grace the relay cuts the remaining calls and waits HARD_STOP_WAIT for them,
    # then up to HARD_STOP_WAIT again for the server (relay/src/lib.rs); plus 2 s of slack.
    m = re.search(r"HARD_STOP_WAIT: Duration = Duration::from_secs\((\d+)\)", CRATES["relay"].text)
    hard_stop = int(m.group(1)) if m else 5
    need = pre + grace + action_wait + 2 * hard_stop + 2
    R.check(
        tgps >= need,
        f"{name}: relay terminationGracePeriodSeconds {tgps} < {need} = preStop {pre} + "
        f"RELAY_DRAIN_GRACE_SECS {grace} + RELAY_DRAIN_ACTION_WAIT_SECS {action_wait} + "
        f"2 x HARD_STOP_WAIT {hard_stop} + 2 s",
    )
    R.check(
        "exec" not in c.get("lifecycle", {}).get("preStop", {}),
        f"{name}: relay preStop exec cannot run in a distroless image",
    )

    # Where the relay finds control.
    control_url = env.get("CONTROL_URL")
    if R.check(bool(control_url), f"{name}: relay has no CONTROL_URL"):
        u = urlparse(control_url)
        svc = find_service_by_dns(objs, u.hostname or "")
        if R.check(svc is not None, f"{name}: CONTROL_URL host {u.hostname} is not a Service"):
            R.check(
                any(p["port"] == u.port for p in svc["spec"]["ports"]),
                f"{name}: CONTROL_URL port {u.port} is not a port of Service/{u.hostname}",
            )

    # Ingress: TLS, WebSocket timeouts, host == RELAY_PUBLIC_URL, paths are relay routes.
    public = urlparse(env.get("RELAY_PUBLIC_URL") or "")
    R.check(public.scheme == "https", f"{name}: RELAY_PUBLIC_URL must be https")
    ing = find(objs, "Ingress", "relay")
    if not R.check(ing is not None, f"{name}: Ingress/relay missing"):
        return
    ann = ing["metadata"].get("annotations", {})
    for key in ("proxy-read-timeout", "proxy-send-timeout"):
        val = ann.get(f"nginx.ingress.kubernetes.io/{key}", "0")
        R.check(val.isdigit() and int(val) >= 3600, f"{name}: Ingress {key} must be >= 3600")
    tls = ing["spec"].get("tls", [])
    R.check(bool(tls) and all(t.get("secretName") for t in tls), f"{name}: Ingress TLS secret")
    tls_hosts = {h for t in tls for h in t.get("hosts", [])}
    for rule in ing["spec"]["rules"]:
        R.check(
            rule.get("host") == public.hostname,
            f"{name}: Ingress host {rule.get('host')} != RELAY_PUBLIC_URL host {public.hostname}"
            " (Twilio signatures are computed over the public URL)",
        )
        R.check(rule.get("host") in tls_hosts, f"{name}: Ingress host {rule.get('host')} has no TLS")
        for p in rule["http"]["paths"]:
            R.check(
                p["path"].startswith("/api/twilio"),
                f"{name}: Ingress publishes {p['path']}; only /api/twilio/ should be public",
            )
            crate_serves_path(CRATES["relay"], p["path"], f"{name}: Ingress path")
            check_backend(name, objs, p["backend"]["service"])


def check_backend(name: str, objs: list[dict[str, Any]], backend: dict[str, Any]) -> None:
    svc = find(objs, "Service", backend["name"])
    if not R.check(svc is not None, f"{name}: Ingress backend Service/{backend['name']}"):
        return
    port = backend["port"]
    R.check(
        any(p.get("name") == port.get("name") or p["port"] == port.get("number")
            for p in svc["spec"]["ports"]),
        f"{name}: Ingress backend port {port} not on Service/{backend['name']}",
    )


def check_control(name: str, objs: list[dict[str, Any]]) -> None:
    dep = find(objs, "Deployment", "control")
    if not R.check(dep is not None, f"{name}: Deployment/control missing"):
        return
    R.check(dep["spec"].get("replicas", 1) >= 2, f"{name}: control needs >= 2 replicas")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    env = container_env(objs, c)
    ports = container_ports(dep)
    grpc_port = listen_port(env.get("CONTROL_LISTEN")) or 50051
    metrics_port = listen_port(env.get("CONTROL_METRICS_LISTEN")) or 9090
    R.check(grpc_port in ports.values(), f"{name}: control containerPort for CONTROL_LISTEN")
    R.check(metrics_port in ports.values(), f"{name}: control port for CONTROL_METRICS_LISTEN")
    tls = bool(env.get("CONTROL_TLS_CERT_FILE"))
    for kind, path in RELAY_PROBE_PATHS.items():
        probe = probe_of(c, kind)
        grpc, get = probe.get("grpc"), probe.get("httpGet")
        if grpc:
            # The kubelet's grpc probe speaks plaintext h2 only.
            R.check(not tls, f"{name}: control {kind}Probe is grpc, which cannot speak the "
                             f"TLS that CONTROL_TLS_CERT_FILE turns on: GET {path} on metrics")
            R.check(grpc.get("port") == grpc_port,
                    f"{name}: control {kind}Probe must be grpc on {grpc_port}")
        elif R.check(bool(get), f"{name}: control {kind}Probe must be grpc or httpGet"):
            R.check(get.get("path") == path, f"{name}: control {kind}Probe must GET {path}")
            scheme = "HTTPS" if env.get("CONTROL_METRICS_TLS_CERT_FILE") else "HTTP"
            R.check(get.get("scheme", "HTTP") == scheme,
                    f"{name}: control {kind}Probe must use scheme {scheme} (CONTROL_METRICS_TLS_*)")
            R.check(ports.get(get.get("port")) == metrics_port,
                    f"{name}: control {kind}Probe must use the CONTROL_METRICS_LISTEN port")
            crate_serves_path(CRATES["control"], path, f"{name}: control {kind}Probe")
    ann = dep["spec"]["template"]["metadata"].get("annotations", {})
    R.check(
        ann.get("prometheus.io/port") == str(metrics_port),
        f"{name}: control scrape annotation must point at {metrics_port}",
    )
    redis = [v for v in ("REDIS_URL", "REDIS_CLUSTER_NODES") if v in env]
    R.check(len(redis) == 1, f"{name}: control needs exactly one of REDIS_URL, REDIS_CLUSTER_NODES (has {redis})")
    for e in c.get("env", []):
        ref = e.get("valueFrom", {}).get("secretKeyRef", {})
        # A missing optional Secret would leave Redis unset: control would run on its
        # in-memory store, a different volatile state in every replica.
        R.check(
            not (e["name"].startswith("REDIS_") and ref.get("optional")),
            f"{name}: control {e['name']} must not come from an optional Secret reference",
        )
    url = env.get("REDIS_URL")
    if url:
        # A plain value must be password-free (a password belongs in a Secret) and, when it
        # names an in-cluster host, that Service must exist in the render.
        u = urlparse(url)
        R.check(u.password is None, f"{name}: REDIS_URL with a password must come from a Secret")
        if u.hostname and "." not in u.hostname:
            svc = find(objs, "Service", u.hostname)
            if R.check(svc is not None, f"{name}: REDIS_URL host {u.hostname} is not a Service"):
                sel = {"matchLabels": svc["spec"]["selector"]}
                target = [w for w in workloads(objs) if selects(sel, pod_labels(w))]
                for w in target:
                    args = " ".join(w["spec"]["template"]["spec"]["containers"][0].get("args", []))
                    R.check(
                        "--appendonly yes" in args,
                        f"{name}: {w['kind']}/{w['metadata']['name']} Redis must run with AOF",
                    )


def check_wiring(name: str, objs: list[dict[str, Any]]) -> None:
    ws = workloads(objs)
    for svc in by_kind(objs, "Service"):
        where = f"{name}: Service/{svc['metadata']['name']}"
        # A Service selector is a plain label map, not a LabelSelector.
        sel = {"matchLabels": svc["spec"].get("selector", {})}
        targets = [w for w in ws if selects(sel, pod_labels(w))]
        if not R.check(bool(targets), f"{where}: selects no pods"):
            continue
        for p in svc["spec"]["ports"]:
            tp = p.get("targetPort", p["port"])
            R.check(
                all(tp in container_ports(w) for w in targets),
                f"{where}: targetPort {tp} is not a container port of its pods",
            )
    for pdb in by_kind(objs, "PodDisruptionBudget"):
        R.check(
            any(selects(pdb["spec"]["selector"], pod_labels(w)) for w in ws),
            f"{name}: PodDisruptionBudget/{pdb['metadata']['name']} selects no pods",
        )
    for hpa in by_kind(objs, "HorizontalPodAutoscaler"):
        where = f"{name}: HPA/{hpa['metadata']['name']}"
        ref = hpa["spec"]["scaleTargetRef"]
        target = find(objs, ref["kind"], ref["name"])
        if not R.check(target is not None, f"{where}: scaleTargetRef {ref['name']} missing"):
            continue
        kinds = {m["type"] for m in hpa["spec"]["metrics"]}
        R.check({"Pods", "Resource"} <= kinds, f"{where}: needs a Pods metric and a CPU fallback")
        for m in hpa["spec"]["metrics"]:
            if m["type"] == "Pods":
                metric = m["pods"]["metric"]["name"]
                crate_exports_metric(metric, where)
                R.check(metric in adapter_metric_names(), f"{where}: {metric} has no adapter rule")
            if m["type"] == "Resource":
                R.check(
                    all("cpu" in c.get("resources", {}).get("requests", {})
                        for c in target["spec"]["template"]["spec"]["containers"]),
                    f"{where}: CPU utilization needs cpu requests on every container",
                )
    for np in by_kind(objs, "NetworkPolicy"):
        check_network_policy(name, objs, np)


def check_network_policy(name: str, objs: list[dict[str, Any]], np: dict[str, Any]) -> None:
    where = f"{name}: NetworkPolicy/{np['metadata']['name']}"
    ws = workloads(objs)
    selected = [w for w in ws if selects(np["spec"]["podSelector"], pod_labels(w))]
    R.check(bool(selected), f"{where}: podSelector selects no pods")
    # Ingress ports must be ports the selected pods listen on.
    if np["spec"]["podSelector"]:
        for rule in np["spec"].get("ingress", []):
            for p in rule.get("ports", []):
                R.check(
                    all(p["port"] in container_ports(w) for w in selected),
                    f"{where}: ingress port {p['port']} is not a port of the selected pods",
                )
    # Egress to in-namespace pods must reach a port those pods listen on.
    for rule in np["spec"].get("egress", []):
        for peer in rule.get("to", []):
            if "podSelector" in peer and "namespaceSelector" not in peer:
                peers = [w for w in ws if selects(peer["podSelector"], pod_labels(w))]
                if R.check(bool(peers), f"{where}: egress peer selects no pods"):
                    for p in rule.get("ports", []):
                        R.check(
                            all(p["port"] in container_ports(w) for w in peers),
                            f"{where}: egress port {p['port']} is not a port of the peer pods",
                        )


def check_cert_manager(name: str, objs: list[dict[str, Any]]) -> None:
    """cert-manager objects (CRDs, no schema in kubernetes-validate): the fields the TLS
    wiring relies on, and issuers that resolve."""
    issuers = {o["metadata"]["name"] for o in objs
               if o.get("apiVersion", "").startswith(CERT_MANAGER_GROUP + "/")
               and o.get("kind") == "Issuer"}
    for o in objs:
        if not str(o.get("apiVersion", "")).startswith(CERT_MANAGER_GROUP + "/"):
            continue
        where = f"{name}: {o['kind']}/{o['metadata']['name']}"
        R.check(o["apiVersion"] == f"{CERT_MANAGER_GROUP}/v1", f"{where}: apiVersion must be v1")
        spec = o.get("spec", {})
        if o["kind"] == "Certificate":
            R.check(bool(spec.get("secretName")), f"{where}: no spec.secretName")
            ref = spec.get("issuerRef", {})
            R.check(ref.get("kind") == "ClusterIssuer" or ref.get("name") in issuers,
                    f"{where}: issuerRef {ref.get('name')} is not an Issuer in the render")
            R.check(spec.get("isCA") or bool(spec.get("dnsNames")),
                    f"{where}: a leaf certificate needs dnsNames")
        elif o["kind"] in ("Issuer", "ClusterIssuer"):
            R.check(len({"selfSigned", "ca", "acme", "vault"} & set(spec)) == 1,
                    f"{where}: exactly one issuer type")
        else:
            R.fail(f"{where}: unexpected cert-manager kind")


def mounted_secret(w: dict[str, Any], c: dict[str, Any], path: str) -> tuple[str, str] | None:
    """(Secret name, key) that the file at `path` comes from in container `c`, if any."""
    volumes = {v["name"]: v for v in w["spec"]["template"]["spec"].get("volumes", [])}
    for m in c.get("volumeMounts", []):
        mount = m["mountPath"].rstrip("/") + "/"
        if not path.startswith(mount):
            continue
        secret = volumes.get(m["name"], {}).get("secret")
        if not secret:
            return None
        rel = path[len(mount):]
        items = secret.get("items")
        if items is None:
            return secret["secretName"], rel
        key = next((i["key"] for i in items if i["path"] == rel), None)
        return (secret["secretName"], key) if key else None
    return None


def check_tls_wiring(name: str, objs: list[dict[str, Any]]) -> None:
    """Every PEM file setting is a file mounted from a Secret that something creates, and a
    TLS control is reached over https:// by a name its certificate holds, with its CA."""
    certs = {o["spec"]["secretName"]: o for o in by_kind(objs, "Certificate")
             if o.get("spec", {}).get("secretName")}
    files: dict[str, tuple[str, str] | None] = {}
    for w in workloads(objs):
        for c in w["spec"]["template"]["spec"]["containers"]:
            env = container_env(objs, c)
            where = f"{name}: {w['kind']}/{w['metadata']['name']}"
            for var in TLS_FILE_SETTINGS:
                path = env.get(var)
                if not path:
                    continue
                src = mounted_secret(w, c, path)
                files[var] = src
                if not R.check(src is not None, f"{where}: {var}={path} is not a file "
                                                f"mounted from a Secret"):
                    continue
                secret, key = src
                R.check(secret in certs, f"{where}: {var} comes from Secret {secret}, which no "
                                         f"cert-manager Certificate in the render writes")
                R.check(key in ("tls.crt", "tls.key", "ca.crt"),
                        f"{where}: {var} reads key {key}, not one cert-manager writes")
    control = find(objs, "Deployment", "control")
    relay = find(objs, "Deployment", "relay")
    if control is None or relay is None:
        return
    cenv = container_env(objs, control["spec"]["template"]["spec"]["containers"][0])
    renv = container_env(objs, relay["spec"]["template"]["spec"]["containers"][0])
    url = urlparse(renv.get("CONTROL_URL") or "")
    if not cenv.get("CONTROL_TLS_CERT_FILE"):
        R.check(url.scheme != "https", f"{name}: relay CONTROL_URL is https:// but control "
                                       f"has no CONTROL_TLS_CERT_FILE")
        return
    R.check(bool(cenv.get("CONTROL_TLS_KEY_FILE")), f"{name}: CONTROL_TLS_CERT_FILE without "
                                                    f"CONTROL_TLS_KEY_FILE")
    if not R.check(url.scheme == "https", f"{name}: control serves TLS, relay CONTROL_URL must "
                                          f"be https:// (is {url.geturl()!r})"):
        return
    served = files.get("CONTROL_TLS_CERT_FILE")
    cert = certs.get(served[0]) if served else None
    if R.check(cert is not None, f"{name}: control's certificate is not a Certificate in the render"):
        R.check(url.hostname in cert["spec"].get("dnsNames", []),
                f"{name}: relay CONTROL_URL host {url.hostname} is not in "
                f"{cert['metadata']['name']}'s dnsNames {cert['spec'].get('dnsNames')}")
        ca = files.get("CONTROL_CA_FILE")
        R.check(ca is not None and ca[1] == "ca.crt" and ca[0] == served[0],
                f"{name}: relay CONTROL_CA_FILE must be ca.crt of {served[0]} (is {ca})")


def check_secrets(name: str, objs: list[dict[str, Any]], docs: str) -> None:
    R.check(not by_kind(objs, "Secret"), f"{name}: a Secret object is in the manifests")
    refs: set[tuple[str, str | None]] = set()
    for w in workloads(objs):
        for c in w["spec"]["template"]["spec"]["containers"]:
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    refs.add((ref["name"], ref["key"]))
            for m in c.get("volumeMounts", []):
                vol = next((v for v in w["spec"]["template"]["spec"].get("volumes", [])
                            if v["name"] == m["name"]), {})
                secret = vol.get("secret", {}).get("secretName")
                if secret and secret not in {o["spec"].get("secretName")
                                             for o in by_kind(objs, "Certificate")}:
                    refs.add((secret, None))
    for ing in by_kind(objs, "Ingress"):
        for t in ing["spec"].get("tls", []):
            refs.add((t["secretName"], None))
    for secret, key in sorted(refs, key=lambda r: (r[0], r[1] or "")):
        if key is None:
            R.check(
                re.search(rf"kubectl\b[^\n]*create secret tls {re.escape(secret)}\b", docs)
                is not None or f"secretName: {secret}" in docs,
                f"{name}: TLS Secret {secret} has no creation command in docs/operations.md",
            )
            continue
        commands = [
            m.group(0)
            for m in re.finditer(
                rf"kubectl\b[^\n]*create secret generic {re.escape(secret)}\b(?:[^\n]*\\\n)*[^\n]*",
                docs,
            )
        ]
        R.check(
            any(re.search(rf"--from-(literal|file)={re.escape(key)}=", c) for c in commands),
            f"{name}: Secret {secret} key {key} is not created by a command in docs/operations.md",
        )


def check_no_example_secrets(path: Path) -> None:
    """Nothing that looks like a real credential is committed under deploy/."""
    for f in sorted(path.rglob("*")):
        if not f.is_file():
            continue
        text = f.read_text(encoding="utf-8", errors="replace")
        for pat in (r"sk-[A-Za-z0-9]{20,}", r"-----BEGIN [A-Z ]*PRIVATE KEY-----", r"AC[0-9a-f]{32}"):
            R.check(
                re.search(pat, text) is None,
                f"{f.relative_to(ROOT)}: looks like a committed credential ({pat})",
            )


DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")


def check_image_pins(rendered: dict[str, list[dict[str, Any]]], compose: dict[str, Any]) -> None:
    """Every third-party image is pinned by digest: the Dockerfile's base images (ARG
    defaults and literal FROMs), compose images not built here, and the manifests' images
    other than callbridge's own (those are pinned by the release's tag). A tag alone can
    be moved under us; a digest cannot."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    stage_names: set[str] = set()
    for line in text.splitlines():
        s = line.strip()
        m = re.match(r"ARG\s+(\w*IMAGE\w*)=(\S+)", s)
        if m:
            R.check(DIGEST.search(m.group(2)) is not None,
                    f"Dockerfile: ARG {m.group(1)}={m.group(2)} is not pinned by @sha256 digest")
        m = re.match(r"FROM\s+(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?", s, re.I)
        if m:
            image = m.group(1)
            if not (image.startswith("${") or image.lower() in stage_names or image == "scratch"):
                R.check(DIGEST.search(image) is not None,
                        f"Dockerfile: FROM {image} is not pinned by @sha256 digest")
            if m.group(2):
                stage_names.add(m.group(2).lower())
    services = compose.get("services", {})
    built = {svc.get("image") for svc in services.values() if svc.get("build")}
    for name, svc in services.items():
        image = str(svc.get("image", ""))
        if image and not svc.get("build") and image not in built:
            R.check(DIGEST.search(image) is not None,
                    f"compose service {name}: image {image} is not pinned by @sha256 digest")
    for overlay, objs in rendered.items():
        for w in workloads(objs):
            spec = w["spec"]["template"]["spec"]
            for c in spec["containers"] + spec.get("initContainers", []):
                image = c.get("image", "")
                if image_name(image) in IMAGE_CRATE:
                    continue
                R.check(DIGEST.search(image) is not None,
                        f"{overlay} {w['kind']} {w['metadata']['name']}: image {image} "
                        f"is not pinned by @sha256 digest")


_ADAPTER: set[str] | None = None


def adapter_metric_names() -> set[str]:
    global _ADAPTER
    if _ADAPTER is None:
        cm = yaml.safe_load((K8S / "prometheus-adapter" / "adapter-config.yaml").read_text())
        rules = yaml.safe_load(cm["data"]["config.yaml"])["rules"]
        _ADAPTER = {r["name"]["as"] for r in rules}
        for r in rules:
            series = r["seriesQuery"].split("{", 1)[0]
            crate_exports_metric(series, "prometheus-adapter seriesQuery")
    return _ADAPTER


# === Dockerfile ===


def check_dockerfile(bins: dict[str, set[str]] | None) -> dict[str, str]:
    text = (DEPLOY / "Dockerfile").read_text()
    # Join continuation lines so each instruction is one line.
    lines = re.sub(r"\\\n", " ", text).splitlines()
    stages: dict[str, list[str]] = {}
    current = None
    for line in lines:
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        m = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", s, re.I)
        if m:
            current = (m.group(2) or f"stage{len(stages)}").lower()
            stages[current] = [s]
        elif current:
            stages[current].append(s)
    for target, (binaries, ports) in {
        "relay": (["callbridge-relay"], {8080, 9091}),
        "control": (["callbridge-control"], {50051, 9090}),
        "testkit": (["fake-realtime", "sim-caller"], set()),
    }.items():
        where = f"deploy/Dockerfile target {target}"
        body = stages.get(target)
        if not R.check(body is not None, f"{where}: missing"):
            continue
        R.check(
            "RUNTIME_IMAGE" in body[0] and "distroless/cc-debian12:nonroot" in text,
            f"{where}: runtime must be distroless cc nonroot",
        )
        users = [line.split(None, 1)[1] for line in body if line.upper().startswith("USER ")]
        R.check(users == ["65532:65532"], f"{where}: USER 65532:65532 (distroless nonroot)")
        exposed = {
            int(p.split("/")[0])
            for line in body
            if line.upper().startswith("EXPOSE ")
            for p in line.split()[1:]
        }
        R.check(exposed == ports, f"{where}: EXPOSE {sorted(exposed)} != {sorted(ports)}")
        R.check(
            any(line.upper().startswith("HEALTHCHECK NONE") for line in body),
            f"{where}: says HEALTHCHECK NONE (no shell to run one)",
        )
        for binary in binaries:
            R.check(binary in " ".join(body), f"{where}: does not copy {binary}")
            check_binary(binary, bins)
    builder = " ".join(stages.get("builder", []))
    R.check("--locked" in builder and "--release" in builder, "Dockerfile: cargo build --release --locked")
    members = re.search(r"members\s*=\s*\[([^\]]*)\]", (ROOT / "Cargo.toml").read_text())
    if R.check(members is not None, "Cargo.toml: no workspace members"):
        for m in re.findall(r'"([^"]+)"', members.group(1)):
            R.check(
                re.search(rf"COPY {re.escape(m)}/Cargo.toml ", builder) is not None,
                f"Dockerfile: dependency layer does not copy {m}/Cargo.toml (workspace member)",
            )
    return {t: " ".join(b) for t, b in stages.items()}


def check_stub_layer() -> None:
    """Replays the Dockerfile's dependency layer (its COPYs and stub loop) in a temp dir and
    has cargo load the result with --locked: the layer would build the same dependency
    graph as the real sources, so it is a real cache and not a different build."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    builder = text.split("FROM ${RUST_IMAGE} AS builder", 1)[1].split("\nFROM ", 1)[0]
    before_sources = builder.split("COPY proto proto", 1)[0]
    copies = [line.split()[1:] for line in before_sources.splitlines() if line.startswith("COPY ")]
    run = re.search(r"^RUN (for manifest in .*?) && cargo build", before_sources, re.M | re.S)
    if not R.check(bool(copies) and run is not None, "Dockerfile: dependency layer not found"):
        return
    with tempfile.TemporaryDirectory(prefix="callbridge-stub-") as tmp:
        for *sources, dst in copies:
            for src in sources:
                into_dir = dst.endswith("/")
                target = Path(tmp) / dst / Path(src).name if into_dir else Path(tmp) / dst
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(ROOT / src, target)
        proc = subprocess.run(["bash", "-o", "pipefail", "-c", run.group(1)], cwd=tmp,
                              capture_output=True, text=True, timeout=30, check=False)
        if not R.check(proc.returncode == 0, f"Dockerfile stub loop failed: {proc.stderr.strip()}"):
            return
        proc = subprocess.run(
            # Not --offline: crates needed only on other targets (e.g. portable-atomic) are
            # never downloaded by a local build, but the image's builder resolves them.
            ["cargo", "metadata", "--locked", "--format-version", "1"],
            cwd=tmp, capture_output=True, text=True, timeout=60, check=False,
            env={**os.environ, "CARGO_TARGET_DIR": str(Path(tmp) / "target")},
        )
        R.check(
            proc.returncode == 0,
            f"Dockerfile dependency layer: cargo cannot load the stubbed workspace --locked: "
            f"{proc.stderr.strip()[-400:]}",
        )


# What gcr.io/distroless/cc-debian12 provides to a dynamically linked binary: glibc and
# libgcc_s (no OpenSSL needed: TLS is rustls).
DISTROLESS_CC_LIBS = {"libc.so.6", "libm.so.6", "libgcc_s.so.1", "libdl.so.2", "libpthread.so.0",
                      "librt.so.1", "ld-linux-x86-64.so.2", "libutil.so.1"}


def check_runtime_libs() -> None:
    """The built binaries need no shared library the distroless runtime image lacks."""
    readelf = shutil.which("readelf")
    if readelf is None:
        R.skip("runtime libraries: readelf (binutils) not installed")
        return
    for binary in BINARY_PACKAGE:
        path = DEBUG_BIN / binary
        if not path.exists():
            R.skip(f"runtime libraries of {binary}: not built")
            continue
        out = subprocess.run([readelf, "-d", str(path)], capture_output=True, text=True,
                             timeout=30, check=False).stdout
        needed = set(re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out))
        R.check(bool(needed) and needed <= DISTROLESS_CC_LIBS,
                f"{binary} needs {sorted(needed - DISTROLESS_CC_LIBS)}, which distroless/cc lacks")


def check_binary(binary: str, bins: dict[str, set[str]] | None) -> None:
    if bins is None:
        return
    pkg = BINARY_PACKAGE[binary]
    have = bins.get(pkg)
    if have is None:
        R.fail(f"Dockerfile: package {pkg} (for {binary}) is not in the workspace")
    elif not have:
        R.skip(f"binary {binary}: package {pkg} has no bin targets yet")
    else:
        R.check(binary in have, f"Dockerfile: {binary} is not a bin target of {pkg} ({sorted(have)})")


# === compose ===


def load_compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def bin_source(binary: str) -> str | None:
    """The source of a testkit binary, or None while it is still a placeholder."""
    for f in (ROOT / "tests" / "testkit" / "src" / "bin").glob("*.rs"):
        if f.stem.replace("_", "-") == binary:
            text = f.read_text(encoding="utf-8", errors="replace")
            return text if len(text.strip().splitlines()) > 3 else None
    return None


def defines_flag(text: str, flag: str) -> bool:
    """clap derive (`#[arg(long)] field`, `long = "flag"`) or hand-rolled (`"--flag"`)."""
    field_name = flag.replace("-", "_")
    return (
        f'"--{flag}"' in text
        or f'long = "{flag}"' in text
        or ("long" in text and re.search(rf"\b(pub\s+)?{field_name}\s*:", text) is not None)
    )


def check_compose(stages: dict[str, str], doc: dict[str, Any]) -> None:
    services = doc.get("services", {})
    images = {svc.get("image"): svc.get("build", {}).get("target")
              for svc in services.values() if svc.get("build")}
    for svc_name, svc in services.items():
        where = f"compose service {svc_name}"
        for dep in svc.get("depends_on", {}) or {}:
            R.check(dep in services, f"{where}: depends_on unknown service {dep}")
        build = svc.get("build")
        target = None
        if build:
            target = build.get("target")
            R.check(target in stages, f"{where}: build target {target} is not a Dockerfile stage")
            R.check(
                (DEPLOY / build.get("context", ".") / build.get("dockerfile", "Dockerfile")).resolve()
                == (DEPLOY / "Dockerfile").resolve(),
                f"{where}: build must use deploy/Dockerfile",
            )
        elif svc.get("image") in images:
            target = images[svc["image"]]
        elif str(svc.get("image", "")).startswith("callbridge"):
            R.fail(f"{where}: image {svc.get('image')} is built by no service")
        env = svc.get("environment", {}) or {}
        if isinstance(env, list):
            env = dict(e.split("=", 1) if "=" in e else (e, None) for e in env)
        if target in ("relay", "control"):
            for var in env:
                crate_reads_env(CRATES[target], var, where)
        if target == "testkit":
            entry = svc.get("entrypoint") or []
            binary = Path(entry[0]).name if entry else "fake-realtime"
            R.check(binary in ("fake-realtime", "sim-caller"), f"{where}: runs unknown {binary}")
            text = bin_source(binary)
            if text is None:
                R.skip(f"compose flags and env of {binary}: its source is still a placeholder")
            else:
                text = text + CRATES["testkit"].text
                for arg in svc.get("command", []) or []:
                    if isinstance(arg, str) and arg.startswith("--"):
                        flag = arg.split("=", 1)[0][2:]
                        R.check(defines_flag(text, flag), f"{where}: {binary} has no flag --{flag}")
                for var in env:
                    R.check(f'"{var}"' in text, f"{where}: {binary} never reads {var}")
        if target == "relay":
            port = listen_port(env.get("RELAY_LISTEN")) or 8080
            metrics_port = listen_port(env.get("RELAY_METRICS_ADDR")) or 9091
            published = [str(p).rsplit(":", 1)[-1] for p in svc.get("ports", [])]
            R.check(all(p in (str(port), str(metrics_port)) for p in published),
                    f"{where}: ports vs RELAY_LISTEN and RELAY_METRICS_ADDR")
    redis = services.get("redis", {})
    cmd = " ".join(str(c) for c in redis.get("command", []))
    R.check("--appendonly yes" in cmd, "compose redis: AOF must be on (--appendonly yes)")


def check_env_examples() -> None:
    secrets = {"OPENAI_API_KEY", "TWILIO_AUTH_TOKEN", "RELAY_CONTROL_TOKEN",
               "CONTROL_APP_TOKENS", "CONTROL_RELAY_TOKENS", "RELAY_STREAM_SECRET",
               "TWILIO_API_KEY_SECRET"}
    for crate_key in ("relay", "control"):
        path = DEPLOY / "env" / f"{crate_key}.env.example"
        if not R.check(path.exists(), f"{path.relative_to(ROOT)} missing"):
            continue
        for line in path.read_text().splitlines():
            m = re.match(r"#?([A-Z][A-Z0-9_]+)=(.*)$", line.strip())
            if not m:
                continue
            crate_reads_env(CRATES[crate_key], m.group(1), str(path.relative_to(ROOT)))
            if m.group(1) in secrets:
                R.check(m.group(2) == "", f"{path.relative_to(ROOT)}: {m.group(1)} must be left empty")
        check_env_example_complete(crate_key, path)


def declared_settings(crate_key: str) -> set[str] | None:
    """The env settings a binary reads, from its --help (clap's `[env: NAME]` lines): the
    one source the docs and examples are checked against."""
    binary = DEBUG_BIN / f"callbridge-{crate_key}"
    if not binary_ready(CRATES[crate_key], binary):
        return None
    out = subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=30)
    declared = set(re.findall(r"\[env: ([A-Z][A-Z0-9_]+)", out.stdout))
    R.check(bool(declared), f"{binary.name} --help lists no [env: …] settings")
    # The secrets are no flags: --help lists them apart, each with its NAME_FILE twin.
    for name, file in secret_settings(out.stdout):
        declared |= {name, file}
    return declared or None


def secret_settings(help_text: str) -> list[tuple[str, str]]:
    """(NAME, NAME_FILE) of each secret in a --help's "Secrets" section."""
    return re.findall(r"^  ([A-Z][A-Z0-9_]+), ([A-Z][A-Z0-9_]+_FILE)$", help_text, re.M)


# Each doc table of settings: (file, heading that opens the table's section, binary).
SETTINGS_TABLES = [
    ("README.md", "### relay (`callbridge-relay`)", "relay"),
    ("README.md", "### control (`callbridge-control`)", "control"),
    ("relay/README.md", "## Configuration", "relay"),
]


def check_settings_tables() -> None:
    """README and relay/README tables list exactly the settings each binary declares."""
    for rel, heading, crate_key in SETTINGS_TABLES:
        declared = declared_settings(crate_key)
        if declared is None:
            continue
        lines = (ROOT / rel).read_text().splitlines()
        if not R.check(heading in lines, f"{rel}: no section {heading!r}"):
            continue
        listed: set[str] = set()
        for line in lines[lines.index(heading) + 1:]:
            if line.startswith("#"):
                break
            if line.startswith("| `"):
                first_cell = line.split("|")[1]
                listed |= set(re.findall(r"`([A-Z][A-Z0-9_]+)`", first_cell))
        where = f"{rel} {heading.lstrip('# ')}"
        for name in sorted(declared - listed):
            R.check(False, f"{where}: misses {name}, which callbridge-{crate_key} reads")
        for name in sorted(listed - declared):
            R.check(False, f"{where}: lists {name}, which callbridge-{crate_key} does not declare")
        R.passed += 1


def check_env_example_complete(crate_key: str, path: Path) -> None:
    """The example holds every setting the binary reads: its --help is the source."""
    declared = declared_settings(crate_key)
    if declared is None:
        return
    binary = DEBUG_BIN / f"callbridge-{crate_key}"
    listed = {
        m.group(1)
        for line in path.read_text().splitlines()
        if (m := re.match(r"#?([A-Z][A-Z0-9_]+)=", line.strip()))
    }
    # A secret's NAME_FILE is the alternative to NAME: allowed, not required.
    out = subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=30)
    file_twins = {file for _, file in secret_settings(out.stdout)}
    for name in sorted(declared - file_twins):
        R.check(name in listed, f"{path.relative_to(ROOT)}: misses {name}, which {binary.name} reads")


# === dashboard and metric docs ===


def documented_metrics() -> dict[str, str]:
    """name -> type, from the table in docs/metrics.md."""
    out: dict[str, str] = {}
    if not R.check(METRICS_DOC.exists(), "docs/metrics.md missing"):
        return out
    for line in METRICS_DOC.read_text().splitlines():
        m = re.match(r"\|\s*`(callbridge_[a-z0-9_]+)`\s*\|\s*([a-z]+)\s*\|", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def check_metrics_docs_and_dashboard() -> set[str]:
    docs = documented_metrics()
    R.check(len(docs) >= 21, f"docs/metrics.md documents {len(docs)} metrics, expected all 21")
    for metric, kind in docs.items():
        crate_exports_metric(metric, "docs/metrics.md")
        if kind == "counter":
            R.check(metric.endswith("_total"), f"docs/metrics.md: counter {metric} must end _total")
    dash = json.loads((DEPLOY / "grafana" / "callbridge-dashboard.json").read_text())
    used: set[str] = set()
    for panel in dash.get("panels", []):
        for t in panel.get("targets", []):
            for name in re.findall(r"\b(callbridge_[a-z0-9_]+)", t.get("expr", "")):
                series = re.sub(r"_(bucket|sum|count)$", "", name)
                used.add(series)
                R.check(series in docs, f"grafana: {name} is not documented in docs/metrics.md")
    missing = REQUIRED_DASHBOARD_METRICS - used
    R.check(not missing, f"grafana: no panel for {sorted(missing)}")
    R.check(
        any(v.get("name") == "datasource" for v in dash.get("templating", {}).get("list", [])),
        "grafana: needs a datasource variable so it imports into any Grafana",
    )
    return set(docs)


# === live: the real binaries answer what the manifests probe ===


def listening_ports(pid: int) -> set[int]:
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    except OSError:
        return set()
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


def wait_ports(proc: subprocess.Popen[bytes], count: int, what: str) -> set[int]:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            R.fail(f"live: {what} exited with {proc.returncode} during startup")
            return set()
        ports = listening_ports(proc.pid)
        if len(ports) >= count:
            return ports
        time.sleep(0.1)
    R.fail(f"live: {what} did not listen on {count} port(s) within 20 s")
    return set()


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode("utf-8", "replace")
    except (OSError, urllib.error.URLError) as err:
        return 0, str(err)


def pb_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def pb_bytes(field_no: int, value: bytes) -> bytes:
    """A length-delimited protobuf field (strings and embedded messages)."""
    return pb_varint(field_no << 3 | 2) + pb_varint(len(value)) + value


def pb_str(field_no: int, value: str) -> bytes:
    return pb_bytes(field_no, value.encode())


def grpc_unary(
    port: int, path: str, request: bytes, metadata: dict[str, str] | None = None
) -> tuple[str | None, str, bytes]:
    """One unary gRPC call over h2c: (grpc-status, grpc-message, response message bytes).
    Enough of a client for probes and seeding, with no generated code and no grpcio."""
    import h2.config
    import h2.connection
    import h2.events

    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    headers = [(":method", "POST"), (":scheme", "http"), (":path", path),
               (":authority", f"127.0.0.1:{port}"), ("content-type", "application/grpc"),
               ("te", "trailers")]
    headers += list((metadata or {}).items())
    body, status, message, done = b"", None, "", False
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, headers)
        conn.send_data(sid, b"\x00" + len(request).to_bytes(4, "big") + request, end_stream=True)
        sock.sendall(conn.data_to_send())
        deadline = time.monotonic() + 5
        while not done and time.monotonic() < deadline:
            data = sock.recv(65536)
            if not data:
                break
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.DataReceived):
                    body += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                    for k, v in ev.headers:
                        k = k.decode() if isinstance(k, bytes) else k
                        v = v.decode() if isinstance(v, bytes) else v
                        if k == "grpc-status":
                            status = v
                        elif k == "grpc-message":
                            message = urllib.parse.unquote(v)
                elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)):
                    done = True
            sock.sendall(conn.data_to_send())
    return status, message, body[5:]


def grpc_health(port: int) -> str:
    """grpc.health.v1.Health/Check for service "", as the kubelet's grpc probe asks it."""
    try:
        status, message, body = grpc_unary(port, "/grpc.health.v1.Health/Check", b"")
    except OSError as err:
        return f"error: {err}"
    if status != "0":
        return f"grpc-status {status} {message}"
    # HealthCheckResponse{status = 1 (SERVING)}: field 1, varint 1.
    return "SERVING" if body == b"\x08\x01" else f"NOT_SERVING ({body.hex()})"


class Procs:
    """Processes started by one live check: logs in a temp dir, all stopped at the end
    (by their own pid), logs shown when the check failed."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.tmp = Path(tempfile.mkdtemp(prefix=f"callbridge-{label}-"))
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: dict[str, Path] = {}
        self.failures_before = len(R.failures)

    def start(self, what: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        self.logs[what] = self.tmp / f"{what}.log"
        base = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")}
        proc = subprocess.Popen(
            argv, env={**base, **env}, stdin=subprocess.DEVNULL,
            stdout=self.logs[what].open("wb"), stderr=subprocess.STDOUT,
        )
        self.procs.append(proc)
        return proc

    def redis(self) -> Path | None:
        """A throwaway redis-server on a unix socket in the temp dir (no port to race for)."""
        redis_bin = shutil.which("redis-server")
        if redis_bin is None:
            return None
        sock = self.tmp / "redis.sock"
        self.start("redis", [redis_bin, "--port", "0", "--unixsocket", str(sock), "--save", "",
                             "--appendonly", "no", "--dir", str(self.tmp)], {})
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return sock if sock.exists() else None

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
        if len(R.failures) > self.failures_before:
            for what, log in self.logs.items():
                tail = log.read_text(errors="replace").splitlines()[-15:] if log.exists() else []
                print(f"--- {self.label}: {what} log (last lines) ---\n" + "\n".join(tail),
                      file=sys.stderr)
        shutil.rmtree(self.tmp, ignore_errors=True)


def binary_ready(crate: Crate, binary: Path, main: Path | None = None) -> bool:
    # A main still the skeleton's `fn main() {}` has nothing to probe yet.
    main = main or crate.path / "src" / "main.rs"
    real = main.exists() and len(main.read_text().strip().splitlines()) > 3
    if not (crate.landed and real):
        R.skip(f"live {binary.name}: {main.relative_to(ROOT)} is still a placeholder")
        return False
    if not binary.exists():
        R.skip(f"live {binary.name}: {binary.relative_to(ROOT)} not built (scripts/test.sh builds it)")
        return False
    return True


def check_exported_metrics(body: str, what: str) -> None:
    """A new metric in the code is not a broken deploy: warn until docs/metrics.md lists it
    (the other direction, a documented or dashboard metric missing from the code, fails)."""
    documented = documented_metrics()
    for line in body.splitlines():
        m = re.match(r"# TYPE (callbridge_[a-z0-9_]+) (\w+)", line)
        if m:
            exported = m.group(1) + ("_total" if m.group(2) == "counter" else "")
            if exported not in documented:
                R.warnings.append(f"{what} exports {exported}, which docs/metrics.md does not list")


def start_control(procs: Procs, env: dict[str, str]) -> tuple[int | None, int | None]:
    """Starts control and tells its gRPC port from its metrics port by asking both."""
    control = procs.start("control", [str(DEBUG_BIN / "callbridge-control")], env)
    ports = wait_ports(control, 2, "callbridge-control")
    metrics_port = grpc_port = None
    for p in sorted(ports):
        if http_get(p, "/metrics")[0] == 200:
            metrics_port = p
        else:
            grpc_port = p
    R.check(
        metrics_port is not None and grpc_port is not None,
        f"live: control should serve gRPC and /metrics on two ports (saw {sorted(ports)})",
    )
    return grpc_port, metrics_port


def start_relay(procs: Procs, env: dict[str, str]
                ) -> tuple[subprocess.Popen[bytes], int | None, int | None]:
    """Starts the relay with its metrics listener on a free port and tells the public port
    (it answers /healthz) from the metrics port (it answers /metrics) by asking both."""
    env = {**env, "RELAY_METRICS_ADDR": "127.0.0.1:0"}
    relay = procs.start("relay", [str(DEBUG_BIN / "callbridge-relay")], env)
    ports = wait_ports(relay, 2, "callbridge-relay")
    public = metrics = None
    for p in sorted(ports):
        if http_get(p, "/healthz")[0] == 200:
            public = p
        elif http_get(p, "/metrics")[0] == 200:
            metrics = p
    R.check(
        public is not None and metrics is not None,
        f"live: relay should serve probes and /metrics on two ports (saw {sorted(ports)})",
    )
    return relay, public, metrics


def check_live(dev: list[dict[str, Any]]) -> None:
    """The binaries, configured from the dev overlay's ConfigMaps, answer what the
    manifests probe and scrape."""
    with_relay = binary_ready(CRATES["relay"], DEBUG_BIN / "callbridge-relay")
    with_control = binary_ready(CRATES["control"], DEBUG_BIN / "callbridge-control")
    if not (with_relay or with_control):
        return
    cms = {c["metadata"]["name"].rsplit("-", 1)[0]: c["data"] for c in by_kind(dev, "ConfigMap")}
    procs = Procs("live")
    try:
        grpc_port = None
        if with_control:
            env = dict(cms["control-config"])
            env.update({
                "CONTROL_LISTEN": "127.0.0.1:0",
                "CONTROL_METRICS_LISTEN": "127.0.0.1:0",
                "CONTROL_APP_TOKENS": "deploy-check-app-token-0123456789abcdef",
                "CONTROL_RELAY_TOKENS": "deploy-check-relay-token-0123456789abcdef",
                "CONTROL_ID": "deploy-check-control",
            })
            env.pop("REDIS_URL", None)
            sock = procs.redis()
            if sock is not None:
                env["REDIS_URL"] = f"redis+unix://{sock}"
            else:
                R.skip("live: redis-server not installed, control runs on its in-memory store")
            grpc_port, metrics_port = start_control(procs, env)
            if grpc_port and metrics_port:
                check_control_tokens(grpc_port)
                status, body = http_get(metrics_port, "/metrics")
                R.check("callbridge_control_" in body, "live: control /metrics has no callbridge_control_ series")
                check_exported_metrics(body, "control")
                health = grpc_health(grpc_port)
                R.check(health == "SERVING",
                        f"live: control grpc.health.v1 Check(\"\") -> {health} (the readinessProbe)")
                # The probes the prod overlay uses, where gRPC speaks TLS.
                for path in ("/readyz", "/healthz"):
                    status, body = http_get(metrics_port, path)
                    R.check((status, body.strip()) == (200, "SERVING"),
                            f"live: control GET {path} -> {status} {body.strip()!r}, expected 200 SERVING")
        if with_relay:
            env = dict(cms["relay-config"])
            env.update({
                "RELAY_LISTEN": "127.0.0.1:0",
                "RELAY_CONTROL_TOKEN": "deploy-check-relay-token-0123456789abcdef",
                "OPENAI_API_KEY": "sk-deploy-check",
                "TWILIO_AUTH_TOKEN": "deploy-check-twilio-token",
                "RELAY_ID": "deploy-check-relay",
                "RELAY_DRAIN_GRACE_SECS": "5",
            })
            if grpc_port:
                env["CONTROL_URL"] = f"http://127.0.0.1:{grpc_port}"
            else:
                # No control to talk to: the relay's standalone mode serves every probe too.
                env.pop("CONTROL_URL", None)
            relay, public, metrics = start_relay(procs, env)
            if public and metrics:
                check_relay_live(relay, public, metrics)
    finally:
        procs.close()


def check_control_tokens(port: int) -> None:
    """The Secrets' tokens do what docs/operations.md says: app tokens open the public API
    only, and anything else is refused (probes stay open without a token)."""
    app = {"authorization": "Bearer deploy-check-app-token-0123456789abcdef"}
    cases = [
        ("no token", "/callbridge.v1.Agents/ListAgents", {}, {"16"}),
        ("a wrong token", "/callbridge.v1.Agents/ListAgents",
         {"authorization": "Bearer not-a-token"}, {"16"}),
        ("the app token", "/callbridge.v1.Agents/ListAgents", app, {"0"}),
        ("the app token on the relay API", "/callbridge.v1.Relay/Admit", app, {"16", "7"}),
    ]
    for what, path, md, want in cases:
        try:
            status, message, _ = grpc_unary(port, path, b"", md)
        except OSError as err:
            status, message = None, str(err)
        R.check(status in want, f"live: control {path} with {what} -> grpc-status {status} "
                                f"{message!r}, expected {sorted(want)}")


def check_relay_live(relay: subprocess.Popen[bytes], port: int, metrics_port: int) -> None:
    for path in ("/healthz", "/readyz"):
        status, _ = http_get(port, path)
        R.check(status == 200, f"live: relay GET {path} -> {status}, probes expect 200")
    status, _ = http_get(port, "/metrics")
    R.check(status == 404, f"live: relay GET /metrics on the public port -> {status}, expected 404")
    status, body = http_get(metrics_port, "/metrics")
    R.check(status == 200 and "callbridge_relay_" in body, f"live: relay GET /metrics -> {status}")
    check_exported_metrics(body, "relay")
    if "callbridge_relay_active_calls" not in body:
        R.fail("live: relay /metrics lacks callbridge_relay_active_calls (the HPA metric)")
    status, _ = http_get(port, "/no-such-path")
    R.check(status == 404, f"live: relay GET /no-such-path -> {status}, expected 404")
    # SIGTERM: readiness must stop answering 200 while the process drains.
    relay.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    flipped = False
    while time.monotonic() < deadline and relay.poll() is None:
        status, _ = http_get(port, "/readyz")
        if status != 200:
            flipped = True
            break
        time.sleep(0.05)
    R.check(flipped or relay.poll() is not None, "live: relay /readyz stayed 200 after SIGTERM")
    try:
        code = relay.wait(timeout=15)
        R.check(code == 0, f"live: relay exited {code} after SIGTERM with no calls")
    except subprocess.TimeoutExpired:
        R.fail("live: relay did not exit within 15 s of SIGTERM with no live calls")


def compose_env(svc: dict[str, Any]) -> dict[str, str]:
    """A compose service's environment with ${VAR:-default} resolved to its default."""
    env = svc.get("environment", {}) or {}
    return {k: compose_value(str(v)) for k, v in env.items()}


def compose_value(value: str) -> str:
    value = re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", value)
    return value.replace("$$", "$")


def drain_during_call(relay: subprocess.Popen[bytes], port: int, metrics_port: int,
                      caller: subprocess.Popen[bytes]) -> bool:
    """SIGTERM the relay while it carries the call, as a rollout does, and check what the
    Deployment's probes rely on: readiness 503, liveness 200, the draining gauge at 1, and
    (checked by the caller) the call itself going on to its normal end."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and caller.poll() is None:
        if re.search(r"^callbridge_relay_active_calls [1-9]", http_get(metrics_port, "/metrics")[1], re.M):
            break
        time.sleep(0.02)
    else:
        R.fail("compose replay: the relay never reported an active call (callbridge_relay_active_calls)")
        return False
    relay.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    ready = 200
    while time.monotonic() < deadline and ready == 200:
        ready = http_get(port, "/readyz")[0]
        time.sleep(0.02)
    R.check(ready == 503, f"compose replay: /readyz -> {ready} while draining a live call, expected 503")
    live = http_get(port, "/healthz")[0]
    R.check(live == 200, f"compose replay: /healthz -> {live} while draining, expected 200 (liveness)")
    metrics = http_get(metrics_port, "/metrics")[1]
    R.check(re.search(r"^callbridge_relay_draining 1", metrics, re.M) is not None,
            "compose replay: callbridge_relay_draining is not 1 while draining")
    R.check(re.search(r"^callbridge_relay_active_calls [1-9]", metrics, re.M) is not None,
            "compose replay: the live call was cut at SIGTERM instead of draining")
    return True


def proc_rss_kib(pid: int) -> int:
    """Resident memory of a running process; 0 once it has exited."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def proc_cpu_ms(pid: int) -> float:
    """User + system CPU time of a running process; 0 once it has exited."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = int(fields[11]) + int(fields[12])  # utime + stime
    return ticks * 1000 / os.sysconf("SC_CLK_TCK")


def check_compose_replay(calls: int = 1) -> None:
    """Runs deploy/compose.yaml's stack from the debug binaries on loopback, with the
    compose file's own environment and commands (only addresses rewritten to 127.0.0.1:0
    and a unix-socket Redis): seeds the agent as seed-agent does and places sim-caller's
    call. Proves the compose wiring (tokens, URLs, signing base) works end to end, and
    measures what one call leaves in Redis."""
    needed = {
        "callbridge-control": (CRATES["control"], None),
        "callbridge-relay": (CRATES["relay"], None),
        "fake-realtime": (CRATES["testkit"], ROOT / "tests/testkit/src/bin/fake-realtime.rs"),
        "sim-caller": (CRATES["testkit"], ROOT / "tests/testkit/src/bin/sim-caller.rs"),
    }
    if not all(binary_ready(crate, DEBUG_BIN / name, main) for name, (crate, main) in needed.items()):
        return
    services = load_compose()["services"]
    procs = Procs("compose-replay")
    try:
        sock = procs.redis()
        if sock is None:
            R.skip("compose replay: redis-server not installed")
            return
        env = compose_env(services["control"])
        env.update({"CONTROL_LISTEN": "127.0.0.1:0", "CONTROL_METRICS_LISTEN": "127.0.0.1:0",
                    "REDIS_URL": f"redis+unix://{sock}"})
        grpc_port, control_metrics = start_control(procs, env)
        fake_cmd = [compose_value(a) for a in services["fake-realtime"]["command"]]
        fake_cmd = [("127.0.0.1:0" if a.endswith(":9000") else a) for a in fake_cmd]
        fake = procs.start("fake-realtime", [str(DEBUG_BIN / "fake-realtime"), *fake_cmd], {})
        fake_ports = wait_ports(fake, 1, "fake-realtime")
        if not (grpc_port and fake_ports):
            return
        env = compose_env(services["relay"])
        R.check(env["OPENAI_REALTIME_URL"].startswith("ws://fake-realtime:9000/"),
                "compose: relay OPENAI_REALTIME_URL must point at fake-realtime:9000")
        env.update({
            "RELAY_LISTEN": "127.0.0.1:0",
            "CONTROL_URL": f"http://127.0.0.1:{grpc_port}",
            "OPENAI_REALTIME_URL": env["OPENAI_REALTIME_URL"].replace(
                "fake-realtime:9000", f"127.0.0.1:{min(fake_ports)}"),
        })
        relay, relay_port, relay_metrics = start_relay(procs, env)
        if not (relay_port and relay_metrics):
            return

        # seed-agent, as its grpcurl commands do.
        seed = services["seed-agent"]["command"][0]
        token = compose_value(services["seed-agent"]["environment"]["APP_TOKEN"])
        agent = json.loads(re.search(r"-d '(\{\"agent_id\": \"front-desk\", \"settings\".*?)'", seed).group(1))
        auth = {"authorization": f"Bearer {token}"}
        settings = b"".join(pb_str(n, agent["settings"][k])
                            for n, k in ((1, "name"), (4, "instructions"), (6, "greeting"))
                            if k in agent["settings"])
        status, message, _ = grpc_unary(
            grpc_port, "/callbridge.v1.Agents/CreateAgent",
            pb_str(1, agent["agent_id"]) + pb_bytes(2, settings), auth)
        R.check(status == "0", f"compose replay: CreateAgent -> {status} {message}")
        status, message, _ = grpc_unary(
            grpc_port, "/callbridge.v1.Agents/SetDefaultAgent", pb_str(1, agent["agent_id"]), auth)
        R.check(status == "0", f"compose replay: SetDefaultAgent -> {status} {message}")
        # The dashboard and alerts count errors as code!="Ok": the label must spell it so.
        _, body = http_get(control_metrics or 0, "/metrics")
        R.check(
            re.search(r'callbridge_control_rpc_total\{[^}]*method="CreateAgent"[^}]*\}', body) is not None
            and re.search(r'callbridge_control_rpc_total\{[^}]*code="Ok"[^}]*\} [1-9]', body) is not None,
            "compose replay: control /metrics has no rpc_total{method=\"CreateAgent\", code=\"Ok\"} "
            "after a successful CreateAgent (dashboard and alerts rely on code=\"Ok\")",
        )

        # sim-caller with the compose command; --connect dials the loopback relay while
        # the signed URLs stay http://relay:8080, as in the compose network.
        cmd = [compose_value(a) for a in services["sim-caller"]["command"]]
        if calls > 1:
            cmd += ["--calls", str(calls)]
        idle_rss, cpu_before, peak_rss = proc_rss_kib(relay.pid), proc_cpu_ms(relay.pid), 0
        caller = procs.start("sim-caller", [str(DEBUG_BIN / "sim-caller"), *cmd,
                                            "--connect", f"127.0.0.1:{relay_port}"], {})
        drained = calls == 1 and drain_during_call(relay, relay_port, relay_metrics, caller)
        deadline = time.monotonic() + 60
        while caller.poll() is None and time.monotonic() < deadline:
            peak_rss = max(peak_rss, proc_rss_kib(relay.pid))
            time.sleep(0.05)
        if caller.poll() is None:
            R.fail("compose replay: sim-caller did not finish within 60 s")
            return
        cpu_ms = proc_cpu_ms(relay.pid) - cpu_before
        if drained:
            # The call ran to its end inside the grace; then the relay must exit by itself.
            try:
                code = relay.wait(timeout=int(env.get("RELAY_DRAIN_GRACE_SECS", "30")) + 15)
                R.check(code == 0, f"compose replay: relay exited {code} after draining")
            except subprocess.TimeoutExpired:
                R.fail("compose replay: relay still running after its call ended and the grace passed")
        code = caller.returncode
        out = procs.logs["sim-caller"].read_text(errors="replace")
        durations = [int(d) for d in re.findall(r"^call \d+: (\d+) ms,", out, re.M)]
        if calls > 1 and durations:
            call_secs = sum(durations) / 1000
            print(f"measured: {len(durations)} concurrent calls, {call_secs:.1f} call-seconds; relay "
                  f"(debug build) used {cpu_ms:.0f} CPU-ms = {cpu_ms / call_secs:.2f} CPU-ms per "
                  f"call-second; RSS idle {idle_rss} KiB, peak {peak_rss} KiB = "
                  f"{(peak_rss - idle_rss) / len(durations):.0f} KiB per call")
        ok = R.check(code == 0, f"compose replay: sim-caller exited {code}: {out.strip()[-300:]}")
        ok &= R.check("webhook HTTP 200" in out, f"compose replay: webhook not answered 200: {out.strip()[-300:]}")
        if ok:
            check_call_logs(procs.logs["relay"], procs.logs["control"])
            measure_redis(sock)
    finally:
        procs.close()


def json_lines(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def line_call_id(line: dict[str, Any]) -> str:
    return (line.get("span", {}).get("call_id") or line.get("fields", {}).get("call_id") or "")


def check_call_logs(relay_log: Path, control_log: Path) -> None:
    """docs/metrics.md promises JSON logs with call_id on every line of a call (from the
    call's span) and one closing line per call with its end reason: hold the code to it."""
    relay = json_lines(relay_log)
    call_lines = [line for line in relay if line.get("target", "").startswith("callbridge_relay::call")]
    if not R.check(bool(call_lines), "logs: the relay logged no callbridge_relay::call line at info"):
        return
    R.check(all(line_call_id(line) for line in call_lines),
            "logs: a relay call line has no call_id in its span")
    R.check(any("reason" in line.get("fields", {}) for line in call_lines),
            "logs: no relay summary line with the end reason")
    control = [line for line in json_lines(control_log)
               if line.get("target", "").startswith("callbridge_control::service::relay")]
    R.check(bool(control) and all(line_call_id(line) for line in control),
            "logs: a control relay-service line has no call_id")


def measure_redis(sock: Path) -> None:
    """What one call left in Redis: printed as a figure for docs/operations.md."""
    cli = shutil.which("redis-cli")
    if cli is None:
        R.skip("compose replay: redis-cli not installed, Redis figures not measured")
        return

    def redis(*args: str) -> str:
        return subprocess.run([cli, "-s", str(sock), *args], capture_output=True, text=True,
                              timeout=10, check=False).stdout.strip()

    keys = [k for k in redis("--scan").splitlines() if k]
    call_keys = [k for k in keys if ":call:" in k or k.startswith("call:")]
    R.check(bool(call_keys), f"compose replay: no call keys in Redis after the call (keys: {keys})")
    sizes = {k: int(redis("MEMORY", "USAGE", k) or 0) for k in keys}
    streams = {k: int(redis("XLEN", k) or 0) for k in keys if redis("TYPE", k) == "stream"}
    events = sum(n for k, n in streams.items() if "event" in k)
    print(f"measured: the simulated call(s) left {len(keys)} keys, {sum(sizes.values())} bytes "
          f"(MEMORY USAGE); {events} events in {sum(sizes[k] for k in streams)} bytes of streams")
    for k in sorted(keys):
        print(f"measured:   {k}: {sizes[k]} bytes" + (f", {streams[k]} entries" if k in streams else ""))
    if "--redis-out" in sys.argv:
        write_redis_result(Path(sys.argv[sys.argv.index("--redis-out") + 1]), sizes, streams)


def write_redis_result(out: Path, sizes: dict[str, int], streams: dict[str, int]) -> None:
    """The Redis figures as a result file for scripts/doc_tables.py (`redis_per_call`), with
    where they came from, as the bench binaries write theirs (tests/src/bench.rs)."""
    def git(*args: str) -> str | None:
        r = subprocess.run(["git", *args], capture_output=True, text=True, check=False, cwd=ROOT)
        return r.stdout.strip() if r.returncode == 0 else None

    def load() -> float | None:
        try:
            return float(Path("/proc/loadavg").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "")
    status = git("status", "--porcelain", "--untracked-files=no", "--", ":(top)",
                 ":(top,exclude)docs/results", ":(top,exclude)docs/performance")
    doc = {
        "bench": "redis_per_call",
        "provenance": {
            "commit": git("rev-parse", "HEAD") or "unknown",
            "dirty": bool(status),
            "command": " ".join(["scripts/deploy/validate.py", *sys.argv[1:]]),
            "finished_unix": int(time.time()),
        },
        "machine": {"cpu": cpu, "cores": os.cpu_count(), "load_average_at_start": START_LOAD,
                    "note": "compose replay: relay, control and redis-server on loopback"},
        "load_average_at_end": load(),
        "keys": {k: {"bytes": sizes[k], **({"entries": streams[k]} if k in streams else {})}
                 for k in sorted(sizes)},
    }
    out = out if out.is_absolute() else ROOT / out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"measured: wrote {out}")



# === self-test: every mutation must trip its check ===


def self_test(dev: list[dict[str, Any]], stages: dict[str, str]) -> None:
    """Proves the checks bite: each broken copy of the dev render must fail as expected."""
    import copy

    global R

    def relay(objs: list[dict[str, Any]]) -> dict[str, Any]:
        return find(objs, "Deployment", "relay")["spec"]["template"]["spec"]

    def control(objs: list[dict[str, Any]]) -> dict[str, Any]:
        return find(objs, "Deployment", "control")

    def cm(objs: list[dict[str, Any]], prefix: str) -> dict[str, str]:
        return next(c for c in by_kind(objs, "ConfigMap")
                    if c["metadata"]["name"].startswith(prefix))["data"]

    def set_(d: dict[str, Any], key: str, value: Any) -> None:
        d[key] = value

    cases: list[tuple[str, Any, Any, str]] = [
        ("env var the relay does not read",
         lambda o: relay(o)["containers"][0]["env"].append({"name": "RELAY_NOT_A_SETTING", "value": "1"}),
         lambda o: [check_env_vs_code("t", o, w) for w in workloads(o)], "RELAY_NOT_A_SETTING"),
        ("grace shorter than the drain",
         lambda o: set_(relay(o), "terminationGracePeriodSeconds", 20),
         lambda o: check_relay("t", o), "terminationGracePeriodSeconds"),
        ("readiness on the wrong path",
         lambda o: set_(relay(o)["containers"][0]["readinessProbe"]["httpGet"], "path", "/ready"),
         lambda o: check_relay("t", o), "readinessProbe must GET /readyz"),
        ("ingress host != RELAY_PUBLIC_URL",
         lambda o: set_(find(o, "Ingress", "relay")["spec"]["rules"][0], "host", "other.example.com"),
         lambda o: check_relay("t", o), "Ingress host other.example.com"),
        ("a Secret in the manifests",
         lambda o: o.append({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "x"}}),
         lambda o: check_secrets("t", o, SECRET_DOC.read_text()), "a Secret object"),
        ("secret key nobody creates",
         lambda o: set_(relay(o)["containers"][0]["env"][1]["valueFrom"]["secretKeyRef"], "key", "other-key"),
         lambda o: check_secrets("t", o, SECRET_DOC.read_text()), "key other-key"),
        ("container port != RELAY_LISTEN",
         lambda o: set_(relay(o)["containers"][0]["ports"][0], "containerPort", 9999),
         lambda o: check_relay("t", o), "relay containerPort"),
        ("writable root filesystem",
         lambda o: set_(relay(o)["containers"][0]["securityContext"], "readOnlyRootFilesystem", False),
         lambda o: [check_pod_security("t", w) for w in workloads(o)], "readOnlyRootFilesystem"),
        ("one control replica",
         lambda o: set_(control(o)["spec"], "replicas", 1),
         lambda o: check_control("t", o), ">= 2 replicas"),
        ("network policy on a port nobody listens on",
         lambda o: set_(find(o, "NetworkPolicy", "relay")["spec"]["ingress"][0]["ports"][0], "port", 8081),
         lambda o: check_wiring("t", o), "ingress port 8081"),
        ("Redis without AOF",
         lambda o: set_(find(o, "StatefulSet", "redis")["spec"]["template"]["spec"]["containers"][0],
                        "args", ["--appendonly", "no"]),
         lambda o: check_control("t", o), "AOF"),
        ("HPA metric without an adapter rule",
         lambda o: set_(find(o, "HorizontalPodAutoscaler", "relay")["spec"]["metrics"][0]["pods"]["metric"],
                        "name", "callbridge_relay_no_such_metric"),
         lambda o: check_wiring("t", o), "has no adapter rule"),
        ("CONTROL_URL on a port the Service lacks",
         lambda o: set_(cm(o, "relay-config"), "CONTROL_URL", "http://control:50052"),
         lambda o: check_relay("t", o), "CONTROL_URL port 50052"),
        ("Redis URL from an optional Secret",
         lambda o: control(o)["spec"]["template"]["spec"]["containers"][0]["env"].append(
             {"name": "REDIS_CLUSTER_NODES", "valueFrom": {"secretKeyRef": {
                 "name": "callbridge-redis", "key": "cluster-nodes", "optional": True}}}),
         lambda o: check_control("t", o), "must not come from an optional Secret"),
        ("Service selecting no pods",
         lambda o: set_(find(o, "Service", "control")["spec"], "selector", {"app": "nobody"}),
         lambda o: check_wiring("t", o), "selects no pods"),
        ("third-party image by tag only",
         lambda o: set_(find(o, "StatefulSet", "redis")["spec"]["template"]["spec"]["containers"][0],
                        "image", "redis:7.4-bookworm"),
         lambda o: check_image_pins({"t": o}, {}), "redis:7.4-bookworm is not pinned"),
    ]
    compose = load_compose()
    bad_compose = copy.deepcopy(compose)
    bad_compose["services"]["relay"]["environment"]["RELAY_NOT_A_SETTING"] = "1"
    bad_aof = copy.deepcopy(compose)
    bad_aof["services"]["redis"]["command"] = ["redis-server"]
    bad_pin = copy.deepcopy(compose)
    bad_pin["services"]["redis"]["image"] = "redis:7"

    saved = R
    results: list[tuple[str, bool, list[str]]] = []
    try:
        for what, mutate, run, expect in cases:
            R = Report()
            objs = copy.deepcopy(dev)
            mutate(objs)
            run(objs)
            if what.startswith("env var") and not CRATES["relay"].landed:
                results.append((what, True, ["skipped: relay not landed"]))
                continue
            results.append((what, any(expect in f for f in R.failures), R.failures))
        for what, doc, expect in (
            ("compose env var the relay does not read", bad_compose, "RELAY_NOT_A_SETTING"),
            ("compose Redis without AOF", bad_aof, "AOF must be on"),
            ("compose image by tag only", bad_pin, "redis:7 is not pinned"),
        ):
            R = Report()
            check_compose(stages, doc)
            check_image_pins({}, doc)
            if "RELAY_NOT" in expect and not CRATES["relay"].landed:
                results.append((what, True, []))
                continue
            results.append((what, any(expect in f for f in R.failures), R.failures))
    finally:
        R = saved
    for what, caught, failures in results:
        R.check(caught, f"self-test: breaking '{what}' was not caught (failures: {failures[:3]})")


def self_test_tls(prod: list[dict[str, Any]]) -> None:
    """The TLS wiring checks bite: each broken copy of the prod render must fail."""
    import copy

    global R

    def dep(objs: list[dict[str, Any]], name: str) -> dict[str, Any]:
        return find(objs, "Deployment", name)["spec"]["template"]["spec"]

    def relay_cm(objs: list[dict[str, Any]]) -> dict[str, str]:
        return next(c for c in by_kind(objs, "ConfigMap")
                    if c["metadata"]["name"].startswith("relay-config"))["data"]

    def both(o: list[dict[str, Any]]) -> None:
        check_control("t", o)
        check_tls_wiring("t", o)
        check_cert_manager("t", o)

    cases: list[tuple[str, Any, str]] = [
        ("grpc probe against a TLS port",
         lambda o: dep(o, "control")["containers"][0].__setitem__(
             "readinessProbe", {"grpc": {"port": 50051}}), "cannot speak the TLS"),
        ("relay dials a name the certificate lacks",
         lambda o: relay_cm(o).__setitem__("CONTROL_URL", "https://control.other.svc:50051"),
         "is not in control-tls's dnsNames"),
        ("relay in plaintext to a TLS control",
         lambda o: relay_cm(o).__setitem__("CONTROL_URL", "http://control:50051"),
         "must be https://"),
        ("relay without the CA",
         lambda o: relay_cm(o).pop("CONTROL_CA_FILE"), "CONTROL_CA_FILE must be ca.crt"),
        ("certificate file not mounted",
         lambda o: dep(o, "control")["containers"][0].__setitem__("volumeMounts", []),
         "CONTROL_TLS_CERT_FILE=/etc/callbridge/control-tls/tls.crt is not a file"),
        ("certificate from an issuer nobody defines",
         lambda o: find(o, "Certificate", "control-tls")["spec"]["issuerRef"].__setitem__(
             "name", "nobody"), "issuerRef nobody"),
    ]
    saved = R
    results: list[tuple[str, bool, list[str]]] = []
    try:
        for what, mutate, expect in cases:
            R = Report()
            objs = copy.deepcopy(prod)
            mutate(objs)
            both(objs)
            results.append((what, any(expect in f for f in R.failures), R.failures))
        R = Report()
        both(copy.deepcopy(prod))
        results.append(("(the unbroken prod render passes)", not R.failures, R.failures))
    finally:
        R = saved
    for what, caught, failures in results:
        R.check(caught, f"self-test tls: breaking '{what}' was not caught (failures: {failures[:3]})")


# === main ===


def main() -> int:
    started = time.monotonic()
    docs = SECRET_DOC.read_text() if SECRET_DOC.exists() else ""
    R.check(bool(docs), "docs/operations.md missing")
    bins = workspace_bins()

    rendered: dict[str, list[dict[str, Any]]] = {}
    overlays = sorted(p for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").exists())
    R.check({"dev", "prod"} <= {p.name for p in overlays}, "overlays dev and prod must exist")
    for ov in overlays:
        rendered[ov.name] = render(ov)
    adapter = render(K8S / "prometheus-adapter")
    validate_schemas("prometheus-adapter", adapter)
    adapter_metric_names()

    for name, objs in rendered.items():
        if not objs:
            continue
        validate_schemas(name, objs)
        for w in workloads(objs):
            check_pod_security(name, w)
            check_env_vs_code(name, objs, w)
        check_relay(name, objs)
        check_control(name, objs)
        check_wiring(name, objs)
        check_cert_manager(name, objs)
        check_tls_wiring(name, objs)
        check_secrets(name, objs, docs)

    stages = check_dockerfile(bins)
    check_stub_layer()
    check_runtime_libs()
    check_compose(stages, load_compose())
    check_image_pins(rendered, load_compose())
    check_env_examples()
    check_settings_tables()
    check_metrics_docs_and_dashboard()
    check_no_example_secrets(DEPLOY)
    if rendered.get("dev"):
        self_test(rendered["dev"], stages)
    if rendered.get("prod"):
        self_test_tls(rendered["prod"])
    if "--measure" in sys.argv:
        # Manual: N concurrent simulated calls through the compose stack, figures printed.
        check_compose_replay(int(sys.argv[sys.argv.index("--measure") + 1]))
    elif "--no-live" not in sys.argv and rendered.get("dev"):
        check_live(rendered["dev"])
        check_compose_replay()

    for s in R.skips:
        print(f"SKIP {s}")
    for w in dict.fromkeys(R.warnings):
        print(f"WARN {w}")
    for f in R.failures:
        print(f"FAIL {f}")
    print(
        f"deploy checks: {R.passed} passed, {len(R.failures)} failed, {len(R.skips)} skipped "
        f"({time.monotonic() - started:.1f} s; rendered manifests in {RENDER_DIR.relative_to(ROOT)})"
    )
    return 1 if R.failures else 0


if __name__ == "__main__":
    sys.exit(main())
