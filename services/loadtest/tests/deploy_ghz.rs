//! Keeps deploy/ghz/ honest: each ghz config names a real method of dsv2.v1.Inference, uses
//! server reflection (no proto file), and its request data parses into a GenerateRequest the
//! same way `dsv2 loadtest` parses it; the sample data file parses too.

use std::path::PathBuf;

use dsv2_loadtest::{CallKind, RequestData};
use dsv2_proto::inference::v1::generate_request::Prompt;

fn ghz_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy/ghz")
}

fn read_json(name: &str) -> serde_json::Value {
    let path = ghz_dir().join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn ghz_configs_use_reflection_and_valid_data() {
    for (file, kind) in [
        ("generate.json", CallKind::Generate),
        ("stream.json", CallKind::Stream),
    ] {
        let cfg = read_json(file);
        assert_eq!(cfg["call"], kind.method(), "{file}");
        let parsed: CallKind = cfg["call"]
            .as_str()
            .expect("call")
            .parse()
            .expect("call parses");
        assert_eq!(parsed, kind);
        assert!(
            cfg.get("proto").is_none() && cfg.get("protoset").is_none(),
            "{file}: reflection"
        );
        assert_eq!(cfg["insecure"], true, "{file}");
        assert!(cfg["total"].as_u64().is_some_and(|n| n > 0), "{file}");
        assert!(cfg["concurrency"].as_u64().is_some_and(|n| n > 0), "{file}");
        let data = RequestData::from_json_str(&cfg["data"].to_string())
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        assert!(matches!(data.requests()[0].prompt, Some(Prompt::Text(_))));
    }
}

#[test]
fn sample_request_data_parses() {
    let text = std::fs::read_to_string(ghz_dir().join("data/request.json")).expect("read");
    let data = RequestData::from_json_str(&text).expect("data/request.json parses");
    assert_eq!(data.requests().len(), 3);
    assert_eq!(data.requests()[1].seed, Some(1234));
    // Token ids stay below the embedded tiny model's vocabulary (1024) so the sample works
    // against `dsv2 up` as well as against DeepSeek-V2.
    match &data.requests()[2].prompt {
        Some(Prompt::TokenIds(ids)) => assert!(ids.ids.iter().all(|&t| t < 1024)),
        other => panic!("third request should use token ids, got {other:?}"),
    }
}
