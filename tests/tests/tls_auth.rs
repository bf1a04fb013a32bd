//! TLS, mTLS and token auth across processes: a router serving TLS with --auth-token-file, and an
//! expert shard that takes only the router (mTLS plus a shard token) over an https:// URL.
//! Certificates come from rcgen at test time.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use dsv2_e2e::{Proc, bin, ids_request, tiny_model};
use dsv2_proto::expert::v1::InfoRequest;
use dsv2_proto::expert::v1::expert_shard_client::ExpertShardClient;
use dsv2_proto::inference::v1::inference_client::InferenceClient;
use dsv2_security::args::{ClientArgs, ShardClientArgs};
use dsv2_security::client::Dialer;
use dsv2_security::testing::TestCa;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

fn metric(addr: &str, series: &str) -> f64 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connecting to /metrics");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("sending GET /metrics");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("reading /metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in /metrics:\n{text}"))
}

fn p(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 temp path")
}

fn client_args(ca: Option<&Path>, token: Option<&str>) -> ClientArgs {
    ClientArgs {
        token: token.map(String::from),
        ca: ca.map(Path::to_path_buf),
    }
}

/// Generate through `url` with `args`: Ok(tokens) or the status code.
async fn generate(url: &str, args: &ClientArgs) -> Result<usize, Code> {
    let ch = args
        .endpoint(url)
        .expect("endpoint")
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|_| Code::Unavailable)?;
    let mut c = InferenceClient::with_interceptor(ch, args.bearer().expect("token"));
    c.generate(ids_request(&[1, 2, 3], 4))
        .await
        .map(|r| r.into_inner().token_ids.len())
        .map_err(|s| s.code())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_mtls_and_tokens_from_client_to_router_to_shard() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let ca = TestCa::new("dsv2 test ca").expect("ca");
    let ca_file = ca.write(&d.join("ca.crt")).expect("write");
    let server = ca.write_leaf(d, "server").expect("server cert");
    let router_client = ca.write_leaf(d, "router-client").expect("client cert");
    std::fs::write(d.join("tokens"), "user-token\n").expect("w");
    std::fs::write(d.join("shard-tokens"), "shard-token\n").expect("w");
    let model = tiny_model();

    let mut cmd = Command::new(bin("dsv2-expert"));
    cmd.arg("--model-dir").arg(&model).args([
        "--shard-index",
        "0",
        "--num-shards",
        "1",
        "--listen",
        "127.0.0.1:0",
        "--tls-cert",
        p(&server.cert),
        "--tls-key",
        p(&server.key),
        "--tls-client-ca",
        p(&ca_file),
        "--shard-token-file",
        p(&d.join("shard-tokens")),
    ]);
    let shard = Proc::start("expert", cmd);
    let shard_url = format!("https://{}", shard.addr);

    let metrics = format!("127.0.0.1:{}", free_port());
    let mut cmd = Command::new(bin("dsv2-router"));
    cmd.arg("--model-dir").arg(&model).args([
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        &metrics,
        "--shard",
        &shard_url,
        "--tls-cert",
        p(&server.cert),
        "--tls-key",
        p(&server.key),
        "--auth-token-file",
        p(&d.join("tokens")),
        "--shard-ca",
        p(&ca_file),
        "--shard-client-cert",
        p(&router_client.cert),
        "--shard-client-key",
        p(&router_client.key),
    ]);
    // The shard token through its environment variable, as the chart passes it.
    cmd.env("DSV2_SHARD_TOKEN", "shard-token");
    let router = Proc::start("router", cmd);
    let url = format!("https://{}", router.addr);

    // TLS: without the CA the client cannot connect; with it, it can.
    let no_ca = generate(&url, &client_args(None, Some("user-token"))).await;
    assert_eq!(no_ca, Err(Code::Unavailable), "a client without the CA");

    // Auth: refused calls do no engine work.
    let steps = "dsv2_router_engine_steps_total";
    let before = metric(&metrics, steps);
    let with_ca = |t: Option<&str>| client_args(Some(&ca_file), t);
    assert_eq!(
        generate(&url, &with_ca(None)).await,
        Err(Code::Unauthenticated)
    );
    assert_eq!(
        generate(&url, &with_ca(Some("guess"))).await,
        Err(Code::Unauthenticated)
    );
    assert_eq!(
        metric(&metrics, steps),
        before,
        "a refused call ran engine steps"
    );
    let ok = generate(&url, &with_ca(Some("user-token"))).await;
    assert!(matches!(ok, Ok(n) if n > 0), "the right token: {ok:?}");
    assert!(metric(&metrics, steps) > before, "the accepted call ran");

    // The project's CLI: --ca, and the token from DSV2_TOKEN (none: refused).
    let cli = |token: Option<&str>| {
        let mut cmd = Command::new(bin("dsv2"));
        cmd.args(["generate", "--endpoint", &url, "--ca", p(&ca_file)])
            .args(["--input-ids", "1,2,3", "--max-output-len", "4"])
            .env_remove("DSV2_TOKEN");
        if let Some(t) = token {
            cmd.env("DSV2_TOKEN", t);
        }
        cmd.output().expect("running dsv2 generate")
    };
    let out = cli(Some("user-token"));
    assert!(
        out.status.success(),
        "dsv2 generate with the token: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli(None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("Unauthenticated"),
        "{err}"
    );

    // Health stays open: no token.
    let ch = with_ca(None)
        .endpoint(&url)
        .expect("ep")
        .connect()
        .await
        .expect("connect");
    let health = HealthClient::new(ch)
        .check(HealthCheckRequest {
            service: "dsv2.v1.Inference".into(),
        })
        .await
        .expect("health without a token");
    assert_eq!(health.into_inner().status, 1, "SERVING");

    // The shard takes only the router: with our CA but no client certificate it refuses the
    // connection, and with the certificate but no shard token the call.
    let info = |cert: bool, token: Option<&str>| {
        let a = ShardClientArgs {
            shard_ca: Some(ca_file.clone()),
            shard_client_cert: cert.then(|| router_client.cert.clone()),
            shard_client_key: cert.then(|| router_client.key.clone()),
            shard_token: token.map(String::from),
        };
        let url = shard_url.clone();
        async move {
            let d = Dialer::from_args(&a).expect("dialer");
            let ch = d
                .endpoint(&url)
                .expect("ep")
                .connect()
                .await
                .map_err(|_| Code::Unavailable)?;
            ExpertShardClient::with_interceptor(ch, d.bearer())
                .info(InfoRequest {})
                .await
                .map(|_| ())
                .map_err(|s| s.code())
        }
    };
    assert!(info(false, Some("shard-token")).await.is_err(), "no cert");
    assert_eq!(info(true, None).await, Err(Code::Unauthenticated));
    assert_eq!(
        info(true, Some("user-token")).await,
        Err(Code::Unauthenticated)
    );
    assert_eq!(info(true, Some("shard-token")).await, Ok(()));
    drop(router);
}

#[test]
fn a_missing_certificate_stops_the_start_naming_the_flag() {
    let out = Command::new(bin("dsv2-router"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            "/nonexistent/tls.crt",
            "--tls-key",
            "/nonexistent/tls.key",
        ])
        .output()
        .expect("running dsv2-router");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--tls-cert /nonexistent/tls.crt"),
        "stderr: {err}"
    );
}
