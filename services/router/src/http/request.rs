//! OpenAI request bodies → `dsv2.v1` GenerateRequests. Only the translation lives here (names,
//! JSON shapes, what the OpenAI API has and dsv2 does not); every limit and value check is the
//! gRPC path's (`InferenceService::parse`, `RequestLimits::validate`), run on the result.

use dsv2_proto::inference::v1 as pb;
use serde_json::{Map, Value};
use tonic::Status;

/// Which endpoint a body came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /v1/completions`
    Completions,
    /// `POST /v1/chat/completions`
    Chat,
}

impl Endpoint {
    /// The HTTP name of a GenerateRequest field (for messages and `param`).
    pub fn field_name(self, grpc: &str) -> String {
        let (head, rest) = grpc
            .find(['[', '.'])
            .map_or((grpc, ""), |i| grpc.split_at(i));
        let head = match (self, head) {
            (_, "max_new_tokens") => "max_tokens",
            (Endpoint::Chat, "prompt") => "messages",
            (Endpoint::Chat, "logprobs") => "top_logprobs",
            (_, h) => h,
        };
        format!("{head}{rest}")
    }
}

/// A parsed body: the GenerateRequest and how the answer is to be written.
#[derive(Debug)]
pub struct Parsed {
    pub grpc: pb::GenerateRequest,
    pub stream: bool,
    /// `stream_options.include_usage`: a last chunk with `usage` and no choices.
    pub include_usage: bool,
    /// Logprobs were asked for (the answer carries a `logprobs` object, else null).
    pub logprobs: bool,
}

fn bad(field: &str, msg: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {msg}"))
}

/// Typed access to the body's fields; `null` counts as absent, as in OpenAI's API.
struct Fields<'a>(&'a Map<String, Value>);

impl<'a> Fields<'a> {
    fn get(&self, k: &str) -> Option<&'a Value> {
        self.0.get(k).filter(|v| !v.is_null())
    }

    fn u32(&self, k: &str) -> Result<Option<u32>, Status> {
        self.get(k)
            .map(|v| {
                v.as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| bad(k, format!("expected a non-negative integer, got {v}")))
            })
            .transpose()
    }

    fn f32(&self, k: &str) -> Result<Option<f32>, Status> {
        self.get(k)
            .map(|v| {
                v.as_f64()
                    .map(|f| f as f32)
                    .ok_or_else(|| bad(k, format!("expected a number, got {v}")))
            })
            .transpose()
    }

    fn bool(&self, k: &str) -> Result<Option<bool>, Status> {
        self.get(k)
            .map(|v| {
                v.as_bool()
                    .ok_or_else(|| bad(k, format!("expected true or false, got {v}")))
            })
            .transpose()
    }

    /// A parameter dsv2 does not implement: accepted only at the value that changes nothing.
    fn unsupported(&self, k: &str, neutral: impl Fn(&Value) -> bool) -> Result<(), Status> {
        match self.get(k) {
            Some(v) if !neutral(v) => Err(bad(k, "is not supported by this server")),
            _ => Ok(()),
        }
    }
}

/// Parses a request body for `endpoint`. `model` is the served model's name: a request naming
/// another model is NOT_FOUND (404), one naming none gets this one.
pub fn parse(endpoint: Endpoint, body: &[u8], model: &str) -> Result<Parsed, Status> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| Status::invalid_argument(format!("the body is not valid JSON: {e}")))?;
    let Value::Object(map) = v else {
        return Err(Status::invalid_argument("the body must be a JSON object"));
    };
    let f = Fields(&map);
    if let Some(m) = f.get("model") {
        let name = m
            .as_str()
            .ok_or_else(|| bad("model", "expected a string"))?;
        if name != model {
            return Err(Status::not_found(format!(
                "model: `{name}` is not served here; this server serves `{model}` (GET /v1/models)"
            )));
        }
    }
    if let Some(n) = f.u32("n")?
        && n != 1
    {
        return Err(bad("n", format!("only n = 1 is supported, got {n}")));
    }
    let zero = |v: &Value| v.as_f64() == Some(0.0);
    f.unsupported("presence_penalty", zero)?;
    f.unsupported("frequency_penalty", zero)?;
    f.unsupported("repetition_penalty", |v| v.as_f64() == Some(1.0))?;
    f.unsupported("logit_bias", |v| v.as_object().is_some_and(Map::is_empty))?;
    f.unsupported("tools", |v| v.as_array().is_some_and(Vec::is_empty))?;
    f.unsupported("functions", |v| v.as_array().is_some_and(Vec::is_empty))?;
    f.unsupported("response_format", |v| v["type"] == "text")?;

    let stream = f.bool("stream")?.unwrap_or(false);
    let include_usage = match f.get("stream_options") {
        None => false,
        Some(_) if !stream => {
            return Err(bad("stream_options", "only allowed when stream is true"));
        }
        Some(Value::Object(o)) => Fields(o)
            .bool("include_usage")
            .map_err(|_| bad("stream_options.include_usage", "expected true or false"))?
            .unwrap_or(false),
        Some(_) => return Err(bad("stream_options", "expected an object")),
    };

    let mut grpc = pb::GenerateRequest {
        max_new_tokens: f.u32("max_tokens")?,
        temperature: f.f32("temperature")?,
        top_p: f.f32("top_p")?,
        top_k: top_k(&f)?,
        seed: seed(&f)?,
        stop: stop(&f)?,
        stop_token_ids: stop_token_ids(&f)?,
        ignore_eos: f.bool("ignore_eos")?.unwrap_or(false),
        ..Default::default()
    };
    let logprobs = match endpoint {
        Endpoint::Completions => {
            f.unsupported("echo", |v| v == &Value::Bool(false))?;
            f.unsupported("suffix", |v| v.as_str() == Some(""))?;
            f.unsupported("best_of", |v| v.as_u64() == Some(1))?;
            grpc.prompt = Some(completion_prompt(f.get("prompt"))?);
            grpc.logprobs = f.u32("logprobs")?;
            grpc.logprobs.is_some()
        }
        Endpoint::Chat => {
            if let Some(n) = f.u32("max_completion_tokens")? {
                grpc.max_new_tokens = Some(n);
            }
            grpc.prompt = Some(pb::generate_request::Prompt::Messages(pb::ChatMessages {
                messages: chat_messages(f.get("messages"))?,
                add_generation_prompt: f.bool("add_generation_prompt")?,
            }));
            let wanted = f.bool("logprobs")?.unwrap_or(false);
            let top = f.u32("top_logprobs")?;
            if top.is_some() && !wanted {
                return Err(bad("top_logprobs", "needs logprobs: true"));
            }
            grpc.logprobs = wanted.then(|| top.unwrap_or(0));
            wanted
        }
    };
    Ok(Parsed {
        grpc,
        stream,
        include_usage,
        logprobs,
    })
}

/// `top_k` (an extension, as in vLLM): -1 or 0 turn it off.
fn top_k(f: &Fields) -> Result<u32, Status> {
    match f.get("top_k") {
        None => Ok(0),
        Some(v) => match v.as_i64() {
            Some(-1) => Ok(0),
            Some(k) => u32::try_from(k).map_err(|_| {
                bad(
                    "top_k",
                    format!("expected -1, 0 (off) or a positive integer, got {k}"),
                )
            }),
            None => Err(bad("top_k", format!("expected an integer, got {v}"))),
        },
    }
}

/// `seed`: any 64-bit integer (a negative one is used by its two's-complement bits).
fn seed(f: &Fields) -> Result<Option<u64>, Status> {
    f.get("seed")
        .map(|v| {
            v.as_u64()
                .or_else(|| v.as_i64().map(|s| s as u64))
                .ok_or_else(|| bad("seed", format!("expected an integer, got {v}")))
        })
        .transpose()
}

/// `stop`: a string or a list of strings.
fn stop(f: &Fields) -> Result<Vec<String>, Status> {
    match f.get("stop") {
        None => Ok(vec![]),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(list)) => list
            .iter()
            .enumerate()
            .map(|(i, s)| {
                s.as_str()
                    .map(String::from)
                    .ok_or_else(|| bad(&format!("stop[{i}]"), "expected a string"))
            })
            .collect(),
        Some(_) => Err(bad("stop", "expected a string or a list of strings")),
    }
}

/// `stop_token_ids` (an extension, as in vLLM): a list of token ids.
fn stop_token_ids(f: &Fields) -> Result<Vec<u32>, Status> {
    match f.get("stop_token_ids") {
        None => Ok(vec![]),
        Some(Value::Array(list)) => list.iter().map(|v| token_id("stop_token_ids", v)).collect(),
        Some(_) => Err(bad("stop_token_ids", "expected a list of token ids")),
    }
}

fn token_id(field: &str, v: &Value) -> Result<u32, Status> {
    v.as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| {
            bad(
                field,
                format!("expected token ids (non-negative integers), got {v}"),
            )
        })
}

/// `prompt` of /v1/completions: a string or a list of token ids, or a list holding one of them
/// (one prompt per request: n = 1 and no batches).
fn completion_prompt(v: Option<&Value>) -> Result<pb::generate_request::Prompt, Status> {
    use pb::generate_request::Prompt;
    let one = |v: &Value| -> Result<Option<Prompt>, Status> {
        Ok(match v {
            Value::String(s) => Some(Prompt::Text(s.clone())),
            Value::Array(ids) if ids.iter().all(Value::is_number) => {
                Some(Prompt::TokenIds(pb::TokenIds {
                    ids: ids
                        .iter()
                        .map(|t| token_id("prompt", t))
                        .collect::<Result<_, _>>()?,
                }))
            }
            _ => None,
        })
    };
    let v = v.ok_or_else(|| bad("prompt", "is required"))?;
    if let Some(p) = one(v)? {
        return Ok(p);
    }
    match v {
        Value::Array(list) if list.len() == 1 => {
            one(&list[0])?.ok_or_else(|| bad("prompt", "expected a string or a list of token ids"))
        }
        Value::Array(list) if list.len() > 1 => Err(bad(
            "prompt",
            format!(
                "{} prompts in one request: batches are not supported, send one prompt per request",
                list.len()
            ),
        )),
        _ => Err(bad("prompt", "expected a string or a list of token ids")),
    }
}

/// `messages` of /v1/chat/completions: `{role, content}` with content a string, null, or a
/// list of text parts (joined with newlines, as vLLM does).
fn chat_messages(v: Option<&Value>) -> Result<Vec<pb::ChatMessage>, Status> {
    let list = match v {
        None => return Err(bad("messages", "is required")),
        Some(Value::Array(list)) => list,
        Some(_) => return Err(bad("messages", "expected a list of messages")),
    };
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let role = m["role"]
                .as_str()
                .ok_or_else(|| bad(&format!("messages[{i}].role"), "expected a string"))?;
            let content = match &m["content"] {
                Value::Null => String::new(),
                Value::String(s) => s.clone(),
                Value::Array(parts) => parts
                    .iter()
                    .enumerate()
                    .map(|(j, p)| match (p["type"].as_str(), p["text"].as_str()) {
                        (Some("text"), Some(t)) => Ok(t),
                        _ => Err(bad(
                            &format!("messages[{i}].content[{j}]"),
                            "only text parts ({\"type\": \"text\", \"text\": ...}) are supported",
                        )),
                    })
                    .collect::<Result<Vec<_>, _>>()?
                    .join("\n"),
                _ => {
                    return Err(bad(
                        &format!("messages[{i}].content"),
                        "expected a string or a list of text parts",
                    ));
                }
            };
            Ok(pb::ChatMessage {
                role: role.to_owned(),
                content,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::generate_request::Prompt;

    fn ok(e: Endpoint, body: Value) -> Parsed {
        parse(e, body.to_string().as_bytes(), "m").unwrap_or_else(|s| panic!("{body}: {s:?}"))
    }

    fn err(e: Endpoint, body: Value) -> Status {
        parse(e, body.to_string().as_bytes(), "m").expect_err("should be refused")
    }

    #[test]
    fn completions_fields_become_the_grpc_request() {
        let p = ok(
            Endpoint::Completions,
            serde_json::json!({
                "model": "m", "prompt": "Hi", "max_tokens": 7, "temperature": 0, "top_p": 0.5,
                "top_k": 3, "seed": -1, "stop": "\n", "logprobs": 2, "n": 1, "stream": true,
                "stream_options": {"include_usage": true}, "user": "ignored"
            }),
        );
        let g = &p.grpc;
        assert_eq!(g.prompt, Some(Prompt::Text("Hi".into())));
        assert_eq!(
            (g.max_new_tokens, g.temperature, g.top_p, g.top_k, g.seed),
            (Some(7), Some(0.0), Some(0.5), 3, Some(u64::MAX))
        );
        assert_eq!(g.stop, vec!["\n".to_string()]);
        assert_eq!(g.logprobs, Some(2));
        assert!(p.stream && p.include_usage && p.logprobs);
        let p = ok(
            Endpoint::Completions,
            serde_json::json!({"prompt": [[1, 2, 3]], "top_k": -1}),
        );
        assert_eq!(
            p.grpc.prompt,
            Some(Prompt::TokenIds(pb::TokenIds { ids: vec![1, 2, 3] }))
        );
        assert_eq!(p.grpc.top_k, 0);
        assert_eq!(
            p.grpc.temperature, None,
            "unset stays unset: the gRPC default applies"
        );
    }

    #[test]
    fn chat_fields_become_a_conversation() {
        let p = ok(
            Endpoint::Chat,
            serde_json::json!({
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
                ],
                "max_completion_tokens": 5, "logprobs": true, "top_logprobs": 3, "stop": ["x", "y"]
            }),
        );
        let Some(Prompt::Messages(c)) = &p.grpc.prompt else {
            panic!("{:?}", p.grpc.prompt)
        };
        assert_eq!(c.messages[1].content, "a\nb");
        assert_eq!(c.add_generation_prompt, None);
        assert_eq!((p.grpc.max_new_tokens, p.grpc.logprobs), (Some(5), Some(3)));
        assert_eq!(p.grpc.stop.len(), 2);
        assert!(!p.stream);
    }

    #[test]
    fn refusals_name_the_field() {
        let c = Endpoint::Completions;
        for (body, field) in [
            (serde_json::json!({"prompt": "x", "n": 2}), "n"),
            (
                serde_json::json!({"prompt": "x", "max_tokens": "many"}),
                "max_tokens",
            ),
            (
                serde_json::json!({"prompt": "x", "max_tokens": -1}),
                "max_tokens",
            ),
            (
                serde_json::json!({"prompt": "x", "temperature": "hot"}),
                "temperature",
            ),
            (serde_json::json!({"prompt": "x", "stop": 3}), "stop"),
            (
                serde_json::json!({"prompt": "x", "stop": ["a", 1]}),
                "stop[1]",
            ),
            (serde_json::json!({"prompt": ["a", "b"]}), "prompt"),
            (serde_json::json!({}), "prompt"),
            (serde_json::json!({"prompt": "x", "echo": true}), "echo"),
            (
                serde_json::json!({"prompt": "x", "presence_penalty": 0.5}),
                "presence_penalty",
            ),
            (
                serde_json::json!({"prompt": "x", "stream_options": {}}),
                "stream_options",
            ),
            (serde_json::json!({"prompt": "x", "top_k": -2}), "top_k"),
        ] {
            let s = err(c, body.clone());
            assert_eq!(s.code(), tonic::Code::InvalidArgument, "{body}");
            assert_eq!(
                crate::status::field_of(s.message()),
                Some(field),
                "{body}: {s:?}"
            );
        }
        let s = err(
            Endpoint::Chat,
            serde_json::json!({"messages": [{"role": "user", "content": 1}]}),
        );
        assert_eq!(
            crate::status::field_of(s.message()),
            Some("messages[0].content")
        );
        let s = err(
            Endpoint::Chat,
            serde_json::json!({"messages": [], "top_logprobs": 2}),
        );
        assert_eq!(crate::status::field_of(s.message()), Some("top_logprobs"));
        let s = err(c, serde_json::json!({"model": "other", "prompt": "x"}));
        assert_eq!(s.code(), tonic::Code::NotFound);
        assert_eq!(
            err(c, serde_json::json!([1])).code(),
            tonic::Code::InvalidArgument
        );
        assert!(parse(c, b"{not json", "m").is_err());
    }

    #[test]
    fn grpc_field_names_read_as_the_http_ones() {
        assert_eq!(Endpoint::Chat.field_name("max_new_tokens"), "max_tokens");
        assert_eq!(Endpoint::Chat.field_name("prompt"), "messages");
        assert_eq!(Endpoint::Chat.field_name("logprobs"), "top_logprobs");
        assert_eq!(Endpoint::Completions.field_name("logprobs"), "logprobs");
        assert_eq!(
            Endpoint::Chat.field_name("messages[2].role"),
            "messages[2].role"
        );
        assert_eq!(Endpoint::Completions.field_name("stop"), "stop");
    }
}
