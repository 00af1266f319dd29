//! Reading and rewriting `server_address` / `server_port` in a spire-agent
//! HCL config file, keeping every other byte as it is, written atomically
//! (temp file in the same directory, fsync, rename; the original survives any
//! failure).

use std::io::Write;
use std::path::{Path, PathBuf};

/// Problems with an agent config file.
#[derive(Debug, thiserror::Error)]
pub enum AgentConfigError {
    /// Read or write failed.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file does not have exactly one assignment of the key.
    #[error("{path}: expected exactly one `{key} = …` assignment, found {found}")]
    Unparsable {
        /// File.
        path: PathBuf,
        key: &'static str,
        /// How many were found.
        found: usize,
    },
    /// The value is not usable.
    #[error("{path}: `{key}` has an unusable value {value:?}")]
    BadValue {
        /// File.
        path: PathBuf,
        key: &'static str,
        /// Value as written.
        value: String,
    },
}

impl AgentConfigError {
    /// Closed-set label.
    pub fn kind(&self) -> &'static str {
        match self {
            AgentConfigError::Io { .. } => "io",
            AgentConfigError::Unparsable { .. } => "unparsable",
            AgentConfigError::BadValue { .. } => "bad_value",
        }
    }
}

/// Byte range of the value of `key = value` on one line, ignoring lines
/// that are comments. Values may be quoted or bare.
fn value_spans(text: &str, key: &str) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        if let Some(rest) = trimmed.strip_prefix(key)
            && !trimmed.starts_with('#')
            && !trimmed.starts_with("//")
        {
            let after_key = rest.trim_start();
            if let Some(v) = after_key.strip_prefix('=') {
                let v_trim = v.trim_start();
                let start = offset
                    + indent
                    + key.len()
                    + (rest.len() - after_key.len())
                    + 1
                    + (v.len() - v_trim.len());
                let len = if let Some(q) = v_trim.strip_prefix('"') {
                    q.find('"').map_or(0, |end| end + 2)
                } else {
                    v_trim
                        .find(|c: char| c.is_whitespace() || c == '#')
                        .unwrap_or(v_trim.len())
                };
                if len > 0 {
                    out.push((start, start + len));
                }
            }
        }
        offset += line.len();
    }
    out
}

fn one_value<'a>(
    text: &'a str,
    path: &Path,
    key: &'static str,
) -> Result<(usize, usize, &'a str), AgentConfigError> {
    let spans = value_spans(text, key);
    match spans.as_slice() {
        [(s, e)] => Ok((*s, *e, text[*s..*e].trim_matches('"'))),
        _ => Err(AgentConfigError::Unparsable {
            path: path.to_path_buf(),
            key,
            found: spans.len(),
        }),
    }
}

/// The (server_address, server_port) the agent config points at.
///
/// # Errors
/// Not exactly one assignment of either key, or a non-numeric port.
pub fn current_server(text: &str, path: &Path) -> Result<(String, u16), AgentConfigError> {
    let (_, _, addr) = one_value(text, path, "server_address")?;
    let (_, _, port) = one_value(text, path, "server_port")?;
    let port = port.parse().map_err(|_| AgentConfigError::BadValue {
        path: path.to_path_buf(),
        key: "server_port",
        value: port.to_string(),
    })?;
    Ok((addr.to_string(), port))
}

/// `text` with `server_address` and `server_port` replaced, everything else
/// byte-for-byte the same.
///
/// # Errors
/// As [`current_server`].
pub fn rewrite_server(
    text: &str,
    path: &Path,
    address: &str,
    port: u16,
) -> Result<String, AgentConfigError> {
    current_server(text, path)?;
    let (a0, a1, _) = one_value(text, path, "server_address")?;
    let (p0, p1, _) = one_value(text, path, "server_port")?;
    let port_quoted = text[p0..p1].starts_with('"');
    let port_text = if port_quoted {
        format!("\"{port}\"")
    } else {
        port.to_string()
    };
    let addr_text = format!("\"{address}\"");
    let mut edits = [(a0, a1, addr_text), (p0, p1, port_text)];
    edits.sort_by_key(|e| std::cmp::Reverse(e.0));
    let mut out = text.to_string();
    for (s, e, v) in edits {
        out.replace_range(s..e, &v);
    }
    Ok(out)
}

/// Rewrites the file at `path` atomically. Returns the previous
/// (address, port). A file already pointing at the target is left untouched.
///
/// # Errors
/// Unreadable, unparsable or unwritable; the original file is kept.
pub fn rewrite_file(
    path: &Path,
    address: &str,
    port: u16,
) -> Result<(String, u16), AgentConfigError> {
    let io = |source| AgentConfigError::Io {
        path: path.to_path_buf(),
        source,
    };
    let text = std::fs::read_to_string(path).map_err(io)?;
    let before = current_server(&text, path)?;
    if before.0 == address && before.1 == port {
        return Ok(before);
    }
    let new = rewrite_server(&text, path, address, port)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
    tmp.write_all(new.as_bytes()).map_err(io)?;
    tmp.as_file().sync_all().map_err(io)?;
    if let Ok(meta) = std::fs::metadata(path) {
        let _ = std::fs::set_permissions(tmp.path(), meta.permissions());
    }
    tmp.persist(path).map_err(|e| io(e.error))?;
    Ok(before)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONF: &str = r#"agent {
    data_dir = "/var/lib/spire/agent"
    log_level = "INFO"
    # server_address = "old.example"   (commented out)
    server_address = "10.0.0.1"
    server_port = "8081"
    socket_path = "/run/spire/agent.sock"
    trust_domain = "example.org"
}

plugins {
    NodeAttestor "join_token" { plugin_data {} }
}
"#;

    fn p() -> &'static Path {
        Path::new("agent.conf")
    }

    #[test]
    fn reads_current_server() {
        assert_eq!(
            current_server(CONF, p()).unwrap(),
            ("10.0.0.1".into(), 8081)
        );
        let bare = CONF.replace("server_port = \"8081\"", "server_port = 9091");
        assert_eq!(current_server(&bare, p()).unwrap().1, 9091);
    }

    #[test]
    fn rewrite_changes_only_the_two_values() {
        let out = rewrite_server(CONF, p(), "10.0.0.2", 8082).unwrap();
        let expected = CONF
            .replace(
                "server_address = \"10.0.0.1\"",
                "server_address = \"10.0.0.2\"",
            )
            .replace("server_port = \"8081\"", "server_port = \"8082\"");
        assert_eq!(out, expected);
        let bare = CONF.replace("server_port = \"8081\"", "server_port = 8081 # primary");
        let out = rewrite_server(&bare, p(), "h", 1).unwrap();
        assert!(out.contains("server_port = 1 # primary"), "{out}");
    }

    #[test]
    fn unparsable_configs_are_refused() {
        let none = CONF.replace("    server_address = \"10.0.0.1\"\n", "");
        let e = rewrite_server(&none, p(), "h", 1).unwrap_err();
        assert_eq!(e.kind(), "unparsable");
        let two = CONF.replace(
            "server_port = \"8081\"",
            "server_port = \"8081\"\n    server_port = \"8082\"",
        );
        assert!(e.to_string().contains("server_address"));
        assert_eq!(
            rewrite_server(&two, p(), "h", 1).unwrap_err().kind(),
            "unparsable"
        );
        let bad = CONF.replace("\"8081\"", "\"http\"");
        assert_eq!(current_server(&bad, p()).unwrap_err().kind(), "bad_value");
    }

    #[test]
    fn file_rewrite_is_atomic_and_keeps_the_original_on_failure() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.conf");
        std::fs::write(&path, CONF).unwrap();
        let before = rewrite_file(&path, "10.0.0.2", 8082).unwrap();
        assert_eq!(before, ("10.0.0.1".into(), 8081));
        let now = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            current_server(&now, &path).unwrap(),
            ("10.0.0.2".into(), 8082)
        );
        // Idempotent.
        assert_eq!(rewrite_file(&path, "10.0.0.2", 8082).unwrap().1, 8082);
        // Unparsable: nothing written.
        let broken = "agent { }\n";
        std::fs::write(&path, broken).unwrap();
        assert!(rewrite_file(&path, "h", 1).is_err());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), broken);
        // Missing file.
        assert_eq!(
            rewrite_file(&dir.path().join("nope.conf"), "h", 1)
                .unwrap_err()
                .kind(),
            "io"
        );
        // No temp files left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn unwritable_directory_keeps_the_original() {
        if nix::unistd::geteuid().is_root() {
            return; // root ignores directory permissions; covered by the other cases
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.conf");
        std::fs::write(&path, CONF).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o500)).unwrap();
        assert_eq!(rewrite_file(&path, "h", 1).unwrap_err().kind(), "io");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), CONF);
    }
}
