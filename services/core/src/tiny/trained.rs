//! The trained tiny model, `--model-dir tiny`: a DeepSeek-V2-architecture checkpoint (about 4 M
//! parameters, bf16) trained on the prose of the Rust book by assets/tiny-trained/train.py, with
//! its byte-level BPE. The files are embedded in the binary and written on first use into the
//! cache dir, as the random tiny model's are, so every loader reads an ordinary HF model dir.

use std::path::{Path, PathBuf};

use crate::error::{CoreError, Result};

/// The cache dir's name (and the model name the HTTP API reports). Bump when the committed
/// files change, so a stale cache is never served.
pub const TRAINED_VERSION: &str = "tiny-trained-v1";

/// (file name, bytes) of every file of the model dir; MANIFEST.json says how each was made.
const FILES: [(&str, &[u8]); 4] = [
    (
        "config.json",
        include_bytes!("../../assets/tiny-trained/config.json"),
    ),
    (
        "model.safetensors",
        include_bytes!("../../assets/tiny-trained/model.safetensors"),
    ),
    (
        "tokenizer.json",
        include_bytes!("../../assets/tiny-trained/tokenizer.json"),
    ),
    (
        "tokenizer_config.json",
        include_bytes!("../../assets/tiny-trained/tokenizer_config.json"),
    ),
];

/// Writes the trained tiny model's files into `dir`.
pub fn write_trained_to(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| CoreError::io(dir, e))?;
    for (name, bytes) in FILES {
        let p = dir.join(name);
        std::fs::write(&p, bytes).map_err(|e| CoreError::io(&p, e))?;
    }
    Ok(())
}

/// True when `dir` already holds exactly these files (a length check per file: the version in
/// the dir name is the real guard, this catches a half-written or hand-edited dir).
fn is_complete(dir: &Path) -> bool {
    FILES.iter().all(|(name, bytes)| {
        std::fs::metadata(dir.join(name)).is_ok_and(|m| m.len() == bytes.len() as u64)
    })
}

/// Returns the trained tiny model's directory under `cache_root`, writing it on first use.
pub fn ensure_trained(cache_root: &Path) -> Result<PathBuf> {
    let dir = cache_root.join(TRAINED_VERSION);
    if is_complete(&dir) {
        return Ok(dir);
    }
    if dir.exists() {
        // Ours, and named by version: a half-written dir (a run killed mid-write under an older
        // writer, a full disk) is moved aside and rewritten rather than served or refused.
        let stale = cache_root.join(format!("{TRAINED_VERSION}.stale-{}", std::process::id()));
        if std::fs::rename(&dir, &stale).is_ok() {
            let _ = std::fs::remove_dir_all(&stale);
        }
    }
    super::publish(cache_root, TRAINED_VERSION, write_trained_to)?;
    if is_complete(&dir) {
        Ok(dir)
    } else {
        Err(CoreError::File {
            path: dir,
            msg: "holds an incomplete tiny model: delete it and retry".into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::Tokenizer;

    #[test]
    fn trained_tiny_model_has_every_deepseek_v2_feature_and_loads() {
        let root = tempfile::tempdir().unwrap();
        let dir = ensure_trained(root.path()).unwrap();
        let c = crate::ModelConfig::from_model_dir(&dir).unwrap();
        // The demo must exercise the real model's paths: q-LoRA, YaRN, a dense first layer,
        // then group-limited MoE with shared experts.
        assert!(c.q_lora_rank.is_some(), "q-LoRA");
        let cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
        assert_eq!(cfg["rope_scaling"]["type"], "yarn");
        assert_eq!(cfg["topk_method"], "group_limited_greedy");
        assert!(cfg["n_group"].as_u64().unwrap() > 1 && cfg["n_shared_experts"].as_u64() > Some(0));
        assert_eq!(cfg["first_k_dense_replace"], 1);
        assert!(cfg["num_hidden_layers"].as_u64().unwrap() > 1);
        let tok = Tokenizer::from_model_dir(&dir, c.bos_token_id).unwrap();
        let ids = tok.encode_prompt("The compiler checks ownership.").unwrap();
        assert_eq!(ids[0], 0, "BOS first");
        assert!(ids.len() < 10, "BPE merged nothing: {ids:?}");
        assert_eq!(tok.decode(&ids).unwrap(), "The compiler checks ownership.");
        // A second call reuses the dir; resolve_model_dir maps the names.
        assert_eq!(ensure_trained(root.path()).unwrap(), dir);
        assert_eq!(
            super::super::resolve_model_dir("tiny", root.path()).unwrap(),
            dir
        );
        let random = super::super::resolve_model_dir("tiny-random", root.path()).unwrap();
        assert_eq!(random, root.path().join(super::super::TINY_VERSION));
    }

    #[test]
    fn a_half_written_cache_dir_is_rewritten() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join(TRAINED_VERSION);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), b"{}").unwrap();
        std::fs::write(dir.join("model.safetensors"), b"").unwrap();
        assert!(!is_complete(&dir));
        assert_eq!(ensure_trained(root.path()).unwrap(), dir);
        assert!(is_complete(&dir));
    }

    #[test]
    fn trained_tiny_chat_template_writes_a_document_to_continue() {
        use crate::chat::{ChatMessage, ChatTemplate};
        let root = tempfile::tempdir().unwrap();
        let dir = ensure_trained(root.path()).unwrap();
        let t = ChatTemplate::from_model_dir(&dir, None).unwrap().unwrap();
        // A book-trained model has no turns: each message is a paragraph, and the reply is the
        // next one, so the generation prompt adds nothing.
        let msgs = [
            ChatMessage::new("system", "Rust is a systems language."),
            ChatMessage::new("user", "What is ownership?"),
        ];
        let text = t.render(&msgs, true).unwrap();
        assert_eq!(
            text,
            format!(
                "{}Rust is a systems language.\nWhat is ownership?\n",
                super::super::BOS
            )
        );
        assert!(t.render(&[ChatMessage::new("tool", "x")], true).is_err());
    }
}
