//! Counts the distinct experts each MoE layer's routing touches, by wrapping the in-process
//! experts: every routing that reaches `dispatch` is counted (a few hundred ids per layer: nothing
//! next to a step). A backend that routes and runs local experts in one call (the CUDA small-batch
//! path keeps the ids on the device) bypasses `dispatch`; for those steps the bench runs probe
//! steps with `host_routing` on, which hides the local bank so the model routes on the host.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use dsv2_core::Result;
use dsv2_core::backend::{Backend, ExpertBank};
use dsv2_core::model::{ExpertExecutor, LocalExperts, PendingExperts};
use dsv2_core::routing::{NO_EXPERT, Routing};

pub struct RoutingProbe<B: Backend> {
    inner: std::sync::Arc<LocalExperts<B>>,
    n_experts: usize,
    host_routing: AtomicBool,
    /// (layer, distinct experts) of each routing seen since the last `take`.
    seen: Mutex<Vec<(usize, usize)>>,
}

/// Distinct expert ids in `routing` (padding slots excluded).
pub fn distinct_experts(routing: &Routing, n_experts: usize) -> usize {
    let mut hit = vec![false; n_experts];
    let mut n = 0;
    for &id in &routing.ids {
        if id != NO_EXPERT
            && let Some(h) = hit.get_mut(id as usize)
            && !*h
        {
            *h = true;
            n += 1;
        }
    }
    n
}

impl<B: Backend> RoutingProbe<B> {
    pub fn new(inner: std::sync::Arc<LocalExperts<B>>, n_experts: usize) -> Self {
        RoutingProbe {
            inner,
            n_experts,
            host_routing: AtomicBool::new(false),
            seen: Mutex::new(Vec::new()),
        }
    }

    /// On: the model routes every MoE layer on the host (so each routing is counted), whatever
    /// the backend could do in one call.
    pub fn set_host_routing(&self, on: bool) {
        self.host_routing.store(on, Ordering::Relaxed);
    }

    /// The (layer, distinct experts) pairs seen since the last call.
    pub fn take(&self) -> Vec<(usize, usize)> {
        self.seen
            .lock()
            .map(|mut v| std::mem::take(&mut *v))
            .unwrap_or_default()
    }
}

impl<B: Backend> ExpertExecutor<B> for RoutingProbe<B> {
    fn dispatch(&self, layer: usize, x: &B::Act, routing: &Routing) -> Result<PendingExperts<B>> {
        let n = distinct_experts(routing, self.n_experts);
        if let Ok(mut v) = self.seen.lock() {
            v.push((layer, n));
        }
        self.inner.dispatch(layer, x, routing)
    }

    fn local_bank(&self, layer: usize) -> Option<&ExpertBank<B::Weight>> {
        if self.host_routing.load(Ordering::Relaxed) {
            None
        } else {
            self.inner.local_bank(layer)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_counts_each_expert_once_and_skips_padding() {
        let r = Routing {
            top_k: 3,
            ids: vec![4, 1, 7, 1, 4, NO_EXPERT, 9, 9, 9],
            weights: vec![0.0; 9],
        };
        assert_eq!(distinct_experts(&r, 16), 4);
        assert_eq!(distinct_experts(&Routing::default(), 16), 0);
    }
}
