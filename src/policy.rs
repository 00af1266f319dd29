//! Remediation policy (TOML): thresholds, guards and per-symptom ladders.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::config::ConfigError;
use crate::model::SymptomKind;

/// The built-in policy, `policies/default.toml`.
pub const DEFAULT_POLICY: &str = include_str!("../policies/default.toml");

/// A whole policy.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Open/close conditions.
    pub thresholds: Thresholds,
    /// Guards on every action.
    pub guards: Guards,
    /// Ladder per symptom name.
    #[serde(default)]
    pub ladders: BTreeMap<String, Vec<Rung>>,
}

/// Open and close conditions of the symptoms.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Thresholds {
    /// Share of lifetime past which an unreplaced SVID is overdue.
    pub rotation_overdue_open: f64,
    /// Overdue closes below this share (a new serial).
    pub rotation_overdue_close: f64,
    /// Share of lifetime past which an SVID is expiring.
    pub expiring_open: f64,
    /// Expiring closes below this share.
    pub expiring_close: f64,
    /// How long the stream must be down before `agent_unreachable` opens.
    #[serde(with = "humantime_serde")]
    pub unreachable_after: Duration,
    /// Sensor views older than this are blind.
    #[serde(with = "humantime_serde")]
    pub max_staleness: Duration,
}

/// Guards applied to every step.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Guards {
    /// Default per-(target, actuator) cooldown.
    #[serde(with = "humantime_serde")]
    pub cooldown: Duration,
    /// Actions per rolling hour, all targets.
    pub budget_per_hour: u32,
}

/// One step of a ladder.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rung {
    /// Actuator instance name (`refetch` or a configured one).
    pub actuator: String,
    /// Hard timeout of the actuator run.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Window for the symptom to clear after the run.
    #[serde(with = "humantime_serde")]
    pub verify_within: Duration,
    /// Overrides the default cooldown for this rung.
    #[serde(default, with = "humantime_serde")]
    pub cooldown: Option<Duration>,
}

impl Policy {
    /// The built-in default.
    ///
    /// # Errors
    /// Never in a released build (a test parses it).
    pub fn builtin() -> Result<Self, ConfigError> {
        Self::from_toml(DEFAULT_POLICY, "policies/default.toml (built in)")
    }

    /// Parses policy TOML.
    ///
    /// # Errors
    /// [`ConfigError::Parse`].
    pub fn from_toml(text: &str, path: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_string(),
            reason: e.to_string().trim().replace('\n', " "),
        })
    }

    /// Reads a policy file.
    ///
    /// # Errors
    /// `Read` or `Parse`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// Every semantic problem (empty when valid).
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let t = &self.thresholds;
        for (name, v) in [
            ("rotation_overdue_open", t.rotation_overdue_open),
            ("rotation_overdue_close", t.rotation_overdue_close),
            ("expiring_open", t.expiring_open),
            ("expiring_close", t.expiring_close),
        ] {
            if !(v > 0.0 && v < 1.0) {
                out.push(format!("thresholds.{name} = {v} must be between 0 and 1"));
            }
        }
        if t.rotation_overdue_close > t.rotation_overdue_open {
            out.push(
                "thresholds.rotation_overdue_close must not exceed rotation_overdue_open".into(),
            );
        }
        if t.expiring_close > t.expiring_open {
            out.push("thresholds.expiring_close must not exceed expiring_open".into());
        }
        if t.max_staleness.is_zero() {
            out.push("thresholds.max_staleness must be greater than zero".into());
        }
        for (symptom, ladder) in &self.ladders {
            if SymptomKind::parse(symptom).is_none() {
                out.push(format!("ladders.{symptom}: unknown symptom"));
            }
            for (i, r) in ladder.iter().enumerate() {
                if r.timeout.is_zero() {
                    out.push(format!(
                        "ladders.{symptom}[{i}].timeout must be greater than zero"
                    ));
                }
                if r.verify_within.is_zero() {
                    out.push(format!(
                        "ladders.{symptom}[{i}].verify_within must be greater than zero"
                    ));
                }
            }
        }
        out
    }

    /// (symptom, rung index, actuator) for every rung.
    pub fn actuators_used(&self) -> impl Iterator<Item = (&str, usize, &str)> {
        self.ladders.iter().flat_map(|(s, l)| {
            l.iter()
                .enumerate()
                .map(move |(i, r)| (s.as_str(), i, r.actuator.as_str()))
        })
    }

    /// The ladder for a symptom (empty when none).
    pub fn ladder(&self, kind: SymptomKind) -> &[Rung] {
        self.ladders
            .get(kind.as_str())
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// The cooldown of a rung.
    pub fn cooldown(&self, rung: &Rung) -> Duration {
        rung.cooldown.unwrap_or(self.guards.cooldown)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_policy_is_valid() {
        let p = Policy::builtin().unwrap();
        assert!(p.problems().is_empty(), "{:?}", p.problems());
        for k in SymptomKind::ALL {
            assert!(!p.ladder(k).is_empty(), "no ladder for {k}");
        }
    }

    #[test]
    fn problems_are_listed() {
        let mut p = Policy::builtin().unwrap();
        p.thresholds.rotation_overdue_open = 1.5;
        p.thresholds.expiring_close = 0.99;
        p.ladders.insert("nonsense".into(), vec![]);
        let problems = p.problems();
        assert_eq!(problems.len(), 3, "{problems:?}");
    }

    #[test]
    fn unknown_policy_key_is_rejected() {
        let text = DEFAULT_POLICY.replace("[guards]", "[guards]\nbudget = 3");
        assert!(Policy::from_toml(&text, "p.toml").is_err());
    }
}
