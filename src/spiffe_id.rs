//! SPIFFE IDs and trust domains, built only through `parse`.
//!
//! The rules are those of the SPIFFE ID standard (`spiffe/spiffe`
//! `standards/SPIFFE-ID.md`) as go-spiffe enforces them:
//!
//! - the scheme is exactly `spiffe://` (lower case);
//! - the trust domain is non-empty, at most 255 bytes, of `[a-z0-9._-]`, with
//!   no userinfo (`@`) and no port (`:`);
//! - the path is empty (a root ID) or `/`-separated segments of
//!   `[A-Za-z0-9._-]`, none empty, `.` or `..`, and no trailing `/`;
//! - no query or fragment; at most 2048 bytes in all.
//!
//! Nothing is normalised: a string that is not already canonical is refused,
//! so equal IDs are equal strings.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

const SCHEME: &str = "spiffe://";
const MAX_ID_LEN: usize = 2048;
const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// Why a string is not a SPIFFE ID or trust domain name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    /// The input is empty.
    #[error("the SPIFFE ID is empty")]
    Empty,
    /// The whole ID is longer than 2048 bytes.
    #[error("the SPIFFE ID is {len} bytes long; the limit is 2048")]
    TooLong {
        /// Length of the input in bytes.
        len: usize,
    },
    /// The input does not start with `spiffe://`.
    #[error("a SPIFFE ID must start with \"spiffe://\" (lower case)")]
    WrongScheme,
    /// Nothing between `spiffe://` and the path.
    #[error("the SPIFFE ID has no trust domain")]
    MissingTrustDomain,
    /// The trust domain name is longer than 255 bytes.
    #[error("the trust domain name is {len} bytes long; the limit is 255")]
    TrustDomainTooLong {
        /// Length of the trust domain name in bytes.
        len: usize,
    },
    /// A URI was given where a bare trust domain name is expected.
    #[error("a trust domain is a bare name such as \"example.org\", not a URI")]
    TrustDomainWithScheme,
    /// The trust domain holds a character outside `[a-z0-9._-]`.
    #[error(
        "the trust domain contains {ch:?}; only lower-case letters, digits, '.', '-' and '_' are allowed"
    )]
    TrustDomainChar {
        /// The first offending character.
        ch: char,
    },
    /// The authority has a userinfo part (`user@`).
    #[error("the SPIFFE ID must not contain userinfo ('@' in the trust domain)")]
    HasUserinfo,
    /// The authority has a port (`:`).
    #[error("the SPIFFE ID must not contain a port (':' in the trust domain)")]
    HasPort,
    /// The input has a `?` or a `#`.
    #[error("the SPIFFE ID must not contain a query ('?') or a fragment ('#')")]
    HasQueryOrFragment,
    /// Two consecutive slashes in the path.
    #[error("the SPIFFE ID path contains an empty segment (\"//\")")]
    EmptySegment,
    /// A `.` or `..` path segment.
    #[error("the SPIFFE ID path contains a '.' or '..' segment")]
    DotSegment,
    /// The path ends with `/`.
    #[error("the SPIFFE ID path must not end with '/'")]
    TrailingSlash,
    /// A path segment holds a character outside `[A-Za-z0-9._-]`.
    #[error(
        "the SPIFFE ID path contains {ch:?}; only letters, digits, '.', '-' and '_' are allowed"
    )]
    PathChar {
        /// The first offending character.
        ch: char,
    },
}

impl SpiffeIdError {
    /// Stable snake_case label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Empty => "empty",
            Self::TooLong { .. } => "too_long",
            Self::WrongScheme => "wrong_scheme",
            Self::MissingTrustDomain => "missing_trust_domain",
            Self::TrustDomainTooLong { .. } => "trust_domain_too_long",
            Self::TrustDomainWithScheme => "trust_domain_with_scheme",
            Self::TrustDomainChar { .. } => "trust_domain_char",
            Self::HasUserinfo => "userinfo",
            Self::HasPort => "port",
            Self::HasQueryOrFragment => "query_or_fragment",
            Self::EmptySegment => "empty_segment",
            Self::DotSegment => "dot_segment",
            Self::TrailingSlash => "trailing_slash",
            Self::PathChar { .. } => "path_char",
        }
    }
}

// === impl TrustDomain ===

/// A trust domain name such as `example.org` (without `spiffe://`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Parses a bare trust domain name.
    ///
    /// # Errors
    ///
    /// Any [`SpiffeIdError`] about the trust domain: empty, too long, a URI
    /// instead of a name, userinfo, port, or a character outside `[a-z0-9._-]`.
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        if s.starts_with(SCHEME) {
            return Err(SpiffeIdError::TrustDomainWithScheme);
        }
        if s.contains(['?', '#']) {
            return Err(SpiffeIdError::HasQueryOrFragment);
        }
        check_trust_domain(s)?;
        Ok(Self(s.to_owned()))
    }

    /// The name, e.g. `example.org`.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn check_trust_domain(td: &str) -> Result<(), SpiffeIdError> {
    if td.is_empty() {
        return Err(SpiffeIdError::MissingTrustDomain);
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(SpiffeIdError::TrustDomainTooLong { len: td.len() });
    }
    match td.chars().find(|&c| !is_trust_domain_char(c)) {
        None => Ok(()),
        Some('@') => Err(SpiffeIdError::HasUserinfo),
        Some(':') => Err(SpiffeIdError::HasPort),
        Some(ch) => Err(SpiffeIdError::TrustDomainChar { ch }),
    }
}

fn is_trust_domain_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_')
}

fn is_path_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl TryFrom<String> for TrustDomain {
    type Error = SpiffeIdError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl From<TrustDomain> for String {
    fn from(td: TrustDomain) -> Self {
        td.0
    }
}

// === impl SpiffeId ===

/// A SPIFFE ID such as `spiffe://example.org/ns/prod/sa/web`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SpiffeId {
    /// The whole ID; always `spiffe://` + `trust_domain` + path.
    id: String,
    trust_domain: TrustDomain,
}

impl SpiffeId {
    /// Parses a SPIFFE ID.
    ///
    /// # Errors
    ///
    /// The first rule of the SPIFFE ID standard the input breaks, as a
    /// [`SpiffeIdError`].
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        if s.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        if s.len() > MAX_ID_LEN {
            return Err(SpiffeIdError::TooLong { len: s.len() });
        }
        let rest = s.strip_prefix(SCHEME).ok_or(SpiffeIdError::WrongScheme)?;
        if rest.contains(['?', '#']) {
            return Err(SpiffeIdError::HasQueryOrFragment);
        }
        let (td, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        check_trust_domain(td)?;
        check_path(path)?;
        Ok(Self {
            id: s.to_owned(),
            trust_domain: TrustDomain(td.to_owned()),
        })
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The path: empty for a root ID, otherwise starting with `/`.
    pub fn path(&self) -> &str {
        &self.id[SCHEME.len() + self.trust_domain.0.len()..]
    }

    /// Whether the path is empty (`spiffe://example.org`), as for a trust
    /// domain's signing authority. X509-SVID leaves must not be root IDs.
    pub fn is_root(&self) -> bool {
        self.path().is_empty()
    }

    /// The whole ID as a string.
    pub fn as_str(&self) -> &str {
        &self.id
    }
}

/// Checks a path that is empty or starts with `/`.
fn check_path(path: &str) -> Result<(), SpiffeIdError> {
    let Some(segments) = path.strip_prefix('/') else {
        return Ok(()); // empty: the split guarantees a leading '/' otherwise
    };
    let mut iter = segments.split('/').peekable();
    while let Some(segment) = iter.next() {
        match segment {
            "" if iter.peek().is_none() => return Err(SpiffeIdError::TrailingSlash),
            "" => return Err(SpiffeIdError::EmptySegment),
            "." | ".." => return Err(SpiffeIdError::DotSegment),
            _ => {
                if let Some(ch) = segment.chars().find(|&c| !is_path_char(c)) {
                    return Err(SpiffeIdError::PathChar { ch });
                }
            }
        }
    }
    Ok(())
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl TryFrom<String> for SpiffeId {
    type Error = SpiffeIdError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl From<SpiffeId> for String {
    fn from(id: SpiffeId) -> Self {
        id.id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_valid_ids() {
        let cases = [
            ("spiffe://example.org", "example.org", ""),
            ("spiffe://example.org/w", "example.org", "/w"),
            ("spiffe://td/ns/prod/sa/web", "td", "/ns/prod/sa/web"),
            (
                "spiffe://a-b_c.9/A.b-C_9/..x/x..",
                "a-b_c.9",
                "/A.b-C_9/..x/x..",
            ),
        ];
        for (input, td, path) in cases {
            let id = SpiffeId::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(id.trust_domain().as_str(), td, "{input}");
            assert_eq!(id.path(), path, "{input}");
            assert_eq!(id.is_root(), path.is_empty(), "{input}");
            assert_eq!(id.to_string(), input);
        }
    }

    #[test]
    fn rejects_invalid_ids() {
        use SpiffeIdError as E;
        let long_path = format!("spiffe://td/{}", "a".repeat(MAX_ID_LEN));
        let long_td = format!("spiffe://{}", "a".repeat(256));
        let cases: &[(&str, SpiffeIdError)] = &[
            ("", E::Empty),
            (
                &long_path,
                E::TooLong {
                    len: MAX_ID_LEN + 12,
                },
            ),
            (&long_td, E::TrustDomainTooLong { len: 256 }),
            ("http://td/w", E::WrongScheme),
            ("SPIFFE://td/w", E::WrongScheme),
            ("spiffe:/td/w", E::WrongScheme),
            ("td/w", E::WrongScheme),
            ("spiffe://", E::MissingTrustDomain),
            ("spiffe:///w", E::MissingTrustDomain),
            ("spiffe://Example.org/w", E::TrustDomainChar { ch: 'E' }),
            ("spiffe://ex%41.org", E::TrustDomainChar { ch: '%' }),
            ("spiffe://user@td/w", E::HasUserinfo),
            ("spiffe://td:8080/w", E::HasPort),
            ("spiffe://td/w?x=1", E::HasQueryOrFragment),
            ("spiffe://td/w#frag", E::HasQueryOrFragment),
            ("spiffe://td?x", E::HasQueryOrFragment),
            ("spiffe://td/", E::TrailingSlash),
            ("spiffe://td/w/", E::TrailingSlash),
            ("spiffe://td//w", E::EmptySegment),
            ("spiffe://td/./w", E::DotSegment),
            ("spiffe://td/w/..", E::DotSegment),
            ("spiffe://td/w%20x", E::PathChar { ch: '%' }),
            ("spiffe://td/w x", E::PathChar { ch: ' ' }),
            ("spiffe://td/wé", E::PathChar { ch: 'é' }),
        ];
        for (input, want) in cases {
            assert_eq!(SpiffeId::parse(input).as_ref(), Err(want), "{input}");
            assert!(!want.kind().is_empty() && !want.to_string().is_empty());
        }
    }

    #[test]
    fn accepts_exactly_max_length() {
        let id = format!("spiffe://td/{}", "a".repeat(MAX_ID_LEN - 12));
        assert_eq!(id.len(), MAX_ID_LEN);
        assert!(SpiffeId::parse(&id).is_ok());
    }

    #[test]
    fn trust_domain_parse() {
        use SpiffeIdError as E;
        assert_eq!(
            TrustDomain::parse("example.org").map(|t| t.to_string()),
            Ok("example.org".into())
        );
        let cases = [
            ("", E::MissingTrustDomain),
            ("spiffe://example.org", E::TrustDomainWithScheme),
            ("Example.org", E::TrustDomainChar { ch: 'E' }),
            ("example.org/w", E::TrustDomainChar { ch: '/' }),
            ("td:1", E::HasPort),
            ("td?x", E::HasQueryOrFragment),
        ];
        for (input, want) in cases {
            assert_eq!(TrustDomain::parse(input), Err(want), "{input}");
        }
    }

    #[test]
    fn serde_round_trip_goes_through_parse() {
        let id = SpiffeId::parse("spiffe://td/w").expect("valid");
        let json = serde_json::to_string(&id).expect("serialize");
        assert_eq!(json, "\"spiffe://td/w\"");
        assert_eq!(
            serde_json::from_str::<SpiffeId>(&json).expect("deserialize"),
            id
        );
        assert!(serde_json::from_str::<SpiffeId>("\"spiffe://td/\"").is_err());
        let td: TrustDomain = serde_json::from_str("\"td\"").expect("deserialize");
        assert_eq!(td.as_str(), "td");
        assert!(serde_json::from_str::<TrustDomain>("\"TD\"").is_err());
    }
}
