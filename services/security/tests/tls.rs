//! TLS and mutual TLS end to end over loopback: a tonic health server behind `Incoming` with a
//! `ServerTls`, dialed by the crate's client endpoints. Certificates come from rcgen at test time.

use std::path::{Path, PathBuf};
use std::time::Duration;

use dsv2_security::args::{ServerTlsArgs, ShardClientArgs};
use dsv2_security::auth::{RequireBearerLayer, Tokens};
use dsv2_security::client::{Dialer, client_endpoint};
use dsv2_security::server::{ALPN_GRPC, Incoming, ServerTls};
use dsv2_security::testing::TestCa;
use tonic::service::LayerExt;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// Serves grpc.health.v1 (behind the token layer when `tokens` is given); returns the https URL.
async fn serve(args: &ServerTlsArgs, tokens: Option<Tokens>) -> String {
    let tls = ServerTls::from_args(args, ALPN_GRPC)
        .expect("valid TLS files")
        .expect("TLS configured");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let incoming = Incoming::new(listener, Some(tls)).expect("incoming");
    let url = format!("https://127.0.0.1:{}", incoming.local_addr().port());
    let (_reporter, health) = tonic_health::server::health_reporter();
    let svc = tower::ServiceBuilder::new()
        .layer(RequireBearerLayer(tokens))
        .named_layer(health);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(incoming),
    );
    url
}

/// One health check through `ep`: Ok when the server answered SERVING.
async fn check(ep: tonic::transport::Endpoint, bearer: Option<Dialer>) -> Result<(), String> {
    let ch = tokio::time::timeout(
        Duration::from_secs(5),
        ep.connect_timeout(Duration::from_secs(5)).connect(),
    )
    .await
    .map_err(|_| "connect timed out".to_string())?
    .map_err(|e| format!("connect: {e:?}"))?;
    let d = bearer.unwrap_or_default();
    let mut c = HealthClient::with_interceptor(ch, d.bearer());
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        c.check(HealthCheckRequest {
            service: String::new(),
        }),
    )
    .await
    .map_err(|_| "check timed out".to_string())?
    .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
    assert_eq!(r.into_inner().status, 1, "SERVING");
    Ok(())
}

fn server_args(dir: &Path, ca: &TestCa, client_ca: Option<PathBuf>) -> ServerTlsArgs {
    let leaf = ca.write_leaf(dir, "server").expect("server cert");
    ServerTlsArgs {
        tls_cert: Some(leaf.cert),
        tls_key: Some(leaf.key),
        tls_client_ca: client_ca,
    }
}

#[tokio::test]
async fn a_client_without_the_ca_fails_and_one_with_it_succeeds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new("server ca").expect("ca");
    let ca_file = ca.write(&dir.path().join("ca.crt")).expect("write ca");
    let url = serve(&server_args(dir.path(), &ca, None), None).await;

    let without = check(client_endpoint(&url, None).expect("endpoint"), None).await;
    assert!(without.is_err(), "a client without the CA must fail");
    let other = TestCa::new("someone else").expect("ca");
    let other_file = other.write(&dir.path().join("other.crt")).expect("write");
    let wrong = check(client_endpoint(&url, Some(&other_file)).expect("ep"), None).await;
    assert!(wrong.is_err(), "a client trusting another CA must fail");
    check(client_endpoint(&url, Some(&ca_file)).expect("ep"), None)
        .await
        .expect("a client with the CA succeeds");
}

#[tokio::test]
async fn mtls_refuses_a_client_without_a_certificate_and_takes_one_signed_by_the_client_ca() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new("ca").expect("ca");
    let ca_file = ca.write(&dir.path().join("ca.crt")).expect("write ca");
    let clients = TestCa::new("client ca").expect("ca");
    let clients_file = clients.write(&dir.path().join("clients.crt")).expect("w");
    let url = serve(
        &server_args(dir.path(), &ca, Some(clients_file.clone())),
        None,
    )
    .await;

    let dial = |cert: Option<(PathBuf, PathBuf)>| {
        Dialer::from_args(&ShardClientArgs {
            shard_ca: Some(ca_file.clone()),
            shard_client_cert: cert.as_ref().map(|c| c.0.clone()),
            shard_client_key: cert.map(|c| c.1),
            shard_token: None,
        })
        .expect("dialer")
    };
    let no_cert = dial(None);
    let r = check(no_cert.endpoint(&url).expect("ep"), None).await;
    assert!(
        r.is_err(),
        "mTLS must refuse a client without a certificate"
    );

    let stranger_ca = TestCa::new("stranger").expect("ca");
    let stranger = stranger_ca.write_leaf(dir.path(), "stranger").expect("w");
    let d = dial(Some((stranger.cert, stranger.key)));
    let r = check(d.endpoint(&url).expect("ep"), None).await;
    assert!(r.is_err(), "mTLS must refuse a certificate of another CA");

    let router = clients.write_leaf(dir.path(), "router").expect("w");
    let d = dial(Some((router.cert, router.key)));
    check(d.endpoint(&url).expect("ep"), None)
        .await
        .expect("a client certificate of the client CA is accepted");
}

/// Replaces `path` the way Kubernetes updates a Secret volume: a new file renamed over it.
fn swap(path: &Path, contents: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, contents).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

#[tokio::test]
async fn a_rotated_certificate_is_served_without_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let old_ca = TestCa::new("old ca").expect("ca");
    let old_ca_file = old_ca.write(&dir.path().join("old.crt")).expect("w");
    let new_ca = TestCa::new("new ca").expect("ca");
    let new_ca_file = new_ca.write(&dir.path().join("new.crt")).expect("w");
    let args = server_args(dir.path(), &old_ca, None);
    let url = serve(&args, None).await;
    let ep = |ca: &Path| client_endpoint(&url, Some(ca)).expect("endpoint");
    check(ep(&old_ca_file), None).await.expect("old cert");
    assert!(check(ep(&new_ca_file), None).await.is_err());

    let (cert, key) = new_ca.leaf("server").expect("leaf");
    swap(args.tls_key.as_deref().expect("key"), &key);
    swap(args.tls_cert.as_deref().expect("cert"), &cert);
    check(ep(&new_ca_file), None)
        .await
        .expect("the rotated certificate is served to new connections");
    assert!(
        check(ep(&old_ca_file), None).await.is_err(),
        "the old certificate is no longer served"
    );

    // A half-written rotation (a key that is not PEM) keeps the last good certificate.
    swap(args.tls_key.as_deref().expect("key"), "not a key");
    check(ep(&new_ca_file), None)
        .await
        .expect("the last good certificate stays");
}

#[tokio::test]
async fn bearer_tokens_over_tls_and_a_token_file_re_read_on_change() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new("ca").expect("ca");
    let ca_file = ca.write(&dir.path().join("ca.crt")).expect("w");
    let tokens_file = dir.path().join("tokens");
    std::fs::write(&tokens_file, "# shard tokens\nfirst\n\n  second  \n").expect("w");
    let tokens = Tokens::from_file("--shard-token-file", tokens_file.clone()).expect("tokens");
    let url = serve(&server_args(dir.path(), &ca, None), Some(tokens)).await;
    let with = |token: Option<&str>| {
        Dialer::from_args(&ShardClientArgs {
            shard_ca: Some(ca_file.clone()),
            shard_token: token.map(String::from),
            ..Default::default()
        })
        .expect("dialer")
    };
    let call = |d: Dialer| {
        let url = url.clone();
        async move { check(d.endpoint(&url).expect("ep"), Some(d)).await }
    };
    for (token, ok) in [
        (None, false),
        (Some("wrong"), false),
        (Some("first"), true),
        (Some("second"), true),
    ] {
        let r = call(with(token)).await;
        match ok {
            true => r.expect("an accepted token"),
            false => assert!(
                r.as_ref().is_err_and(|e| e.starts_with("Unauthenticated")),
                "{token:?}: {r:?}"
            ),
        }
    }
    swap(&tokens_file, "third\n");
    assert!(call(with(Some("first"))).await.is_err(), "a removed token");
    call(with(Some("third"))).await.expect("an added token");
}

#[test]
fn a_missing_or_bad_file_is_an_error_naming_its_flag() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new("ca").expect("ca");
    let good = ca.write_leaf(dir.path(), "server").expect("w");
    let missing = dir.path().join("missing.pem");
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "hello").expect("w");
    let err = |a: ServerTlsArgs| match ServerTls::from_args(&a, ALPN_GRPC) {
        Ok(_) => panic!("{a:?} must be refused"),
        Err(e) => e.to_string(),
    };
    let e = err(ServerTlsArgs {
        tls_cert: Some(missing.clone()),
        tls_key: Some(good.key.clone()),
        tls_client_ca: None,
    });
    assert!(
        e.starts_with("--tls-cert ") && e.contains("missing.pem"),
        "{e}"
    );
    let e = err(ServerTlsArgs {
        tls_cert: Some(good.cert.clone()),
        tls_key: Some(garbage.clone()),
        tls_client_ca: None,
    });
    assert!(e.starts_with("--tls-key "), "{e}");
    let e = err(ServerTlsArgs {
        tls_cert: Some(good.cert.clone()),
        tls_key: Some(good.key.clone()),
        tls_client_ca: Some(garbage.clone()),
    });
    assert!(e.starts_with("--tls-client-ca "), "{e}");
    // A key that is not the certificate's.
    let other = ca.write_leaf(dir.path(), "other").expect("w");
    let e = err(ServerTlsArgs {
        tls_cert: Some(good.cert.clone()),
        tls_key: Some(other.key),
        tls_client_ca: None,
    });
    assert!(e.starts_with("--tls-key "), "{e}");
    for (a, flag) in [
        (
            ShardClientArgs {
                shard_ca: Some(missing.clone()),
                ..Default::default()
            },
            "--shard-ca ",
        ),
        (
            ShardClientArgs {
                shard_client_cert: Some(garbage.clone()),
                shard_client_key: Some(good.key.clone()),
                ..Default::default()
            },
            "--shard-client-cert ",
        ),
    ] {
        let e = Dialer::from_args(&a).err().expect("refused").to_string();
        assert!(e.starts_with(flag), "{e}");
    }
    let e = Tokens::from_file("--auth-token-file", missing)
        .err()
        .expect("refused");
    assert!(e.to_string().starts_with("--auth-token-file "), "{e}");
    std::fs::write(&garbage, "\n# nothing\n").expect("w");
    let e = Tokens::from_file("--auth-token-file", garbage)
        .err()
        .expect("refused");
    assert!(e.to_string().contains("no token"), "{e}");
}
