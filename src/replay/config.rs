//! `[replay]`: what the loop records for `spire-healer replay`, and for how
//! long. Checked as it is read (every problem of the section in one
//! message), so the section needs nothing from `Config::validate`.

use std::time::Duration;

use serde::Deserialize;

/// Recording of observation frames (see [`crate::replay`]).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RawReplayConfig")]
pub struct ReplayConfig {
    /// Record frames at all.
    pub enabled: bool,
    /// Ticks kept in memory before a symptom appears, written when one does:
    /// a replay starts from the healthy state before the incident.
    pub pre_roll: Duration,
    /// Ticks still recorded after the last symptom cleared (verifications
    /// and late effects of actions).
    pub post_roll: Duration,
    /// A frame whose JSON is larger than this is not recorded (counted as
    /// `spire_healer_replay_frames_total{outcome="oversize"}`).
    pub max_frame_bytes: usize,
    /// Most bytes of frames written per hour: a symptom that never clears
    /// would otherwise record every tick for the whole retention. Past it,
    /// frames are dropped until the next hour (`outcome="over_budget"`).
    pub max_bytes_per_hour: u64,
    /// Frames older than this are deleted, in batches.
    pub retention: Duration,
}

/// Longest pre- or post-roll: frames are replayed tick by tick, and an
/// hour of ticks already makes a long replay.
const MAX_ROLL: Duration = Duration::from_secs(3600);
/// Smallest useful frame bound: an empty frame is about 300 bytes.
const MIN_FRAME_BYTES: usize = 4 << 10;
/// Largest frame bound: one frame is serialized and held in memory whole.
const MAX_FRAME_BYTES: usize = 64 << 20;

impl Default for ReplayConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            pre_roll: Duration::from_secs(120),
            post_roll: Duration::from_secs(300),
            max_frame_bytes: 1 << 20,
            max_bytes_per_hour: 32 << 20,
            retention: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// `[replay]` as written, before its checks.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReplayConfig {
    #[serde(default = "d_enabled")]
    enabled: bool,
    #[serde(default = "d_pre_roll", with = "humantime_serde")]
    pre_roll: Duration,
    #[serde(default = "d_post_roll", with = "humantime_serde")]
    post_roll: Duration,
    #[serde(default = "d_max_frame_bytes")]
    max_frame_bytes: usize,
    #[serde(default = "d_max_bytes_per_hour")]
    max_bytes_per_hour: u64,
    #[serde(default = "d_retention", with = "humantime_serde")]
    retention: Duration,
}

fn d_enabled() -> bool {
    ReplayConfig::default().enabled
}
fn d_pre_roll() -> Duration {
    ReplayConfig::default().pre_roll
}
fn d_post_roll() -> Duration {
    ReplayConfig::default().post_roll
}
fn d_max_frame_bytes() -> usize {
    ReplayConfig::default().max_frame_bytes
}
fn d_max_bytes_per_hour() -> u64 {
    ReplayConfig::default().max_bytes_per_hour
}
fn d_retention() -> Duration {
    ReplayConfig::default().retention
}

impl TryFrom<RawReplayConfig> for ReplayConfig {
    type Error = String;

    /// Every problem of the section, joined.
    fn try_from(raw: RawReplayConfig) -> Result<Self, String> {
        let mut problems = Vec::new();
        for (name, roll) in [("pre_roll", raw.pre_roll), ("post_roll", raw.post_roll)] {
            if roll > MAX_ROLL {
                problems.push(format!(
                    "{name} = {} is longer than {}",
                    humantime::format_duration(roll),
                    humantime::format_duration(MAX_ROLL)
                ));
            }
        }
        if !(MIN_FRAME_BYTES..=MAX_FRAME_BYTES).contains(&raw.max_frame_bytes) {
            problems.push(format!(
                "max_frame_bytes = {} must be between {MIN_FRAME_BYTES} and {MAX_FRAME_BYTES}",
                raw.max_frame_bytes
            ));
        }
        if raw.max_bytes_per_hour < raw.max_frame_bytes as u64 {
            problems.push(format!(
                "max_bytes_per_hour = {} must be at least max_frame_bytes ({})",
                raw.max_bytes_per_hour, raw.max_frame_bytes
            ));
        }
        if raw.retention < Duration::from_secs(60) {
            problems.push(format!(
                "retention = {} must be at least 1m",
                humantime::format_duration(raw.retention)
            ));
        }
        if !problems.is_empty() {
            return Err(problems.join("; "));
        }
        Ok(Self {
            enabled: raw.enabled,
            pre_roll: raw.pre_roll,
            post_roll: raw.post_roll,
            max_frame_bytes: raw.max_frame_bytes,
            max_bytes_per_hour: raw.max_bytes_per_hour,
            retention: raw.retention,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ReplayConfig, String> {
        toml::from_str::<ReplayConfig>(text).map_err(|e| e.message().to_string())
    }

    #[test]
    fn defaults_and_overrides() {
        assert_eq!(parse("").unwrap(), ReplayConfig::default());
        let c = parse("enabled = false\npre_roll = \"30s\"\nretention = \"2d\"").unwrap();
        assert!(!c.enabled);
        assert_eq!(c.pre_roll, Duration::from_secs(30));
        assert_eq!(c.retention, Duration::from_secs(2 * 86_400));
        assert_eq!(c.post_roll, ReplayConfig::default().post_roll);
    }

    #[test]
    fn every_problem_is_named_at_once() {
        let e = parse("post_roll = \"2h\"\nmax_frame_bytes = 10\nretention = \"1s\"").unwrap_err();
        assert!(e.contains("post_roll = 2h is longer than 1h"), "{e}");
        assert!(e.contains("max_frame_bytes = 10 must be between"), "{e}");
        assert!(e.contains("retention = 1s must be at least 1m"), "{e}");
        let e = parse("max_frame_bytes = 1048576\nmax_bytes_per_hour = 1000").unwrap_err();
        assert!(
            e.contains("max_bytes_per_hour = 1000 must be at least"),
            "{e}"
        );
        assert!(parse("nope = 1").unwrap_err().contains("unknown field"));
    }

    #[test]
    fn the_configuration_file_reads_the_section_and_names_its_problems() {
        let c = crate::config::Config::parse("[replay]\npost_roll = \"1m\"\n", "t.toml").unwrap();
        assert_eq!(c.replay.post_roll, Duration::from_secs(60));
        assert_eq!(
            crate::config::Config::parse("", "t.toml").unwrap().replay,
            ReplayConfig::default()
        );
        let errors =
            crate::config::Config::parse("[replay]\nretention = \"1s\"\n", "t.toml").unwrap_err();
        let text = errors[0].to_string();
        assert!(
            text.contains("replay") && text.contains("retention = 1s"),
            "{text}"
        );
        // The example configuration spells out the defaults.
        let example = include_str!("../../deploy/examples/spire-healer.toml");
        let c = crate::config::Config::parse(example, "example").unwrap();
        assert_eq!(c.replay, ReplayConfig::default());
    }
}
