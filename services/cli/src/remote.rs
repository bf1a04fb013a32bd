//! Talking to a running router: `dsv2 generate --endpoint` (unary or streamed).

use std::io::Write;
use std::time::Instant;

use anyhow::{Context, Result};
use dsv2_proto::inference::v1 as pb;
use dsv2_proto::inference::v1::inference_client::InferenceClient;

use crate::cmd_generate::Args;
use crate::common::parse_ids;

pub fn finish_name(code: i32) -> &'static str {
    match pb::FinishReason::try_from(code) {
        Ok(pb::FinishReason::Length) => "length",
        Ok(pb::FinishReason::Eos) => "eos",
        Ok(pb::FinishReason::Stop) => "stop",
        Ok(pb::FinishReason::Cancelled) => "cancelled",
        _ => "unspecified",
    }
}

pub fn request_from_args(a: &Args) -> Result<pb::GenerateRequest> {
    let prompt = match (&a.input_text, &a.input_ids) {
        (Some(t), _) => pb::generate_request::Prompt::Text(t.clone()),
        (None, Some(ids)) => pb::generate_request::Prompt::TokenIds(pb::TokenIds {
            ids: parse_ids(ids, "--input-ids")?,
        }),
        (None, None) => anyhow::bail!("give a prompt with --input-text or --input-ids"),
    };
    Ok(pb::GenerateRequest {
        prompt: Some(prompt),
        max_new_tokens: Some(a.max_output_len as u32),
        temperature: Some(a.temperature),
        top_k: a.top_k as u32,
        top_p: Some(a.top_p),
        seed: a.seed,
        stop: a.stop.clone(),
        stop_token_ids: a
            .stop_token_ids
            .as_deref()
            .map(|s| parse_ids(s, "--stop-token-ids"))
            .transpose()?
            .unwrap_or_default(),
        logprobs: (a.logprobs > 0).then_some(a.logprobs),
        prompt_logprobs: a.prompt_logprobs,
        ignore_eos: a.ignore_eos,
        prompt_logprobs_skip_tokens: 0,
    })
}

pub fn run(a: &Args, endpoint: &str) -> Result<()> {
    let req = request_from_args(a)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let channel = a
            .security
            .endpoint(endpoint)?
            .connect()
            .await
            .with_context(|| format!("cannot reach the router at {endpoint}: is `dsv2 up` (or dsv2-router) running there?"))?;
        let mut client = InferenceClient::with_interceptor(channel, a.security.bearer()?);
        // --json prints the prompt's ids like the in-process mode: a text prompt is tokenized
        // by the router the way Generate does it (BOS included)
        let input_ids = if a.json {
            Some(match &req.prompt {
                Some(pb::generate_request::Prompt::TokenIds(t)) => t.ids.clone(),
                Some(pb::generate_request::Prompt::Text(t)) => client
                    .tokenize(pb::TokenizeRequest { text: t.clone(), add_bos_token: true })
                    .await
                    .map_err(status_err)?
                    .into_inner()
                    .token_ids,
                // `dsv2 generate` sends no conversations.
                Some(pb::generate_request::Prompt::Messages(_)) | None => Vec::new(),
            })
        } else {
            None
        };
        let t0 = Instant::now();
        let (mut lps, mut prompt_lps) = (Vec::new(), Vec::new());
        let mut prompt_tokens = 0u32;
        let (ids, text, finish, ttft_ns) = if a.stream {
            let mut stream = client.generate_stream(req).await.map_err(status_err)?.into_inner();
            let (mut ids, mut text, mut finish, mut ttft) = (Vec::new(), String::new(), 0, 0);
            while let Some(msg) = stream.message().await.map_err(status_err)? {
                ids.extend(&msg.token_ids);
                text.push_str(&msg.text);
                lps.extend(msg.logprobs);
                prompt_lps.extend(msg.prompt_logprobs);
                if !a.json {
                    print!("{}", msg.text);
                    let _ = std::io::stdout().flush();
                }
                if let Some(s) = msg.summary {
                    finish = s.finish_reason;
                    ttft = s.time_to_first_token_ns;
                    prompt_tokens = s.prompt_tokens;
                }
            }
            if !a.json {
                println!();
            }
            if finish == 0 {
                anyhow::bail!("the stream ended without a final summary: the router stopped mid-request");
            }
            (ids, text, finish, ttft)
        } else {
            let r = client.generate(req).await.map_err(status_err)?.into_inner();
            if !a.json {
                println!("{}", r.text);
            }
            lps = r.logprobs;
            prompt_lps = r.prompt_logprobs;
            prompt_tokens = r.prompt_tokens;
            (r.token_ids, r.text, r.finish_reason, r.time_to_first_token_ns)
        };
        let secs = t0.elapsed().as_secs_f64();
        if a.json {
            println!(
                "{}",
                serde_json::json!({
                    "input_ids": input_ids.unwrap_or_default(), "prompt_tokens": prompt_tokens,
                    "output_ids": ids, "text": text, "finish_reason": finish_name(finish),
                    "completion_tokens": ids.len(), "time_to_first_token_s": ttft_ns as f64 / 1e9,
                    "total_time_s": secs, "tokens_per_s": ids.len() as f64 / secs,
                    "logprobs": lps.iter().map(logprob_json).collect::<Vec<_>>(),
                    "prompt_logprobs": prompt_lps.iter().map(logprob_json).collect::<Vec<_>>(),
                })
            );
        } else {
            eprintln!("[{} tokens in {secs:.2}s, {:.1} tokens/s, first token after {:.0} ms, finish: {}]", ids.len(), ids.len() as f64 / secs, ttft_ns as f64 / 1e6, finish_name(finish));
        }
        Ok(())
    })
}

/// The in-process mode's JSON shape for one position.
fn logprob_json(t: &pb::TokenLogprob) -> serde_json::Value {
    serde_json::json!({
        "token": t.token_id,
        "logprob": t.logprob,
        "top": t.top_logprobs.iter().map(|x| serde_json::json!([x.token_id, x.logprob])).collect::<Vec<_>>(),
    })
}

fn status_err(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("router answered {:?}: {}", s.code(), s.message())
}
