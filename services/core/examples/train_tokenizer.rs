//! Trains the project's byte-level BPE (`dsv2_core::tiny::train_tokenizer`) on a text file, one
//! training line per line: the tokenizer step of services/core/assets/tiny-trained/train.py.
//!
//! cargo run --release -p dsv2-core --example train_tokenizer -- TEXT VOCAB_SIZE OUT_DIR TEMPLATE_FILE

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [text, vocab, out, template] = args.as_slice() else {
        return Err("usage: train_tokenizer TEXT VOCAB_SIZE OUT_DIR TEMPLATE_FILE".into());
    };
    let text = std::fs::read_to_string(text)?;
    let vocab: usize = vocab.parse()?;
    let template = std::fs::read_to_string(template)?;
    let out = PathBuf::from(out);
    std::fs::create_dir_all(&out)?;
    dsv2_core::tiny::train_tokenizer(&out, vocab, text.lines(), template.trim_end())?;
    Ok(())
}
