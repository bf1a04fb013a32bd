//! The router's OpenAI-compatible HTTP API against a real cluster (router + 2 expert shards on
//! the tiny model, loopback): completions and chat completions, whole and streamed (SSE ending
//! with `data: [DONE]`) and equal to each other and to gRPC; usage equal to Tokenize's counts; the
//! chat prompt's token ids those of the template's text; stop strings, max_tokens, seeds,
//! logprobs; refusals with the OpenAI error shape and the field named; the in-flight limit shared
//! with gRPC (429), the request timeout (504), and a model without a chat template (400).

use std::net::SocketAddr;

use dsv2_e2e::{Cluster, Proc, bin, connect, tiny_model};
use dsv2_proto::inference::v1 as pb;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use serde_json::{Value, json};
use tonic::Code;

/// One HTTP/1.1 exchange on a fresh connection; the response with its body unread.
async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> hyper::Response<Incoming> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("HTTP/1.1 handshake");
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            body.map(Value::to_string).unwrap_or_default(),
        )))
        .expect("a valid request");
    sender.send_request(req).await.expect("an HTTP response")
}

/// Status, content type and whole body of an exchange.
async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> (u16, String, String) {
    let resp = send(addr, method, path, body).await;
    let status = resp.status().as_u16();
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .expect("the body")
        .to_bytes();
    (
        status,
        ct,
        String::from_utf8(bytes.to_vec()).expect("UTF-8 body"),
    )
}

/// A JSON answer that must be 200.
async fn ok_json(addr: SocketAddr, path: &str, body: &Value) -> Value {
    let (status, ct, text) = call(addr, "POST", path, Some(body)).await;
    assert_eq!(status, 200, "{path} {body}: {text}");
    assert_eq!(ct, "application/json");
    serde_json::from_str(&text).expect("a JSON body")
}

/// The events of a streamed answer that must be 200: JSON objects, then the literal `[DONE]`.
async fn ok_sse(addr: SocketAddr, path: &str, body: &Value) -> Vec<Value> {
    let (status, ct, text) = call(addr, "POST", path, Some(body)).await;
    assert_eq!(status, 200, "{path} {body}: {text}");
    assert_eq!(ct, "text/event-stream");
    sse_events(&text)
}

fn sse_events(text: &str) -> Vec<Value> {
    assert!(
        text.ends_with("data: [DONE]\n\n"),
        "the stream does not end with [DONE]: {text:?}"
    );
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    events[..events.len() - 1]
        .iter()
        .map(|e| {
            let data = e
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not a data event: {e:?}"));
            serde_json::from_str(data).unwrap_or_else(|err| panic!("{err}: {data}"))
        })
        .collect()
}

/// A refusal: its status and OpenAI error object (`message`, `type`, `param`, `code`).
async fn refused(addr: SocketAddr, path: &str, body: &Value) -> (u16, Value) {
    let (status, ct, text) = call(addr, "POST", path, Some(body)).await;
    assert_ne!(status, 200, "{path} {body} was accepted: {text}");
    assert_eq!(ct, "application/json", "{text}");
    let v: Value = serde_json::from_str(&text).expect("a JSON error body");
    let e = &v["error"];
    for k in ["message", "type", "param", "code"] {
        assert!(e.get(k).is_some(), "error without {k}: {v}");
    }
    (status, e.clone())
}

/// Concatenated text of streamed completion chunks (and of chat deltas).
fn streamed_text(events: &[Value]) -> String {
    events
        .iter()
        .filter_map(|e| {
            let c = e["choices"].get(0)?;
            c["text"]
                .as_str()
                .or_else(|| c["delta"]["content"].as_str())
                .map(String::from)
        })
        .collect()
}

fn finish_of(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| {
            e["choices"].get(0)?["finish_reason"]
                .as_str()
                .map(String::from)
        })
        .collect()
}

async fn tokenize(
    c: &mut pb::inference_client::InferenceClient<tonic::transport::Channel>,
    text: &str,
    add_bos_token: bool,
) -> Vec<u32> {
    c.tokenize(pb::TokenizeRequest {
        text: text.into(),
        add_bos_token,
    })
    .await
    .expect("Tokenize")
    .into_inner()
    .token_ids
}

fn http_addr(p: &Proc) -> SocketAddr {
    p.http_addr.expect("the router printed DSV2_HTTP_READY")
}

const PROMPT: &str = "The router receives a request";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_and_chat_match_grpc_streamed_or_not() {
    let dir = tiny_model();
    let c = Cluster::two_shards(&dir, &["--http-listen", "127.0.0.1:0"]);
    let h = http_addr(&c.router);
    let mut grpc = c.client().await;

    let (status, _, health) = call(h, "GET", "/health", None).await;
    assert_eq!((status, health.as_str()), (200, r#"{"status":"ok"}"#));
    let (status, _, models) = call(h, "GET", "/v1/models", None).await;
    assert_eq!(status, 200);
    let models: Value = serde_json::from_str(&models).expect("JSON");
    let model = models["data"][0]["id"]
        .as_str()
        .expect("a model id")
        .to_string();
    assert_eq!(models["object"], "list");
    assert_eq!(model, "tiny-v2");

    // Completions: greedy, whole and streamed, equal to each other and to gRPC Generate.
    let req = json!({"model": model, "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "ignore_eos": true});
    let whole = ok_json(h, "/v1/completions", &req).await;
    assert_eq!(whole["object"], "text_completion");
    let text = whole["choices"][0]["text"]
        .as_str()
        .expect("text")
        .to_string();
    assert_eq!(whole["choices"][0]["finish_reason"], "length");
    let usage = &whole["usage"];
    assert_eq!(usage["completion_tokens"], 12, "max_tokens honoured");
    let prompt_ids = tokenize(&mut grpc, PROMPT, true).await;
    assert_eq!(
        usage["prompt_tokens"],
        prompt_ids.len(),
        "usage vs Tokenize"
    );
    assert_eq!(usage["total_tokens"], prompt_ids.len() + 12);
    let mut g = dsv2_e2e::text_request(PROMPT, 12);
    g.ignore_eos = true;
    let via_grpc = dsv2_e2e::generate(&mut grpc, g)
        .await
        .expect("gRPC Generate");
    assert_eq!(text, via_grpc.text, "HTTP vs gRPC");
    assert!(!text.is_empty());

    let mut sreq = req.clone();
    sreq["stream"] = json!(true);
    sreq["stream_options"] = json!({"include_usage": true});
    let events = ok_sse(h, "/v1/completions", &sreq).await;
    assert_eq!(streamed_text(&events), text, "streamed vs whole");
    assert_eq!(finish_of(&events), vec!["length"]);
    let last = events.last().expect("events");
    assert_eq!(last["choices"], json!([]));
    assert_eq!(&last["usage"], usage, "the usage chunk");
    assert!(
        events
            .iter()
            .all(|e| e["object"] == "text_completion" && e["id"] == events[0]["id"])
    );
    // Without include_usage, no usage chunk and no usage keys.
    sreq.as_object_mut()
        .expect("object")
        .remove("stream_options");
    let events = ok_sse(h, "/v1/completions", &sreq).await;
    assert_eq!(streamed_text(&events), text);
    assert!(
        events
            .iter()
            .all(|e| e.get("usage").is_none()
                && e["choices"].as_array().is_some_and(|c| c.len() == 1))
    );

    // Token ids as the prompt: the same answer.
    let by_ids = ok_json(
        h,
        "/v1/completions",
        &json!({"prompt": prompt_ids, "max_tokens": 12, "temperature": 0, "ignore_eos": true}),
    )
    .await;
    assert_eq!(by_ids["choices"][0]["text"], text.as_str());

    // A stop string: the text ends before its first occurrence, whole and streamed.
    let chars: Vec<char> = text.chars().collect();
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
    let cut = text.find(&stop).expect("the stop string is in the text");
    let mut stopped = req.clone();
    stopped["stop"] = json!([stop]);
    let r = ok_json(h, "/v1/completions", &stopped).await;
    assert_eq!(r["choices"][0]["text"], &text[..cut], "stop {stop:?}");
    assert_eq!(r["choices"][0]["finish_reason"], "stop");
    stopped["stream"] = json!(true);
    let events = ok_sse(h, "/v1/completions", &stopped).await;
    assert_eq!(streamed_text(&events), &text[..cut]);
    assert_eq!(finish_of(&events), vec!["stop"]);

    // Logprobs: one entry per generated token, N alternatives each.
    let mut lp = req.clone();
    lp["logprobs"] = json!(2);
    lp["max_tokens"] = json!(5);
    let r = ok_json(h, "/v1/completions", &lp).await;
    let l = &r["choices"][0]["logprobs"];
    assert_eq!(l["tokens"].as_array().map(Vec::len), Some(5), "{l}");
    assert_eq!(l["token_logprobs"].as_array().map(Vec::len), Some(5));
    assert!(
        l["top_logprobs"]
            .as_array()
            .expect("list")
            .iter()
            .all(|t| t.as_object().is_some_and(|m| !m.is_empty() && m.len() <= 2))
    );

    // Sampling with a seed is reproducible, and a stream samples as the whole answer does.
    let seeded = json!({"prompt": PROMPT, "max_tokens": 10, "temperature": 1.0, "top_p": 0.9, "top_k": 50, "seed": 7, "ignore_eos": true});
    let a = ok_json(h, "/v1/completions", &seeded).await;
    let b = ok_json(h, "/v1/completions", &seeded).await;
    assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"]);
    let mut s = seeded.clone();
    s["stream"] = json!(true);
    assert_eq!(
        streamed_text(&ok_sse(h, "/v1/completions", &s).await),
        a["choices"][0]["text"].as_str().expect("text")
    );

    // Chat: the tiny model's template, whole and streamed, and gRPC's messages prompt.
    let messages =
        json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]);
    let chat = json!({"model": model, "messages": messages, "max_tokens": 10, "temperature": 0, "ignore_eos": true});
    let whole = ok_json(h, "/v1/chat/completions", &chat).await;
    assert_eq!(whole["object"], "chat.completion");
    let reply = &whole["choices"][0]["message"];
    assert_eq!(reply["role"], "assistant");
    let reply = reply["content"].as_str().expect("content").to_string();
    assert_eq!(whole["usage"]["completion_tokens"], 10);
    let rendered = format!(
        "{}Be brief.\n\nUser: Hello\n\nAssistant:",
        dsv2_core::tiny::BOS
    );
    let chat_ids = tokenize(&mut grpc, &rendered, false).await;
    assert_eq!(chat_ids[0], 0, "the template's bos_token is the BOS token");
    assert_eq!(
        whole["usage"]["prompt_tokens"],
        chat_ids.len(),
        "usage vs Tokenize of the rendered template"
    );
    // The router's prompt ids are exactly the rendered text's (prompt logprobs list them).
    let conv = pb::ChatMessages {
        messages: vec![
            pb::ChatMessage {
                role: "system".into(),
                content: "Be brief.".into(),
            },
            pb::ChatMessage {
                role: "user".into(),
                content: "Hello".into(),
            },
        ],
        add_generation_prompt: None,
    };
    let g = pb::GenerateRequest {
        prompt: Some(pb::generate_request::Prompt::Messages(conv)),
        max_new_tokens: Some(10),
        temperature: Some(0.0),
        ignore_eos: true,
        prompt_logprobs: Some(0),
        ..Default::default()
    };
    let r = grpc
        .generate(g)
        .await
        .expect("gRPC Generate with messages")
        .into_inner();
    let ids: Vec<u32> = r.prompt_logprobs.iter().map(|l| l.token_id).collect();
    assert_eq!(ids, chat_ids, "gRPC messages prompt ids");
    assert_eq!(r.text, reply, "gRPC messages vs HTTP chat");

    let mut schat = chat.clone();
    schat["stream"] = json!(true);
    schat["stream_options"] = json!({"include_usage": true});
    let events = ok_sse(h, "/v1/chat/completions", &schat).await;
    assert_eq!(
        events[0]["choices"][0]["delta"]["role"], "assistant",
        "the role comes first"
    );
    assert_eq!(streamed_text(&events), reply, "streamed chat vs whole");
    assert_eq!(finish_of(&events), vec!["length"]);
    let streamed_usage = &events.last().expect("events")["usage"];
    for key in ["prompt_tokens", "completion_tokens", "total_tokens"] {
        assert_eq!(streamed_usage[key], whole["usage"][key], "{key}");
    }
    // The second time, the conversation's whole blocks come from the prefix cache.
    assert_eq!(whole["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    assert_eq!(
        streamed_usage["prompt_tokens_details"]["cached_tokens"],
        (chat_ids.len() - 1) / 16 * 16
    );
    assert!(
        events
            .iter()
            .all(|e| e["object"] == "chat.completion.chunk")
    );

    // Chat logprobs: `content`, one per token, top_logprobs alternatives each.
    let mut lchat = chat.clone();
    lchat["logprobs"] = json!(true);
    lchat["top_logprobs"] = json!(2);
    let r = ok_json(h, "/v1/chat/completions", &lchat).await;
    let content = r["choices"][0]["logprobs"]["content"]
        .as_array()
        .expect("content")
        .clone();
    assert_eq!(content.len(), 10);
    assert!(
        content
            .iter()
            .all(|t| t["top_logprobs"].as_array().map(Vec::len) == Some(2)
                && t["logprob"].is_number())
    );

    // The prefix cache: `usage.prompt_tokens_details.cached_tokens` counts the prompt tokens a
    // request took from it (whole blocks of 16, all but the last prompt token), whole and
    // streamed, as gRPC's cached_prompt_tokens does.
    let long = "Prefix caching keeps the latent blocks of earlier prompts. ".repeat(5);
    let n = tokenize(&mut grpc, &long, true).await.len();
    assert!(n > 33, "a prompt of several blocks ({n} tokens)");
    let want = (n - 1) / 16 * 16;
    let creq = json!({"prompt": long, "max_tokens": 4, "temperature": 0, "ignore_eos": true});
    let first = ok_json(h, "/v1/completions", &creq).await;
    assert_eq!(first["usage"]["prompt_tokens"], n);
    assert_eq!(first["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let again = ok_json(h, "/v1/completions", &creq).await;
    assert_eq!(
        again["usage"]["prompt_tokens_details"]["cached_tokens"],
        want
    );
    assert_eq!(again["choices"][0]["text"], first["choices"][0]["text"]);
    let mut sc = creq.clone();
    sc["stream"] = json!(true);
    sc["stream_options"] = json!({"include_usage": true});
    let events = ok_sse(h, "/v1/completions", &sc).await;
    let last = events.last().expect("events");
    assert_eq!(
        last["usage"]["prompt_tokens_details"]["cached_tokens"],
        want
    );
    let mut g = dsv2_e2e::text_request(&long, 4);
    g.ignore_eos = true;
    let r = grpc.generate(g).await.expect("gRPC Generate").into_inner();
    assert_eq!(r.cached_prompt_tokens as usize, want, "gRPC agrees");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_openai_errors_naming_the_field() {
    let c = Cluster::two_shards(&tiny_model(), &["--http-listen", "127.0.0.1:0"]);
    let h = http_addr(&c.router);
    let cases = [
        (
            "/v1/completions",
            json!({"prompt": "x", "max_tokens": 0}),
            "max_tokens",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "max_tokens": 100000}),
            "max_tokens",
        ),
        ("/v1/completions", json!({"prompt": "x", "n": 2}), "n"),
        (
            "/v1/completions",
            json!({"prompt": "x", "temperature": -1}),
            "temperature",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "top_p": 0}),
            "top_p",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "stop": [""]}),
            "stop",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "logprobs": 50}),
            "logprobs",
        ),
        ("/v1/completions", json!({"prompt": ""}), "prompt"),
        ("/v1/completions", json!({"prompt": [5000]}), "prompt"),
        ("/v1/completions", json!({"max_tokens": 3}), "prompt"),
        (
            "/v1/completions",
            json!({"prompt": "x", "max_tokens": 0, "stream": true}),
            "max_tokens",
        ),
        ("/v1/chat/completions", json!({"messages": []}), "messages"),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "robot", "content": "x"}]}),
            "messages",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 50, "logprobs": true}),
            "top_logprobs",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0, "stream": true}),
            "max_tokens",
        ),
    ];
    for (path, body, field) in cases {
        let (status, e) = refused(h, path, &body).await;
        assert_eq!(status, 400, "{path} {body}: {e}");
        assert_eq!(e["type"], "invalid_request_error", "{e}");
        assert_eq!(e["param"], field, "{path} {body}: {e}");
        let msg = e["message"].as_str().expect("message");
        assert!(
            msg.starts_with(field),
            "{path} {body}: the message does not name {field}: {msg}"
        );
        assert!(!msg.contains("max_new_tokens"), "gRPC's name leaked: {msg}");
    }
    let (status, e) = refused(
        h,
        "/v1/completions",
        &json!({"model": "gpt-4", "prompt": "x"}),
    )
    .await;
    assert_eq!(
        (status, e["type"].as_str()),
        (404, Some("not_found_error")),
        "{e}"
    );
    let (status, _, text) = call(h, "POST", "/v1/completions", None).await;
    assert_eq!(status, 400, "an empty body: {text}");
    let (status, _, _) = call(h, "GET", "/v1/nothing", None).await;
    assert_eq!(status, 404);
    // Still serving.
    ok_json(
        h,
        "/v1/completions",
        &json!({"prompt": "x", "max_tokens": 2}),
    )
    .await;
}

/// One permit left by `--max-concurrent 1`: an open HTTP stream takes it from gRPC and HTTP
/// alike (429 / RESOURCE_EXHAUSTED), and gives it back when the client goes away. A request
/// running past `--request-timeout-s` is 504 (whole) or ends with a timeout error event
/// (streamed, after its status line went out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shed_and_timed_out_requests_get_429_and_504() {
    let c = Cluster::two_shards(
        &tiny_model(),
        &[
            "--http-listen",
            "127.0.0.1:0",
            "--max-concurrent",
            "1",
            "--request-timeout-s",
            "1",
        ],
    );
    let h = http_addr(&c.router);
    let mut grpc = c.client().await;
    // 2500 tokens take seconds on any machine (a gRPC round trip to each shard per MoE layer).
    let long = json!({"prompt": PROMPT, "max_tokens": 2500, "temperature": 0, "ignore_eos": true, "stream": true});
    let resp = send(h, "POST", "/v1/completions", Some(&long)).await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let first = body
        .frame()
        .await
        .expect("a first event")
        .expect("readable");
    assert!(first.data_ref().is_some_and(|d| d.starts_with(b"data: ")));
    let (status, e) = refused(
        h,
        "/v1/completions",
        &json!({"prompt": "x", "max_tokens": 2}),
    )
    .await;
    assert_eq!(
        (status, e["type"].as_str()),
        (429, Some("rate_limit_error")),
        "{e}"
    );
    assert!(
        e["message"]
            .as_str()
            .is_some_and(|m| m.contains("--max-concurrent")),
        "{e}"
    );
    let st = dsv2_e2e::generate(&mut grpc, dsv2_e2e::text_request("x", 2))
        .await
        .expect_err("gRPC was served past the shared limit");
    assert_eq!(st.code(), Code::ResourceExhausted);

    // The stream runs into the 1 s request timeout: an error event, then [DONE].
    let mut rest = Vec::from(first.into_data().expect("data").as_ref());
    rest.extend(body.collect().await.expect("the rest").to_bytes());
    let text = String::from_utf8(rest).expect("UTF-8");
    let last = sse_events(&text).pop().expect("events");
    assert_eq!(last["error"]["type"], "timeout_error", "{last}");
    // Its permit came back: whole requests are served, and the long one is 504.
    let (status, e) = refused(
        h,
        "/v1/completions",
        &json!({"prompt": PROMPT, "max_tokens": 2500, "ignore_eos": true}),
    )
    .await;
    assert_eq!(
        (status, e["type"].as_str()),
        (504, Some("timeout_error")),
        "{e}"
    );
    ok_json(
        h,
        "/v1/completions",
        &json!({"prompt": "x", "max_tokens": 2}),
    )
    .await;
}

/// A model dir without a chat template: chat completions (and gRPC messages) are a 400 that
/// says so; `--chat-template FILE` gives it one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_needs_a_template_and_chat_template_overrides() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("no-template");
    std::fs::create_dir(&dir).expect("mkdir");
    let tiny = tiny_model();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(tiny.join(f), dir.join(f)).expect("copying the tiny model");
    }
    let mut cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(tiny.join("tokenizer_config.json")).expect("read"),
    )
    .expect("JSON");
    cfg.as_object_mut().expect("object").remove("chat_template");
    std::fs::write(dir.join("tokenizer_config.json"), cfg.to_string()).expect("write");
    let template = tmp.path().join("template.jinja");
    std::fs::write(&template, "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}").expect("write");

    let start = |extra: &[&str]| {
        let mut cmd = std::process::Command::new(bin("dsv2-router"));
        cmd.arg("--model-dir")
            .arg(&dir)
            .args(["--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"])
            .args(extra);
        Proc::start("router", cmd)
    };
    let chat = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3});

    let plain = start(&[]);
    let (status, e) = refused(http_addr(&plain), "/v1/chat/completions", &chat).await;
    assert_eq!(
        (status, e["param"].as_str()),
        (400, Some("messages")),
        "{e}"
    );
    assert!(
        e["message"]
            .as_str()
            .is_some_and(|m| m.contains("no chat template") && m.contains("--chat-template")),
        "{e}"
    );
    let mut grpc = connect(&plain.url()).await;
    let g = pb::GenerateRequest {
        prompt: Some(pb::generate_request::Prompt::Messages(pb::ChatMessages {
            messages: vec![pb::ChatMessage {
                role: "user".into(),
                content: "Hi".into(),
            }],
            add_generation_prompt: None,
        })),
        max_new_tokens: Some(3),
        ..Default::default()
    };
    let st = grpc
        .generate(g.clone())
        .await
        .expect_err("messages without a template");
    assert_eq!(st.code(), Code::InvalidArgument, "{st:?}");
    // Completions still work there.
    ok_json(
        http_addr(&plain),
        "/v1/completions",
        &json!({"prompt": "Hi", "max_tokens": 2}),
    )
    .await;
    drop(plain);

    let with = start(&["--chat-template", template.to_str().expect("UTF-8 path")]);
    let r = ok_json(http_addr(&with), "/v1/chat/completions", &chat).await;
    let mut grpc = connect(&with.url()).await;
    let want = tokenize(
        &mut grpc,
        &format!("{}<user>Hi<assistant>", dsv2_core::tiny::BOS),
        false,
    )
    .await;
    assert_eq!(r["usage"]["prompt_tokens"], want.len());
    let mut g = g;
    g.prompt_logprobs = Some(0);
    if let Some(pb::generate_request::Prompt::Messages(m)) = &mut g.prompt {
        m.add_generation_prompt = Some(false);
    }
    let r = grpc
        .generate(g)
        .await
        .expect("messages with --chat-template")
        .into_inner();
    let ids: Vec<u32> = r.prompt_logprobs.iter().map(|l| l.token_id).collect();
    let want = tokenize(
        &mut grpc,
        &format!("{}<user>Hi", dsv2_core::tiny::BOS),
        false,
    )
    .await;
    assert_eq!(ids, want, "add_generation_prompt = false");
}
