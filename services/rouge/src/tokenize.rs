//! rouge-score's default tokenizer (`rouge_score/tokenize.py`): lower-case,
//! keep only runs of ASCII `[a-z0-9]`, optionally Porter-stem tokens longer
//! than three characters.

use crate::porter;

/// Tokenizes `text` exactly like `rouge_score.tokenize.tokenize(text, stemmer)`.
///
/// Python does `text.lower()`, replaces every run of characters outside
/// `[a-z0-9]` with a space, splits on whitespace, stems tokens with
/// `len > 3` when a stemmer is given, and keeps tokens matching
/// `^[a-z0-9]+$`. So all non-ASCII letters (accents, CJK, emoji) are
/// separators and vanish; "café" gives "caf". Rust's `to_lowercase` uses the
/// same full Unicode case mapping as Python's `str.lower`, which matters for
/// the two non-ASCII characters that lower-case to ASCII: U+0130 'İ' -> "i"
/// + U+0307, and U+212A KELVIN SIGN -> "k".
pub fn tokenize(text: &str, use_stemmer: bool) -> Vec<String> {
    let lowered = text.to_lowercase();
    lowered
        .split(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit()))
        .filter(|t| !t.is_empty())
        .map(|t| {
            // rouge-score: "Only stem words more than 3 characters long."
            // Tokens are ASCII here, so byte length == Python len().
            if use_stemmer && t.len() > 3 {
                porter::stem(t)
            } else {
                t.to_string()
            }
        })
        // The final VALID_TOKEN_RE filter; a stem of an [a-z0-9] token is
        // again [a-z0-9], so this only drops empty strings.
        .filter(|t| {
            !t.is_empty()
                && t.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::tokenize;

    #[test]
    fn punctuation_unicode_and_case() {
        assert_eq!(
            tokenize("Hello, WORLD! It's 3.14 -- café Straße 北京", false),
            ["hello", "world", "it", "s", "3", "14", "caf", "stra", "e"]
        );
        // U+0130 lower-cases to "i\u{307}" and U+212A (Kelvin) to "k".
        assert_eq!(
            tokenize("\u{130}stanbul 5\u{212A}", false),
            ["i", "stanbul", "5k"]
        );
        assert!(tokenize("  \n\t 。！ ", false).is_empty());
    }

    #[test]
    fn stems_only_long_tokens() {
        // "runs" (4 chars) is stemmed, "ran"/"was" (3 chars) are not.
        assert_eq!(
            tokenize("Running runs ran was generously", true),
            ["run", "run", "ran", "was", "gener"]
        );
    }
}
