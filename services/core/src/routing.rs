//! MoE gating: softmax scores over routed experts, greedy or group-limited greedy top-k, then
//! DeepSeek's weight rule (renormalise when `norm_topk_prob`, else × `routed_scaling_factor`).

use crate::config::{ModelConfig, TopkMethod};

#[derive(Debug, Clone, PartialEq)]
pub struct RoutingParams {
    pub n_experts: usize,
    pub top_k: usize,
    pub method: TopkMethod,
    pub n_group: usize,
    pub topk_group: usize,
    pub routed_scaling_factor: f32,
    pub norm_topk_prob: bool,
}

impl RoutingParams {
    pub fn from_config(cfg: &ModelConfig) -> Self {
        RoutingParams {
            n_experts: cfg.n_routed_experts,
            top_k: cfg.num_experts_per_tok,
            method: cfg.topk_method,
            n_group: cfg.n_group,
            topk_group: cfg.topk_group,
            routed_scaling_factor: cfg.routed_scaling_factor,
            norm_topk_prob: cfg.norm_topk_prob,
        }
    }
}

/// Padding in an expert slot: no expert (a shard's rows use fewer slots than top-k).
pub const NO_EXPERT: u32 = u32::MAX;

/// The chosen experts of each row: `ids[r*top_k..][..top_k]` with matching `weights`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Routing {
    pub top_k: usize,
    pub ids: Vec<u32>,
    pub weights: Vec<f32>,
}

impl Routing {
    pub fn rows(&self) -> usize {
        self.ids.len().checked_div(self.top_k).unwrap_or(0)
    }
    pub fn row(&self, r: usize) -> (&[u32], &[f32]) {
        let k = self.top_k;
        (
            &self.ids[r * k..(r + 1) * k],
            &self.weights[r * k..(r + 1) * k],
        )
    }
}

/// Routes every row of `logits` ([rows, n_experts], f32).
pub fn route(logits: &[f32], p: &RoutingParams) -> Routing {
    let e = p.n_experts;
    let rows = logits.len() / e.max(1);
    let mut out = Routing {
        top_k: p.top_k,
        ids: Vec::with_capacity(rows * p.top_k),
        weights: Vec::with_capacity(rows * p.top_k),
    };
    let mut scores = vec![0f32; e];
    let mut order: Vec<usize> = Vec::with_capacity(e);
    for r in 0..rows {
        softmax_into(&logits[r * e..(r + 1) * e], &mut scores);
        if p.method == TopkMethod::GroupLimitedGreedy && p.n_group > 1 {
            let per = e / p.n_group;
            let group_best: Vec<f32> = (0..p.n_group)
                .map(|g| {
                    scores[g * per..(g + 1) * per]
                        .iter()
                        .copied()
                        .fold(f32::NEG_INFINITY, f32::max)
                })
                .collect();
            let mut groups: Vec<usize> = (0..p.n_group).collect();
            groups.sort_by(|&a, &b| group_best[b].total_cmp(&group_best[a]).then(a.cmp(&b)));
            let mut keep = vec![false; p.n_group];
            for &g in &groups[..p.topk_group] {
                keep[g] = true;
            }
            // As in HF: experts of dropped groups get score 0 (they still count for top-k ties).
            for (i, s) in scores.iter_mut().enumerate() {
                if !keep[i / per] {
                    *s = 0.0;
                }
            }
        }
        order.clear();
        order.extend(0..e);
        order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
        let chosen = &order[..p.top_k];
        let sum: f32 = chosen.iter().map(|&i| scores[i]).sum();
        for &i in chosen {
            let w = if p.top_k > 1 && p.norm_topk_prob {
                scores[i] / (sum + 1e-20)
            } else {
                scores[i] * p.routed_scaling_factor
            };
            out.ids.push(i as u32);
            out.weights.push(w);
        }
    }
    out
}

pub fn softmax_into(x: &[f32], out: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for (o, &v) in out.iter_mut().zip(x) {
        *o = (v - max).exp();
        sum += *o;
    }
    for o in out.iter_mut() {
        *o /= sum;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(method: TopkMethod, n_group: usize, topk_group: usize, norm: bool) -> RoutingParams {
        RoutingParams {
            n_experts: 8,
            top_k: 2,
            method,
            n_group,
            topk_group,
            routed_scaling_factor: 16.0,
            norm_topk_prob: norm,
        }
    }

    #[test]
    fn greedy_picks_best_and_scales() {
        let logits = [0.0, 3.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0];
        let r = route(&logits, &params(TopkMethod::Greedy, 1, 1, false));
        assert_eq!(r.ids, vec![1, 4]);
        let mut s = [0f32; 8];
        softmax_into(&logits, &mut s);
        assert!((r.weights[0] - s[1] * 16.0).abs() < 1e-6);
    }

    #[test]
    fn group_limited_skips_groups_with_low_max() {
        // Groups of 2: {0,1} {2,3} {4,5} {6,7}. Best two groups by max score are {0,1} (max 3.0)
        // and {6,7} (max 2.5); expert 2 (2.9) is in a dropped group's... no: {2,3} max is 2.9 > 2.5.
        let logits = [3.0, 2.8, 2.9, -5.0, 0.0, 0.0, 2.5, 0.0];
        let r = route(
            &logits,
            &params(TopkMethod::GroupLimitedGreedy, 4, 2, false),
        );
        assert_eq!(r.ids, vec![0, 2]);
        // Make group {2,3} lose: now groups {0,1} and {6,7} win and expert 1 beats expert 6.
        let logits = [3.0, 2.8, 2.4, -5.0, 0.0, 0.0, 2.5, 0.0];
        let r = route(
            &logits,
            &params(TopkMethod::GroupLimitedGreedy, 4, 2, false),
        );
        assert_eq!(r.ids, vec![0, 1]);
        let logits = [3.0, -9.0, 2.4, -5.0, 0.0, 0.0, 2.5, 0.0];
        let r = route(
            &logits,
            &params(TopkMethod::GroupLimitedGreedy, 4, 2, false),
        );
        assert_eq!(r.ids, vec![0, 6]);
    }

    #[test]
    fn norm_topk_prob_renormalises_without_scaling() {
        let logits = [1.0, 2.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0];
        let r = route(&logits, &params(TopkMethod::Greedy, 1, 1, true));
        assert!((r.weights.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }
}
