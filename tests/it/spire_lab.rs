//! The real-SPIRE lab harness lives in the library ([`spire_healer::lab`]),
//! where `spire-healer lab up` uses it too; this module keeps the tests'
//! `crate::spire_lab::…` paths working and holds test-only helpers.
#![allow(unused_imports)]

pub use spire_healer::lab::*;

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
