//! `dsv2 up`, the README's "run the main job" command: on a fresh cache dir (no download, no
//! GPU) it starts a router and 2 expert shards on the embedded tiny model, answers `--prompt`
//! exactly as the in-process `dsv2 generate` does, serves `dsv2 generate --endpoint` until
//! Ctrl-C, and stops every child on Ctrl-C.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dsv2_e2e::{READY_TIMEOUT, bin};

/// `dsv2 ARGS` with its tiny-model cache in `cache`; panics unless it succeeds; returns stdout.
fn dsv2_ok(cache: &Path, args: &[&str]) -> String {
    let out = Command::new(bin("dsv2"))
        .args(args)
        .env("DSV2_CACHE_DIR", cache)
        .output()
        .expect("running dsv2");
    assert!(
        out.status.success(),
        "dsv2 {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("stdout is UTF-8")
}

#[test]
fn up_with_a_prompt_answers_like_in_process_generate_and_exits() {
    let cache = tempfile::tempdir().expect("temp cache dir");
    let prompt = "The router receives a request";
    let up = dsv2_ok(
        cache.path(),
        &[
            "up",
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "off",
            "--prompt",
            prompt,
            "--max-output-len",
            "12",
            "--temperature",
            "0.7",
            "--top-p",
            "0.9",
            "--seed",
            "5",
        ],
    );
    let (endpoint, answer) = up.split_once('\n').expect("endpoint line, then the answer");
    assert!(endpoint.starts_with("http://127.0.0.1:"), "{up:?}");
    let want = dsv2_ok(
        cache.path(),
        &[
            "generate",
            "--input-text",
            prompt,
            "--max-output-len",
            "12",
            "--temperature",
            "0.7",
            "--top-p",
            "0.9",
            "--seed",
            "5",
        ],
    );
    assert!(!want.trim().is_empty(), "in-process answer is empty");
    assert_eq!(answer, want, "dsv2 up --prompt differs from in-process");
}

fn refuses_connections(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_err()
}

#[test]
fn up_serves_endpoint_generate_and_ctrl_c_stops_every_child() {
    let cache = tempfile::tempdir().expect("temp cache dir");
    let mut up = Command::new(bin("dsv2"))
        .args([
            "up",
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .env("DSV2_CACHE_DIR", cache.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting dsv2 up");
    // Shard addresses from `expert shard I ready at ADDR` on stderr (children log there too, so
    // keep draining it).
    let stderr = up.stderr.take().expect("piped stderr");
    let (shard_tx, shard_rx) = std::sync::mpsc::channel();
    let (http_tx, http_rx) = std::sync::mpsc::channel();
    let (metrics_tx, metrics_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            // `metrics: router http://A/metrics, expert-0 http://B/metrics, ...`
            if let Some(list) = line.strip_prefix("metrics: ") {
                let _ = metrics_tx.send(list.to_string());
            }
            if let Some((_, addr)) = line.split_once(" ready at ") {
                let _ = shard_tx.send(addr.trim().to_string());
            }
            // `cluster up ...: router http://A (gRPC ...), http://B/v1 (HTTP, OpenAI-compatible)`
            if let Some(end) = line.find("/v1 (HTTP")
                && let Some(start) = line[..end].rfind("http://")
            {
                let _ = http_tx.send(line[start + "http://".len()..end].to_string());
            }
        }
    });
    let stdout = up.stdout.take().expect("piped stdout");
    let (ep_tx, ep_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = ep_tx.send(line);
        }
    });
    let endpoint = match ep_rx.recv_timeout(READY_TIMEOUT) {
        Ok(l) => l,
        Err(e) => {
            let _ = up.kill();
            panic!("dsv2 up printed no endpoint: {e}");
        }
    };
    let mut addrs: Vec<SocketAddr> = shard_rx
        .try_iter()
        .map(|a| a.parse().expect("a shard address"))
        .collect();
    assert_eq!(addrs.len(), 2, "two expert shards by default: {addrs:?}");
    // The HTTP API is on too, announced next to the gRPC endpoint.
    let http: SocketAddr = http_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("dsv2 up announced no HTTP address")
        .parse()
        .expect("the HTTP address");
    let mut s = TcpStream::connect_timeout(&http, Duration::from_secs(5)).expect("connecting");
    s.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .expect("sending");
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("reading");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    addrs.push(http);
    // Every child serves /metrics (on free ports by default), announced on one line.
    let list = metrics_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("dsv2 up announced no metrics addresses");
    let targets: Vec<(&str, SocketAddr)> = list
        .split(", ")
        .map(|t| {
            let (name, url) = t.split_once(' ').expect("NAME URL");
            let a = url
                .trim_start_matches("http://")
                .trim_end_matches("/metrics")
                .parse()
                .expect("a metrics address");
            (name, a)
        })
        .collect();
    let names: Vec<&str> = targets.iter().map(|t| t.0).collect();
    assert_eq!(names, ["router", "expert-0", "expert-1"], "{list}");
    for (name, a) in &targets {
        let mut s = TcpStream::connect_timeout(a, Duration::from_secs(5)).expect("connecting");
        s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .expect("sending");
        let mut text = String::new();
        s.read_to_string(&mut text).expect("reading");
        assert!(text.starts_with("HTTP/1.1 200"), "{name}: {text}");
        let want = if *name == "router" {
            "dsv2_router_"
        } else {
            "dsv2_expert_"
        };
        assert!(text.contains(want), "{name}: {text}");
        addrs.push(*a);
    }
    addrs.push(
        endpoint
            .trim_start_matches("http://")
            .parse()
            .expect("the router address"),
    );

    let args = ["--input-text", "Hello", "--max-output-len", "10", "--json"];
    let remote: serde_json::Value = serde_json::from_str(&dsv2_ok(
        cache.path(),
        &[&["generate", "--endpoint", &endpoint][..], &args].concat(),
    ))
    .expect("--json output");
    let local: serde_json::Value =
        serde_json::from_str(&dsv2_ok(cache.path(), &[&["generate"][..], &args].concat()))
            .expect("--json output");
    // the same JSON fields both ways (the prompt's ids too: the router tokenizes a text prompt)
    for key in [
        "input_ids",
        "prompt_tokens",
        "output_ids",
        "text",
        "finish_reason",
    ] {
        assert_eq!(
            remote[key], local[key],
            "{key}: through dsv2 up vs in-process"
        );
    }
    assert_eq!(remote["output_ids"].as_array().map(Vec::len), Some(10));

    // Ctrl-C (SIGINT to dsv2 up): it exits and takes the router and both shards with it.
    let st = Command::new("kill")
        .args(["-INT", &up.id().to_string()])
        .status()
        .expect("running kill -INT");
    assert!(st.success());
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = up.try_wait().expect("waiting for dsv2 up") {
            break s;
        }
        if t0.elapsed() > Duration::from_secs(20) {
            let _ = up.kill();
            panic!("dsv2 up did not exit within 20 s of Ctrl-C");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "dsv2 up after Ctrl-C: {status}");
    for a in addrs {
        assert!(
            refuses_connections(a),
            "{a} still accepts connections after dsv2 up stopped"
        );
    }
}
