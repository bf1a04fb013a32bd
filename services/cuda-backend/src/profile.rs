//! `DSV2_PROFILE=1`: wall time per backend op with the stream synchronised around each op, printed
//! as a table when the backend is dropped. It slows every op down (no overlap between the host's
//! launches and the GPU's work), but shows where a decode step's time goes on a machine where no
//! profiler is installed.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use dsv2_kernels::Gpu;

#[derive(Default)]
pub(crate) struct Profile {
    /// Every call's time per op: the median keeps the first calls of a shape (cuBLAS picking
    /// and loading kernels, milliseconds each) from hiding the steady-state cost.
    ops: Mutex<BTreeMap<&'static str, Vec<Duration>>>,
}

impl Profile {
    /// Some(profile) when `DSV2_PROFILE` is set to anything but "" or "0".
    pub(crate) fn from_env() -> Option<Profile> {
        match std::env::var("DSV2_PROFILE") {
            Ok(v) if !v.is_empty() && v != "0" => Some(Profile::default()),
            _ => None,
        }
    }

    fn record(&self, op: &'static str, dt: Duration) {
        if let Ok(mut m) = self.ops.lock() {
            m.entry(op).or_default().push(dt);
        }
    }

    /// The table, largest total first: calls, total ms, mean and median µs per call, share of
    /// the profiled time (ops named `a.b` are parts of op `a` and counted in it too).
    pub(crate) fn report(&self) -> String {
        let Ok(m) = self.ops.lock() else {
            return String::new();
        };
        let total_of = |v: &Vec<Duration>| v.iter().sum::<Duration>();
        let all: Duration = m
            .iter()
            .filter(|(k, _)| !k.contains('.'))
            .map(|(_, v)| total_of(v))
            .sum();
        let mut rows: Vec<_> = m.iter().collect();
        rows.sort_by_key(|r| std::cmp::Reverse(total_of(r.1)));
        let mut s = format!(
            "{:<22} {:>7} {:>10} {:>10} {:>10} {:>7}\n",
            "op", "calls", "total ms", "mean us", "median us", "share"
        );
        for (op, v) in rows {
            let mut sorted = v.clone();
            sorted.sort();
            let total = total_of(v);
            let n = v.len().max(1) as f64;
            let median = sorted.get(sorted.len() / 2).copied().unwrap_or_default();
            s += &format!(
                "{:<22} {:>7} {:>10.2} {:>10.1} {:>10.1} {:>6.1}%\n",
                op,
                v.len(),
                total.as_secs_f64() * 1e3,
                total.as_secs_f64() * 1e6 / n,
                median.as_secs_f64() * 1e6,
                100.0 * total.as_secs_f64() / all.as_secs_f64().max(1e-12)
            );
        }
        s
    }
}

/// Times one op: synchronises the stream when made and when dropped.
pub(crate) struct OpTimer<'a> {
    profile: &'a Profile,
    gpu: &'a Gpu,
    op: &'static str,
    t0: Instant,
}

impl<'a> OpTimer<'a> {
    pub(crate) fn start(profile: &'a Profile, gpu: &'a Gpu, op: &'static str) -> Self {
        // an error here resurfaces at the op's own launch or copy, with its context
        let _ = gpu.stream.synchronize();
        OpTimer {
            profile,
            gpu,
            op,
            t0: Instant::now(),
        }
    }
}

impl Drop for OpTimer<'_> {
    fn drop(&mut self) {
        let _ = self.gpu.stream.synchronize();
        self.profile.record(self.op, self.t0.elapsed());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_sorts_by_total_time_with_mean_and_median() {
        let p = Profile::default();
        p.record("attention", Duration::from_micros(300));
        p.record("experts", Duration::from_micros(500));
        p.record("attention", Duration::from_micros(100));
        p.record("attention", Duration::from_micros(5000)); // a first call: the median ignores it
        p.record("attention.decode", Duration::from_micros(50));
        let r = p.report();
        let lines: Vec<&str> = r.lines().collect();
        assert!(lines[1].starts_with("attention "), "{r}");
        assert!(lines[2].starts_with("experts"), "{r}");
        // attention: 3 calls, 5.40 ms, mean 1800, median 300, 91.5% of 5.9 ms (parts excluded)
        for want in [" 3 ", "5.40", "1800.0", "300.0", "91.5%"] {
            assert!(lines[1].contains(want), "{want} in {r}");
        }
        assert!(lines[3].starts_with("attention.decode"), "{r}");
    }
}
