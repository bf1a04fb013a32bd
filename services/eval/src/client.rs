//! The few calls of the public gRPC API (`dsv2.v1.Inference`) the evaluations make, with errors
//! mapped to `EvalError`.

use std::sync::Arc;

use dsv2_proto::inference::v1 as pb;
use dsv2_proto::inference::v1::inference_client::InferenceClient;
use dsv2_security::args::ClientArgs;
use dsv2_security::client::AuthChannel;

use crate::error::{EvalError, Result};

/// Called with the number of items just finished (progress bars live in the binary).
pub type Progress = Arc<dyn Fn(u64) + Send + Sync>;

/// A progress callback that does nothing.
pub fn no_progress() -> Progress {
    Arc::new(|_| {})
}

/// A connected client. Cloning is cheap and shares the HTTP/2 connection, which is how the
/// concurrent requests of one evaluation reach the router's batching.
#[derive(Clone)]
pub struct Client {
    inner: InferenceClient<AuthChannel>,
}

impl Client {
    /// `security`: the token and CA (https://) of a router with --auth-token-file or TLS.
    pub async fn connect(endpoint: &str, security: &ClientArgs) -> Result<Client> {
        let connect_err = |message: String| EvalError::Connect {
            endpoint: endpoint.to_string(),
            message,
        };
        let bearer = security.bearer().map_err(|e| connect_err(e.to_string()))?;
        let channel = security
            .endpoint(endpoint)
            .map_err(|e| connect_err(e.to_string()))?
            .connect()
            .await
            .map_err(|e| connect_err(e.to_string()))?;
        let inner = InferenceClient::with_interceptor(channel, bearer);
        // Long MMLU prompts with prompt logprobs are big answers; lift tonic's 4 MiB default.
        let inner = inner.max_decoding_message_size(256 << 20);
        Ok(Client { inner })
    }

    pub async fn model_info(&self) -> Result<pb::ModelInfoResponse> {
        let mut c = self.inner.clone();
        Ok(c.model_info(pb::ModelInfoRequest {})
            .await
            .map_err(|s| EvalError::rpc("ModelInfo", s))?
            .into_inner())
    }

    /// Token ids of `text` with the model's tokenizer, with the BOS token first when `bos`.
    pub async fn tokenize(&self, text: &str, bos: bool) -> Result<Vec<u32>> {
        let mut c = self.inner.clone();
        Ok(c.tokenize(pb::TokenizeRequest {
            text: text.to_string(),
            add_bos_token: bos,
        })
        .await
        .map_err(|s| EvalError::rpc("Tokenize", s))?
        .into_inner()
        .token_ids)
    }

    pub async fn generate(&self, req: pb::GenerateRequest) -> Result<pb::GenerateResponse> {
        let mut c = self.inner.clone();
        Ok(c.generate(req)
            .await
            .map_err(|s| EvalError::rpc("Generate", s))?
            .into_inner())
    }
}

/// A request for `ids` verbatim (no BOS added by the server), greedy.
pub fn greedy_request(ids: Vec<u32>, max_new_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: Some(pb::generate_request::Prompt::TokenIds(pb::TokenIds { ids })),
        max_new_tokens: Some(max_new_tokens),
        temperature: Some(0.0),
        top_k: 0,
        top_p: None,
        seed: None,
        stop: vec![],
        stop_token_ids: vec![],
        logprobs: None,
        prompt_logprobs: None,
        ignore_eos: false,
        prompt_logprobs_skip_tokens: 0,
    }
}
