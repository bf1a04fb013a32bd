//! gRPC bootstrap of the NCCL communicator: the router creates the unique id, calls
//! `ExpertShard.NcclInit` on every shard concurrently and joins as rank 0 on its own thread; a
//! shard validates the request and joins on a dedicated thread that then serves the exchange.
//! Init is collective, so all RPCs are in flight before the router's own (blocking) join.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc;
use std::time::Duration;

use cudarc::driver::CudaStream;
use dsv2_proto::expert::v1::expert_shard_client::ExpertShardClient;
use dsv2_proto::expert::v1::{NcclInitRequest, NcclInitResponse};
use tokio::runtime::Handle;

use crate::comm::{StopFlag, UniqueId};
use crate::error::{NcclError, Result};
use crate::plane::{LayerSet, LoopEnd, PlaneConfig, RouterPlane, ShardCompute, ShardPlane};

/// Shard default when the request's timeout_ms is 0.
pub const DEFAULT_INIT_TIMEOUT: Duration = Duration::from_secs(30);

/// A checked NcclInit request.
#[derive(Debug, Clone, Copy)]
pub struct JoinRequest {
    pub id: UniqueId,
    pub rank: usize,
    pub world: usize,
    /// The router's exchange sizes, with the init timeout.
    pub cfg: PlaneConfig,
}

/// Parses an NcclInit request (the shard side's edge).
pub fn parse_request(req: &NcclInitRequest) -> Result<JoinRequest> {
    let id = UniqueId::from_bytes(&req.unique_id)?;
    let (rank, world) = (req.rank as usize, req.world_size as usize);
    if world < 2 || rank == 0 || rank >= world {
        return Err(NcclError::InvalidArgument(format!(
            "rank {rank} of world_size {world}: shards are ranks 1..world_size-1 (the router is 0)"
        )));
    }
    let timeout = match req.timeout_ms {
        0 => DEFAULT_INIT_TIMEOUT,
        ms => Duration::from_millis(ms as u64),
    };
    let (hidden, max_rows, max_k) = (
        req.hidden_size as usize,
        req.max_rows as usize,
        req.max_experts_per_row as usize,
    );
    if hidden == 0 || max_rows == 0 || max_k == 0 {
        return Err(NcclError::InvalidArgument(format!(
            "hidden_size {hidden}, max_rows {max_rows}, max_experts_per_row {max_k}: all must be > 0"
        )));
    }
    let cfg = PlaneConfig {
        hidden,
        max_rows,
        max_k,
        timeout,
        blocking: req.blocking,
        slot_rows: req.slot_rows as usize,
        moe_layers: LayerSet::from_layers(req.moe_layers.iter().map(|&l| l as usize))?,
    };
    cfg.check_slots()?;
    Ok(JoinRequest {
        id,
        rank,
        world,
        cfg,
    })
}

/// A shard's exchange thread: set `stop` to end its loop (aborting the communicator).
pub struct ShardThread {
    pub stop: StopFlag,
    pub thread: std::thread::JoinHandle<Result<LoopEnd>>,
}

/// Shard side: validates `req` (its hidden size must be this shard's `hidden`), then on a new
/// thread runs `setup` with the agreed exchange sizes (it binds the device and returns the stream
/// the plane and the compute share, and the compute, with buffers for `max_rows`), joins the
/// communicator and serves the exchange until shutdown. Returns once the join finished, with its
/// outcome as the NcclInit answer, and the thread when it succeeded.
pub fn shard_join<S, F>(
    req: &NcclInitRequest,
    hidden: usize,
    setup: F,
) -> (NcclInitResponse, Option<ShardThread>)
where
    S: ShardCompute + 'static,
    F: FnOnce(&PlaneConfig) -> std::result::Result<(Arc<CudaStream>, S), String> + Send + 'static,
{
    let fail = |e: String| NcclInitResponse {
        ok: false,
        error: e,
    };
    let jr = match parse_request(req) {
        Ok(j) => j,
        Err(e) => return (fail(e.to_string()), None),
    };
    if jr.cfg.hidden != hidden {
        return (
            fail(format!(
                "the router's hidden size {} is not this shard's {hidden}: start both with the same model",
                jr.cfg.hidden
            )),
            None,
        );
    }
    let cfg = jr.cfg;
    let stop: StopFlag = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel::<std::result::Result<(), String>>();
    let stop2 = stop.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("nccl-shard-rank{}", jr.rank))
        .spawn(move || -> Result<LoopEnd> {
            let (stream, mut compute) = match setup(&cfg) {
                Ok(x) => x,
                Err(e) => {
                    let _ = tx.send(Err(format!("device setup failed: {e}")));
                    return Err(NcclError::InvalidArgument(e));
                }
            };
            let mut plane = match ShardPlane::new(stream, jr.id, jr.rank, jr.world, cfg) {
                Ok(p) => p,
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                    return Err(e);
                }
            };
            let _ = tx.send(Ok(()));
            let end = plane.run(&mut compute, &stop2);
            match &end {
                Ok(e) => tracing::info!(rank = jr.rank, end = ?e, "NCCL exchange loop ended"),
                Err(e) => tracing::warn!(rank = jr.rank, error = %e, "NCCL exchange loop failed"),
            }
            end
        });
    let thread = match spawned {
        Ok(t) => t,
        Err(e) => return (fail(format!("cannot spawn the NCCL thread: {e}")), None),
    };
    // The thread answers before init's own deadline passes; the extra second covers setup.
    match rx.recv_timeout(cfg.timeout + Duration::from_secs(60)) {
        Ok(Ok(())) => (
            NcclInitResponse {
                ok: true,
                error: String::new(),
            },
            Some(ShardThread { stop, thread }),
        ),
        Ok(Err(e)) => (fail(e), None),
        Err(_) => (
            fail(format!(
                "rank {}: device setup + NCCL init gave no answer within {:?}",
                jr.rank,
                cfg.timeout + Duration::from_secs(60)
            )),
            None,
        ),
    }
}

/// Router side, one shard: the NcclInit RPC; an error names the shard and carries its reason.
pub async fn request_join(
    endpoint: String,
    id: UniqueId,
    rank: usize,
    world: usize,
    cfg: PlaneConfig,
) -> Result<()> {
    let timeout = cfg.timeout;
    let err = |message: String| NcclError::Bootstrap {
        shard: endpoint.clone(),
        rank,
        message,
    };
    // The router's shard dialer: TLS for https:// shards, the shard token (dsv2_security).
    let dialer = dsv2_security::client::shard_dialer();
    let channel = dialer
        .endpoint(&endpoint)
        .map_err(|e| err(e.to_string()))?
        .connect_timeout(timeout)
        // the shard answers after its init, which may take the whole init timeout
        .timeout(timeout + Duration::from_secs(60))
        .connect()
        .await
        .map_err(|e| err(format!("cannot connect: {e}")))?;
    let resp = ExpertShardClient::with_interceptor(channel, dialer.bearer())
        .nccl_init(NcclInitRequest {
            unique_id: id.0.to_vec(),
            world_size: world as u32,
            rank: rank as u32,
            timeout_ms: timeout.as_millis().min(u32::MAX as u128) as u32,
            hidden_size: cfg.hidden as u32,
            max_rows: cfg.max_rows as u32,
            max_experts_per_row: cfg.max_k as u32,
            blocking: cfg.blocking,
            slot_rows: cfg.slot_rows as u32,
            moe_layers: cfg.moe_layers.iter().collect(),
        })
        .await
        .map_err(|e| err(format!("NcclInit failed: {}", e.message())))?
        .into_inner();
    if resp.ok {
        Ok(())
    } else {
        Err(err(resp.error))
    }
}

/// Router side: creates the id, asks every shard (rank i + 1 for `endpoints[i]`) to join, and
/// joins as rank 0 on the calling thread (which then owns the plane). `rt` must not be the
/// runtime of the calling thread (it blocks on it). A shard's own error wins over the local
/// init timeout it caused, so the message names the shard and what NCCL said there.
pub fn bootstrap_router(
    rt: &Handle,
    endpoints: &[String],
    stream: Arc<CudaStream>,
    cfg: PlaneConfig,
) -> Result<RouterPlane> {
    let id = UniqueId::new()?;
    let world = endpoints.len() + 1;
    let tasks: Vec<_> = endpoints
        .iter()
        .enumerate()
        .map(|(i, ep)| rt.spawn(request_join(ep.clone(), id, i + 1, world, cfg)))
        .collect();
    let local = RouterPlane::new(stream, id, endpoints.len(), cfg);
    let mut shard_err = None;
    for (i, t) in tasks.into_iter().enumerate() {
        let r = rt.block_on(t).unwrap_or_else(|e| {
            Err(NcclError::Bootstrap {
                shard: endpoints[i].clone(),
                rank: i + 1,
                message: format!("NcclInit task failed: {e}"),
            })
        });
        if let Err(e) = r
            && shard_err.is_none()
        {
            shard_err = Some(e);
        }
    }
    match (local, shard_err) {
        (_, Some(e)) => Err(e),
        (local, None) => local,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(id_len: usize, rank: u32, world: u32, ms: u32) -> NcclInitRequest {
        NcclInitRequest {
            unique_id: vec![7; id_len],
            world_size: world,
            rank,
            timeout_ms: ms,
            hidden_size: 8,
            max_rows: 4,
            max_experts_per_row: 2,
            blocking: false,
            slot_rows: 0,
            moe_layers: Vec::new(),
        }
    }

    #[test]
    fn parse_checks_the_slot_settings() {
        let mut r = req(128, 1, 2, 0);
        r.slot_rows = 2;
        r.moe_layers = vec![1, 2, 5];
        r.blocking = true;
        let ok = parse_request(&r).expect("valid");
        assert!(ok.cfg.blocking);
        assert_eq!(
            ok.cfg.slot(),
            Some(crate::SlotLayout {
                rows: 2,
                hidden: 8,
                k: 2
            })
        );
        assert_eq!(ok.cfg.moe_layers.iter().collect::<Vec<_>>(), vec![1, 2, 5]);
        // slots without the layer order, a slot larger than a batch, a layer past the bitmask
        let mut none = r.clone();
        none.moe_layers.clear();
        let e = parse_request(&none).unwrap_err().to_string();
        assert!(e.contains("MoE layers"), "{e}");
        let mut big = r.clone();
        big.slot_rows = 5;
        let e = parse_request(&big).unwrap_err().to_string();
        assert!(e.contains("slot_rows 5 > max_rows 4"), "{e}");
        let mut far = r;
        far.moe_layers = vec![1, 300];
        let e = parse_request(&far).unwrap_err().to_string();
        assert!(e.contains("layer 300"), "{e}");
    }

    #[test]
    fn parse_checks_id_rank_and_world() {
        let ok = parse_request(&req(128, 1, 2, 0)).expect("valid");
        assert_eq!(
            (ok.rank, ok.world, ok.cfg.timeout),
            (1, 2, DEFAULT_INIT_TIMEOUT)
        );
        assert_eq!((ok.cfg.hidden, ok.cfg.max_rows, ok.cfg.max_k), (8, 4, 2));
        assert_eq!(ok.id.0, [7; 128]);
        assert_eq!(
            parse_request(&req(128, 3, 4, 1500))
                .expect("valid")
                .cfg
                .timeout,
            Duration::from_millis(1500)
        );
        let mut zero = req(128, 1, 2, 0);
        zero.max_rows = 0;
        let e = parse_request(&zero).unwrap_err().to_string();
        assert!(e.contains("max_rows 0"), "{e}");
        let e = parse_request(&req(127, 1, 2, 0)).unwrap_err().to_string();
        assert!(e.contains("127 bytes"), "{e}");
        for (rank, world) in [(0, 2), (2, 2), (1, 1), (5, 3)] {
            let e = parse_request(&req(128, rank, world, 0))
                .unwrap_err()
                .to_string();
            assert!(e.contains("ranks 1..world_size-1"), "{rank}/{world}: {e}");
        }
    }

    #[test]
    fn bad_request_is_answered_without_a_thread() {
        struct Never;
        // SAFETY: never asked for buffers (the request is rejected before any thread runs).
        unsafe impl ShardCompute for Never {
            fn buffers(
                &mut self,
                _: &crate::Header,
            ) -> std::result::Result<crate::BatchBuffers, String> {
                Err("unused".into())
            }
            fn compute(&mut self, _: &crate::Header) -> std::result::Result<(), String> {
                Err("unused".into())
            }
        }
        let never = |_: &PlaneConfig| -> std::result::Result<(Arc<CudaStream>, Never), String> {
            Err("setup must not run".into())
        };
        let (resp, t) = shard_join(&req(128, 0, 2, 0), 8, never);
        assert!(!resp.ok);
        assert!(resp.error.contains("router is 0"), "{}", resp.error);
        assert!(t.is_none());
        // a router serving another model (hidden 8 vs this shard's 16) is refused up front
        let (resp, t) = shard_join(&req(128, 1, 2, 0), 16, never);
        assert!(!resp.ok);
        assert!(resp.error.contains("same model"), "{}", resp.error);
        assert!(t.is_none());
    }
}
