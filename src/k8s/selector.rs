//! Label selectors as operators write them (`app=web,tier!=cache`,
//! `env in (prod,staging)`, `canary`, `!legacy`), parsed so a configured
//! selector is checked when the config loads and matched here as the API
//! server matches it. The string sent to the API server is the canonical
//! rendering of the parsed form, never the raw text.

use std::collections::BTreeMap;
use std::fmt;

/// One requirement of a label selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    /// `key=value` or `key==value`.
    Equals(String, String),
    /// `key!=value`: the label is absent or has another value.
    NotEquals(String, String),
    /// `key in (a,b)`.
    In(String, Vec<String>),
    /// `key notin (a,b)`: absent, or none of the values.
    NotIn(String, Vec<String>),
    /// `key`: the label is present.
    Exists(String),
    /// `!key`: the label is absent.
    DoesNotExist(String),
}

/// A parsed label selector: every requirement must hold (AND).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LabelSelector {
    requirements: Vec<Requirement>,
}

/// Why a label selector does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    /// Nothing to select by: an empty selector would match every pod.
    #[error("the selector is empty (it would match every pod)")]
    Empty,
    /// A requirement that is not `k=v`, `k==v`, `k!=v`, `k in (…)`,
    /// `k notin (…)`, `k` or `!k`.
    #[error("{0:?} is not a label requirement (k=v, k!=v, k in (a,b), k notin (a,b), k or !k)")]
    Syntax(String),
    /// A key or value that Kubernetes would refuse.
    #[error("{0:?} is not a valid label key or value")]
    Invalid(String),
    /// Parentheses that do not close.
    #[error("unbalanced parentheses in {0:?}")]
    Unbalanced(String),
}

impl LabelSelector {
    /// Parses `text`: requirements separated by commas (commas inside
    /// `( )` belong to a set).
    ///
    /// # Errors
    /// [`SelectorError`] naming the first requirement at fault; an empty
    /// selector is an error (it would match every pod).
    pub fn parse(text: &str) -> Result<Self, SelectorError> {
        let mut parts = Vec::new();
        let mut depth = 0usize;
        let mut start = 0;
        for (i, c) in text.char_indices() {
            match c {
                '(' => depth += 1,
                ')' => {
                    depth = depth
                        .checked_sub(1)
                        .ok_or_else(|| SelectorError::Unbalanced(text.to_string()))?;
                }
                ',' if depth == 0 => {
                    parts.push(&text[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        if depth != 0 {
            return Err(SelectorError::Unbalanced(text.to_string()));
        }
        parts.push(&text[start..]);
        let mut requirements = Vec::new();
        for part in parts {
            let part = part.trim();
            if part.is_empty() {
                if text.trim().is_empty() {
                    return Err(SelectorError::Empty);
                }
                return Err(SelectorError::Syntax(text.to_string()));
            }
            requirements.push(requirement(part)?);
        }
        Ok(Self { requirements })
    }

    /// From equality pairs (`k8s:pod-label:K:V` selectors); `None` when
    /// there are none.
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Option<Self> {
        Self::from_requirements(
            pairs
                .into_iter()
                .map(|(k, v)| Requirement::Equals(k.to_string(), v.to_string()))
                .collect(),
        )
    }

    /// From requirements; `None` when there are none (an empty selector
    /// would match every pod).
    pub fn from_requirements(requirements: Vec<Requirement>) -> Option<Self> {
        (!requirements.is_empty()).then_some(Self { requirements })
    }

    /// The requirements, in the order written.
    pub fn requirements(&self) -> &[Requirement] {
        &self.requirements
    }

    /// Whether a pod with `labels` is selected.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| match r {
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            Requirement::NotEquals(k, v) => labels.get(k) != Some(v),
            Requirement::In(k, vs) => labels.get(k).is_some_and(|l| vs.contains(l)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|l| !vs.contains(l)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::DoesNotExist(k) => !labels.contains_key(k),
        })
    }
}

/// The canonical form the API server parses (`labelSelector=`).
impl fmt::Display for LabelSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.requirements.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            match r {
                Requirement::Equals(k, v) => write!(f, "{k}={v}")?,
                Requirement::NotEquals(k, v) => write!(f, "{k}!={v}")?,
                Requirement::In(k, vs) => write!(f, "{k} in ({})", vs.join(","))?,
                Requirement::NotIn(k, vs) => write!(f, "{k} notin ({})", vs.join(","))?,
                Requirement::Exists(k) => f.write_str(k)?,
                Requirement::DoesNotExist(k) => write!(f, "!{k}")?,
            }
        }
        Ok(())
    }
}

fn requirement(part: &str) -> Result<Requirement, SelectorError> {
    let syntax = || SelectorError::Syntax(part.to_string());
    if let Some(key) = part.strip_prefix('!') {
        return Ok(Requirement::DoesNotExist(key_of(key.trim())?));
    }
    for (op, make) in [
        (
            "!=",
            Requirement::NotEquals as fn(String, String) -> Requirement,
        ),
        ("==", Requirement::Equals),
        ("=", Requirement::Equals),
    ] {
        if let Some((k, v)) = part.split_once(op) {
            return Ok(make(key_of(k.trim())?, value_of(v.trim())?));
        }
    }
    if let Some(open) = part.find('(') {
        let head = part[..open].trim();
        let body = part[open + 1..].strip_suffix(')').ok_or_else(syntax)?;
        let values = body
            .split(',')
            .map(|v| value_of(v.trim()))
            .collect::<Result<Vec<_>, _>>()?;
        if values.iter().any(String::is_empty) {
            return Err(syntax());
        }
        let mut words = head.split_whitespace();
        let (Some(key), Some(op), None) = (words.next(), words.next(), words.next()) else {
            return Err(syntax());
        };
        let key = key_of(key)?;
        return match op {
            "in" => Ok(Requirement::In(key, values)),
            "notin" => Ok(Requirement::NotIn(key, values)),
            _ => Err(syntax()),
        };
    }
    if part.contains(char::is_whitespace) {
        return Err(syntax());
    }
    Ok(Requirement::Exists(key_of(part)?))
}

/// A label key: an optional DNS-subdomain prefix and `/`, then a name of
/// at most 63 characters of alphanumerics, `-`, `_`, `.`, beginning and
/// ending with an alphanumeric.
fn key_of(key: &str) -> Result<String, SelectorError> {
    let invalid = || SelectorError::Invalid(key.to_string());
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix
        && (p.is_empty()
            || p.len() > 253
            || !p
                .split('.')
                .all(|l| !l.is_empty() && l.len() <= 63 && dns_label(l)))
    {
        return Err(invalid());
    }
    if name.is_empty() || !label_value(name) {
        return Err(invalid());
    }
    Ok(key.to_string())
}

/// A label value: empty, or as a key's name part.
fn value_of(value: &str) -> Result<String, SelectorError> {
    if value.is_empty() || label_value(value) {
        Ok(value.to_string())
    } else {
        Err(SelectorError::Invalid(value.to_string()))
    }
}

fn label_value(s: &str) -> bool {
    let alnum = |c: char| c.is_ascii_alphanumeric();
    s.len() <= 63
        && s.chars().next().is_some_and(alnum)
        && s.chars().last().is_some_and(alnum)
        && s.chars()
            .all(|c| alnum(c) || c == '-' || c == '_' || c == '.')
}

fn dns_label(s: &str) -> bool {
    let ok = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    s.chars().next().is_some_and(ok)
        && s.chars().last().is_some_and(ok)
        && s.chars().all(|c| ok(c) || c == '-')
}

/// Whether `ns` is a valid namespace name (an RFC 1123 DNS label).
pub fn valid_namespace(ns: &str) -> bool {
    !ns.is_empty() && ns.len() <= 63 && dns_label(ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parses_every_form_and_renders_it_back() {
        let s = LabelSelector::parse(
            " app = web ,tier==front,track!=canary, env in (prod, staging),zone notin (z1),ha,!legacy",
        )
        .unwrap();
        assert_eq!(
            s.to_string(),
            "app=web,tier=front,track!=canary,env in (prod,staging),zone notin (z1),ha,!legacy"
        );
        assert_eq!(s.requirements().len(), 7);
        // The canonical form parses to the same selector.
        assert_eq!(LabelSelector::parse(&s.to_string()).unwrap(), s);
        let prefixed = LabelSelector::parse("app.kubernetes.io/name=web").unwrap();
        assert_eq!(
            prefixed.requirements(),
            [Requirement::Equals(
                "app.kubernetes.io/name".into(),
                "web".into()
            )]
        );
    }

    #[test]
    fn refuses_what_the_api_server_would() {
        for (text, want) in [
            ("", SelectorError::Empty),
            ("  ", SelectorError::Empty),
            ("app=web,", SelectorError::Syntax("app=web,".into())),
            ("app=we b", SelectorError::Invalid("we b".into())),
            ("-app=web", SelectorError::Invalid("-app".into())),
            (
                "Bad_Prefix/app=web",
                SelectorError::Invalid("Bad_Prefix/app".into()),
            ),
            (
                "env in (a,b",
                SelectorError::Unbalanced("env in (a,b".into()),
            ),
            (
                "env in a,b)",
                SelectorError::Unbalanced("env in a,b)".into()),
            ),
            (
                "env within (a)",
                SelectorError::Syntax("env within (a)".into()),
            ),
            ("env in ()", SelectorError::Syntax("env in ()".into())),
            ("app web", SelectorError::Syntax("app web".into())),
        ] {
            assert_eq!(LabelSelector::parse(text), Err(want), "{text:?}");
        }
        let long = format!("app={}", "x".repeat(64));
        assert!(matches!(
            LabelSelector::parse(&long),
            Err(SelectorError::Invalid(_))
        ));
    }

    #[test]
    fn matches_as_kubernetes_does() {
        let pod = labels(&[("app", "web"), ("env", "prod")]);
        let cases = [
            ("app=web", true),
            ("app=api", false),
            ("app=web,env=prod", true),
            ("app=web,env=dev", false),
            ("env!=dev", true),
            ("missing!=x", true),
            ("env in (dev,prod)", true),
            ("env in (dev)", false),
            ("missing in (x)", false),
            ("env notin (dev)", true),
            ("missing notin (x)", true),
            ("env notin (prod)", false),
            ("app", true),
            ("missing", false),
            ("!missing", true),
            ("!app", false),
        ];
        for (text, want) in cases {
            let s = LabelSelector::parse(text).unwrap();
            assert_eq!(s.matches(&pod), want, "{text}");
        }
    }

    #[test]
    fn pairs_become_equalities() {
        assert_eq!(LabelSelector::from_pairs([]), None);
        let s = LabelSelector::from_pairs([("app", "web"), ("tier", "x")]).unwrap();
        assert_eq!(s.to_string(), "app=web,tier=x");
    }

    #[test]
    fn namespaces_are_dns_labels() {
        assert!(valid_namespace("apps"));
        assert!(valid_namespace("team-a1"));
        assert!(!valid_namespace(""));
        assert!(!valid_namespace("Apps"));
        assert!(!valid_namespace("-a"));
        assert!(!valid_namespace(&"a".repeat(64)));
    }
}
