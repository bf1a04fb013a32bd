//! A `dsv2.v1.Inference` GenerateRequest (bytes anyone can send) parsed into the prompt ids and
//! the engine's parameters: the gRPC API's half of request validation, which the HTTP API reaches
//! through the same service. It needs no engine, so tests (and property tests) call it alone.

use dsv2_core::chat::{ChatMessage, ChatTemplate};
use dsv2_core::engine::GenerateParams;
use dsv2_core::sampling::SamplingParams;
use dsv2_core::tokenizer::Tokenizer;
use dsv2_proto::inference::v1 as pb;
use tonic::Status;

use crate::status;

/// Most alternatives per position a request may ask for (`logprobs`, `prompt_logprobs`).
pub const MAX_TOP_LOGPROBS: u32 = 20;

/// What parsing needs from the served model.
pub struct RequestParser<'a> {
    pub tokenizer: Option<&'a Tokenizer>,
    /// Renders `messages` prompts; None: the model has no chat template.
    pub chat_template: Option<&'a ChatTemplate>,
    /// Named in the error for `messages` without a template.
    pub model_name: &'a str,
    pub default_max_new_tokens: u32,
}

impl RequestParser<'_> {
    /// The prompt ids (text tokenized, or the chat template rendered and tokenized, or the ids
    /// as sent) and the engine parameters of `req`; an INVALID_ARGUMENT that names the field
    /// otherwise. The engine's `RequestLimits::validate` checks the result against the model.
    pub fn parse(&self, req: &pb::GenerateRequest) -> Result<(Vec<u32>, GenerateParams), Status> {
        let prompt = match &req.prompt {
            Some(pb::generate_request::Prompt::Text(t)) => {
                if t.is_empty() {
                    return Err(Status::invalid_argument("prompt: text is empty"));
                }
                let tok = self.tokenizer.ok_or_else(|| {
                    Status::invalid_argument("prompt: this model has no tokenizer; send token_ids")
                })?;
                tok.encode_prompt(t).map_err(|e| status::from_core(&e))?
            }
            Some(pb::generate_request::Prompt::TokenIds(ids)) => ids.ids.clone(),
            Some(pb::generate_request::Prompt::Messages(chat)) => self.chat_prompt(chat)?,
            None => {
                return Err(Status::invalid_argument(
                    "prompt: set one of text, token_ids or messages",
                ));
            }
        };
        // Unset temperature is 1.0, as the proto documents (and OpenAI-style APIs do).
        let temperature = req.temperature.unwrap_or(1.0);
        let top_p = req.top_p.unwrap_or(1.0);
        let max_new_tokens = req.max_new_tokens.unwrap_or(self.default_max_new_tokens);
        for (name, v) in [
            ("logprobs", req.logprobs),
            ("prompt_logprobs", req.prompt_logprobs),
        ] {
            if let Some(n) = v
                && n > MAX_TOP_LOGPROBS
            {
                return Err(Status::invalid_argument(format!(
                    "{name}: at most {MAX_TOP_LOGPROBS} alternatives, got {n}"
                )));
            }
        }
        let params = GenerateParams {
            max_new_tokens: max_new_tokens as usize,
            sampling: SamplingParams {
                temperature,
                top_k: req.top_k as usize,
                top_p,
                seed: req.seed,
            },
            stop_token_ids: req.stop_token_ids.clone(),
            stop_strings: req.stop.clone(),
            ignore_eos: req.ignore_eos,
            // Some(0) still returns each token's own logprob (the proto's contract).
            logprobs: req.logprobs.map(|n| n as usize),
            prompt_logprobs: req.prompt_logprobs.map(|n| n as usize),
            prompt_logprobs_skip_tokens: req.prompt_logprobs_skip_tokens as usize,
        };
        Ok((prompt, params))
    }

    /// A conversation's prompt ids: the chat template's text, tokenized without an added BOS
    /// (the template writes it), as transformers' `apply_chat_template(tokenize=True)` does.
    fn chat_prompt(&self, chat: &pb::ChatMessages) -> Result<Vec<u32>, Status> {
        if chat.messages.is_empty() {
            return Err(Status::invalid_argument(
                "messages: at least one message is needed",
            ));
        }
        if let Some(i) = chat.messages.iter().position(|m| m.role.is_empty()) {
            return Err(Status::invalid_argument(format!(
                "messages[{i}].role: is empty"
            )));
        }
        let (Some(template), Some(tok)) = (self.chat_template, self.tokenizer) else {
            return Err(Status::invalid_argument(format!(
                "messages: the model {:?} has no chat template (no chat_template in its \
                 tokenizer_config.json); start the router with --chat-template FILE, or send a \
                 text prompt",
                self.model_name
            )));
        };
        let messages: Vec<ChatMessage> = chat
            .messages
            .iter()
            .map(|m| ChatMessage::new(m.role.clone(), m.content.clone()))
            .collect();
        let text = template
            .render(&messages, chat.add_generation_prompt.unwrap_or(true))
            .map_err(|e| status::from_core(&e))?;
        tok.encode_raw(&text).map_err(|e| status::from_core(&e))
    }
}
