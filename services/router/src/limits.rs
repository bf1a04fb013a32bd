//! Tower layers in front of `dsv2.v1.Inference`: the arrival stamp that client deadlines count
//! from, a global in-flight limit that sheds excess requests with RESOURCE_EXHAUSTED, and the
//! router's request timeout, answered with DEADLINE_EXCEEDED. Health and reflection are not
//! wrapped: probes must answer when the router is saturated. The HTTP API takes its permits
//! from the same limit (`InFlightLimitLayer::try_acquire`).
//!
//! The limit and the timeout are hand-written on tokio's semaphore and timer rather than tower's
//! `GlobalConcurrencyLimitLayer` + `LoadShedLayer` and `TimeoutLayer`, for two reasons:
//! - tower's concurrency limit releases its permit when the response future resolves, which for
//!   a server-streaming RPC is when the headers go out; GenerateStream, the main API, would not
//!   count at all. Here the permit moves into the response body and is released when the body
//!   ends or is dropped (stream finished, failed, or cancelled by the client).
//! - tower's layers fail with a `BoxError` (`Overloaded`, `Elapsed`), which tonic's
//!   `add_service` cannot take (it needs `Error = Infallible`) and which, as a server-wide
//!   `Server::layer`, tonic turns into CANCELLED "Timeout expired" at best. These layers answer
//!   a gRPC status that names the flag to change.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Status;
use tonic::body::Body;
use tower::{Layer, Service};

use crate::metrics::{Api, RouterMetrics};

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// When a call reached the router, as tonic's own `grpc-timeout` timer sees it.
///
/// tonic's server starts a timer for the client's `grpc-timeout` as it takes the request and
/// answers CANCELLED ("Timeout expired") when it fires. The router answers DEADLINE_EXCEEDED a
/// little before that, which only works if both count from the same instant: a handler that
/// counted from its own start (after routing, body decoding and, on a loaded machine, waiting
/// for a worker thread) lost that race on a 2-core CI machine. This layer, outermost on the
/// service, stamps the request as early as a layer can: tonic starts its timer when hyper calls
/// the service, and the routing beneath it calls this layer at the first poll of the request's
/// task, which follows at once (the unary margin in `service` covers the gap).
#[derive(Clone, Copy, Debug)]
pub struct Arrival(pub Instant);

#[derive(Clone, Copy, Debug, Default)]
pub struct ArrivalLayer;

impl<S> Layer<S> for ArrivalLayer {
    type Service = StampArrival<S>;

    fn layer(&self, inner: S) -> StampArrival<S> {
        StampArrival { inner }
    }
}

#[derive(Clone, Debug)]
pub struct StampArrival<S> {
    inner: S,
}

impl<S, ReqBody> Service<http::Request<ReqBody>> for StampArrival<S>
where
    S: Service<http::Request<ReqBody>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<ReqBody>) -> Self::Future {
        req.extensions_mut().insert(Arrival(Instant::now()));
        self.inner.call(req)
    }
}

/// At most `max` Inference RPCs in flight across all connections; the next one is answered
/// RESOURCE_EXHAUSTED at once instead of waiting. Shedding rather than queueing: a queue here
/// would be unbounded (every HTTP/2 stream of every connection) and invisible to clients, while
/// an immediate RESOURCE_EXHAUSTED lets them back off or go to another replica.
#[derive(Clone, Debug)]
pub struct InFlightLimitLayer {
    permits: Arc<Semaphore>,
    max: usize,
    metrics: Option<Arc<RouterMetrics>>,
}

impl InFlightLimitLayer {
    pub fn new(max: usize) -> Self {
        InFlightLimitLayer {
            permits: Arc::new(Semaphore::new(max)),
            max,
            metrics: None,
        }
    }

    /// Counts the generation calls this layer sheds in `dsv2_router_requests_total` (they never
    /// reach the handler that counts the others).
    pub fn counting_into(mut self, metrics: Arc<RouterMetrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// RPCs holding a permit now (for logs and tests).
    pub fn in_flight(&self) -> usize {
        self.max - self.permits.available_permits()
    }

    /// A permit of the same limit for a call that does not pass through this layer (the HTTP
    /// API): held until the call's response has ended.
    pub fn try_acquire(&self) -> Result<OwnedSemaphorePermit, Status> {
        acquire(&self.permits, self.max)
    }
}

/// A permit, or the RESOURCE_EXHAUSTED that names the flag to change.
fn acquire(permits: &Arc<Semaphore>, max: usize) -> Result<OwnedSemaphorePermit, Status> {
    permits.clone().try_acquire_owned().map_err(|_| {
        // debug, not warn: under overload this fires once per rejected request.
        tracing::debug!(limit = max, "request shed");
        Status::resource_exhausted(format!(
            "the router is already serving {max} requests (--max-concurrent); retry later"
        ))
    })
}

impl<S> Layer<S> for InFlightLimitLayer {
    type Service = InFlightLimit<S>;

    fn layer(&self, inner: S) -> InFlightLimit<S> {
        InFlightLimit {
            inner,
            permits: self.permits.clone(),
            max: self.max,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct InFlightLimit<S> {
    inner: S,
    permits: Arc<Semaphore>,
    max: usize,
    metrics: Option<Arc<RouterMetrics>>,
}

impl<S, ReqBody> Service<http::Request<ReqBody>> for InFlightLimit<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<http::Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let permit = match acquire(&self.permits, self.max) {
            Ok(p) => p,
            Err(status) => {
                let path = req.uri().path();
                if let Some(m) = &self.metrics
                    && (path.ends_with("/Generate") || path.ends_with("/GenerateStream"))
                {
                    m.request_ended(Api::Grpc, status.code());
                }
                return Box::pin(std::future::ready(Ok(status.into_http())));
            }
        };
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            Ok(resp.map(|inner| {
                Body::new(PermitBody {
                    inner,
                    _permit: permit,
                })
            }))
        })
    }
}

/// A response body that holds an in-flight permit until it is dropped.
struct PermitBody {
    inner: Body,
    _permit: OwnedSemaphorePermit,
}

impl HttpBody for PermitBody {
    type Data = <Body as HttpBody>::Data;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Status>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The router's request timeout: a call whose response has not started within `timeout` is
/// answered DEADLINE_EXCEEDED and its handler dropped (for Generate that drops the engine's
/// event receiver, so the engine cancels the request and frees its cache at the next step).
///
/// For unary RPCs the response starts only when the handler is done, so this bounds the whole
/// call. For GenerateStream it bounds only the time to the response headers; the stream itself
/// is bounded by the same timeout given to the engine as the request's deadline (see
/// `InferenceService::request_timeout`). `None` disables it.
#[derive(Clone, Copy, Debug)]
pub struct RequestTimeoutLayer {
    timeout: Option<Duration>,
}

impl RequestTimeoutLayer {
    pub fn new(timeout: Option<Duration>) -> Self {
        RequestTimeoutLayer { timeout }
    }
}

impl<S> Layer<S> for RequestTimeoutLayer {
    type Service = RequestTimeout<S>;

    fn layer(&self, inner: S) -> RequestTimeout<S> {
        RequestTimeout {
            inner,
            timeout: self.timeout,
        }
    }
}

#[derive(Clone, Debug)]
pub struct RequestTimeout<S> {
    inner: S,
    timeout: Option<Duration>,
}

impl<S, ReqBody> Service<http::Request<ReqBody>> for RequestTimeout<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let Some(limit) = self.timeout else {
            return Box::pin(self.inner.call(req));
        };
        let path = req.uri().path().to_owned();
        let fut = self.inner.call(req);
        Box::pin(async move {
            match tokio::time::timeout(limit, fut).await {
                Ok(r) => r,
                Err(_) => {
                    tracing::info!(secs = limit.as_secs_f64(), %path, "request timed out");
                    Ok(Status::deadline_exceeded(format!(
                        "the router's request timeout ({}s, --request-timeout-s) passed before the response",
                        limit.as_secs_f64()
                    ))
                    .into_http())
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use tonic::Code;
    use tower::ServiceExt;

    use super::*;

    /// The stamp is taken when the layer is called, before the inner service runs, and the
    /// inner service sees it in the request's extensions.
    #[tokio::test]
    async fn arrival_is_stamped_before_the_inner_service_runs() {
        let svc = ArrivalLayer.layer(tower::service_fn(|r: http::Request<Body>| async move {
            let started = Instant::now();
            Ok::<_, Infallible>((r.extensions().get::<Arrival>().map(|a| a.0), started))
        }));
        let before = Instant::now();
        let (seen, started) = svc.oneshot(req()).await.expect("infallible");
        let seen = seen.expect("the request was stamped");
        assert!(
            before <= seen && seen <= started,
            "{before:?} {seen:?} {started:?}"
        );
    }

    /// A body that never ends: a stream still being generated.
    struct Open;

    impl HttpBody for Open {
        type Data = <Body as HttpBody>::Data;
        type Error = Status;
        fn poll_frame(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Self::Data>, Status>>> {
            Poll::Pending
        }
    }

    fn req() -> http::Request<Body> {
        http::Request::builder()
            .uri("/dsv2.v1.Inference/GenerateStream")
            .body(Body::empty())
            .expect("a valid request")
    }

    /// The gRPC status a response carries in its headers (none: OK so far).
    fn status_of(r: &http::Response<Body>) -> Option<Status> {
        Status::from_header_map(r.headers())
    }

    async fn open_stream(_r: http::Request<Body>) -> Result<http::Response<Body>, Infallible> {
        Ok(http::Response::new(Body::new(Open)))
    }

    #[tokio::test]
    async fn the_permit_lives_as_long_as_the_response_body() {
        let limit = InFlightLimitLayer::new(1);
        let svc = limit.layer(tower::service_fn(open_stream));
        let first = svc.clone().oneshot(req()).await.expect("infallible");
        assert!(status_of(&first).is_none(), "first request was not served");
        // The response headers are out, the body is still streaming: the request is in flight.
        assert_eq!(limit.in_flight(), 1);
        let shed = svc.clone().oneshot(req()).await.expect("infallible");
        let st = status_of(&shed).expect("the second request was served over the limit");
        assert_eq!(st.code(), Code::ResourceExhausted, "{}", st.message());
        assert!(
            st.message().contains("--max-concurrent"),
            "{}",
            st.message()
        );
        // The stream ends (or the client goes away): its permit comes back.
        drop(first);
        assert_eq!(limit.in_flight(), 0);
        let again = svc.oneshot(req()).await.expect("infallible");
        assert!(
            status_of(&again).is_none(),
            "not served after the first ended"
        );
    }

    #[tokio::test]
    async fn a_request_dropped_before_its_response_gives_its_permit_back() {
        let limit = InFlightLimitLayer::new(1);
        let svc = limit.layer(tower::service_fn(|_r: http::Request<Body>| async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok::<_, Infallible>(http::Response::new(Body::empty()))
        }));
        let mut pending = svc.clone().oneshot(req());
        // Poll once so the call has started and holds its permit.
        assert!(
            tokio::time::timeout(Duration::from_millis(20), &mut pending)
                .await
                .is_err()
        );
        assert_eq!(limit.in_flight(), 1);
        drop(pending);
        assert_eq!(limit.in_flight(), 0);
    }

    #[tokio::test]
    async fn a_slow_response_is_deadline_exceeded_and_frees_its_permit() {
        let limit = InFlightLimitLayer::new(1);
        let svc = tower::ServiceBuilder::new()
            .layer(limit.clone())
            .layer(RequestTimeoutLayer::new(Some(Duration::from_millis(100))))
            .service_fn(|_r: http::Request<Body>| async {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok::<_, Infallible>(http::Response::new(Body::empty()))
            });
        let t0 = Instant::now();
        let r = svc.oneshot(req()).await.expect("infallible");
        let waited = t0.elapsed();
        let st = status_of(&r).expect("the slow request was answered OK");
        assert_eq!(st.code(), Code::DeadlineExceeded, "{}", st.message());
        assert!(
            st.message().contains("--request-timeout-s"),
            "{}",
            st.message()
        );
        assert!(
            waited >= Duration::from_millis(100) && waited < Duration::from_secs(5),
            "answered after {waited:?}"
        );
        drop(r);
        assert_eq!(limit.in_flight(), 0);
    }

    #[tokio::test]
    async fn no_timeout_and_fast_responses_pass_through() {
        let slowish = |_r: http::Request<Body>| async {
            tokio::time::sleep(Duration::from_millis(150)).await;
            Ok::<_, Infallible>(http::Response::new(Body::empty()))
        };
        for timeout in [None, Some(Duration::from_secs(30))] {
            let svc = RequestTimeoutLayer::new(timeout).layer(tower::service_fn(slowish));
            let r = svc.oneshot(req()).await.expect("infallible");
            assert!(
                status_of(&r).is_none(),
                "timeout {timeout:?}: {:?}",
                status_of(&r)
            );
        }
    }
}
