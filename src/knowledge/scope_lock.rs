//! One actor per scope: two spire-healer instances that would act on the
//! same agents never both act. The instance takes an exclusive lock at
//! start and holds it for its whole life; the operating system or the
//! database releases it the moment the process ends, kill -9 included.
//!
//! - SQLite: an advisory `flock` on `<database>.lock` beside the file, which
//!   holds the holder's host, pid and start for the next one to read. One
//!   database file, one acting instance.
//! - PostgreSQL: one session advisory lock per configured agent
//!   (`pg_try_advisory_lock` on a key derived from the agent's name) on a
//!   dedicated connection, named after its holder (`application_name`), so
//!   node instances acting on different agents share one database and two
//!   that would act on the same agent do not. Leadership with fencing
//!   tokens for the cluster role takes the same place.
//!
//! A second instance for a held scope refuses to start with
//! [`StoreError::InUse`], naming the holder.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{ConnectOptions, Connection, Row};
use tracing::{error, info};

use super::StoreError;
use crate::clock::{from_unix_millis, unix_millis};

/// Who holds (or wants) a scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub host: String,
    pub pid: u32,
    /// When it started.
    pub since: SystemTime,
}

impl Holder {
    /// This process, started at `since`.
    pub fn this_process(since: SystemTime) -> Self {
        let host = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "unknown".into());
        Self {
            host,
            pid: std::process::id(),
            since,
        }
    }

    /// `host=… pid=… since_ms=…`: how a holder names itself.
    pub fn label(&self) -> String {
        format!(
            "spire-healer host={} pid={} since_ms={}",
            self.host,
            self.pid,
            unix_millis(self.since)
        )
    }

    fn parse(label: &str) -> Option<Self> {
        let mut host = None;
        let mut pid = None;
        let mut since = None;
        for part in label.split_whitespace() {
            match part.split_once('=') {
                Some(("host", v)) => host = Some(v.to_string()),
                Some(("pid", v)) => pid = v.parse().ok(),
                Some(("since_ms", v)) => since = v.parse::<i64>().ok().map(from_unix_millis),
                _ => {}
            }
        }
        Some(Self {
            host: host?,
            pid: pid?,
            since: since?,
        })
    }

    fn describe(&self) -> String {
        let since = humantime::format_rfc3339_seconds(self.since);
        format!("pid {} on {} since {since}", self.pid, self.host)
    }
}

/// A held scope; released when dropped (or when the process ends).
#[derive(Debug)]
pub struct ScopeLock {
    held: Held,
}

#[derive(Debug)]
enum Held {
    /// Nothing to share: an in-memory database.
    Nothing,
    File {
        _held: nix::fcntl::Flock<File>,
    },
    Postgres(PgConnection),
}

impl ScopeLock {
    /// Holds nothing: the instance's scope is fenced another way (a
    /// cluster leader's epoch, see [`crate::leadership`]).
    pub fn nothing() -> Self {
        Self {
            held: Held::Nothing,
        }
    }

    /// What this lock holds, for logs.
    pub fn kind(&self) -> &'static str {
        match self.held {
            Held::Nothing => "none",
            Held::File { .. } => "lock_file",
            Held::Postgres(_) => "advisory_locks",
        }
    }

    /// Whether the lock is still held: always for a file; for PostgreSQL,
    /// whether its session answers (a dropped session has lost its locks).
    pub async fn alive(&mut self) -> bool {
        match &mut self.held {
            Held::Nothing | Held::File { .. } => true,
            Held::Postgres(conn) => matches!(
                tokio::time::timeout(Duration::from_secs(5), conn.ping()).await,
                Ok(Ok(()))
            ),
        }
    }
}

/// Takes the scope of an instance acting on `agents` over the store at
/// `url` (the same forms as [`super::open`]).
///
/// # Errors
/// [`StoreError::InUse`] naming the holder when another instance holds it;
/// [`StoreError::Config`] or `Unavailable` when the lock cannot be taken at
/// all.
pub async fn acquire(
    url: &str,
    agents: &[String],
    holder: &Holder,
) -> Result<ScopeLock, StoreError> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return postgres(url, agents, holder).await;
    }
    let path = url.strip_prefix("sqlite://").unwrap_or(url);
    if path == ":memory:" {
        return Ok(ScopeLock {
            held: Held::Nothing,
        });
    }
    file(&lock_path(Path::new(path)), holder)
}

/// `<database>.lock`.
fn lock_path(db: &Path) -> PathBuf {
    let mut p = db.as_os_str().to_owned();
    p.push(".lock");
    PathBuf::from(p)
}

fn file(path: &Path, holder: &Holder) -> Result<ScopeLock, StoreError> {
    let err = |e: std::io::Error| StoreError::Config(format!("lock file {}: {e}", path.display()));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(err)?;
    let mut lock = match nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(l) => l,
        Err((mut f, nix::errno::Errno::EWOULDBLOCK)) => {
            let mut text = String::new();
            let _ = f.read_to_string(&mut text);
            let who = Holder::parse(text.trim())
                .map_or_else(|| "another process".to_string(), |h| h.describe());
            return Err(StoreError::InUse(format!(
                "{} is held by {who}: another spire-healer acts on this store",
                path.display()
            )));
        }
        Err((_, e)) => return Err(err(std::io::Error::from(e))),
    };
    // Ours: say who holds it.
    let write = |f: &mut File| -> std::io::Result<()> {
        f.set_len(0)?;
        f.rewind()?;
        f.write_all(holder.label().as_bytes())?;
        f.sync_data()
    };
    write(&mut lock).map_err(err)?;
    info!(lock = %path.display(), "Store lock taken.");
    Ok(ScopeLock {
        held: Held::File { _held: lock },
    })
}

/// The advisory-lock key of one agent.
fn agent_key(agent: &str) -> i64 {
    let d = Sha256::digest(format!("spire-healer/agent/{agent}").as_bytes());
    i64::from_be_bytes(d[..8].try_into().unwrap_or([0; 8]))
}

async fn postgres(url: &str, agents: &[String], holder: &Holder) -> Result<ScopeLock, StoreError> {
    let options: PgConnectOptions = url
        .parse()
        .map_err(|e| StoreError::Config(format!("invalid PostgreSQL URL: {e}")))?;
    let addr = format!("{}:{}", options.get_host(), options.get_port());
    let options = options.application_name(&holder.label());
    let mut conn = match tokio::time::timeout(Duration::from_secs(5), options.connect()).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            return Err(super::postgres::connect_error(
                &addr,
                options.get_username(),
                e,
            ));
        }
        Err(_) => {
            return Err(StoreError::Unavailable(sqlx::Error::Io(
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("{addr}: no answer within 5 s while taking the store lock"),
                ),
            )));
        }
    };
    let mut names: Vec<&String> = agents.iter().collect();
    names.sort();
    names.dedup();
    for agent in names {
        let key = agent_key(agent);
        let got: bool = sqlx::query("SELECT pg_try_advisory_lock($1)")
            .bind(key)
            .fetch_one(&mut conn)
            .await
            .map_err(StoreError::from_sqlx)?
            .try_get(0)
            .map_err(StoreError::from_sqlx)?;
        if got {
            continue;
        }
        // Who holds it: the session holding that advisory lock names itself.
        // A bigint key is (classid, objid) = (high, low) 32 bits.
        let held_by: Option<String> = sqlx::query(
            "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
             WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 \
             AND l.classid::bigint = $1 AND l.objid::bigint = $2 \
             AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
             LIMIT 1",
        )
        .bind((key >> 32) & 0xffff_ffff)
        .bind(key & 0xffff_ffff)
        .fetch_optional(&mut conn)
        .await
        .ok()
        .flatten()
        .and_then(|r| r.try_get(0).ok());
        let who = held_by
            .as_deref()
            .and_then(Holder::parse)
            .map_or_else(|| "another session".to_string(), |h| h.describe());
        let _ = conn.close().await;
        return Err(StoreError::InUse(format!(
            "agent {agent:?} is held on {addr} by {who}: another spire-healer acts on it"
        )));
    }
    info!(%addr, agents = agents.len(), "Store locks taken.");
    Ok(ScopeLock {
        held: Held::Postgres(conn),
    })
}

/// Logs and reports a lost lock (its session dropped): the caller stops
/// acting.
pub fn lost(kind: &str) {
    error!(
        lock = kind,
        "The store lock was lost: another instance may act now; stopping."
    );
}
