//! The HTTP API's edge: connections through `dsv2_security`'s acceptor (TLS when configured),
//! and `--auth-token-file` on every /v1/* route: no accepted `authorization: Bearer` token →
//! 401 in OpenAI's error shape, before the body is read or any engine work. /health stays open.

use std::net::SocketAddr;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use dsv2_security::auth::Tokens;
use dsv2_security::server::{Incoming, ServerIo};
use tonic::Status;

use super::error_response;

/// `Incoming` as an axum listener (a newtype: both the trait and the type live elsewhere).
pub struct HttpIncoming(pub Incoming);

impl axum::serve::Listener for HttpIncoming {
    type Io = ServerIo;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (ServerIo, SocketAddr) {
        match self.0.accept().await {
            Some(c) => c,
            // The accept loop ends only when this listener is dropped: nothing more will come.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.0.local_addr())
    }
}

/// Refuses /v1/* calls without an accepted token (axum middleware).
pub async fn require_bearer(State(tokens): State<Tokens>, req: Request, next: Next) -> Response {
    if !req.uri().path().starts_with("/v1/") {
        return next.run(req).await;
    }
    match tokens.check(req.headers().get(axum::http::header::AUTHORIZATION)) {
        Ok(()) => next.run(req).await,
        Err(why) => {
            let mut resp = error_response(&Status::unauthenticated(why.to_string()), None);
            resp.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
            resp.into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use axum::body::Body;
    use axum::http::{StatusCode, header};
    use axum::routing::get;
    use tower::ServiceExt;

    use super::*;

    /// /v1/models and /health behind the middleware; `work` counts handler runs.
    fn app(tokens: Tokens, work: Arc<AtomicUsize>) -> axum::Router {
        let w = work.clone();
        axum::Router::new()
            .route(
                "/v1/models",
                get(move || async move {
                    w.fetch_add(1, Ordering::SeqCst);
                    "models"
                }),
            )
            .route("/health", get(|| async { "ok" }))
            .layer(axum::middleware::from_fn_with_state(tokens, require_bearer))
    }

    async fn call(app: &axum::Router, path: &str, auth: Option<&str>) -> (StatusCode, Response) {
        let mut req = axum::http::Request::get(path);
        if let Some(a) = auth {
            req = req.header(header::AUTHORIZATION, a);
        }
        let resp = app
            .clone()
            .oneshot(req.body(Body::empty()).expect("request"))
            .await
            .expect("infallible");
        (resp.status(), resp)
    }

    #[tokio::test]
    async fn v1_needs_an_accepted_token_and_health_does_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("tokens");
        std::fs::write(&file, "good\n").expect("write");
        let tokens = Tokens::from_file("--auth-token-file", file).expect("tokens");
        let work = Arc::new(AtomicUsize::new(0));
        let app = app(tokens, work.clone());
        for auth in [
            None,
            Some("Bearer bad"),
            Some("good"),
            Some("Basic Z29vZA=="),
        ] {
            let (status, resp) = call(&app, "/v1/models", auth).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{auth:?}");
            assert_eq!(resp.headers()[header::WWW_AUTHENTICATE], "Bearer");
            let body = axum::body::to_bytes(resp.into_body(), 1 << 16)
                .await
                .expect("body");
            let v: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
            assert_eq!(v["error"]["type"], "authentication_error", "{v}");
            assert_eq!(v["error"]["code"], "unauthenticated", "{v}");
            assert!(
                v["error"]["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty())
            );
        }
        assert_eq!(
            work.load(Ordering::SeqCst),
            0,
            "a refused call reached the handler"
        );
        assert_eq!(
            call(&app, "/v1/models", Some("Bearer good")).await.0,
            StatusCode::OK
        );
        assert_eq!(work.load(Ordering::SeqCst), 1);
        assert_eq!(call(&app, "/health", None).await.0, StatusCode::OK);
    }
}
