//! Load test options and request data: ghz's `-d` JSON (a `dsv2.v1.GenerateRequest` in
//! protobuf-JSON form, or a list of them used round-robin) parsed into proto messages.

use std::time::Duration;

use dsv2_proto::inference::v1::{GenerateRequest, TokenIds, generate_request::Prompt};
use serde::Deserialize;

use crate::LoadtestError;

/// Which RPC to drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallKind {
    /// `dsv2.v1.Inference/Generate` (unary).
    Generate,
    /// `dsv2.v1.Inference/GenerateStream` (server streaming).
    Stream,
}

impl CallKind {
    /// The fully-qualified method, in the form ghz's `--call` takes.
    pub fn method(self) -> &'static str {
        match self {
            CallKind::Generate => "dsv2.v1.Inference/Generate",
            CallKind::Stream => "dsv2.v1.Inference/GenerateStream",
        }
    }
}

impl std::str::FromStr for CallKind {
    type Err = LoadtestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "generate"
            | "Generate"
            | "dsv2.v1.Inference/Generate"
            | "dsv2.v1.Inference.Generate" => Ok(CallKind::Generate),
            "stream"
            | "GenerateStream"
            | "dsv2.v1.Inference/GenerateStream"
            | "dsv2.v1.Inference.GenerateStream" => Ok(CallKind::Stream),
            other => Err(LoadtestError::InvalidConfig {
                field: "call",
                reason: format!("{other:?}: expected generate or stream"),
            }),
        }
    }
}

/// Everything one load test run needs.
#[derive(Debug, Clone)]
pub struct LoadtestConfig {
    /// Router URL, e.g. `http://127.0.0.1:50051` (plaintext HTTP/2, like ghz `--insecure`).
    pub endpoint: String,
    /// RPC to call.
    pub call: CallKind,
    /// Number of concurrent workers (ghz `-c`); each has at most one request in flight.
    pub concurrency: usize,
    /// Number of requests to send (ghz `-n`). 0 means no count limit (then `duration` must be
    /// set).
    pub total: u64,
    /// Stop starting new requests after this long (ghz `-z`); requests in flight then finish
    /// (ghz `--duration-stop wait`). The run ends at whichever of `total` and `duration` comes
    /// first.
    pub duration: Option<Duration>,
    /// Request messages, used round-robin by request number (ghz `-d` with an array).
    pub data: RequestData,
    /// Deadline of each request (ghz `-t`, default 20 s); sent as grpc-timeout and enforced on
    /// the client too. A request past it counts as `DeadlineExceeded`.
    pub timeout: Duration,
    /// Limit on establishing the connection (ghz `--connect-timeout`, default 10 s).
    pub connect_timeout: Duration,
    /// Optional run name, printed in the summary and the JSON report (ghz `--name`).
    pub name: Option<String>,
    /// Bearer token and CA for a router with --auth-token-file or TLS (https:// endpoints).
    pub security: dsv2_security::args::ClientArgs,
}

impl LoadtestConfig {
    /// A configuration with ghz's defaults: 50 workers, 200 requests, 20 s timeout, 10 s
    /// connect timeout, no duration limit.
    pub fn new(endpoint: impl Into<String>, call: CallKind, data: RequestData) -> Self {
        LoadtestConfig {
            endpoint: endpoint.into(),
            call,
            concurrency: 50,
            total: 200,
            duration: None,
            data,
            timeout: Duration::from_secs(20),
            connect_timeout: Duration::from_secs(10),
            name: None,
            security: Default::default(),
        }
    }

    /// Rejects values that cannot describe a bounded run.
    pub fn validate(&self) -> Result<(), LoadtestError> {
        let invalid = |field, reason: &str| {
            Err(LoadtestError::InvalidConfig {
                field,
                reason: reason.to_string(),
            })
        };
        if self.concurrency == 0 {
            return invalid("concurrency", "must be at least 1");
        }
        if self.total == 0 && self.duration.is_none() {
            return invalid("total", "must be at least 1 unless a duration is given");
        }
        if self.duration.is_some_and(|d| d.is_zero()) {
            return invalid("duration", "must be positive");
        }
        if self.timeout.is_zero() {
            return invalid("timeout", "must be positive");
        }
        if self.connect_timeout.is_zero() {
            return invalid("connect_timeout", "must be positive");
        }
        Ok(())
    }
}

/// One or more `GenerateRequest`s, plus the JSON they came from (echoed in the JSON report's
/// `options.data`, as ghz does).
#[derive(Debug, Clone)]
pub struct RequestData {
    requests: Vec<GenerateRequest>,
    json: serde_json::Value,
}

impl RequestData {
    /// Parses ghz `-d` data: one JSON object, or a non-empty array of objects.
    pub fn from_json_str(text: &str) -> Result<Self, LoadtestError> {
        let json: serde_json::Value =
            serde_json::from_str(text).map_err(|e| LoadtestError::Data(e.to_string()))?;
        let objects: Vec<serde_json::Value> = match &json {
            serde_json::Value::Array(items) if items.is_empty() => {
                return Err(LoadtestError::Data("the data array is empty".into()));
            }
            serde_json::Value::Array(items) => items.clone(),
            serde_json::Value::Object(_) => vec![json.clone()],
            _ => {
                return Err(LoadtestError::Data(
                    "expected a JSON object or an array of objects".into(),
                ));
            }
        };
        let requests = objects
            .into_iter()
            .enumerate()
            .map(|(i, obj)| {
                let parsed: GenerateRequestJson = serde_json::from_value(obj)
                    .map_err(|e| LoadtestError::Data(format!("request {i}: {e}")))?;
                parsed
                    .into_proto()
                    .map_err(|e| LoadtestError::Data(format!("request {i}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(RequestData { requests, json })
    }

    /// Reads and parses a ghz data file (`-D` / `data-file`).
    pub fn from_file(path: &std::path::Path) -> Result<Self, LoadtestError> {
        let text = std::fs::read_to_string(path).map_err(|source| LoadtestError::DataIo {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_json_str(&text)
    }

    /// A single request (for callers that build the proto message themselves).
    pub fn from_request(request: GenerateRequest) -> Self {
        RequestData {
            json: request_to_json(&request),
            requests: vec![request],
        }
    }

    /// The parsed messages, in file order (never empty).
    pub fn requests(&self) -> &[GenerateRequest] {
        &self.requests
    }

    /// The data as JSON, for the report.
    pub fn json(&self) -> &serde_json::Value {
        &self.json
    }

    /// The message for request number `n` (round-robin).
    pub(crate) fn for_request(&self, n: u64) -> GenerateRequest {
        // `requests` is never empty: both constructors guarantee at least one.
        let i = (n % self.requests.len() as u64) as usize;
        self.requests[i].clone()
    }
}

/// `dsv2.v1.GenerateRequest` in protobuf-JSON form. Field names are accepted in both spellings
/// protobuf-JSON parsers accept (`max_new_tokens` and `maxNewTokens`), so one data file works
/// with ghz and with this tool; unknown fields are rejected, as ghz rejects them.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GenerateRequestJson {
    #[serde(default)]
    text: Option<String>,
    #[serde(default, alias = "tokenIds")]
    token_ids: Option<TokenIdsJson>,
    #[serde(default, alias = "maxNewTokens")]
    max_new_tokens: Option<u32>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default, alias = "topK")]
    top_k: Option<u32>,
    #[serde(default, alias = "topP")]
    top_p: Option<f32>,
    #[serde(default)]
    seed: Option<U64Json>,
    #[serde(default)]
    stop: Vec<String>,
    #[serde(default, alias = "stopTokenIds")]
    stop_token_ids: Vec<u32>,
    #[serde(default)]
    logprobs: Option<u32>,
    #[serde(default, alias = "promptLogprobs")]
    prompt_logprobs: Option<u32>,
    #[serde(default, alias = "ignoreEos")]
    ignore_eos: bool,
    #[serde(default, alias = "promptLogprobsSkipTokens")]
    prompt_logprobs_skip_tokens: u32,
}

/// `dsv2.v1.TokenIds` in protobuf-JSON form: `{"ids": [...]}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenIdsJson {
    #[serde(default)]
    ids: Vec<u32>,
}

/// protobuf-JSON writes 64-bit integers as strings and accepts numbers too.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum U64Json {
    Number(u64),
    Text(String),
}

impl GenerateRequestJson {
    fn into_proto(self) -> Result<GenerateRequest, String> {
        let prompt = match (self.text, self.token_ids) {
            (Some(_), Some(_)) => {
                return Err("set either text or token_ids (a oneof), not both".into());
            }
            (Some(text), None) => Prompt::Text(text),
            (None, Some(ids)) => Prompt::TokenIds(TokenIds { ids: ids.ids }),
            (None, None) => return Err("the prompt is missing: set text or token_ids".into()),
        };
        let seed = match self.seed {
            None => None,
            Some(U64Json::Number(n)) => Some(n),
            Some(U64Json::Text(s)) => Some(
                s.parse::<u64>()
                    .map_err(|e| format!("seed {s:?} is not a u64: {e}"))?,
            ),
        };
        Ok(GenerateRequest {
            prompt: Some(prompt),
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            top_k: self.top_k.unwrap_or(0),
            top_p: self.top_p,
            seed,
            stop: self.stop,
            stop_token_ids: self.stop_token_ids,
            logprobs: self.logprobs,
            prompt_logprobs: self.prompt_logprobs,
            ignore_eos: self.ignore_eos,
            prompt_logprobs_skip_tokens: self.prompt_logprobs_skip_tokens,
        })
    }
}

/// The protobuf-JSON form of a request (snake_case names, set fields only), for the report.
fn request_to_json(r: &GenerateRequest) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    match &r.prompt {
        Some(Prompt::Text(t)) => {
            m.insert("text".into(), t.clone().into());
        }
        Some(Prompt::TokenIds(ids)) => {
            m.insert("token_ids".into(), serde_json::json!({ "ids": ids.ids }));
        }
        Some(Prompt::Messages(c)) => {
            let msgs: Vec<_> = c
                .messages
                .iter()
                .map(|m| serde_json::json!({ "role": m.role, "content": m.content }))
                .collect();
            let mut v = serde_json::json!({ "messages": msgs });
            if let Some(g) = c.add_generation_prompt {
                v["add_generation_prompt"] = g.into();
            }
            m.insert("messages".into(), v);
        }
        None => {}
    }
    if let Some(v) = r.max_new_tokens {
        m.insert("max_new_tokens".into(), v.into());
    }
    if let Some(v) = r.temperature {
        m.insert("temperature".into(), v.into());
    }
    if r.top_k != 0 {
        m.insert("top_k".into(), r.top_k.into());
    }
    if let Some(v) = r.top_p {
        m.insert("top_p".into(), v.into());
    }
    if let Some(v) = r.seed {
        m.insert("seed".into(), v.to_string().into());
    }
    if !r.stop.is_empty() {
        m.insert("stop".into(), r.stop.clone().into());
    }
    if !r.stop_token_ids.is_empty() {
        m.insert("stop_token_ids".into(), r.stop_token_ids.clone().into());
    }
    if let Some(v) = r.logprobs {
        m.insert("logprobs".into(), v.into());
    }
    if let Some(v) = r.prompt_logprobs {
        m.insert("prompt_logprobs".into(), v.into());
    }
    if r.ignore_eos {
        m.insert("ignore_eos".into(), true.into());
    }
    if r.prompt_logprobs_skip_tokens != 0 {
        m.insert(
            "prompt_logprobs_skip_tokens".into(),
            r.prompt_logprobs_skip_tokens.into(),
        );
    }
    serde_json::Value::Object(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_snake_and_camel_case() {
        let a = RequestData::from_json_str(
            r#"{"text": "hi", "max_new_tokens": 8, "temperature": 0, "top_k": 5,
                "top_p": 0.9, "seed": "42", "stop": ["\n"], "stop_token_ids": [2],
                "logprobs": 3, "prompt_logprobs": 0, "ignore_eos": true}"#,
        )
        .expect("snake_case");
        let b = RequestData::from_json_str(
            r#"{"text": "hi", "maxNewTokens": 8, "temperature": 0, "topK": 5,
                "topP": 0.9, "seed": 42, "stop": ["\n"], "stopTokenIds": [2],
                "logprobs": 3, "promptLogprobs": 0, "ignoreEos": true}"#,
        )
        .expect("camelCase");
        assert_eq!(a.requests(), b.requests());
        let r = &a.requests()[0];
        assert_eq!(r.prompt, Some(Prompt::Text("hi".into())));
        assert_eq!(r.max_new_tokens, Some(8));
        assert_eq!(r.temperature, Some(0.0));
        assert_eq!(r.seed, Some(42));
        assert_eq!(r.prompt_logprobs, Some(0), "0 is not the same as unset");
        assert_eq!(r.logprobs, Some(3));
        assert!(r.ignore_eos);
    }

    #[test]
    fn token_ids_and_arrays() {
        let d = RequestData::from_json_str(
            r#"[{"token_ids": {"ids": [1, 2, 3]}}, {"text": "b", "max_new_tokens": 4}]"#,
        )
        .expect("array");
        assert_eq!(d.requests().len(), 2);
        assert_eq!(
            d.for_request(0).prompt,
            Some(Prompt::TokenIds(TokenIds { ids: vec![1, 2, 3] }))
        );
        assert_eq!(d.for_request(3).prompt, Some(Prompt::Text("b".into())));
        assert_eq!(d.for_request(3).max_new_tokens, Some(4));
        assert_eq!(d.for_request(0).max_new_tokens, None);
    }

    #[test]
    fn bad_data_is_rejected_with_a_reason() {
        for (text, needle) in [
            (r#"{"text": "a", "token_ids": {"ids": [1]}}"#, "not both"),
            (r#"{"max_new_tokens": 3}"#, "prompt is missing"),
            (r#"{"text": "a", "max_tokens": 3}"#, "unknown field"),
            (r#"{"text": "a", "seed": "x"}"#, "seed"),
            (r#"[]"#, "empty"),
            (r#""text""#, "object"),
            (r#"{"text": "a", "#, "EOF"),
        ] {
            let err = RequestData::from_json_str(text)
                .expect_err(text)
                .to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }

    #[test]
    fn from_request_round_trips_through_json() {
        let req = GenerateRequest {
            prompt: Some(Prompt::Text("x".into())),
            max_new_tokens: Some(3),
            seed: Some(u64::MAX),
            ..Default::default()
        };
        let d = RequestData::from_request(req.clone());
        let again = RequestData::from_json_str(&d.json().to_string()).expect("reparse");
        assert_eq!(again.requests(), &[req]);
    }

    #[test]
    fn config_validation() {
        let data = RequestData::from_json_str(r#"{"text": "a"}"#).expect("data");
        let mut c = LoadtestConfig::new("http://127.0.0.1:1", CallKind::Generate, data);
        c.validate().expect("defaults are valid");
        c.concurrency = 0;
        assert!(c.validate().is_err());
        c.concurrency = 1;
        c.total = 0;
        assert!(c.validate().is_err(), "no limit at all");
        c.duration = Some(Duration::from_millis(10));
        c.validate().expect("duration alone bounds the run");
        assert_eq!(
            "stream".parse::<CallKind>().expect("stream"),
            CallKind::Stream
        );
        assert!("bidi".parse::<CallKind>().is_err());
    }
}
