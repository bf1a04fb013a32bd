//! The `dsv2 loadtest` command itself (not only the library) against a local tiny cluster
//! (router + 2 expert shards): the shipped ghz sample data (deploy/ghz/data/request.json) is
//! served without errors, and a run where some requests are rejected still adds up. Both the
//! printed ghz-style summary and the ghz JSON report are checked: count = successes + errors,
//! status codes and errors sum to the count, percentiles are ordered and lie within
//! fastest..slowest.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use dsv2_e2e::{Cluster, bin, tiny_model};

fn ghz_data() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/ghz/data/request.json")
}

/// Runs `dsv2 loadtest ARGS --json-out FILE`; panics unless it succeeds; (stdout, JSON report).
fn loadtest(endpoint: &str, args: &[&str], dir: &Path) -> (String, serde_json::Value) {
    let json_out = dir.join("report.json");
    let out = Command::new(bin("dsv2"))
        .args(["loadtest", "--endpoint", endpoint])
        .args(args)
        .arg("--json-out")
        .arg(&json_out)
        .output()
        .expect("running dsv2 loadtest");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "dsv2 loadtest {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = std::fs::read_to_string(&json_out).expect("--json-out was written");
    (
        stdout,
        serde_json::from_str(&report).expect("the report is JSON"),
    )
}

/// ghz's duration text ("9999 ns", "1.50 ms", "2.35 s") back to a Duration.
fn parse_ghz_duration(s: &str) -> Duration {
    let (v, unit) = s.trim().split_once(' ').expect("value and unit");
    let v: f64 = v.parse().expect("a number");
    match unit {
        "ns" => Duration::from_nanos(v as u64),
        "ms" => Duration::from_secs_f64(v / 1e3),
        "s" => Duration::from_secs_f64(v),
        other => panic!("unknown unit {other:?} in {s:?}"),
    }
}

/// The value after `  KEY:\t` in the Summary block.
fn summary_field<'a>(text: &'a str, key: &str) -> &'a str {
    let prefix = format!("  {key}:\t");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {key:?} line in:\n{text}"))
}

/// `[NAME]   N responses` lines of the status code distribution.
fn status_lines(text: &str) -> Vec<(String, u64)> {
    let start = text
        .find("Status code distribution:\n")
        .unwrap_or_else(|| panic!("no status code distribution in:\n{text}"));
    text[start..]
        .lines()
        .skip(1)
        .take_while(|l| l.starts_with("  ["))
        .map(|l| {
            let (name, rest) = l.trim().split_once(']').expect("[name]");
            let n = rest
                .trim()
                .strip_suffix("responses")
                .expect("N responses")
                .trim()
                .parse()
                .expect("a count");
            (name.trim_start_matches('[').to_string(), n)
        })
        .collect()
}

/// Checks that the printed summary and the JSON report agree and add up; returns
/// (count, ok, errors) from the report.
fn check_adds_up(text: &str, j: &serde_json::Value, total: u64) -> (u64, u64, u64) {
    let ns = |v: &serde_json::Value| v.as_u64().expect("nanoseconds");
    let count = j["count"].as_u64().expect("count");
    assert_eq!(count, total, "a bounded run completes every request");
    assert_eq!(summary_field(text, "Count"), count.to_string());
    let ok = j["dsv2"]["okCount"].as_u64().expect("okCount");
    let errors = j["dsv2"]["errorCount"].as_u64().expect("errorCount");
    assert_eq!(count, ok + errors, "count = successes + errors");

    // Status codes: printed and JSON agree, sum to the count, OK = successes.
    let printed = status_lines(text);
    let codes = j["statusCodeDistribution"].as_object().expect("status map");
    assert_eq!(printed.len(), codes.len(), "{text}");
    for (name, n) in &printed {
        assert_eq!(codes[name].as_u64(), Some(*n), "{name} in\n{text}");
    }
    assert_eq!(printed.iter().map(|(_, n)| n).sum::<u64>(), count);
    assert_eq!(codes.get("OK").and_then(|v| v.as_u64()).unwrap_or(0), ok);

    // Errors: their distribution sums to the error count; shown only when there are some.
    let errs: u64 = j["errorDistribution"]
        .as_object()
        .expect("error map")
        .values()
        .map(|v| v.as_u64().expect("n"))
        .sum();
    assert_eq!(errs, errors);
    assert_eq!(text.contains("Error distribution:"), errors > 0, "{text}");
    let details = j["details"].as_array().expect("details");
    assert_eq!(details.len() as u64, count);
    assert_eq!(
        details.iter().filter(|d| d["status"] == "OK").count() as u64,
        ok
    );

    // Latency: percentiles ordered and within fastest..slowest, in the JSON and as printed;
    // the histogram holds every success.
    let fastest = ns(&j["fastest"]);
    let slowest = ns(&j["slowest"]);
    let lat: Vec<u64> = j["latencyDistribution"]
        .as_array()
        .expect("latencyDistribution")
        .iter()
        .map(|p| ns(&p["latency"]))
        .collect();
    let pcts: Vec<u64> = j["latencyDistribution"]
        .as_array()
        .expect("latencyDistribution")
        .iter()
        .map(|p| p["percentage"].as_u64().expect("percentage"))
        .collect();
    assert_eq!(pcts, [10, 25, 50, 75, 90, 95, 99]);
    assert!(lat.windows(2).all(|w| w[0] <= w[1]), "{lat:?}");
    assert!(
        fastest <= lat[0] && lat[6] <= slowest,
        "{fastest} {lat:?} {slowest}"
    );
    let printed_lat: Vec<Duration> = text
        .lines()
        .filter_map(|l| l.trim().split_once(" % in "))
        .map(|(_, d)| parse_ghz_duration(d))
        .collect();
    assert_eq!(printed_lat.len(), 7, "{text}");
    assert!(printed_lat.windows(2).all(|w| w[0] <= w[1]), "{text}");
    let printed_fastest = parse_ghz_duration(summary_field(text, "Fastest"));
    let printed_slowest = parse_ghz_duration(summary_field(text, "Slowest"));
    assert!(printed_fastest <= printed_lat[0] && printed_lat[6] <= printed_slowest);
    let hist: u64 = j["histogram"]
        .as_array()
        .expect("histogram")
        .iter()
        .map(|b| b["count"].as_u64().expect("count"))
        .sum();
    assert_eq!(hist, ok);
    // Requests/sec is count over the wall time.
    let rps = j["rps"].as_f64().expect("rps");
    let wall = ns(&j["total"]) as f64 / 1e9;
    assert!(
        (rps - count as f64 / wall).abs() <= 1e-6 * rps,
        "{rps} vs {count}/{wall}"
    );
    (count, ok, errors)
}

#[test]
fn loadtest_command_against_a_tiny_cluster_adds_up() {
    let c = Cluster::two_shards(&tiny_model(), &[]);
    let endpoint = c.endpoint();
    let dir = tempfile::tempdir().expect("temp dir");

    // The shipped ghz sample data, unary: every request succeeds. Requests 0 and 1 set
    // ignore_eos (32 and 64 tokens); request 2 may stop early at "\n\n" (at most 16).
    let data = ghz_data();
    let (text, j) = loadtest(
        &endpoint,
        &[
            "--call",
            "generate",
            "--concurrency",
            "3",
            "--total",
            "6",
            "--timeout",
            "120s",
            "--data",
            data.to_str().expect("UTF-8 path"),
        ],
        dir.path(),
    );
    let (_, ok, errors) = check_adds_up(&text, &j, 6);
    assert_eq!((ok, errors), (6, 0), "{text}");
    let tokens = j["dsv2"]["completionTokens"].as_u64().expect("tokens");
    assert!(
        (2 * (32 + 64) + 2..=2 * (32 + 64 + 16)).contains(&tokens),
        "{tokens} tokens\n{text}"
    );
    assert!(
        text.contains(&format!("  Generated:\t{tokens} tokens")),
        "{text}"
    );
    assert_eq!(j["options"]["call"], "dsv2.v1.Inference/Generate");
    assert_eq!(j["endReason"], "normal");
    assert!(
        text.contains("Time to first token (server-reported, 6 samples):"),
        "{text}"
    );

    // Streamed, one good request and one the server rejects (token id 5000 is outside the
    // tiny model's 1024-token vocabulary): half the requests fail, and the summary still adds up.
    let mixed = dir.path().join("mixed.json");
    std::fs::write(
        &mixed,
        r#"[{"text": "The router receives a request", "max_new_tokens": 5, "ignore_eos": true},
            {"token_ids": {"ids": [0, 5000]}, "max_new_tokens": 5}]"#,
    )
    .expect("writing the data file");
    let (text, j) = loadtest(
        &endpoint,
        &[
            "--call",
            "stream",
            "-c",
            "2",
            "-n",
            "8",
            "--data",
            mixed.to_str().expect("UTF-8 path"),
        ],
        dir.path(),
    );
    let (_, ok, errors) = check_adds_up(&text, &j, 8);
    assert_eq!((ok, errors), (4, 4), "{text}");
    assert_eq!(j["statusCodeDistribution"]["InvalidArgument"], 4, "{text}");
    assert_eq!(j["dsv2"]["completionTokens"], 4 * 5, "{text}");
    assert!(
        text.contains("Error distribution:\n  [4]   rpc error: code = InvalidArgument"),
        "{text}"
    );
    assert_eq!(j["options"]["call"], "dsv2.v1.Inference/GenerateStream");
    assert!(
        text.contains("Time to first token (client-measured, 4 samples):"),
        "{text}"
    );
}
