//! Summaries, tables, CSV and the chart of a chaos benchmark.
//! (Skeleton: filled in by the implementation.)

use std::path::Path;

use serde::Serialize;

use super::{Fault, RunRecord, SupervisorKind};
use crate::LabError;

/// Every run of one (fault, supervisor) summarised.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    /// The fault.
    pub fault: Fault,
    /// Who handled it.
    pub supervisor: SupervisorKind,
    /// Runs measured.
    pub runs: u32,
    /// Runs healed within their window.
    pub healed: u32,
    /// Median time to detect over the runs that detected it.
    pub detect_median_s: Option<f64>,
    /// Median time to heal over the healed runs.
    pub heal_median_s: Option<f64>,
    /// Longest time to heal over the healed runs.
    pub heal_max_s: Option<f64>,
    /// Disruptive actions over all runs.
    pub disruptive_actions: u32,
    /// Wrong actions over all runs.
    pub wrong_actions: u32,
}

/// One [`Summary`] per (fault, supervisor) present in `records`.
pub fn summarize(records: &[RunRecord]) -> Vec<Summary> {
    let _ = records;
    Vec::new()
}

/// Every run as CSV (header first).
pub fn records_csv(records: &[RunRecord]) -> String {
    let _ = records;
    String::new()
}

/// Every summary as CSV, with the ratios against each baseline.
pub fn summary_csv(summaries: &[Summary]) -> String {
    let _ = summaries;
    String::new()
}

/// The Markdown table, with the ratios against each baseline.
pub fn markdown(summaries: &[Summary]) -> String {
    let _ = summaries;
    String::new()
}

/// The chart of time to heal per fault and supervisor, as SVG at `path`.
///
/// # Errors
/// [`LabError::Io`] when the file cannot be written.
pub fn svg_chart(summaries: &[Summary], path: &Path) -> Result<(), LabError> {
    let _ = (summaries, path);
    Ok(())
}
