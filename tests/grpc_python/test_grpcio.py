"""TLS, mTLS and token auth of dsv2-router seen by a client no one here wrote: Python `grpcio` with
stubs that `grpcio-tools` generates from proto/ at test time, and the standard library's HTTPS
client for the HTTP API. Certificates come from `dsv2-test-certs` (rcgen, made fresh each run).

Checks: a client without the CA fails and with it succeeds; health is open without a token; no or
a wrong token is UNAUTHENTICATED (HTTP 401 in OpenAI's error shape) and runs no engine step (the
router's dsv2_router_engine_steps_total); the right token generates; with --tls-client-ca a
client without a certificate is refused and one with a certificate of that CA is served.

Run by scripts/grpcio-check.sh (CI: scripts/test.sh) with the venv of scripts/install-ci-tools.sh;
the binaries come from $DSV2_BIN_DIR, else target/debug.
"""

import json
import os
import queue
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[2]
BIN_DIR = Path(os.environ.get("DSV2_BIN_DIR", ROOT / "target" / "debug"))
TOKEN = "python-client-token"


@pytest.fixture(scope="module")
def tmp():
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


@pytest.fixture(scope="module")
def certs(tmp):
    d = tmp / "certs"
    subprocess.run([str(BIN_DIR / "dsv2-test-certs"), str(d)], check=True)
    return d


@pytest.fixture(scope="module")
def pb(tmp):
    """dsv2.v1 messages and stubs, generated from proto/ by grpcio-tools."""
    out = tmp / "gen"
    out.mkdir()
    include = Path(protoc.__file__).parent / "_proto"
    rc = protoc.main(["protoc", f"-I{ROOT / 'proto'}", f"-I{include}", f"--python_out={out}",
                      f"--grpc_python_out={out}", "dsv2/v1/inference.proto"])
    assert rc == 0, "grpcio-tools could not compile proto/dsv2/v1/inference.proto"
    sys.path.insert(0, str(out))
    from dsv2.v1 import inference_pb2, inference_pb2_grpc
    return inference_pb2, inference_pb2_grpc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_router(tmp: Path, certs: Path, *extra: str):
    """dsv2-router on the tiny model with TLS and --auth-token-file; returns (proc, grpc addr,
    http addr, metrics addr)."""
    (tmp / "tokens").write_text(f"# clients\n{TOKEN}\n")
    metrics = f"127.0.0.1:{free_port()}"
    cmd = [str(BIN_DIR / "dsv2-router"), "--model-dir", "tiny", "--listen", "127.0.0.1:0",
           "--http-listen", "127.0.0.1:0", "--metrics-listen", metrics,
           "--tls-cert", str(certs / "server.crt"), "--tls-key", str(certs / "server.key"),
           "--auth-token-file", str(tmp / "tokens"), *extra]
    env = dict(os.environ, DSV2_CACHE_DIR=str(tmp / "cache"), DSV2_LOG="warn")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True, env=env)
    lines, log = queue.Queue(), []

    def drain(stream, tag):
        for line in stream:
            log.append(line)
            lines.put((tag, line))

    for stream, tag in [(proc.stdout, "out"), (proc.stderr, "err")]:
        threading.Thread(target=drain, args=(stream, tag), daemon=True).start()
    grpc_addr = http_addr = None
    try:
        while grpc_addr is None:
            tag, line = lines.get(timeout=180)
            if tag == "out" and line.startswith("DSV2_HTTP_READY "):
                http_addr = line.split()[1]
            elif tag == "out" and line.startswith("DSV2_READY "):
                grpc_addr = line.split()[1]
    except queue.Empty:
        proc.kill()
        pytest.fail("dsv2-router was not ready in 180 s:\n" + "".join(log[-40:]))
    return proc, grpc_addr, http_addr, metrics


def stop(proc):
    proc.kill()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def router(tmp, certs):
    proc, grpc_addr, http_addr, metrics = start_router(tmp, certs)
    yield grpc_addr, http_addr, metrics
    stop(proc)


def channel(addr: str, ca: Path | None, cert: tuple[Path, Path] | None = None):
    creds = grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes() if ca else None,
        private_key=cert[1].read_bytes() if cert else None,
        certificate_chain=cert[0].read_bytes() if cert else None,
    )
    return grpc.secure_channel(addr, creds)


def health(ch) -> bytes:
    """grpc.health.v1.Health/Check for the server as a whole; the request is the empty message."""
    check = ch.unary_unary("/grpc.health.v1.Health/Check",
                           request_serializer=lambda b: b, response_deserializer=lambda b: b)
    return check(b"", timeout=10)


SERVING = b"\x08\x01"  # HealthCheckResponse{status: SERVING}


def engine_steps(metrics: str) -> float:
    text = urllib.request.urlopen(f"http://{metrics}/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith("dsv2_router_engine_steps_total "):
            return float(line.split()[1])
    pytest.fail(f"no dsv2_router_engine_steps_total in /metrics:\n{text}")


def test_a_client_without_the_ca_fails_and_with_it_succeeds(router, certs):
    with channel(router[0], None) as ch, pytest.raises(grpc.RpcError) as e:
        health(ch)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    with channel(router[0], certs / "other-ca.crt") as ch, pytest.raises(grpc.RpcError) as e:
        health(ch)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    with channel(router[0], certs / "ca.crt") as ch:
        assert health(ch) == SERVING, "health is open without a token"


def test_no_or_wrong_token_is_unauthenticated_and_runs_no_engine_step(router, certs, pb):
    inference_pb2, inference_pb2_grpc = pb
    req = inference_pb2.GenerateRequest(text="The router receives a request", max_new_tokens=4,
                                        temperature=0)
    before = engine_steps(router[2])
    with channel(router[0], certs / "ca.crt") as ch:
        stub = inference_pb2_grpc.InferenceStub(ch)
        for md in [None, [("authorization", "Bearer wrong")], [("authorization", TOKEN)]]:
            with pytest.raises(grpc.RpcError) as e:
                stub.Generate(req, metadata=md, timeout=30)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, md
            with pytest.raises(grpc.RpcError) as e:
                list(stub.GenerateStream(req, metadata=md, timeout=30))
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, md
        assert engine_steps(router[2]) == before, "a refused call ran engine steps"
        resp = stub.Generate(req, metadata=[("authorization", f"Bearer {TOKEN}")], timeout=60)
        assert len(resp.token_ids) > 0
    assert engine_steps(router[2]) > before


def https(url: str, ca: Path, token: str | None):
    ctx = ssl.create_default_context(cafile=str(ca))
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=30) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def test_the_http_api_needs_the_token_on_v1_and_keeps_health_open(router, certs):
    base = f"https://{router[1]}"
    for token in (None, "wrong"):
        status, body = https(f"{base}/v1/models", certs / "ca.crt", token)
        assert status == 401, (token, body)
        assert body["error"]["type"] == "authentication_error" and body["error"]["message"]
    status, body = https(f"{base}/v1/models", certs / "ca.crt", TOKEN)
    assert status == 200 and body["data"], body
    assert https(f"{base}/health", certs / "ca.crt", None)[0] == 200
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{base}/health", context=ssl.create_default_context(), timeout=30)


def test_mtls_refuses_a_client_without_a_certificate(tmp, certs):
    d = tmp / "mtls"
    d.mkdir()
    proc, addr, _, _ = start_router(d, certs, "--tls-client-ca", str(certs / "ca.crt"))
    try:
        with channel(addr, certs / "ca.crt") as ch, pytest.raises(grpc.RpcError) as e:
            health(ch)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        client = (certs / "client.crt", certs / "client.key")
        with channel(addr, certs / "ca.crt", client) as ch:
            assert health(ch) == SERVING
    finally:
        stop(proc)
