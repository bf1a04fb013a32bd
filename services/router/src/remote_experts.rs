//! Routed experts on expert shards: each MoE layer sends the rows that chose experts of a replica
//! set (the experts hosted by the same shards; without replicas, one set per shard) to one live
//! owner of that set, over one long-lived bidirectional stream per shard, and sums the weighted
//! partials that come back in set order, so the result does not depend on which replica
//! answered. Load spreads over the replicas (each set goes to its least-loaded live owner).
//! A shard whose stream fails, drops or misses the per-layer deadline is marked down and the
//! layer's rows for its sets go to another replica within the same step; a background probe
//! takes it back once it serves again (shard_health.rs). A set with no live owner fails only
//! the rows that chose its experts (`ExpertRows::Only`), at once: the engine fails their
//! requests UNAVAILABLE and runs the step again for the others.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dsv2_core::backend::Backend;
use dsv2_core::model::{ExpertExecutor, PendingExperts};
use dsv2_core::placement::{Placement, ReplicaSet, ShardRows, split_rows};
use dsv2_core::routing::Routing;
use dsv2_core::{CoreError, ModelConfig};
use dsv2_proto::expert::v1::expert_shard_client::ExpertShardClient;
use dsv2_proto::expert::v1::{Dtype, ForwardRequest, ForwardResponse, InfoRequest, InfoResponse};
use dsv2_proto::tensor::{decode_rows_to_f32, encode_f32, encode_f32_as_bf16};
use tokio::runtime::Handle;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;

use crate::shard_health::{Expected, ShardStats, spawn_watch};

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
    /// What the shard must still serve to be taken back after a failure.
    expected: Expected,
}

/// Everything a dispatched layer needs after `dispatch` returns (its failovers happen while the
/// model waits for the partials).
struct Inner<B: Backend> {
    backend: Arc<B>,
    rt: Handle,
    shards: Vec<Shard>,
    sets: Vec<ReplicaSet>,
    /// Expert -> index into `sets` (usize::MAX: hosted nowhere).
    set_of: Vec<usize>,
    stats: Arc<ShardStats>,
    hidden: usize,
    wire: WireDtype,
    next_id: AtomicU64,
    /// Rotates which replica wins a tie, so equal loads alternate between steps.
    turn: AtomicUsize,
    timeout: Duration,
}

pub struct RemoteExperts<B: Backend> {
    inner: Arc<Inner<B>>,
}

/// Largest Forward message either way (the shard's server allows the same).
const MAX_MESSAGE_BYTES: usize = 1 << 30;

fn unavailable(endpoint: &str, msg: impl std::fmt::Display) -> CoreError {
    CoreError::experts(format!("shard {endpoint}: {msg}"))
}

/// The one place a shard URL becomes an endpoint (the data stream, Info and the health probe
/// all dial through it).
/// TLS for https:// URLs and the shard token come from the router's flags (dsv2_security).
pub fn shard_endpoint(endpoint: &str) -> Result<tonic::transport::Endpoint, CoreError> {
    dsv2_security::client::shard_dialer()
        .endpoint(endpoint)
        .map_err(|e| CoreError::InvalidInput(e.to_string()))
}

/// Asks a shard what it serves.
pub async fn shard_info(endpoint: &str, timeout: Duration) -> Result<InfoResponse, CoreError> {
    let channel = shard_endpoint(endpoint)?
        .connect_timeout(timeout)
        .timeout(timeout)
        .connect()
        .await
        .map_err(|e| unavailable(endpoint, format!("cannot connect: {e}")))?;
    let mut client = ExpertShardClient::with_interceptor(
        channel,
        dsv2_security::client::shard_dialer().bearer(),
    );
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

/// `a-b` for a run of consecutive ids, the list otherwise (a placement file may list any
/// order).
fn compact(v: &[usize]) -> String {
    let run = v.windows(2).all(|w| w[0].checked_add(1) == Some(w[1]));
    match (v, v.first(), v.last()) {
        ([a], _, _) => format!("{a}"),
        (_, Some(a), Some(b)) if run => format!("{a}-{b}"),
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
        let sets = placement.replica_sets(cfg.n_routed_experts);
        let mut set_of = vec![usize::MAX; cfg.n_routed_experts];
        for (i, set) in sets.iter().enumerate() {
            for &e in &set.experts {
                set_of[e] = i;
            }
        }
        let fingerprint = cfg.fingerprint();
        RemoteExperts {
            inner: Arc::new(Inner {
                backend,
                stats: Arc::new(ShardStats::new(&endpoints)),
                shards: endpoints
                    .into_iter()
                    .enumerate()
                    .map(|(s, endpoint)| Shard {
                        endpoint,
                        conn: Mutex::new(None),
                        expected: Expected {
                            config_fingerprint: fingerprint.clone(),
                            experts: placement.shards.get(s).cloned().unwrap_or_default(),
                        },
                    })
                    .collect(),
                rt,
                sets,
                set_of,
                hidden: cfg.hidden_size,
                wire,
                next_id: AtomicU64::new(1),
                turn: AtomicUsize::new(0),
                timeout,
            }),
        }
    }

    /// Liveness and counters of the shards, for /metrics.
    pub fn stats(&self) -> Arc<ShardStats> {
        self.inner.stats.clone()
    }
}

/// The rows of a layer whose replica sets no shard could serve, and why. Only those rows fail
/// (their requests need an expert with no live owner); the others got their whole result.
#[derive(Default)]
struct Lost {
    rows: Vec<usize>,
    first: Option<String>,
    more: usize,
}

impl Lost {
    fn add(&mut self, rows: &[usize], e: CoreError) {
        self.rows.extend_from_slice(rows);
        let msg = match e {
            CoreError::Experts { msg, .. } => msg,
            other => other.to_string(),
        };
        match self.first {
            None => self.first = Some(msg),
            Some(_) => self.more += 1,
        }
    }

    fn into_result(self) -> Result<(), CoreError> {
        let Some(msg) = self.first else {
            return Ok(());
        };
        let msg = match self.more {
            0 => msg,
            1 => format!("{msg}; 1 more expert set unreachable"),
            n => format!("{msg}; {n} more expert sets unreachable"),
        };
        Err(CoreError::experts_for_rows(self.rows, msg))
    }
}

/// One replica set's share of a layer, sent to one shard and awaited.
struct Sent {
    shard: usize,
    conn: Arc<Conn>,
    request_id: u64,
    rx: oneshot::Receiver<Result<ForwardResponse, String>>,
}

impl<B: Backend> Inner<B> {
    fn connect(&self, s: usize) -> Result<Arc<Conn>, CoreError> {
        let shard = &self.shards[s];
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
            let channel = shard_endpoint(&endpoint)?
                .connect_timeout(timeout)
                .tcp_nodelay(true)
                .connect()
                .await
                .map_err(|e| unavailable(&endpoint, format!("cannot connect: {e}")))?;
            // tonic's default 4 MiB decode limit is below one layer's partials at DeepSeek-V2
            // sizes (256 rows x 5120 x f32 = 5.2 MB); the shard already allows 1 GiB.
            let mut client = ExpertShardClient::with_interceptor(
                channel,
                dsv2_security::client::shard_dialer().bearer(),
            )
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

    /// Takes shard `s` out of service after a transport failure and, once, starts its probe.
    fn shard_failed(self: &Arc<Self>, s: usize, why: &CoreError) {
        if let Ok(mut g) = self.shards[s].conn.lock() {
            *g = None;
        }
        if self.stats.mark_down(s) {
            tracing::warn!(shard = %self.shards[s].endpoint, error = %why, "expert shard down: its rows go to other replicas until it serves again");
            spawn_watch(&self.rt, &self.stats, s, self.shards[s].expected.clone());
        }
    }

    /// The live owner of set `set` with the least load so far in this layer (ties rotate with
    /// `turn`), leaving out `tried`.
    fn pick(&self, set: usize, load: &[usize], turn: usize, tried: &[usize]) -> Option<usize> {
        let n = self.shards.len().max(1);
        self.sets[set]
            .owners
            .iter()
            .copied()
            .filter(|&s| self.stats.is_up(s) && !tried.contains(&s))
            .min_by_key(|&s| (load[s], (s + n - turn % n) % n))
    }

    fn no_owner(&self, set: usize) -> CoreError {
        let set = &self.sets[set];
        let owners: Vec<&str> = set
            .owners
            .iter()
            .map(|&s| self.shards[s].endpoint.as_str())
            .collect();
        CoreError::experts(format!(
            "no live shard hosts experts {} (hosted by {}, all down)",
            compact(&set.experts),
            owners.join(", ")
        ))
    }

    fn request(
        &self,
        layer: usize,
        part: &ShardRows,
        host: &[f32],
        traceparents: &[String],
    ) -> ForwardRequest {
        let h = self.hidden;
        let mut rows_f32 = Vec::with_capacity(part.rows.len() * h);
        for &r in &part.rows {
            rows_f32.extend_from_slice(&host[r * h..(r + 1) * h]);
        }
        let (hidden, dtype) = match self.wire {
            WireDtype::Bf16 => (encode_f32_as_bf16(&rows_f32), Dtype::Bf16),
            WireDtype::F32 => (encode_f32(&rows_f32), Dtype::F32),
        };
        ForwardRequest {
            request_id: self.next_id.fetch_add(1, Ordering::Relaxed),
            layer: layer as u32,
            num_rows: part.rows.len() as u32,
            hidden_size: h as u32,
            hidden,
            hidden_dtype: dtype as i32,
            experts_per_row: (part.ids.len() / part.rows.len().max(1)) as u32,
            expert_ids: part.ids.clone(),
            gate_weights: part.weights.clone(),
            partial_dtype: dtype as i32,
            traceparents: traceparents.to_vec(),
        }
    }

    /// Queues `req` on shard `s`'s stream.
    fn send(&self, s: usize, req: ForwardRequest) -> Result<Sent, CoreError> {
        let ep = &self.shards[s].endpoint;
        let conn = self.connect(s)?;
        let request_id = req.request_id;
        let (otx, rx) = oneshot::channel();
        match conn.waiters.lock() {
            Ok(mut m) => match &m.closed {
                Some(reason) => return Err(unavailable(ep, reason)),
                None => {
                    m.pending.insert(request_id, otx);
                }
            },
            Err(_) => return Err(unavailable(ep, "connection state poisoned")),
        }
        if conn.tx.blocking_send(req).is_err() {
            return Err(unavailable(ep, "stream closed"));
        }
        Ok(Sent {
            shard: s,
            conn,
            request_id,
            rx,
        })
    }

    /// Sends set `set`'s rows to a live owner not in `tried`, failing over to the next one while
    /// sending fails. `load` and the row counters count the rows where they went.
    #[allow(clippy::too_many_arguments)]
    fn send_set(
        self: &Arc<Self>,
        layer: usize,
        set: usize,
        part: &ShardRows,
        host: &[f32],
        traceparents: &[String],
        load: &mut [usize],
        turn: usize,
        tried: &mut Vec<usize>,
    ) -> Result<Sent, CoreError> {
        loop {
            let s = self
                .pick(set, load, turn, tried)
                .ok_or_else(|| self.no_owner(set))?;
            if !tried.is_empty() {
                self.stats.add_failover();
            }
            tried.push(s);
            match self.send(s, self.request(layer, part, host, traceparents)) {
                Ok(sent) => {
                    load[s] += part.rows.len();
                    self.stats.add_rows(s, part.rows.len());
                    return Ok(sent);
                }
                Err(e) => self.shard_failed(s, &e),
            }
        }
    }

    /// Waits for `sent`'s answer. Err(Ok(e)): the shard failed (transport: fail over);
    /// Err(Err(e)): the shard answered an error or a malformed result (no replica would do
    /// better: fail the rows that were sent).
    fn wait(&self, sent: Sent, rows: usize) -> Result<Vec<f32>, Result<CoreError, CoreError>> {
        let ep = &self.shards[sent.shard].endpoint;
        let timeout = self.timeout;
        let rx = sent.rx;
        let resp = match self
            .rt
            .block_on(async move { tokio::time::timeout(timeout, rx).await })
        {
            Err(_) => {
                // Nobody will read this answer any more.
                if let Ok(mut m) = sent.conn.waiters.lock() {
                    m.pending.remove(&sent.request_id);
                }
                return Err(Ok(unavailable(ep, format!("no answer within {timeout:?}"))));
            }
            Ok(Err(_)) => return Err(Ok(unavailable(ep, "connection lost"))),
            Ok(Ok(Err(reason))) => return Err(Ok(unavailable(ep, reason))),
            Ok(Ok(Ok(resp))) => resp,
        };
        let h = self.hidden;
        if let Some(err) = resp.error {
            return Err(Err(unavailable(ep, err.message)));
        }
        if resp.num_rows as usize != rows || resp.hidden_size as usize != h {
            return Err(Err(unavailable(
                ep,
                format!(
                    "answered {}x{} for {rows}x{h}",
                    resp.num_rows, resp.hidden_size
                ),
            )));
        }
        let dtype = Dtype::try_from(resp.dtype).unwrap_or(Dtype::Unspecified);
        decode_rows_to_f32("partial", dtype, &resp.partial, rows, h)
            .map_err(|e| Err(unavailable(ep, e)))
    }
}

impl<B: Backend> ExpertExecutor<B> for RemoteExperts<B> {
    fn dispatch(
        &self,
        layer: usize,
        x: &B::Act,
        routing: &Routing,
    ) -> dsv2_core::Result<PendingExperts<B>> {
        let me = &self.inner;
        let rows = routing.rows();
        let h = me.hidden;
        let host = me.backend.act_to_host(x)?;
        // Rows per replica set, with that set's slots (others padded).
        let parts = split_rows(routing, &me.set_of, me.sets.len());
        // The trace context of the requests in this step (set by the engine thread, which
        // runs this).
        let traceparents = crate::trace::step_parents();
        let turn = me.turn.fetch_add(1, Ordering::Relaxed);
        let mut load = vec![0usize; me.shards.len()];
        // Biggest sets first: the greedy least-loaded choice then balances the rows.
        let mut order: Vec<usize> = (0..parts.len())
            .filter(|&i| !parts[i].rows.is_empty())
            .collect();
        order.sort_by_key(|&i| std::cmp::Reverse(parts[i].rows.len()));
        let mut sent: Vec<Option<(Sent, Vec<usize>)>> = (0..parts.len()).map(|_| None).collect();
        let mut lost = Lost::default();
        for i in order {
            let mut tried = Vec::new();
            match me.send_set(
                layer,
                i,
                &parts[i],
                &host,
                &traceparents,
                &mut load,
                turn,
                &mut tried,
            ) {
                Ok(s) => sent[i] = Some((s, tried)),
                Err(e) => lost.add(&parts[i].rows, e),
            }
        }
        let me = me.clone();
        Ok(PendingExperts::Later(Box::new(move || {
            let mut out = vec![0f32; rows * h];
            // In set order whoever answered: the sum is the same with or without a failover.
            // Every set is awaited even once some are lost, so the step's other shards are
            // done with this layer (and any other dead one is marked down) before it runs again.
            for (i, entry) in sent.into_iter().enumerate() {
                let Some((mut s, mut tried)) = entry else {
                    continue;
                };
                let part = &parts[i];
                let partial = loop {
                    let shard = s.shard;
                    match me.wait(s, part.rows.len()) {
                        Ok(p) => break Some(p),
                        Err(Err(e)) => {
                            lost.add(&part.rows, e);
                            break None;
                        }
                        Err(Ok(e)) => {
                            me.shard_failed(shard, &e);
                            // Loads of this layer no longer matter: only live owners compete.
                            let mut load = vec![0usize; me.shards.len()];
                            match me.send_set(
                                layer,
                                i,
                                part,
                                &host,
                                &traceparents,
                                &mut load,
                                turn,
                                &mut tried,
                            ) {
                                Ok(next) => s = next,
                                Err(e) => {
                                    lost.add(&part.rows, e);
                                    break None;
                                }
                            }
                        }
                    }
                };
                let Some(partial) = partial else {
                    continue;
                };
                for (j, &r) in part.rows.iter().enumerate() {
                    for (o, v) in out[r * h..(r + 1) * h]
                        .iter_mut()
                        .zip(&partial[j * h..(j + 1) * h])
                    {
                        *o += v;
                    }
                }
            }
            lost.into_result()?;
            me.backend.act_from_host(rows, h, &out)
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dsv2_core::ExpertRows;

    #[test]
    fn compact_names_runs_and_lists() {
        assert_eq!(compact(&[15]), "15");
        assert_eq!(compact(&[4, 5, 6, 7]), "4-7");
        assert_eq!(compact(&[5, 3]), "[5, 3]");
        assert_eq!(compact(&[0, 5, 2]), "[0, 5, 2]");
        assert_eq!(compact(&[]), "[]");
    }

    #[test]
    fn lost_sets_fail_only_their_rows() {
        assert!(Lost::default().into_result().is_ok());
        let mut lost = Lost::default();
        lost.add(
            &[4, 1],
            CoreError::experts("no live shard hosts experts 8-11"),
        );
        lost.add(
            &[1, 7],
            CoreError::experts("no live shard hosts experts 12-15"),
        );
        match lost.into_result() {
            Err(CoreError::Experts { msg, rows }) => {
                assert_eq!(rows, ExpertRows::Only(vec![1, 4, 7]));
                assert_eq!(
                    msg,
                    "no live shard hosts experts 8-11; 1 more expert set unreachable"
                );
            }
            other => panic!("{other:?}"),
        }
    }
}
