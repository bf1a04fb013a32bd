//! Watches the shards of an NCCL plane over their gRPC health service. A shard process that dies
//! mid-layer raises no NCCL error on NVLink (its receive just never comes), so without this the
//! router would notice only at the layer deadline; with it, within about two periods.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::runtime::Handle;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Consecutive failed checks before a shard counts as gone (one slow answer is not a death).
const STRIKES: u32 = 2;

/// The watchdog's verdict, shared with the plane thread.
#[derive(Clone)]
pub struct ShardWatch {
    /// Set while some shard is unreachable or not serving; cleared when all answer again.
    pub down: Arc<AtomicBool>,
    /// Which shard and why, while `down` is set.
    reason: Arc<Mutex<Option<String>>>,
    stop: Arc<AtomicBool>,
}

impl ShardWatch {
    /// Checks every endpoint each `period` on `rt` until [`ShardWatch::stop`].
    pub fn spawn(rt: &Handle, endpoints: Vec<String>, period: Duration) -> ShardWatch {
        let w = ShardWatch {
            down: Arc::new(AtomicBool::new(false)),
            reason: Arc::new(Mutex::new(None)),
            stop: Arc::new(AtomicBool::new(false)),
        };
        let me = w.clone();
        rt.spawn(async move {
            let mut strikes = vec![0u32; endpoints.len()];
            while !me.stop.load(Ordering::Relaxed) {
                let mut worst: Option<String> = None;
                for (i, ep) in endpoints.iter().enumerate() {
                    match check(ep, period.max(Duration::from_millis(500))).await {
                        Ok(()) => strikes[i] = 0,
                        Err(why) => {
                            strikes[i] += 1;
                            if strikes[i] >= STRIKES && worst.is_none() {
                                worst = Some(format!("shard {ep} (rank {}): {why}", i + 1));
                            }
                        }
                    }
                }
                let was_down = me.down.load(Ordering::Relaxed);
                if let Ok(mut r) = me.reason.lock() {
                    match (&worst, was_down) {
                        (Some(w), false) => tracing::error!(reason = %w, "an NCCL shard is gone"),
                        (None, true) => tracing::info!("every NCCL shard answers again"),
                        _ => {}
                    }
                    *r = worst.clone();
                }
                me.down.store(worst.is_some(), Ordering::SeqCst);
                tokio::time::sleep(period).await;
            }
        });
        w
    }

    /// Which shard is gone and why (None while all answer).
    pub fn reason(&self) -> Option<String> {
        self.reason.lock().ok().and_then(|r| r.clone())
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

async fn check(endpoint: &str, timeout: Duration) -> Result<(), String> {
    // TLS for https:// shards, as the router dials them (health needs no token).
    let channel = dsv2_security::client::shard_dialer()
        .endpoint(endpoint)
        .map_err(|e| e.to_string())?
        .connect_timeout(timeout)
        .timeout(timeout)
        .connect()
        .await
        .map_err(|e| format!("unreachable: {e}"))?;
    let resp = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map_err(|e| format!("health check failed: {}", e.message()))?
        .into_inner();
    if resp.status == ServingStatus::Serving as i32 {
        Ok(())
    } else {
        Err(format!("health status {}", resp.status))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_killed_shard_is_reported_down_and_a_live_one_is_not() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let dir = dsv2_e2e::fixture("v2");
        let mut shard = dsv2_e2e::start_expert("watched", &dir, &[0, 1, 2, 3], "127.0.0.1:0");
        let live = dsv2_e2e::start_expert("alive", &dir, &[4, 5], "127.0.0.1:0");
        let w = ShardWatch::spawn(
            rt.handle(),
            vec![live.url(), shard.url()],
            Duration::from_millis(200),
        );
        std::thread::sleep(Duration::from_millis(1200));
        assert!(!w.down.load(Ordering::SeqCst), "{:?}", w.reason());
        let t0 = std::time::Instant::now();
        shard.kill();
        while !w.down.load(Ordering::SeqCst) {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "a dead shard was not noticed"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let reason = w.reason().expect("a reason");
        assert!(
            reason.contains(&shard.url()) && reason.contains("rank 2"),
            "{reason}"
        );
        w.stop();
    }
}
