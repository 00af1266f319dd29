//! Maintenance windows (`[[maintenance]]`): times during which listed
//! actuator classes or actuators hold with `maintenance_window`.
//!
//! A window is either recurring, a 5-field cron expression (UTC) that
//! opens it plus how long it stays open, or one explicit interval between
//! two RFC 3339 instants. Whether a window is open is a pure function of
//! the policy and `now`, so `plan` stays pure and replay sees the same
//! windows.
//!
//! The cron dialect is the classic one (Vixie cron), evaluated in UTC
//! (no daylight-saving jumps: every day has 1440 minutes):
//!
//! ```text
//! minute hour day-of-month month day-of-week
//! 0-59   0-23 1-31         1-12  0-7 (0 and 7: Sunday)
//! ```
//!
//! Each field is `*`, a value, a range `a-b`, a step `*/n`, `a-b/n` or `a/n`
//! (from `a` to the field's end), or a comma-separated list of those.
//! Months may be named `jan`…`dec`, days `sun`…`sat` (any case). When both
//! day fields are restricted (neither starts with `*`), a day matches
//! either of them, as in cron. `@hourly`, `@daily` (`@midnight`),
//! `@weekly`, `@monthly` and `@yearly` (`@annually`) are accepted too.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer};

use super::Class;

/// The longest a recurring window may stay open: a longer hold is an
/// explicit `start`/`end` interval. Also bounds how far back
/// [`Schedule::last_fire`] looks.
pub const MAX_DURATION: Duration = Duration::from_secs(31 * 86_400);

const DAY: u64 = 86_400;

/// One `[[maintenance]]` entry.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaintenanceWindow {
    /// For people: named in logs and status (optional).
    #[serde(default)]
    pub name: Option<String>,
    /// Actuator classes held while the window is open.
    #[serde(default)]
    pub classes: Vec<Class>,
    /// Actuator instances held while the window is open (whatever their
    /// class).
    #[serde(default)]
    pub actuators: Vec<String>,
    /// When a recurring window opens (5-field cron, UTC).
    #[serde(default)]
    pub cron: Option<Cron>,
    /// How long a recurring window stays open.
    #[serde(default, with = "humantime_serde")]
    pub duration: Option<Duration>,
    /// Start of an explicit window (RFC 3339, inclusive).
    #[serde(default)]
    pub start: Option<Instant>,
    /// End of an explicit window (RFC 3339, exclusive).
    #[serde(default)]
    pub end: Option<Instant>,
}

impl MaintenanceWindow {
    /// Whether this window holds steps of `actuator` (of class `class`).
    pub fn holds(&self, class: Class, actuator: &str) -> bool {
        self.classes.contains(&class) || self.actuators.iter().any(|a| a == actuator)
    }

    /// When the window open at `now` closes; `None` when it is not open
    /// (or is invalid, which [`MaintenanceWindow::problems`] reports).
    pub fn open_until(&self, now: SystemTime) -> Option<SystemTime> {
        if let (Some(cron), Some(duration)) = (&self.cron, self.duration) {
            let schedule = cron.schedule.as_ref().ok()?;
            let duration = duration.min(MAX_DURATION);
            let fired = schedule.last_fire(now, duration)?;
            return Some(fired + duration);
        }
        let start = self.start.as_ref()?.at.as_ref().ok()?;
        let end = self.end.as_ref()?.at.as_ref().ok()?;
        (*start <= now && now < *end).then_some(*end)
    }

    /// Every problem as (field, reason).
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if self.classes.is_empty() && self.actuators.is_empty() {
            out.push((
                "classes",
                "the window holds nothing: list classes or actuators".to_string(),
            ));
        }
        let recurring = self.cron.is_some() || self.duration.is_some();
        let explicit = self.start.is_some() || self.end.is_some();
        match (recurring, explicit) {
            (true, true) => out.push((
                "cron",
                "set either cron and duration, or start and end, not both".into(),
            )),
            (false, false) => out.push((
                "cron",
                "set either cron and duration, or start and end".into(),
            )),
            (true, false) => {
                match &self.cron {
                    None => out.push(("cron", "needed with duration".into())),
                    Some(c) => {
                        if let Err(e) = &c.schedule {
                            out.push(("cron", format!("{:?}: {e}", c.text)));
                        }
                    }
                }
                match self.duration {
                    None => out.push(("duration", "needed with cron".into())),
                    Some(d) if d.is_zero() => {
                        out.push(("duration", "must be greater than zero".into()));
                    }
                    Some(d) if d > MAX_DURATION => out.push((
                        "duration",
                        format!(
                            "{} is longer than {}: use start and end",
                            humantime::format_duration(d),
                            humantime::format_duration(MAX_DURATION)
                        ),
                    )),
                    Some(_) => {}
                }
            }
            (false, true) => {
                for (field, v) in [("start", &self.start), ("end", &self.end)] {
                    match v {
                        None => out.push((field, "needed (both start and end)".into())),
                        Some(Instant { text, at: Err(e) }) => {
                            out.push((field, format!("{text:?}: {e}")));
                        }
                        Some(_) => {}
                    }
                }
                if let (Some(Ok(s)), Some(Ok(e))) = (
                    self.start.as_ref().map(|i| &i.at),
                    self.end.as_ref().map(|i| &i.at),
                ) && s >= e
                {
                    out.push(("end", "must be after start".into()));
                }
            }
        }
        out
    }
}

// === Instant ===

/// An RFC 3339 instant as written, and what it parsed to.
#[derive(Debug, Clone, PartialEq)]
pub struct Instant {
    /// As written.
    pub text: String,
    /// The instant, or why it does not parse.
    pub at: Result<SystemTime, String>,
}

impl<'de> Deserialize<'de> for Instant {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let at = parse_rfc3339(&text);
        Ok(Self { text, at })
    }
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.frac]` with `Z` or a `±HH:MM` offset.
///
/// # Errors
/// What is wrong with the text.
pub fn parse_rfc3339(text: &str) -> Result<SystemTime, String> {
    const NEEDS: &str = "expected an RFC 3339 instant such as 2025-01-31T02:00:00Z";
    // RFC 3339 allows a lowercase `t` and `z`; nothing else is a letter.
    let upper = text.trim().to_ascii_uppercase();
    let s = upper.as_str();
    if let Some(base) = s.strip_suffix('Z') {
        return humantime::parse_rfc3339_weak(base).map_err(|e| format!("{e}: {NEEDS}"));
    }
    let split = s.len().checked_sub(6).filter(|i| s.is_char_boundary(*i));
    let Some((base, offset)) = split.map(|i| s.split_at(i)) else {
        return Err(NEEDS.into());
    };
    let b = offset.as_bytes();
    let digits = |i: usize| b[i].is_ascii_digit() && b[i + 1].is_ascii_digit();
    if !(matches!(b[0], b'+' | b'-') && digits(1) && b[3] == b':' && digits(4)) {
        return Err(format!("needs a UTC offset (Z or ±HH:MM): {NEEDS}"));
    }
    let hh = u64::from(b[1] - b'0') * 10 + u64::from(b[2] - b'0');
    let mm = u64::from(b[4] - b'0') * 10 + u64::from(b[5] - b'0');
    if hh > 23 || mm > 59 {
        return Err(format!("offset {offset} is out of range"));
    }
    let local = humantime::parse_rfc3339_weak(base).map_err(|e| format!("{e}: {NEEDS}"))?;
    let offset_d = Duration::from_secs(hh * 3600 + mm * 60);
    // Local time = UTC + offset, so UTC = local - offset.
    let utc = if b[0] == b'+' {
        local.checked_sub(offset_d)
    } else {
        local.checked_add(offset_d)
    };
    utc.ok_or_else(|| format!("{text:?} is out of range"))
}

// === Cron ===

/// A cron expression as written, and what it parsed to.
#[derive(Debug, Clone, PartialEq)]
pub struct Cron {
    /// As written.
    pub text: String,
    /// The schedule, or why it does not parse.
    pub schedule: Result<Schedule, String>,
}

impl<'de> Deserialize<'de> for Cron {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let schedule = Schedule::parse(&text);
        Ok(Self { text, schedule })
    }
}

/// A parsed 5-field cron schedule (UTC), one bit per allowed value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    minutes: u64,
    hours: u32,
    /// Bits 1..=31.
    days_of_month: u32,
    /// Bits 1..=12.
    months: u16,
    /// Bits 0..=6, Sunday = 0.
    days_of_week: u8,
    /// The day-of-month field starts with `*`.
    dom_star: bool,
    /// The day-of-week field starts with `*`.
    dow_star: bool,
}

const MONTHS: [&str; 12] = [
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];
const DAYS: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

/// One field's bounds and names (the name at index `i` is `first + i`).
struct Field {
    name: &'static str,
    min: u32,
    max: u32,
    names: &'static [&'static str],
}

const FIELDS: [Field; 5] = [
    Field {
        name: "minute",
        min: 0,
        max: 59,
        names: &[],
    },
    Field {
        name: "hour",
        min: 0,
        max: 23,
        names: &[],
    },
    Field {
        name: "day of month",
        min: 1,
        max: 31,
        names: &[],
    },
    Field {
        name: "month",
        min: 1,
        max: 12,
        names: &MONTHS,
    },
    // 7 is Sunday too; folded onto 0 after parsing.
    Field {
        name: "day of week",
        min: 0,
        max: 7,
        names: &DAYS,
    },
];

impl Schedule {
    /// Parses a 5-field expression (or an `@` macro).
    ///
    /// # Errors
    /// Which field is wrong and why.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let expanded = match text.to_ascii_lowercase().as_str() {
            "@hourly" => "0 * * * *",
            "@daily" | "@midnight" => "0 0 * * *",
            "@weekly" => "0 0 * * 0",
            "@monthly" => "0 0 1 * *",
            "@yearly" | "@annually" => "0 0 1 1 *",
            s if s.starts_with('@') => {
                return Err(format!(
                    "unknown macro {text}: use @hourly, @daily, @weekly, @monthly or @yearly"
                ));
            }
            _ => text,
        };
        let parts: Vec<&str> = expanded.split_whitespace().collect();
        if parts.len() != 5 {
            return Err(format!(
                "has {} fields; expected 5: minute hour day-of-month month day-of-week",
                parts.len()
            ));
        }
        let mut bits = [0u64; 5];
        for (i, (part, field)) in parts.iter().zip(&FIELDS).enumerate() {
            bits[i] = parse_field(part, field)?;
        }
        // Sunday is 0 and 7.
        let dow = bits[4] | (bits[4] >> 7);
        Ok(Self {
            minutes: bits[0],
            hours: bits[1] as u32,
            days_of_month: bits[2] as u32,
            months: bits[3] as u16,
            days_of_week: (dow & 0x7f) as u8,
            dom_star: parts[2].starts_with('*'),
            dow_star: parts[4].starts_with('*'),
        })
    }

    /// Whether the schedule fires on this day (`days` since 1970-01-01).
    fn fires_on(&self, days: i64) -> bool {
        let (_, month, dom) = civil_from_days(days);
        // 1970-01-01 was a Thursday (4).
        let dow = (days + 4).rem_euclid(7) as u32;
        if self.months & (1 << month) == 0 {
            return false;
        }
        let dom_ok = self.days_of_month & (1 << dom) != 0;
        let dow_ok = self.days_of_week & (1 << dow) != 0;
        if self.dom_star || self.dow_star {
            dom_ok && dow_ok
        } else {
            dom_ok || dow_ok
        }
    }

    /// The latest minute the schedule fires at, at or before `now` and
    /// less than `within` before it; `None` when there is none (or `now`
    /// is before 1970).
    pub fn last_fire(&self, now: SystemTime, within: Duration) -> Option<SystemTime> {
        let secs = now.duration_since(UNIX_EPOCH).ok()?.as_secs();
        let within = within.min(MAX_DURATION).as_secs();
        let today = (secs / DAY) as i64;
        let minute_now = ((secs % DAY) / 60) as u32;
        for back in 0..=(within / DAY + 1) as i64 {
            let day = today - back;
            if day < 0 {
                return None;
            }
            if !self.fires_on(day) {
                continue;
            }
            let last = if back == 0 { minute_now } else { 1439 };
            let Some(minute) = self.last_minute_of_day(last) else {
                continue;
            };
            let fired = day as u64 * DAY + u64::from(minute) * 60;
            // Strictly within: a window of `within` that opened exactly
            // `within` ago has just closed.
            return (secs - fired < within).then(|| UNIX_EPOCH + Duration::from_secs(fired));
        }
        None
    }

    /// The latest minute of a day (0..1440) at or before `last` that the
    /// hour and minute fields allow.
    fn last_minute_of_day(&self, last: u32) -> Option<u32> {
        let (last_h, last_m) = (last / 60, last % 60);
        (0..=last_h).rev().find_map(|h| {
            if self.hours & (1 << h) == 0 {
                return None;
            }
            let top = if h == last_h { last_m } else { 59 };
            (0..=top)
                .rev()
                .find(|m| self.minutes & (1 << m) != 0)
                .map(|m| h * 60 + m)
        })
    }
}

/// One comma-separated field as a bit set.
fn parse_field(text: &str, f: &Field) -> Result<u64, String> {
    let mut bits = 0u64;
    for item in text.split(',') {
        let bad = |why: String| format!("{} field {text:?}: {why}", f.name);
        let (range, step) = match item.split_once('/') {
            Some((r, s)) => {
                let step: u32 = s
                    .parse()
                    .map_err(|_| bad(format!("step {s:?} is not a number")))?;
                if step == 0 {
                    return Err(bad("a step must be at least 1".into()));
                }
                (r, step)
            }
            None => (item, 1),
        };
        let (lo, hi) = if range == "*" {
            (f.min, f.max)
        } else if let Some((a, b)) = range.split_once('-') {
            let (a, b) = (value(a, f).map_err(bad)?, value(b, f).map_err(bad)?);
            if a > b {
                return Err(bad(format!(
                    "range {range} runs backwards (write it as two ranges)"
                )));
            }
            (a, b)
        } else {
            let a = value(range, f).map_err(bad)?;
            // `a/n`: from a to the end of the field.
            (a, if item.contains('/') { f.max } else { a })
        };
        for v in (lo..=hi).step_by(step as usize) {
            bits |= 1 << v;
        }
    }
    Ok(bits)
}

/// One value of a field: a number or a name.
fn value(text: &str, f: &Field) -> Result<u32, String> {
    if text.is_empty() {
        return Err("empty value".into());
    }
    let lower = text.to_ascii_lowercase();
    if let Some(i) = f.names.iter().position(|n| *n == lower) {
        // The first name is the field's first value: `jan` = 1, `sun` = 0.
        return Ok(f.min + i as u32);
    }
    let v: u32 = text.parse().map_err(|_| {
        if f.names.is_empty() {
            format!("{text:?} is not a number")
        } else {
            format!(
                "{text:?} is not a number or a name ({})",
                f.names.join(", ")
            )
        }
    })?;
    if v < f.min || v > f.max {
        return Err(format!("{v} is outside {}-{}", f.min, f.max));
    }
    Ok(v)
}

/// (year, month 1..=12, day 1..=31) of a day count since 1970-01-01 (the
/// proleptic Gregorian calendar; Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests;
