//! The engine runs on its own OS thread (model steps are CPU/GPU-bound and synchronous). Async
//! handlers talk to it through a bounded command channel; each request gets a bounded event
//! channel. A request whose receiver is gone (client cancelled or disconnected) or whose
//! deadline passed is cancelled at the next step boundary, which frees its cache blocks at once.
//!
//! The engine thread also keeps each request's trace spans (`queue`, then `prefill` from
//! admission to the first token, then one `decode` span to the end: one span per phase, not per
//! step) under the span of the handler that submitted it, hands the expert shards the trace
//! context of the requests in each step (`trace`), and observes the per-step metrics. It hands
//! each step's events to the delivery thread (`event_sender`) in one piece: waking the requests'
//! stream tasks one by one would sit between this step and the next.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use tracing::Span;

use dsv2_core::backend::Backend;
use dsv2_core::engine::{Engine, EngineEvent, FailKind, GenerateParams, RequestLimits, SeqRequest};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tonic::Status;

use crate::event_sender::EventSender;
use crate::metrics::RouterMetrics;
use crate::{status, trace};

enum Cmd {
    Submit {
        req: SeqRequest,
        events: mpsc::Sender<EngineEvent>,
        deadline: Option<Instant>,
        permit: OwnedSemaphorePermit,
        /// The submitting handler's span: the request's phase spans go under it.
        span: Span,
        /// The client's `traceparent`, passed on to the shards when spans are not exported.
        incoming_traceparent: Option<String>,
        submitted: Instant,
    },
}

/// Where a request is, for its spans.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Queue,
    Prefill,
    Decode,
}

struct Live {
    events: mpsc::Sender<EngineEvent>,
    deadline: Option<Instant>,
    _permit: OwnedSemaphorePermit,
    span: Span,
    phase: Phase,
    /// The span of the current phase (closed when the next one starts or the request ends).
    phase_span: Span,
    incoming_traceparent: Option<String>,
    /// What the shards get as this request's parent while it is in a step.
    traceparent: Option<String>,
    submitted: Instant,
    tokens: u64,
}

impl Live {
    /// Ends the current phase and starts `next` under the request's span.
    fn enter(&mut self, next: Phase) {
        self.phase = next;
        self.phase_span = match next {
            Phase::Queue => tracing::info_span!(parent: &self.span, "queue"),
            Phase::Prefill => tracing::info_span!(parent: &self.span, "prefill"),
            Phase::Decode => {
                tracing::info_span!(parent: &self.span, "decode", output_tokens = tracing::field::Empty)
            }
        };
        self.traceparent = dsv2_server::telemetry::traceparent_of(&self.phase_span)
            .or_else(|| self.incoming_traceparent.clone());
    }
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
    /// Host tier of the prefix cache: blocks it can hold and holds, prompt tokens restored from
    /// it, and the copies each way (kv_cache/host.rs).
    pub host_capacity_blocks: AtomicUsize,
    pub host_cached_blocks: AtomicUsize,
    pub host_hit_tokens: AtomicU64,
    pub host_restores: AtomicU64,
    pub host_restored_blocks: AtomicU64,
    pub host_saved_blocks: AtomicU64,
    pub host_evicted_blocks: AtomicU64,
    /// Bytes one block takes in the host tier (restored and saved bytes are blocks × this).
    pub host_block_bytes: AtomicUsize,
}

#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Cmd>,
    admission: Arc<Semaphore>,
    max_queue: usize,
    next_id: Arc<AtomicU64>,
    pub limits: RequestLimits,
    pub gauges: Arc<EngineGauges>,
    pub metrics: Arc<RouterMetrics>,
    pub num_blocks: usize,
    /// Memory the latent KV cache takes (device memory on a GPU), bytes; 0 until the binary
    /// that made the engine sets it.
    pub kv_cache_bytes: u64,
}

impl EngineHandle {
    /// Starts the engine thread.
    pub fn spawn<B: Backend>(engine: Engine<B>, max_queue: usize) -> EngineHandle {
        let (tx, rx) = mpsc::channel(max_queue.max(1));
        let gauges = Arc::new(EngineGauges::default());
        let limits = engine.limits();
        let num_blocks = engine.num_blocks();
        publish(&engine, &gauges);
        let metrics = Arc::new(RouterMetrics::default());
        let (g, m) = (gauges.clone(), metrics.clone());
        let out = EventSender::spawn().expect("spawning the event delivery thread");
        std::thread::Builder::new()
            .name("dsv2-engine".into())
            .spawn(move || run(engine, rx, out, g, m))
            .expect("spawning the engine thread");
        EngineHandle {
            tx,
            admission: Arc::new(Semaphore::new(max_queue)),
            max_queue,
            next_id: Arc::new(AtomicU64::new(1)),
            limits,
            gauges,
            metrics,
            num_blocks,
            kv_cache_bytes: 0,
        }
    }

    /// Validates and queues a request; events arrive on the returned channel. Its spans go
    /// under the caller's current span.
    pub fn submit(
        &self,
        prompt: Vec<u32>,
        params: GenerateParams,
        deadline: Option<Instant>,
    ) -> Result<(u64, mpsc::Receiver<EngineEvent>), Status> {
        self.submit_traced(prompt, params, deadline, None)
    }

    /// `submit`, with the client's `traceparent`: what the expert shards get as the request's
    /// trace context where the router exports no spans of its own (with export on, they get the
    /// router's phase span, a child of the client's).
    pub fn submit_traced(
        &self,
        prompt: Vec<u32>,
        params: GenerateParams,
        deadline: Option<Instant>,
        incoming_traceparent: Option<String>,
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
            span: Span::current(),
            incoming_traceparent,
            submitted: Instant::now(),
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

fn run<B: Backend>(
    mut engine: Engine<B>,
    mut rx: mpsc::Receiver<Cmd>,
    mut out: EventSender,
    gauges: Arc<EngineGauges>,
    metrics: Arc<RouterMetrics>,
) {
    let mut live: HashMap<u64, Live> = HashMap::new();
    loop {
        if !engine.has_work() {
            match rx.blocking_recv() {
                Some(cmd) => accept(&mut engine, &mut live, &mut out, cmd),
                None => break,
            }
        }
        // Everything from here to the next step that is not the model is host overhead.
        let t_iter = Instant::now();
        while let Ok(cmd) = rx.try_recv() {
            accept(&mut engine, &mut live, &mut out, cmd);
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
                    out.push(
                        &l.events,
                        EngineEvent::Failed {
                            id,
                            kind: FailKind::DeadlineExceeded,
                            message: "deadline exceeded before generation finished".into(),
                        },
                    );
                }
                tracing::info!(request = id, deadline, "request cancelled, cache freed");
            }
        }
        if !engine.has_work() {
            out.flush();
            publish(&engine, &gauges);
            continue;
        }
        // Admitted here rather than inside `step`, so the queue wait ends where it does.
        let now = Instant::now();
        for id in engine.admit() {
            if let Some(l) = live.get_mut(&id) {
                metrics
                    .queue_wait
                    .observe_duration(now.saturating_duration_since(l.submitted));
                l.enter(Phase::Prefill);
            }
        }
        trace::set_step_parents(
            live.values()
                .filter(|l| l.phase != Phase::Queue)
                .filter_map(|l| l.traceparent.clone())
                .take(trace::MAX_STEP_PARENTS)
                .collect(),
        );
        // The cache as the step finds it (a step frees the blocks of the requests it finishes).
        let total_blocks = engine.num_blocks().max(1);
        let used_blocks = total_blocks.saturating_sub(engine.free_blocks());
        let t_step = Instant::now();
        let stepped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| engine.step()));
        trace::set_step_parents(Vec::new());
        let events = match stepped {
            Ok(ev) => ev,
            Err(_) => {
                // A bug, not a request error: fail everything in flight and stop serving rather
                // than continue from a state nobody can vouch for.
                tracing::error!(
                    requests = live.len(),
                    "engine step panicked; failing in-flight requests and stopping the engine"
                );
                for (id, l) in live.drain() {
                    out.push(
                        &l.events,
                        EngineEvent::Failed {
                            id,
                            kind: FailKind::Internal,
                            message: "internal error in the engine".into(),
                        },
                    );
                }
                out.flush();
                break;
            }
        };
        let shape = engine.last_step;
        if shape.sequences > 0 {
            metrics.step_duration.observe_duration(t_step.elapsed());
            metrics.step_sequences.observe(shape.sequences as f64);
            metrics.step_tokens.observe(shape.tokens as f64);
            metrics
                .step_kv_cache_usage
                .observe(used_blocks as f64 / total_blocks as f64);
        }
        for ev in events {
            let (id, last) = match &ev {
                EngineEvent::PromptLogprobs { id, .. } | EngineEvent::Token { id, .. } => {
                    (*id, false)
                }
                EngineEvent::Finished { id, .. } | EngineEvent::Failed { id, .. } => (*id, true),
            };
            if matches!(ev, EngineEvent::Token { .. }) {
                gauges.generated_tokens.fetch_add(1, Ordering::Relaxed);
                if let Some(l) = live.get_mut(&id) {
                    l.tokens += 1;
                    if l.phase != Phase::Decode {
                        l.enter(Phase::Decode);
                    }
                }
            }
            if last && let Some(l) = live.get(&id) {
                l.phase_span.record("output_tokens", l.tokens);
            }
            if let Some(l) = live.get(&id) {
                out.push(&l.events, ev);
            }
            if last {
                live.remove(&id);
            }
        }
        // Delivered by the event thread while this one goes on to the next step.
        out.flush();
        gauges.steps.store(engine.stats.steps, Ordering::Relaxed);
        publish(&engine, &gauges);
        if shape.sequences > 0 {
            metrics
                .step_host
                .observe_duration(t_iter.elapsed().saturating_sub(engine.last_step_model_time));
        }
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
    let c = engine.cache();
    let h = c.host_stats();
    g.host_capacity_blocks
        .store(c.host_capacity_blocks(), Ordering::Relaxed);
    g.host_cached_blocks
        .store(c.host_cached_blocks(), Ordering::Relaxed);
    g.host_block_bytes
        .store(c.host_block_bytes(), Ordering::Relaxed);
    g.host_hit_tokens
        .store(engine.stats.host_cache_hit_tokens, Ordering::Relaxed);
    g.host_restores.store(h.restores, Ordering::Relaxed);
    g.host_restored_blocks
        .store(h.restored_blocks, Ordering::Relaxed);
    g.host_saved_blocks.store(h.saved_blocks, Ordering::Relaxed);
    g.host_evicted_blocks
        .store(h.evicted_blocks, Ordering::Relaxed);
}

fn accept<B: Backend>(
    engine: &mut Engine<B>,
    live: &mut HashMap<u64, Live>,
    out: &mut EventSender,
    cmd: Cmd,
) {
    match cmd {
        Cmd::Submit {
            req,
            events,
            deadline,
            permit,
            span,
            incoming_traceparent,
            submitted,
        } => {
            let id = req.id;
            match engine.submit(req) {
                Ok(()) => {
                    let mut l = Live {
                        events,
                        deadline,
                        _permit: permit,
                        span,
                        phase: Phase::Queue,
                        phase_span: Span::none(),
                        incoming_traceparent,
                        traceparent: None,
                        submitted,
                        tokens: 0,
                    };
                    l.enter(Phase::Queue);
                    live.insert(id, l);
                }
                Err(e) => {
                    out.push(
                        &events,
                        EngineEvent::Failed {
                            id,
                            kind: FailKind::Internal,
                            message: e.to_string(),
                        },
                    );
                }
            }
        }
    }
}
