//! The one table from failures to gRPC status codes.

use dsv2_core::CoreError;
use dsv2_core::engine::FailKind;
use tonic::Status;

pub fn from_core(e: &CoreError) -> Status {
    match e {
        CoreError::InvalidInput(m) => Status::invalid_argument(m.clone()),
        CoreError::Tokenizer(m) => Status::invalid_argument(format!("tokenizer: {m}")),
        CoreError::Experts(m) => Status::unavailable(format!("expert shards unavailable: {m}")),
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
