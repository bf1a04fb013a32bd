//! Chat templates rendered by minijinja equal Jinja2's rendering as transformers does it
//! (fixtures/chat_templates/expected.json, made by make_expected.py there): DeepSeek-V2-Chat's
//! real template and a template using what other models' templates use, each conversation with
//! and without add_generation_prompt. With the real DeepSeek-V2 tokenizer (../shared, skipped
//! where absent) the rendered text encodes to HF's ids, and a router serving a model with that
//! tokenizer and template takes exactly those ids as the prompt of a gRPC `messages` request.

use std::path::{Path, PathBuf};
use std::process::Command;

use dsv2_core::chat::{ChatMessage, ChatTemplate};
use dsv2_core::tokenizer::Tokenizer;
use dsv2_e2e::{Proc, bin, connect};
use dsv2_proto::inference::v1 as pb;
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/chat_templates")
}

struct Case {
    template: String,
    name: String,
    add_generation_prompt: bool,
    messages: Vec<ChatMessage>,
    text: String,
    ids: Option<Vec<u32>>,
}

fn cases() -> Vec<Case> {
    let path = fixtures().join("expected.json");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&path).expect("expected.json"))
        .expect("expected.json is JSON");
    let cases: Vec<Case> = v["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| Case {
            template: c["template"].as_str().expect("template").into(),
            name: c["conversation"].as_str().expect("conversation").into(),
            add_generation_prompt: c["add_generation_prompt"].as_bool().expect("flag"),
            messages: c["messages"]
                .as_array()
                .expect("messages")
                .iter()
                .map(|m| {
                    ChatMessage::new(
                        m["role"].as_str().expect("role"),
                        m["content"].as_str().expect("content"),
                    )
                })
                .collect(),
            text: c["text"].as_str().expect("text").into(),
            ids: c["ids"].as_array().map(|ids| {
                ids.iter()
                    .map(|i| i.as_u64().expect("an id") as u32)
                    .collect()
            }),
        })
        .collect();
    assert_eq!(cases.len(), 12, "2 templates x 3 conversations x 2");
    cases
}

/// The real DeepSeek-V2 tokenizer, where the shared folder is beside this checkout.
fn shared_tokenizer() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/tokenizers/deepseek-v2");
    if p.join("tokenizer.json").exists() {
        Some(p)
    } else {
        eprintln!(
            "SKIP: {} not found (the shared folder is not beside this checkout)",
            p.display()
        );
        None
    }
}

#[test]
fn minijinja_renders_what_jinja2_renders() {
    for c in cases() {
        let t = ChatTemplate::from_model_dir(&fixtures().join(&c.template), None)
            .unwrap_or_else(|e| panic!("{}: {e}", c.template))
            .expect("a chat template");
        let got = t
            .render(&c.messages, c.add_generation_prompt)
            .unwrap_or_else(|e| panic!("{} {}: {e}", c.template, c.name));
        assert_eq!(
            got, c.text,
            "{} / {} / add_generation_prompt={}",
            c.template, c.name, c.add_generation_prompt
        );
    }
}

#[test]
fn roles_out_of_order_are_the_templates_error() {
    let t = ChatTemplate::from_model_dir(&fixtures().join("features"), None)
        .expect("loads")
        .expect("a template");
    let e = t
        .render(
            &[ChatMessage::new("user", "a"), ChatMessage::new("user", "b")],
            true,
        )
        .expect_err("two user turns in a row");
    assert!(
        e.to_string()
            .contains("messages: Conversation roles must alternate"),
        "{e}"
    );
}

#[test]
fn the_rendered_text_encodes_to_hf_ids_with_the_real_tokenizer() {
    let Some(dir) = shared_tokenizer() else {
        return;
    };
    let tok = Tokenizer::from_model_dir(&dir, Some(100000)).expect("the DeepSeek-V2 tokenizer");
    let mut checked = 0;
    for c in cases().iter().filter(|c| c.template == "deepseek-v2") {
        let Some(want) = &c.ids else {
            eprintln!("SKIP: expected.json was made without the tokenizer (no ids)");
            return;
        };
        let got = tok.encode_raw(&c.text).expect("encodes");
        assert_eq!(
            &got, want,
            "{} add_generation_prompt={}",
            c.name, c.add_generation_prompt
        );
        assert_eq!(got[0], 100000, "the template's bos_token is the BOS token");
        checked += 1;
    }
    assert_eq!(checked, 6);
}

/// A router on a model dir with DeepSeek-V2's tokenizer and tokenizer_config (random weights of a
/// tiny config with the real vocabulary): a gRPC `messages` prompt is exactly HF's
/// apply_chat_template(tokenize=True) ids (its prompt logprobs list the prompt's ids).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_prompts_with_hf_ids_for_a_conversation() {
    let Some(shared) = shared_tokenizer() else {
        return;
    };
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path();
    let mut cfg = dsv2_core::tiny::config_json();
    cfg["vocab_size"] = 102400.into();
    cfg["bos_token_id"] = 100000.into();
    cfg["eos_token_id"] = 100001.into();
    std::fs::write(dir.join("config.json"), cfg.to_string()).expect("config.json");
    std::fs::copy(shared.join("tokenizer.json"), dir.join("tokenizer.json")).expect("tokenizer");
    std::fs::copy(
        fixtures().join("deepseek-v2/tokenizer_config.json"),
        dir.join("tokenizer_config.json"),
    )
    .expect("tokenizer_config.json");
    let mut cmd = Command::new(bin("dsv2-router"));
    cmd.arg("--model-dir")
        .arg(dir)
        .args(["--random-weights", "3", "--listen", "127.0.0.1:0"]);
    let router = Proc::start("router", cmd);
    let mut client = connect(&router.url()).await;
    for c in cases().iter().filter(|c| c.template == "deepseek-v2") {
        let Some(want) = &c.ids else {
            eprintln!("SKIP: expected.json was made without the tokenizer (no ids)");
            return;
        };
        let req = pb::GenerateRequest {
            prompt: Some(pb::generate_request::Prompt::Messages(pb::ChatMessages {
                messages: c
                    .messages
                    .iter()
                    .map(|m| pb::ChatMessage {
                        role: m.role.clone(),
                        content: m.content.clone(),
                    })
                    .collect(),
                add_generation_prompt: Some(c.add_generation_prompt),
            })),
            max_new_tokens: Some(1),
            temperature: Some(0.0),
            prompt_logprobs: Some(0),
            ..Default::default()
        };
        let r = client
            .generate(req)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", c.name))
            .into_inner();
        let ids: Vec<u32> = r.prompt_logprobs.iter().map(|l| l.token_id).collect();
        assert_eq!(
            &ids, want,
            "{} add_generation_prompt={}",
            c.name, c.add_generation_prompt
        );
        assert_eq!(r.prompt_tokens as usize, want.len());
    }
}
