//! The real-SPIRE lab harness lives in the `spire-lab` crate (a
//! dev-dependency), whose binary the operator's `scripts/lab.sh` runs too;
//! this module keeps the tests' `crate::spire_lab::…` paths working and
//! holds test-only helpers.
#![allow(unused_imports)]

pub use ::spire_lab::*;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The PostgreSQL URL the tests use (a role with CREATEDB), from
/// `SPIRE_HEALER_TEST_PG_URL`; `scripts/test.sh` provisions and sets it.
///
/// # Panics
/// When the variable is unset or empty, with instructions.
pub fn test_pg_url() -> String {
    match std::env::var("SPIRE_HEALER_TEST_PG_URL") {
        Ok(url) if !url.trim().is_empty() => url,
        _ => panic!(
            "SPIRE_HEALER_TEST_PG_URL is not set: the HA lab needs PostgreSQL with a role that \
             may CREATE DATABASE. Run the tests through scripts/test.sh (which provisions it), \
             or export e.g. \
             SPIRE_HEALER_TEST_PG_URL=postgres://spire_healer:spire_healer@127.0.0.1:5432/spire_healer"
        ),
    }
}

/// The `spire-lab` binary the tests spawn (`up`, `down`, `svid-files`,
/// `peer`), built from the current sources.
///
/// `env!("CARGO_BIN_EXE_…")` names only binaries of the package under test,
/// and Cargo builds a dependency's library but never its binaries. So the
/// first call runs `cargo build -p spire-lab --bin spire-lab` (the cargo
/// running these tests; `--release` when they are optimised; the caller's
/// environment, hence the same target directory) and takes the executable's
/// path from Cargo's JSON messages. When nothing changed that is a no-op of
/// about a second; after a change to the lab it rebuilds only the lab.
/// `SPIRE_LAB_BIN` overrides it, for runs without cargo (the binary must
/// then be built from the same sources).
///
/// # Panics
/// When the build fails or reports no executable, with Cargo's output.
pub fn lab_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("SPIRE_LAB_BIN").filter(|b| !b.is_empty()) {
            return PathBuf::from(bin);
        }
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into());
        let mut cmd = Command::new(cargo);
        // Cargo describes this package to its tests through the environment
        // (`CARGO_PKG_*`, `OUT_DIR`, …); build scripts that watch such
        // variables (ring's does) would see a change and rebuild, here and
        // again at the next plain `cargo` call. Only the caller's own
        // variables are passed on.
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy();
            if name.starts_with("CARGO_PKG_")
                || [
                    "OUT_DIR",
                    "CARGO_BIN_NAME",
                    "CARGO_MANIFEST_DIR",
                    "CARGO_MANIFEST_PATH",
                    "CARGO_CRATE_NAME",
                    "CARGO_PRIMARY_PACKAGE",
                    "CARGO_TARGET_TMPDIR",
                    "CARGO_RUSTC_CURRENT_DIR",
                ]
                .contains(&&*name)
            {
                cmd.env_remove(&*name);
            }
        }
        cmd.current_dir(env!("CARGO_MANIFEST_DIR")).args([
            "build",
            "-p",
            "spire-lab",
            "--bin",
            "spire-lab",
            "--message-format=json-render-diagnostics",
        ]);
        if !cfg!(debug_assertions) {
            cmd.arg("--release");
        }
        let out = cmd.output().expect("running cargo build for spire-lab");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let exe = stdout
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "spire-lab")
            .find_map(|m| m["executable"].as_str().map(PathBuf::from));
        match exe {
            Some(exe) if out.status.success() => exe,
            _ => panic!(
                "cargo build -p spire-lab --bin spire-lab failed ({}):\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    })
}

/// What one `spire-lab chaos` run left: its records (`runs.json`), its
/// standard output and the folder holding the report files.
pub struct ChaosRun {
    pub records: Vec<chaos::RunRecord>,
    pub stdout: String,
    pub out: tempfile::TempDir,
}

/// Runs `spire-lab chaos` with seed 13, one run per pair, 60 s SVIDs, the
/// spire-healer binary under test and the tests' PostgreSQL, plus `args`
/// (faults, supervisors, window); fails when it does not finish within
/// `limit` or exits non-zero.
///
/// # Errors
/// The run could not start, took longer than `limit`, failed, or left no
/// readable `runs.json`.
pub async fn run_chaos(args: &[&str], limit: std::time::Duration) -> anyhow::Result<ChaosRun> {
    use anyhow::Context as _;
    let out = tempfile::tempdir()?;
    let child = tokio::process::Command::new(lab_bin())
        .args(["chaos", "--runs", "1", "--seed", "13", "--svid-ttl", "60s"])
        .args(args)
        .arg("--healer-bin")
        .arg(env!("CARGO_BIN_EXE_spire-healer"))
        .arg("--postgres-url")
        .arg(test_pg_url())
        .arg("--out")
        .arg(out.path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting spire-lab chaos")?;
    let done = tokio::time::timeout(limit, child.wait_with_output())
        .await
        .context("spire-lab chaos did not finish in time")??;
    let stdout = String::from_utf8_lossy(&done.stdout).into_owned();
    anyhow::ensure!(
        done.status.success(),
        "spire-lab chaos failed ({}):\n{stdout}\n{}",
        done.status,
        String::from_utf8_lossy(&done.stderr)
    );
    let records = serde_json::from_slice(&std::fs::read(out.path().join("runs.json"))?)
        .context("runs.json")?;
    Ok(ChaosRun {
        records,
        stdout,
        out,
    })
}
