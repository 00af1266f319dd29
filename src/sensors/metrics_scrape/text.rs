//! Parser for the Prometheus text exposition format, version 0.0.4.
//!
//! Grammar, one item per line (`\n`; a trailing `\r` is tolerated):
//!
//! ```text
//! line    = blank | comment | help | type | sample
//! help    = "#" [ws] "HELP" ws name [ws text]     text escapes: \\ \n \"
//! type    = "#" [ws] "TYPE" ws name ws kind [ws]  kind: counter gauge histogram summary untyped
//! comment = "#" anything else
//! sample  = [ws] name [ws] [ "{" labels "}" ] [ws] value [ ws timestamp ] [ws]
//!           (a blank is required between a bare name and its value)
//! labels  = [ label { "," label } [","] ]         blanks allowed around tokens
//! label   = lname [ws] "=" [ws] '"' escaped '"'   escapes: \\ \" \n
//! name    = [a-zA-Z_:][a-zA-Z0-9_:]*    lname = [a-zA-Z_][a-zA-Z0-9_]*
//! value   = float, NaN, +Inf, -Inf       timestamp = int64 milliseconds
//! ```
//!
//! Beyond the grammar it rejects what Prometheus rejects: a second `HELP` or
//! `TYPE` for one name, duplicate label names, the reserved `__name__`, a
//! histogram `_bucket` without a numeric `le`, a summary quantile without a
//! numeric `quantile`, and a bare sample of a histogram family.
//!
//! Robustness: one pass over the input, line by line, with no recursion and
//! no backtracking. Work is linear in the input (plus sorting each sample's
//! labels), memory is bounded by the input and the samples kept, and no
//! input makes it panic (fuzzed; see `fuzz/`). Timestamps are checked and
//! dropped: SPIRE and Envoy never send them, and staleness is judged by the
//! scrape time.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};

use crate::model::Sample;

/// Why an exposition did not parse: the 1-based line and a fixed reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct ParseError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong, from a fixed set of messages.
    pub reason: &'static str,
}

impl ParseError {
    /// Closed-set label for metrics: always `parse`.
    pub fn kind(&self) -> &'static str {
        "parse"
    }
}

/// Parses a whole exposition, keeping every sample.
///
/// # Errors
/// The first malformed line, as Prometheus fails a whole scrape on one.
pub fn parse(text: &str) -> Result<Vec<Sample>, ParseError> {
    parse_filtered(text, &|_| true)
}

/// Parses a whole exposition and keeps the samples whose metric name
/// satisfies `keep`. Every line is still checked; rejected samples cost no
/// allocation beyond their label list.
///
/// # Errors
/// The first malformed line.
pub fn parse_filtered(text: &str, keep: &dyn Fn(&str) -> bool) -> Result<Vec<Sample>, ParseError> {
    let mut parser = Parser::default();
    let mut out = Vec::new();
    for (index, raw) in text.split('\n').enumerate() {
        let line = raw.strip_suffix('\r').unwrap_or(raw);
        parser
            .line(line, keep, &mut out)
            .map_err(|reason| ParseError {
                line: index + 1,
                reason,
            })?;
    }
    Ok(out)
}

/// [`parse_filtered`] for raw bytes, as they come off the wire.
///
/// # Errors
/// Invalid UTF-8 (reported on the line where it starts) or the first
/// malformed line.
pub fn parse_bytes(body: &[u8], keep: &dyn Fn(&str) -> bool) -> Result<Vec<Sample>, ParseError> {
    match std::str::from_utf8(body) {
        Ok(text) => parse_filtered(text, keep),
        Err(e) => {
            let valid = body.get(..e.valid_up_to()).unwrap_or_default();
            Err(ParseError {
                line: 1 + valid.iter().filter(|&&b| b == b'\n').count(),
                reason: "invalid UTF-8",
            })
        }
    }
}

// === Parser state ===

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
    Summary,
    Untyped,
}

impl Kind {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "counter" => Kind::Counter,
            "gauge" => Kind::Gauge,
            "histogram" => Kind::Histogram,
            "summary" => Kind::Summary,
            "untyped" => Kind::Untyped,
            _ => return None,
        })
    }
}

/// Per-exposition state: which names already had `HELP` and `TYPE`.
#[derive(Default)]
struct Parser<'a> {
    types: HashMap<&'a str, Kind>,
    helps: HashSet<&'a str>,
}

type Labels<'a> = Vec<(&'a str, Cow<'a, str>)>;

impl<'a> Parser<'a> {
    fn line(
        &mut self,
        line: &'a str,
        keep: &dyn Fn(&str) -> bool,
        out: &mut Vec<Sample>,
    ) -> Result<(), &'static str> {
        let mut c = Cursor::new(line);
        c.skip_blank();
        match c.peek() {
            None => Ok(()),
            Some(b'#') => {
                c.bump();
                self.comment(c)
            }
            Some(_) => {
                if let Some(sample) = self.sample(c, keep)? {
                    out.push(sample);
                }
                Ok(())
            }
        }
    }

    /// After `#`: `HELP`, `TYPE`, or a plain comment.
    fn comment(&mut self, mut c: Cursor<'a>) -> Result<(), &'static str> {
        c.skip_blank();
        let keyword = c.take_while(|b| b != b' ' && b != b'\t');
        match keyword {
            "HELP" => {
                if !c.skip_blank() {
                    return Err("HELP line without a metric name");
                }
                let name = c.metric_name().ok_or("invalid metric name in HELP line")?;
                if !c.eof() && !c.skip_blank() {
                    return Err("invalid metric name in HELP line");
                }
                check_help_text(c.rest())?;
                if !self.helps.insert(name) {
                    return Err("second HELP line for a metric name");
                }
                Ok(())
            }
            "TYPE" => {
                if !c.skip_blank() {
                    return Err("TYPE line without a metric name");
                }
                let name = c.metric_name().ok_or("invalid metric name in TYPE line")?;
                if !c.skip_blank() {
                    return Err(if c.eof() {
                        "TYPE line without a type"
                    } else {
                        "invalid metric name in TYPE line"
                    });
                }
                let kind = c.take_while(|b| b != b' ' && b != b'\t');
                if kind.is_empty() {
                    return Err("TYPE line without a type");
                }
                let kind = Kind::parse(kind).ok_or("unknown metric type")?;
                c.skip_blank();
                if !c.eof() {
                    return Err("unexpected text after the type");
                }
                if self.types.insert(name, kind).is_some() {
                    return Err("second TYPE line for a metric name");
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn sample(
        &mut self,
        mut c: Cursor<'a>,
        keep: &dyn Fn(&str) -> bool,
    ) -> Result<Option<Sample>, &'static str> {
        let name = c.metric_name().ok_or("invalid metric name")?;
        let had_blank = c.skip_blank();
        let mut labels: Labels<'a> = Vec::new();
        if c.peek() == Some(b'{') {
            c.bump();
            labels = label_set(&mut c)?;
            c.skip_blank();
        } else if !had_blank && !c.eof() {
            return Err("invalid character in metric name");
        }
        let value = c.take_while(|b| b != b' ' && b != b'\t');
        if value.is_empty() {
            return Err("missing value");
        }
        let value = parse_value(value).ok_or("invalid value")?;
        if c.skip_blank() && !c.eof() {
            let ts = c.take_while(|b| b != b' ' && b != b'\t');
            ts.parse::<i64>().map_err(|_| "invalid timestamp")?;
            c.skip_blank();
        }
        if !c.eof() {
            return Err("unexpected text after the value");
        }

        labels.sort_unstable_by(|a, b| a.0.cmp(b.0));
        if labels.windows(2).any(|w| w[0].0 == w[1].0) {
            return Err("duplicate label name");
        }
        self.check_family(name, &labels)?;

        if !keep(name) {
            return Ok(None);
        }
        Ok(Some(Sample {
            name: name.to_string(),
            labels: labels
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.into_owned()))
                .collect(),
            value,
        }))
    }

    /// Histogram and summary rules, for families declared by `TYPE`.
    fn check_family(&self, name: &str, labels: &Labels<'_>) -> Result<(), &'static str> {
        let numeric = |label: &str| {
            labels
                .iter()
                .find(|(k, _)| *k == label)
                .and_then(|(_, v)| parse_value(v))
                .is_some()
        };
        match self.types.get(name) {
            Some(Kind::Histogram) => {
                return Err("histogram sample without a _bucket, _sum or _count suffix");
            }
            Some(Kind::Summary) if !numeric("quantile") => {
                return Err("summary quantile without a numeric quantile label");
            }
            Some(_) => return Ok(()),
            None => {}
        }
        if let Some(base) = name.strip_suffix("_bucket")
            && self.types.get(base) == Some(&Kind::Histogram)
            && !numeric("le")
        {
            return Err("histogram bucket without a numeric le label");
        }
        Ok(())
    }
}

/// After `{`: labels up to and including `}`.
fn label_set<'a>(c: &mut Cursor<'a>) -> Result<Labels<'a>, &'static str> {
    let mut labels = Vec::new();
    loop {
        c.skip_blank();
        match c.peek() {
            Some(b'}') => {
                c.bump();
                return Ok(labels);
            }
            None => return Err("unterminated label set"),
            Some(_) => {}
        }
        let name = c.label_name().ok_or("invalid label name")?;
        if name == "__name__" {
            return Err("reserved label name __name__");
        }
        c.skip_blank();
        if c.peek() != Some(b'=') {
            return Err("expected '=' after a label name");
        }
        c.bump();
        c.skip_blank();
        if c.peek() != Some(b'"') {
            return Err("label value must be quoted");
        }
        c.bump();
        labels.push((name, c.label_value()?));
        c.skip_blank();
        match c.peek() {
            Some(b',') => c.bump(),
            Some(b'}') => {}
            None => return Err("unterminated label set"),
            Some(_) => return Err("expected ',' or '}' after a label value"),
        }
    }
}

/// A float as Prometheus writes them: decimal or scientific, `NaN`,
/// `+Inf`, `-Inf` (case-insensitive, as Go's `ParseFloat`).
fn parse_value(s: &str) -> Option<f64> {
    // Rust's float parser is stricter than Go's only on hex and `_`
    // forms, which Prometheus clients never emit.
    let ok = s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'));
    if !ok {
        return None;
    }
    s.parse::<f64>().ok()
}

/// `HELP` text: any characters, escapes `\\`, `\n`, `\"` only.
fn check_help_text(text: &str) -> Result<(), &'static str> {
    let mut bytes = text.bytes();
    while let Some(b) = bytes.next() {
        if b == b'\\' && !matches!(bytes.next(), Some(b'\\' | b'n' | b'"')) {
            return Err("invalid escape sequence in HELP text");
        }
    }
    Ok(())
}

// === Cursor ===

/// A position in one line. Every stop is at an ASCII byte or the end, so
/// slicing never splits a UTF-8 sequence.
struct Cursor<'a> {
    s: &'a str,
    i: usize,
}

impl<'a> Cursor<'a> {
    fn new(s: &'a str) -> Self {
        Self { s, i: 0 }
    }

    fn peek(&self) -> Option<u8> {
        self.s.as_bytes().get(self.i).copied()
    }

    fn bump(&mut self) {
        self.i += 1;
    }

    fn eof(&self) -> bool {
        self.i >= self.s.len()
    }

    fn rest(&self) -> &'a str {
        self.s.get(self.i..).unwrap_or_default()
    }

    /// Skips spaces and tabs; returns whether any were skipped.
    fn skip_blank(&mut self) -> bool {
        let start = self.i;
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.i += 1;
        }
        self.i > start
    }

    /// Takes bytes while `more` holds. `more` must reject some ASCII byte
    /// or nothing at all, so the stop is a character boundary.
    fn take_while(&mut self, more: impl Fn(u8) -> bool) -> &'a str {
        let start = self.i;
        while self.peek().is_some_and(&more) {
            self.i += 1;
        }
        self.s.get(start..self.i).unwrap_or_default()
    }

    /// `[a-zA-Z_:][a-zA-Z0-9_:]*`.
    fn metric_name(&mut self) -> Option<&'a str> {
        match self.peek() {
            Some(b) if b.is_ascii_alphabetic() || b == b'_' || b == b':' => {}
            _ => return None,
        }
        Some(self.take_while(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':'))
    }

    /// `[a-zA-Z_][a-zA-Z0-9_]*`.
    fn label_name(&mut self) -> Option<&'a str> {
        match self.peek() {
            Some(b) if b.is_ascii_alphabetic() || b == b'_' => {}
            _ => return None,
        }
        Some(self.take_while(|b| b.is_ascii_alphanumeric() || b == b'_'))
    }

    /// After the opening quote: the value up to and including the closing
    /// quote, unescaped. Borrows when there is nothing to unescape.
    fn label_value(&mut self) -> Result<Cow<'a, str>, &'static str> {
        let start = self.i;
        let mut owned: Option<String> = None;
        let mut run = start;
        loop {
            match self.peek() {
                None => return Err("unterminated label value"),
                Some(b'"') => {
                    let tail = self.s.get(run..self.i).unwrap_or_default();
                    self.bump();
                    return Ok(match owned {
                        Some(mut s) => {
                            s.push_str(tail);
                            Cow::Owned(s)
                        }
                        None => Cow::Borrowed(tail),
                    });
                }
                Some(b'\\') => {
                    let unescaped = match self.s.as_bytes().get(self.i + 1) {
                        Some(b'\\') => '\\',
                        Some(b'"') => '"',
                        Some(b'n') => '\n',
                        None => return Err("unterminated label value"),
                        Some(_) => return Err("invalid escape sequence in label value"),
                    };
                    let s = owned.get_or_insert_with(String::new);
                    s.push_str(self.s.get(run..self.i).unwrap_or_default());
                    s.push(unescaped);
                    self.i += 2;
                    run = self.i;
                }
                Some(_) => self.bump(),
            }
        }
    }
}
