//! L2 prefetch of the weights a decode step reads next (`DSV2_L2_PREFETCH`).
//!
//! At batch 1 a step is ~20 small kernels a layer, and each starts streaming its weights only
//! once it runs: HBM idles in the gaps and during the latency-bound kernels (norms, RoPE, the
//! gate, attention over a short context). The model offers the weights it will read next at three
//! points of each layer ([`PrefetchPoint`]); at the points the mode names, a side stream forked
//! from the step issues L2 prefetches of them, so they arrive while the kernels ahead run. The
//! fork stays open until the next offer or the end of a graph recording ([`L2Prefetch::join`]).
//!
//! Modes: `use` (each layer's attention weights at its start, its FFN weights after attention),
//! `ahead` (the next layer's attention weights while this layer's routed experts run, the FFN
//! weights after attention), `0`/`off`. A weight that would take the offer past the budget (a
//! share of L2, `DSV2_L2_PREFETCH_MB`) is left to be read as before: DeepSeek-V2's 75-168 MB
//! projections cannot sit in L2 anyway.

use std::sync::Mutex;

use dsv2_core::backend::PrefetchPoint;
use dsv2_core::error::Result;
use dsv2_kernels::Gpu;
use dsv2_kernels::ops::prefetch;

use crate::{CudaWeight, Kx, err};

/// Environment switch and its values.
pub(crate) const ENV: &str = "DSV2_L2_PREFETCH";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Off,
    /// Attention weights at the layer's start, FFN weights after its attention.
    AtUse,
    /// FFN weights after attention, the next layer's attention weights beside the routed experts.
    Ahead,
}

impl Mode {
    fn parse(v: &str) -> std::result::Result<Self, String> {
        match v {
            "0" | "off" => Ok(Mode::Off),
            "use" | "1" => Ok(Mode::AtUse),
            "ahead" | "2" => Ok(Mode::Ahead),
            other => Err(format!("{ENV}={other}: expected use, ahead or off (0)")),
        }
    }

    fn acts_at(self, at: PrefetchPoint, last: Option<PrefetchPoint>) -> bool {
        match (self, at) {
            (Mode::Off, _) => false,
            (Mode::AtUse, PrefetchPoint::AfterRouted) => false,
            (Mode::AtUse, _) => true,
            // a layer whose attention was not offered ahead (the first; one after a dense FFN)
            (Mode::Ahead, PrefetchPoint::LayerStart) => last != Some(PrefetchPoint::AfterRouted),
            (Mode::Ahead, _) => true,
        }
    }
}

#[derive(Default)]
struct State {
    /// A fork from the main stream is open (joined at the next offer or by `join`).
    pending: bool,
    last: Option<PrefetchPoint>,
}

pub(crate) struct L2Prefetch {
    mode: Mode,
    /// Bytes one offer may prefetch.
    budget: usize,
    state: Mutex<State>,
}

impl L2Prefetch {
    /// From `DSV2_L2_PREFETCH` (default `off`) and `DSV2_L2_PREFETCH_MB` (default 60 % of L2).
    pub(crate) fn from_env(l2_bytes: usize) -> Result<Self> {
        let mode = match std::env::var(ENV) {
            Ok(v) => Mode::parse(&v).map_err(err)?,
            Err(_) => Mode::Off,
        };
        let budget = match std::env::var("DSV2_L2_PREFETCH_MB") {
            Ok(v) => {
                v.parse::<usize>().map_err(|_| {
                    err(format!("DSV2_L2_PREFETCH_MB={v}: expected whole megabytes"))
                })? << 20
            }
            Err(_) => l2_bytes * 6 / 10,
        };
        Ok(Self {
            mode,
            budget,
            state: Mutex::new(State::default()),
        })
    }

    /// Acts on an offer at `at` (see the module docs). The caller holds the execution lock.
    pub(crate) fn offer(
        &self,
        gpu: &Gpu,
        at: PrefetchPoint,
        weights: &[&CudaWeight],
    ) -> Result<()> {
        if self.mode == Mode::Off {
            return Ok(());
        }
        let mut st = self
            .state
            .lock()
            .map_err(|_| err("prefetch state lock poisoned"))?;
        let act = self.mode.acts_at(at, st.last);
        st.last = Some(at);
        if !act {
            return Ok(());
        }
        let ranges = pick(
            weights
                .iter()
                .map(|w| (w.t.ptr(), w.t.len() * std::mem::size_of::<half::bf16>())),
            self.budget,
        );
        if ranges.is_empty() {
            return Ok(());
        }
        if st.pending {
            prefetch::join(gpu).kx()?;
        }
        // the FFN's shared experts must outlast the routed experts' weights streaming through L2,
        // and the next layer's attention weights the rest of this layer
        prefetch::l2_prefetch(gpu, &ranges, at != PrefetchPoint::LayerStart).kx()?;
        st.pending = true;
        Ok(())
    }

    /// Closes an open fork (before a graph recording begins or ends). The caller holds the
    /// execution lock.
    pub(crate) fn join(&self, gpu: &Gpu) -> Result<()> {
        let mut st = self
            .state
            .lock()
            .map_err(|_| err("prefetch state lock poisoned"))?;
        if std::mem::take(&mut st.pending) {
            prefetch::join(gpu).kx()?;
        }
        Ok(())
    }
}

/// The ranges of an offer: weights in order while they fit the budget (a weight that does not
/// fit is skipped, later smaller ones may still fit), at most `prefetch::MAX_RANGES`.
fn pick(weights: impl Iterator<Item = (u64, usize)>, budget: usize) -> Vec<(u64, usize)> {
    let mut out = Vec::new();
    let mut used = 0usize;
    for (ptr, bytes) in weights {
        if out.len() == prefetch::MAX_RANGES {
            break;
        }
        if bytes == 0 || used + bytes > budget {
            continue;
        }
        used += bytes;
        out.push((ptr, bytes));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_refuse_unknown_values() {
        assert_eq!(Mode::parse("off"), Ok(Mode::Off));
        assert_eq!(Mode::parse("0"), Ok(Mode::Off));
        assert_eq!(Mode::parse("use"), Ok(Mode::AtUse));
        assert_eq!(Mode::parse("ahead"), Ok(Mode::Ahead));
        assert!(
            Mode::parse("yes")
                .unwrap_err()
                .contains("expected use, ahead or off")
        );
    }

    #[test]
    fn ahead_skips_a_layer_start_already_offered_beside_the_routed_experts() {
        use PrefetchPoint::*;
        assert!(Mode::Ahead.acts_at(LayerStart, None));
        assert!(!Mode::Ahead.acts_at(LayerStart, Some(AfterRouted)));
        // after a dense FFN nothing was offered ahead
        assert!(Mode::Ahead.acts_at(LayerStart, Some(AfterAttention)));
        assert!(Mode::AtUse.acts_at(LayerStart, Some(AfterRouted)));
        assert!(!Mode::AtUse.acts_at(AfterRouted, None));
        assert!(!Mode::Off.acts_at(AfterAttention, None));
    }

    #[test]
    fn pick_keeps_order_and_skips_what_does_not_fit() {
        let mb = 1usize << 20;
        let w = [
            (0x1000, 12 * mb),
            (0x2000, 75 * mb),
            (0x3000, 6 * mb),
            (0x4000, 0),
        ];
        assert_eq!(
            pick(w.into_iter(), 20 * mb),
            vec![(0x1000, 12 * mb), (0x3000, 6 * mb)]
        );
        let many = (0..12).map(|i| (0x1000 * (i + 1), 16));
        assert_eq!(pick(many, mb).len(), prefetch::MAX_RANGES);
    }
}
