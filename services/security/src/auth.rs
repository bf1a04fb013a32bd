//! Bearer-token authentication: the accepted tokens come from a file (one a line, `#` comments),
//! re-read when it changes; a tower layer answers UNAUTHENTICATED before the wrapped gRPC
//! service sees the call. Tokens are kept and compared as SHA-256 digests, so the time a
//! comparison takes says nothing about how much of a guessed token was right.

use std::collections::HashSet;
use std::convert::Infallible;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use sha2::{Digest, Sha256};
use tower::{Layer, Service};

use crate::watched::Watched;
use crate::{SecurityError, pem};

type Digests = HashSet<[u8; 32]>;

fn digest(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

fn parse(flag: &'static str, path: &Path) -> Result<Digests, SecurityError> {
    let bytes = pem::read(flag, path)?;
    let text = std::str::from_utf8(&bytes).map_err(|_| SecurityError::Invalid {
        flag,
        path: path.to_path_buf(),
        msg: "is not UTF-8 text".into(),
    })?;
    let set: Digests = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| digest(l.as_bytes()))
        .collect();
    if set.is_empty() {
        // Also keeps a half-written rotation from locking everyone out: `Watched` keeps the
        // last good set when a change does not parse.
        return Err(SecurityError::Invalid {
            flag,
            path: path.to_path_buf(),
            msg: "holds no token (one a line)".into(),
        });
    }
    Ok(set)
}

/// Why a call was refused (the message of its UNAUTHENTICATED / 401 answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    Missing,
    Malformed,
    Wrong,
}

impl std::fmt::Display for AuthFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AuthFailure::Missing => "missing authorization: send `authorization: Bearer <token>`",
            AuthFailure::Malformed => "authorization must be `Bearer <token>`",
            AuthFailure::Wrong => "the bearer token is not accepted",
        })
    }
}

/// The tokens of a file. Cheap to clone.
#[derive(Clone)]
pub struct Tokens(Arc<Watched<Digests>>);

impl Tokens {
    /// Reads the file now (`flag` names it in errors): missing, unreadable or empty fails.
    pub fn from_file(flag: &'static str, path: PathBuf) -> Result<Self, SecurityError> {
        let p = path.clone();
        Ok(Tokens(Arc::new(Watched::new(vec![path], move || {
            parse(flag, &p)
        })?)))
    }

    /// Checks an `authorization` header value.
    pub fn check(&self, header: Option<&http::HeaderValue>) -> Result<(), AuthFailure> {
        let h = header.ok_or(AuthFailure::Missing)?;
        let token = h
            .as_bytes()
            .strip_prefix(b"Bearer ")
            .or_else(|| h.as_bytes().strip_prefix(b"bearer "))
            .ok_or(AuthFailure::Malformed)?;
        let token = token.trim_ascii();
        if token.is_empty() {
            return Err(AuthFailure::Malformed);
        }
        if self.0.get().contains(&digest(token)) {
            Ok(())
        } else {
            Err(AuthFailure::Wrong)
        }
    }
}

/// Wraps one gRPC service: calls without an accepted token get UNAUTHENTICATED and never
/// reach it. `None` lets every call through (no token file configured).
#[derive(Clone, Default)]
pub struct RequireBearerLayer(pub Option<Tokens>);

impl<S> Layer<S> for RequireBearerLayer {
    type Service = RequireBearer<S>;

    fn layer(&self, inner: S) -> RequireBearer<S> {
        RequireBearer {
            inner,
            tokens: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RequireBearer<S> {
    inner: S,
    tokens: Option<Tokens>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, ReqB, ResB> Service<http::Request<ReqB>> for RequireBearer<S>
where
    S: Service<http::Request<ReqB>, Response = http::Response<ResB>, Error = Infallible>,
    S::Future: Send + 'static,
    ResB: Default + Send + 'static,
{
    type Response = http::Response<ResB>;
    type Error = Infallible;
    type Future = BoxFuture<Result<http::Response<ResB>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqB>) -> Self::Future {
        if let Some(t) = &self.tokens
            && let Err(why) = t.check(req.headers().get(http::header::AUTHORIZATION))
        {
            let resp = tonic::Status::unauthenticated(why.to_string()).into_http();
            return Box::pin(std::future::ready(Ok(resp)));
        }
        Box::pin(self.inner.call(req))
    }
}
