//! Property tests of the gRPC API's request validation (GenerateRequest bytes anyone can send):
//! the router's parsing (`RequestParser`) and then the engine's `RequestLimits::validate`, the
//! path every Generate / GenerateStream call takes before any engine work. Any request decoded
//! from any bytes, and any request built from arbitrary field values, is accepted or refused
//! with INVALID_ARGUMENT whose message names the field it is about; nothing panics.

use std::path::PathBuf;
use std::sync::OnceLock;

use dsv2_core::chat::ChatTemplate;
use dsv2_core::config::ModelConfig;
use dsv2_core::engine::RequestLimits;
use dsv2_core::tokenizer::Tokenizer;
use dsv2_proto::inference::v1 as pb;
use dsv2_router::request::RequestParser;
use dsv2_router::status::{self, field_of};
use proptest::prelude::*;
use prost::Message;

/// The trained tiny model's tokenizer, chat template and limits (made once per test binary).
struct Served {
    tokenizer: Tokenizer,
    template: Option<ChatTemplate>,
    limits: RequestLimits,
}

fn served() -> &'static Served {
    static S: OnceLock<Served> = OnceLock::new();
    S.get_or_init(|| {
        let root: PathBuf =
            std::env::temp_dir().join(format!("dsv2-prop-grpc-{}", std::process::id()));
        let dir = dsv2_core::tiny::resolve_model_dir("tiny", &root).expect("tiny model");
        let cfg = ModelConfig::from_model_dir(&dir).expect("config");
        Served {
            tokenizer: Tokenizer::from_model_dir(&dir, cfg.bos_token_id).expect("tokenizer"),
            template: ChatTemplate::from_model_dir(&dir, None).expect("template"),
            limits: RequestLimits {
                vocab_size: cfg.vocab_size,
                max_context_tokens: cfg.max_position_embeddings,
                cache_capacity_tokens: 4096,
                block_size: 16,
                has_tokenizer: true,
            },
        }
    })
}

/// The checks a call goes through before the engine queues it; the refusal's message, if any.
fn check(req: &pb::GenerateRequest, with_template: bool) -> Result<(), tonic::Status> {
    let s = served();
    let parser = RequestParser {
        tokenizer: Some(&s.tokenizer),
        chat_template: if with_template {
            s.template.as_ref()
        } else {
            None
        },
        model_name: "tiny",
        default_max_new_tokens: 16,
    };
    let (prompt, params) = parser.parse(req)?;
    s.limits
        .validate(&prompt, &params)
        .map_err(|e| status::from_core(&e))
}

fn assert_names_a_field(st: &tonic::Status) -> Result<(), TestCaseError> {
    prop_assert_eq!(st.code(), tonic::Code::InvalidArgument, "{}", st.message());
    prop_assert!(
        field_of(st.message()).is_some(),
        "no field named: {}",
        st.message()
    );
    Ok(())
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "[a-zA-Z ,.\\n]{1,40}",
        any::<String>().prop_map(|s| s.chars().take(40).collect()),
    ]
}

fn prompt() -> impl Strategy<Value = Option<pb::generate_request::Prompt>> {
    use pb::generate_request::Prompt;
    let message = (
        prop_oneof![
            Just(String::new()),
            Just("user".to_string()),
            Just("system".to_string()),
            Just("assistant".to_string()),
            "[a-z]{1,8}",
        ],
        text(),
    )
        .prop_map(|(role, content)| pb::ChatMessage { role, content });
    prop_oneof![
        Just(None),
        text().prop_map(|t| Some(Prompt::Text(t))),
        proptest::collection::vec(prop_oneof![0u32..3000, any::<u32>()], 0..40)
            .prop_map(|ids| Some(Prompt::TokenIds(pb::TokenIds { ids }))),
        (
            proptest::collection::vec(message, 0..4),
            proptest::option::of(any::<bool>())
        )
            .prop_map(|(messages, add_generation_prompt)| Some(Prompt::Messages(
                pb::ChatMessages {
                    messages,
                    add_generation_prompt,
                }
            ))),
    ]
}

fn float() -> impl Strategy<Value = Option<f32>> {
    proptest::option::of(prop_oneof![
        -2.0f32..3.0,
        Just(f32::NAN),
        Just(f32::INFINITY),
        Just(f32::NEG_INFINITY),
        any::<f32>(),
    ])
}

fn small_or_any() -> impl Strategy<Value = u32> {
    prop_oneof![0u32..64, any::<u32>()]
}

fn request() -> impl Strategy<Value = pb::GenerateRequest> {
    (
        prompt(),
        proptest::option::of(small_or_any()),
        (
            float(),
            float(),
            small_or_any(),
            proptest::option::of(any::<u64>()),
        ),
        proptest::collection::vec(any::<u32>(), 0..3),
        proptest::collection::vec(text(), 0..3),
        any::<bool>(),
        (
            proptest::option::of(small_or_any()),
            proptest::option::of(small_or_any()),
            small_or_any(),
        ),
    )
        .prop_map(
            |(
                prompt,
                max_new_tokens,
                (temperature, top_p, top_k, seed),
                stop_token_ids,
                stop,
                ignore_eos,
                (logprobs, prompt_logprobs, skip),
            )| pb::GenerateRequest {
                prompt,
                max_new_tokens,
                temperature,
                top_p,
                top_k,
                seed,
                stop_token_ids,
                stop,
                ignore_eos,
                logprobs,
                prompt_logprobs,
                prompt_logprobs_skip_tokens: skip,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn any_bytes_decode_and_validate_or_fail_naming_a_field(
        bytes in proptest::collection::vec(any::<u8>(), 0..200),
        with_template in any::<bool>(),
    ) {
        // bytes prost cannot decode never reach the service (tonic answers them itself)
        if let Ok(req) = pb::GenerateRequest::decode(bytes.as_slice())
            && let Err(st) = check(&req, with_template)
        {
            assert_names_a_field(&st)?;
        }
    }

    #[test]
    fn any_field_values_validate_or_fail_naming_a_field(
        req in request(),
        with_template in any::<bool>(),
    ) {
        if let Err(st) = check(&req, with_template) {
            assert_names_a_field(&st)?;
        }
    }
}

#[test]
fn a_plain_request_passes_and_bad_ones_name_their_field() {
    use pb::generate_request::Prompt;
    let ok = pb::GenerateRequest {
        prompt: Some(Prompt::Text("The router receives a request".into())),
        max_new_tokens: Some(8),
        ..Default::default()
    };
    assert!(check(&ok, true).is_ok());
    for (req, field) in [
        (
            pb::GenerateRequest {
                max_new_tokens: Some(8),
                ..Default::default()
            },
            "prompt",
        ),
        (
            pb::GenerateRequest {
                logprobs: Some(1000),
                ..ok.clone()
            },
            "logprobs",
        ),
        (
            pb::GenerateRequest {
                prompt: Some(Prompt::Messages(pb::ChatMessages::default())),
                ..ok.clone()
            },
            "messages",
        ),
        (
            pb::GenerateRequest {
                prompt: Some(Prompt::TokenIds(pb::TokenIds {
                    ids: vec![u32::MAX],
                })),
                ..ok.clone()
            },
            "prompt",
        ),
    ] {
        let st = check(&req, true).expect_err("refused");
        assert_eq!(field_of(st.message()), Some(field), "{}", st.message());
    }
}
