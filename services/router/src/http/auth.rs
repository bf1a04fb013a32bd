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
