//! Robustness sweep over the wire: a fixed-seed generator builds a few hundred hostile or
//! extreme requests (Generate, GenerateStream, Tokenize, ModelInfo; sequential, concurrent and
//! cancelled mid-stream) against a router and 2 shards, and every one must end within a deadline
//! with a response or a non-INTERNAL status that matches what the proto documents. Afterwards
//! the router must still be alive, answer health SERVING and give the same greedy output as
//! before the sweep.
//!
//! The expectation of each request comes from the proto's documented rules (an oracle written
//! here, not taken from the router): a request that breaks one must get INVALID_ARGUMENT, a
//! request that breaks none must succeed, and a success must satisfy the response contract
//! (token counts, finish reasons, stop rules, logprob shapes).

use std::time::{Duration, Instant};

use dsv2_e2e::{Cluster, channel, fixture, ids_request, tiny_model};
use dsv2_proto::inference::v1 as pb;
use dsv2_proto::inference::v1::inference_client::InferenceClient;
use pb::generate_request::Prompt;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::task::JoinSet;
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// How long one request may take before it counts as a hang. Generous: debug builds on a busy
/// 2-core machine, and a few requests generate up to ~2500 tokens or prefill 2559.
const DEADLINE: Duration = Duration::from_secs(180);

/// The most alternatives a logprobs request may ask for (proto: N in 0..=20).
const MAX_TOP_LOGPROBS: u32 = 20;

/// The generator's fixed seed: every run sends the same requests.
const SEED: u64 = 0x5eed_d5f2;

type Client = InferenceClient<Channel>;

/// What the model serves, read from ModelInfo (and Tokenize, for the tokenizer).
#[derive(Clone, Debug)]
struct Facts {
    vocab: u32,
    ctx: u64,
    default_max_new: u32,
    eos: Vec<u32>,
    tokenizer: bool,
}

/// What the proto's rules say a request must get.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Expect {
    /// Valid: must succeed (RESOURCE_EXHAUSTED is allowed under concurrency).
    Ok,
    /// Breaks a documented rule: must be INVALID_ARGUMENT.
    Invalid,
    /// Over the transport's message size limit: any error except the forbidden ones.
    Rejected,
    /// Outcome depends on timing (a hostile `grpc-timeout`): anything but the forbidden codes.
    Any,
}

#[derive(Clone, Debug)]
enum Call {
    Generate(pb::GenerateRequest),
    Stream(pb::GenerateRequest),
    /// Read one message (or the error), then drop the stream: a client that cancels.
    StreamCancel(pb::GenerateRequest),
    Tokenize(pb::TokenizeRequest),
    ModelInfo,
}

#[derive(Clone, Debug)]
struct Case {
    label: String,
    call: Call,
    /// A raw `grpc-timeout` header value sent as metadata.
    timeout_header: Option<&'static str>,
    expect: Expect,
    /// Prompt length after tokenization, when known.
    prompt_len: Option<usize>,
}

/// A completed generation, from either RPC.
#[derive(Debug, Default)]
struct Out {
    token_ids: Vec<u32>,
    text: String,
    finish_reason: i32,
    prompt_tokens: u32,
    completion_tokens: u32,
    logprobs: Vec<pb::TokenLogprob>,
    prompt_logprobs: Vec<pb::TokenLogprob>,
    /// Whether a stream ended with a summary (always true for unary).
    summary: bool,
}

fn pick<T: Clone>(rng: &mut ChaCha8Rng, xs: &[T]) -> T {
    xs[rng.random_range(0..xs.len())].clone()
}

/// Text that looks like broken UTF-8 or is otherwise awkward (Rust strings are valid UTF-8, so
/// "invalid" here means replacement characters, lone combining marks, NULs, controls, BOMs).
fn hostile_text(rng: &mut ChaCha8Rng) -> String {
    let pieces = [
        "\u{FFFD}",
        "\u{FFFD}\u{FFFD}\u{FFFD}",
        "\0",
        "\u{0301}",
        "\u{202E}",
        "\u{FEFF}",
        "\u{10FFFF}",
        "🦀",
        "👩‍👩‍👧‍👦",
        "\r\n",
        "\t",
        "\u{7f}",
        "a",
        " ",
        "<｜begin▁of▁sentence｜>",
        "<|endoftext|>",
        "\\xC3\\x28",
        "Ω≈ç√∫",
        "日本語",
        "\u{1}",
    ];
    let n = rng.random_range(1..40);
    (0..n).map(|_| pick(rng, &pieces)).collect()
}

/// Random valid token ids.
fn ids(rng: &mut ChaCha8Rng, n: usize, vocab: u32) -> Vec<u32> {
    (0..n).map(|_| rng.random_range(0..vocab)).collect()
}

/// One generated request (prompt, sampling, stops, logprobs), mostly extreme values.
/// One generated request. Each field is drawn from its documented-invalid values with a small
/// probability, else from valid but extreme values, so about half the requests are valid and
/// reach generation with extreme settings.
fn gen_request(rng: &mut ChaCha8Rng, f: &Facts) -> pb::GenerateRequest {
    let v = f.vocab;
    let ctx = f.ctx as usize;
    let bad = |rng: &mut ChaCha8Rng| rng.random_bool(0.1);
    let token_ids = |ids: Vec<u32>| Some(Prompt::TokenIds(pb::TokenIds { ids }));
    let prompt = if bad(rng) {
        match rng.random_range(0..8) {
            0 => None,
            1 => token_ids(vec![]),
            2 => Some(Prompt::Text(String::new())),
            3 => token_ids(vec![v]),
            4 => token_ids(vec![1, u32::MAX, 2]),
            5 => token_ids(ids(rng, ctx + 1, v)),
            // Far over the context (~0.5 MB on the wire).
            6 => token_ids(ids(rng, 100_000, v)),
            _ => Some(Prompt::Text("x".repeat(rng.random_range(1..20_000)))),
        }
    } else {
        match rng.random_range(0..16) {
            0 => token_ids(vec![v - 1, 0, v - 1]),
            // At the context limit (with max_new_tokens to match, below).
            1 => {
                let n = ctx - rng.random_range(1..4);
                token_ids(ids(rng, n, v))
            }
            2 => token_ids(ids(rng, ctx, v)),
            3 | 4 => Some(Prompt::Text(hostile_text(rng))),
            5 => Some(Prompt::Text(hostile_text(rng).repeat(20))),
            _ => {
                let n = rng.random_range(1..48);
                token_ids(ids(rng, n, v))
            }
        }
    };
    let plen = match &prompt {
        Some(Prompt::TokenIds(t)) => t.ids.len() as u32,
        _ => 8,
    };
    let room = (f.ctx as u32).saturating_sub(plen);
    let max_new_tokens = if bad(rng) {
        pick(
            rng,
            &[
                Some(0),
                Some(u32::MAX),
                Some(u32::MAX / 2),
                Some(f.ctx as u32),
                Some(room + 1),
            ],
        )
    } else if room <= 64 {
        // Exactly the room left (a long prompt), or the default if it still fits.
        pick(rng, &[Some(room), Some(room.min(1))])
    } else {
        pick(
            rng,
            &[
                None,
                Some(1),
                Some(1),
                Some(2),
                Some(3),
                Some(5),
                Some(8),
                Some(16),
            ],
        )
    };
    let temperature = if bad(rng) {
        pick(
            rng,
            &[
                f32::NAN,
                f32::INFINITY,
                f32::NEG_INFINITY,
                -1e-45,
                -1.0,
                f32::MIN,
            ],
        )
        .into()
    } else {
        pick(
            rng,
            &[
                None,
                Some(0.0),
                Some(0.0),
                Some(-0.0),
                Some(1.0),
                Some(0.7),
                Some(1e-45),
                Some(f32::MIN_POSITIVE),
                Some(1e-30),
                Some(1e30),
                Some(f32::MAX),
            ],
        )
    };
    let top_p = if bad(rng) {
        pick(
            rng,
            &[f32::NAN, 0.0, -0.0, 1.000_000_1, f32::INFINITY, -1.0],
        )
        .into()
    } else {
        pick(
            rng,
            &[
                None,
                None,
                Some(1.0),
                Some(0.5),
                Some(1e-30),
                Some(f32::MIN_POSITIVE),
            ],
        )
    };
    let top_k = pick(rng, &[0, 0, 1, 2, v - 1, v, v + 1, u32::MAX]);
    let seed = pick(
        rng,
        &[None, Some(0), Some(1), Some(u64::MAX), Some(1 << 63)],
    );
    let stop: Vec<String> = if bad(rng) {
        pick(rng, &[vec![String::new()], vec!["a".into(), String::new()]])
    } else {
        match rng.random_range(0..8) {
            0 => (0..500)
                .map(|_| {
                    let n = rng.random_range(1..64);
                    (0..n)
                        .map(|_| char::from(rng.random_range(b' '..=b'~')))
                        .collect()
                })
                .collect(),
            1 => vec!["y".repeat(1 << 20)],
            2 => vec![hostile_text(rng), "\u{FFFD}".into()],
            3 => vec!["e".into(), " ".into()],
            _ => vec![],
        }
    };
    let stop_token_ids = if bad(rng) {
        pick(rng, &[vec![v], vec![u32::MAX], vec![v - 1, v + 7]])
    } else {
        match rng.random_range(0..8) {
            0 => vec![0, v - 1],
            1 => ids(rng, 10_000, v),
            2 => ids(rng, 3, v),
            _ => vec![],
        }
    };
    let logprobs = |rng: &mut ChaCha8Rng| {
        if bad(rng) {
            pick(rng, &[Some(MAX_TOP_LOGPROBS + 1), Some(u32::MAX)])
        } else {
            pick(rng, &[None, None, Some(0), Some(1), Some(MAX_TOP_LOGPROBS)])
        }
    };
    let (logprobs, prompt_logprobs) = (logprobs(rng), logprobs(rng));
    pb::GenerateRequest {
        prompt,
        max_new_tokens,
        temperature,
        top_k,
        top_p,
        seed,
        stop,
        stop_token_ids,
        logprobs,
        prompt_logprobs,
        ignore_eos: rng.random_bool(0.5),
        prompt_logprobs_skip_tokens: pick(rng, &[0, 0, 0, 1, 2, 17, 40, 100_000]),
    }
}

fn gen_tokenize(rng: &mut ChaCha8Rng) -> pb::TokenizeRequest {
    let text = match rng.random_range(0..6) {
        0 => String::new(),
        1 => hostile_text(rng),
        2 => hostile_text(rng).repeat(2000),
        // ~1 MB of mixed characters.
        3 => (0..(1 << 20) / 4)
            .map(|_| char::from_u32(rng.random_range(1..0xD7FF)).unwrap_or('?'))
            .collect(),
        4 => (0u8..=255).map(char::from).collect(),
        _ => "z".repeat(rng.random_range(1..100_000)),
    };
    pb::TokenizeRequest {
        text,
        add_bos_token: rng.random_bool(0.5),
    }
}

/// A short description of a request for failure reports (never the whole 1 MB string).
fn describe(r: &pb::GenerateRequest) -> String {
    let prompt = match &r.prompt {
        None => "none".to_string(),
        Some(Prompt::TokenIds(t)) => format!(
            "ids[len {}, max {:?}]",
            t.ids.len(),
            t.ids.iter().max().copied()
        ),
        Some(Prompt::Text(t)) => format!(
            "text[{} bytes: {:?}]",
            t.len(),
            t.chars().take(12).collect::<String>()
        ),
        Some(Prompt::Messages(m)) => format!("messages[{}]", m.messages.len()),
    };
    let stop_max = r.stop.iter().map(String::len).max();
    format!(
        "prompt={prompt} max_new={:?} temp={:?} top_p={:?} top_k={} seed={:?} stop=[n {}, longest {:?}] \
         stop_ids=[n {}, max {:?}] logprobs={:?} prompt_logprobs={:?} skip={} ignore_eos={}",
        r.max_new_tokens,
        r.temperature,
        r.top_p,
        r.top_k,
        r.seed,
        r.stop.len(),
        stop_max,
        r.stop_token_ids.len(),
        r.stop_token_ids.iter().max(),
        r.logprobs,
        r.prompt_logprobs,
        r.prompt_logprobs_skip_tokens,
        r.ignore_eos
    )
}

/// The proto's rules for a GenerateRequest, given the prompt length after tokenization
/// (`None` when the text could not be tokenized).
fn oracle(r: &pb::GenerateRequest, plen: Option<usize>, f: &Facts) -> Expect {
    let n = match &r.prompt {
        None => return Expect::Invalid,
        Some(Prompt::TokenIds(t)) => {
            if t.ids.is_empty() || t.ids.iter().any(|&i| i >= f.vocab) {
                return Expect::Invalid;
            }
            t.ids.len()
        }
        Some(Prompt::Text(t)) => {
            if t.is_empty() || !f.tokenizer {
                return Expect::Invalid;
            }
            match plen {
                Some(n) => n,
                None => return Expect::Rejected,
            }
        }
        // This fuzzer makes no conversations.
        Some(Prompt::Messages(_)) => return Expect::Any,
    };
    let max_new = r.max_new_tokens.unwrap_or(f.default_max_new);
    let temperature = r.temperature.unwrap_or(1.0);
    let top_p = r.top_p.unwrap_or(1.0);
    let broken = max_new == 0
        || r.logprobs.is_some_and(|n| n > MAX_TOP_LOGPROBS)
        || r.prompt_logprobs.is_some_and(|n| n > MAX_TOP_LOGPROBS)
        || !temperature.is_finite()
        || temperature < 0.0
        || !(top_p > 0.0 && top_p <= 1.0)
        || r.stop_token_ids.iter().any(|&i| i >= f.vocab)
        || r.stop.iter().any(String::is_empty)
        || (!r.stop.is_empty() && !f.tokenizer)
        || n as u64 + max_new as u64 > f.ctx;
    if broken { Expect::Invalid } else { Expect::Ok }
}

/// The response contract of a successful generation; returns what it breaks.
fn check_output(r: &pb::GenerateRequest, plen: Option<usize>, o: &Out, f: &Facts) -> Vec<String> {
    let mut bad = Vec::new();
    let max_new = r.max_new_tokens.unwrap_or(f.default_max_new) as usize;
    let n = o.token_ids.len();
    if !o.summary {
        bad.push("stream ended without a summary".into());
    }
    if o.completion_tokens as usize != n {
        bad.push(format!(
            "completion_tokens {} != {n} ids",
            o.completion_tokens
        ));
    }
    if n == 0 || n > max_new {
        bad.push(format!("{n} tokens for max_new_tokens {max_new}"));
    }
    if let Some(p) = plen
        && o.prompt_tokens as usize != p
    {
        bad.push(format!("prompt_tokens {} != {p}", o.prompt_tokens));
    }
    if let Some(t) = o.token_ids.iter().find(|&&t| t >= f.vocab) {
        bad.push(format!("generated id {t} outside the vocabulary"));
    }
    let ends = |t: u32| r.stop_token_ids.contains(&t) || (!r.ignore_eos && f.eos.contains(&t));
    // Generation ends at the first stop/EOS token: none may come before the last one.
    if let Some(t) = o.token_ids[..n.saturating_sub(1)]
        .iter()
        .find(|&&t| ends(t))
    {
        bad.push(format!("token {t} should have ended generation earlier"));
    }
    let last = o.token_ids.last().copied();
    use pb::FinishReason as F;
    match F::try_from(o.finish_reason) {
        Ok(F::Length) => {
            if n != max_new {
                bad.push(format!("LENGTH after {n} of {max_new} tokens"));
            }
            if last.is_some_and(ends) {
                bad.push("LENGTH although the last token is a stop/EOS token".into());
            }
        }
        Ok(F::Eos) => {
            if r.ignore_eos || !last.is_some_and(|t| f.eos.contains(&t)) {
                bad.push(format!(
                    "EOS with ignore_eos={} last={last:?}",
                    r.ignore_eos
                ));
            }
        }
        Ok(F::Stop) => {
            if !last.is_some_and(|t| r.stop_token_ids.contains(&t)) && r.stop.is_empty() {
                bad.push(format!("STOP without a stop rule (last {last:?})"));
            }
        }
        other => bad.push(format!("finish reason {other:?}")),
    }
    if let Some(s) = r.stop.iter().find(|s| o.text.contains(s.as_str())) {
        bad.push(format!(
            "text contains stop string {:?}",
            s.chars().take(20).collect::<String>()
        ));
    }
    let lp_ok = |l: &pb::TokenLogprob| l.logprob.is_some_and(|x| x.is_finite() && x <= 1e-3);
    match r.logprobs {
        None if !o.logprobs.is_empty() => bad.push("logprobs returned unasked".into()),
        None => {}
        Some(k) => {
            if o.logprobs.len() != n {
                bad.push(format!(
                    "logprobs={k}: {} entries for {n} tokens",
                    o.logprobs.len()
                ));
            }
            for (i, l) in o.logprobs.iter().enumerate() {
                if o.token_ids.get(i) != Some(&l.token_id) || !lp_ok(l) {
                    bad.push(format!("logprobs[{i}] = {l:?}"));
                    break;
                }
                if l.top_logprobs.len() != (k as usize).min(f.vocab as usize) {
                    bad.push(format!(
                        "logprobs[{i}]: {} alternatives, asked {k}",
                        l.top_logprobs.len()
                    ));
                    break;
                }
            }
        }
    }
    match r.prompt_logprobs {
        None if !o.prompt_logprobs.is_empty() => {
            bad.push("prompt_logprobs returned unasked".into())
        }
        None => {}
        Some(k) => {
            if plen.is_some_and(|p| p != o.prompt_logprobs.len()) {
                bad.push(format!(
                    "prompt_logprobs: {} entries for a {plen:?}-token prompt",
                    o.prompt_logprobs.len()
                ));
            }
            if let Some(Prompt::TokenIds(t)) = &r.prompt {
                let got: Vec<u32> = o.prompt_logprobs.iter().map(|l| l.token_id).collect();
                if got != t.ids {
                    bad.push("prompt_logprobs token ids differ from the prompt".into());
                }
            }
            let skip = (r.prompt_logprobs_skip_tokens as usize).max(1);
            for (i, l) in o.prompt_logprobs.iter().enumerate() {
                let ok = if i < skip {
                    l.logprob.is_none() && l.top_logprobs.is_empty()
                } else {
                    lp_ok(l) && l.top_logprobs.len() == (k as usize).min(f.vocab as usize)
                };
                if !ok {
                    bad.push(format!("prompt_logprobs[{i}] = {l:?} (asked {k})"));
                    break;
                }
            }
        }
    }
    bad
}

/// Codes that mean a bug: INTERNAL/UNKNOWN (a panic or an unmapped error), UNAVAILABLE (the
/// shards are up, so this is a dropped connection or a request that broke a shard), and codes
/// the router never means to send.
fn forbidden(c: Code) -> bool {
    matches!(
        c,
        Code::Internal | Code::Unknown | Code::Unavailable | Code::DataLoss | Code::Unimplemented
    )
}

fn with_header<T>(msg: T, header: Option<&'static str>) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    if let Some(h) = header {
        req.metadata_mut()
            .insert("grpc-timeout", h.parse().expect("an ASCII metadata value"));
    }
    req
}

async fn run_generate(
    c: &mut Client,
    r: tonic::Request<pb::GenerateRequest>,
) -> Result<Out, tonic::Status> {
    let g = c.generate(r).await?.into_inner();
    Ok(Out {
        token_ids: g.token_ids,
        text: g.text,
        finish_reason: g.finish_reason,
        prompt_tokens: g.prompt_tokens,
        completion_tokens: g.completion_tokens,
        logprobs: g.logprobs,
        prompt_logprobs: g.prompt_logprobs,
        summary: true,
    })
}

async fn run_stream(
    c: &mut Client,
    r: tonic::Request<pb::GenerateRequest>,
    cancel_after_first: bool,
) -> Result<Option<Out>, tonic::Status> {
    let mut s = c.generate_stream(r).await?.into_inner();
    let mut o = Out::default();
    while let Some(m) = s.message().await? {
        if cancel_after_first {
            return Ok(None);
        }
        if o.summary {
            return Err(tonic::Status::data_loss(
                "test: a message after the summary",
            ));
        }
        o.token_ids.extend(&m.token_ids);
        o.text.push_str(&m.text);
        o.logprobs.extend(m.logprobs);
        o.prompt_logprobs.extend(m.prompt_logprobs);
        if let Some(sum) = m.summary {
            o.summary = true;
            o.finish_reason = sum.finish_reason;
            o.prompt_tokens = sum.prompt_tokens;
            o.completion_tokens = sum.completion_tokens;
        }
    }
    Ok(Some(o))
}

/// Runs one case under `DEADLINE`; returns a failure description, or None when it behaved.
async fn run_case(mut c: Client, case: Case, f: Facts, concurrent: bool) -> Option<String> {
    let t0 = Instant::now();
    let label = &case.label;
    let fut = async {
        match &case.call {
            Call::Generate(r) => run_generate(&mut c, with_header(r.clone(), case.timeout_header))
                .await
                .map(|o| Some((r, o))),
            Call::Stream(r) => {
                run_stream(&mut c, with_header(r.clone(), case.timeout_header), false)
                    .await
                    .map(|o| o.map(|o| (r, o)))
            }
            Call::StreamCancel(r) => {
                run_stream(&mut c, with_header(r.clone(), case.timeout_header), true)
                    .await
                    .map(|o| o.map(|o| (r, o)))
            }
            Call::Tokenize(r) => {
                let res = c
                    .tokenize(with_header(r.clone(), case.timeout_header))
                    .await
                    .map(|t| t.into_inner());
                match res {
                    Ok(t)
                        if t.token_ids.len() != t.tokens.len()
                            || t.token_ids.iter().any(|&i| i >= f.vocab) =>
                    {
                        Err(tonic::Status::data_loss(format!(
                            "test: Tokenize gave {} ids, {} tokens, max id {:?}",
                            t.token_ids.len(),
                            t.tokens.len(),
                            t.token_ids.iter().max()
                        )))
                    }
                    Ok(_) => Ok(None),
                    Err(e) => Err(e),
                }
            }
            Call::ModelInfo => c
                .model_info(with_header(pb::ModelInfoRequest {}, case.timeout_header))
                .await
                .map(|_| None),
        }
    };
    let res = match tokio::time::timeout(DEADLINE, fut).await {
        Err(_) => return Some(format!("{label}: no answer within {DEADLINE:?} (hang)")),
        Ok(r) => r,
    };
    let took = t0.elapsed();
    match (res, case.expect) {
        (Err(e), _) if forbidden(e.code()) => Some(format!(
            "{label}: {:?} {:?} after {took:?}",
            e.code(),
            e.message()
        )),
        (Err(_), Expect::Any | Expect::Rejected) => None,
        (Err(e), Expect::Invalid) if e.code() == Code::InvalidArgument => None,
        (Err(e), Expect::Ok) if concurrent && e.code() == Code::ResourceExhausted => None,
        (Err(e), _) => Some(format!(
            "{label}: expected {:?}, got {:?} {:?}",
            case.expect,
            e.code(),
            e.message()
        )),
        (Ok(_), Expect::Invalid | Expect::Rejected) => Some(format!(
            "{label}: expected {:?}, but it succeeded",
            case.expect
        )),
        (Ok(Some((r, o))), _) => {
            let bad = check_output(r, case.prompt_len, &o, &f);
            (!bad.is_empty()).then(|| format!("{label}: {}", bad.join("; ")))
        }
        (Ok(None), _) => None,
    }
}

/// The hostile `grpc-timeout` values: unparseable ones must be ignored, tiny ones may end the
/// call with a deadline status, huge ones must not overflow.
const TIMEOUT_HEADERS: &[&str] = &[
    "0n",
    "1n",
    "1u",
    "99999999H",
    "123456789S",
    "18446744073709551615H",
    "-1S",
    "1.5S",
    "S",
    "garbage",
];

async fn facts(c: &mut Client) -> Facts {
    let info = c
        .model_info(pb::ModelInfoRequest {})
        .await
        .expect("ModelInfo")
        .into_inner();
    let tokenizer = match c
        .tokenize(pb::TokenizeRequest {
            text: "probe".into(),
            add_bos_token: false,
        })
        .await
    {
        Ok(_) => true,
        Err(e) if e.code() == Code::FailedPrecondition => false,
        Err(e) => panic!("Tokenize probe: {e}"),
    };
    Facts {
        vocab: info.vocab_size,
        ctx: info.max_context_tokens as u64,
        default_max_new: info.default_max_new_tokens,
        eos: info.eos_token_ids,
        tokenizer,
    }
}

/// Builds `count` cases from the fixed seed; text prompts are tokenized first (Tokenize with
/// BOS, as Generate does) so the oracle knows their length.
async fn build_cases(c: &mut Client, f: &Facts, count: usize) -> Vec<Case> {
    let mut rng = ChaCha8Rng::seed_from_u64(SEED);
    let mut cases = Vec::with_capacity(count);
    for i in 0..count {
        let kind = rng.random_range(0..20);
        let timeout_header = rng
            .random_bool(0.08)
            .then(|| pick(&mut rng, TIMEOUT_HEADERS));
        let case = match kind {
            0..=1 => {
                let r = gen_tokenize(&mut rng);
                let label = format!(
                    "#{i} Tokenize text[{} bytes] bos={}",
                    r.text.len(),
                    r.add_bos_token
                );
                Case {
                    label,
                    call: Call::Tokenize(r),
                    timeout_header,
                    // Every generated text is far under the 4 MB message limit.
                    expect: if f.tokenizer { Expect::Ok } else { Expect::Any },
                    prompt_len: None,
                }
            }
            2 => Case {
                label: format!("#{i} ModelInfo"),
                call: Call::ModelInfo,
                timeout_header,
                expect: Expect::Ok,
                prompt_len: None,
            },
            _ => {
                let r = gen_request(&mut rng, f);
                let plen = match &r.prompt {
                    Some(Prompt::TokenIds(t)) => Some(t.ids.len()),
                    Some(Prompt::Text(t)) if f.tokenizer && !t.is_empty() => c
                        .tokenize(pb::TokenizeRequest {
                            text: t.clone(),
                            add_bos_token: true,
                        })
                        .await
                        .ok()
                        .map(|t| t.into_inner().token_ids.len()),
                    _ => None,
                };
                let expect = oracle(&r, plen, f);
                let (name, call) = match kind {
                    3..=10 => ("Generate", Call::Generate(r.clone())),
                    11..=17 => ("GenerateStream", Call::Stream(r.clone())),
                    _ => ("GenerateStream(cancel)", Call::StreamCancel(r.clone())),
                };
                Case {
                    label: format!("#{i} {name} {}", describe(&r)),
                    call,
                    timeout_header,
                    expect,
                    prompt_len: plen,
                }
            }
        };
        let mut case = case;
        if let Some(h) = case.timeout_header {
            case.label.push_str(&format!(" grpc-timeout={h}"));
            // A deadline that has (nearly) passed may end any call; the rest never shorten it.
            if matches!(h, "0n" | "1n" | "1u") {
                case.expect = Expect::Any;
            }
        }
        cases.push(case);
    }
    cases
}

async fn health(url: &str) -> ServingStatus {
    let mut h = HealthClient::new(channel(url).await);
    let r = h
        .check(HealthCheckRequest {
            service: "dsv2.v1.Inference".into(),
        })
        .await
        .expect("health check answers")
        .into_inner();
    ServingStatus::try_from(r.status).unwrap_or(ServingStatus::Unknown)
}

/// The sweep on one model: `count` cases, the first half one by one, the rest in concurrent
/// batches of 16; then liveness, health and an unchanged greedy output.
async fn sweep(c: &mut Cluster, count: usize) {
    // A valid Tokenize of ~0.8 MB of text answers ~5 MB (ids and token strings): past tonic's
    // default 4 MB receive limit, which would make the client, not the router, fail it.
    let mut client = c.client().await.max_decoding_message_size(64 << 20);
    let f = facts(&mut client).await;
    let reference = ids_request(&[3, 1, 4, 1, 5, 9, 2, 6], 12);
    let before = client
        .generate(reference.clone())
        .await
        .expect("the reference request before the sweep")
        .into_inner();

    let cases = build_cases(&mut client, &f, count).await;
    let expected_ok = cases.iter().filter(|c| c.expect == Expect::Ok).count();
    let expected_invalid = cases.iter().filter(|c| c.expect == Expect::Invalid).count();
    eprintln!(
        "robustness sweep on {}: {} cases ({expected_ok} valid, {expected_invalid} invalid), facts {f:?}",
        c.model_dir.display(),
        cases.len()
    );
    let mut failures = Vec::new();
    let t0 = Instant::now();
    let (seq, conc) = cases.split_at(cases.len() / 2);
    for case in seq {
        if let Some(e) = run_case(client.clone(), case.clone(), f.clone(), false).await {
            failures.push(e);
        }
        if let Some(st) = c.router.exited() {
            panic!(
                "the router exited ({st}) during {}; failures so far: {failures:#?}",
                case.label
            );
        }
    }
    for batch in conc.chunks(16) {
        let mut set = JoinSet::new();
        for case in batch {
            set.spawn(run_case(client.clone(), case.clone(), f.clone(), true));
        }
        while let Some(r) = set.join_next().await {
            if let Some(e) = r.expect("a sweep task") {
                failures.push(e);
            }
        }
        if let Some(st) = c.router.exited() {
            panic!("the router exited ({st}); failures so far: {failures:#?}");
        }
    }
    eprintln!(
        "robustness sweep: {} cases in {:?}, {} failures",
        cases.len(),
        t0.elapsed(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {} requests misbehaved:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    for e in &mut c.experts {
        assert!(e.exited().is_none(), "{} exited during the sweep", e.name);
    }
    assert_eq!(health(&c.endpoint()).await, ServingStatus::Serving);
    // The smallest positive temperatures are valid and sharpen the distribution onto its
    // argmax: they must give the greedy tokens, not whatever overflowing logits / temperature
    // to infinity makes of the draw.
    for t in [1e-45f32, f32::MIN_POSITIVE, 1e-30] {
        let mut r = reference.clone();
        r.temperature = Some(t);
        r.seed = Some(7);
        let got = client
            .generate(r)
            .await
            .expect("a tiny-temperature request")
            .into_inner();
        assert_eq!(
            got.token_ids, before.token_ids,
            "temperature {t:e} did not give the greedy tokens"
        );
    }
    // A fresh connection, so a broken shared channel cannot hide behind the old one.
    let mut fresh = c.client().await;
    let after = fresh
        .generate(reference.clone())
        .await
        .expect("the reference request after the sweep")
        .into_inner();
    assert_eq!(
        (after.token_ids, after.text, after.finish_reason),
        (before.token_ids, before.text, before.finish_reason),
        "the greedy reference output changed after the sweep"
    );
}

/// The golden v2 fixture (no tokenizer: text prompts, stop strings and Tokenize are refused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_request_sweep_v2_fixture() {
    let mut c = Cluster::two_shards(&fixture("v2"), &[]);
    sweep(&mut c, 320).await;
}

/// The embedded tiny model, whose tokenizer makes text prompts, stop strings and Tokenize real.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_request_sweep_tiny_model_with_tokenizer() {
    let mut c = Cluster::two_shards(&tiny_model(), &[]);
    sweep(&mut c, 320).await;
}
