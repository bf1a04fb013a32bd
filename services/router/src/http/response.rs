//! `dsv2.v1` answers → OpenAI JSON: whole completions, server-sent-event chunks (ending with
//! `data: [DONE]`), usage, logprobs in each endpoint's shape, and the error object.

use dsv2_proto::inference::v1 as pb;
use serde_json::{Value, json};
use tonic::Status;

use super::request::Endpoint;
use crate::status;

/// What every object of one answer shares.
#[derive(Clone, Debug)]
pub struct Meta {
    pub endpoint: Endpoint,
    pub id: String,
    pub created: u64,
    pub model: String,
    /// Logprobs were asked for: a `logprobs` object instead of null.
    pub logprobs: bool,
}

impl Meta {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.endpoint, chunk) {
            (Endpoint::Completions, _) => "text_completion",
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
        }
    }

    fn envelope(&self, chunk: bool, choices: Vec<Value>) -> Value {
        json!({
            "id": self.id,
            "object": self.object(chunk),
            "created": self.created,
            "model": self.model,
            "choices": choices,
        })
    }
}

/// OpenAI's finish reasons: `length`, else `stop` (a stop string, a stop token or EOS).
fn finish_reason(r: i32) -> Value {
    match pb::FinishReason::try_from(r) {
        Ok(pb::FinishReason::Length) => "length".into(),
        Ok(pb::FinishReason::Unspecified) | Err(_) => Value::Null,
        Ok(_) => "stop".into(),
    }
}

/// OpenAI's `usage`; `prompt_tokens_details.cached_tokens` counts the prompt tokens taken from
/// the prefix cache instead of being prefilled.
fn usage(prompt_tokens: u32, completion_tokens: u32, cached_prompt_tokens: u32) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_prompt_tokens},
    })
}

/// Logprobs of some generated tokens in the endpoint's shape; `text_offset` (completions) is
/// where the first of them starts in the completion text, in characters.
fn logprobs(endpoint: Endpoint, lps: &[pb::TokenLogprob], text_offset: &mut usize) -> Value {
    match endpoint {
        Endpoint::Chat => {
            let entry = |token: &str, logprob: f32| json!({"token": token, "logprob": logprob, "bytes": token.as_bytes()});
            let content: Vec<Value> = lps
                .iter()
                .map(|l| {
                    let mut e = entry(&l.text, l.logprob.unwrap_or(0.0));
                    e["top_logprobs"] = l
                        .top_logprobs
                        .iter()
                        .map(|t| entry(&t.text, t.logprob))
                        .collect();
                    e
                })
                .collect();
            json!({ "content": content })
        }
        Endpoint::Completions => {
            let mut offsets = Vec::with_capacity(lps.len());
            for l in lps {
                offsets.push(*text_offset);
                *text_offset += l.text.chars().count();
            }
            json!({
                "tokens": lps.iter().map(|l| l.text.as_str()).collect::<Vec<_>>(),
                "token_logprobs": lps.iter().map(|l| l.logprob).collect::<Vec<_>>(),
                "top_logprobs": lps
                    .iter()
                    .map(|l| {
                        l.top_logprobs
                            .iter()
                            .map(|t| (t.text.clone(), Value::from(t.logprob)))
                            .collect::<serde_json::Map<_, _>>()
                    })
                    .collect::<Vec<_>>(),
                "text_offset": offsets,
            })
        }
    }
}

/// The whole answer of a non-streamed request.
pub fn whole(meta: &Meta, r: &pb::GenerateResponse) -> Value {
    let lp = if meta.logprobs {
        logprobs(meta.endpoint, &r.logprobs, &mut 0)
    } else {
        Value::Null
    };
    let choice = match meta.endpoint {
        Endpoint::Completions => json!({
            "index": 0,
            "text": r.text,
            "logprobs": lp,
            "finish_reason": finish_reason(r.finish_reason),
        }),
        Endpoint::Chat => json!({
            "index": 0,
            "message": {"role": "assistant", "content": r.text},
            "logprobs": lp,
            "finish_reason": finish_reason(r.finish_reason),
        }),
    };
    let mut v = meta.envelope(false, vec![choice]);
    v["usage"] = usage(r.prompt_tokens, r.completion_tokens, r.cached_prompt_tokens);
    v
}

/// OpenAI's error object for a failure. `param` is the request field it names, if any.
pub fn error(st: &Status, param: Option<&str>) -> Value {
    let (_, kind) = status::http_status(st.code());
    json!({
        "error": {
            "message": st.message(),
            "type": kind,
            "param": param,
            "code": snake_case(&format!("{:?}", st.code())),
        }
    })
}

/// `InvalidArgument` → `invalid_argument`: the gRPC code's name, as the error's `code`.
fn snake_case(camel: &str) -> String {
    let mut out = String::new();
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

/// Turns the messages of a GenerateStream into server-sent events, one answer's worth.
pub struct SseEncoder {
    meta: Meta,
    include_usage: bool,
    role_sent: bool,
    text_offset: usize,
    done: bool,
}

impl SseEncoder {
    pub fn new(meta: Meta, include_usage: bool) -> Self {
        SseEncoder {
            meta,
            include_usage,
            role_sent: false,
            text_offset: 0,
            done: false,
        }
    }

    /// Whether the last event (`data: [DONE]`) has been written.
    pub fn done(&self) -> bool {
        self.done
    }

    fn chunk(&self, out: &mut String, text: &str, lp: Value, finish: Value) {
        let choice = match self.meta.endpoint {
            Endpoint::Completions => json!({
                "index": 0, "text": text, "logprobs": lp, "finish_reason": finish,
            }),
            Endpoint::Chat => {
                let delta = if finish.is_null() {
                    json!({"content": text})
                } else {
                    json!({})
                };
                json!({"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish})
            }
        };
        let mut v = self.meta.envelope(true, vec![choice]);
        if self.include_usage {
            v["usage"] = Value::Null;
        }
        event(out, &v);
    }

    /// The events of one stream message (possibly none, while text is held back), or of the
    /// failure that ended the stream (an `error` event: the status line went out already).
    pub fn encode(&mut self, item: Result<pb::GenerateStreamResponse, Status>) -> String {
        let mut out = String::new();
        let m = match item {
            Ok(m) => m,
            Err(st) => {
                let field =
                    status::field_of(st.message()).map(|f| self.meta.endpoint.field_name(f));
                event(&mut out, &error(&st, field.as_deref()));
                self.finish(&mut out);
                return out;
            }
        };
        if self.meta.endpoint == Endpoint::Chat && !self.role_sent {
            self.role_sent = true;
            let mut v = self.meta.envelope(
                true,
                vec![json!({
                    "index": 0,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": null,
                    "finish_reason": null,
                })],
            );
            if self.include_usage {
                v["usage"] = Value::Null;
            }
            event(&mut out, &v);
        }
        if !m.text.is_empty() || !m.logprobs.is_empty() {
            let lp = if self.meta.logprobs {
                logprobs(self.meta.endpoint, &m.logprobs, &mut self.text_offset)
            } else {
                Value::Null
            };
            self.chunk(&mut out, &m.text, lp, Value::Null);
        }
        if let Some(s) = m.summary {
            self.chunk(&mut out, "", Value::Null, finish_reason(s.finish_reason));
            if self.include_usage {
                let mut v = self.meta.envelope(true, vec![]);
                v["usage"] = usage(s.prompt_tokens, s.completion_tokens, s.cached_prompt_tokens);
                event(&mut out, &v);
            }
            self.finish(&mut out);
        }
        out
    }

    fn finish(&mut self, out: &mut String) {
        out.push_str("data: [DONE]\n\n");
        self.done = true;
    }
}

fn event(out: &mut String, v: &Value) {
    out.push_str("data: ");
    out.push_str(&v.to_string());
    out.push_str("\n\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(endpoint: Endpoint) -> Meta {
        Meta {
            endpoint,
            id: "x-1".into(),
            created: 7,
            model: "m".into(),
            logprobs: false,
        }
    }

    fn events(s: &str) -> Vec<Value> {
        s.split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| {
                let d = e.strip_prefix("data: ").expect("data: events only");
                if d == "[DONE]" {
                    Value::String(d.into())
                } else {
                    serde_json::from_str(d).expect("JSON")
                }
            })
            .collect()
    }

    fn msg(text: &str) -> pb::GenerateStreamResponse {
        pb::GenerateStreamResponse {
            text: text.into(),
            token_ids: vec![1],
            ..Default::default()
        }
    }

    #[test]
    fn a_chat_stream_is_role_content_finish_usage_done() {
        let mut enc = SseEncoder::new(meta(Endpoint::Chat), true);
        let mut all = enc.encode(Ok(msg("Hel")));
        all.push_str(&enc.encode(Ok(msg(""))));
        let mut last = msg("lo");
        last.summary = Some(pb::GenerateSummary {
            finish_reason: pb::FinishReason::Length as i32,
            prompt_tokens: 4,
            completion_tokens: 3,
            cached_prompt_tokens: 2,
            ..Default::default()
        });
        all.push_str(&enc.encode(Ok(last)));
        assert!(enc.done());
        let ev = events(&all);
        assert_eq!(ev.len(), 6, "{all}");
        assert_eq!(ev[0]["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(ev[1]["choices"][0]["delta"]["content"], "Hel");
        assert_eq!(ev[2]["choices"][0]["delta"]["content"], "lo");
        assert_eq!(ev[3]["choices"][0]["finish_reason"], "length");
        assert_eq!(ev[3]["usage"], Value::Null);
        assert_eq!(ev[4]["choices"], json!([]));
        assert_eq!(ev[4]["usage"]["total_tokens"], 7);
        assert_eq!(ev[4]["usage"]["prompt_tokens_details"]["cached_tokens"], 2);
        assert_eq!(ev[5], "[DONE]");
        assert!(
            ev[..5]
                .iter()
                .all(|e| e["object"] == "chat.completion.chunk")
        );
    }

    #[test]
    fn a_failure_mid_stream_is_an_error_event_then_done() {
        let mut enc = SseEncoder::new(meta(Endpoint::Completions), false);
        let out = enc.encode(Err(Status::unavailable("expert shard 1 lost")));
        let ev = events(&out);
        assert_eq!(ev[0]["error"]["type"], "service_unavailable_error");
        assert_eq!(ev[0]["error"]["message"], "expert shard 1 lost");
        assert_eq!(ev[0]["error"]["code"], "unavailable");
        assert_eq!(snake_case("DeadlineExceeded"), "deadline_exceeded");
        assert_eq!(ev[1], "[DONE]");
        assert!(enc.done());
    }

    #[test]
    fn completion_logprobs_have_offsets_into_the_text() {
        let lp = |t: &str, v: f32| pb::TokenLogprob {
            token_id: 0,
            text: t.into(),
            logprob: Some(v),
            top_logprobs: vec![pb::TopLogprob {
                token_id: 1,
                text: "z".into(),
                logprob: -3.0,
            }],
        };
        let r = pb::GenerateResponse {
            text: "ab c".into(),
            logprobs: vec![lp("ab", -0.5), lp(" c", -1.0)],
            finish_reason: pb::FinishReason::Eos as i32,
            prompt_tokens: 2,
            completion_tokens: 2,
            ..Default::default()
        };
        let mut m = meta(Endpoint::Completions);
        m.logprobs = true;
        let v = whole(&m, &r);
        let l = &v["choices"][0]["logprobs"];
        assert_eq!(l["text_offset"], json!([0, 2]));
        assert_eq!(l["token_logprobs"], json!([-0.5, -1.0]));
        assert_eq!(l["top_logprobs"][0]["z"], -3.0);
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        assert_eq!(v["usage"]["prompt_tokens"], 2);
        assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
        let mut m = meta(Endpoint::Chat);
        m.logprobs = true;
        let v = whole(&m, &r);
        assert_eq!(v["choices"][0]["message"]["content"], "ab c");
        assert_eq!(v["choices"][0]["logprobs"]["content"][1]["token"], " c");
        assert_eq!(
            v["choices"][0]["logprobs"]["content"][0]["top_logprobs"][0]["logprob"],
            -3.0
        );
    }
}
