//! Trace context on the request path: the client's `traceparent` (gRPC metadata, or the HTTP
//! header, which the HTTP API copies into the metadata), the request span it parents, and the
//! trace context of the engine step in progress, which the expert shards get with each layer.
//!
//! Why a thread-local for the step: the engine steps on its own thread and the model calls the
//! expert executor on that same thread, several layers deep, through an interface that knows
//! rows, not requests. The engine thread sets the step's parents just before `Engine::step` and
//! clears them after; `RemoteExperts::dispatch` reads them. One Forward stream per shard carries
//! every request's layers, so the context travels in each `ForwardRequest` (its `traceparents`
//! field), not in the stream's metadata, which is sent once when the stream opens.

use std::cell::RefCell;

use dsv2_server::telemetry::{TRACEPARENT, TRACESTATE, set_remote_parent};
use tonic::metadata::MetadataMap;

/// Most trace contexts sent with one layer: the first is the shard span's parent, the others
/// become links (a batched step serves many requests; a few suffice to find it from each).
pub const MAX_STEP_PARENTS: usize = 8;

thread_local! {
    static STEP_PARENTS: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
}

/// Sets the trace contexts (`traceparent` values) of the requests in the step this thread is
/// about to run; an empty list clears them.
pub fn set_step_parents(parents: Vec<String>) {
    STEP_PARENTS.with(|p| *p.borrow_mut() = parents);
}

/// The trace contexts of the step this thread is running (empty outside a step, or when no
/// request in it is traced).
pub fn step_parents() -> Vec<String> {
    STEP_PARENTS.with(|p| p.borrow().clone())
}

/// The client's `traceparent` in gRPC metadata, if it is a valid one.
pub fn incoming_traceparent(md: &MetadataMap) -> Option<String> {
    let v = md.get(TRACEPARENT)?.to_str().ok()?.trim();
    dsv2_server::telemetry::is_valid_traceparent(v).then(|| v.to_string())
}

/// The span of one generation request, a child of the client's span when the metadata names
/// one. Its fields are filled in as the request goes (`request_id`, token counts, outcome).
pub fn request_span(rpc: &'static str, api: &'static str, md: &MetadataMap) -> tracing::Span {
    let span = tracing::info_span!(
        "generate",
        otel.kind = "server",
        rpc,
        api,
        request_id = tracing::field::Empty,
        prompt_tokens = tracing::field::Empty,
        cached_prompt_tokens = tracing::field::Empty,
        completion_tokens = tracing::field::Empty,
        finish_reason = tracing::field::Empty,
        code = tracing::field::Empty,
    );
    if let Some(tp) = incoming_traceparent(md) {
        let state = md.get(TRACESTATE).and_then(|v| v.to_str().ok());
        set_remote_parent(&span, &tp, state);
    }
    span
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_parents_are_per_thread_and_cleared() {
        set_step_parents(vec!["a".into()]);
        assert_eq!(step_parents(), vec!["a".to_string()]);
        std::thread::spawn(|| assert!(step_parents().is_empty()))
            .join()
            .expect("thread");
        set_step_parents(Vec::new());
        assert!(step_parents().is_empty());
    }

    #[test]
    fn only_valid_traceparents_are_taken() {
        let mut md = MetadataMap::new();
        assert_eq!(incoming_traceparent(&md), None);
        md.insert("traceparent", "garbage".parse().expect("ascii"));
        assert_eq!(incoming_traceparent(&md), None);
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        md.insert("traceparent", tp.parse().expect("ascii"));
        assert_eq!(incoming_traceparent(&md).as_deref(), Some(tp));
    }
}
