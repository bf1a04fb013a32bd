//! ROUGE-1, ROUGE-2, ROUGE-L and ROUGE-Lsum that reproduce Google's Python
//! `rouge-score` 0.1.2 (`rouge_scorer.RougeScorer(["rouge1", "rouge2",
//! "rougeL", "rougeLsum"], use_stemmer=...)`), including its tokenizer and the
//! NLTK Porter stemmer it uses, plus a mean aggregator and a reader for
//! one-text-per-line files with `\n` escapes.
//!
//! Agreement with Python is checked value by value against outputs generated
//! by `tests/data/make_expected.py`.

mod io;
pub mod porter;
mod score;
mod tokenize;

pub use io::{EscapeError, RougeError, escape_line, read_lines_file, unescape_line};
pub use score::{RougeOptions, RougeScores, Score, aggregate, score};
pub use tokenize::tokenize;
