//! One bench configuration on the model itself (no engine, so prefill and decode never share a
//! step): prefill every prompt in steps of at most `prefill_tokens` tokens, then time each greedy
//! decode step of the whole batch, `Model::forward_logits` + `Backend::argmax_rows` (the sampled
//! ids reach the host, so each step's wall time is the device's too).

use std::time::Instant;

use anyhow::{Context, Result, bail};
use dsv2_core::backend::{AttnMode, Backend, SeqChunk};
use dsv2_core::kv_cache::BlockTable;
use dsv2_core::model::{Model, StepInput};

use super::probe::RoutingProbe;

pub struct Plan<'a> {
    pub prompts: &'a [Vec<u32>],
    /// Timed decode steps.
    pub decode_steps: usize,
    /// Untimed decode steps with host routing, run when a timed step's routing was not seen.
    pub probe_steps: usize,
    pub prefill_tokens: usize,
    /// Tokens per KV cache block.
    pub block_size: usize,
}

/// What one run of a configuration measured.
#[derive(Debug, Clone, Default)]
pub struct Run {
    pub prefill_s: f64,
    /// Until sequence 0's first token.
    pub ttft_first_s: f64,
    pub prefill_steps: usize,
    /// Wall seconds of each timed decode step.
    pub step_s: Vec<f64>,
    /// Each timed step's context per sequence (tokens attended, the new one included).
    pub step_ctx: Vec<Vec<usize>>,
    /// Distinct experts of each (MoE layer, step) routing seen in the timed decode steps.
    pub touched_timed: Vec<usize>,
    /// The same from the probe steps (only when timed steps left MoE layers unseen).
    pub touched_probe: Vec<usize>,
    /// Timed decode steps in which every MoE layer's routing was seen.
    pub steps_fully_seen: usize,
    /// Distinct experts per MoE layer during the prefill, where seen.
    pub touched_prefill: Vec<usize>,
    /// Sequence 0's greedy tokens (the prefill's first, then one per decode step).
    pub output_ids_seq0: Vec<u32>,
}

/// Runs `plan` once from an empty cache; `tick` is called after every step.
pub fn run<B: Backend>(
    model: &Model<B>,
    probe: &RoutingProbe<B>,
    plan: &Plan<'_>,
    mut tick: impl FnMut(),
) -> Result<Run> {
    let b = &*model.backend;
    let moe_layers = model.cfg.moe_layers().len();
    let extra = plan.decode_steps + plan.probe_steps;
    let lens: Vec<usize> = plan.prompts.iter().map(Vec::len).collect();
    if lens.contains(&0) {
        bail!("an empty prompt");
    }
    let bs = plan.block_size.max(1);
    let num_blocks: usize = lens.iter().map(|l| (l + extra).div_ceil(bs)).sum();
    let mut cache = model
        .new_cache(num_blocks.max(1), bs)
        .context("allocating the KV cache")?;
    // Each sequence's whole footprint up front, as the engine admits requests: the block
    // tables do not change from step to step.
    let mut tables = Vec::with_capacity(lens.len());
    for &l in &lens {
        let mut t = BlockTable::default();
        cache.reserve(&mut t, l + extra)?;
        tables.push(t);
    }
    let mut out = Run::default();
    let mut last = vec![0u32; lens.len()];
    probe.set_host_routing(false);
    probe.take();

    // Prefill: whole prompts packed into steps of at most `prefill_tokens` tokens, a prompt
    // longer than that cut into chunks.
    let t0 = Instant::now();
    let (mut seq, mut off) = (0usize, 0usize);
    while seq < lens.len() {
        let mut step = StepInput::default();
        let mut logit_rows = Vec::new();
        let mut done = Vec::new();
        while seq < lens.len() && step.tokens.len() < plan.prefill_tokens {
            let take = (lens[seq] - off).min(plan.prefill_tokens - step.tokens.len());
            let r0 = step.tokens.len();
            step.tokens
                .extend_from_slice(&plan.prompts[seq][off..off + take]);
            step.seqs.push(SeqChunk {
                rows: r0..r0 + take,
                pos0: off,
                blocks: tables[seq].blocks.clone(),
            });
            off += take;
            if off == lens[seq] {
                logit_rows.push(r0 + take - 1);
                done.push(seq);
                seq += 1;
                off = 0;
            }
        }
        // A step that completes no prompt still takes one logit row, so that its end is
        // waited for like every other step's.
        let rows = if logit_rows.is_empty() {
            vec![0]
        } else {
            logit_rows.clone()
        };
        let logits = model.forward_logits(&step, &mut cache, probe, AttnMode::Auto, &rows)?;
        let ids = b.argmax_rows(&logits)?;
        for (&s, &id) in done.iter().zip(&ids) {
            last[s] = id;
            if s == 0 {
                out.ttft_first_s = t0.elapsed().as_secs_f64();
            }
        }
        out.prefill_steps += 1;
        out.touched_prefill
            .extend(probe.take().into_iter().map(|(_, n)| n));
        tick();
    }
    out.prefill_s = t0.elapsed().as_secs_f64();
    out.output_ids_seq0.push(last[0]);

    // Decode: one row per sequence. The step input is built before the clock starts.
    let rows: Vec<usize> = (0..lens.len()).collect();
    let mut step = StepInput {
        tokens: last.clone(),
        seqs: tables
            .iter()
            .zip(&lens)
            .enumerate()
            .map(|(i, (t, &l))| SeqChunk {
                rows: i..i + 1,
                pos0: l,
                blocks: t.blocks.clone(),
            })
            .collect(),
    };
    for k in 0..extra {
        let probing = k >= plan.decode_steps;
        if probing && (out.steps_fully_seen == plan.decode_steps || moe_layers == 0) {
            break;
        }
        probe.set_host_routing(probing);
        step.tokens.copy_from_slice(&last);
        for (s, &l) in step.seqs.iter_mut().zip(&lens) {
            s.pos0 = l + k;
        }
        let t = Instant::now();
        let logits = model.forward_logits(&step, &mut cache, probe, AttnMode::Auto, &rows)?;
        last = b.argmax_rows(&logits)?;
        let secs = t.elapsed().as_secs_f64();
        let seen: Vec<usize> = probe.take().into_iter().map(|(_, n)| n).collect();
        if probing {
            out.touched_probe.extend(seen);
        } else {
            out.step_s.push(secs);
            out.step_ctx.push(lens.iter().map(|l| l + k + 1).collect());
            out.output_ids_seq0.push(last[0]);
            if seen.len() == moe_layers {
                out.steps_fully_seen += 1;
            }
            out.touched_timed.extend(seen);
        }
        tick();
    }
    probe.set_host_routing(false);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use dsv2_core::cpu::CpuBackend;

    use super::super::prompts::Prompts;
    use super::*;

    fn tiny() -> (
        Model<CpuBackend>,
        Arc<dsv2_core::model::LocalExperts<CpuBackend>>,
    ) {
        // once per process: tiny::ensure's scratch dir is named by the process id, so two tests
        // of one process must not write it at the same time
        static DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
        let dir = DIR.get_or_init(|| {
            dsv2_core::tiny::ensure(&std::env::temp_dir().join("dsv2-cli-test-cache")).unwrap()
        });
        let (m, e) = dsv2_core::model::load_local(Arc::new(CpuBackend), dir).unwrap();
        (m, Arc::new(e))
    }

    fn touched(
        model: &Model<CpuBackend>,
        probe: &RoutingProbe<CpuBackend>,
        seqs: &[Vec<u32>],
    ) -> Run {
        with_blocks(model, probe, seqs, 16)
    }

    fn with_blocks(
        model: &Model<CpuBackend>,
        probe: &RoutingProbe<CpuBackend>,
        seqs: &[Vec<u32>],
        block_size: usize,
    ) -> Run {
        let plan = Plan {
            prompts: seqs,
            decode_steps: 3,
            probe_steps: 2,
            prefill_tokens: 20,
            block_size,
        };
        run(model, probe, &plan, || {}).unwrap()
    }

    #[test]
    fn the_block_size_changes_the_cache_layout_not_the_tokens() {
        let (model, experts) = tiny();
        let cfg = &model.cfg;
        let probe = RoutingProbe::new(experts, cfg.n_routed_experts);
        let seqs = Prompts::random(3, false, cfg.vocab_size, vec![0, 1])
            .unwrap()
            .batch(3, 12);
        let by16 = with_blocks(&model, &probe, &seqs, 16);
        // 64: every sequence in one block; 5: prompts and steps cross block boundaries
        for bs in [64, 5] {
            let other = with_blocks(&model, &probe, &seqs, bs);
            assert_eq!(
                other.output_ids_seq0, by16.output_ids_seq0,
                "block size {bs}"
            );
            assert_eq!(other.step_ctx, by16.step_ctx, "block size {bs}");
        }
    }

    #[test]
    fn experts_touched_are_top_k_for_one_row_and_fewer_for_copies() {
        let (model, experts) = tiny();
        let cfg = &model.cfg;
        let probe = RoutingProbe::new(experts, cfg.n_routed_experts);
        let moe = cfg.moe_layers().len();
        let k = cfg.num_experts_per_tok;
        let distinct = Prompts::random(3, false, cfg.vocab_size, vec![0, 1]).unwrap();
        let same = Prompts::random(3, true, cfg.vocab_size, vec![0, 1]).unwrap();

        // One row picks top-k different experts in every MoE layer of every step.
        let one = touched(&model, &probe, &distinct.batch(1, 12));
        assert_eq!(one.step_s.len(), 3);
        assert_eq!(
            one.steps_fully_seen, 3,
            "the CPU routes on the host: every step is seen"
        );
        assert_eq!(one.touched_timed, vec![k; 3 * moe]);
        assert!(one.touched_probe.is_empty(), "no probe steps needed");
        // 12-token prompts over prefill steps of 20 tokens: one step, seen in each MoE layer
        assert_eq!((one.prefill_steps, one.touched_prefill.len()), (1, moe));

        // Copies of one prompt route alike: still top-k; distinct prompts touch more.
        let copies = touched(&model, &probe, &same.batch(6, 12));
        assert_eq!(copies.touched_timed, vec![k; 3 * moe]);
        assert_eq!(
            copies.output_ids_seq0, one.output_ids_seq0,
            "sequence 0 is the same prompt"
        );
        let many = touched(&model, &probe, &distinct.batch(6, 12));
        let sum = |v: &[usize]| v.iter().sum::<usize>();
        assert!(many.touched_timed.iter().all(|&n| (k..=6 * k).contains(&n)));
        assert!(
            sum(&many.touched_timed) > sum(&copies.touched_timed),
            "{:?}",
            many.touched_timed
        );
        // 6 × 12 prompt tokens in steps of at most 20 tokens: 4 prefill steps
        assert_eq!(many.prefill_steps, 4);
        assert!(many.ttft_first_s > 0.0 && many.ttft_first_s <= many.prefill_s);
        assert_eq!(many.step_ctx[0], vec![13; 6]);
    }

    #[test]
    fn host_routing_hides_the_local_bank() {
        let (model, experts) = tiny();
        let probe = RoutingProbe::new(experts, model.cfg.n_routed_experts);
        let l = model.cfg.moe_layers()[0];
        use dsv2_core::model::ExpertExecutor;
        assert!(probe.local_bank(l).is_some());
        probe.set_host_routing(true);
        assert!(probe.local_bank(l).is_none());
        probe.set_host_routing(false);
        assert!(probe.local_bank(l).is_some());
    }
}
