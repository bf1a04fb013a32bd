"""Checks of the deployment files: the Helm chart helm/dsv2 as rendered by `helm template`, the
compose cluster deploy/compose.yaml and the images in deploy/Dockerfile.

The chart tests render the chart for real (helm from .tools/bin, see scripts/install-ci-tools.sh,
or $HELM) and check what a broken deployment would get wrong: expert placement, GPU requests,
gRPC probes, shard addresses, schema strictness. The expert wrapper script each shard pod runs is
executed with sh for every ordinal, so the test sees the exact argv the expert binary would get.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "dsv2"
TINY = CHART / "values-tiny-cpu.yaml"
GPU8 = CHART / "values-deepseek-v2-8gpu.yaml"
COMPOSE = ROOT / "deploy" / "compose.yaml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
TOOLS_BIN = ROOT / ".tools" / "bin"
NAMESPACE = "dsv2-test"
RELEASE = "t"
STS = f"{RELEASE}-dsv2-expert"
ROUTER = f"{RELEASE}-dsv2-router"


def _find_helm() -> str | None:
    for cand in (os.environ.get("HELM"), str(TOOLS_BIN / "helm"), shutil.which("helm")):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


HELM = _find_helm()
needs_helm = pytest.mark.skipif(HELM is None, reason="helm not installed (scripts/install-ci-tools.sh)")


# ------------------------------------------------------------------------------------------------
# Rendering helpers


def helm_template(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    assert HELM is not None
    cmd = [HELM, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    return proc


def render(*args: str) -> list[dict]:
    out = helm_template(*args).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def container(workload: dict) -> dict:
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def router_args(docs: list[dict]) -> list[str]:
    return container(one(docs, "Deployment", ROUTER))["args"]


def flag_values(args: list[str], flag: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == flag]


def run_expert_wrapper(docs: list[dict], pod_name: str, tmp_path: Path) -> tuple[int, list[str], str]:
    """Runs the shard pod's shell wrapper for one pod name; returns (status, expert argv, stderr).

    The wrapper ends in `exec /usr/local/bin/dsv2-expert ...`; the path is pointed at a recorder
    script that writes its argv as JSON, so the test sees exactly what the binary would receive.
    """
    c = container(one(docs, "StatefulSet", STS))
    assert c["command"] == ["/bin/sh", "-c"], c["command"]
    script = c["args"][0]
    assert "exec /usr/local/bin/dsv2-expert " in script
    recorder = tmp_path / "record-argv"
    out = tmp_path / "argv.json"
    recorder.write_text(
        "#!/usr/bin/env python3\nimport json, sys\n"
        f"json.dump(sys.argv[1:], open({str(out)!r}, 'w'))\n"
    )
    recorder.chmod(recorder.stat().st_mode | stat.S_IEXEC)
    out.unlink(missing_ok=True)
    proc = subprocess.run(
        ["/bin/sh", "-c", script.replace("/usr/local/bin/dsv2-expert", str(recorder))],
        env={"POD_NAME": pod_name, "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        capture_output=True, text=True, timeout=30,
    )
    argv = json.loads(out.read_text()) if out.exists() else []
    return proc.returncode, argv, proc.stderr


def parse_experts(spec: str) -> list[int]:
    """`--experts` syntax: comma-separated ids and inclusive ranges, e.g. "0-19,40,41-42"."""
    ids: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part.strip())
        assert m, f"bad --experts item {part!r}"
        lo, hi = int(m[1]), int(m[2] or m[1])
        assert lo <= hi, spec
        ids.extend(range(lo, hi + 1))
    return ids


def shard_expert_sets(docs: list[dict], shards: int, tmp_path: Path) -> list[list[int]]:
    sets = []
    for i in range(shards):
        status, argv, err = run_expert_wrapper(docs, f"{STS}-{i}", tmp_path)
        assert status == 0, err
        values = flag_values(argv, "--experts")
        assert len(values) == 1, argv
        assert "--shard-index" not in argv and "--num-shards" not in argv
        sets.append(parse_experts(values[0]))
    return sets


# ------------------------------------------------------------------------------------------------
# Expert placement


PLACEMENTS = [
    # (id, extra args, routed experts, groups, shards, expected mode)
    ("8gpu-preset", ["-f", str(GPU8)], 160, 8, 7, "contiguous"),
    ("8gpu-8shards-groups", ["-f", str(GPU8), "--set", "experts.shards=8", "--set", "placement.mode=groups"], 160, 8, 8, "groups"),
    ("8gpu-4shards-auto", ["-f", str(GPU8), "--set", "experts.shards=4", "--set", "placement.mode=auto"], 160, 8, 4, "groups"),
    ("8gpu-3shards-auto", ["-f", str(GPU8), "--set", "experts.shards=3", "--set", "placement.mode=auto"], 160, 8, 3, "contiguous"),
    ("lite-64-1group-5shards", ["--set", "model.routedExperts=64", "--set", "model.expertGroups=1", "--set", "experts.shards=5"], 64, 1, 5, "contiguous"),
    ("one-shard", ["--set", "model.routedExperts=64", "--set", "experts.shards=1"], 64, 1, 1, "groups"),
]


@needs_helm
@pytest.mark.parametrize("args,experts,groups,shards,mode", [p[1:] for p in PLACEMENTS], ids=[p[0] for p in PLACEMENTS])
def test_every_shard_gets_a_distinct_range_and_all_experts_are_covered_once(tmp_path, args, experts, groups, shards, mode):
    docs = render(*args)
    sts = one(docs, "StatefulSet", STS)
    assert sts["spec"]["replicas"] == shards
    sets = shard_expert_sets(docs, shards, tmp_path)
    flat = [e for s in sets for e in s]
    assert sorted(flat) == list(range(experts)), "experts missing or served twice"
    assert all(sets), "a shard got no experts"
    assert sts["metadata"]["annotations"]["dsv2.io/placement"] == mode
    assert flag_values(router_args(docs), "--placement") == [mode]
    per_group = experts // groups
    if mode == "groups":
        # Whole routing groups per shard, the same number on each.
        for s in sets:
            assert s[0] % per_group == 0 and len(s) % per_group == 0, s[:3]
        assert len({len(s) for s in sets}) == 1
    else:
        # Contiguous, balanced within one expert, the larger shards first.
        for s in sets:
            assert s == list(range(s[0], s[-1] + 1))
        sizes = [len(s) for s in sets]
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True), sizes


@needs_helm
def test_8gpu_preset_ranges_are_the_documented_ones(tmp_path):
    sets = shard_expert_sets(render("-f", str(GPU8)), 7, tmp_path)
    assert [(s[0], s[-1]) for s in sets] == [
        (0, 22), (23, 45), (46, 68), (69, 91), (92, 114), (115, 137), (138, 159)]


@needs_helm
@pytest.mark.parametrize("pod_name", [f"{STS}-7", f"{STS}-12", "not-a-statefulset-pod"])
def test_a_pod_without_a_range_refuses_to_start(tmp_path, pod_name):
    status, argv, err = run_expert_wrapper(render("-f", str(GPU8)), pod_name, tmp_path)
    assert status != 0 and argv == [] and "no expert range" in err


@needs_helm
@pytest.mark.parametrize("shards", [2, 3, 4])
def test_tiny_preset_passes_ordinal_as_shard_index(tmp_path, shards):
    docs = render("-f", str(TINY), "--set", f"experts.shards={shards}")
    seen = []
    for i in range(shards):
        status, argv, err = run_expert_wrapper(docs, f"{STS}-{i}", tmp_path)
        assert status == 0, err
        assert flag_values(argv, "--num-shards") == [str(shards)]
        seen.append(int(flag_values(argv, "--shard-index")[0]))
        assert "--experts" not in argv
        assert flag_values(argv, "--model-dir") == ["tiny"]
        assert flag_values(argv, "--device") == ["cpu"]
    assert seen == list(range(shards))
    assert "--placement" not in router_args(docs)
    status, argv, err = run_expert_wrapper(docs, "dsv2-expert-x", tmp_path)
    assert status != 0 and argv == [] and "ordinal" in err


@needs_helm
@pytest.mark.parametrize("shards,replicas", [(4, 2), (3, 3)])
def test_replicas_reach_the_router_and_every_shard_with_shard_index(tmp_path, shards, replicas):
    docs = render("-f", str(TINY), "--set", f"experts.shards={shards}", "--set", f"experts.replicas={replicas}")
    assert flag_values(router_args(docs), "--replicas") == [str(replicas)]
    assert len(flag_values(router_args(docs), "--shard")) == shards
    sts = one(docs, "StatefulSet", STS)
    assert sts["spec"]["replicas"] == shards
    assert sts["metadata"]["annotations"]["dsv2.io/replicas"] == str(replicas)
    for i in range(shards):
        status, argv, err = run_expert_wrapper(docs, f"{STS}-{i}", tmp_path)
        assert status == 0, err
        assert flag_values(argv, "--shard-index") == [str(i)]
        assert flag_values(argv, "--num-shards") == [str(shards)]
        assert flag_values(argv, "--replicas") == [str(replicas)]
        assert "--experts" not in argv
    # Default: one owner per expert, no --replicas anywhere (the binaries' default is 1).
    docs = render("-f", str(TINY))
    assert "--replicas" not in router_args(docs)
    assert one(docs, "StatefulSet", STS)["metadata"]["annotations"]["dsv2.io/replicas"] == "1"
    status, argv, err = run_expert_wrapper(docs, f"{STS}-0", tmp_path)
    assert status == 0, err
    assert "--replicas" not in argv


@needs_helm
@pytest.mark.parametrize("args,shards,replicas", [
    (["-f", str(GPU8), "--set", "experts.replicas=2"], 7, 2),
    (["-f", str(GPU8), "--set", "experts.shards=8", "--set", "placement.mode=groups", "--set", "experts.replicas=3"], 8, 3),
    (["-f", str(GPU8), "--set", "experts.shards=4", "--set", "experts.replicas=4"], 4, 4),
], ids=["8gpu-preset-r2", "8gpu-8shards-groups-r3", "8gpu-4shards-r4-everywhere"])
def test_explicit_placement_with_replicas_is_chained(tmp_path, args, shards, replicas):
    docs = render(*args)
    # Shard i's set with replicas is the union of the plain sets of shards i .. i+R-1 (wrapping),
    # which is what the router derives from --placement MODE --replicas R.
    base_args = [a for i, a in enumerate(args)
                 if not (a.startswith("experts.replicas=") or (a == "--set" and args[i + 1].startswith("experts.replicas=")))]
    assert len(base_args) == len(args) - 2
    base = shard_expert_sets(render(*base_args), shards, tmp_path)
    sets = shard_expert_sets(docs, shards, tmp_path)
    for i in range(shards):
        want = sorted(set().union(*(base[(i + j) % shards] for j in range(replicas))))
        # The binary sorts the --experts list; the chart lists each expert once.
        assert sorted(sets[i]) == want and len(sets[i]) == len(want), f"shard {i}"
    counts: dict[int, int] = {}
    for s in sets:
        for e in s:
            counts[e] = counts.get(e, 0) + 1
    assert sorted(counts) == list(range(160))
    assert set(counts.values()) == {replicas}, "every expert must be on exactly `replicas` shards"
    ra = router_args(docs)
    assert flag_values(ra, "--replicas") == [str(replicas)]
    assert flag_values(ra, "--placement") == flag_values(router_args(render(*base_args)), "--placement")
    assert one(docs, "StatefulSet", STS)["metadata"]["annotations"]["dsv2.io/replicas"] == str(replicas)


@needs_helm
def test_extra_args_reach_the_expert_binary_intact(tmp_path):
    docs = render("-f", str(TINY), "--set-json", 'experts.extraArgs=["--log-level", "it\'s $HOME; rm -rf /"]')
    status, argv, err = run_expert_wrapper(docs, f"{STS}-0", tmp_path)
    assert status == 0, err
    assert argv[-2:] == ["--log-level", "it's $HOME; rm -rf /"]


# ------------------------------------------------------------------------------------------------
# Router wiring, GPUs, probes


@needs_helm
@pytest.mark.parametrize("args,shards", [
    (["-f", str(TINY)], 2),
    (["-f", str(TINY), "--set", "experts.shards=3"], 3),
    (["-f", str(GPU8)], 7),
])
def test_router_is_told_every_shard_address(args, shards):
    docs = render(*args)
    svc = one(docs, "Service", STS)
    sts = one(docs, "StatefulSet", STS)
    assert svc["spec"]["clusterIP"] == "None"
    assert sts["spec"]["serviceName"] == svc["metadata"]["name"]
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    assert all(pod_labels.get(k) == v for k, v in svc["spec"]["selector"].items())
    port = container(sts)["ports"][0]
    assert port["name"] == "grpc" and svc["spec"]["ports"][0]["port"] == port["containerPort"]
    expected = [
        f"http://{STS}-{i}.{svc['metadata']['name']}.{NAMESPACE}.svc.cluster.local:{port['containerPort']}"
        for i in range(shards)
    ]
    assert flag_values(router_args(docs), "--shard") == expected


@needs_helm
def test_gpu_preset_requests_and_limits_one_gpu_per_pod():
    docs = render("-f", str(GPU8))
    for w in (one(docs, "Deployment", ROUTER), one(docs, "StatefulSet", STS)):
        c = container(w)
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1, w["metadata"]["name"]
        assert c["resources"]["requests"]["nvidia.com/gpu"] == 1, w["metadata"]["name"]
        assert c["image"].endswith("-cuda")
        pod = w["spec"]["template"]["spec"]
        assert any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", []))
    assert flag_values(router_args(docs), "--device") == ["cuda:0"]
    assert one(docs, "StatefulSet", STS)["spec"]["replicas"] + one(docs, "Deployment", ROUTER)["spec"]["replicas"] == 8


@needs_helm
@pytest.mark.parametrize("args", [["-f", str(TINY)], []], ids=["tiny-preset", "defaults"])
def test_cpu_preset_asks_for_no_gpu(args):
    docs = render(*args)
    assert "nvidia.com/gpu" not in json.dumps(docs)
    for w in (one(docs, "Deployment", ROUTER), one(docs, "StatefulSet", STS)):
        assert container(w)["image"].endswith("-cpu")
    assert flag_values(router_args(docs), "--device") == ["cpu"]


@needs_helm
@pytest.mark.parametrize("args", [["-f", str(TINY)], ["-f", str(GPU8)]], ids=["tiny", "8gpu"])
def test_probes_are_grpc_health_checks(args):
    docs = render(*args)
    for w, service in ((one(docs, "Deployment", ROUTER), "dsv2.v1.Inference"),
                       (one(docs, "StatefulSet", STS), "dsv2.expert.v1.ExpertShard")):
        c = container(w)
        grpc_port = next(p["containerPort"] for p in c["ports"] if p["name"] == "grpc")
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            p = c[probe]
            assert set(p) & {"grpc", "exec", "httpGet", "tcpSocket"} == {"grpc"}, (probe, p)
            assert p["grpc"]["port"] == grpc_port
        assert c["readinessProbe"]["grpc"]["service"] == service
        assert c["startupProbe"]["grpc"]["service"] == service
        assert c["livenessProbe"]["grpc"]["service"] == ""


@needs_helm
def test_8gpu_startup_allows_many_minutes_for_loading():
    docs = render("-f", str(GPU8))
    for w in (one(docs, "Deployment", ROUTER), one(docs, "StatefulSet", STS)):
        p = container(w)["startupProbe"]
        assert p["periodSeconds"] * p["failureThreshold"] >= 20 * 60


@needs_helm
def test_tls_mounts_the_secret_and_probes_through_grpc_health_probe():
    docs = render("-f", str(TINY), "--set", "tls.enabled=true", "--set", "tls.secretName=dsv2-tls")
    for w in (one(docs, "Deployment", ROUTER), one(docs, "StatefulSet", STS)):
        pod = w["spec"]["template"]["spec"]
        c = container(w)
        vol = next(v for v in pod["volumes"] if v["name"] == "tls")
        assert vol["secret"]["secretName"] == "dsv2-tls"
        mount = next(m for m in c["volumeMounts"] if m["name"] == "tls")
        assert mount["readOnly"] is True
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["DSV2_TLS_CERT"] == f"{mount['mountPath']}/tls.crt"
        assert env["DSV2_TLS_KEY"] == f"{mount['mountPath']}/tls.key"
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            cmd = c[probe]["exec"]["command"]
            assert cmd[0] == "grpc-health-probe" and "-tls" in cmd
    assert all(s.startswith("https://") for s in flag_values(router_args(docs), "--shard"))


TLS = ("-f", str(TINY), "--set", "tls.enabled=true", "--set", "tls.secretName=dsv2-tls")
AUTH = ("--set", "auth.enabled=true", "--set", "auth.secretName=dsv2-auth")


def env_of(c: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def probe_commands(c: dict) -> list:
    return [c[p].get("exec", {}).get("command") for p in ("startupProbe", "readinessProbe", "livenessProbe")]


def rust_env_vars() -> set[str]:
    """Every DSV2_* variable a flag of the binaries reads (`env = "DSV2_..."` in clap)."""
    found = set()
    for f in (ROOT / "services").rglob("*.rs"):
        found |= set(re.findall(r'env\s*=\s*"(DSV2_[A-Z0-9_]+)"', f.read_text()))
    return found


@needs_helm
@pytest.mark.parametrize("extra", [(), AUTH, ("--set", "tls.internal=false"),
                                   ("--set", "tls.clientAuth=true", "--set", "tls.internalClientAuth=false")])
def test_every_dsv2_variable_the_chart_sets_is_read_by_a_flag(extra):
    docs = render(*TLS, *extra)
    known = rust_env_vars()
    for w in (one(docs, "Deployment", ROUTER), one(docs, "StatefulSet", STS)):
        for name in env_of(container(w)):
            if name.startswith("DSV2_"):
                assert name in known, f"{name} is set by the chart but no flag reads it"


@needs_helm
def test_tls_wires_the_router_shard_mtls_and_probes():
    docs = render(*TLS)
    router, expert = container(one(docs, "Deployment", ROUTER)), container(one(docs, "StatefulSet", STS))
    m = "/etc/dsv2/tls"
    r, x = env_of(router), env_of(expert)
    # Router: serves TLS, dials shards over https:// with the CA and presents the pod cert.
    assert (r["DSV2_TLS_CERT"], r["DSV2_TLS_KEY"]) == (f"{m}/tls.crt", f"{m}/tls.key")
    assert r["DSV2_SHARD_CA"] == f"{m}/ca.crt"
    assert (r["DSV2_SHARD_CLIENT_CERT"], r["DSV2_SHARD_CLIENT_KEY"]) == (f"{m}/tls.crt", f"{m}/tls.key")
    assert "DSV2_TLS_CLIENT_CA" not in r, "the public API does not require client certs by default"
    # Shards: TLS, and only clients with a certificate of the CA (the router).
    assert (x["DSV2_TLS_CERT"], x["DSV2_TLS_KEY"], x["DSV2_TLS_CLIENT_CA"]) == (
        f"{m}/tls.crt", f"{m}/tls.key", f"{m}/ca.crt")
    # Probes: TLS everywhere; a client certificate only where one is required.
    for cmd in probe_commands(router):
        assert "-tls" in cmd and not any(a.startswith("-tls-client-cert") for a in cmd)
    for cmd in probe_commands(expert):
        assert "-tls" in cmd
        assert f"-tls-client-cert={m}/tls.crt" in cmd and f"-tls-client-key={m}/tls.key" in cmd


@needs_helm
def test_tls_without_internal_keeps_the_shards_plain():
    docs = render(*TLS, "--set", "tls.internal=false")
    router, expert = container(one(docs, "Deployment", ROUTER)), container(one(docs, "StatefulSet", STS))
    assert all(s.startswith("http://") for s in flag_values(router_args(docs), "--shard"))
    assert not any(k.startswith(("DSV2_TLS", "DSV2_SHARD")) for k in env_of(expert))
    assert not any(k.startswith("DSV2_SHARD") for k in env_of(router))
    assert all(expert[p]["grpc"] for p in ("startupProbe", "readinessProbe", "livenessProbe"))
    assert all("-tls" in cmd for cmd in probe_commands(router))


@needs_helm
def test_tls_client_auth_on_the_public_api():
    docs = render(*TLS, "--set", "tls.clientAuth=true")
    router = container(one(docs, "Deployment", ROUTER))
    assert env_of(router)["DSV2_TLS_CLIENT_CA"] == "/etc/dsv2/tls/ca.crt"
    for cmd in probe_commands(router):
        assert "-tls-client-cert=/etc/dsv2/tls/tls.crt" in cmd


@needs_helm
def test_auth_secret_gives_the_router_its_tokens_and_the_shards_the_shard_token():
    docs = render(*TLS, *AUTH)
    for w in (one(docs, "Deployment", ROUTER), one(docs, "StatefulSet", STS)):
        pod = w["spec"]["template"]["spec"]
        vol = next(v for v in pod["volumes"] if v["name"] == "auth")
        assert vol["secret"]["secretName"] == "dsv2-auth"
        mount = next(m for m in container(w)["volumeMounts"] if m["name"] == "auth")
        assert mount["mountPath"] == "/etc/dsv2/auth" and mount["readOnly"] is True
    r = env_of(container(one(docs, "Deployment", ROUTER)))
    x = env_of(container(one(docs, "StatefulSet", STS)))
    assert r["DSV2_AUTH_TOKEN_FILE"] == "/etc/dsv2/auth/tokens"
    assert r["DSV2_SHARD_TOKEN"] == {"secretKeyRef": {"name": "dsv2-auth", "key": "shard-token"}}
    assert x["DSV2_SHARD_TOKEN_FILE"] == "/etc/dsv2/auth/shard-token"
    assert "DSV2_AUTH_TOKEN_FILE" not in x
    docs = render("-f", str(TINY))
    for w in (one(docs, "Deployment", ROUTER), one(docs, "StatefulSet", STS)):
        assert not any(k.startswith(("DSV2_AUTH", "DSV2_SHARD_TOKEN")) for k in env_of(container(w)))


@needs_helm
def test_service_monitor_scrapes_a_port_the_services_have():
    docs = render("--set", "metrics.enabled=true", "--set", "serviceMonitor.enabled=true",
                  "--set", "serviceMonitor.labels.release=prom")
    monitors = [d for d in docs if d["kind"] == "ServiceMonitor"]
    assert len(monitors) == 2
    services = [d for d in docs if d["kind"] == "Service"]
    for m in monitors:
        assert m["apiVersion"] == "monitoring.coreos.com/v1"
        assert m["metadata"]["labels"]["release"] == "prom"
        sel = m["spec"]["selector"]["matchLabels"]
        matched = [s for s in services if all(s["metadata"]["labels"].get(k) == v for k, v in sel.items())]
        assert len(matched) == 1, m["metadata"]["name"]
        assert "metrics" in [p["name"] for p in matched[0]["spec"]["ports"]]
    assert not [d for d in render() if d["kind"] == "ServiceMonitor"]


@needs_helm
def test_metrics_and_tracing_flags_reach_router_and_every_shard(tmp_path):
    docs = render("-f", str(TINY), "--set", "metrics.enabled=true",
                  "--set", "tracing.otlpEndpoint=http://otel-collector.obs:4317")
    dep, sts = one(docs, "Deployment", ROUTER), one(docs, "StatefulSet", STS)
    router_port = {p["name"]: p for p in container(dep)["ports"]}["metrics"]["containerPort"]
    expert_port = {p["name"]: p for p in container(sts)["ports"]}["metrics"]["containerPort"]
    assert flag_values(router_args(docs), "--metrics-listen") == [f"0.0.0.0:{router_port}"]
    assert flag_values(router_args(docs), "--otlp-endpoint") == ["http://otel-collector.obs:4317"]
    for ordinal in (0, 1):
        status, argv, err = run_expert_wrapper(docs, f"{STS}-{ordinal}", tmp_path)
        assert status == 0, err
        assert flag_values(argv, "--metrics-listen") == [f"0.0.0.0:{expert_port}"]
        assert flag_values(argv, "--otlp-endpoint") == ["http://otel-collector.obs:4317"]
    svc = one(docs, "Service", STS)
    assert [p["port"] for p in svc["spec"]["ports"] if p["name"] == "metrics"] == [expert_port]
    # Off by default: no flags, no ports.
    docs = render("-f", str(TINY))
    assert flag_values(router_args(docs), "--metrics-listen") == []
    assert flag_values(router_args(docs), "--otlp-endpoint") == []
    status, argv, err = run_expert_wrapper(docs, f"{STS}-0", tmp_path)
    assert status == 0, err
    assert "--metrics-listen" not in argv and "--otlp-endpoint" not in argv


@needs_helm
def test_pdbs_select_the_pods_they_protect():
    docs = render("-f", str(GPU8))
    pdbs = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    assert len(pdbs) == 2
    for w in (one(docs, "Deployment", ROUTER), one(docs, "StatefulSet", STS)):
        labels = w["spec"]["template"]["metadata"]["labels"]
        hits = [p for p in pdbs if all(labels.get(k) == v for k, v in p["spec"]["selector"]["matchLabels"].items())]
        assert len(hits) == 1 and hits[0]["spec"]["maxUnavailable"] == 1


@needs_helm
def test_experts_spread_over_nodes_by_default():
    sts = one(render("-f", str(TINY)), "StatefulSet", STS)
    terms = sts["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert terms[0]["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    sts = one(render("-f", str(TINY), "--set", "experts.spread=required"), "StatefulSet", STS)
    assert "requiredDuringSchedulingIgnoredDuringExecution" in sts["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]


# ------------------------------------------------------------------------------------------------
# Model volumes


@needs_helm
def test_8gpu_model_comes_from_a_read_only_pvc():
    docs = render("-f", str(GPU8))
    for w in (one(docs, "Deployment", ROUTER), one(docs, "StatefulSet", STS)):
        pod = w["spec"]["template"]["spec"]
        vol = next(v for v in pod["volumes"] if v["name"] == "model")
        assert vol["persistentVolumeClaim"] == {"claimName": "dsv2-deepseek-v2", "readOnly": True}
        mount = next(m for m in container(w)["volumeMounts"] if m["name"] == "model")
        assert mount["readOnly"] is True and mount["mountPath"] == "/models"
    assert flag_values(router_args(docs), "--model-dir") == ["/models/DeepSeek-V2"]
    assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim"]


@needs_helm
def test_init_container_fetches_into_a_chart_created_claim():
    docs = render("-f", str(GPU8), "--set", "model.source=init", "--set", "model.init.volume=pvc",
                  "--set", "model.pvc.claimName=", "--set", "model.pvc.create=true",
                  "--set-json", 'model.pvc.accessModes=["ReadWriteMany"]',
                  "--set-json", 'model.init.command=["/bin/sh","-c","fetch-model"]')
    pvc = one(docs, "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for w in (one(docs, "Deployment", ROUTER), one(docs, "StatefulSet", STS)):
        pod = w["spec"]["template"]["spec"]
        (init,) = pod["initContainers"]
        assert init["command"] == ["/bin/sh", "-c", "fetch-model"]
        assert {"name": "model", "mountPath": "/models"} in init["volumeMounts"]
        vol = next(v for v in pod["volumes"] if v["name"] == "model")
        assert vol["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]


@needs_helm
@pytest.mark.parametrize("timeout,flag", [(0.5, "0.5"), (1200, "1200"), (0, "0")])
def test_router_limits_reach_the_router_flags(tmp_path, timeout, flag):
    # --request-timeout-s takes fractions (0 = off); --max-concurrent counts calls over all
    # connections; unset values leave the binary's defaults
    f = tmp_path / "limits.yaml"
    f.write_text(f"router:\n  requestTimeoutSeconds: {timeout}\n  maxConcurrent: 300\n")
    args = router_args(render("-f", str(TINY), "-f", str(f)))
    assert flag_values(args, "--request-timeout-s") == [flag]
    assert flag_values(args, "--max-concurrent") == ["300"]
    unset = router_args(render("-f", str(TINY)))
    assert flag_values(unset, "--request-timeout-s") == []
    assert flag_values(unset, "--max-concurrent") == []


@needs_helm
@pytest.mark.parametrize("gb,flag", [(0.5, "0.5"), (16, "16"), (0, "0")])
def test_host_cache_reaches_the_router_flag(tmp_path, gb, flag):
    # --host-cache-gb takes fractions (0 = no host tier); unset leaves the router's default
    f = tmp_path / "host.yaml"
    f.write_text(f"router:\n  hostCacheGb: {gb}\n")
    assert flag_values(router_args(render("-f", str(TINY), "-f", str(f))), "--host-cache-gb") == [flag]
    assert flag_values(router_args(render("-f", str(TINY))), "--host-cache-gb") == []


@needs_helm
def test_kv_cache_dtype_and_size_reach_the_router_flags(tmp_path):
    # fp8 needs a GPU router (the 8-GPU preset's); --kv-cache-gb takes fractions
    f = tmp_path / "kv.yaml"
    f.write_text("router:\n  kvCacheDtype: fp8\n  kvCacheGb: 40.5\n")
    args = router_args(render("-f", str(GPU8), "-f", str(f)))
    assert flag_values(args, "--kv-cache-dtype") == ["fp8"]
    assert flag_values(args, "--kv-cache-gb") == ["40.5"]
    f.write_text("router:\n  kvCacheDtype: bf16\n")
    assert flag_values(router_args(render("-f", str(TINY), "-f", str(f))), "--kv-cache-dtype") == ["bf16"]
    unset = router_args(render("-f", str(GPU8)))
    assert flag_values(unset, "--kv-cache-dtype") == []
    assert flag_values(unset, "--kv-cache-gb") == []


@needs_helm
def test_router_serves_the_http_api_on_a_named_port_the_service_exposes(tmp_path):
    docs = render("-f", str(TINY))
    dep, svc = one(docs, "Deployment", ROUTER), one(docs, "Service", ROUTER)
    ports = {p["name"]: p for p in container(dep)["ports"]}
    assert flag_values(router_args(docs), "--http-listen") == [f"0.0.0.0:{ports['http']['containerPort']}"]
    http = [p for p in svc["spec"]["ports"] if p["name"] == "http"]
    assert len(http) == 1 and http[0]["targetPort"] == "http" and http[0]["port"] == 8000
    f = tmp_path / "http.yaml"
    f.write_text("router:\n  http:\n    enabled: true\n    port: 9000\n    servicePort: 80\n")
    docs = render("-f", str(TINY), "-f", str(f))
    assert flag_values(router_args(docs), "--http-listen") == ["0.0.0.0:9000"]
    assert [p["port"] for p in one(docs, "Service", ROUTER)["spec"]["ports"] if p["name"] == "http"] == [80]
    f.write_text("router:\n  http:\n    enabled: false\n    port: 8000\n    servicePort: 8000\n")
    docs = render("-f", str(TINY), "-f", str(f))
    assert flag_values(router_args(docs), "--http-listen") == []
    assert "http" not in {p["name"] for p in container(one(docs, "Deployment", ROUTER))["ports"]}
    assert "http" not in {p["name"] for p in one(docs, "Service", ROUTER)["spec"]["ports"]}


# ------------------------------------------------------------------------------------------------
# The schema and the chart's own checks reject mistakes


@needs_helm
@pytest.mark.parametrize("values,needle", [
    ("routr:\n  replicas: 2\n", "routr"),
    ("router:\n  replicsa: 2\n", "replicsa"),
    ("experts:\n  shard: 4\n", "shard"),
    ("model:\n  routedExpert: 160\n", "routedExpert"),
    ("experts:\n  probes:\n    startup:\n      periodSecond: 5\n", "periodSecond"),
    ("images:\n  flavor: rocm\n", "flavor"),
    ("experts:\n  shards: 0\n", "shards"),
    ("experts:\n  replicas: 0\n", "replicas"),
    ("experts:\n  replicas: two\n", "replicas"),
    ("router:\n  requestTimeoutSeconds: -1\n", "requestTimeoutSeconds"),
    ("router:\n  maxConcurrent: 0\n", "maxConcurrent"),
    ("router:\n  hostCacheGb: -1\n", "hostCacheGb"),
    ("router:\n  hostCacheGb: lots\n", "hostCacheGb"),
    ("router:\n  kvCacheDtype: int8\n", "kvCacheDtype"),
    ("router:\n  kvCacheGb: 0\n", "kvCacheGb"),
    ("tracing:\n  otlpEndpoint: otel-collector:4317\n", "otlpEndpoint"),
    ("tracing:\n  endpoint: http://x:4317\n", "endpoint"),
])
def test_schema_rejects_typos_and_bad_values(tmp_path, values, needle):
    f = tmp_path / "bad.yaml"
    f.write_text(values)
    proc = helm_template("-f", str(TINY), "-f", str(f), check=False)
    assert proc.returncode != 0, f"helm template accepted {values!r}"
    assert "schema" in proc.stderr and needle in proc.stderr, proc.stderr


@needs_helm
@pytest.mark.parametrize("args,needle", [
    (["-f", str(GPU8), "--set", "placement.mode=groups"], "divisible"),
    (["-f", str(TINY), "--set", "model.dir=/models/x"], "model.source"),
    (["-f", str(GPU8), "--set", "model.dir=/elsewhere/x"], "mountPath"),
    (["-f", str(GPU8), "--set", "experts.shards=161"], "exceeds"),
    (["-f", str(TINY), "--set", "tls.enabled=true"], "secretName"),
    (["-f", str(TINY), "--set", "auth.enabled=true"], "auth.secretName"),
    (["--set", "serviceMonitor.enabled=true"], "metrics.enabled"),
    (["-f", str(TINY), "--set", "placement.mode=groups"], "routedExperts"),
    (["-f", str(TINY), "--set", "experts.replicas=3"], "experts.replicas (3) exceeds experts.shards (2)"),
    (["-f", str(GPU8), "--set", "experts.replicas=8"], "experts.replicas (8) exceeds experts.shards (7)"),
    (["-f", str(TINY), "--set", "router.kvCacheDtype=fp8"], "needs a GPU router"),
    (["-f", str(GPU8), "--set", "router.kvCacheGb=40", "--set", "router.kvCacheBlocks=4096"], "both size the KV cache"),
])
def test_chart_rejects_impossible_combinations(args, needle):
    proc = helm_template(*args, check=False)
    assert proc.returncode != 0 and needle in proc.stderr, proc.stderr


# ------------------------------------------------------------------------------------------------
# Compose cluster and images


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_wires_router_to_two_experts():
    services = _compose()["services"]
    assert set(services) == {"router", "expert-0", "expert-1"}
    listen = {}
    for i in (0, 1):
        cmd = services[f"expert-{i}"]["command"]
        assert flag_values(cmd, "--shard-index") == [str(i)]
        assert flag_values(cmd, "--num-shards") == ["2"]
        assert flag_values(cmd, "--model-dir") == ["tiny"]
        listen[f"expert-{i}"] = flag_values(cmd, "--listen")[0].rsplit(":", 1)[1]
        hc = services[f"expert-{i}"]["healthcheck"]["test"]
        assert hc[:2] == ["CMD", "grpc-health-probe"] and f"-addr=127.0.0.1:{listen[f'expert-{i}']}" in hc
    router = services["router"]
    cmd = router["command"]
    assert flag_values(cmd, "--model-dir") == ["tiny"]
    assert flag_values(cmd, "--shard") == [f"http://{name}:{port}" for name, port in listen.items()]
    assert router["depends_on"] == {n: {"condition": "service_healthy"} for n in listen}
    assert router["healthcheck"]["test"][:2] == ["CMD", "grpc-health-probe"]
    router_port = flag_values(cmd, "--listen")[0].rsplit(":", 1)[1]
    assert any(str(p).endswith(f":{router_port}:{router_port}") for p in router["ports"])
    # the HTTP API is published too
    http_port = flag_values(cmd, "--http-listen")[0].rsplit(":", 1)[1]
    assert any(str(p).endswith(f":{http_port}:{http_port}") for p in router["ports"])
    # and every service's metrics; the router's are published for a local Prometheus
    metrics_port = flag_values(cmd, "--metrics-listen")[0].rsplit(":", 1)[1]
    assert any(str(p).endswith(f":{metrics_port}:{metrics_port}") for p in router["ports"])
    for i in (0, 1):
        assert len(flag_values(services[f"expert-{i}"]["command"], "--metrics-listen")) == 1


def _compose_cli() -> list[str] | None:
    standalone = TOOLS_BIN / "docker-compose"
    if os.access(standalone, os.X_OK):
        return [str(standalone)]
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return None


def test_compose_file_is_valid_for_docker_compose():
    cli = _compose_cli()
    if cli is None:
        pytest.skip("no docker compose CLI (scripts/install-ci-tools.sh installs one)")
    proc = subprocess.run([*cli, "-f", str(COMPOSE), "config", "--format", "json"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    cfg = json.loads(proc.stdout)
    targets = {name: s["build"]["target"] for name, s in cfg["services"].items()}
    assert targets == {"router": "router-cpu", "expert-0": "expert-cpu", "expert-1": "expert-cpu"}


def _dockerfile_stages() -> dict[str, list]:
    dockerfile = pytest.importorskip("dockerfile")
    stages: dict[str, list] = {}
    current = None
    for cmd in dockerfile.parse_file(str(DOCKERFILE)):
        if cmd.cmd.upper() == "FROM":
            v = cmd.value
            current = v[2] if len(v) == 3 and v[1].upper() == "AS" else f"#{len(stages)}"
            stages[current] = [cmd]
        elif current is not None:
            stages[current].append(cmd)
    return stages


@pytest.mark.parametrize("target,binary,base", [
    ("router-cpu", "dsv2-router", "runtime-cpu"),
    ("expert-cpu", "dsv2-expert", "runtime-cpu"),
    ("router-cuda", "dsv2-router", "runtime-cuda"),
    ("expert-cuda", "dsv2-expert", "runtime-cuda"),
])
def test_image_targets_run_help_as_non_root(target, binary, base):
    stages = _dockerfile_stages()
    cmds = stages[target]
    assert cmds[0].value[0] == base
    runs = [c for c in cmds if c.cmd.upper() == "RUN"]
    assert any(list(c.value) == [f"/usr/local/bin/{binary}", "--help"] for c in runs), "no --help smoke test"
    users = [c.value[0] for c in cmds if c.cmd.upper() == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    entry = [c for c in cmds if c.cmd.upper() == "ENTRYPOINT"]
    assert entry and list(entry[-1].value) == [f"/usr/local/bin/{binary}"]
    base_from = stages[base][0].value[0]
    if base == "runtime-cuda":
        assert base_from == "${CUDA_IMAGE}"
        assert any("libnccl.so.2" in c.original for c in stages[base])
    else:
        assert base_from.endswith("-slim")
    assert any(c.cmd.upper() == "COPY" and "grpc-health-probe" in c.original for c in stages[base])


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or str(ROOT / ".tools" / "venv" / "bin" / "hadolint")
    if not os.access(hadolint, os.X_OK):
        pytest.skip("hadolint not installed")
    proc = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
