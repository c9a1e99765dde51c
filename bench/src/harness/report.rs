//! Result rows, the printed table, and the JSON document.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, Result};
use serde::Serialize;

use super::stats::Latency;

/// One measured variant of a scenario.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// `crypto`, `x509`, `x509-mint-http`, `jwt`, ...
    pub scenario: String,
    /// What was measured within the scenario.
    pub variant: String,
    /// Requests (or threads) in flight at once.
    pub concurrency: usize,
    /// Completed operations.
    pub ops: u64,
    /// Measured wall time.
    pub seconds: f64,
    /// `ops / seconds`.
    pub per_second: f64,
    /// Median latency.
    pub p50_us: f64,
    /// 99th percentile latency.
    pub p99_us: f64,
    /// Slowest operation.
    pub max_us: f64,
    /// Mean latency.
    pub mean_us: f64,
    /// Peak RSS of the server since it started, read at the end of the
    /// variant; `None` when no server runs.
    pub server_peak_rss_kb: Option<u64>,
    /// Peak RSS of the agent; `None` when no agent is in the path.
    pub agent_peak_rss_kb: Option<u64>,
    /// `per_second` over the crypto ceiling of the same kind of credential.
    pub ratio_to_ceiling: Option<f64>,
    /// The budget for this row, in words; empty when none.
    pub budget: String,
    /// Whether the budget holds; `None` when there is none.
    pub budget_met: Option<bool>,
}

impl Row {
    /// A row from a run of `ops` operations in `elapsed` with these latencies.
    pub fn new(
        scenario: &str,
        variant: &str,
        concurrency: usize,
        ops: u64,
        elapsed: Duration,
        lat: Latency,
    ) -> Self {
        let seconds = elapsed.as_secs_f64();
        #[allow(clippy::cast_precision_loss)]
        let per_second = if seconds > 0.0 {
            ops as f64 / seconds
        } else {
            0.0
        };
        Self {
            scenario: scenario.to_owned(),
            variant: variant.to_owned(),
            concurrency,
            ops,
            seconds,
            per_second,
            p50_us: lat.p50_us,
            p99_us: lat.p99_us,
            max_us: lat.max_us,
            mean_us: lat.mean_us,
            server_peak_rss_kb: None,
            agent_peak_rss_kb: None,
            ratio_to_ceiling: None,
            budget: String::new(),
            budget_met: None,
        }
    }

    /// The progress line printed on stderr when a variant ends.
    pub fn progress(&self) -> String {
        format!(
            "mayfly-bench: {} {} c={}: {:.0}/s, p50 {:.0} µs, p99 {:.0} µs ({} ops in {:.1} s)",
            self.scenario,
            self.variant,
            self.concurrency,
            self.per_second,
            self.p50_us,
            self.p99_us,
            self.ops,
            self.seconds
        )
    }
}

/// The machine the figures come from.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// Logical CPUs available to this process.
    pub cores: usize,
    /// `model name` from /proc/cpuinfo.
    pub model: String,
    /// The 1, 5 and 15 minute load averages when the run started.
    pub load_average_at_start: [f64; 3],
}

impl Machine {
    /// Reads the machine's facts now.
    pub fn now() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        let model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("model name"))
                    .and_then(|v| v.split_once(':'))
                    .map(|(_, v)| v.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".into());
        Self {
            cores,
            model,
            load_average_at_start: load_average(),
        }
    }
}

/// The load averages from /proc/loadavg (zeros when unreadable).
pub fn load_average() -> [f64; 3] {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut it = text.split_whitespace().map(|v| v.parse().unwrap_or(0.0));
    [
        it.next().unwrap_or(0.0),
        it.next().unwrap_or(0.0),
        it.next().unwrap_or(0.0),
    ]
}

/// Every row of a run and where it ran.
#[derive(Debug, Serialize)]
pub struct Report {
    /// The machine.
    pub machine: Machine,
    /// `git rev-parse HEAD` of the working directory, when available.
    pub git_commit: Option<String>,
    /// Whether this was a `--smoke` run (figures are then not meaningful).
    pub smoke: bool,
    /// The rows, in the order measured.
    pub rows: Vec<Row>,
}

impl Report {
    /// An empty report for a run starting now.
    pub fn new(smoke: bool) -> Self {
        Self {
            machine: Machine::now(),
            git_commit: git_commit(),
            smoke,
            rows: Vec::new(),
        }
    }

    /// The rows as an aligned text table.
    pub fn table(&self) -> String {
        let header = [
            "scenario", "variant", "conc", "ops", "per s", "p50 µs", "p99 µs", "srv MB", "agt MB",
            "× ceil", "budget",
        ];
        let mb = |kb: Option<u64>| {
            #[allow(clippy::cast_precision_loss)]
            kb.map_or_else(|| "-".to_owned(), |k| format!("{:.1}", k as f64 / 1024.0))
        };
        let lines: Vec<Vec<String>> = self
            .rows
            .iter()
            .map(|r| {
                vec![
                    r.scenario.clone(),
                    r.variant.clone(),
                    r.concurrency.to_string(),
                    r.ops.to_string(),
                    format!("{:.0}", r.per_second),
                    format!("{:.0}", r.p50_us),
                    format!("{:.0}", r.p99_us),
                    mb(r.server_peak_rss_kb),
                    mb(r.agent_peak_rss_kb),
                    r.ratio_to_ceiling
                        .map_or_else(|| "-".to_owned(), |v| format!("{v:.2}")),
                    match r.budget_met {
                        None => String::new(),
                        Some(true) => format!("met: {}", r.budget),
                        Some(false) => format!("NOT met: {}", r.budget),
                    },
                ]
            })
            .collect();
        let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
        for l in &lines {
            for (w, cell) in widths.iter_mut().zip(l) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let last = header.len() - 1;
        let fmt_line = |cells: &[String]| {
            let mut out = String::new();
            for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
                let pad = w.saturating_sub(cell.chars().count());
                // Text columns left-aligned, figures right-aligned.
                if i < 2 || i == last {
                    out.push_str(cell);
                    if i != last {
                        out.push_str(&" ".repeat(pad));
                    }
                } else {
                    out.push_str(&" ".repeat(pad));
                    out.push_str(cell);
                }
                if i != last {
                    out.push_str("  ");
                }
            }
            out.trim_end().to_owned()
        };
        let header: Vec<String> = header.iter().map(|h| (*h).to_owned()).collect();
        let mut out = fmt_line(&header);
        out.push('\n');
        for l in &lines {
            out.push_str(&fmt_line(l));
            out.push('\n');
        }
        let [l1, l5, l15] = self.machine.load_average_at_start;
        out.push_str(&format!(
            "{} CPU(s), {}; load average at start {l1:.2} {l5:.2} {l15:.2}{}\n",
            self.machine.cores,
            self.machine.model,
            if self.smoke {
                "; SMOKE RUN: the figures mean nothing"
            } else {
                ""
            }
        ));
        out
    }

    /// Writes the report as pretty JSON to `path`.
    pub fn write_json(&self, path: &Path) -> Result<()> {
        std::fs::write(path, serde_json::to_string_pretty(self)? + "\n")
            .with_context(|| format!("cannot write {}", path.display()))
    }
}

fn git_commit() -> Option<String> {
    let out = std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        .filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(scenario: &str, per_second_ops: u64) -> Row {
        let lat = Latency {
            p50_us: 100.0,
            p99_us: 900.0,
            max_us: 1000.0,
            mean_us: 150.0,
        };
        Row::new(
            scenario,
            "v",
            8,
            2 * per_second_ops,
            Duration::from_secs(2),
            lat,
        )
    }

    #[test]
    fn table_columns_line_up() {
        let mut report = Report::new(false);
        report.rows.push(row("crypto", 12345));
        let mut r = row("x509-mint-http", 7);
        r.server_peak_rss_kb = Some(2048);
        r.budget = "≥ 70% of ceiling".into();
        r.budget_met = Some(false);
        report.rows.push(r);
        let table = report.table();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4, "{table}");
        // The "per s" column ends at the same character on every line.
        let col_end = |line: &str, token: &str| {
            let byte = line.find(token).unwrap() + token.len();
            line[..byte].chars().count()
        };
        let header_end = col_end(lines[0], "per s");
        assert_eq!(col_end(lines[1], " 12345"), header_end, "{table}");
        assert_eq!(col_end(lines[2], " 7 "), header_end + 1, "{table}");
        assert!(lines[2].contains("2.0"), "{table}");
        assert!(lines[2].ends_with("NOT met: ≥ 70% of ceiling"), "{table}");
    }

    #[test]
    fn json_has_machine_and_rows() {
        let mut report = Report::new(true);
        report.rows.push(row("jwt", 20));
        let v = serde_json::to_value(&report).unwrap();
        assert!(v["machine"]["cores"].as_u64().unwrap() >= 1);
        assert_eq!(v["rows"][0]["scenario"], "jwt");
        assert_eq!(v["rows"][0]["per_second"], 20.0);
        assert_eq!(v["rows"][0]["ops"], 40);
        assert!(v["rows"][0]["budget_met"].is_null());
        assert!(v["rows"][0]["ratio_to_ceiling"].is_null());
    }
}
