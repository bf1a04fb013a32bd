//! The one table from failures to gRPC status codes, and next to it the HTTP API's table from
//! those codes to HTTP statuses and OpenAI error types: every failure of either API is first a
//! `Status` (same code, same message), so both report it the same way.

use dsv2_core::CoreError;
use dsv2_core::engine::FailKind;
use http::StatusCode;
use tonic::{Code, Status};

pub fn from_core(e: &CoreError) -> Status {
    match e {
        CoreError::InvalidInput(m) => Status::invalid_argument(m.clone()),
        CoreError::Tokenizer(m) => Status::invalid_argument(format!("tokenizer: {m}")),
        CoreError::Experts { msg, .. } => {
            Status::unavailable(format!("expert shards unavailable: {msg}"))
        }
        CoreError::Cache(m) => Status::resource_exhausted(format!("KV cache: {m}")),
        other => Status::internal(other.to_string()),
    }
}

pub fn from_failure(kind: FailKind, message: &str) -> Status {
    match kind {
        FailKind::Unavailable => Status::unavailable(message.to_string()),
        FailKind::DeadlineExceeded => Status::deadline_exceeded(message.to_string()),
        FailKind::Internal => Status::internal(message.to_string()),
    }
}

pub fn queue_full(limit: usize) -> Status {
    Status::resource_exhausted(format!(
        "the server already holds {limit} requests (--max-queue); retry later"
    ))
}

pub fn shutting_down() -> Status {
    Status::unavailable("the router is shutting down")
}

/// The HTTP status and OpenAI error `type` of a failure that gRPC answers with `code`.
pub fn http_status(code: Code) -> (StatusCode, &'static str) {
    match code {
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            (StatusCode::BAD_REQUEST, "invalid_request_error")
        }
        Code::Unauthenticated => (StatusCode::UNAUTHORIZED, "authentication_error"),
        Code::PermissionDenied => (StatusCode::FORBIDDEN, "permission_error"),
        Code::NotFound => (StatusCode::NOT_FOUND, "not_found_error"),
        // Shed by --max-concurrent, the queue full (--max-queue), no KV cache room.
        Code::ResourceExhausted => (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error"),
        Code::Unimplemented => (StatusCode::NOT_IMPLEMENTED, "invalid_request_error"),
        // A shard lost, or the router shutting down.
        Code::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "service_unavailable_error"),
        Code::DeadlineExceeded => (StatusCode::GATEWAY_TIMEOUT, "timeout_error"),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "server_error"),
    }
}

/// The request field an INVALID_ARGUMENT message names: validation messages start with
/// `field: ` (`max_new_tokens: must be at least 1`, `messages[2].role: is empty`).
pub fn field_of(message: &str) -> Option<&str> {
    let (field, _) = message.split_once(": ")?;
    let ok = !field.is_empty()
        && field
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '[' | ']'));
    ok.then_some(field)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_client_facing_failure_has_its_http_status() {
        let st = |s: Status| http_status(s.code()).0.as_u16();
        assert_eq!(st(from_core(&CoreError::InvalidInput("x".into()))), 400);
        assert_eq!(st(queue_full(4)), 429);
        assert_eq!(st(from_core(&CoreError::Cache("full".into()))), 429);
        assert_eq!(st(from_core(&CoreError::experts("shard 1 gone"))), 503);
        assert_eq!(st(from_failure(FailKind::Unavailable, "x")), 503);
        assert_eq!(st(shutting_down()), 503);
        assert_eq!(st(from_failure(FailKind::DeadlineExceeded, "x")), 504);
        assert_eq!(st(from_failure(FailKind::Internal, "x")), 500);
    }

    #[test]
    fn the_field_is_the_message_prefix() {
        assert_eq!(
            field_of("max_new_tokens: must be at least 1"),
            Some("max_new_tokens")
        );
        assert_eq!(
            field_of("messages[2].role: is empty"),
            Some("messages[2].role")
        );
        assert_eq!(field_of("deadline exceeded: late"), None);
        assert_eq!(field_of("no field here"), None);
    }
}
