//! Routed experts on expert shards: each MoE layer sends every shard only the rows that chose
//! one of its experts (with their global expert ids and gate weights) over one long-lived
//! bidirectional stream per shard, and sums the weighted partials that come back. A shard that
//! drops its stream fails the requests of that step with UNAVAILABLE; the next step reconnects,
//! so a restarted shard is picked up without restarting the router.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dsv2_core::backend::Backend;
use dsv2_core::model::{ExpertExecutor, PendingExperts};
use dsv2_core::placement::{Placement, split_rows};
use dsv2_core::routing::Routing;
use dsv2_core::{CoreError, ModelConfig};
use dsv2_proto::expert::v1::expert_shard_client::ExpertShardClient;
use dsv2_proto::expert::v1::{Dtype, ForwardRequest, ForwardResponse, InfoRequest, InfoResponse};
use dsv2_proto::tensor::{decode_rows_to_f32, encode_f32, encode_f32_as_bf16};
use tokio::runtime::Handle;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;

type Waiter = oneshot::Sender<Result<ForwardResponse, String>>;

/// Requests awaiting an answer on one stream. `closed` is set, under the same lock, when the
/// stream's reader stops: a waiter registered after that would never be answered, so
/// registration checks it instead of waiting out the shard timeout.
#[derive(Default)]
struct WaitState {
    pending: HashMap<u64, Waiter>,
    closed: Option<String>,
}

type Waiters = Arc<Mutex<WaitState>>;

/// How hidden rows travel: bf16 halves the bytes (GPU activations are bf16 anyway); f32 keeps
/// the CPU reference bit-compatible with the in-process path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireDtype {
    Bf16,
    F32,
}

struct Conn {
    tx: mpsc::Sender<ForwardRequest>,
    waiters: Waiters,
}

struct Shard {
    endpoint: String,
    conn: Mutex<Option<Arc<Conn>>>,
}

pub struct RemoteExperts<B: Backend> {
    backend: Arc<B>,
    rt: Handle,
    shards: Vec<Shard>,
    owner: Vec<usize>,
    hidden: usize,
    wire: WireDtype,
    next_id: AtomicU64,
    timeout: Duration,
}

/// Largest Forward message either way (the shard's server allows the same).
const MAX_MESSAGE_BYTES: usize = 1 << 30;

fn unavailable(endpoint: &str, msg: impl std::fmt::Display) -> CoreError {
    CoreError::Experts(format!("shard {endpoint}: {msg}"))
}

/// Asks a shard what it serves.
pub async fn shard_info(endpoint: &str, timeout: Duration) -> Result<InfoResponse, CoreError> {
    let channel = tonic::transport::Endpoint::from_shared(endpoint.to_string())
        .map_err(|e| CoreError::InvalidInput(format!("--shard {endpoint}: not a valid URL: {e}")))?
        .connect_timeout(timeout)
        .timeout(timeout)
        .connect()
        .await
        .map_err(|e| unavailable(endpoint, format!("cannot connect: {e}")))?;
    let mut client = ExpertShardClient::new(channel);
    Ok(client
        .info(InfoRequest {})
        .await
        .map_err(|e| unavailable(endpoint, format!("Info failed: {}", e.message())))?
        .into_inner())
}

/// Checks that the shards serve this model and together cover every expert of `placement`.
pub fn check_shards(
    cfg: &ModelConfig,
    placement: &Placement,
    endpoints: &[String],
    infos: &[InfoResponse],
) -> Result<(), String> {
    let fp = cfg.fingerprint();
    for (i, (ep, info)) in endpoints.iter().zip(infos).enumerate() {
        if info.config_fingerprint != fp {
            return Err(format!(
                "shard {ep} serves a different model (config fingerprint {} != router's {fp}); start it with the same --model-dir",
                info.config_fingerprint
            ));
        }
        let hosted: std::collections::HashSet<u32> = info.expert_ids.iter().copied().collect();
        let missing: Vec<usize> = placement.shards[i]
            .iter()
            .copied()
            .filter(|&e| !hosted.contains(&(e as u32)))
            .collect();
        if !missing.is_empty() {
            return Err(format!(
                "shard {ep} (shard {i} of the placement) should host experts {:?} but does not host {:?}; start it with --experts or --shard-index {i} --num-shards {}",
                compact(&placement.shards[i]),
                compact(&missing),
                endpoints.len()
            ));
        }
    }
    placement.check(cfg).map_err(|e| e.to_string())
}

fn compact(v: &[usize]) -> String {
    match (v.first(), v.last()) {
        (Some(a), Some(b)) if b - a + 1 == v.len() => format!("{a}-{b}"),
        _ => format!("{v:?}"),
    }
}

impl<B: Backend> RemoteExperts<B> {
    pub fn new(
        backend: Arc<B>,
        rt: Handle,
        cfg: &ModelConfig,
        placement: &Placement,
        endpoints: Vec<String>,
        wire: WireDtype,
        timeout: Duration,
    ) -> Self {
        RemoteExperts {
            backend,
            rt,
            owner: placement.owner_table(cfg.n_routed_experts),
            shards: endpoints
                .into_iter()
                .map(|endpoint| Shard {
                    endpoint,
                    conn: Mutex::new(None),
                })
                .collect(),
            hidden: cfg.hidden_size,
            wire,
            next_id: AtomicU64::new(1),
            timeout,
        }
    }

    fn connect(&self, shard: &Shard) -> Result<Arc<Conn>, CoreError> {
        let mut guard = shard
            .conn
            .lock()
            .map_err(|_| unavailable(&shard.endpoint, "connection state poisoned"))?;
        if let Some(c) = guard.as_ref()
            && !c.tx.is_closed()
            && c.waiters.lock().is_ok_and(|w| w.closed.is_none())
        {
            return Ok(c.clone());
        }
        let endpoint = shard.endpoint.clone();
        let timeout = self.timeout;
        let conn = self.rt.block_on(async move {
            let channel = tonic::transport::Endpoint::from_shared(endpoint.clone())
                .map_err(|e| unavailable(&endpoint, e))?
                .connect_timeout(timeout)
                .tcp_nodelay(true)
                .connect()
                .await
                .map_err(|e| unavailable(&endpoint, format!("cannot connect: {e}")))?;
            // tonic's default 4 MiB decode limit is below one layer's partials at DeepSeek-V2
            // sizes (256 rows x 5120 x f32 = 5.2 MB); the shard already allows 1 GiB.
            let mut client = ExpertShardClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES);
            let (tx, rx) = mpsc::channel::<ForwardRequest>(64);
            let mut inbound = client
                .forward(ReceiverStream::new(rx))
                .await
                .map_err(|e| {
                    unavailable(
                        &endpoint,
                        format!("Forward stream refused: {}", e.message()),
                    )
                })?
                .into_inner();
            let waiters: Waiters = Arc::new(Mutex::new(WaitState::default()));
            let w = waiters.clone();
            tokio::spawn(async move {
                let reason = loop {
                    match inbound.message().await {
                        Ok(Some(resp)) => {
                            let waiter = w
                                .lock()
                                .ok()
                                .and_then(|mut m| m.pending.remove(&resp.request_id));
                            if let Some(waiter) = waiter {
                                let _ = waiter.send(Ok(resp));
                            }
                        }
                        Ok(None) => break "stream closed by the shard".to_string(),
                        Err(e) => break format!("stream failed: {}", e.message()),
                    }
                };
                tracing::warn!(shard = %endpoint, %reason, "expert shard stream ended");
                if let Ok(mut m) = w.lock() {
                    m.closed = Some(reason.clone());
                    for (_, waiter) in m.pending.drain() {
                        let _ = waiter.send(Err(reason.clone()));
                    }
                }
            });
            Ok::<_, CoreError>(Arc::new(Conn { tx, waiters }))
        })?;
        tracing::info!(shard = %shard.endpoint, "connected to expert shard");
        *guard = Some(conn.clone());
        Ok(conn)
    }

    fn drop_conn(&self, s: usize) {
        if let Ok(mut g) = self.shards[s].conn.lock() {
            *g = None;
        }
    }
}

impl<B: Backend> ExpertExecutor<B> for RemoteExperts<B> {
    fn dispatch(
        &self,
        layer: usize,
        x: &B::Act,
        routing: &Routing,
    ) -> dsv2_core::Result<PendingExperts<B>> {
        let rows = routing.rows();
        let k = routing.top_k;
        let h = self.hidden;
        let host = self.backend.act_to_host(x)?;
        // Rows per shard, with that shard's slots (others padded).
        let per_shard = split_rows(routing, &self.owner, self.shards.len());
        let mut waits = Vec::new();
        for (s, part) in per_shard.into_iter().enumerate() {
            let (row_ids, ids, ws) = (part.rows, part.ids, part.weights);
            if row_ids.is_empty() {
                continue;
            }
            let mut rows_f32 = Vec::with_capacity(row_ids.len() * h);
            for &r in &row_ids {
                rows_f32.extend_from_slice(&host[r * h..(r + 1) * h]);
            }
            let (hidden, dtype) = match self.wire {
                WireDtype::Bf16 => (encode_f32_as_bf16(&rows_f32), Dtype::Bf16),
                WireDtype::F32 => (encode_f32(&rows_f32), Dtype::F32),
            };
            let request_id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let req = ForwardRequest {
                request_id,
                layer: layer as u32,
                num_rows: row_ids.len() as u32,
                hidden_size: h as u32,
                hidden,
                hidden_dtype: dtype as i32,
                experts_per_row: k as u32,
                expert_ids: ids,
                gate_weights: ws,
                partial_dtype: dtype as i32,
            };
            let conn = self.connect(&self.shards[s])?;
            let (otx, orx) = oneshot::channel();
            let registered = match conn.waiters.lock() {
                Ok(mut m) => match &m.closed {
                    Some(reason) => Err(reason.clone()),
                    None => {
                        m.pending.insert(request_id, otx);
                        Ok(())
                    }
                },
                Err(_) => Err("connection state poisoned".to_string()),
            };
            if let Err(reason) = registered {
                self.drop_conn(s);
                return Err(unavailable(&self.shards[s].endpoint, reason));
            }
            if conn.tx.blocking_send(req).is_err() {
                self.drop_conn(s);
                return Err(unavailable(&self.shards[s].endpoint, "stream closed"));
            }
            waits.push((s, row_ids, orx));
        }
        let backend = self.backend.clone();
        let rt = self.rt.clone();
        let timeout = self.timeout;
        let endpoints: Vec<String> = self.shards.iter().map(|s| s.endpoint.clone()).collect();
        Ok(PendingExperts::Later(Box::new(move || {
            let mut out = vec![0f32; rows * h];
            for (s, row_ids, orx) in waits {
                let ep = &endpoints[s];
                let resp = rt
                    .block_on(async move { tokio::time::timeout(timeout, orx).await })
                    .map_err(|_| unavailable(ep, format!("no answer within {timeout:?}")))?
                    .map_err(|_| unavailable(ep, "connection lost"))?
                    .map_err(|e| unavailable(ep, e))?;
                if let Some(err) = resp.error {
                    return Err(CoreError::Experts(format!("shard {ep}: {}", err.message)));
                }
                if resp.num_rows as usize != row_ids.len() || resp.hidden_size as usize != h {
                    return Err(unavailable(
                        ep,
                        format!(
                            "answered {}x{} for {}x{h}",
                            resp.num_rows,
                            resp.hidden_size,
                            row_ids.len()
                        ),
                    ));
                }
                let dtype = Dtype::try_from(resp.dtype).unwrap_or(Dtype::Unspecified);
                let partial = decode_rows_to_f32("partial", dtype, &resp.partial, row_ids.len(), h)
                    .map_err(|e| unavailable(ep, e))?;
                for (i, &r) in row_ids.iter().enumerate() {
                    for (o, v) in out[r * h..(r + 1) * h]
                        .iter_mut()
                        .zip(&partial[i * h..(i + 1) * h])
                    {
                        *o += v;
                    }
                }
            }
            backend.act_from_host(rows, h, &out)
        })))
    }
}
