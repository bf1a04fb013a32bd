//! Continuous batching over the model: requests join at step boundaries and leave when done;
//! each step packs decode tokens first, then prefill chunks, under a token budget. The engine
//! never touches a request's text until a token is sampled, and owns every sequence's cache
//! blocks: admission reserves a request's whole footprint (prompt + max_new_tokens), so a
//! running request can never run out of cache and nothing is ever preempted. With the prefix
//! cache on, a request takes the cached blocks of its prompt's longest cached prefix by reference
//! and reserves and prefills only the rest.
//!
//! With the host tier on, blocks of that prefix that the device evicted come back from host
//! memory into blocks of the request's own: admitted like computed ones (a device block each, no
//! prefill). The copies back are issued at admission; where they overlap steps (a GPU), the
//! request sits out the step they are issued in, which runs beside them, unless nothing else is
//! ready to run (then the step waits for them).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backend::{AttnMode, Backend, SeqChunk};
use crate::error::{CoreError, ExpertRows, Result};
use crate::kv_cache::{BlockTable, KvCache, TransferError};
use crate::model::{ExpertExecutor, Model, StepInput};
use crate::sampling::{Sampler, SamplingParams, log_softmax, top_n};
use crate::tokenizer::{IncrementalDecoder, Tokenizer};

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub num_blocks: usize,
    pub block_size: usize,
    /// Token budget of one step (prefill chunks are cut to fit).
    pub max_batch_tokens: usize,
    /// Most sequences in flight at once.
    pub max_running: usize,
    pub attn_mode: AttnMode,
    /// Share the full cache blocks of common prompt prefixes between requests (kv_cache.rs).
    pub prefix_cache: bool,
    /// Bytes of host memory for cached blocks the device evicts (kv_cache/host.rs); 0: none.
    /// Only with `prefix_cache`.
    pub host_cache_bytes: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            num_blocks: 1024,
            block_size: 16,
            max_batch_tokens: 512,
            max_running: 64,
            attn_mode: AttnMode::Auto,
            prefix_cache: true,
            host_cache_bytes: 0,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct GenerateParams {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    pub stop_token_ids: Vec<u32>,
    pub stop_strings: Vec<String>,
    pub ignore_eos: bool,
    /// Some(N): report each generated token's logprob and its top-N alternatives (N may be 0:
    /// the token's own logprob only, as the public API documents).
    pub logprobs: Option<usize>,
    /// Some(N): report each prompt token's logprob and its top-N alternatives.
    pub prompt_logprobs: Option<usize>,
    /// With `prompt_logprobs`: the first N prompt tokens get no logprob (the first never has
    /// one), so their positions need not be computed and may come from the prefix cache.
    pub prompt_logprobs_skip_tokens: usize,
}

#[derive(Debug, Clone)]
pub struct SeqRequest {
    pub id: u64,
    pub prompt: Vec<u32>,
    pub params: GenerateParams,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Length,
    Eos,
    Stop,
    Cancelled,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// Why a request failed inside the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailKind {
    /// Expert shards could not be reached; retrying later can succeed.
    Unavailable,
    /// The request's deadline passed before it finished.
    DeadlineExceeded,
    Internal,
}

#[derive(Debug, Clone)]
pub enum EngineEvent {
    /// Logprob of every prompt token after the first (the first has no context), from
    /// position `max(1, prompt_logprobs_skip_tokens)` on.
    PromptLogprobs {
        id: u64,
        logprobs: Vec<TokenLogprob>,
    },
    Token {
        id: u64,
        token: u32,
        /// Text this token completes (may be empty while a character or a possible stop
        /// string is incomplete).
        text: String,
        logprob: Option<TokenLogprob>,
    },
    Finished {
        id: u64,
        reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
        /// Prompt tokens taken from the prefix cache instead of being prefilled.
        cached_prompt_tokens: usize,
        /// Final text delta held back until now.
        text: String,
        /// The stop string that ended generation (reason `Stop` because of a string).
        matched_stop: Option<String>,
    },
    Failed {
        id: u64,
        kind: FailKind,
        message: String,
    },
}

/// The limits a request must fit; the check runs at the service edge and again on submit.
#[derive(Debug, Clone)]
pub struct RequestLimits {
    pub vocab_size: usize,
    pub max_context_tokens: usize,
    pub cache_capacity_tokens: usize,
    pub block_size: usize,
    pub has_tokenizer: bool,
}

impl RequestLimits {
    pub fn validate(&self, prompt: &[u32], p: &GenerateParams) -> Result<()> {
        if prompt.is_empty() {
            return Err(CoreError::InvalidInput("prompt: is empty".into()));
        }
        if let Some(bad) = prompt.iter().find(|&&t| t as usize >= self.vocab_size) {
            return Err(CoreError::InvalidInput(format!(
                "prompt: token id {bad} is outside the vocabulary (0..{})",
                self.vocab_size
            )));
        }
        if p.max_new_tokens == 0 {
            return Err(CoreError::InvalidInput(
                "max_new_tokens: must be at least 1".into(),
            ));
        }
        let total = prompt.len() + p.max_new_tokens;
        if total > self.max_context_tokens {
            return Err(CoreError::InvalidInput(format!(
                "max_new_tokens: prompt ({}) + max_new_tokens ({}) exceeds the model's context of {} tokens",
                prompt.len(),
                p.max_new_tokens,
                self.max_context_tokens
            )));
        }
        if total.div_ceil(self.block_size) * self.block_size > self.cache_capacity_tokens {
            return Err(CoreError::InvalidInput(format!(
                "prompt: prompt ({}) + max_new_tokens ({}) needs {total} tokens of KV cache, more than the whole cache ({} tokens); \
                 shorten the request or start the server with more --kv-cache-blocks",
                prompt.len(),
                p.max_new_tokens,
                self.cache_capacity_tokens
            )));
        }
        if let Some(bad) = p
            .stop_token_ids
            .iter()
            .find(|&&t| t as usize >= self.vocab_size)
        {
            return Err(CoreError::InvalidInput(format!(
                "stop_token_ids: {bad} is outside the vocabulary (0..{})",
                self.vocab_size
            )));
        }
        if p.stop_strings.iter().any(|s| s.is_empty()) {
            return Err(CoreError::InvalidInput(
                "stop: stop strings must not be empty".into(),
            ));
        }
        if !p.stop_strings.is_empty() && !self.has_tokenizer {
            return Err(CoreError::InvalidInput(
                "stop: this model has no tokenizer, so stop strings cannot be matched".into(),
            ));
        }
        p.sampling.validate()
    }
}

struct Seq {
    req: SeqRequest,
    table: BlockTable,
    tokens: Vec<u32>,
    computed: usize,
    /// Prompt tokens taken from the prefix cache at admission.
    cached: usize,
    sampler: Sampler,
    decoder: IncrementalDecoder,
    /// Decoded text not yet emitted because it may be the start of a stop string.
    held: String,
    emitted: String,
    prompt_lp: Vec<TokenLogprob>,
}

pub struct Engine<B: Backend> {
    model: Arc<Model<B>>,
    experts: Arc<dyn ExpertExecutor<B>>,
    tokenizer: Option<Arc<Tokenizer>>,
    cache: KvCache<B>,
    cfg: EngineConfig,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    pub stats: EngineStats,
    /// What the last `step` ran (zero before the first).
    pub last_step: StepShape,
    /// Wall time the last `step` spent in the model and the token choice (every attempt of a
    /// step that ran again summed): the rest of a step is host work that delays the next one.
    pub last_step_model_time: Duration,
    /// Events of requests that failed outside a step (a copy from the host tier), for the next
    /// `step` to return.
    pending: Vec<EngineEvent>,
    /// `stats.steps` when copies back from the host tier were last issued.
    imports_issued_at: u64,
}

/// The batch of one step: sequences in it and tokens computed (decode rows + prefill chunks),
/// as scheduled (a step that runs again without failed sequences reports its first batch).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepShape {
    pub sequences: usize,
    pub tokens: usize,
}

#[derive(Debug, Clone, Default)]
pub struct EngineStats {
    pub steps: u64,
    /// Prompt tokens computed (a cached prefix is not).
    pub prefill_tokens: u64,
    pub decode_tokens: u64,
    /// Prompt tokens of admitted requests looked up in the prefix cache.
    pub prefix_cache_queried_tokens: u64,
    /// Of those, tokens found cached (not prefilled).
    pub prefix_cache_hit_tokens: u64,
    /// Of those, tokens copied back from the host tier.
    pub host_cache_hit_tokens: u64,
}

impl<B: Backend> Engine<B> {
    pub fn new(
        model: Arc<Model<B>>,
        experts: Arc<dyn ExpertExecutor<B>>,
        tokenizer: Option<Arc<Tokenizer>>,
        cfg: EngineConfig,
    ) -> Result<Self> {
        if cfg.max_batch_tokens == 0 || cfg.max_running == 0 {
            return Err(CoreError::InvalidInput(
                "max_batch_tokens and max_running must be positive".into(),
            ));
        }
        let mut cache = model.new_cache(cfg.num_blocks, cfg.block_size)?;
        cache.set_prefix_cache(cfg.prefix_cache);
        if cfg.host_cache_bytes > 0 {
            if cfg.prefix_cache {
                let blocks =
                    cache.set_host_tier(&*model.backend, &model.cfg, cfg.host_cache_bytes)?;
                tracing::info!(
                    blocks,
                    block_bytes = cache.host_block_bytes(),
                    "host tier of the prefix cache"
                );
            } else {
                tracing::warn!("the prefix cache is off, so it has no host tier");
            }
        }
        Ok(Engine {
            model,
            experts,
            tokenizer,
            cache,
            cfg,
            waiting: VecDeque::new(),
            running: Vec::new(),
            stats: EngineStats::default(),
            last_step: StepShape::default(),
            last_step_model_time: Duration::ZERO,
            pending: Vec::new(),
            imports_issued_at: 0,
        })
    }

    pub fn model(&self) -> &Model<B> {
        &self.model
    }
    pub fn tokenizer(&self) -> Option<&Arc<Tokenizer>> {
        self.tokenizer.as_ref()
    }
    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }
    /// Blocks a new request can take (free, or cached and held by no request).
    pub fn free_blocks(&self) -> usize {
        self.cache.free_blocks()
    }
    /// Blocks holding a cached prefix (0 with the prefix cache off).
    pub fn cached_blocks(&self) -> usize {
        self.cache.cached_blocks()
    }
    /// The cache's bookkeeping and storage, for tests and measurements.
    pub fn cache(&self) -> &KvCache<B> {
        &self.cache
    }
    pub fn num_blocks(&self) -> usize {
        self.cache.num_blocks()
    }
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }
    pub fn running(&self) -> usize {
        self.running.len()
    }
    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    /// What a request is checked against; cheap to copy to the edge of a service.
    pub fn limits(&self) -> RequestLimits {
        RequestLimits {
            vocab_size: self.model.cfg.vocab_size,
            max_context_tokens: self.model.cfg.max_position_embeddings,
            cache_capacity_tokens: self.cache.capacity_tokens(),
            block_size: self.cache.block_size(),
            has_tokenizer: self.tokenizer.is_some(),
        }
    }

    /// Checks a request against the model and the cache; the message names the bad field.
    pub fn validate(&self, prompt: &[u32], p: &GenerateParams) -> Result<()> {
        self.limits().validate(prompt, p)
    }

    /// Queues a request (after `validate`).
    /// Runs one short request (four prompt tokens, two greedy decode steps) through the model,
    /// then resets the counters. Why: the first request of a fresh process pays one-time costs
    /// (the shard streams opening, first use of the allocator and thread pools, GPU module loads
    /// and GEMM heuristics): on the build machine the tiny model's first time to first token
    /// through router + 2 shards was 70 ms, the next ones 5–11 ms. A server calls this before it
    /// reports ready, which also proves the whole path (shards included) before traffic comes.
    pub fn warm_up(&mut self) -> Result<std::time::Duration> {
        if self.has_work() {
            return Err(CoreError::InvalidInput(
                "warm-up runs before any request".into(),
            ));
        }
        let t0 = std::time::Instant::now();
        let vocab = self.model.cfg.vocab_size as u32;
        let req = SeqRequest {
            id: u64::MAX,
            prompt: (1..=4).map(|t| t % vocab.max(1)).collect(),
            params: GenerateParams {
                max_new_tokens: 2,
                sampling: SamplingParams::default(),
                stop_token_ids: Vec::new(),
                stop_strings: Vec::new(),
                ignore_eos: true,
                logprobs: None,
                prompt_logprobs: None,
                prompt_logprobs_skip_tokens: 0,
            },
        };
        run_to_completion(self, vec![req])?;
        self.stats = EngineStats::default();
        self.cache.clear_prefix_cache();
        Ok(t0.elapsed())
    }

    pub fn submit(&mut self, req: SeqRequest) -> Result<()> {
        self.validate(&req.prompt, &req.params)?;
        let sampler = Sampler::new(req.params.sampling.clone());
        self.waiting.push_back(Seq {
            tokens: req.prompt.clone(),
            req,
            table: BlockTable::default(),
            computed: 0,
            cached: 0,
            sampler,
            decoder: IncrementalDecoder::default(),
            held: String::new(),
            emitted: String::new(),
            prompt_lp: Vec::new(),
        });
        Ok(())
    }

    /// Drops a request wherever it is and frees its cache at once.
    pub fn cancel(&mut self, id: u64) -> Option<EngineEvent> {
        let seq = if let Some(i) = self.waiting.iter().position(|s| s.req.id == id) {
            self.waiting.remove(i)
        } else if let Some(i) = self.running.iter().position(|s| s.req.id == id) {
            Some(self.running.remove(i))
        } else {
            None
        };
        seq.map(|mut s| {
            self.cache.release(&mut s.table);
            EngineEvent::Finished {
                id,
                reason: FinishReason::Cancelled,
                prompt_tokens: s.req.prompt.len(),
                completion_tokens: s.tokens.len() - s.req.prompt.len(),
                cached_prompt_tokens: s.cached,
                text: String::new(),
                matched_stop: None,
            }
        })
    }

    /// Moves requests from the queue to the running batch while their blocks fit, in order
    /// (FIFO: nobody overtakes the head of the queue); returns the ids it moved. `step` admits
    /// first; a caller that measures queue time calls this just before `step`.
    pub fn admit(&mut self) -> Vec<u64> {
        let mut admitted = Vec::new();
        while self.running.len() < self.cfg.max_running {
            let Some(front) = self.waiting.front() else {
                break;
            };
            let on = self.cache.prefix_cache_enabled();
            let cacheable = if on { cacheable_tokens(&front.req) } else { 0 };
            if cacheable > 0 && self.prefix_in_flight(&front.req.prompt, cacheable) {
                break;
            }
            let Some(mut seq) = self.waiting.pop_front() else {
                break;
            };
            let need = seq.req.prompt.len() + seq.req.params.max_new_tokens;
            let Some(got) = self
                .cache
                .admit(&mut seq.table, &seq.req.prompt, need, cacheable)
            else {
                self.waiting.push_front(seq);
                break;
            };
            if on {
                self.stats.prefix_cache_queried_tokens += seq.req.prompt.len() as u64;
                self.stats.prefix_cache_hit_tokens += got.cached_tokens as u64;
                self.stats.host_cache_hit_tokens += got.restored_tokens as u64;
            }
            if got.restored_tokens > 0 {
                self.imports_issued_at = self.stats.steps;
            }
            seq.computed = got.cached_tokens;
            seq.cached = got.cached_tokens;
            admitted.push(seq.req.id);
            self.running.push(seq);
        }
        // One batch of copies to and from the host tier for everything admitted this round.
        if let Err(e) = self.cache.flush_transfers(&*self.model.backend) {
            self.fail_lost(e);
        }
        admitted
    }

    /// Fails the running requests that hold a block a failed host-tier copy left unknown.
    fn fail_lost(&mut self, e: TransferError) {
        let message = format!("restoring cached blocks from host memory: {}", e.error);
        tracing::warn!(%message, blocks = e.lost_blocks.len(), "host tier copy failed");
        let lost = |s: &Seq| s.table.blocks.iter().any(|b| e.lost_blocks.contains(b));
        let mut i = 0;
        while i < self.running.len() {
            if lost(&self.running[i]) {
                let mut s = self.running.remove(i);
                self.cache.release(&mut s.table);
                self.pending.push(EngineEvent::Failed {
                    id: s.req.id,
                    kind: FailKind::Internal,
                    message: message.clone(),
                });
            } else {
                i += 1;
            }
        }
    }

    /// Whether `s` holds a block that a copy from the host may still be writing.
    fn reads_importing(&self, s: &Seq) -> bool {
        self.cache.has_imports_in_flight()
            && s.table.blocks.iter().any(|&b| self.cache.is_importing(b))
    }

    /// Orders the copies back from the host tier before this step when they were issued in an
    /// earlier step (they have had that step to run), when no request that does not wait for
    /// them has anything to compute (running the step without them would only idle), or when
    /// the backend's copies do not overlap steps anyway.
    fn await_imports_if_due(&mut self) {
        if !self.cache.has_imports_in_flight() {
            return;
        }
        let others_ready = self
            .running
            .iter()
            .any(|s| s.computed < s.tokens.len() && !self.reads_importing(s));
        if (self.imports_issued_at < self.stats.steps
            || !others_ready
            || !self.model.backend.imports_overlap_steps())
            && let Err(e) = self.cache.await_imports(&*self.model.backend)
        {
            self.fail_lost(e);
        }
    }

    /// Whether a running request is computing full blocks of `prompt` that the prefix cache
    /// does not hold yet. Admitted once they are computed (registered block by block, at the end
    /// of each step), a request takes them instead of prefilling the same prefix a second time
    /// in the same steps: requests that arrive together with a common prefix compute it once.
    fn prefix_in_flight(&self, prompt: &[u32], usable: usize) -> bool {
        let bs = self.cache.block_size();
        let cached = self.cache.cached_prefix_tokens(prompt, usable);
        self.running.iter().any(|s| {
            let common = prompt
                .iter()
                .zip(&s.tokens)
                .take_while(|(a, b)| a == b)
                .count()
                .min(usable)
                / bs
                * bs;
            common > cached && s.computed < common
        })
    }

    /// Runs one forward step over the running sequences; returns what happened. When the
    /// routed experts of some rows cannot be reached ([`ExpertRows::Only`]), only the requests
    /// of those rows fail (UNAVAILABLE) and the step runs again for the others.
    pub fn step(&mut self) -> Vec<EngineEvent> {
        self.last_step = StepShape::default();
        self.last_step_model_time = Duration::ZERO;
        self.admit();
        self.await_imports_if_due();
        let mut events = std::mem::take(&mut self.pending);
        events.extend(self.run_scheduled());
        events
    }

    /// Plans this step (decode rows first, then prefill chunks, under the token budget) and runs it.
    fn run_scheduled(&mut self) -> Vec<EngineEvent> {
        if self.running.is_empty() {
            return vec![];
        }
        // Decode tokens first (one row each), then prefill chunks, under the token budget;
        // requests whose blocks are still coming from the host wait for the next step.
        let mut budget = self.cfg.max_batch_tokens;
        let mut plan: Vec<(usize, usize)> = Vec::new(); // (running index, tokens this step)
        let mut order: Vec<usize> = (0..self.running.len()).collect();
        order.sort_by_key(|&i| self.running[i].tokens.len() - self.running[i].computed > 1);
        for i in order {
            let s = &self.running[i];
            let take = (s.tokens.len() - s.computed).min(budget);
            if take == 0 || self.reads_importing(s) {
                continue;
            }
            budget -= take;
            plan.push((i, take));
        }
        if plan.is_empty() {
            return vec![];
        }
        self.last_step = StepShape {
            sequences: plan.len(),
            tokens: self.cfg.max_batch_tokens - budget,
        };
        // The new tokens' latents go into blocks no other sequence reads (kv_cache.rs): a
        // violation is an engine bug, and fails the request rather than corrupt another one.
        let bs = self.cache.block_size();
        let unwritable: Vec<usize> = plan
            .iter()
            .filter(|&&(i, take)| {
                let s = &self.running[i];
                (s.computed / bs..=(s.computed + take - 1) / bs).any(|b| {
                    s.table
                        .blocks
                        .get(b)
                        .is_none_or(|&blk| !self.cache.is_writable(blk))
                })
            })
            .map(|&(i, _)| i)
            .collect();
        if !unwritable.is_empty() {
            return self.fail_all(
                unwritable,
                CoreError::Cache("a step would write into a shared cache block".into()),
            );
        }
        // Flags of the whole batch hold for any part of it, so a re-run without some sequences
        // (below) takes the same path.
        // Rows that report no logprobs need only a token: greedy rows the argmax, sampled rows a
        // draw where the backend samples on its device. The logits stay where the backend
        // computed them (on a GPU, 400 KB per row never crosses PCIe).
        let on_device = self.model.backend.samples_on_device();
        let no_logits = plan.iter().all(|&(i, _)| {
            let p = &self.running[i].req.params;
            p.logprobs.is_none()
                && p.prompt_logprobs.is_none()
                && (p.sampling.temperature == 0.0 || on_device)
        });
        let greedy_only = plan
            .iter()
            .all(|&(i, _)| self.running[i].req.params.sampling.temperature == 0.0);
        // One draw per sequence that gets a token, taken once per step even when the step runs
        // again: a sequence samples what it would have sampled had nobody failed.
        let mut draws: Vec<Option<crate::sampling::RowSampling>> = plan
            .iter()
            .map(|&(i, take)| {
                let s = &mut self.running[i];
                let finishes = s.computed + take == s.tokens.len();
                (no_logits && !greedy_only && finishes).then(|| s.sampler.draw())
            })
            .collect();
        self.stats.steps += 1;
        let mut events = Vec::new();
        // Running indices of the sequences this step fails; they leave with the finished ones.
        let mut failed: Vec<usize> = Vec::new();
        let (picked, row_of) = loop {
            let (step, logit_rows, row_of) = self.build_step(&plan);
            let row_draws: Vec<_> = draws.iter().flatten().copied().collect();
            let t_model = Instant::now();
            let ran = self.run_step(&step, &logit_rows, no_logits, greedy_only, &row_draws);
            self.last_step_model_time += t_model.elapsed();
            let err = match ran {
                Ok(picked) => break (picked, row_of),
                Err(e) => e,
            };
            let message = err.to_string();
            match rows_failed_by(&err, &step.seqs) {
                // Some sequences' experts are gone: those fail and the others run the step
                // again. Every row's computation reads only its own sequence's cache, and the
                // re-run writes the survivors' new cache slots again, for every layer, before
                // reading them, so what the failed attempt wrote there does not matter; the
                // failed sequences' slots go back to the cache with their blocks. Each re-run
                // has fewer sequences, so this ends.
                Some(hit) if hit.len() < plan.len() => {
                    tracing::warn!(
                        %message,
                        failed = hit.len(),
                        rerun = plan.len() - hit.len(),
                        "expert failure: failing the requests that needed the lost experts, running the step again for the others"
                    );
                    for &k in hit.iter().rev() {
                        let (i, _) = plan.remove(k);
                        draws.remove(k);
                        events.push(EngineEvent::Failed {
                            id: self.running[i].req.id,
                            kind: FailKind::Unavailable,
                            message: message.clone(),
                        });
                        failed.push(i);
                    }
                }
                _ => {
                    let kind = fail_kind(&err);
                    tracing::warn!(%message, requests = plan.len(), "step failed");
                    for &(i, _) in &plan {
                        events.push(EngineEvent::Failed {
                            id: self.running[i].req.id,
                            kind,
                            message: message.clone(),
                        });
                        failed.push(i);
                    }
                    self.remove_running(failed);
                    return events;
                }
            }
        };
        let vocab = self.model.cfg.vocab_size;
        let mut done = failed;
        for (k, &(i, take)) in plan.iter().enumerate() {
            let (first, count) = row_of[k];
            let s = &mut self.running[i];
            let was_prefill = s.computed < s.req.prompt.len();
            if was_prefill {
                self.stats.prefill_tokens += take as u64;
            } else {
                self.stats.decode_tokens += take as u64;
            }
            if let (Some(n), true, Picked::Logits(logits)) =
                (s.req.params.prompt_logprobs, was_prefill, &picked)
            {
                // Row at position p scores prompt token p + 1.
                let skip = s.req.params.prompt_logprobs_skip_tokens;
                for r in 0..count {
                    let p = s.computed + r;
                    if p + 1 < s.req.prompt.len() && p + 1 >= skip {
                        let lp = log_softmax(&logits[(first + r) * vocab..(first + r + 1) * vocab]);
                        let tok = s.req.prompt[p + 1];
                        s.prompt_lp.push(TokenLogprob {
                            token: tok,
                            logprob: lp[tok as usize],
                            top: top_n(&lp, n),
                        });
                    }
                }
            }
            s.computed += take;
            self.cache
                .register_full_blocks(&mut s.table, &s.tokens, s.computed);
            if s.computed < s.tokens.len() {
                continue;
            }
            if was_prefill && s.req.params.prompt_logprobs.is_some() {
                events.push(EngineEvent::PromptLogprobs {
                    id: s.req.id,
                    logprobs: std::mem::take(&mut s.prompt_lp),
                });
            }
            let choice = match &picked {
                Picked::Logits(l) => {
                    Choice::Row(&l[(first + count - 1) * vocab..(first + count) * vocab])
                }
                Picked::Tokens(t) => Choice::Token(t[first + count - 1]),
            };
            match Self::accept_token(&self.model, self.tokenizer.as_deref(), s, choice) {
                Ok((ev, fin)) => {
                    events.extend(ev);
                    if fin {
                        done.push(i);
                    }
                }
                Err(e) => {
                    events.push(EngineEvent::Failed {
                        id: s.req.id,
                        kind: FailKind::Internal,
                        message: e.to_string(),
                    });
                    done.push(i);
                }
            }
        }
        self.remove_running(done);
        events
    }

    /// The step of the sequences in `plan` (running index, tokens this step): its input, the
    /// rows whose logits it needs, and per plan entry the first of its logit rows and their
    /// count.
    #[allow(clippy::type_complexity)]
    fn build_step(&self, plan: &[(usize, usize)]) -> (StepInput, Vec<usize>, Vec<(usize, usize)>) {
        let mut step = StepInput::default();
        let mut logit_rows = Vec::new();
        let mut row_of = Vec::with_capacity(plan.len());
        for &(i, take) in plan {
            let s = &self.running[i];
            let start = step.tokens.len();
            step.tokens
                .extend_from_slice(&s.tokens[s.computed..s.computed + take]);
            step.seqs.push(SeqChunk {
                rows: start..start + take,
                pos0: s.computed,
                blocks: s.table.blocks.clone(),
            });
            let finishes = s.computed + take == s.tokens.len();
            let wants_prompt_lp =
                s.req.params.prompt_logprobs.is_some() && s.computed < s.req.prompt.len();
            let first = logit_rows.len();
            if wants_prompt_lp {
                logit_rows.extend(start..start + take);
            } else if finishes {
                logit_rows.push(start + take - 1);
            }
            row_of.push((first, logit_rows.len() - first));
        }
        (step, logit_rows, row_of)
    }

    /// Runs the model over `step` and picks what the engine needs of the logits: the tokens
    /// themselves (`no_logits`: argmax, or a draw per logit row from `draws`), else host logits.
    fn run_step(
        &mut self,
        step: &StepInput,
        logit_rows: &[usize],
        no_logits: bool,
        greedy_only: bool,
        draws: &[crate::sampling::RowSampling],
    ) -> Result<Picked> {
        if no_logits {
            let logits = self.model.forward_logits(
                step,
                &mut self.cache,
                &*self.experts,
                self.cfg.attn_mode,
                logit_rows,
            )?;
            let b = &self.model.backend;
            if greedy_only {
                b.argmax_rows(&logits).map(Picked::Tokens)
            } else {
                b.sample_rows(&logits, draws).map(Picked::Tokens)
            }
        } else {
            self.model
                .forward(
                    step,
                    &mut self.cache,
                    &*self.experts,
                    self.cfg.attn_mode,
                    logit_rows,
                )
                .map(Picked::Logits)
        }
    }

    /// Takes the running sequences at indices `idx` out of the batch and frees their cache.
    fn remove_running(&mut self, mut idx: Vec<usize>) {
        idx.sort_unstable();
        idx.dedup();
        for i in idx.into_iter().rev() {
            let mut s = self.running.remove(i);
            self.cache.release(&mut s.table);
        }
    }

    fn fail_all(&mut self, idx: Vec<usize>, e: CoreError) -> Vec<EngineEvent> {
        let kind = fail_kind(&e);
        let message = e.to_string();
        tracing::warn!(%message, requests = idx.len(), "step failed");
        let events = idx
            .iter()
            .map(|&i| EngineEvent::Failed {
                id: self.running[i].req.id,
                kind,
                message: message.clone(),
            })
            .collect();
        self.remove_running(idx);
        events
    }
    /// Samples the next token of `s`, decodes it and checks the stop rules.
    fn accept_token(
        model: &Model<B>,
        tok: Option<&Tokenizer>,
        s: &mut Seq,
        choice: Choice<'_>,
    ) -> Result<(Vec<EngineEvent>, bool)> {
        let p = &s.req.params;
        let (token, row) = match choice {
            Choice::Row(row) => (s.sampler.sample(row), Some(row)),
            Choice::Token(t) => (t, None),
        };
        let logprob = row.zip(p.logprobs).map(|(row, n)| {
            let lp = log_softmax(row);
            TokenLogprob {
                token,
                logprob: lp[token as usize],
                top: top_n(&lp, n),
            }
        });
        s.tokens.push(token);
        let generated = s.tokens.len() - s.req.prompt.len();
        let is_eos = !p.ignore_eos && model.cfg.eos_token_ids.contains(&token);
        let mut reason = if is_eos {
            Some(FinishReason::Eos)
        } else if p.stop_token_ids.contains(&token) {
            Some(FinishReason::Stop)
        } else {
            None
        };
        let mut text = String::new();
        let mut matched_stop = None;
        if let Some(t) = tok {
            if reason.is_none() {
                s.held.push_str(&s.decoder.push(t, token)?);
            }
            if let Some((cut, stop)) = find_stop(&s.held, &p.stop_strings) {
                s.held.truncate(cut);
                reason = Some(FinishReason::Stop);
                matched_stop = Some(stop.to_string());
            }
            if reason.is_none() && generated >= p.max_new_tokens {
                s.held.push_str(&s.decoder.flush(t)?);
                if let Some((cut, stop)) = find_stop(&s.held, &p.stop_strings) {
                    s.held.truncate(cut);
                    reason = Some(FinishReason::Stop);
                    matched_stop = Some(stop.to_string());
                }
            }
            let keep = if reason.is_some() {
                0
            } else {
                stop_prefix_len(&s.held, &p.stop_strings)
            };
            let emit = s.held.len() - keep;
            text = s.held[..emit].to_string();
            s.held.drain(..emit);
            s.emitted.push_str(&text);
        }
        if reason.is_none() && generated >= p.max_new_tokens {
            reason = Some(FinishReason::Length);
        }
        let mut events = vec![EngineEvent::Token {
            id: s.req.id,
            token,
            text,
            logprob,
        }];
        if let Some(reason) = reason {
            events.push(EngineEvent::Finished {
                id: s.req.id,
                reason,
                prompt_tokens: s.req.prompt.len(),
                completion_tokens: generated,
                cached_prompt_tokens: s.cached,
                text: std::mem::take(&mut s.held),
                matched_stop,
            });
        }
        Ok((events, reason.is_some()))
    }
}

/// What a step produced: host logits for every logit row, or just the greedy token of each.
enum Picked {
    Logits(Vec<f32>),
    Tokens(Vec<u32>),
}

/// How the next token of one sequence is chosen.
enum Choice<'a> {
    Row(&'a [f32]),
    Token(u32),
}

/// How a request that a step failed with `e` fails: expert shards out of reach are worth a
/// retry, anything else is the server's fault.
fn fail_kind(e: &CoreError) -> FailKind {
    match e {
        CoreError::Experts { .. } => FailKind::Unavailable,
        _ => FailKind::Internal,
    }
}

/// The sequences (indices into `seqs`) that own a row an expert failure names, or None when the
/// failure is not confined to rows or names none of the step's sequences.
fn rows_failed_by(e: &CoreError, seqs: &[SeqChunk]) -> Option<Vec<usize>> {
    let CoreError::Experts {
        rows: ExpertRows::Only(rows),
        ..
    } = e
    else {
        return None;
    };
    let hit: Vec<usize> = seqs
        .iter()
        .enumerate()
        .filter(|(_, s)| {
            // `rows` is sorted: the first one at or after the chunk's start decides.
            let at = rows.partition_point(|&r| r < s.rows.start);
            rows.get(at).is_some_and(|&r| r < s.rows.end)
        })
        .map(|(k, _)| k)
        .collect();
    (!hit.is_empty()).then_some(hit)
}

/// Byte offset where the first stop string starts in `text`.
/// Where the earliest stop string starts in `text`, and which one it is (the first listed wins
/// between two starting at the same place).
fn find_stop<'a>(text: &str, stops: &'a [String]) -> Option<(usize, &'a str)> {
    stops
        .iter()
        .filter_map(|s| text.find(s.as_str()).map(|at| (at, s.as_str())))
        .min_by_key(|&(at, _)| at)
}

/// Length of the longest suffix of `text` that is a proper prefix of a stop string (held back
/// so a stream never shows part of a stop string).
fn stop_prefix_len(text: &str, stops: &[String]) -> usize {
    let mut best = 0;
    for s in stops {
        for (i, _) in s.char_indices().skip(1) {
            if i > best && text.ends_with(&s[..i]) {
                best = i;
            }
        }
    }
    best
}

/// Prompt tokens a request may take from the prefix cache: all but the last, whose logits it
/// needs, and with prompt logprobs none of the positions whose logprobs it reports (the row at
/// position p scores token p + 1).
fn cacheable_tokens(req: &SeqRequest) -> usize {
    let all = req.prompt.len().saturating_sub(1);
    match req.params.prompt_logprobs {
        Some(_) => all.min(req.params.prompt_logprobs_skip_tokens.saturating_sub(1)),
        None => all,
    }
}

/// The result of running one request to completion.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub output_ids: Vec<u32>,
    pub text: String,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    /// Prompt tokens taken from the prefix cache.
    pub cached_prompt_tokens: usize,
    pub logprobs: Vec<TokenLogprob>,
    pub prompt_logprobs: Vec<TokenLogprob>,
}

/// Collects the events of a set of requests into completions (the in-process `generate`).
pub fn run_to_completion<B: Backend>(
    engine: &mut Engine<B>,
    reqs: Vec<SeqRequest>,
) -> Result<Vec<Completion>> {
    let ids: Vec<u64> = reqs.iter().map(|r| r.id).collect();
    let mut out: Vec<Option<Completion>> = vec![None; reqs.len()];
    let mut partial: Vec<Completion> = reqs
        .iter()
        .map(|r| Completion {
            output_ids: vec![],
            text: String::new(),
            finish_reason: FinishReason::Length,
            prompt_tokens: r.prompt.len(),
            cached_prompt_tokens: 0,
            logprobs: vec![],
            prompt_logprobs: vec![],
        })
        .collect();
    for r in reqs {
        engine.submit(r)?;
    }
    while engine.has_work() {
        for ev in engine.step() {
            let idx = |id: u64| ids.iter().position(|&x| x == id);
            match ev {
                EngineEvent::PromptLogprobs { id, logprobs } => {
                    if let Some(i) = idx(id) {
                        partial[i].prompt_logprobs = logprobs;
                    }
                }
                EngineEvent::Token {
                    id,
                    token,
                    text,
                    logprob,
                } => {
                    if let Some(i) = idx(id) {
                        partial[i].output_ids.push(token);
                        partial[i].text.push_str(&text);
                        partial[i].logprobs.extend(logprob);
                    }
                }
                EngineEvent::Finished {
                    id,
                    reason,
                    text,
                    cached_prompt_tokens,
                    ..
                } => {
                    if let Some(i) = idx(id) {
                        partial[i].text.push_str(&text);
                        partial[i].finish_reason = reason;
                        partial[i].cached_prompt_tokens = cached_prompt_tokens;
                        out[i] = Some(partial[i].clone());
                    }
                }
                EngineEvent::Failed { id, message, kind } => {
                    return Err(match kind {
                        FailKind::Unavailable => {
                            CoreError::experts(format!("request {id}: {message}"))
                        }
                        FailKind::Internal | FailKind::DeadlineExceeded => {
                            CoreError::InvalidInput(format!("request {id}: {message}"))
                        }
                    });
                }
            }
        }
    }
    out.into_iter()
        .map(|c| c.ok_or_else(|| CoreError::InvalidInput("request did not finish".into())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::backend::{AttnBatch, AttnWeights, ExpertBank, MlpWeights};
    use crate::cpu::CpuBackend;
    use crate::routing::{Routing, RoutingParams};
    use crate::weights::TensorRef;

    /// The CPU backend with one of the device paths of the engine switched on:
    /// - `device_sampling`: claims to sample on its device, so the engine takes the
    ///   `sample_rows` path (here the trait's host default), which must reproduce host sampling;
    /// - `padded_decode`: does what a graph-recording backend does with a decode step
    ///   (`Backend::decode_graph`): runs the layers on the step padded to the next power of two
    ///   rows and 32 blocks per sequence, and hands back all the padded rows' hidden states
    ///   (counted in `decode_graph_calls`).
    #[derive(Default)]
    struct CpuVariant {
        device_sampling: bool,
        padded_decode: bool,
        decode_graph_calls: std::sync::atomic::AtomicUsize,
    }

    impl Backend for CpuVariant {
        type Weight = <CpuBackend as Backend>::Weight;
        type Act = <CpuBackend as Backend>::Act;
        type Cache = <CpuBackend as Backend>::Cache;
        type HostBlocks = <CpuBackend as Backend>::HostBlocks;
        fn name(&self) -> String {
            "cpu (a device path of the engine)".into()
        }
        fn host_block_bytes(&self, c: &crate::ModelConfig, b: usize) -> usize {
            CpuBackend.host_block_bytes(c, b)
        }
        fn weight(&self, t: &TensorRef) -> Result<Self::Weight> {
            CpuBackend.weight(t)
        }
        fn new_cache(&self, c: &crate::ModelConfig, n: usize, b: usize) -> Result<Self::Cache> {
            CpuBackend.new_cache(c, n, b)
        }
        fn act_from_host(&self, r: usize, c: usize, d: &[f32]) -> Result<Self::Act> {
            CpuBackend.act_from_host(r, c, d)
        }
        fn act_to_host(&self, a: &Self::Act) -> Result<Vec<f32>> {
            CpuBackend.act_to_host(a)
        }
        fn act_shape(&self, a: &Self::Act) -> (usize, usize) {
            CpuBackend.act_shape(a)
        }
        fn select_rows(&self, a: &Self::Act, rows: &[usize]) -> Result<Self::Act> {
            CpuBackend.select_rows(a, rows)
        }
        fn embed(&self, t: &Self::Weight, ids: &[u32]) -> Result<Self::Act> {
            CpuBackend.embed(t, ids)
        }
        fn rms_norm(&self, x: &Self::Act, w: &Self::Weight, eps: f32) -> Result<Self::Act> {
            CpuBackend.rms_norm(x, w, eps)
        }
        fn add_assign(&self, acc: &mut Self::Act, x: &Self::Act) -> Result<()> {
            CpuBackend.add_assign(acc, x)
        }
        fn linear(&self, x: &Self::Act, w: &Self::Weight) -> Result<Self::Act> {
            CpuBackend.linear(x, w)
        }
        fn mlp(&self, w: &MlpWeights<Self::Weight>, x: &Self::Act) -> Result<Self::Act> {
            CpuBackend.mlp(w, x)
        }
        fn attention(
            &self,
            cfg: &crate::ModelConfig,
            w: &AttnWeights<Self::Weight>,
            x: &Self::Act,
            batch: &AttnBatch<'_>,
            cache: &mut Self::Cache,
            layer: usize,
        ) -> Result<Self::Act> {
            CpuBackend.attention(cfg, w, x, batch, cache, layer)
        }
        fn route(&self, g: &Self::Weight, x: &Self::Act, p: &RoutingParams) -> Result<Routing> {
            CpuBackend.route(g, x, p)
        }
        fn samples_on_device(&self) -> bool {
            self.device_sampling
        }
        fn experts(
            &self,
            bank: &ExpertBank<Self::Weight>,
            x: &Self::Act,
            routing: &Routing,
        ) -> Result<Self::Act> {
            CpuBackend.experts(bank, x, routing)
        }
        fn decode_graph(
            &self,
            g: &crate::backend::GraphStep<'_>,
            cache: &mut Self::Cache,
            layers: &mut crate::backend::DecodeLayers<'_, Self::Cache, Self::Act>,
        ) -> Result<Option<Self::Act>> {
            if !self.padded_decode {
                return Ok(None);
            }
            let rows = g.step.tokens.len().next_power_of_two();
            self.decode_graph_calls
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            layers(&g.step.padded_decode(rows, 32), cache).map(Some)
        }
    }

    fn sampled_runs<B: Backend>(backend: B) -> Vec<Vec<u32>> {
        sampled_runs_n(Arc::new(backend), 4)
    }

    /// The first `n` of `sampled_runs`' requests, decoded together.
    fn sampled_runs_n<B: Backend>(backend: Arc<B>, n: u64) -> Vec<Vec<u32>> {
        let dir = crate::tiny::ensure(&std::env::temp_dir().join("dsv2-engine-test"))
            .expect("tiny model");
        let (model, experts) = crate::model::load_local(backend, &dir).expect("load");
        let mut engine = Engine::new(
            Arc::new(model),
            Arc::new(experts),
            None,
            EngineConfig {
                num_blocks: 64,
                block_size: 16,
                ..EngineConfig::default()
            },
        )
        .expect("engine");
        // sampled rows of different settings plus a greedy one, decoded together
        let reqs = (0..n)
            .map(|id| SeqRequest {
                id,
                prompt: vec![1, 5 + id as u32, 9, 2],
                params: GenerateParams {
                    max_new_tokens: 12,
                    sampling: SamplingParams {
                        temperature: [0.0, 0.7, 1.3, 1.0][id as usize],
                        top_k: [0, 0, 40, 5][id as usize],
                        top_p: [1.0, 0.9, 1.0, 0.8][id as usize],
                        seed: Some(11 + id),
                    },
                    stop_token_ids: vec![],
                    stop_strings: vec![],
                    ignore_eos: true,
                    logprobs: None,
                    prompt_logprobs: None,
                    prompt_logprobs_skip_tokens: 0,
                },
            })
            .collect();
        run_to_completion(&mut engine, reqs)
            .expect("generation")
            .into_iter()
            .map(|c| c.output_ids)
            .collect()
    }

    #[test]
    fn padded_decode_steps_give_the_same_tokens() {
        // 3 sequences: each decode step is padded to 4 rows
        let plain = sampled_runs_n(Arc::new(CpuBackend), 3);
        let padded = Arc::new(CpuVariant {
            padded_decode: true,
            ..CpuVariant::default()
        });
        assert_eq!(sampled_runs_n(padded.clone(), 3), plain);
        assert!(
            padded
                .decode_graph_calls
                .load(std::sync::atomic::Ordering::Relaxed)
                >= 11,
            "decode steps did not go through decode_graph"
        );
    }

    #[test]
    fn device_sampling_path_draws_the_same_tokens_as_host_sampling() {
        let host = sampled_runs(CpuBackend);
        let device = sampled_runs(CpuVariant {
            device_sampling: true,
            ..CpuVariant::default()
        });
        assert_eq!(host, device);
        assert!(host.iter().all(|o| o.len() == 12));
        // the sampled rows really sampled: not all equal to the greedy one
        assert!(host[1..].iter().any(|o| *o != host[0]));
    }

    #[test]
    fn admit_names_the_admitted_and_a_step_reports_its_batch() {
        let dir = crate::tiny::ensure(&std::env::temp_dir().join("dsv2-engine-test"))
            .expect("tiny model");
        let (model, experts) = crate::model::load_local(Arc::new(CpuBackend), &dir).expect("load");
        let mut engine = Engine::new(
            Arc::new(model),
            Arc::new(experts),
            None,
            EngineConfig {
                num_blocks: 64,
                block_size: 16,
                max_batch_tokens: 8,
                ..EngineConfig::default()
            },
        )
        .expect("engine");
        let params = GenerateParams {
            max_new_tokens: 2,
            ignore_eos: true,
            ..GenerateParams::default()
        };
        for (id, len) in [(7u64, 5usize), (9, 6)] {
            engine
                .submit(SeqRequest {
                    id,
                    prompt: (1..=len as u32).collect(),
                    params: params.clone(),
                })
                .expect("submit");
        }
        assert_eq!(engine.last_step, StepShape::default());
        assert_eq!(engine.admit(), vec![7, 9]);
        assert!(engine.admit().is_empty(), "nothing left to admit");
        assert_eq!(engine.last_step_model_time, Duration::ZERO);
        let t_step = Instant::now();
        engine.step();
        // The model's share of the step is timed, and is part of the step's wall time.
        let model_time = engine.last_step_model_time;
        assert!(model_time > Duration::ZERO && model_time <= t_step.elapsed());
        // 5 prompt tokens of the first, then 3 of the second under the budget of 8.
        assert_eq!(
            engine.last_step,
            StepShape {
                sequences: 2,
                tokens: 8
            }
        );
        engine.step();
        // The first decodes one token, the second prefills its last 3.
        assert_eq!(
            engine.last_step,
            StepShape {
                sequences: 2,
                tokens: 4
            }
        );
    }

    /// What [`LosingExperts`] has lost.
    #[derive(Clone, Copy, Debug)]
    enum Lose {
        Nothing,
        /// One expert of one layer: as if its only shard died.
        Expert {
            layer: usize,
            expert: u32,
        },
        /// Everything: as if the whole data plane went (NCCL).
        Everything,
    }

    /// The tiny model's routed experts, in-process, minus what `lose` says: rows that chose a
    /// lost expert fail when the layer is awaited, named with `ExpertRows::Only` the way
    /// `RemoteExperts` names them; every other row gets its full result. Records every
    /// (layer, expert) it was asked for, and how many layers it refused.
    struct LosingExperts<B: Backend> {
        inner: crate::model::LocalExperts<B>,
        lose: std::sync::Mutex<Lose>,
        used: std::sync::Mutex<std::collections::BTreeSet<(usize, u32)>>,
        refused: std::sync::atomic::AtomicUsize,
    }

    impl<B: Backend> ExpertExecutor<B> for LosingExperts<B> {
        fn dispatch(
            &self,
            layer: usize,
            x: &B::Act,
            routing: &Routing,
        ) -> Result<crate::model::PendingExperts<B>> {
            let rows = routing.rows();
            self.used
                .lock()
                .expect("used")
                .extend((0..rows).flat_map(|r| routing.row(r).0.iter().map(move |&e| (layer, e))));
            let lose = *self.lose.lock().expect("lose");
            let err = match lose {
                Lose::Nothing => None,
                Lose::Everything => Some(CoreError::experts("the data plane is gone")),
                Lose::Expert { layer: l, expert } if l == layer => {
                    let hit: Vec<usize> = (0..rows)
                        .filter(|&r| routing.row(r).0.contains(&expert))
                        .collect();
                    (!hit.is_empty()).then(|| {
                        CoreError::experts_for_rows(
                            hit,
                            format!("no live shard hosts expert {expert}"),
                        )
                    })
                }
                Lose::Expert { .. } => None,
            };
            match err {
                None => self.inner.dispatch(layer, x, routing),
                Some(e) => {
                    self.refused
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    Ok(crate::model::PendingExperts::Later(Box::new(move || {
                        Err(e)
                    })))
                }
            }
        }
    }

    /// Requests of distinct prompts (no shared prefix), greedy and sampled mixed, most of them
    /// one prompt token long so that they decode from the first step (a failure then meets
    /// survivors that sample in the same step); `logprobs`: some report logprobs, which puts
    /// their steps on the host-logits path.
    fn mixed_requests(n: u64, logprobs: bool) -> Vec<SeqRequest> {
        (0..n)
            .map(|id| SeqRequest {
                id,
                prompt: (0..if id % 4 == 0 { 6 } else { 1 })
                    .map(|j| 3 + (id as u32 * 37 + j * 11) % 250)
                    .collect(),
                params: GenerateParams {
                    max_new_tokens: 8,
                    sampling: SamplingParams {
                        temperature: if id % 2 == 0 { 0.0 } else { 0.9 },
                        top_k: 0,
                        top_p: 1.0,
                        seed: Some(100 + id),
                    },
                    ignore_eos: true,
                    logprobs: (logprobs && id % 3 == 0).then_some(2),
                    ..GenerateParams::default()
                },
            })
            .collect()
    }

    /// Steps `engine` until it is idle: completions by id, failures by id.
    #[allow(clippy::type_complexity)]
    fn drive<B: Backend>(
        engine: &mut Engine<B>,
        reqs: Vec<SeqRequest>,
    ) -> (
        std::collections::BTreeMap<u64, (Vec<u32>, Vec<TokenLogprob>)>,
        std::collections::BTreeMap<u64, (FailKind, String)>,
    ) {
        let mut tokens: std::collections::BTreeMap<u64, (Vec<u32>, Vec<TokenLogprob>)> =
            Default::default();
        let mut done = std::collections::BTreeMap::new();
        let mut failed = std::collections::BTreeMap::new();
        for r in reqs {
            engine.submit(r).expect("submit");
        }
        let mut steps = 0;
        while engine.has_work() {
            steps += 1;
            assert!(steps < 10_000, "the engine does not finish");
            for ev in engine.step() {
                match ev {
                    EngineEvent::Token {
                        id, token, logprob, ..
                    } => {
                        let t = tokens.entry(id).or_default();
                        t.0.push(token);
                        t.1.extend(logprob);
                    }
                    EngineEvent::Finished { id, .. } => {
                        done.insert(id, tokens.remove(&id).unwrap_or_default());
                    }
                    EngineEvent::Failed { id, kind, message } => {
                        failed.insert(id, (kind, message));
                    }
                    EngineEvent::PromptLogprobs { .. } => {}
                }
            }
        }
        (done, failed)
    }

    /// With one expert of one layer lost, exactly the requests whose rows choose it fail
    /// UNAVAILABLE; every other request, decoded in the same steps, finishes with the tokens
    /// (and logprobs) it gets when it runs alone with every expert, and no cache block is
    /// left held.
    ///
    /// Why the comparison can be exact: at most 4 tokens a step and absorbed attention put every
    /// row on the CPU backend's row-at-a-time paths (`matmul::STREAM_MAX_ROWS`,
    /// `ABSORB_MAX_CHUNK`), so a row's numbers do not depend on what else is in its step; the
    /// routing a request gets alone is the routing it gets in the batch.
    fn lost_expert_fails_only_the_requests_that_need_it<B: Backend>(backend: B, logprobs: bool) {
        let dir = crate::tiny::ensure(&std::env::temp_dir().join("dsv2-engine-test"))
            .expect("tiny model");
        let (model, inner) = crate::model::load_local(Arc::new(backend), &dir).expect("load");
        let model = Arc::new(model);
        let moe_layers: Vec<usize> = (0..model.cfg.num_hidden_layers)
            .filter(|&l| model.cfg.is_moe_layer(l))
            .collect();
        let experts = Arc::new(LosingExperts {
            inner,
            lose: std::sync::Mutex::new(Lose::Nothing),
            used: Default::default(),
            refused: Default::default(),
        });
        let cfg = EngineConfig {
            num_blocks: 128,
            block_size: 4,
            max_batch_tokens: 4,
            attn_mode: AttnMode::Absorbed,
            ..EngineConfig::default()
        };
        let new_engine =
            || Engine::new(model.clone(), experts.clone(), None, cfg.clone()).expect("engine");
        let reqs = mixed_requests(10, logprobs);

        // Each request alone, every expert there: its output and the experts it used.
        let mut alone = std::collections::BTreeMap::new();
        let mut used = Vec::new();
        for r in &reqs {
            experts.used.lock().expect("used").clear();
            let (done, failed) = drive(&mut new_engine(), vec![r.clone()]);
            assert!(failed.is_empty(), "{failed:?}");
            alone.extend(done);
            used.push(std::mem::take(&mut *experts.used.lock().expect("used")));
        }

        // The expert to lose: of the last MoE layer (so the failing step has already written
        // every earlier layer's cache for all its sequences), needed by about half the requests.
        let users = |l: usize, e: u32| used.iter().filter(|u| u.contains(&(l, e))).count();
        let n = reqs.len();
        let (layer, expert) = moe_layers
            .iter()
            .rev()
            .find_map(|&l| {
                (0..model.cfg.n_routed_experts as u32)
                    .filter(|&e| (1..n).contains(&users(l, e)))
                    .min_by_key(|&e| users(l, e).abs_diff(n / 2))
                    .map(|e| (l, e))
            })
            .expect("an expert that some requests need and some do not");
        let needs: std::collections::BTreeSet<u64> = reqs
            .iter()
            .zip(&used)
            .filter(|(_, u)| u.contains(&(layer, expert)))
            .map(|(r, _)| r.id)
            .collect();

        *experts.lose.lock().expect("lose") = Lose::Expert { layer, expert };
        experts
            .refused
            .store(0, std::sync::atomic::Ordering::Relaxed);
        let mut engine = new_engine();
        let (done, failed) = drive(&mut engine, reqs.clone());
        assert_eq!(
            failed
                .keys()
                .copied()
                .collect::<std::collections::BTreeSet<_>>(),
            needs,
            "lost expert {expert} of layer {layer}: the failed requests are not those that need it"
        );
        for (id, (kind, message)) in &failed {
            assert_eq!(*kind, FailKind::Unavailable, "request {id}: {message}");
            assert!(message.contains("no live shard"), "request {id}: {message}");
        }
        assert_eq!(done.len() + failed.len(), n, "every request ends");
        for (id, out) in &done {
            assert_eq!(
                Some(out),
                alone.get(id),
                "request {id} differs from its run without the lost expert"
            );
        }
        assert!(experts.refused.load(std::sync::atomic::Ordering::Relaxed) > 0);
        assert_eq!(engine.running(), 0);
        assert_eq!(
            engine.free_blocks(),
            engine.num_blocks(),
            "cache blocks left held"
        );
    }

    /// Tokens picked where the logits are (argmax, and the draws of a device sampler, which a
    /// re-run must not draw again).
    #[test]
    fn lost_expert_fails_only_its_requests_tokens_picked_where_computed() {
        let device_sampling = CpuVariant {
            device_sampling: true,
            ..CpuVariant::default()
        };
        lost_expert_fails_only_the_requests_that_need_it(device_sampling, false);
    }

    /// Logits brought to the host (sampling there, logprobs).
    #[test]
    fn lost_expert_fails_only_its_requests_with_host_logits() {
        lost_expert_fails_only_the_requests_that_need_it(CpuBackend, true);
    }

    /// A failure not confined to rows (the NCCL plane lost) fails every request of the step
    /// UNAVAILABLE and frees their blocks.
    #[test]
    fn lost_data_plane_fails_every_request_of_the_step() {
        let dir = crate::tiny::ensure(&std::env::temp_dir().join("dsv2-engine-test"))
            .expect("tiny model");
        let (model, inner) = crate::model::load_local(Arc::new(CpuBackend), &dir).expect("load");
        let experts = Arc::new(LosingExperts {
            inner,
            lose: std::sync::Mutex::new(Lose::Everything),
            used: Default::default(),
            refused: Default::default(),
        });
        let mut engine = Engine::new(
            Arc::new(model),
            experts,
            None,
            EngineConfig {
                num_blocks: 64,
                block_size: 4,
                ..EngineConfig::default()
            },
        )
        .expect("engine");
        let (done, failed) = drive(&mut engine, mixed_requests(4, false));
        assert!(done.is_empty(), "{done:?}");
        assert_eq!(failed.len(), 4);
        assert!(failed.values().all(|(k, _)| *k == FailKind::Unavailable));
        assert_eq!(engine.free_blocks(), engine.num_blocks());
    }

    #[test]
    fn failed_rows_name_the_sequences_that_own_them() {
        let seqs: Vec<SeqChunk> = [0..3, 3..4, 4..9, 9..10]
            .into_iter()
            .map(|rows| SeqChunk {
                rows,
                pos0: 0,
                blocks: vec![],
            })
            .collect();
        let hit = |rows: Vec<usize>| rows_failed_by(&CoreError::experts_for_rows(rows, "x"), &seqs);
        assert_eq!(hit(vec![8, 2]), Some(vec![0, 2]));
        assert_eq!(hit(vec![3]), Some(vec![1]));
        assert_eq!(hit(vec![9, 9, 0]), Some(vec![0, 3]));
        // Rows past the step (a padded graph's) name nobody: the caller fails everyone.
        assert_eq!(hit(vec![10]), None);
        assert_eq!(hit(vec![]), None);
        assert_eq!(rows_failed_by(&CoreError::experts("x"), &seqs), None);
        assert_eq!(rows_failed_by(&CoreError::Cache("x".into()), &seqs), None);
    }

    #[test]
    fn stop_helpers() {
        let stops = vec!["END".to_string(), "\n\n".to_string()];
        assert_eq!(find_stop("abc END x", &stops), Some((4, "END")));
        // the earliest match wins, whichever string is listed first
        assert_eq!(find_stop("a\n\nb END", &stops), Some((1, "\n\n")));
        assert_eq!(find_stop("abc", &stops), None);
        assert_eq!(stop_prefix_len("abc EN", &stops), 2);
        assert_eq!(stop_prefix_len("abc\n", &stops), 1);
        assert_eq!(stop_prefix_len("abc", &stops), 0);
    }
}
