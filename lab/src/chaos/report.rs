//! Summaries, tables, CSV and the chart of a chaos benchmark.
//!
//! Definitions (also printed under the Markdown table):
//! - **healed k/n**: runs healed within their window (the workload served a
//!   valid SVID again and a handshake with it succeeded) out of runs made.
//! - **time to heal**: injection → healed; the median (and the maximum) is
//!   taken over the healed runs only.
//! - **detect**: injection → the supervisor's first reaction; median over
//!   the runs that reacted.
//! - **disruptive / wrong**: actions summed over all runs.
//! - **speed-up** ([`Speedup`]): the baseline's median time to heal divided
//!   by spire-healer's, for the same fault.
//!
//! Medians of an even count are the mean of the two middle values.
//! Non-finite times in the records are ignored.

use std::fmt;
use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
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
    /// The longest healing window among the runs (where the chart puts a
    /// "not healed" bar).
    pub window_s: f64,
}

/// spire-healer's time to heal against one baseline's, for one fault.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum Speedup {
    /// Both healed: the baseline's median time to heal divided by
    /// spire-healer's (above 1: spire-healer was faster).
    Ratio(f64),
    /// spire-healer healed (at least once), the baseline never did.
    OnlyHealer,
    /// Neither healed.
    Neither,
    /// The baseline healed, spire-healer never did.
    OnlyBaseline,
}

impl Speedup {
    /// Compares `healer`'s median time to heal with `baseline`'s.
    pub fn of(healer: &Summary, baseline: &Summary) -> Speedup {
        match (healer.heal_median_s, baseline.heal_median_s) {
            (Some(h), Some(b)) => Speedup::Ratio(if h > 0.0 {
                b / h
            } else if b > 0.0 {
                f64::INFINITY
            } else {
                1.0
            }),
            (Some(_), None) => Speedup::OnlyHealer,
            (None, None) => Speedup::Neither,
            (None, Some(_)) => Speedup::OnlyBaseline,
        }
    }

    /// The ratio, when both healed.
    pub fn ratio(self) -> Option<f64> {
        match self {
            Speedup::Ratio(r) => Some(r),
            _ => None,
        }
    }
}

impl fmt::Display for Speedup {
    /// `N.N× faster` (ratio ≥ 1), `N.N× slower` (the inverse, ratio < 1),
    /// `only spire-healer healed`, `neither healed`,
    /// `baseline healed, spire-healer did not`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Speedup::Ratio(r) if r.is_infinite() => f.write_str("∞× faster"),
            Speedup::Ratio(r) if r >= 1.0 => write!(f, "{r:.1}× faster"),
            Speedup::Ratio(r) if r > 0.0 => write!(f, "{:.1}× slower", 1.0 / r),
            Speedup::Ratio(_) => f.write_str("∞× slower"),
            Speedup::OnlyHealer => f.write_str("only spire-healer healed"),
            Speedup::Neither => f.write_str("neither healed"),
            Speedup::OnlyBaseline => f.write_str("baseline healed, spire-healer did not"),
        }
    }
}

/// The median of the finite values, `None` when there are none.
fn median(values: impl IntoIterator<Item = f64>) -> Option<f64> {
    let mut v: Vec<f64> = values.into_iter().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    })
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// One [`Summary`] per (fault, supervisor) present in `records`, in
/// [`Fault::ALL`] × [`SupervisorKind::ALL`] order.
pub fn summarize(records: &[RunRecord]) -> Vec<Summary> {
    let mut out = Vec::new();
    for fault in Fault::ALL {
        for supervisor in SupervisorKind::ALL {
            let runs: Vec<&RunRecord> = records
                .iter()
                .filter(|r| r.fault == fault && r.supervisor == supervisor)
                .collect();
            if runs.is_empty() {
                continue;
            }
            let heals: Vec<f64> = runs
                .iter()
                .filter_map(|r| r.heal_s)
                .filter(|x| x.is_finite())
                .collect();
            out.push(Summary {
                fault,
                supervisor,
                runs: count(runs.len()),
                healed: count(heals.len()),
                detect_median_s: median(runs.iter().filter_map(|r| r.detect_s)),
                heal_median_s: median(heals.iter().copied()),
                heal_max_s: heals.iter().copied().reduce(f64::max),
                disruptive_actions: runs
                    .iter()
                    .fold(0u32, |a, r| a.saturating_add(r.disruptive_actions)),
                wrong_actions: runs
                    .iter()
                    .fold(0u32, |a, r| a.saturating_add(r.wrong_actions)),
                window_s: runs
                    .iter()
                    .map(|r| r.window_s)
                    .filter(|x| x.is_finite())
                    .fold(0.0, f64::max),
            });
        }
    }
    out
}

/// spire-healer's speed-up against `baseline` on `fault`, when both were
/// run.
pub fn speedup(summaries: &[Summary], fault: Fault, baseline: SupervisorKind) -> Option<Speedup> {
    let find = |k: SupervisorKind| {
        summaries
            .iter()
            .find(|s| s.fault == fault && s.supervisor == k)
    };
    Some(Speedup::of(find(SupervisorKind::Healer)?, find(baseline)?))
}

/// One CSV field, quoted as RFC 4180 requires.
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\r', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// Seconds with one decimal; empty for `None`.
fn secs(v: Option<f64>) -> String {
    v.filter(|x| x.is_finite())
        .map(|x| format!("{x:.1}"))
        .unwrap_or_default()
}

fn csv_row(out: &mut String, fields: &[String]) {
    let row: Vec<String> = fields.iter().map(|f| csv_field(f)).collect();
    out.push_str(&row.join(","));
    out.push_str("\r\n");
}

/// Every run as CSV (RFC 4180: header first, CRLF line ends, quoted where
/// needed; seconds with one decimal, empty when `None`).
///
/// Columns: `fault,supervisor,run,seed,detect_s,heal_s,window_s,
/// disruptive_actions,wrong_actions,notes`.
pub fn records_csv(records: &[RunRecord]) -> String {
    let mut out = String::new();
    csv_row(
        &mut out,
        &[
            "fault",
            "supervisor",
            "run",
            "seed",
            "detect_s",
            "heal_s",
            "window_s",
            "disruptive_actions",
            "wrong_actions",
            "notes",
        ]
        .map(String::from),
    );
    for r in records {
        csv_row(
            &mut out,
            &[
                r.fault.to_string(),
                r.supervisor.to_string(),
                r.run.to_string(),
                r.seed.to_string(),
                secs(r.detect_s),
                secs(r.heal_s),
                secs(Some(r.window_s)),
                r.disruptive_actions.to_string(),
                r.wrong_actions.to_string(),
                r.notes.clone(),
            ],
        );
    }
    out
}

/// Every summary as CSV, with the ratios against each baseline.
///
/// Columns: `fault,supervisor,runs,healed,detect_median_s,heal_median_s,
/// heal_max_s,disruptive_actions,wrong_actions,window_s,healer_speedup,
/// healer_speedup_x`: on a baseline's row, `healer_speedup` is
/// spire-healer's [`Speedup`] against that baseline for the fault (as text)
/// and `healer_speedup_x` its ratio (one decimal, when both healed); both
/// are empty on spire-healer's own row and when spire-healer was not run.
pub fn summary_csv(summaries: &[Summary]) -> String {
    let mut out = String::new();
    csv_row(
        &mut out,
        &[
            "fault",
            "supervisor",
            "runs",
            "healed",
            "detect_median_s",
            "heal_median_s",
            "heal_max_s",
            "disruptive_actions",
            "wrong_actions",
            "window_s",
            "healer_speedup",
            "healer_speedup_x",
        ]
        .map(String::from),
    );
    for s in summaries {
        let sp = (s.supervisor != SupervisorKind::Healer)
            .then(|| speedup(summaries, s.fault, s.supervisor))
            .flatten();
        csv_row(
            &mut out,
            &[
                s.fault.to_string(),
                s.supervisor.to_string(),
                s.runs.to_string(),
                s.healed.to_string(),
                secs(s.detect_median_s),
                secs(s.heal_median_s),
                secs(s.heal_max_s),
                s.disruptive_actions.to_string(),
                s.wrong_actions.to_string(),
                secs(Some(s.window_s)),
                sp.map(|x| x.to_string()).unwrap_or_default(),
                secs(sp.and_then(Speedup::ratio)),
            ],
        );
    }
    out
}

/// The supervisors present in `summaries`, in [`SupervisorKind::ALL`] order.
fn supervisors(summaries: &[Summary]) -> Vec<SupervisorKind> {
    SupervisorKind::ALL
        .into_iter()
        .filter(|k| summaries.iter().any(|s| s.supervisor == *k))
        .collect()
}

/// The faults present in `summaries`, in [`Fault::ALL`] order.
fn faults(summaries: &[Summary]) -> Vec<Fault> {
    Fault::ALL
        .into_iter()
        .filter(|f| summaries.iter().any(|s| s.fault == *f))
        .collect()
}

fn md_secs(v: Option<f64>) -> String {
    v.filter(|x| x.is_finite())
        .map(|x| format!("{x:.1} s"))
        .unwrap_or_else(|| "—".into())
}

/// The Markdown table, with the ratios against each baseline.
///
/// One row per fault; for each supervisor present: healed k/n, median time
/// to heal (max), median detect, disruptive, wrong; then one column per
/// baseline present with spire-healer's [`Speedup`] against it. The
/// definitions follow the table.
pub fn markdown(summaries: &[Summary]) -> String {
    let sups = supervisors(summaries);
    let baselines: Vec<SupervisorKind> = sups
        .iter()
        .copied()
        .filter(|k| *k != SupervisorKind::Healer)
        .collect();
    let mut head = vec!["fault".to_string()];
    for k in &sups {
        for col in [
            "healed",
            "time to heal (max)",
            "detect",
            "disruptive",
            "wrong",
        ] {
            head.push(format!("{k} {col}"));
        }
    }
    for b in &baselines {
        head.push(format!("spire-healer vs {b}"));
    }
    let mut out = String::new();
    let _ = writeln!(out, "| {} |", head.join(" | "));
    let _ = writeln!(out, "|{}", "---|".repeat(head.len()));
    for fault in faults(summaries) {
        let mut row = vec![fault.to_string()];
        for k in &sups {
            match summaries
                .iter()
                .find(|s| s.fault == fault && s.supervisor == *k)
            {
                Some(s) => {
                    row.push(format!("{}/{}", s.healed, s.runs));
                    row.push(match s.heal_median_s {
                        Some(_) => {
                            format!("{} ({})", md_secs(s.heal_median_s), md_secs(s.heal_max_s))
                        }
                        None => "not healed".into(),
                    });
                    row.push(md_secs(s.detect_median_s));
                    row.push(s.disruptive_actions.to_string());
                    row.push(s.wrong_actions.to_string());
                }
                None => row.extend(std::iter::repeat_n("not run".to_string(), 5)),
            }
        }
        for b in &baselines {
            row.push(
                speedup(summaries, fault, *b)
                    .map(|x| x.to_string())
                    .unwrap_or_else(|| "—".into()),
            );
        }
        let _ = writeln!(out, "| {} |", row.join(" | "));
    }
    out.push_str(
        "\n- **healed k/n**: runs in which the workload was served a valid SVID again \
         (not expired, chaining to the current bundle, not from a tainted authority) and a \
         handshake with it succeeded within the window, out of the runs made.\n\
         - **time to heal**: injection → healed, median over the healed runs (longest in \
         parentheses); \"not healed\": no run healed within its window.\n\
         - **detect**: injection → the supervisor's first reaction (spire-healer: an incident \
         opened; kubelet: the liveness threshold reached or the exit seen; systemd: the exit \
         seen), median over the runs that reacted; \"—\": never.\n\
         - **disruptive**: restarts, kills, evictions, failovers and pod actions, summed over \
         the runs; **wrong**: actions that could not help or made it worse, summed.\n\
         - **spire-healer vs X**: X's median time to heal divided by spire-healer's: \
         \"N.N× faster\" (spire-healer took 1/N of X's time) or \"N.N× slower\"; \
         \"only spire-healer healed\", \"neither healed\", \"baseline healed, spire-healer did \
         not\" when a side never healed.\n",
    );
    out
}

/// Bar colours per supervisor (colour-blind safe, Dark2).
fn colour(k: SupervisorKind) -> RGBColor {
    match k {
        SupervisorKind::Healer => RGBColor(0x1b, 0x9e, 0x77),
        SupervisorKind::Kubelet => RGBColor(0x37, 0x7e, 0xb8),
        SupervisorKind::Systemd => RGBColor(0xd9, 0x5f, 0x02),
        SupervisorKind::None => RGBColor(0x75, 0x70, 0xb3),
    }
}

const NOT_HEALED: RGBColor = RGBColor(0xcc, 0xcc, 0xcc);
/// Chart width and the part of it kept for the legend (pixels).
const WIDTH: u32 = 1200;
const LEGEND_W: u32 = 250;
/// Room right of the longest bar for its label.
const HEADROOM: f64 = 1.3;

/// The chart of time to heal per fault and supervisor, as SVG at `path`.
///
/// Grouped horizontal bars: one group per fault, one bar per supervisor
/// (median time to heal, labelled in seconds); a gray bar at the window's
/// length, outlined in the supervisor's colour and labelled "not healed",
/// where no run healed. The axis is in seconds from the injection. Text is
/// written as SVG `<text>`, so no font is needed to render it.
///
/// # Errors
/// [`LabError::Io`] when the file cannot be written.
pub fn svg_chart(summaries: &[Summary], path: &Path) -> Result<(), LabError> {
    draw(summaries, path)
        .map_err(|e| LabError::io(format!("drawing {}", path.display()))(std::io::Error::other(e)))
}

fn draw(summaries: &[Summary], path: &Path) -> Result<(), String> {
    let faults = faults(summaries);
    let sups = supervisors(summaries);
    let n = faults.len().max(1);
    let height = u32::try_from(140 + 26 * n * sups.len().max(1)).unwrap_or(4000);
    let root = SVGBackend::new(path, (WIDTH, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let x_max = summaries
        .iter()
        .flat_map(|s| [s.heal_median_s.unwrap_or(0.0), s.window_s])
        .filter(|x| x.is_finite())
        .fold(1.0_f64, f64::max)
        * HEADROOM;
    let n_f = n as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Median time to heal per fault (lower is better)",
            ("sans-serif", 20),
        )
        .margin(16)
        .margin_right(LEGEND_W)
        .x_label_area_size(44)
        .y_label_area_size(170)
        .build_cartesian_2d(0.0..x_max, -0.5..(n_f - 0.5))
        .map_err(|e| e.to_string())?;
    // Fault i sits at y = n - 1 - i (the first at the top).
    let name_at = |y: &f64| -> String {
        let r = y.round();
        if (y - r).abs() > 1e-6 || r < 0.0 || r > n_f - 1.0 {
            return String::new();
        }
        let i = n - 1 - r as usize;
        faults.get(i).map(|f| f.to_string()).unwrap_or_default()
    };
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(n)
        .y_label_formatter(&name_at)
        .x_desc("seconds from injection")
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(|e| e.to_string())?;
    let m = sups.len().max(1) as f64;
    let band = 0.8 / m;
    let label_style =
        TextStyle::from(("sans-serif", 11).into_font()).pos(Pos::new(HPos::Left, VPos::Center));
    for (k_idx, k) in sups.iter().enumerate() {
        let c = colour(*k);
        let mut bars = Vec::new();
        let mut gray = Vec::new();
        let mut labels = Vec::new();
        for (i, fault) in faults.iter().enumerate() {
            let Some(s) = summaries
                .iter()
                .find(|s| s.fault == *fault && s.supervisor == *k)
            else {
                continue;
            };
            let centre = (n - 1 - i) as f64;
            let top = centre + 0.4 - k_idx as f64 * band;
            let bottom = top - band * 0.85;
            let mid = (top + bottom) / 2.0;
            match s.heal_median_s.filter(|x| x.is_finite()) {
                Some(h) => {
                    bars.push(Rectangle::new([(0.0, bottom), (h, top)], c.filled()));
                    labels.push((h, mid, format!("{h:.1} s ({}/{})", s.healed, s.runs)));
                }
                None => {
                    let w = if s.window_s > 0.0 {
                        s.window_s
                    } else {
                        x_max / HEADROOM
                    };
                    gray.push(Rectangle::new(
                        [(0.0, bottom), (w, top)],
                        NOT_HEALED.filled(),
                    ));
                    gray.push(Rectangle::new([(0.0, bottom), (w, top)], c.stroke_width(2)));
                    labels.push((w, mid, format!("not healed (0/{})", s.runs)));
                }
            }
        }
        chart.draw_series(bars).map_err(|e| e.to_string())?;
        chart.draw_series(gray).map_err(|e| e.to_string())?;
        chart
            .draw_series(labels.into_iter().map(|(x, y, text)| {
                EmptyElement::at((x, y)) + Text::new(text, (4, 0), label_style.clone())
            }))
            .map_err(|e| e.to_string())?;
    }
    // The legend, right of the plot (never over a bar).
    let legend_font = TextStyle::from(("sans-serif", 13).into_font());
    let mut entries: Vec<(String, RGBColor)> =
        sups.iter().map(|k| (k.to_string(), colour(*k))).collect();
    entries.push(("not healed within the window".into(), NOT_HEALED));
    let x0 = i32::try_from(WIDTH - LEGEND_W + 12).unwrap_or(0);
    for (row, (label, c)) in entries.into_iter().enumerate() {
        let y = 60 + 22 * i32::try_from(row).unwrap_or(0);
        root.draw(&Rectangle::new([(x0, y), (x0 + 16, y + 12)], c.filled()))
            .map_err(|e| e.to_string())?;
        root.draw(&Text::new(label, (x0 + 24, y), legend_font.clone()))
            .map_err(|e| e.to_string())?;
    }
    root.present().map_err(|e| e.to_string())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(
        fault: Fault,
        supervisor: SupervisorKind,
        run: u32,
        detect_s: Option<f64>,
        heal_s: Option<f64>,
    ) -> RunRecord {
        RunRecord {
            fault,
            supervisor,
            run,
            seed: 7,
            detect_s,
            heal_s,
            window_s: 60.0,
            disruptive_actions: 1,
            wrong_actions: 0,
            notes: String::new(),
        }
    }

    use Fault::*;
    use SupervisorKind as K;

    /// spire-healer heals agent_killed in 2/4/3 s, kubelet in 10/30, systemd
    /// never, none never; on ca_taint only the baseline-free healer runs.
    fn records() -> Vec<RunRecord> {
        vec![
            rec(AgentKilled, K::Kubelet, 0, Some(1.0), Some(10.0)),
            rec(AgentKilled, K::Healer, 0, Some(0.5), Some(2.0)),
            rec(AgentKilled, K::Healer, 1, Some(0.7), Some(4.0)),
            rec(AgentKilled, K::Healer, 2, None, Some(3.0)),
            rec(AgentKilled, K::Kubelet, 1, Some(3.0), Some(30.0)),
            rec(AgentKilled, K::Systemd, 0, Some(0.1), None),
            rec(AgentKilled, K::None, 0, None, None),
            rec(AgentFrozen, K::Healer, 0, None, None),
            rec(AgentFrozen, K::Kubelet, 0, Some(30.0), Some(40.0)),
            rec(AgentFrozen, K::None, 0, None, None),
            rec(CaTaint, K::Healer, 0, Some(1.0), Some(f64::NAN)),
        ]
    }

    #[test]
    fn summaries_group_in_table_order_with_medians_over_healed_runs() {
        let s = summarize(&records());
        let keys: Vec<(Fault, K)> = s.iter().map(|s| (s.fault, s.supervisor)).collect();
        assert_eq!(
            keys,
            [
                (AgentKilled, K::Healer),
                (AgentKilled, K::Kubelet),
                (AgentKilled, K::Systemd),
                (AgentKilled, K::None),
                (AgentFrozen, K::Healer),
                (AgentFrozen, K::Kubelet),
                (AgentFrozen, K::None),
                (CaTaint, K::Healer),
            ]
        );
        type Case = (usize, u32, u32, Option<f64>, Option<f64>, Option<f64>);
        let cases: [Case; 5] = [
            // (index, runs, healed, detect median, heal median, heal max)
            (0, 3, 3, Some(0.6), Some(3.0), Some(4.0)),
            (1, 2, 2, Some(2.0), Some(20.0), Some(30.0)),
            (2, 1, 0, Some(0.1), None, None),
            (4, 1, 0, None, None, None),
            (7, 1, 0, Some(1.0), None, None),
        ];
        for (i, runs, healed, detect, heal, max) in cases {
            let x = &s[i];
            assert_eq!((x.runs, x.healed), (runs, healed), "{x:?}");
            assert_eq!(x.heal_median_s, heal, "{x:?}");
            assert_eq!(x.heal_max_s, max, "{x:?}");
            match (x.detect_median_s, detect) {
                (Some(a), Some(b)) => assert!((a - b).abs() < 1e-9, "{x:?}"),
                (a, b) => assert_eq!(a, b, "{x:?}"),
            }
        }
        assert_eq!(s[0].disruptive_actions, 3);
        assert_eq!(s[0].window_s, 60.0);
        assert!(summarize(&[]).is_empty());
    }

    #[test]
    fn speedups_cover_every_case() {
        let s = summarize(&records());
        let cases = [
            (AgentKilled, K::Kubelet, Some("6.7× faster")),
            (AgentKilled, K::Systemd, Some("only spire-healer healed")),
            (AgentKilled, K::None, Some("only spire-healer healed")),
            (
                AgentFrozen,
                K::Kubelet,
                Some("baseline healed, spire-healer did not"),
            ),
            (AgentFrozen, K::None, Some("neither healed")),
            (AgentFrozen, K::Systemd, None),
            (CaTaint, K::Kubelet, None),
        ];
        for (fault, base, want) in cases {
            let got = speedup(&s, fault, base).map(|x| x.to_string());
            assert_eq!(got.as_deref(), want, "{fault} vs {base}");
        }
        assert_eq!(Speedup::Ratio(0.5).to_string(), "2.0× slower");
        assert_eq!(Speedup::Ratio(1.0).to_string(), "1.0× faster");
        assert_eq!(Speedup::Ratio(f64::INFINITY).to_string(), "∞× faster");
    }

    #[test]
    fn records_csv_quotes_and_formats() {
        let mut r = rec(AgentKilled, K::Healer, 0, Some(0.25), None);
        r.notes = "restarted \"agent-0\", twice\nthen ok".into();
        let csv = records_csv(&[r, rec(SyncLoss, K::Systemd, 3, None, Some(12.04))]);
        let lines: Vec<&str> = csv.split("\r\n").collect();
        assert_eq!(
            lines[0],
            "fault,supervisor,run,seed,detect_s,heal_s,window_s,disruptive_actions,wrong_actions,notes"
        );
        assert_eq!(
            lines[1],
            "agent_killed,spire-healer,0,7,0.2,,60.0,1,0,\"restarted \"\"agent-0\"\", twice\nthen ok\""
        );
        assert_eq!(lines[2], "sync_loss,systemd,3,7,,12.0,60.0,1,0,");
        assert_eq!(lines[3], "");
        assert_eq!(lines.len(), 4);
    }

    #[test]
    fn summary_csv_carries_the_ratios_on_baseline_rows() {
        let csv = summary_csv(&summarize(&records()));
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(
            lines[0],
            "fault,supervisor,runs,healed,detect_median_s,heal_median_s,heal_max_s,disruptive_actions,wrong_actions,window_s,healer_speedup,healer_speedup_x"
        );
        let cases = [
            (1, "agent_killed,spire-healer,3,3,0.6,3.0,4.0,3,0,60.0,,"),
            (
                2,
                "agent_killed,kubelet,2,2,2.0,20.0,30.0,2,0,60.0,6.7× faster,6.7",
            ),
            (
                3,
                "agent_killed,systemd,1,0,0.1,,,1,0,60.0,only spire-healer healed,",
            ),
            (
                6,
                "agent_frozen,kubelet,1,1,30.0,40.0,40.0,1,0,60.0,\"baseline healed, spire-healer did not\",",
            ),
            (7, "agent_frozen,none,1,0,,,,1,0,60.0,neither healed,"),
        ];
        for (i, want) in cases {
            assert_eq!(lines[i], want);
        }
    }

    #[test]
    fn markdown_has_a_row_per_fault_and_the_definitions() {
        let md = markdown(&summarize(&records()));
        let rows: Vec<&str> = md.lines().filter(|l| l.starts_with('|')).collect();
        // Header, separator, three faults.
        assert_eq!(rows.len(), 5, "{md}");
        let cols = rows[0].matches('|').count() - 1;
        assert_eq!(cols, 1 + 4 * 5 + 3, "{}", rows[0]);
        for row in &rows {
            assert_eq!(row.matches('|').count() - 1, cols, "{row}");
        }
        assert!(rows[0].contains("spire-healer vs kubelet"));
        assert!(rows[2].starts_with("| agent_killed | 3/3 | 3.0 s (4.0 s) | 0.6 s | 3 | 0 |"));
        assert!(
            rows[2]
                .ends_with("| 6.7× faster | only spire-healer healed | only spire-healer healed |")
        );
        assert!(rows[3].contains("| not run |"), "{}", rows[3]);
        assert!(rows[4].starts_with("| ca_taint | 0/1 | not healed | 1.0 s |"));
        assert!(md.contains("**healed k/n**") && md.contains("**spire-healer vs X**"));
    }

    /// Tags balance: every opened element is closed, in order.
    fn balanced(xml: &str) -> bool {
        let mut stack: Vec<String> = Vec::new();
        let mut rest = xml;
        while let Some(i) = rest.find('<') {
            rest = &rest[i + 1..];
            let Some(end) = rest.find('>') else {
                return false;
            };
            let tag = &rest[..end];
            rest = &rest[end + 1..];
            if tag.starts_with('?') || tag.starts_with('!') || tag.ends_with('/') {
                continue;
            }
            let name: String = tag
                .trim_start_matches('/')
                .chars()
                .take_while(|c| !c.is_whitespace())
                .collect();
            if tag.starts_with('/') {
                if stack.pop().as_deref() != Some(name.as_str()) {
                    return false;
                }
            } else {
                stack.push(name);
            }
        }
        stack.is_empty()
    }

    #[test]
    fn chart_is_an_svg_with_every_label() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("heal.svg");
        svg_chart(&summarize(&records()), &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.trim_start().starts_with("<svg"), "{}", &svg[..80]);
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(balanced(&svg), "unbalanced tags");
        for want in [
            "agent_killed",
            "agent_frozen",
            "ca_taint",
            "spire-healer",
            "kubelet",
            "systemd",
            "none",
            "not healed (0/1)",
            "not healed within the window",
            "3.0 s (3/3)",
            "seconds from injection",
        ] {
            assert!(svg.contains(want), "{want} missing");
        }
        assert!(!svg.contains("sync_loss"), "a fault not run is not drawn");
        // Nothing to draw is still a chart.
        let empty = dir.path().join("empty.svg");
        svg_chart(&[], &empty).unwrap();
        assert!(balanced(&std::fs::read_to_string(&empty).unwrap()));
    }

    #[test]
    fn chart_into_a_missing_directory_is_an_io_error() {
        let err = svg_chart(
            &summarize(&records()),
            Path::new("/nonexistent-dir/heal.svg"),
        )
        .unwrap_err();
        assert!(matches!(err, LabError::Io { .. }), "{err}");
    }
}
