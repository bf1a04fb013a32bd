//! `dsv2 generate`: one prompt in, text out — the equivalent of the seed's run.py.

use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args as ClapArgs;
use dsv2_core::engine::{
    Engine, EngineConfig, FinishReason, GenerateParams, SeqRequest, run_to_completion,
};
use dsv2_core::sampling::SamplingParams;

use dsv2_core::backend::Backend;

use crate::common::{load_with, parse_ids};

#[derive(ClapArgs, Debug, Clone)]
pub struct Args {
    /// Model directory (Hugging Face layout), `tiny` (the embedded model trained on the Rust book)
    /// or `tiny-random` (the embedded random-weight model).
    #[arg(long, default_value = "tiny")]
    pub model_dir: String,
    /// Serve the random weights of the model dir's config.json drawn from this seed (as
    /// `dsv2 init-random --seed SEED` writes them) instead of reading weight files.
    #[arg(long, value_name = "SEED")]
    pub random_weights: Option<u64>,
    /// Prompt text (tokenized with the model's tokenizer, BOS added as its config says).
    #[arg(
        long,
        conflicts_with = "input_ids",
        required_unless_present = "input_ids"
    )]
    pub input_text: Option<String>,
    /// Prompt as comma-separated token ids, used as given.
    #[arg(long)]
    pub input_ids: Option<String>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 32)]
    pub max_output_len: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub temperature: f32,
    /// Keep only the k most likely tokens (0: off).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Nucleus sampling threshold in (0, 1].
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub top_p: f32,
    /// Random seed for reproducible sampling.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop when the text contains this string (repeatable); the string is not returned.
    #[arg(long = "stop")]
    pub stop: Vec<String>,
    /// Stop after any of these comma-separated token ids.
    #[arg(long)]
    pub stop_token_ids: Option<String>,
    /// Keep generating past the end-of-sequence token.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Print one JSON object (output_ids, text, finish_reason, timings) instead of the text.
    #[arg(long)]
    pub json: bool,
    /// Log-probability of each generated token and its N most likely alternatives (0..=20;
    /// shown with --json as "logprobs").
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=20))]
    pub logprobs: u32,
    /// Log-probability of each prompt token and its N most likely alternatives (0..=20; shown
    /// with --json as "prompt_logprobs").
    #[arg(long, value_parser = clap::value_parser!(u32).range(0..=20))]
    pub prompt_logprobs: Option<u32>,
    /// Send the request to a running router instead of running the model in-process.
    #[arg(long)]
    pub endpoint: Option<String>,
    /// With --endpoint: stream tokens as they are generated.
    #[arg(long, requires = "endpoint")]
    pub stream: bool,
    /// With --endpoint: the router's token (--auth-token-file) and CA (https://).
    #[command(flatten)]
    pub security: dsv2_security::args::ClientArgs,
    /// Compute device for the in-process mode.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// In-process mode: how the KV cache holds the latent, bf16 or fp8 (e4m3 with a per-token
    /// scale; GPU only).
    #[arg(long, default_value = "bf16", env = "DSV2_KV_CACHE_DTYPE")]
    pub kv_cache_dtype: dsv2_core::backend::KvCacheDtype,
}

/// One position's log-probabilities as JSON: {"token", "logprob", "top": [[token, logprob],
/// ...]}; the remote mode prints the same shape.
pub fn logprob_json(t: &dsv2_core::engine::TokenLogprob) -> serde_json::Value {
    serde_json::json!({
        "token": t.token,
        "logprob": t.logprob,
        "top": t.top.iter().map(|&(id, lp)| serde_json::json!([id, lp])).collect::<Vec<_>>(),
    })
}

pub fn finish_reason_name(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Length => "length",
        FinishReason::Eos => "eos",
        FinishReason::Stop => "stop",
        FinishReason::Cancelled => "cancelled",
    }
}

pub fn run(a: Args) -> Result<()> {
    if let Some(ep) = &a.endpoint {
        return crate::remote::run(&a, ep);
    }
    crate::on_device!(a.device, a.kv_cache_dtype, |backend| run_on(&a, backend))
}

fn run_on<B: Backend>(a: &Args, backend: std::sync::Arc<B>) -> Result<()> {
    let loaded = load_with(&a.model_dir, backend, a.random_weights)?;
    let prompt = match (&a.input_text, &a.input_ids) {
        (Some(t), _) => match &loaded.tokenizer {
            Some(tok) => tok.encode_prompt(t)?,
            None => bail!(
                "{} has no tokenizer.json: pass --input-ids instead of --input-text",
                loaded.dir.display()
            ),
        },
        (None, Some(ids)) => parse_ids(ids, "--input-ids")?,
        (None, None) => bail!("give a prompt with --input-text or --input-ids"),
    };
    let params = GenerateParams {
        max_new_tokens: a.max_output_len,
        sampling: SamplingParams {
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            seed: a.seed,
        },
        stop_token_ids: a
            .stop_token_ids
            .as_deref()
            .map(|s| parse_ids(s, "--stop-token-ids"))
            .transpose()?
            .unwrap_or_default(),
        stop_strings: a.stop.clone(),
        ignore_eos: a.ignore_eos,
        // The flag's 0 means none (as --endpoint sends it).
        logprobs: (a.logprobs > 0).then_some(a.logprobs as usize),
        prompt_logprobs: a.prompt_logprobs.map(|n| n as usize),
        prompt_logprobs_skip_tokens: 0,
    };
    let total = prompt.len() + params.max_new_tokens;
    let cfg = EngineConfig {
        num_blocks: total.div_ceil(16).max(1),
        block_size: 16,
        ..EngineConfig::default()
    };
    let mut engine = Engine::new(
        loaded.model.clone(),
        loaded.experts.clone(),
        loaded.tokenizer.clone(),
        cfg,
    )?;
    let t0 = Instant::now();
    let out = run_to_completion(
        &mut engine,
        vec![SeqRequest {
            id: 0,
            prompt: prompt.clone(),
            params,
        }],
    )
    .context("generation failed")?
    .remove(0);
    let secs = t0.elapsed().as_secs_f64();
    let n = out.output_ids.len();
    if a.json {
        let v = serde_json::json!({
            "input_ids": prompt,
            "output_ids": out.output_ids,
            "text": out.text,
            "finish_reason": finish_reason_name(out.finish_reason),
            "prompt_tokens": prompt.len(),
            "completion_tokens": n,
            "total_time_s": secs,
            "tokens_per_s": n as f64 / secs,
            "logprobs": out.logprobs.iter().map(logprob_json).collect::<Vec<_>>(),
            // The first prompt token has no context: null, as the router reports it.
            "prompt_logprobs": if a.prompt_logprobs.is_some() {
                std::iter::once(serde_json::json!({"token": prompt[0], "logprob": null, "top": []}))
                    .chain(out.prompt_logprobs.iter().map(logprob_json))
                    .collect::<Vec<_>>()
            } else {
                vec![]
            },
        });
        println!("{v}");
    } else {
        if loaded.tokenizer.is_some() {
            println!("{}", out.text);
        } else {
            println!("{:?}", out.output_ids);
        }
        eprintln!(
            "[{n} tokens in {secs:.2}s, {:.1} tokens/s, finish: {}]",
            n as f64 / secs,
            finish_reason_name(out.finish_reason)
        );
    }
    Ok(())
}
