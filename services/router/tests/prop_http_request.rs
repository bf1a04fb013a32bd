//! Property tests of the HTTP API's request decoder (a body anyone can send): any bytes, and any
//! JSON object over the fields the API knows with values of any type, parse or fail without a
//! panic, and every failure names the field it is about (or the body, when it is not an object).

use dsv2_router::http::request::{Endpoint, parse};
use dsv2_router::status::field_of;
use proptest::prelude::*;
use serde_json::{Map, Value, json};

/// Fields of /v1/completions and /v1/chat/completions, plus one the API does not know.
const KEYS: &[&str] = &[
    "model",
    "prompt",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "stop_token_ids",
    "n",
    "stream",
    "stream_options",
    "logprobs",
    "top_logprobs",
    "ignore_eos",
    "echo",
    "suffix",
    "best_of",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logit_bias",
    "tools",
    "functions",
    "response_format",
    "add_generation_prompt",
    "user",
    "role",
    "content",
    "include_usage",
];

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        prop_oneof![-3i64..300, Just(u32::MAX as i64 + 1)].prop_map(Value::from),
        any::<f64>()
            .prop_filter("JSON has no NaN/inf", |f| f.is_finite())
            .prop_map(Value::from),
        "[a-z \\n]{0,12}".prop_map(Value::from),
        Just(json!("user")),
        Just(json!("tiny")),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            proptest::collection::vec((proptest::sample::select(KEYS), inner), 0..4).prop_map(
                |kv| Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
            ),
        ]
    })
}

fn body() -> impl Strategy<Value = Map<String, Value>> {
    proptest::collection::vec((proptest::sample::select(KEYS), value()), 0..8)
        .prop_map(|kv| kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
}

fn endpoint() -> impl Strategy<Value = Endpoint> {
    prop_oneof![Just(Endpoint::Completions), Just(Endpoint::Chat)]
}

proptest! {
    #[test]
    fn any_bytes_parse_or_fail_naming_the_body_or_a_field(
        bytes in proptest::collection::vec(any::<u8>(), 0..256),
        ep in endpoint(),
    ) {
        if let Err(st) = parse(ep, &bytes, "tiny") {
            let m = st.message();
            prop_assert!(m.starts_with("the body") || field_of(m).is_some(), "{}", m);
        }
    }

    #[test]
    fn any_object_parses_or_fails_naming_one_of_its_fields(map in body(), ep in endpoint()) {
        let bytes = serde_json::to_vec(&Value::Object(map.clone())).expect("serializable");
        if let Err(st) = parse(ep, &bytes, "tiny") {
            let m = st.message();
            let field = field_of(m);
            prop_assert!(field.is_some(), "no field named: {}", m);
            let root = field.unwrap_or_default().split(['.', '[']).next().unwrap_or_default();
            // A missing required field is named too (`prompt`, `messages`), though absent.
            prop_assert!(
                map.contains_key(root) || root == "prompt" || root == "messages",
                "{} names {:?}, not a field of {:?}", m, root, map.keys().collect::<Vec<_>>()
            );
        }
    }
}
