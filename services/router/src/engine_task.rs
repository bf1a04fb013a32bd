//! The engine runs on its own OS thread (model steps are CPU/GPU-bound and synchronous). Async
//! handlers talk to it through a bounded command channel; each request gets a bounded event
//! channel. A request whose receiver is gone (client cancelled or disconnected) or whose
//! deadline passed is cancelled at the next step boundary, which frees its cache blocks at once.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use dsv2_core::backend::Backend;
use dsv2_core::engine::{Engine, EngineEvent, FailKind, GenerateParams, RequestLimits, SeqRequest};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tonic::Status;

use crate::status;

enum Cmd {
    Submit {
        req: SeqRequest,
        events: mpsc::Sender<EngineEvent>,
        deadline: Option<Instant>,
        permit: OwnedSemaphorePermit,
    },
}

struct Live {
    events: mpsc::Sender<EngineEvent>,
    deadline: Option<Instant>,
    _permit: OwnedSemaphorePermit,
}

/// Snapshot of the engine, for logs and tests.
#[derive(Debug, Default)]
pub struct EngineGauges {
    pub waiting: AtomicUsize,
    pub running: AtomicUsize,
    pub free_blocks: AtomicUsize,
    /// Blocks holding a cached prefix (held by requests or not).
    pub cached_blocks: AtomicUsize,
    pub steps: AtomicU64,
    pub generated_tokens: AtomicU64,
    /// Prompt tokens looked up in the prefix cache, and those found there.
    pub prefix_cache_queried_tokens: AtomicU64,
    pub prefix_cache_hit_tokens: AtomicU64,
    /// Cached blocks evicted to make room.
    pub evicted_blocks: AtomicU64,
}

#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Cmd>,
    admission: Arc<Semaphore>,
    max_queue: usize,
    next_id: Arc<AtomicU64>,
    pub limits: RequestLimits,
    pub gauges: Arc<EngineGauges>,
    pub num_blocks: usize,
}

impl EngineHandle {
    /// Starts the engine thread.
    pub fn spawn<B: Backend>(engine: Engine<B>, max_queue: usize) -> EngineHandle {
        let (tx, rx) = mpsc::channel(max_queue.max(1));
        let gauges = Arc::new(EngineGauges::default());
        let limits = engine.limits();
        let num_blocks = engine.num_blocks();
        publish(&engine, &gauges);
        let g = gauges.clone();
        std::thread::Builder::new()
            .name("dsv2-engine".into())
            .spawn(move || run(engine, rx, g))
            .expect("spawning the engine thread");
        EngineHandle {
            tx,
            admission: Arc::new(Semaphore::new(max_queue)),
            max_queue,
            next_id: Arc::new(AtomicU64::new(1)),
            limits,
            gauges,
            num_blocks,
        }
    }

    /// Validates and queues a request; events arrive on the returned channel.
    pub fn submit(
        &self,
        prompt: Vec<u32>,
        params: GenerateParams,
        deadline: Option<Instant>,
    ) -> Result<(u64, mpsc::Receiver<EngineEvent>), Status> {
        self.limits
            .validate(&prompt, &params)
            .map_err(|e| status::from_core(&e))?;
        let permit = self
            .admission
            .clone()
            .try_acquire_owned()
            .map_err(|_| status::queue_full(self.max_queue))?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (etx, erx) = mpsc::channel(params.max_new_tokens + 4);
        let cmd = Cmd::Submit {
            req: SeqRequest { id, prompt, params },
            events: etx,
            deadline,
            permit,
        };
        self.tx.try_send(cmd).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => status::queue_full(self.max_queue),
            mpsc::error::TrySendError::Closed(_) => status::shutting_down(),
        })?;
        Ok((id, erx))
    }

    /// Requests in the engine (waiting + running) right now.
    pub fn in_flight(&self) -> usize {
        self.max_queue - self.admission.available_permits()
    }
}

fn run<B: Backend>(mut engine: Engine<B>, mut rx: mpsc::Receiver<Cmd>, gauges: Arc<EngineGauges>) {
    let mut live: HashMap<u64, Live> = HashMap::new();
    loop {
        if !engine.has_work() {
            match rx.blocking_recv() {
                Some(cmd) => accept(&mut engine, &mut live, cmd),
                None => break,
            }
        }
        while let Ok(cmd) = rx.try_recv() {
            accept(&mut engine, &mut live, cmd);
        }
        // Cancelled clients and passed deadlines leave before the step.
        let now = Instant::now();
        let gone: Vec<(u64, bool)> = live
            .iter()
            .filter_map(|(&id, l)| {
                if l.events.is_closed() {
                    Some((id, false))
                } else if l.deadline.is_some_and(|d| d <= now) {
                    Some((id, true))
                } else {
                    None
                }
            })
            .collect();
        for (id, deadline) in gone {
            engine.cancel(id);
            if let Some(l) = live.remove(&id) {
                if deadline {
                    let _ = l.events.try_send(EngineEvent::Failed {
                        id,
                        kind: FailKind::DeadlineExceeded,
                        message: "deadline exceeded before generation finished".into(),
                    });
                }
                tracing::info!(request = id, deadline, "request cancelled, cache freed");
            }
        }
        if !engine.has_work() {
            publish(&engine, &gauges);
            continue;
        }
        let events = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| engine.step()))
        {
            Ok(ev) => ev,
            Err(_) => {
                // A bug, not a request error: fail everything in flight and stop serving rather
                // than continue from a state nobody can vouch for.
                tracing::error!(
                    requests = live.len(),
                    "engine step panicked; failing in-flight requests and stopping the engine"
                );
                for (id, l) in live.drain() {
                    let _ = l.events.try_send(EngineEvent::Failed {
                        id,
                        kind: FailKind::Internal,
                        message: "internal error in the engine".into(),
                    });
                }
                break;
            }
        };
        for ev in events {
            let (id, last) = match &ev {
                EngineEvent::PromptLogprobs { id, .. } | EngineEvent::Token { id, .. } => {
                    (*id, false)
                }
                EngineEvent::Finished { id, .. } | EngineEvent::Failed { id, .. } => (*id, true),
            };
            if matches!(ev, EngineEvent::Token { .. }) {
                gauges.generated_tokens.fetch_add(1, Ordering::Relaxed);
            }
            if let Some(l) = live.get(&id) {
                // Capacity covers every event of a request, so this fails only if the client left.
                let _ = l.events.try_send(ev);
            }
            if last {
                live.remove(&id);
            }
        }
        gauges.steps.store(engine.stats.steps, Ordering::Relaxed);
        publish(&engine, &gauges);
    }
    tracing::info!("engine thread stopped");
}

fn publish<B: Backend>(engine: &Engine<B>, g: &EngineGauges) {
    g.waiting.store(engine.waiting(), Ordering::Relaxed);
    g.running.store(engine.running(), Ordering::Relaxed);
    g.free_blocks.store(engine.free_blocks(), Ordering::Relaxed);
    g.cached_blocks
        .store(engine.cached_blocks(), Ordering::Relaxed);
    g.prefix_cache_queried_tokens
        .store(engine.stats.prefix_cache_queried_tokens, Ordering::Relaxed);
    g.prefix_cache_hit_tokens
        .store(engine.stats.prefix_cache_hit_tokens, Ordering::Relaxed);
    g.evicted_blocks
        .store(engine.cache().evicted_blocks(), Ordering::Relaxed);
}

fn accept<B: Backend>(engine: &mut Engine<B>, live: &mut HashMap<u64, Live>, cmd: Cmd) {
    match cmd {
        Cmd::Submit {
            req,
            events,
            deadline,
            permit,
        } => {
            let id = req.id;
            match engine.submit(req) {
                Ok(()) => {
                    live.insert(
                        id,
                        Live {
                            events,
                            deadline,
                            _permit: permit,
                        },
                    );
                }
                Err(e) => {
                    let _ = events.try_send(EngineEvent::Failed {
                        id,
                        kind: FailKind::Internal,
                        message: e.to_string(),
                    });
                }
            }
        }
    }
}
