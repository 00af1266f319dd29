//! The PostgreSQL database of an [`HaLab`](super::HaLab): created fresh per
//! lab, dropped when the lab stops.
//!
//! Names are `spire_lab_<pid>_<random>`; a comment on the database records
//! the host, boot id and pid of the creating process. A database whose
//! creator is gone (same host, and another boot or a dead pid) is a leftover
//! and is dropped the next time a lab starts.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use std::str::FromStr as _;

use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{AssertSqlSafe, ConnectOptions as _, Connection as _};
use tokio::time::timeout;

use super::{LabError, process_alive};

/// Prefix of every lab database name.
pub(crate) const DB_PREFIX: &str = "spire_lab_";
/// Bound of one database operation (connect, create, drop).
const DB_TIMEOUT: Duration = Duration::from_secs(20);

/// A lab database.
#[derive(Debug)]
pub(crate) struct LabDatabase {
    /// The URL it was created through (a role with CREATEDB).
    pub admin_url: String,
    /// Its name.
    pub name: String,
    /// The lib/pq connection string SPIRE uses.
    pub spire_url: String,
    dropped: AtomicBool,
}

impl LabDatabase {
    /// Drops leftovers of earlier labs (best effort), then creates a fresh
    /// database.
    pub async fn create(admin_url: &str) -> Result<Self, LabError> {
        let pid = std::process::id();
        let random = uuid::Uuid::now_v7().simple().to_string();
        let name = format!(
            "{DB_PREFIX}{pid}_{}",
            &random[random.len().saturating_sub(12)..]
        );
        let spire_url = spire_connection_string(admin_url, &name)?;
        let mut conn = connect(admin_url).await?;
        drop_leftovers(&mut conn).await;
        exec(&mut conn, format!("CREATE DATABASE \"{name}\""))
            .await
            .map_err(|source| LabError::Database {
                what: format!("creating database {name} (the role needs CREATEDB)"),
                source,
            })?;
        let db = LabDatabase {
            admin_url: admin_url.to_owned(),
            name,
            spire_url,
            dropped: AtomicBool::new(false),
        };
        let comment = format!("spire-healer lab: {}", Origin::current().render(pid));
        let _ = exec(
            &mut conn,
            format!(
                "COMMENT ON DATABASE \"{}\" IS '{}'",
                db.name,
                comment.replace('\'', "''")
            ),
        )
        .await;
        let _ = conn.close().await;
        Ok(db)
    }

    /// Drops the database (idempotent).
    pub async fn drop_now(&self) -> Result<(), LabError> {
        if self.dropped.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        drop_database(&self.admin_url, &self.name).await.map(|_| ())
    }

    /// For `Drop`: drops the database from a helper thread with its own
    /// runtime (so it works inside or outside any runtime), bounded.
    pub fn drop_blocking(&self) {
        if self.dropped.swap(true, Ordering::SeqCst) {
            return;
        }
        let admin = self.admin_url.clone();
        let name = self.name.clone();
        let handle = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(drop_database(&admin, &name)).ok()
        });
        let _ = handle.join();
    }
}

/// A fresh, empty database for a test (named and cleaned up like a lab's),
/// dropped with the value.
#[derive(Debug)]
pub struct ScratchDatabase(LabDatabase);

impl ScratchDatabase {
    /// Creates it through `admin_url` (a role with CREATEDB).
    ///
    /// # Errors
    /// The server cannot be reached or refuses the creation.
    pub async fn create(admin_url: &str) -> Result<Self, LabError> {
        LabDatabase::create(admin_url).await.map(Self)
    }

    /// `admin_url` with the database replaced by this one.
    pub fn url(&self) -> String {
        let admin = &self.0.admin_url;
        let (base, query) = admin.split_once('?').unwrap_or((admin, ""));
        let scheme_end = base.find("://").map_or(0, |i| i + 3);
        let authority_end = base[scheme_end..]
            .find('/')
            .map_or(base.len(), |i| scheme_end + i);
        let mut url = format!("{}/{}", &base[..authority_end], self.0.name);
        if !query.is_empty() {
            url.push('?');
            url.push_str(query);
        }
        url
    }
}

impl Drop for ScratchDatabase {
    fn drop(&mut self) {
        self.0.drop_blocking();
    }
}

/// `DROP DATABASE IF EXISTS … WITH (FORCE)` (PostgreSQL ≥ 13); true when it
/// existed.
///
/// # Errors
/// Connection or permission problems.
pub(crate) async fn drop_database(admin_url: &str, name: &str) -> Result<bool, LabError> {
    if !valid_name(name) {
        return Err(LabError::State(format!(
            "refusing to drop {name:?}: not a lab database name"
        )));
    }
    let mut conn = connect(admin_url).await?;
    let existed = exists_on(&mut conn, name).await?;
    exec(
        &mut conn,
        format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"),
    )
    .await
    .map_err(|source| LabError::Database {
        what: format!("dropping database {name}"),
        source,
    })?;
    let _ = conn.close().await;
    Ok(existed)
}

/// Whether the database `name` exists on the server of `admin_url` (e.g. to
/// check that a lab's database was dropped).
///
/// # Errors
/// Connection problems.
pub async fn database_exists(admin_url: &str, name: &str) -> Result<bool, LabError> {
    let mut conn = connect(admin_url).await?;
    let found = exists_on(&mut conn, name).await;
    let _ = conn.close().await;
    found
}

async fn exists_on(conn: &mut PgConnection, name: &str) -> Result<bool, LabError> {
    let row: Option<(i32,)> = sqlx::query_as("SELECT 1 FROM pg_database WHERE datname = $1")
        .bind(name)
        .fetch_optional(&mut *conn)
        .await
        .map_err(|source| LabError::Database {
            what: "reading pg_database".into(),
            source,
        })?;
    Ok(row.is_some())
}

async fn connect(url: &str) -> Result<PgConnection, LabError> {
    let options = PgConnectOptions::from_str(url)
        .map_err(|source| LabError::Database {
            what: format!("parsing {}", redact(url)),
            source,
        })?
        // DROP DATABASE … WITH (FORCE) is slow; that is no news.
        .disable_statement_logging();
    match timeout(DB_TIMEOUT, PgConnection::connect_with(&options)).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(source)) => Err(LabError::Database {
            what: format!("connecting to {}", redact(url)),
            source,
        }),
        Err(_) => Err(LabError::Timeout {
            what: format!("connecting to {}", redact(url)),
            limit: DB_TIMEOUT,
        }),
    }
}

async fn exec(conn: &mut PgConnection, sql: String) -> Result<(), sqlx::Error> {
    match timeout(
        DB_TIMEOUT,
        sqlx::raw_sql(AssertSqlSafe(sql)).execute(&mut *conn),
    )
    .await
    {
        Ok(r) => r.map(|_| ()),
        Err(_) => Err(sqlx::Error::PoolTimedOut),
    }
}

/// Drops lab databases whose creator is gone; best effort.
async fn drop_leftovers(conn: &mut PgConnection) {
    let rows: Vec<(String, Option<String>)> = match sqlx::query_as(
        "SELECT d.datname::text, shobj_description(d.oid, 'pg_database') \
         FROM pg_database d WHERE d.datname LIKE 'spire\\_lab\\_%'",
    )
    .fetch_all(&mut *conn)
    .await
    {
        Ok(rows) => rows,
        Err(_) => return,
    };
    let here = Origin::current();
    for (name, comment) in rows {
        let Some(origin) = comment.as_deref().and_then(Origin::parse) else {
            continue;
        };
        let stale = origin.host == here.host
            && (origin.boot != here.boot || !origin.pid.is_some_and(process_alive));
        if stale && valid_name(&name) {
            tracing::info!(database = %name, "Dropping a leftover lab database.");
            let _ = exec(
                conn,
                format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"),
            )
            .await;
        }
    }
}

/// Who created a database.
struct Origin {
    host: String,
    boot: String,
    pid: Option<i32>,
}

impl Origin {
    fn current() -> Self {
        let read = |p: &str| {
            std::fs::read_to_string(p)
                .map(|s| s.trim().to_owned())
                .unwrap_or_default()
        };
        Origin {
            host: read("/proc/sys/kernel/hostname"),
            boot: read("/proc/sys/kernel/random/boot_id"),
            pid: None,
        }
    }

    fn render(&self, pid: u32) -> String {
        format!("host={} boot={} pid={pid}", self.host, self.boot)
    }

    fn parse(comment: &str) -> Option<Self> {
        let mut o = Origin {
            host: String::new(),
            boot: String::new(),
            pid: None,
        };
        for word in comment.split_whitespace() {
            if let Some(v) = word.strip_prefix("host=") {
                o.host = v.to_owned();
            } else if let Some(v) = word.strip_prefix("boot=") {
                o.boot = v.to_owned();
            } else if let Some(v) = word.strip_prefix("pid=") {
                o.pid = v.parse().ok();
            }
        }
        (!o.host.is_empty() && o.pid.is_some()).then_some(o)
    }
}

fn valid_name(name: &str) -> bool {
    name.starts_with(DB_PREFIX)
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// The admin URL with its database replaced by `db` and `sslmode=disable`
/// added unless an `sslmode` is given (lib/pq defaults to `require`).
pub(crate) fn spire_connection_string(admin_url: &str, db: &str) -> Result<String, LabError> {
    let bad = || {
        LabError::Options(format!(
            "postgres_url must look like postgres://user:password@host:port/db, got {}",
            redact(admin_url)
        ))
    };
    let (scheme, rest) = admin_url.split_once("://").ok_or_else(bad)?;
    if scheme != "postgres" && scheme != "postgresql" {
        return Err(bad());
    }
    let (before_query, query) = rest.split_once('?').unwrap_or((rest, ""));
    let authority = before_query.split('/').next().unwrap_or_default();
    if authority.is_empty() {
        return Err(bad());
    }
    let mut params: Vec<&str> = query.split('&').filter(|p| !p.is_empty()).collect();
    if !params.iter().any(|p| p.starts_with("sslmode=")) {
        params.push("sslmode=disable");
    }
    Ok(format!("{scheme}://{authority}/{db}?{}", params.join("&")))
}

/// The URL without its password, for messages.
pub(crate) fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, tail) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{host}{tail}")
        }
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_url_replaces_only_the_database() {
        let scratch = |admin: &str| {
            ScratchDatabase(LabDatabase {
                admin_url: admin.into(),
                name: "spire_lab_1_x".into(),
                spire_url: String::new(),
                // Nothing to drop.
                dropped: AtomicBool::new(true),
            })
        };
        assert_eq!(
            scratch("postgres://u:p@127.0.0.1:5432/admin?sslmode=disable").url(),
            "postgres://u:p@127.0.0.1:5432/spire_lab_1_x?sslmode=disable"
        );
        assert_eq!(
            scratch("postgres://u@h").url(),
            "postgres://u@h/spire_lab_1_x"
        );
    }

    #[test]
    fn connection_string_replaces_the_database() {
        assert_eq!(
            spire_connection_string("postgres://u:p@127.0.0.1:5432/spire_healer", "lab").unwrap(),
            "postgres://u:p@127.0.0.1:5432/lab?sslmode=disable"
        );
        assert_eq!(
            spire_connection_string("postgresql://u@h/db?sslmode=require&x=1", "lab").unwrap(),
            "postgresql://u@h/lab?sslmode=require&x=1"
        );
        assert_eq!(
            spire_connection_string("postgres://u@h:1", "lab").unwrap(),
            "postgres://u@h:1/lab?sslmode=disable"
        );
        assert!(spire_connection_string("mysql://u@h/db", "lab").is_err());
        assert!(spire_connection_string("nonsense", "lab").is_err());
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact("postgres://u:secret@h:1/db"),
            "postgres://u:***@h:1/db"
        );
        assert_eq!(redact("postgres://h/db"), "postgres://h/db");
    }

    #[test]
    fn origin_round_trip() {
        let o = Origin::parse("spire-healer lab: host=h boot=b pid=42").unwrap();
        assert_eq!(
            (o.host.as_str(), o.boot.as_str(), o.pid),
            ("h", "b", Some(42))
        );
        assert!(Origin::parse("something else").is_none());
    }

    #[test]
    fn only_lab_names_are_valid() {
        assert!(valid_name("spire_lab_1_abc"));
        assert!(!valid_name("spire_healer"));
        assert!(!valid_name("spire_lab_x\"; DROP"));
    }
}
