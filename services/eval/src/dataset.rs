//! Reading summarization datasets (CNN/DailyMail layout: `article` and `highlights` columns)
//! from parquet, JSON Lines or CSV, with errors that name the file and the line or row.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;

use crate::error::{EvalError, Result};

/// The input column (the article to summarize).
pub const INPUT_COLUMN: &str = "article";
/// The reference column (the human summary).
pub const REFERENCE_COLUMN: &str = "highlights";

/// One article with its reference summary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sample {
    pub article: String,
    pub highlights: String,
    /// Where the sample came from: 1-based line (CSV, JSONL) or row (parquet) in the file.
    pub line: u64,
}

/// File formats we read, chosen by extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Parquet,
    Jsonl,
    Csv,
}

impl Format {
    pub fn from_path(path: &Path) -> Result<Format> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .unwrap_or_default();
        match ext.as_str() {
            "parquet" => Ok(Format::Parquet),
            "jsonl" | "ndjson" => Ok(Format::Jsonl),
            "csv" => Ok(Format::Csv),
            _ => Err(EvalError::file(
                path,
                "unknown dataset format: the name must end in .parquet, .jsonl (or .ndjson) or .csv",
            )),
        }
    }
}

/// Reads at most `limit` samples (all when None) from `path`, in file order.
pub fn load_samples(path: &Path, limit: Option<usize>) -> Result<Vec<Sample>> {
    let limit = limit.unwrap_or(usize::MAX);
    let samples = match Format::from_path(path)? {
        Format::Parquet => read_parquet(path, limit)?,
        Format::Jsonl => read_jsonl(path, limit)?,
        Format::Csv => read_csv(path, limit)?,
    };
    if samples.is_empty() && limit > 0 {
        return Err(EvalError::file(path, "the dataset has no samples"));
    }
    Ok(samples)
}

fn read_jsonl(path: &Path, limit: usize) -> Result<Vec<Sample>> {
    let f = File::open(path).map_err(|e| EvalError::io(path, e))?;
    let mut out = Vec::new();
    for (i, line) in BufReader::new(f).lines().enumerate() {
        if out.len() >= limit {
            break;
        }
        let lineno = i as u64 + 1;
        let line = line.map_err(|e| EvalError::data(path, lineno, e.to_string()))?;
        if line.trim().is_empty() {
            continue; // a trailing blank line is common and harmless
        }
        let v: serde_json::Value = serde_json::from_str(&line)
            .map_err(|e| EvalError::data(path, lineno, format!("not valid JSON: {e}")))?;
        let obj = v
            .as_object()
            .ok_or_else(|| EvalError::data(path, lineno, "expected a JSON object"))?;
        let field = |name: &str| -> Result<String> {
            match obj.get(name) {
                Some(serde_json::Value::String(s)) => Ok(s.clone()),
                Some(other) => Err(EvalError::data(
                    path,
                    lineno,
                    format!("field `{name}` must be a string, found {other}"),
                )),
                None => Err(EvalError::data(
                    path,
                    lineno,
                    format!(
                        "missing field `{name}` (need `{INPUT_COLUMN}` and `{REFERENCE_COLUMN}`)"
                    ),
                )),
            }
        };
        out.push(Sample {
            article: field(INPUT_COLUMN)?,
            highlights: field(REFERENCE_COLUMN)?,
            line: lineno,
        });
    }
    Ok(out)
}

fn read_csv(path: &Path, limit: usize) -> Result<Vec<Sample>> {
    let bytes = std::fs::read(path).map_err(|e| EvalError::io(path, e))?;
    let lines = LineIndex::new(&bytes);
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(true)
        .from_reader(&bytes[..]);
    let headers = rdr
        .headers()
        .map_err(|e| csv_error(path, &lines, e))?
        .clone();
    if headers.is_empty() || (headers.len() == 1 && headers[0].is_empty()) {
        return Err(EvalError::file(path, "the file is empty (no header row)"));
    }
    let col = |name: &str| -> Result<usize> {
        headers.iter().position(|h| h == name).ok_or_else(|| {
            EvalError::data(
                path,
                1,
                format!(
                    "the header has no `{name}` column (found: {}); need `{INPUT_COLUMN}` and `{REFERENCE_COLUMN}`",
                    headers.iter().collect::<Vec<_>>().join(", ")
                ),
            )
        })
    };
    let (ai, hi) = (col(INPUT_COLUMN)?, col(REFERENCE_COLUMN)?);
    let mut out = Vec::new();
    for rec in rdr.records() {
        if out.len() >= limit {
            break;
        }
        let rec = rec.map_err(|e| csv_error(path, &lines, e))?;
        let line = lines.line_of_record(rec.position());
        let get = |i: usize, name: &str| -> Result<String> {
            rec.get(i).map(str::to_string).ok_or_else(|| {
                EvalError::data(
                    path,
                    line,
                    format!(
                        "row has {} fields, so no `{name}` (column {} of the header)",
                        rec.len(),
                        i + 1
                    ),
                )
            })
        };
        out.push(Sample {
            article: get(ai, INPUT_COLUMN)?,
            highlights: get(hi, REFERENCE_COLUMN)?,
            line,
        });
    }
    Ok(out)
}

/// Line numbers of a CSV file's records. The csv crate's own `Position::line` is off by one
/// after CRLF line ends (what Python's csv module writes) and ignores skipped blank lines, so we
/// count newlines up to the record's byte offset ourselves.
pub(crate) struct LineIndex<'a> {
    bytes: &'a [u8],
    /// Byte offsets of every '\n'.
    newlines: Vec<usize>,
}

impl<'a> LineIndex<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        let newlines = bytes
            .iter()
            .enumerate()
            .filter_map(|(i, &b)| (b == b'\n').then_some(i))
            .collect();
        LineIndex { bytes, newlines }
    }

    /// 1-based line where the record at this position starts (0 when unknown).
    pub(crate) fn line_of_record(&self, pos: Option<&csv::Position>) -> u64 {
        let Some(pos) = pos else { return 0 };
        // The reported offset can point at the line end before the record: skip it.
        let mut b = pos.byte() as usize;
        while b < self.bytes.len() && matches!(self.bytes[b], b'\r' | b'\n') {
            b += 1;
        }
        self.newlines.partition_point(|&n| n < b) as u64 + 1
    }
}

/// A csv crate error with its line when it has one.
pub(crate) fn csv_error(path: &Path, lines: &LineIndex, e: csv::Error) -> EvalError {
    let line = e.position().map(|p| lines.line_of_record(Some(p)));
    match (line, e.into_kind()) {
        (_, csv::ErrorKind::Io(io)) => EvalError::io(path, io),
        (Some(l), kind) => EvalError::data(path, l, format!("{kind:?}")),
        (None, kind) => EvalError::file(path, format!("{kind:?}")),
    }
}

fn read_parquet(path: &Path, limit: usize) -> Result<Vec<Sample>> {
    let f = File::open(path).map_err(|e| EvalError::io(path, e))?;
    if f.metadata().map(|m| m.len()).unwrap_or(0) == 0 {
        return Err(EvalError::file(path, "the file is empty"));
    }
    let reader = SerializedFileReader::new(f)
        .map_err(|e| EvalError::file(path, format!("not a readable parquet file: {e}")))?;
    let schema = reader.metadata().file_metadata().schema_descr_ptr();
    let names: Vec<String> = schema
        .root_schema()
        .get_fields()
        .iter()
        .map(|f| f.name().to_string())
        .collect();
    for need in [INPUT_COLUMN, REFERENCE_COLUMN] {
        if !names.iter().any(|n| n == need) {
            return Err(EvalError::file(
                path,
                format!(
                    "no `{need}` column (found: {}); need `{INPUT_COLUMN}` and `{REFERENCE_COLUMN}`",
                    names.join(", ")
                ),
            ));
        }
    }
    let rows = reader
        .get_row_iter(None)
        .map_err(|e| EvalError::file(path, format!("cannot read rows: {e}")))?;
    let mut out = Vec::new();
    for (i, row) in rows.enumerate() {
        if out.len() >= limit {
            break;
        }
        let rowno = i as u64 + 1;
        let row = row.map_err(|e| EvalError::data(path, rowno, format!("row {rowno}: {e}")))?;
        let (mut article, mut highlights) = (None, None);
        for (name, field) in row.get_column_iter() {
            let slot = match name.as_str() {
                INPUT_COLUMN => &mut article,
                REFERENCE_COLUMN => &mut highlights,
                _ => continue,
            };
            match field {
                Field::Str(s) => *slot = Some(s.clone()),
                other => {
                    return Err(EvalError::data(
                        path,
                        rowno,
                        format!("row {rowno}: column `{name}` must be a string, found {other}"),
                    ));
                }
            }
        }
        let missing = |name: &str| {
            EvalError::data(path, rowno, format!("row {rowno}: no value for `{name}`"))
        };
        out.push(Sample {
            article: article.ok_or_else(|| missing(INPUT_COLUMN))?,
            highlights: highlights.ok_or_else(|| missing(REFERENCE_COLUMN))?,
            line: rowno,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines_of(data: &str) -> Vec<u64> {
        let idx = LineIndex::new(data.as_bytes());
        let mut r = csv::ReaderBuilder::new()
            .has_headers(false)
            .flexible(true)
            .from_reader(data.as_bytes());
        r.records()
            .map(|rec| idx.line_of_record(rec.unwrap().position()))
            .collect()
    }

    #[test]
    fn record_lines_with_lf_crlf_quotes_and_blank_lines() {
        assert_eq!(lines_of("a,b\n\"x\ny\",1\nz,2\n"), [1, 2, 4]);
        // The csv crate alone says 1, 1, 2 here.
        assert_eq!(lines_of("a,b\r\nc,d\r\ne,f"), [1, 2, 3]);
        assert_eq!(lines_of("\n\na,b\nc,d\n"), [3, 4]);
    }
}
