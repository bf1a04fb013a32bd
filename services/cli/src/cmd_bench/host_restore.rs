//! `dsv2 bench --host-restore LENS`: what the prefix cache's host tier saves (issue 15). For each
//! prefix length: the prefill of the prefix (what a request recomputes when its cached blocks are
//! gone), the copy of its blocks to host memory (what eviction to the host tier costs) and back
//! into other device blocks (what a hit in the host tier costs instead of the prefill), through
//! the same `Backend::export_blocks` / `import_blocks` the engine uses, all blocks in one batch as
//! an admission round issues them. Then one decode step over the restored blocks must give the
//! logits of the same step over the original ones.
//!
//! Copies are timed until the host has seen them complete (`sync_host_blocks`), prefills until
//! the step's greedy token is on the host; each is the median of `runs`.
//!
//! Then [`engine_check`] runs the engine itself with a device cache too small to keep the
//! prefixes and a host tier, against one whose device cache keeps them all: the same greedy ids
//! and logprobs, with the prefixes restored from host memory instead of found on the device.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use dsv2_core::backend::{AttnMode, Backend, BlockCopy, SeqChunk};
use dsv2_core::engine::{Engine, EngineConfig, GenerateParams, SeqRequest, run_to_completion};
use dsv2_core::kv_cache::{BlockTable, KvCache};
use dsv2_core::model::{ExpertExecutor, Model, StepInput};
use serde_json::json;

use super::prompts::random_prompt;

const BLOCK_SIZE: usize = 16;

/// One prefix length's numbers.
#[derive(Debug, Clone)]
pub struct Row {
    pub prefix_tokens: usize,
    pub blocks: usize,
    pub bytes: usize,
    pub prefill_s: f64,
    pub save_s: f64,
    pub restore_s: f64,
    /// Largest |logit difference| of a decode step over the restored blocks vs the originals.
    pub max_abs_diff: f32,
}

impl Row {
    pub fn json(&self) -> serde_json::Value {
        json!({
            "prefix_tokens": self.prefix_tokens,
            "blocks": self.blocks,
            "bytes": self.bytes,
            "prefill_ms": self.prefill_s * 1e3,
            "save_ms": self.save_s * 1e3,
            "restore_ms": self.restore_s * 1e3,
            "restore_gb_per_s": self.bytes as f64 / self.restore_s / 1e9,
            "restore_over_prefill": self.restore_s / self.prefill_s,
            "max_abs_logit_diff": self.max_abs_diff,
        })
    }
}

pub struct Plan<'a> {
    pub lens: &'a [usize],
    pub runs: usize,
    pub prefill_tokens: usize,
    pub seed: u64,
    pub special: &'a [u32],
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Prefills `tokens` at positions 0.. into `table`, in steps of at most `chunk` tokens; returns
/// the wall seconds until the last step's greedy token is on the host.
fn prefill<B: Backend>(
    model: &Model<B>,
    experts: &dyn ExpertExecutor<B>,
    cache: &mut KvCache<B>,
    table: &BlockTable,
    tokens: &[u32],
    chunk: usize,
) -> Result<f64> {
    let t0 = Instant::now();
    for (k, part) in tokens.chunks(chunk).enumerate() {
        let step = StepInput {
            tokens: part.to_vec(),
            seqs: vec![SeqChunk {
                rows: 0..part.len(),
                pos0: k * chunk,
                blocks: table.blocks.clone(),
            }],
        };
        let logits =
            model.forward_logits(&step, cache, experts, AttnMode::Auto, &[part.len() - 1])?;
        model.backend.argmax_rows(&logits)?;
    }
    Ok(t0.elapsed().as_secs_f64())
}

/// The logits of token `token` at position `pos` over `table`'s cache.
fn decode_logits<B: Backend>(
    model: &Model<B>,
    experts: &dyn ExpertExecutor<B>,
    cache: &mut KvCache<B>,
    table: &BlockTable,
    token: u32,
    pos: usize,
) -> Result<Vec<f32>> {
    let step = StepInput {
        tokens: vec![token],
        seqs: vec![SeqChunk {
            rows: 0..1,
            pos0: pos,
            blocks: table.blocks.clone(),
        }],
    };
    Ok(model.forward(&step, cache, experts, AttnMode::Auto, &[0])?)
}

pub fn run<B: Backend>(
    model: &Model<B>,
    experts: &dyn ExpertExecutor<B>,
    plan: &Plan<'_>,
) -> Result<Vec<Row>> {
    let b = &*model.backend;
    let cfg = &model.cfg;
    let mut rows = Vec::new();
    for &len in plan.lens {
        let nb = len / BLOCK_SIZE;
        if nb == 0 {
            bail!("--host-restore: {len} tokens is less than one block of {BLOCK_SIZE}");
        }
        let len = nb * BLOCK_SIZE;
        if len + 1 > cfg.max_position_embeddings {
            bail!(
                "--host-restore: {len} tokens exceed the model's {} positions",
                cfg.max_position_embeddings
            );
        }
        let ids = random_prompt(plan.seed, 0, len + 1, cfg.vocab_size as u32, plan.special);
        let (prefix, next) = (&ids[..len], ids[len]);
        // Two tables of the prefix and one more token: the original and the restored copy.
        let mut cache = model
            .new_cache(2 * (nb + 1), BLOCK_SIZE)
            .context("allocating the KV cache")?;
        let (mut orig, mut copy) = (BlockTable::default(), BlockTable::default());
        cache.reserve(&mut orig, len + 1)?;
        cache.reserve(&mut copy, len + 1)?;
        let out: Vec<BlockCopy> = (0..nb)
            .map(|i| BlockCopy {
                block: orig.blocks[i],
                slot: i as u32,
            })
            .collect();
        let back: Vec<BlockCopy> = (0..nb)
            .map(|i| BlockCopy {
                block: copy.blocks[i],
                slot: i as u32,
            })
            .collect();
        let mut host = b
            .new_host_blocks(cfg, BLOCK_SIZE, nb)
            .context("allocating the host tier")?;
        // Untimed: first use of this length's shapes, and the host memory's first touch.
        prefill(
            model,
            experts,
            &mut cache,
            &orig,
            prefix,
            plan.prefill_tokens,
        )?;
        b.export_blocks(&cache.storage, &mut host, &out)?;
        b.sync_host_blocks(&mut host)?;
        let mut prefill_s = Vec::new();
        let mut save_s = Vec::new();
        let mut restore_s = Vec::new();
        for _ in 0..plan.runs {
            prefill_s.push(prefill(
                model,
                experts,
                &mut cache,
                &orig,
                prefix,
                plan.prefill_tokens,
            )?);
            let t0 = Instant::now();
            b.export_blocks(&cache.storage, &mut host, &out)?;
            b.sync_host_blocks(&mut host)?;
            save_s.push(t0.elapsed().as_secs_f64());
            let t0 = Instant::now();
            b.import_blocks(&mut host, &mut cache.storage, &back)?;
            b.await_imports(&mut host, &mut cache.storage)?;
            b.sync_host_blocks(&mut host)?;
            restore_s.push(t0.elapsed().as_secs_f64());
        }
        let a = decode_logits(model, experts, &mut cache, &orig, next, len)?;
        let r = decode_logits(model, experts, &mut cache, &copy, next, len)?;
        let max_abs_diff = a
            .iter()
            .zip(&r)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        let row = Row {
            prefix_tokens: len,
            blocks: nb,
            bytes: nb * b.host_block_bytes(cfg, BLOCK_SIZE),
            prefill_s: median(prefill_s),
            save_s: median(save_s),
            restore_s: median(restore_s),
            max_abs_diff,
        };
        if max_abs_diff != 0.0 || a.iter().any(|v| !v.is_finite()) {
            bail!(
                "{len}-token prefix: a decode step over the restored blocks differs from one over the originals (max |diff| {max_abs_diff})"
            );
        }
        rows.push(row);
    }
    Ok(rows)
}

/// The table, and where restoring starts to pay.
pub fn table(backend: &str, rows: &[Row]) -> String {
    let mut s = format!(
        "host tier: restore (copy back from host memory) vs recompute (prefill), {backend}, blocks of {BLOCK_SIZE} tokens\n\
         {:>8} {:>7} {:>9} {:>11} {:>9} {:>11} {:>9} {:>10}  check\n",
        "prefix", "blocks", "MB", "prefill ms", "save ms", "restore ms", "GB/s", "restore/pf"
    );
    for r in rows {
        s += &format!(
            "{:>8} {:>7} {:>9.1} {:>11.3} {:>9.3} {:>11.3} {:>9.2} {:>10.5}  same logits\n",
            r.prefix_tokens,
            r.blocks,
            r.bytes as f64 / 1e6,
            r.prefill_s * 1e3,
            r.save_s * 1e3,
            r.restore_s * 1e3,
            r.bytes as f64 / r.restore_s / 1e9,
            r.restore_s / r.prefill_s,
        );
    }
    let mut by_len: Vec<&Row> = rows.iter().collect();
    by_len.sort_by_key(|r| r.prefix_tokens);
    // The shortest measured length from which restoring wins at every longer one too.
    let from = by_len
        .iter()
        .rposition(|r| r.restore_s >= r.prefill_s)
        .map_or(0, |i| i + 1);
    s += &match by_len.get(from) {
        Some(r) if from == 0 => format!(
            "restoring beats recomputing at every measured length ({} tokens and up)\n",
            r.prefix_tokens
        ),
        Some(r) => format!(
            "restoring beats recomputing from {} tokens on (not at {})\n",
            r.prefix_tokens,
            by_len[from - 1].prefix_tokens
        ),
        None => "restoring does not beat recomputing at the longest measured length\n".into(),
    };
    s
}

/// What [`engine_check`] saw.
#[derive(Debug, Clone)]
pub struct EngineCheck {
    pub requests: usize,
    /// Prompt tokens the tiered engine restored from the host tier.
    pub restored_tokens: u64,
    /// Prompt tokens each engine found cached (device or host): equal when the check passes.
    pub cached_tokens: u64,
    pub max_abs_logprob_diff: f32,
}

impl EngineCheck {
    pub fn json(&self) -> serde_json::Value {
        json!({
            "requests": self.requests,
            "restored_tokens": self.restored_tokens,
            "cached_tokens": self.cached_tokens,
            "max_abs_logprob_diff": self.max_abs_logprob_diff,
        })
    }

    pub fn line(&self) -> String {
        format!(
            "engine check: {} requests one at a time, {} of their {} cached prompt tokens restored \
             from the host tier; greedy ids identical and logprobs within {:.1e} of a device cache \
             that keeps every prefix\n",
            self.requests, self.restored_tokens, self.cached_tokens, self.max_abs_logprob_diff
        )
    }
}

/// Three families of a `prefix`-token prompt prefix, two requests each, interleaved and run one
/// at a time (so both engines run the same steps), through an engine whose device cache holds
/// about one request (each evicts the previous family's blocks to the host tier, where the
/// family's second request finds them) and through one that holds everything.
pub fn engine_check<B: Backend>(
    model: &Arc<Model<B>>,
    experts: Arc<dyn ExpertExecutor<B>>,
    prefix: usize,
    seed: u64,
    special: &[u32],
) -> Result<EngineCheck> {
    let cfg = &model.cfg;
    let (suffix, new) = (16, 8);
    let vocab = cfg.vocab_size as u32;
    let mut reqs = Vec::new();
    for round in 0..2 {
        for f in 0..3 {
            let mut prompt = random_prompt(seed ^ 0x5eed, f, prefix, vocab, special);
            prompt.extend(random_prompt(
                seed ^ 0x5eed,
                100 + 3 * round + f,
                suffix,
                vocab,
                special,
            ));
            reqs.push(SeqRequest {
                id: (3 * round + f) as u64,
                prompt,
                params: GenerateParams {
                    max_new_tokens: new,
                    ignore_eos: true,
                    logprobs: Some(1),
                    ..GenerateParams::default()
                },
            });
        }
    }
    let per_request = (prefix + suffix + new).div_ceil(BLOCK_SIZE);
    let engine = |num_blocks: usize, host_blocks: u64| -> Result<Engine<B>> {
        let bytes = host_blocks * model.backend.host_block_bytes(cfg, BLOCK_SIZE) as u64;
        Ok(Engine::new(
            model.clone(),
            experts.clone(),
            None,
            EngineConfig {
                num_blocks,
                block_size: BLOCK_SIZE,
                host_cache_bytes: bytes,
                ..EngineConfig::default()
            },
        )?)
    };
    let mut tiered = engine(per_request + 2, (6 * per_request) as u64)?;
    let mut roomy = engine(6 * per_request, 0)?;
    let mut max_diff = 0f32;
    for r in reqs.iter() {
        let a = run_to_completion(&mut tiered, vec![r.clone()])?.remove(0);
        let b = run_to_completion(&mut roomy, vec![r.clone()])?.remove(0);
        if a.output_ids != b.output_ids || a.cached_prompt_tokens != b.cached_prompt_tokens {
            bail!(
                "engine check, request {}: with the host tier {:?} ({} cached tokens), with a roomy device cache {:?} ({})",
                r.id,
                a.output_ids,
                a.cached_prompt_tokens,
                b.output_ids,
                b.cached_prompt_tokens
            );
        }
        for (x, y) in a.logprobs.iter().zip(&b.logprobs) {
            max_diff = max_diff.max((x.logprob - y.logprob).abs());
        }
    }
    let check = EngineCheck {
        requests: reqs.len(),
        restored_tokens: tiered.stats.host_cache_hit_tokens,
        cached_tokens: tiered.stats.prefix_cache_hit_tokens,
        max_abs_logprob_diff: max_diff,
    };
    if check.restored_tokens == 0 || check.cached_tokens != roomy.stats.prefix_cache_hit_tokens {
        bail!("engine check: the host tier was not used as planned: {check:?}");
    }
    if max_diff > 1e-4 {
        bail!("engine check: logprobs differ by up to {max_diff}");
    }
    Ok(check)
}
