//! The prefix cache (issue 15) must not change results: requests sharing prefixes of every
//! awkward length with a cached one (none, one token, a block less one, a block, a block and one,
//! many blocks, the whole prompt) produce the tokens and logprobs they produce with the cache off;
//! concurrent requests compute a common prefix once; admission counts only the blocks a request
//! does not share; no step writes into a cached block; and a cache too small for everything
//! evicts without losing a request.
//!
//! The host tier too: with a device cache too small to keep the prefixes, blocks come back from
//! host memory instead of being prefilled, with the same outputs; a host tier too small for them
//! evicts without losing a request; and no step reads a block before its copy back is awaited.
//!
//! Logprobs are compared to 1e-4, as in engine_batching.rs: a request that takes a cached prefix
//! computes its suffix in chunks of other shapes, and the CPU matmul picks its path by row count,
//! so the last bits may differ (as they do between chunked and unchunked prefill).

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex};

use dsv2_core::ModelConfig;
use dsv2_core::backend::{AttnBatch, AttnWeights, Backend, BlockCopy, ExpertBank, MlpWeights};
use dsv2_core::cpu::{CpuBackend, CpuHostBlocks};
use dsv2_core::engine::{
    Completion, Engine, EngineConfig, GenerateParams, SeqRequest, run_to_completion,
};
use dsv2_core::error::Result;
use dsv2_core::model::{LocalExperts, Model, load_local};
use dsv2_core::routing::{Routing, RoutingParams};
use dsv2_core::weights::TensorRef;

const BS: usize = 16;

type Loaded<B> = (Arc<Model<B>>, Arc<LocalExperts<B>>);

fn load<B: Backend>(backend: B) -> Loaded<B> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/v2");
    let (model, experts) = load_local(Arc::new(backend), &dir).unwrap();
    (Arc::new(model), Arc::new(experts))
}

fn engine<B: Backend>(m: &Loaded<B>, cfg: EngineConfig) -> Engine<B> {
    Engine::new(m.0.clone(), m.1.clone(), None, cfg).unwrap()
}

fn cfg(prefix_cache: bool, num_blocks: usize, max_batch_tokens: usize) -> EngineConfig {
    EngineConfig {
        num_blocks,
        block_size: BS,
        max_batch_tokens,
        prefix_cache,
        ..EngineConfig::default()
    }
}

/// `n` token ids drawn from `seed` (ids 3..503 of the fixture's 512; different seeds differ at
/// once, so a shared prefix is exactly as long as intended).
fn tokens(seed: u32, n: usize) -> Vec<u32> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(12_345);
    (0..n)
        .map(|i| {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            let t = 3 + (x >> 8) % 500;
            if i == 0 { 3 + (seed * 37) % 500 } else { t }
        })
        .collect()
}

fn cat(a: &[u32], b: &[u32]) -> Vec<u32> {
    a.iter().chain(b).copied().collect()
}

fn request(id: u64, prompt: Vec<u32>, max_new_tokens: usize) -> SeqRequest {
    SeqRequest {
        id,
        prompt,
        params: GenerateParams {
            max_new_tokens,
            ignore_eos: true,
            logprobs: Some(2),
            ..Default::default()
        },
    }
}

fn assert_same(with: &Completion, without: &Completion, what: &str) {
    assert_eq!(with.output_ids, without.output_ids, "{what}: tokens differ");
    assert_eq!(with.logprobs.len(), without.logprobs.len(), "{what}");
    for (x, y) in with.logprobs.iter().zip(&without.logprobs) {
        assert_eq!(x.token, y.token, "{what}");
        assert!(
            (x.logprob - y.logprob).abs() < 1e-4,
            "{what}: logprob {} with the cache, {} without",
            x.logprob,
            y.logprob
        );
    }
}

/// What the cache can give a prompt after `shared` of its tokens are cached: whole blocks, and
/// never the block of the last prompt token.
fn expected_hit(shared: usize, prompt_len: usize) -> usize {
    shared.min(prompt_len - 1) / BS * BS
}

#[test]
fn every_shared_prefix_length_gives_the_same_outputs() {
    let m = load(CpuBackend);
    // 512: prompts in one chunk; 40: chunks that end inside blocks.
    for budget in [512, 40] {
        for shared in [0, 1, 15, 16, 17, 300] {
            let prefix = tokens(1, shared);
            let a = cat(&prefix, &tokens(2, 5));
            let b = cat(&prefix, &tokens(3, 7));
            // Entirely cached: a itself, and a cut to whole blocks (its last block recomputed).
            let whole = a[..(a.len() / BS * BS).max(1)].to_vec();
            let prompts = [a.clone(), b, a.clone(), whole];
            let hits = [
                0,
                expected_hit(shared, prompts[1].len()),
                expected_hit(a.len(), a.len()),
                expected_hit(a.len(), prompts[3].len()),
            ];
            let mut on = engine(&m, cfg(true, 64, budget));
            let mut off = engine(&m, cfg(false, 64, budget));
            for (i, p) in prompts.iter().enumerate() {
                let what = format!("budget {budget}, shared {shared}, request {i}");
                let before = on.stats.clone();
                let with = run_to_completion(&mut on, vec![request(1, p.clone(), 6)]).unwrap();
                let without = run_to_completion(&mut off, vec![request(1, p.clone(), 6)]).unwrap();
                assert_same(&with[0], &without[0], &what);
                assert_eq!(with[0].cached_prompt_tokens, hits[i], "{what}");
                assert_eq!(without[0].cached_prompt_tokens, 0, "{what}");
                let hit = on.stats.prefix_cache_hit_tokens - before.prefix_cache_hit_tokens;
                assert_eq!(hit as usize, hits[i], "{what}: cached tokens");
                let prefilled = on.stats.prefill_tokens - before.prefill_tokens;
                assert_eq!(prefilled as usize, p.len() - hits[i], "{what}: prefilled");
            }
            assert_eq!(off.stats.prefix_cache_hit_tokens, 0);
            assert_eq!(off.cached_blocks(), 0);
        }
    }
}

#[test]
fn concurrent_requests_compute_a_common_prefix_once() {
    let m = load(CpuBackend);
    let prefix = tokens(7, 300);
    let mut reqs: Vec<SeqRequest> = (0..4)
        .map(|i| request(i, cat(&prefix, &tokens(10 + i as u32, 5)), 8))
        .collect();
    reqs.push(request(4, reqs[0].prompt.clone(), 8));
    for budget in [512, 64] {
        let mut on = engine(&m, cfg(true, 128, budget));
        let mut off = engine(&m, cfg(false, 128, budget));
        let with = run_to_completion(&mut on, reqs.clone()).unwrap();
        let without = run_to_completion(&mut off, reqs.clone()).unwrap();
        for (i, (w, wo)) in with.iter().zip(&without).enumerate() {
            assert_same(w, wo, &format!("budget {budget}, request {i}"));
        }
        // The first computes 305 tokens; the others only what follows their cached 288 (the
        // copy of the first, entirely cached, its last token).
        assert_eq!(on.stats.prefill_tokens, 305 + 3 * 17 + 1, "budget {budget}");
        assert_eq!(off.stats.prefill_tokens, 5 * 305);
        assert_eq!(on.stats.prefix_cache_queried_tokens, 5 * 305);
        assert_eq!(on.stats.prefix_cache_hit_tokens, 4 * 288 + 16);
    }
}

#[test]
fn admission_counts_only_the_blocks_a_request_does_not_share() {
    let m = load(CpuBackend);
    let prefix = tokens(8, 300);
    // Each needs 305 + 40 = 345 tokens: 22 blocks, 18 of them a shared prefix. 26 blocks hold
    // both only if the second takes the first's 18 by reference.
    let reqs = || -> Vec<SeqRequest> {
        (0..2)
            .map(|i| request(i, cat(&prefix, &tokens(20 + i as u32, 5)), 40))
            .collect()
    };
    let max_running_with = |prefix_cache: bool| {
        let mut e = engine(&m, cfg(prefix_cache, 26, 512));
        for r in reqs() {
            e.submit(r).unwrap();
        }
        let mut most = 0;
        while e.has_work() {
            e.step();
            most = most.max(e.running());
        }
        most
    };
    assert_eq!(max_running_with(true), 2);
    assert_eq!(max_running_with(false), 1);
}

#[test]
fn eviction_under_memory_pressure_loses_no_request() {
    let m = load(CpuBackend);
    // Four families of a 100-token prefix, four requests each, interleaved: 16 requests of
    // 105 + 8 tokens (8 blocks) in a cache of 24 blocks, which holds three at a time and must
    // evict cached prefixes to admit the next.
    let families: Vec<Vec<u32>> = (0..4).map(|f| tokens(30 + f, 100)).collect();
    let reqs: Vec<SeqRequest> = (0..16u64)
        .map(|i| {
            let f = &families[i as usize % 4];
            request(i, cat(f, &tokens(40 + i as u32, 5)), 8)
        })
        .collect();
    let reference = run_to_completion(&mut engine(&m, cfg(false, 256, 512)), reqs.clone()).unwrap();
    for budget in [512, 48] {
        let mut e = engine(&m, cfg(true, 24, budget));
        let out = run_to_completion(&mut e, reqs.clone()).unwrap();
        assert_eq!(out.len(), 16);
        for (i, (a, b)) in out.iter().zip(&reference).enumerate() {
            assert_same(a, b, &format!("budget {budget}, request {i}"));
        }
        assert!(
            e.cache().evicted_blocks() > 0,
            "the cache was never full: the test tests nothing"
        );
        if budget == 512 {
            // Requests finish three at a time and the next family finds its prefix parked. With
            // budget 48 they finish one at a time and the four families cycle through room for
            // three, LRU's worst case: every prefix is evicted before its next use.
            assert!(e.stats.prefix_cache_hit_tokens > 0);
        }
        assert_eq!(
            e.free_blocks(),
            24,
            "every block is free or evictable again"
        );
        // Once more in the other order, over whatever the first round left cached.
        let back: Vec<SeqRequest> = reqs.iter().rev().cloned().collect();
        let again = run_to_completion(&mut e, back).unwrap();
        for (a, b) in again.iter().rev().zip(&reference) {
            assert_same(a, b, &format!("budget {budget}, second round"));
        }
    }
}

/// The CPU backend, checking every attention call's writes: none may land in a block the test
/// marked cached before the step. It also counts reads of such blocks, to show sharing happened.
///
/// Its host tier copies back the way a GPU does, late: `import_blocks` only reads the host slots,
/// the blocks are written in `await_imports`. A step that read them before would see what they
/// held before (and is recorded).
#[derive(Default)]
struct Watch {
    cpu: CpuBackend,
    state: Arc<Mutex<WatchState>>,
}

#[derive(Default)]
struct WatchState {
    cached: HashSet<u32>,
    writes_into_cached: Vec<String>,
    reads_of_cached: usize,
    /// Blocks whose copy back is issued and not yet awaited.
    importing: HashSet<u32>,
    reads_of_importing: Vec<String>,
    /// Steps (layer 0's attention) that ran while copies back were in flight.
    steps_beside_imports: usize,
    exports_of_importing: usize,
    /// Every copy back fails.
    fail_imports: bool,
}

/// Host slots, and the copies back not yet written: (what was read from the slots, into which
/// blocks).
struct LateHostBlocks {
    slots: CpuHostBlocks,
    cfg: ModelConfig,
    block_size: usize,
    late: Vec<(CpuHostBlocks, Vec<BlockCopy>)>,
}

impl Backend for Watch {
    type Weight = <CpuBackend as Backend>::Weight;
    type Act = <CpuBackend as Backend>::Act;
    type Cache = <CpuBackend as Backend>::Cache;
    type HostBlocks = LateHostBlocks;
    fn name(&self) -> String {
        "cpu (watched writes)".into()
    }
    fn host_block_bytes(&self, c: &ModelConfig, b: usize) -> usize {
        self.cpu.host_block_bytes(c, b)
    }
    fn new_host_blocks(&self, c: &ModelConfig, b: usize, slots: usize) -> Result<LateHostBlocks> {
        Ok(LateHostBlocks {
            slots: self.cpu.new_host_blocks(c, b, slots)?,
            cfg: c.clone(),
            block_size: b,
            late: Vec::new(),
        })
    }
    fn export_blocks(
        &self,
        cache: &Self::Cache,
        host: &mut LateHostBlocks,
        copies: &[BlockCopy],
    ) -> Result<()> {
        let mut st = self.state.lock().unwrap();
        st.exports_of_importing += copies
            .iter()
            .filter(|c| st.importing.contains(&c.block))
            .count();
        self.cpu.export_blocks(cache, &mut host.slots, copies)
    }
    fn import_blocks(
        &self,
        host: &mut LateHostBlocks,
        _cache: &mut Self::Cache,
        copies: &[BlockCopy],
    ) -> Result<()> {
        if self.state.lock().unwrap().fail_imports {
            return Err(dsv2_core::CoreError::Backend {
                backend: self.name(),
                msg: "copy back failed (test)".into(),
            });
        }
        // Read the slots now (a later export may reuse them, as on a GPU's copy stream, which
        // runs in order), through a scratch cache of one block per copy.
        let n = copies.len();
        let mut scratch = self.cpu.new_cache(&host.cfg, n, host.block_size)?;
        let to_scratch: Vec<BlockCopy> = (0..n as u32)
            .map(|i| BlockCopy {
                block: i,
                slot: copies[i as usize].slot,
            })
            .collect();
        self.cpu
            .import_blocks(&mut host.slots, &mut scratch, &to_scratch)?;
        let mut read = self.cpu.new_host_blocks(&host.cfg, host.block_size, n)?;
        let same: Vec<BlockCopy> = (0..n as u32)
            .map(|i| BlockCopy { block: i, slot: i })
            .collect();
        self.cpu.export_blocks(&scratch, &mut read, &same)?;
        let into = (0..n as u32)
            .map(|i| BlockCopy {
                block: copies[i as usize].block,
                slot: i,
            })
            .collect();
        host.late.push((read, into));
        let mut st = self.state.lock().unwrap();
        st.importing.extend(copies.iter().map(|c| c.block));
        Ok(())
    }
    fn imports_overlap_steps(&self) -> bool {
        true
    }
    fn await_imports(&self, host: &mut LateHostBlocks, cache: &mut Self::Cache) -> Result<()> {
        for (mut read, into) in host.late.drain(..) {
            self.cpu.import_blocks(&mut read, cache, &into)?;
        }
        self.state.lock().unwrap().importing.clear();
        Ok(())
    }
    fn weight(&self, t: &TensorRef) -> Result<Self::Weight> {
        self.cpu.weight(t)
    }
    fn new_cache(&self, c: &ModelConfig, n: usize, b: usize) -> Result<Self::Cache> {
        self.cpu.new_cache(c, n, b)
    }
    fn act_from_host(&self, r: usize, c: usize, d: &[f32]) -> Result<Self::Act> {
        self.cpu.act_from_host(r, c, d)
    }
    fn act_to_host(&self, a: &Self::Act) -> Result<Vec<f32>> {
        self.cpu.act_to_host(a)
    }
    fn act_shape(&self, a: &Self::Act) -> (usize, usize) {
        self.cpu.act_shape(a)
    }
    fn select_rows(&self, a: &Self::Act, rows: &[usize]) -> Result<Self::Act> {
        self.cpu.select_rows(a, rows)
    }
    fn embed(&self, t: &Self::Weight, ids: &[u32]) -> Result<Self::Act> {
        self.cpu.embed(t, ids)
    }
    fn rms_norm(&self, x: &Self::Act, w: &Self::Weight, eps: f32) -> Result<Self::Act> {
        self.cpu.rms_norm(x, w, eps)
    }
    fn add_assign(&self, acc: &mut Self::Act, x: &Self::Act) -> Result<()> {
        self.cpu.add_assign(acc, x)
    }
    fn linear(&self, x: &Self::Act, w: &Self::Weight) -> Result<Self::Act> {
        self.cpu.linear(x, w)
    }
    fn mlp(&self, w: &MlpWeights<Self::Weight>, x: &Self::Act) -> Result<Self::Act> {
        self.cpu.mlp(w, x)
    }
    fn attention(
        &self,
        cfg: &ModelConfig,
        w: &AttnWeights<Self::Weight>,
        x: &Self::Act,
        batch: &AttnBatch<'_>,
        cache: &mut Self::Cache,
        layer: usize,
    ) -> Result<Self::Act> {
        let mut st = self.state.lock().unwrap();
        for s in batch.seqs {
            let bs = batch.block_size;
            for p in s.pos0..s.pos0 + s.rows.len() {
                let b = s.blocks[p / bs];
                if st.cached.contains(&b) {
                    let msg = format!("layer {layer}: position {p} written into cached block {b}");
                    st.writes_into_cached.push(msg);
                }
            }
            let read = (0..s.pos0.div_ceil(bs)).filter(|&i| st.cached.contains(&s.blocks[i]));
            st.reads_of_cached += read.count();
            for i in 0..s.pos0.div_ceil(bs) {
                if st.importing.contains(&s.blocks[i]) {
                    let msg = format!(
                        "layer {layer}: block {} read before its copy back",
                        s.blocks[i]
                    );
                    st.reads_of_importing.push(msg);
                }
            }
        }
        if layer == 0 && !st.importing.is_empty() {
            st.steps_beside_imports += 1;
        }
        drop(st);
        self.cpu.attention(cfg, w, x, batch, cache, layer)
    }
    fn route(&self, g: &Self::Weight, x: &Self::Act, p: &RoutingParams) -> Result<Routing> {
        self.cpu.route(g, x, p)
    }
    fn experts(
        &self,
        bank: &ExpertBank<Self::Weight>,
        x: &Self::Act,
        routing: &Routing,
    ) -> Result<Self::Act> {
        self.cpu.experts(bank, x, routing)
    }
}

#[test]
fn no_step_writes_into_a_block_another_request_reads() {
    let watch = Watch::default();
    let state = watch.state.clone();
    let m = load(watch);
    let prefix = tokens(50, 200);
    let mut reqs: Vec<SeqRequest> = (0..6u64)
        .map(|i| {
            request(
                i,
                cat(&prefix, &tokens(60 + i as u32, 3 + i as usize * 7)),
                12,
            )
        })
        .collect();
    reqs.push(request(6, prefix[..192].to_vec(), 12)); // whole blocks, all cached
    reqs.push(request(7, prefix.clone(), 12));
    // Budget 40: prefills in chunks that end inside blocks, next to decodes.
    let mut e = engine(&m, cfg(true, 128, 40));
    let mut waves = vec![reqs[..2].to_vec(), reqs[2..].to_vec()].into_iter();
    let mut steps = 0;
    loop {
        if !e.has_work() {
            let Some(wave) = waves.next() else { break };
            for r in wave {
                e.submit(r).unwrap();
            }
        }
        let cached: HashSet<u32> = (0..e.num_blocks() as u32)
            .filter(|&b| e.cache().is_cached(b))
            .collect();
        state.lock().unwrap().cached = cached;
        e.step();
        steps += 1;
        assert!(steps < 10_000);
    }
    let st = state.lock().unwrap();
    assert!(
        st.writes_into_cached.is_empty(),
        "{:?}",
        st.writes_into_cached
    );
    assert!(st.reads_of_cached > 0, "no request read a cached block");
    assert!(e.stats.prefix_cache_hit_tokens >= 6 * 192);
}

#[test]
fn prompt_logprobs_after_the_skipped_tokens_come_with_a_cached_prefix() {
    let m = load(CpuBackend);
    let prefix = tokens(70, 300);
    let mut on = engine(&m, cfg(true, 64, 512));
    let mut off = engine(&m, cfg(false, 64, 512));
    run_to_completion(&mut on, vec![request(1, cat(&prefix, &tokens(71, 5)), 4)]).unwrap();
    let b = cat(&prefix, &tokens(72, 6));
    let scored = |skip| {
        let mut r = request(2, b.clone(), 4);
        r.params.prompt_logprobs = Some(2);
        r.params.prompt_logprobs_skip_tokens = skip;
        r
    };
    // Every prompt logprob, computed without the cache.
    let full = run_to_completion(&mut off, vec![scored(0)])
        .unwrap()
        .remove(0);
    assert_eq!(full.prompt_logprobs.len(), b.len() - 1);
    for skip in [0, 1, 200, 290, 305, 306, 400] {
        let what = format!("skip {skip}");
        let with = run_to_completion(&mut on, vec![scored(skip)])
            .unwrap()
            .remove(0);
        assert_same(&with, &full, &what);
        // Position p's row scores token p + 1: positions from skip - 1 on are computed. (The
        // first run, skip 0, computes all of b and leaves its whole blocks cached.)
        let cacheable = skip.saturating_sub(1).min(b.len() - 1);
        assert_eq!(
            with.cached_prompt_tokens,
            expected_hit(cacheable, b.len()),
            "{what}"
        );
        let from = skip.max(1).min(b.len());
        let tail = &full.prompt_logprobs[from - 1..];
        assert_eq!(with.prompt_logprobs.len(), tail.len(), "{what}");
        for (x, y) in with.prompt_logprobs.iter().zip(tail) {
            assert_eq!((x.token, x.top.len()), (y.token, y.top.len()), "{what}");
            assert!((x.logprob - y.logprob).abs() < 1e-4, "{what}");
        }
    }
}

/// `cfg` with a host tier of `blocks` blocks of the fixture model.
fn with_host<B: Backend>(m: &Loaded<B>, mut cfg: EngineConfig, blocks: u64) -> EngineConfig {
    cfg.host_cache_bytes = blocks * m.0.backend.host_block_bytes(&m.0.cfg, BS) as u64;
    cfg
}

/// Four families of a 100-token prefix, four requests each, interleaved (as in the eviction test
/// above): 105 + 8 tokens, 8 blocks, each.
fn families() -> Vec<SeqRequest> {
    let families: Vec<Vec<u32>> = (0..4).map(|f| tokens(30 + f, 100)).collect();
    (0..16u64)
        .map(|i| {
            let f = &families[i as usize % 4];
            request(i, cat(f, &tokens(40 + i as u32, 5)), 8)
        })
        .collect()
}

#[test]
fn the_host_tier_brings_back_what_the_device_evicted_with_the_same_outputs() {
    let reqs = families();
    let reference = run_to_completion(
        &mut engine(&load(CpuBackend), cfg(false, 256, 512)),
        reqs.clone(),
    )
    .unwrap();
    let watch = Watch::default();
    let state = watch.state.clone();
    let m = load(watch);
    // Budget 48: requests finish one at a time, and the four families cycle through a device
    // cache with room for three: without the host tier every prefix is evicted before its next
    // use and nothing is hit.
    for budget in [512, 48] {
        let what = format!("budget {budget}");
        let mut device_only = engine(&m, cfg(true, 24, budget));
        let mut tiered = engine(&m, with_host(&m, cfg(true, 24, budget), 64));
        let a = run_to_completion(&mut device_only, reqs.clone()).unwrap();
        let b = run_to_completion(&mut tiered, reqs.clone()).unwrap();
        for (i, ((a, b), r)) in a.iter().zip(&b).zip(&reference).enumerate() {
            assert_same(a, r, &format!("{what}, device only, request {i}"));
            assert_same(b, r, &format!("{what}, host tier, request {i}"));
        }
        let (d, t) = (&device_only.stats, &tiered.stats);
        assert_eq!(d.host_cache_hit_tokens, 0);
        assert!(
            t.host_cache_hit_tokens > 0,
            "{what}: the host tier was never hit"
        );
        assert!(
            t.prefill_tokens < d.prefill_tokens,
            "{what}: {} tokens prefilled with the host tier, {} without",
            t.prefill_tokens,
            d.prefill_tokens
        );
        // Restored tokens count as cached, in the stats and in each request's usage.
        assert_eq!(
            t.prefix_cache_hit_tokens,
            b.iter().map(|c| c.cached_prompt_tokens as u64).sum::<u64>()
        );
        assert_eq!(
            t.prefill_tokens + t.prefix_cache_hit_tokens,
            reqs.iter().map(|r| r.prompt.len() as u64).sum::<u64>()
        );
        let hs = tiered.cache().host_stats();
        assert_eq!(
            hs.restored_blocks * BS as u64,
            t.host_cache_hit_tokens,
            "{what}"
        );
        assert!(tiered.cache().host_cached_blocks() > 0);
        assert_eq!(
            tiered.free_blocks(),
            24,
            "{what}: every block free or evictable again"
        );
    }
    let st = state.lock().unwrap();
    assert!(
        st.reads_of_importing.is_empty(),
        "{:?}",
        st.reads_of_importing
    );
    assert_eq!(st.exports_of_importing, 0);
}

#[test]
fn eviction_from_the_host_tier_under_pressure_loses_no_request() {
    let reqs = families();
    let m = load(CpuBackend);
    let reference = run_to_completion(&mut engine(&m, cfg(false, 256, 512)), reqs.clone()).unwrap();
    for budget in [512, 48] {
        // A host tier of 8 blocks: one family's prefix (6 full blocks) and a little more.
        let mut e = engine(&m, with_host(&m, cfg(true, 24, budget), 8));
        assert_eq!(e.cache().host_capacity_blocks(), 8);
        let out = run_to_completion(&mut e, reqs.clone()).unwrap();
        for (i, (a, b)) in out.iter().zip(&reference).enumerate() {
            assert_same(a, b, &format!("budget {budget}, request {i}"));
        }
        let hs = e.cache().host_stats();
        assert!(
            hs.evicted_blocks > 0,
            "budget {budget}: the host tier was never full"
        );
        assert!(e.cache().host_cached_blocks() <= 8);
        let back: Vec<SeqRequest> = reqs.iter().rev().cloned().collect();
        let again = run_to_completion(&mut e, back).unwrap();
        for (a, b) in again.iter().rev().zip(&reference) {
            assert_same(a, b, &format!("budget {budget}, second round"));
        }
    }
}

#[test]
fn copies_back_run_beside_other_requests_and_are_awaited_before_a_read() {
    let watch = Watch::default();
    let state = watch.state.clone();
    let m = load(watch);
    let prefix = tokens(80, 100);
    let p = request(1, cat(&prefix, &tokens(81, 5)), 8);
    // 240 + 16 tokens: the whole device cache of 16 blocks, which evicts p's prefix to the host.
    let filler = request(2, tokens(82, 240), 16);
    let long = request(3, tokens(83, 10), 40);
    let q = request(4, cat(&prefix, &tokens(84, 7)), 8);
    let reference = {
        let mut off = engine(&load(CpuBackend), cfg(false, 64, 512));
        run_to_completion(
            &mut off,
            vec![p.clone(), filler.clone(), long.clone(), q.clone()],
        )
        .unwrap()
    };
    let mut e = engine(&m, with_host(&m, cfg(true, 16, 512), 64));
    let first = run_to_completion(&mut e, vec![p.clone()]).unwrap();
    run_to_completion(&mut e, vec![filler.clone()]).unwrap();
    assert_eq!(
        e.cache().cached_prefix_tokens(&q.prompt, usize::MAX),
        96,
        "on the host"
    );
    // `long` decodes while q's prefix comes back.
    let mut events = Vec::new();
    e.submit(long.clone()).unwrap();
    for _ in 0..3 {
        events.extend(e.step());
    }
    let prefilled = e.stats.prefill_tokens;
    e.submit(q.clone()).unwrap();
    while e.has_work() {
        events.extend(e.step());
    }
    assert_eq!(
        e.stats.prefill_tokens - prefilled,
        q.prompt.len() as u64 - 96,
        "q prefilled only its tail"
    );
    assert_eq!(e.stats.host_cache_hit_tokens, 96);
    let done = |id: u64| -> Completion {
        let mut c = Completion {
            output_ids: vec![],
            text: String::new(),
            finish_reason: dsv2_core::engine::FinishReason::Length,
            prompt_tokens: 0,
            cached_prompt_tokens: 0,
            logprobs: vec![],
            prompt_logprobs: vec![],
        };
        for ev in &events {
            match ev {
                dsv2_core::engine::EngineEvent::Token {
                    id: i,
                    token,
                    logprob,
                    ..
                } if *i == id => {
                    c.output_ids.push(*token);
                    c.logprobs.extend(logprob.clone());
                }
                dsv2_core::engine::EngineEvent::Finished {
                    id: i,
                    cached_prompt_tokens,
                    ..
                } if *i == id => {
                    c.cached_prompt_tokens = *cached_prompt_tokens;
                }
                dsv2_core::engine::EngineEvent::Failed { message, .. } => panic!("{message}"),
                _ => {}
            }
        }
        c
    };
    assert_same(&first[0], &reference[0], "p");
    assert_same(&done(3), &reference[2], "long");
    let q_out = done(4);
    assert_same(&q_out, &reference[3], "q, its prefix from the host");
    assert_eq!(q_out.cached_prompt_tokens, 96);
    let st = state.lock().unwrap();
    assert!(
        st.reads_of_importing.is_empty(),
        "{:?}",
        st.reads_of_importing
    );
    assert!(
        st.steps_beside_imports > 0,
        "no step ran while q's blocks were coming back"
    );
}

#[test]
fn a_failed_copy_back_fails_only_the_requests_that_read_it() {
    let watch = Watch::default();
    let state = watch.state.clone();
    let m = load(watch);
    let prefix = tokens(90, 100);
    let mut e = engine(&m, with_host(&m, cfg(true, 16, 512), 64));
    run_to_completion(&mut e, vec![request(1, cat(&prefix, &tokens(91, 5)), 8)]).unwrap();
    run_to_completion(&mut e, vec![request(2, tokens(92, 240), 16)]).unwrap();
    state.lock().unwrap().fail_imports = true;
    e.submit(request(3, tokens(93, 10), 20)).unwrap();
    e.step();
    e.submit(request(4, cat(&prefix, &tokens(94, 7)), 8))
        .unwrap();
    let mut failed = Vec::new();
    let mut finished = Vec::new();
    while e.has_work() {
        for ev in e.step() {
            match ev {
                dsv2_core::engine::EngineEvent::Failed { id, message, .. } => {
                    failed.push((id, message))
                }
                dsv2_core::engine::EngineEvent::Finished { id, .. } => finished.push(id),
                _ => {}
            }
        }
    }
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0].0, 4);
    assert!(failed[0].1.contains("copy back failed"), "{}", failed[0].1);
    assert_eq!(finished, vec![3]);
    assert_eq!(e.free_blocks(), 16, "the failed request's blocks came back");
    assert_eq!(
        e.cache().host_cached_blocks(),
        0,
        "the tier forgot what it held"
    );
    // And the engine goes on: the same prompt again is prefilled, correctly.
    state.lock().unwrap().fail_imports = false;
    let q = request(5, cat(&prefix, &tokens(94, 7)), 8);
    let again = run_to_completion(&mut e, vec![q.clone()]).unwrap();
    let reference =
        run_to_completion(&mut engine(&load(CpuBackend), cfg(false, 64, 512)), vec![q]).unwrap();
    assert_same(&again[0], &reference[0], "after the failure");
}
