//! Logs and traces of the servers: `tracing` spans and events go to stderr (human or JSON) and,
//! with `--otlp-endpoint`, to an OpenTelemetry collector over OTLP/gRPC; W3C trace context
//! (`traceparent`) comes in from clients and goes out to the expert shards.
//!
//! Export runs in the SDK's batch processor, on its own thread. The OTLP exporter speaks tonic,
//! which needs a tokio reactor that thread does not have (the SDK drives exports with a plain
//! executor), so `OnRuntime` runs each export on the server's runtime instead.

use std::collections::HashMap;
use std::time::Duration;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::LogFormat;

/// The W3C trace context header (and gRPC metadata key) that carries a span's identity.
pub const TRACEPARENT: &str = "traceparent";
/// Vendor trace state that travels with `traceparent`.
pub const TRACESTATE: &str = "tracestate";

/// Keeps the trace pipeline alive; `shutdown` (or dropping it) exports what is still buffered.
#[must_use = "dropping it shuts the trace export down"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported (`--otlp-endpoint` was given).
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports the spans still buffered and stops the exporter. Call it outside the runtime's
    /// worker threads while the runtime is still alive (the export runs on it).
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(p) = self.provider.take()
            && let Err(e) = p.shutdown()
        {
            eprintln!("trace export shutdown: {e}");
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Logs on stderr (`level` in RUST_LOG syntax; an invalid filter falls back to `fallback`) and,
/// with `otlp_endpoint` (e.g. `http://otel-collector:4317`), spans over OTLP/gRPC as
/// `service_name`, exported on `rt`. The usual OpenTelemetry variables tune the export
/// (`OTEL_BSP_SCHEDULE_DELAY`, `OTEL_TRACES_SAMPLER`, `OTEL_RESOURCE_ATTRIBUTES`, ...).
pub fn init(
    service_name: &'static str,
    level: &str,
    format: LogFormat,
    fallback: &str,
    otlp_endpoint: Option<&str>,
    rt: &tokio::runtime::Handle,
) -> Result<Telemetry, String> {
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(fallback));
    let human = (format == LogFormat::Human)
        .then(|| tracing_subscriber::fmt::layer().with_writer(std::io::stderr));
    let json = (format == LogFormat::Json).then(|| {
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
    });
    let provider = otlp_endpoint
        .map(|ep| provider(service_name, ep, rt))
        .transpose()?;
    let otel = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer(service_name)));
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    // A second init in one process (tests) keeps the first subscriber.
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(human)
        .with(json)
        .with(otel)
        .try_init();
    Ok(Telemetry { provider })
}

fn provider(
    service_name: &'static str,
    endpoint: &str,
    rt: &tokio::runtime::Handle,
) -> Result<SdkTracerProvider, String> {
    // tonic builds its (lazily connected) channel on the current runtime.
    let _guard = rt.enter();
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .with_timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| format!("--otlp-endpoint {endpoint}: {e}"))?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service_name)
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(OnRuntime {
            inner: exporter,
            rt: rt.clone(),
        })
        .with_resource(resource)
        .build())
}

/// A span exporter whose exports run on a tokio runtime (see the module docs).
#[derive(Debug)]
struct OnRuntime<E> {
    inner: E,
    rt: tokio::runtime::Handle,
}

impl<E: SpanExporter> SpanExporter for OnRuntime<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        if tokio::runtime::Handle::try_current().is_ok() {
            // Already on a runtime (not the batch thread): await it here.
            return self.inner.export(batch).await;
        }
        self.rt.block_on(self.inner.export(batch))
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}

/// The remote parent a `traceparent` (and `tracestate`) value names; None if it is malformed.
fn remote_context(traceparent: &str, tracestate: Option<&str>) -> Option<opentelemetry::Context> {
    let mut carrier = HashMap::with_capacity(2);
    carrier.insert(TRACEPARENT.to_string(), traceparent.to_string());
    if let Some(s) = tracestate {
        carrier.insert(TRACESTATE.to_string(), s.to_string());
    }
    let cx = TraceContextPropagator::new().extract(&carrier);
    cx.span().span_context().is_valid().then_some(cx)
}

/// Whether `traceparent` is a valid W3C trace context header value.
pub fn is_valid_traceparent(traceparent: &str) -> bool {
    remote_context(traceparent, None).is_some()
}

/// Makes `span` a child of the remote span `traceparent` names (a client's, or the router's for
/// a shard). Without trace export, or with a malformed value, nothing changes.
pub fn set_remote_parent(span: &tracing::Span, traceparent: &str, tracestate: Option<&str>) {
    if let Some(cx) = remote_context(traceparent, tracestate) {
        let _ = span.set_parent(cx);
    }
}

/// Links `span` to other remote spans (e.g. the other requests of a batched step).
pub fn add_remote_link(span: &tracing::Span, traceparent: &str) {
    if let Some(cx) = remote_context(traceparent, None) {
        span.add_link(cx.span().span_context().clone());
    }
}

/// `span`'s identity as a `traceparent` value, to hand to the next service; None when spans are
/// not exported (no OpenTelemetry context behind `span`).
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier: HashMap<String, String> = HashMap::with_capacity(2);
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.remove(TRACEPARENT)
}

/// The trace id of `span` as 32 hex digits, when spans are exported.
pub fn trace_id_of(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_values_are_checked() {
        assert!(is_valid_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        ));
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "zz-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(!is_valid_traceparent(bad), "{bad:?}");
        }
    }

    #[test]
    fn without_export_a_span_has_no_traceparent() {
        let span = tracing::info_span!("x");
        set_remote_parent(
            &span,
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            None,
        );
        assert_eq!(traceparent_of(&span), None);
        assert_eq!(trace_id_of(&span), None);
    }
}
