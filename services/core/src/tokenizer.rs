//! Text ↔ token ids with the model dir's `tokenizer.json` (HF `tokenizers`), BOS as the
//! tokenizer config says, and streaming detokenisation that never emits half a character.

use std::collections::HashMap;
use std::path::Path;

use crate::error::{CoreError, Result};

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<u32>,
    add_bos: bool,
    /// Added, non-special tokens whose text is written literally. DeepSeek's 13 added tokens
    /// (ids 100002..=100014) are byte-level symbols that HF's decoder turns into U+FFFD; the text
    /// they stand for is their own content (see shared/tokenizers/deepseek-v2/README.md).
    literal: HashMap<u32, String>,
    special: Vec<u32>,
}

impl Tokenizer {
    /// Loads `DIR/tokenizer.json` and `DIR/tokenizer_config.json` (optional); `bos_from_config`
    /// is the model config's bos_token_id.
    pub fn from_model_dir(dir: &Path, bos_from_config: Option<u32>) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(CoreError::Tokenizer(format!(
                "{} not found: this model dir has no tokenizer; pass token ids instead of text",
                path.display()
            )));
        }
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| CoreError::Tokenizer(format!("{}: {e}", path.display())))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let tcfg: serde_json::Value = if cfg_path.exists() {
            let text =
                std::fs::read_to_string(&cfg_path).map_err(|e| CoreError::io(&cfg_path, e))?;
            serde_json::from_str(&text).map_err(|e| {
                CoreError::Tokenizer(format!("{}: not valid JSON: {e}", cfg_path.display()))
            })?
        } else {
            serde_json::Value::Null
        };
        let bos_text = match &tcfg["bos_token"] {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Object(o) => {
                o.get("content").and_then(|c| c.as_str()).map(String::from)
            }
            _ => None,
        };
        let bos = bos_from_config.or_else(|| bos_text.and_then(|t| inner.token_to_id(&t)));
        // DeepSeek's tokenizer_config says add_bos_token: true; that is also the default of its
        // LlamaTokenizerFast class.
        let add_bos = tcfg["add_bos_token"].as_bool().unwrap_or(true) && bos.is_some();
        Ok(Self::assemble(inner, bos, add_bos))
    }

    pub fn from_tokenizer(inner: tokenizers::Tokenizer, bos: Option<u32>, add_bos: bool) -> Self {
        Self::assemble(inner, bos, add_bos)
    }

    fn assemble(inner: tokenizers::Tokenizer, bos: Option<u32>, add_bos: bool) -> Self {
        let mut literal = HashMap::new();
        let mut special = Vec::new();
        for (id, tok) in inner.get_added_tokens_decoder() {
            if tok.special {
                special.push(id);
            } else {
                literal.insert(id, tok.content.clone());
            }
        }
        Tokenizer {
            inner,
            bos,
            add_bos,
            literal,
            special,
        }
    }

    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids of `text` without BOS (what HF's `encode(text, add_special_tokens=False)` gives).
    pub fn encode_raw(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| CoreError::Tokenizer(format!("cannot encode text: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids of a prompt: BOS first when the tokenizer config asks for it.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        if self.add_bos {
            ids.extend(self.bos);
        }
        ids.extend(self.encode_raw(text)?);
        Ok(ids)
    }

    /// Text of `ids`, special tokens skipped, literal added tokens written as themselves.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let mut out = String::new();
        let mut run: Vec<u32> = Vec::new();
        for &id in ids {
            if let Some(lit) = self.literal.get(&id) {
                out.push_str(&self.decode_run(&run)?);
                run.clear();
                out.push_str(lit);
            } else if !self.special.contains(&id) {
                run.push(id);
            }
        }
        out.push_str(&self.decode_run(&run)?);
        Ok(out)
    }

    fn decode_run(&self, ids: &[u32]) -> Result<String> {
        if ids.is_empty() {
            return Ok(String::new());
        }
        self.inner
            .decode(ids, true)
            .map_err(|e| CoreError::Tokenizer(format!("cannot decode ids: {e}")))
    }

    /// The text of one token for logprob listings (may be a partial character).
    pub fn token_text(&self, id: u32) -> String {
        self.decode(&[id]).unwrap_or_default()
    }
}

/// Turns a growing list of generated ids into text deltas. Holds back text while the tail is an
/// incomplete UTF-8 sequence (decoded as U+FFFD), as TGI and vLLM do.
#[derive(Debug, Default, Clone)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    /// Text emitted so far.
    pub text: String,
}

impl IncrementalDecoder {
    /// Adds a token; returns the new text it completes (possibly empty).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = tok.decode(&self.ids[self.prefix_offset..])?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && full.starts_with(&prefix) {
            let delta = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            self.text.push_str(&delta);
            Ok(delta)
        } else {
            Ok(String::new())
        }
    }

    /// Whatever is still held back (at the end of generation).
    pub fn flush(&mut self, tok: &Tokenizer) -> Result<String> {
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = tok.decode(&self.ids[self.prefix_offset..])?;
        let delta = full.get(prefix.len()..).unwrap_or("").to_string();
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        self.text.push_str(&delta);
        Ok(delta)
    }
}
