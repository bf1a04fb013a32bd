"""The chart's NOTES.txt, which `helm template` does not render: rendered here through
`helm install --dry-run=client` (no cluster needed) for each preset, and checked against the
rendered manifests — the Service it tells the user to reach exists with that port, the
port-forward and ghz commands target it, ghz's request data is a valid dsv2.v1.GenerateRequest
and TLS switches ghz from --insecure to a CA file.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess

import pytest
import yaml

from test_chart import CHART, GPU8, HELM, NAMESPACE, RELEASE, TINY, needs_helm

PROTO = CHART.parents[1] / "proto" / "dsv2" / "v1" / "inference.proto"


def request_fields() -> set[str]:
    """GenerateRequest's field names, read from the proto (protobuf-JSON accepts them as is)."""
    text = PROTO.read_text()
    body = re.search(r"^message GenerateRequest \{(.*?)^\}", text, re.M | re.S)
    assert body, PROTO
    fields = set(re.findall(r"^\s*(?:optional |repeated )?\w+ (\w+) = \d+;", body.group(1), re.M))
    assert {"text", "max_new_tokens"} <= fields, fields
    return fields


def install_dry_run(*args: str) -> tuple[str, list[dict]]:
    """(NOTES text, rendered manifests) of a client-side dry-run install."""
    assert HELM is not None
    cmd = [HELM, "install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stderr}"
    out = proc.stdout
    assert "NOTES:\n" in out, out[-2000:]
    manifests, notes = out.split("NOTES:\n", 1)
    docs = [d for d in yaml.safe_load_all(manifests.split("MANIFEST:\n", 1)[-1]) if d]
    return notes, docs


def ghz_command(notes: str) -> list[str]:
    """The ghz command line in NOTES, with its backslash continuations joined."""
    m = re.search(r"^\s*(ghz .*)$", notes.replace("\\\n", " "), re.M)
    assert m, notes
    return shlex.split(m.group(1))


@needs_helm
@pytest.mark.parametrize("args,tls", [
    (["-f", str(TINY)], False),
    (["-f", str(GPU8)], False),
    (["-f", str(TINY), "--set", "tls.enabled=true", "--set", "tls.secretName=dsv2-tls"], True),
])
def test_notes_point_at_the_rendered_router_service_and_run_ghz(args, tls):
    notes, docs = install_dry_run(*args)
    svc = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == f"{RELEASE}-dsv2-router")
    port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "grpc")
    name = svc["metadata"]["name"]
    assert f"{name}.{NAMESPACE}.svc.cluster.local:{port}" in notes, notes
    assert f"kubectl -n {NAMESPACE} port-forward svc/{name} {port}:{port}" in notes, notes

    argv = ghz_command(notes)
    assert argv[0] == "ghz" and argv[-1] == f"localhost:{port}", argv
    assert argv[argv.index("--call") + 1] == "dsv2.v1.Inference/Generate"
    assert "--proto" not in argv and "--protoset" not in argv, "reflection, no proto file"
    assert ("--insecure" in argv) is (not tls) and ("--cacert" in argv) is tls, argv
    data = json.loads(argv[argv.index("-d") + 1])
    assert set(data) <= request_fields() and "text" in data, data
    assert int(argv[argv.index("-n") + 1]) > 0 and int(argv[argv.index("-c") + 1]) > 0

    shards = next(d for d in docs if d["kind"] == "StatefulSet")["spec"]["replicas"]
    assert f"with {shards} shard(s)" in notes, notes
