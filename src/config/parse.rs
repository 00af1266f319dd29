//! Reading a configuration file so that every problem is reported at once.
//!
//! The text is first parsed to a TOML document: a syntax error stops there
//! (reported with its line, column and a caret diagram, one per line of the
//! file, since the parser's recovery can misread what follows on the same
//! line). Each section, each element of an array section (`[[agents]]`, …)
//! and each `[actuators.<name>]` is then deserialized on its own. When one
//! fails, the key at fault is reported with its dotted path and position,
//! dropped, and the rest deserialized again, so one bad value never hides
//! another; what cannot be told apart (a missing required key, a section
//! of the wrong type) drops that element only.

use std::collections::BTreeMap;
use std::ops::Range;

use serde::de::DeserializeOwned;
use toml::Spanned;
use toml::de::{DeTable, DeValue, ValueDeserializer};

use super::{Config, ConfigError, Location};

/// The top-level keys of [`Config`], in file order of the docs.
pub(super) const SECTIONS: [&str; 17] = [
    "supervisor",
    "database",
    "role",
    "leadership",
    "http",
    "agents",
    "servers",
    "actuators",
    "policy_file",
    "probes",
    "cert_files",
    "envoys",
    "api",
    "telemetry",
    "replay",
    "kubernetes",
    "slo",
];

/// The text of a configuration file and the name it is reported under.
#[derive(Clone, Copy)]
pub(super) struct Source<'i> {
    pub(super) text: &'i str,
    pub(super) path: &'i str,
}

impl Source<'_> {
    /// 1-based line and column (in characters) of a byte offset.
    pub(super) fn locate(&self, offset: usize) -> Location {
        let offset = offset.min(self.text.len());
        let before = &self.text[..floor_char_boundary(self.text, offset)];
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        Location {
            line: before.matches('\n').count() + 1,
            column: before[line_start..].chars().count() + 1,
        }
    }

    /// The line under `at` with a caret under its column, for a terminal:
    ///
    /// ```text
    ///   |
    /// 3 | tick_interval = "1s
    ///   |                 ^
    /// ```
    fn diagram(&self, at: Location) -> String {
        let content = self.text.split('\n').nth(at.line - 1).unwrap_or("");
        let content = content.strip_suffix('\r').unwrap_or(content);
        let gutter = " ".repeat(at.line.to_string().len());
        format!(
            "{gutter} |\n{} | {content}\n{gutter} | {}^",
            at.line,
            " ".repeat(at.column - 1)
        )
    }

    /// A syntax error, placed at `span`.
    fn syntax_error(&self, span: Option<Range<usize>>, reason: &str) -> ConfigError {
        // At the end of the file: the end of its last line, not the empty
        // "line" after the final newline.
        let at = span.map(|s| {
            let end = self.text.len();
            let start = if s.start >= end && self.text.ends_with('\n') {
                end - 1
            } else {
                s.start
            };
            self.locate(start)
        });
        ConfigError::Parse {
            path: self.path.to_string(),
            at,
            reason: reason.trim().to_string(),
            diagram: at.map(|at| self.diagram(at)).unwrap_or_default(),
        }
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// Parses `text` as a TOML document.
///
/// # Errors
/// Every syntax error, at most one per line, in file order.
pub(super) fn document<'i>(src: Source<'i>) -> Result<Spanned<DeTable<'i>>, Vec<ConfigError>> {
    let (root, mut errors) = DeTable::parse_recoverable(src.text);
    if errors.is_empty() {
        return Ok(root);
    }
    errors.sort_by_key(|e| e.span().map_or(usize::MAX, |s| s.start));
    let mut seen_lines = std::collections::BTreeSet::new();
    Err(errors
        .iter()
        .filter(|e| seen_lines.insert(e.span().map(|s| src.locate(s.start).line)))
        .map(|e| src.syntax_error(e.span(), e.message()))
        .collect())
}

/// A single TOML error (as the whole-file readers of the policy get it).
pub(super) fn single_error(src: Source<'_>, e: &toml::de::Error) -> ConfigError {
    src.syntax_error(e.span(), e.message())
}

/// What the sections of a document deserialized to.
pub(super) struct Sections {
    /// The configuration, without what failed (defaults in its place).
    pub(super) config: Config,
    /// Every problem found.
    pub(super) errors: Vec<ConfigError>,
    /// For each array section, the index in the file of each element kept
    /// in `config` (elements that failed are left out).
    pub(super) kept: BTreeMap<&'static str, Vec<usize>>,
}

/// Deserializes each section of `root` on its own, collecting every problem.
pub(super) fn sections(src: Source<'_>, root: &DeTable<'_>) -> Sections {
    let mut p = Reader {
        src,
        errors: Vec::new(),
    };
    for (key, _) in root.iter() {
        if !SECTIONS.contains(&key.get_ref().as_ref()) {
            p.errors.push(ConfigError::UnknownKey {
                key: key.get_ref().to_string(),
                at: Some(src.locate(key.span().start)),
                expected: SECTIONS.join(", "),
            });
        }
    }
    let get = |name: &str| root.get(name);
    let mut kept = BTreeMap::new();
    let (agents, i) = p.array("agents", get("agents"));
    kept.insert("agents", i);
    let (servers, i) = p.array("servers", get("servers"));
    kept.insert("servers", i);
    let (probes, i) = p.array("probes", get("probes"));
    kept.insert("probes", i);
    let (cert_files, i) = p.array("cert_files", get("cert_files"));
    kept.insert("cert_files", i);
    let (envoys, i) = p.array("envoys", get("envoys"));
    kept.insert("envoys", i);
    let config = Config {
        supervisor: get("supervisor")
            .and_then(|v| p.value("supervisor", v))
            .unwrap_or_default(),
        database: p.database(get("database")),
        role: get("role")
            .and_then(|v| p.value("role", v))
            .unwrap_or_default(),
        leadership: get("leadership").and_then(|v| p.value("leadership", v)),
        http: get("http")
            .and_then(|v| p.value("http", v))
            .unwrap_or_default(),
        agents,
        servers,
        actuators: p.map("actuators", get("actuators")),
        policy_file: get("policy_file").and_then(|v| p.value("policy_file", v)),
        probes,
        cert_files,
        envoys,
        api: get("api").and_then(|v| p.value("api", v)),
        telemetry: p.telemetry(get("telemetry")),
        replay: get("replay")
            .and_then(|v| p.value("replay", v))
            .unwrap_or_default(),
        kubernetes: get("kubernetes").and_then(|v| p.value("kubernetes", v)),
        slo: get("slo")
            .and_then(|v| p.value("slo", v))
            .unwrap_or_default(),
    };
    Sections {
        config,
        errors: p.errors,
        kept,
    }
}

struct Reader<'i> {
    src: Source<'i>,
    errors: Vec<ConfigError>,
}

impl<'i> Reader<'i> {
    /// Deserializes one value. On failure the key at fault is reported and
    /// dropped and the rest tried again; `None` when the value as a whole
    /// cannot be read (wrong type, a required key missing or bad).
    fn value<T: DeserializeOwned>(&mut self, key: &str, value: &Spanned<DeValue<'i>>) -> Option<T> {
        let mut value = value.clone();
        let mut dropped: Vec<String> = Vec::new();
        // Each round drops one key, so this ends.
        loop {
            let err = match T::deserialize(ValueDeserializer::from(value.clone())) {
                Ok(v) => return Some(v),
                Err(e) => e,
            };
            let culprit = match value.get_ref() {
                DeValue::Table(t) => culprit(t, &err),
                _ => None,
            };
            let Some(name) = culprit else {
                match missing_field(err.message()) {
                    // A key dropped above was required: already reported.
                    Some(field) if dropped.iter().any(|d| d == field) => {}
                    Some(field) => self.errors.push(ConfigError::Value {
                        key: format!("{key}.{field}"),
                        at: Some(self.src.locate(value.span().start)),
                        reason: "is required".into(),
                    }),
                    None => {
                        let at = err.span().unwrap_or_else(|| value.span());
                        let inner = path_to(&value, at.start);
                        self.errors.push(ConfigError::Value {
                            key: format!("{key}{inner}"),
                            at: Some(self.src.locate(at.start)),
                            reason: reason(err.message()),
                        });
                    }
                }
                return None;
            };
            let DeValue::Table(table) = value.get_mut() else {
                return None;
            };
            // `culprit` only names keys of this table.
            let (k, v) = table.iter().find(|(k, _)| k.get_ref().as_ref() == name)?;
            let at = err.span().unwrap_or_else(|| v.span());
            let path = format!("{key}.{name}{}", path_to(v, at.start));
            let error = match unknown_field(err.message()) {
                Some(expected) => ConfigError::UnknownKey {
                    key: path,
                    at: Some(self.src.locate(k.span().start)),
                    expected: expected.to_string(),
                },
                None => ConfigError::Value {
                    key: path,
                    at: Some(self.src.locate(at.start)),
                    reason: reason(err.message()),
                },
            };
            self.errors.push(error);
            *table = std::mem::take(table)
                .into_iter()
                .filter(|(k, _)| k.get_ref().as_ref() != name)
                .collect();
            dropped.push(name);
        }
    }

    /// An array of tables (`[[name]]`): each element on its own. Returns
    /// the elements that deserialized and their indexes in the file.
    fn array<T: DeserializeOwned>(
        &mut self,
        name: &str,
        value: Option<&Spanned<DeValue<'i>>>,
    ) -> (Vec<T>, Vec<usize>) {
        let mut items = Vec::new();
        let mut indexes = Vec::new();
        match value.map(|v| (v, v.get_ref())) {
            None => {}
            Some((_, DeValue::Array(elements))) => {
                for (i, element) in elements.iter().enumerate() {
                    if let Some(item) = self.value(&format!("{name}[{i}]"), element) {
                        items.push(item);
                        indexes.push(i);
                    }
                }
            }
            Some((v, other)) => self.errors.push(ConfigError::Value {
                key: name.to_string(),
                at: Some(self.src.locate(v.span().start)),
                reason: format!(
                    "must be an array of tables ([[{name}]] sections), not a {}",
                    other.type_str()
                ),
            }),
        }
        (items, indexes)
    }

    /// `[database]`, with `[database.retention]` read on its own, so that a
    /// bad key of the sub-table is reported under its own dotted key and
    /// position and hides no other.
    fn database(&mut self, value: Option<&Spanned<DeValue<'i>>>) -> super::DatabaseConfig {
        let Some(value) = value else {
            return super::DatabaseConfig::default();
        };
        let mut rest = value.clone();
        let mut retention = None;
        if let DeValue::Table(table) = rest.get_mut() {
            *table = std::mem::take(table)
                .into_iter()
                .filter_map(|(k, v)| {
                    if k.get_ref().as_ref() == "retention" {
                        retention = Some(v);
                        None
                    } else {
                        Some((k, v))
                    }
                })
                .collect();
        }
        let mut database: super::DatabaseConfig = self.value("database", &rest).unwrap_or_default();
        if let Some(r) = retention.and_then(|v| self.value("database.retention", &v)) {
            database.retention = r;
        }
        database
    }

    /// `[telemetry]`: each sub-table on its own, so that a bad key of
    /// `[telemetry.otlp]` is reported under its own dotted key and hides
    /// no other.
    fn telemetry(&mut self, value: Option<&Spanned<DeValue<'i>>>) -> super::TelemetryConfig {
        const KEYS: [&str; 1] = ["otlp"];
        match value.map(|v| (v, v.get_ref())) {
            None => super::TelemetryConfig::default(),
            Some((_, DeValue::Table(t))) => {
                for (k, _) in t.iter() {
                    if !KEYS.contains(&k.get_ref().as_ref()) {
                        self.errors.push(ConfigError::UnknownKey {
                            key: format!("telemetry.{}", k.get_ref()),
                            at: Some(self.src.locate(k.span().start)),
                            expected: KEYS.join(", "),
                        });
                    }
                }
                super::TelemetryConfig {
                    otlp: t.get("otlp").and_then(|v| self.value("telemetry.otlp", v)),
                }
            }
            Some((v, other)) => {
                self.errors.push(ConfigError::Value {
                    key: "telemetry".into(),
                    at: Some(self.src.locate(v.span().start)),
                    reason: format!(
                        "must be a table ([telemetry.otlp]), not a {}",
                        other.type_str()
                    ),
                });
                super::TelemetryConfig::default()
            }
        }
    }

    /// A table of named entries (`[actuators.<name>]`): each on its own.
    fn map<T: DeserializeOwned>(
        &mut self,
        name: &str,
        value: Option<&Spanned<DeValue<'i>>>,
    ) -> BTreeMap<String, T> {
        let mut out = BTreeMap::new();
        match value.map(|v| (v, v.get_ref())) {
            None => {}
            Some((_, DeValue::Table(entries))) => {
                for (k, v) in entries.iter() {
                    let k = k.get_ref().to_string();
                    if let Some(item) = self.value(&format!("{name}.{k}"), v) {
                        out.insert(k, item);
                    }
                }
            }
            Some((v, other)) => self.errors.push(ConfigError::Value {
                key: name.to_string(),
                at: Some(self.src.locate(v.span().start)),
                reason: format!(
                    "must be a table of named entries ([{name}.<name>] sections), not a {}",
                    other.type_str()
                ),
            }),
        }
        out
    }
}

/// The key of `table` that `err` is about: the one whose key or value
/// holds the error's position, or the one an unknown-field message names
/// (internally tagged enums lose positions).
fn culprit(table: &DeTable<'_>, err: &toml::de::Error) -> Option<String> {
    if let Some(span) = err.span() {
        let hit = table
            .iter()
            .find(|(k, v)| covers(&k.span(), span.start) || path_to_inner(v, span.start).is_some());
        if let Some((k, _)) = hit {
            return Some(k.get_ref().to_string());
        }
    }
    let message = err.message();
    if let Some(name) = message
        .strip_prefix("unknown field `")
        .and_then(|r| r.split('`').next())
    {
        return table
            .iter()
            .any(|(k, _)| k.get_ref().as_ref() == name)
            .then(|| name.to_string());
    }
    // `invalid type: integer `3`, expected …`: the one key holding that value.
    let unexpected = message
        .strip_prefix("invalid type: ")
        .or_else(|| message.strip_prefix("invalid value: "))?
        .split(", expected")
        .next()?;
    let mut holding = table
        .iter()
        .filter(|(_, v)| holds(v.get_ref(), unexpected))
        .map(|(k, _)| k.get_ref().to_string());
    let first = holding.next()?;
    holding.next().is_none().then_some(first)
}

/// Whether `value` is, or contains, the scalar serde renders as `unexpected`
/// (`integer `3``, `string "x"`, `boolean `true``).
fn holds(value: &DeValue<'_>, unexpected: &str) -> bool {
    match value {
        DeValue::Integer(i) => unexpected == format!("integer `{}`", i.as_str()),
        DeValue::String(s) => unexpected == format!("string {:?}", s.as_ref()),
        DeValue::Boolean(b) => unexpected == format!("boolean `{b}`"),
        DeValue::Array(a) => a.iter().any(|v| holds(v.get_ref(), unexpected)),
        DeValue::Table(t) => t.iter().any(|(_, v)| holds(v.get_ref(), unexpected)),
        _ => false,
    }
}

fn covers(span: &Range<usize>, at: usize) -> bool {
    span.start <= at && (at < span.end || span.is_empty() && at == span.start)
}

/// The path (`.key`, `[i]`) from `value` down to the innermost value that
/// holds `at`; empty when none below `value` does.
fn path_to(value: &Spanned<DeValue<'_>>, at: usize) -> String {
    path_to_inner(value, at).unwrap_or_default()
}

fn path_to_inner(value: &Spanned<DeValue<'_>>, at: usize) -> Option<String> {
    let below = match value.get_ref() {
        DeValue::Table(t) => t.iter().find_map(|(k, v)| {
            let key = k.get_ref();
            if covers(&k.span(), at) {
                return Some(format!(".{key}"));
            }
            path_to_inner(v, at).map(|rest| format!(".{key}{rest}"))
        }),
        DeValue::Array(a) => a
            .iter()
            .enumerate()
            .find_map(|(i, v)| path_to_inner(v, at).map(|rest| format!("[{i}]{rest}"))),
        _ => None,
    };
    below.or_else(|| covers(&value.span(), at).then(String::new))
}

/// `missing field `name`` → `name`.
fn missing_field(message: &str) -> Option<&str> {
    message.strip_prefix("missing field `")?.split('`').next()
}

/// `unknown field `x`, expected …` → what was expected.
fn unknown_field(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("unknown field `")?;
    let (_, rest) = rest.split_once('`')?;
    Some(
        rest.trim_start_matches(',')
            .trim()
            .trim_start_matches("expected ")
            .trim_start_matches("one of "),
    )
}

/// serde's message, with what a duration looks like when one was expected
/// and without our Rust type names.
fn reason(message: &str) -> String {
    let message = message.trim();
    if message.ends_with("expected a duration") {
        format!("{message} such as \"500ms\", \"30s\" or \"5m\"")
    } else if let Some((head, _)) = message.split_once("expected struct ") {
        format!("{head}expected a table")
    } else if let Some((head, _)) = message.split_once("expected internally tagged enum") {
        format!("{head}expected a table with a `type`")
    } else {
        message.to_string()
    }
}

/// The byte offset in the file of `key` (`agents[0].address`,
/// `actuators.restart.argv`): of its value when it is there, else of its
/// nearest enclosing table or element that is.
pub(super) fn offset_of(root: &Spanned<DeTable<'_>>, key: &str) -> Option<usize> {
    let mut segments = Vec::new();
    for part in key.split('.') {
        let (name, mut rest) = part.split_once('[').map_or((part, ""), |(n, r)| (n, r));
        segments.push(Segment::Key(name));
        while let Some((index, after)) = rest.split_once(']') {
            segments.push(Segment::Index(index.parse().ok()?));
            rest = after.trim_start_matches('[');
        }
    }
    let (first, rest) = segments.split_first()?;
    let Segment::Key(first) = first else {
        return None;
    };
    let mut value = root.get_ref().get(*first)?;
    for segment in rest {
        let next = match (segment, value.get_ref()) {
            (Segment::Key(k), DeValue::Table(t)) => t.get(*k),
            (Segment::Index(i), DeValue::Array(a)) => a.get(*i),
            _ => None,
        };
        match next {
            Some(v) => value = v,
            None => break,
        }
    }
    Some(value.span().start)
}

enum Segment<'a> {
    Key(&'a str),
    Index(usize),
}

/// `agents[1]…` of a configuration without the elements that failed to
/// deserialize → the index in the file.
pub(super) fn file_key(key: &str, kept: &BTreeMap<&'static str, Vec<usize>>) -> String {
    for (section, indexes) in kept {
        let Some(rest) = key.strip_prefix(section).and_then(|r| r.strip_prefix('[')) else {
            continue;
        };
        let Some((index, rest)) = rest.split_once(']') else {
            continue;
        };
        if let Some(i) = index.parse::<usize>().ok().and_then(|i| indexes.get(i)) {
            return format!("{section}[{i}]{rest}");
        }
    }
    key.to_string()
}

/// Whether a problem under `a` and one under `b` are about the same thing:
/// the same key, or one inside the other.
pub(super) fn overlaps(a: &str, b: &str) -> bool {
    let inside = |x: &str, y: &str| {
        x.strip_prefix(y)
            .is_some_and(|r| r.is_empty() || r.starts_with('.') || r.starts_with('['))
    };
    inside(a, b) || inside(b, a)
}
