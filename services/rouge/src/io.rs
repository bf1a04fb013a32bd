//! Reading prediction/reference files: one text per line, with backslash
//! escapes so a text can contain newlines (needed for ROUGE-Lsum).
//!
//! Format: lines are separated by `\n` (a trailing `\r` is removed, so CRLF
//! files work; a final line break does not start an extra text). Inside a
//! line, `\n` (backslash, n) is a newline, `\r` a carriage return and `\\` a
//! backslash. Any other backslash sequence is an error rather than being
//! passed through, so that a text like `\nabla` cannot silently turn into a
//! newline plus "abla": writers must escape every backslash (`escape_line`).

use std::path::{Path, PathBuf};

/// Errors from reading ROUGE input files.
#[derive(Debug, thiserror::Error)]
pub enum RougeError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: {source}")]
    BadEscape {
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        #[source]
        source: EscapeError,
    },
}

/// A malformed backslash escape inside one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EscapeError {
    #[error("column {column}: unknown escape \\{found} (write \\\\ for a literal backslash)")]
    Unknown {
        /// 1-based column, in characters, of the backslash.
        column: usize,
        found: char,
    },
    #[error("column {column}: line ends in a lone backslash (write \\\\ for a literal backslash)")]
    Dangling { column: usize },
}

/// Reads a file with one text per line, decoding `\n`, `\r` and `\\` escapes.
pub fn read_lines_file(path: impl AsRef<Path>) -> Result<Vec<String>, RougeError> {
    let path = path.as_ref();
    let content = std::fs::read_to_string(path).map_err(|source| RougeError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    // `str::lines` splits on '\n', strips one trailing '\r' per line and
    // yields no empty text after a final line break.
    content
        .lines()
        .enumerate()
        .map(|(i, line)| {
            unescape_line(line).map_err(|source| RougeError::BadEscape {
                path: path.to_path_buf(),
                line: i + 1,
                source,
            })
        })
        .collect()
}

/// Decodes the escapes of one line.
pub fn unescape_line(line: &str) -> Result<String, EscapeError> {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().enumerate();
    while let Some((col, c)) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some((_, 'n')) => out.push('\n'),
            Some((_, 'r')) => out.push('\r'),
            Some((_, '\\')) => out.push('\\'),
            Some((_, found)) => {
                return Err(EscapeError::Unknown {
                    column: col + 1,
                    found,
                });
            }
            None => return Err(EscapeError::Dangling { column: col + 1 }),
        }
    }
    Ok(out)
}

/// Encodes a text as one line of the format `read_lines_file` reads.
pub fn escape_line(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn reads_escapes_and_crlf() {
        let mut f = tempfile::NamedTempFile::new().expect("tempfile");
        f.write_all(b"first line\\nsecond\r\n\nback\\\\slash \\\\n\nlast")
            .expect("write");
        let got = read_lines_file(f.path()).expect("read");
        assert_eq!(got, ["first line\nsecond", "", "back\\slash \\n", "last"]);
    }

    #[test]
    fn trailing_newline_adds_no_text() {
        let mut f = tempfile::NamedTempFile::new().expect("tempfile");
        f.write_all(b"a\nb\n").expect("write");
        assert_eq!(read_lines_file(f.path()).expect("read"), ["a", "b"]);
    }

    #[test]
    fn bad_escapes_are_errors() {
        let mut f = tempfile::NamedTempFile::new().expect("tempfile");
        f.write_all("ok\nαβ \\t tab\n".as_bytes()).expect("write");
        match read_lines_file(f.path()) {
            Err(RougeError::BadEscape { line, source, .. }) => {
                assert_eq!(line, 2);
                assert_eq!(
                    source,
                    EscapeError::Unknown {
                        column: 4,
                        found: 't'
                    }
                );
            }
            other => panic!("expected BadEscape, got {other:?}"),
        }
        assert_eq!(
            unescape_line("ends with \\"),
            Err(EscapeError::Dangling { column: 11 })
        );
    }

    #[test]
    fn missing_file_is_io_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = read_lines_file(dir.path().join("nope.txt")).unwrap_err();
        assert!(matches!(err, RougeError::Io { .. }));
    }

    #[test]
    fn escape_round_trips() {
        for t in ["", "a\nb", "\\n literal", "x\r\ny\\", "plain 北京"] {
            assert_eq!(unescape_line(&escape_line(t)).expect("unescape"), t);
        }
    }
}
