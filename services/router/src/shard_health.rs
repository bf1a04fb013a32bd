//! Which expert shards the router counts as live, and the background watch that takes a failed
//! shard back: a shard marked down gets no rows until grpc.health.v1 says it serves again and
//! its Info still matches what the placement expects of it. Also the shard counters the
//! metrics endpoint shows (`dsv2_router_shard_*`).

use std::fmt::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::runtime::Handle;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// How often a down shard is probed. Short: a restarted shard should take rows again within a
/// fraction of a second of serving, and a probe is one small RPC.
pub const PROBE_PERIOD: Duration = Duration::from_millis(250);

/// What a shard must still be to be taken back (a restart may bring a different model or
/// different experts up on the same address).
#[derive(Debug, Clone)]
pub struct Expected {
    pub config_fingerprint: String,
    pub experts: Vec<usize>,
}

struct ShardState {
    endpoint: String,
    up: AtomicBool,
    rows_sent: AtomicU64,
}

/// Per-shard liveness and counters, shared by the expert executor, the watchers and /metrics.
pub struct ShardStats {
    shards: Vec<ShardState>,
    failovers: AtomicU64,
}

impl ShardStats {
    /// Every shard starts up (the router checked each with Info before serving).
    pub fn new(endpoints: &[String]) -> Self {
        ShardStats {
            shards: endpoints
                .iter()
                .map(|e| ShardState {
                    endpoint: e.clone(),
                    up: AtomicBool::new(true),
                    rows_sent: AtomicU64::new(0),
                })
                .collect(),
            failovers: AtomicU64::new(0),
        }
    }

    pub fn len(&self) -> usize {
        self.shards.len()
    }

    pub fn is_empty(&self) -> bool {
        self.shards.is_empty()
    }

    pub fn endpoint(&self, s: usize) -> &str {
        self.shards.get(s).map_or("", |x| x.endpoint.as_str())
    }

    pub fn is_up(&self, s: usize) -> bool {
        self.shards
            .get(s)
            .is_some_and(|x| x.up.load(Ordering::SeqCst))
    }

    /// Marks shard `s` down; true when this call did (so exactly one caller starts its watch).
    pub fn mark_down(&self, s: usize) -> bool {
        self.shards.get(s).is_some_and(|x| {
            x.up.compare_exchange(true, false, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        })
    }

    fn mark_up(&self, s: usize) {
        if let Some(x) = self.shards.get(s) {
            x.up.store(true, Ordering::SeqCst);
        }
    }

    pub fn add_rows(&self, s: usize, rows: usize) {
        if let Some(x) = self.shards.get(s) {
            x.rows_sent.fetch_add(rows as u64, Ordering::Relaxed);
        }
    }

    pub fn rows_sent(&self, s: usize) -> u64 {
        self.shards
            .get(s)
            .map_or(0, |x| x.rows_sent.load(Ordering::Relaxed))
    }

    /// One layer's work for a replica set sent again to another replica after a failure.
    pub fn add_failover(&self) {
        self.failovers.fetch_add(1, Ordering::Relaxed);
    }

    pub fn failovers(&self) -> u64 {
        self.failovers.load(Ordering::Relaxed)
    }

    /// The Prometheus text exposition of these counters.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let label = |x: &ShardState| escape_label(&x.endpoint);
        let _ = writeln!(
            s,
            "# HELP dsv2_router_shard_up Whether the router sends rows to this expert shard (1) or counts it down and probes it (0).\n# TYPE dsv2_router_shard_up gauge"
        );
        for x in &self.shards {
            let _ = writeln!(
                s,
                "dsv2_router_shard_up{{shard=\"{}\"}} {}",
                label(x),
                u8::from(x.up.load(Ordering::Relaxed))
            );
        }
        let _ = writeln!(
            s,
            "# HELP dsv2_router_shard_rows_sent_total Hidden rows sent to this expert shard (a row counts once per replica set it needs there).\n# TYPE dsv2_router_shard_rows_sent_total counter"
        );
        for x in &self.shards {
            let _ = writeln!(
                s,
                "dsv2_router_shard_rows_sent_total{{shard=\"{}\"}} {}",
                label(x),
                x.rows_sent.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            s,
            "# HELP dsv2_router_shard_failovers_total A layer's rows for a replica set sent again to another replica after a shard failed.\n# TYPE dsv2_router_shard_failovers_total counter\ndsv2_router_shard_failovers_total {}",
            self.failovers()
        );
        s
    }
}

/// Label values escape backslash, double quote and newline (text format 0.0.4).
fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Probes shard `s` every [`PROBE_PERIOD`] until it serves and matches `expected`, then marks
/// it up. Ends early if the executor owning `stats` is gone.
pub fn spawn_watch(rt: &Handle, stats: &Arc<ShardStats>, s: usize, expected: Expected) {
    let weak: Weak<ShardStats> = Arc::downgrade(stats);
    let endpoint = stats.endpoint(s).to_string();
    rt.spawn(async move {
        let mut last_reason = String::new();
        loop {
            tokio::time::sleep(PROBE_PERIOD).await;
            let Some(stats) = weak.upgrade() else { return };
            match probe(&endpoint, &expected).await {
                Ok(()) => {
                    tracing::info!(shard = %endpoint, "expert shard serves again: taking it back");
                    stats.mark_up(s);
                    return;
                }
                Err(reason) => {
                    if reason != last_reason {
                        tracing::info!(shard = %endpoint, %reason, "expert shard still down");
                        last_reason = reason;
                    }
                }
            }
        }
    });
}

/// Health SERVING, then Info: same model, still hosting every expert the placement puts there.
async fn probe(endpoint: &str, expected: &Expected) -> Result<(), String> {
    let timeout = Duration::from_secs(1);
    let channel = crate::remote_experts::shard_endpoint(endpoint)
        .map_err(|e| e.to_string())?
        .connect_timeout(timeout)
        .timeout(timeout)
        .connect()
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    let status = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map_err(|e| format!("health check failed: {}", e.message()))?
        .into_inner()
        .status;
    if status != ServingStatus::Serving as i32 {
        return Err(format!(
            "health says {}",
            ServingStatus::try_from(status)
                .map(|s| s.as_str_name())
                .unwrap_or("an unknown status")
        ));
    }
    let info = crate::remote_experts::shard_info(endpoint, timeout)
        .await
        .map_err(|e| e.to_string())?;
    if info.config_fingerprint != expected.config_fingerprint {
        return Err(format!(
            "serves a different model (config fingerprint {})",
            info.config_fingerprint
        ));
    }
    let hosted: std::collections::HashSet<u32> = info.expert_ids.iter().copied().collect();
    if let Some(e) = expected
        .experts
        .iter()
        .find(|&&e| !hosted.contains(&(e as u32)))
    {
        return Err(format!("no longer hosts expert {e}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn down_once_then_up_and_rendered() {
        let st = ShardStats::new(&["http://a:1".into(), "http://b\"2".into()]);
        assert!(st.mark_down(1));
        assert!(
            !st.mark_down(1),
            "the second caller must not start another watch"
        );
        st.add_rows(0, 5);
        st.add_rows(0, 2);
        st.add_failover();
        let text = st.render();
        assert!(
            text.contains("dsv2_router_shard_up{shard=\"http://a:1\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("dsv2_router_shard_up{shard=\"http://b\\\"2\"} 0"),
            "{text}"
        );
        assert!(text.contains("dsv2_router_shard_rows_sent_total{shard=\"http://a:1\"} 7"));
        assert!(text.contains("dsv2_router_shard_failovers_total 1"));
        st.mark_up(1);
        assert!(st.is_up(1));
    }
}
