//! Config errors with their place: file, line, column and the key defined there.

use std::ops::Range;
use std::path::{Path, PathBuf};

/// Where in the config file something is.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Location {
    /// 1-based line (0 when unknown).
    pub line: usize,
    /// 1-based column (0 when unknown).
    pub col: usize,
    /// The dotted key, e.g. `routes.http.upstream`.
    pub key: String,
}

/// A configuration error.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{}: cannot read config: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file was read but is wrong.
    #[error("{}", fmt_invalid(file.as_deref(), at, message))]
    Invalid {
        /// The file, if the config came from one.
        file: Option<PathBuf>,
        /// Where.
        at: Location,
        /// What is wrong.
        message: String,
    },
}

fn fmt_invalid(file: Option<&Path>, at: &Location, message: &str) -> String {
    let file = file.map_or_else(
        || "<built-in config>".to_string(),
        |f| f.display().to_string(),
    );
    let mut s = file;
    if at.line > 0 {
        s.push_str(&format!(":{}:{}", at.line, at.col));
    }
    s.push_str(": ");
    if !at.key.is_empty() {
        s.push_str(&format!("{}: ", at.key));
    }
    s.push_str(message);
    s
}

impl ConfigError {
    /// An error about the value at `at` in the file `file`.
    pub fn at(file: Option<&Path>, at: &Location, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            file: file.map(Path::to_path_buf),
            at: at.clone(),
            message: message.into(),
        }
    }
}

/// 1-based line and column of a byte offset, plus the dotted key being defined there.
pub(crate) fn locate(text: &str, span: Range<usize>) -> Location {
    let start = span.start.min(text.len());
    let before = &text[..start];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = before[line_start..].chars().count() + 1;
    Location {
        line,
        col,
        key: key_at(text, line_start),
    }
}

/// The dotted key of the assignment on the line starting at `line_start`, with its table.
fn key_at(text: &str, line_start: usize) -> String {
    let line = text[line_start..].lines().next().unwrap_or("");
    let table = text[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string());
    let trimmed = line.trim_start();
    let key = if trimmed.starts_with('[') {
        return trimmed
            .trim_end()
            .trim_matches(|c| c == '[' || c == ']')
            .trim()
            .to_string();
    } else {
        trimmed
            .split('=')
            .next()
            .filter(|_| trimmed.contains('='))
            .map(|k| k.trim().trim_matches('"').to_string())
    };
    match (table, key) {
        (Some(t), Some(k)) => format!("{t}.{k}"),
        (None, Some(k)) => k,
        (Some(t), None) => t,
        (None, None) => String::new(),
    }
}
