//! The results table written into `BENCHMARKS.md`.

use std::fmt::Write as _;
use std::time::Duration;

use crate::stats::fmt_duration;

/// A performance target of a measure.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Target {
    /// No target: the row is informative.
    None,
    /// shardlock's value is at most this multiple of the raw baseline's.
    RatioAtMost(f64),
    /// The checked value (e.g. a p50 or a maximum) is at most this long.
    AtMost(Duration),
    /// The checked count (e.g. statements per operation) is exactly this.
    Exactly(f64),
}

impl Target {
    /// How the target reads in the table.
    pub fn describe(&self) -> String {
        match self {
            Self::None => "—".to_string(),
            Self::RatioAtMost(r) => format!("≤{r:.2}× raw"),
            Self::AtMost(d) => format!("≤{}", fmt_duration(*d)),
            Self::Exactly(n) => format!("{n}"),
        }
    }

    /// Judges a ratio against a [`RatioAtMost`](Self::RatioAtMost) target.
    pub fn judge_ratio(&self, ratio: Option<f64>) -> Verdict {
        match (self, ratio) {
            (Self::RatioAtMost(max), Some(r)) if r <= *max => Verdict::Met,
            (Self::RatioAtMost(_), Some(_)) => Verdict::Missed,
            (Self::RatioAtMost(_), None) => Verdict::NotMeasured,
            _ => Verdict::NoTarget,
        }
    }

    /// Judges a duration against an [`AtMost`](Self::AtMost) target.
    pub fn judge_duration(&self, value: Option<Duration>) -> Verdict {
        match (self, value) {
            (Self::AtMost(max), Some(v)) if v <= *max => Verdict::Met,
            (Self::AtMost(_), Some(_)) => Verdict::Missed,
            (Self::AtMost(_), None) => Verdict::NotMeasured,
            _ => Verdict::NoTarget,
        }
    }

    /// Judges a count against an [`Exactly`](Self::Exactly) target.
    pub fn judge_count(&self, value: Option<f64>) -> Verdict {
        match (self, value) {
            (Self::Exactly(n), Some(v)) if (v - n).abs() < 1e-9 => Verdict::Met,
            (Self::Exactly(_), Some(_)) => Verdict::Missed,
            (Self::Exactly(_), None) => Verdict::NotMeasured,
            _ => Verdict::NoTarget,
        }
    }
}

/// Whether a row meets its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The target is met.
    Met,
    /// The target is missed: the row must carry a note saying why and what
    /// would close the gap.
    Missed,
    /// The row has no target.
    NoTarget,
    /// Nothing was measured (the row says why).
    NotMeasured,
}

impl Verdict {
    fn describe(self) -> &'static str {
        match self {
            Self::Met => "met",
            Self::Missed => "**missed**",
            Self::NoTarget => "—",
            Self::NotMeasured => "not measured",
        }
    }
}

/// One line of the results table.
#[derive(Debug, Clone)]
pub struct Row {
    /// The measure's number and name, e.g. `1 try-acquire + release`.
    pub measure: String,
    /// The driver, e.g. `postgres`.
    pub driver: String,
    /// What exactly was measured (sizes, repetitions).
    pub setup: String,
    /// shardlock's result.
    pub ours: String,
    /// The raw baseline's result.
    pub raw: String,
    /// `ours / raw` of the compared statistic, if both were measured.
    pub ratio: Option<f64>,
    /// The target.
    pub target: Target,
    /// Whether the target is met.
    pub verdict: Verdict,
    /// A footnote: why a target is missed and what would close it, or why
    /// nothing was measured.
    pub note: Option<String>,
}

impl Row {
    /// A row that could not be measured, saying why.
    pub fn not_measured(
        measure: impl Into<String>,
        driver: impl Into<String>,
        target: Target,
        why: impl Into<String>,
    ) -> Self {
        let why = why.into();
        Self {
            measure: measure.into(),
            driver: driver.into(),
            setup: String::new(),
            ours: format!("not measured: {why}"),
            raw: "—".to_string(),
            ratio: None,
            target,
            verdict: if target == Target::None {
                Verdict::NoTarget
            } else {
                Verdict::NotMeasured
            },
            note: None,
        }
    }
}

/// The results of one harness run.
#[derive(Debug, Default)]
pub struct Report {
    rows: Vec<Row>,
}

impl Report {
    /// Adds a row.
    pub fn push(&mut self, row: Row) {
        self.rows.push(row);
    }

    /// The rows so far.
    pub fn rows(&self) -> &[Row] {
        &self.rows
    }

    /// The table and its footnotes as Markdown.
    pub fn to_markdown(&self) -> String {
        let mut out = String::new();
        out.push_str(
            "| measure | driver | setup | shardlock | raw baseline | ratio | target | result |\n\
             |---|---|---|---|---|---|---|---|\n",
        );
        let mut notes = Vec::new();
        for row in &self.rows {
            let mut result = row.verdict.describe().to_string();
            if let Some(note) = &row.note {
                notes.push(note.clone());
                let _ = write!(result, " [{}]", notes.len());
            }
            let ratio = row.ratio.map_or("—".to_string(), |r| format!("{r:.2}×"));
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                cell(&row.measure),
                cell(&row.driver),
                cell(&row.setup),
                cell(&row.ours),
                cell(&row.raw),
                ratio,
                cell(&row.target.describe()),
                result
            );
        }
        if !notes.is_empty() {
            out.push('\n');
            for (i, note) in notes.iter().enumerate() {
                let _ = writeln!(out, "{}. {}", i + 1, note.replace('\n', " "));
            }
        }
        out
    }
}

/// A table cell: pipes escaped, line breaks removed.
fn cell(text: &str) -> String {
    text.replace('|', "\\|").replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_judge_values() {
        let r = Target::RatioAtMost(1.15);
        assert_eq!(r.judge_ratio(Some(1.1)), Verdict::Met);
        assert_eq!(r.judge_ratio(Some(1.2)), Verdict::Missed);
        assert_eq!(r.judge_ratio(None), Verdict::NotMeasured);
        let d = Target::AtMost(Duration::from_millis(1));
        assert_eq!(
            d.judge_duration(Some(Duration::from_micros(900))),
            Verdict::Met
        );
        assert_eq!(
            d.judge_duration(Some(Duration::from_millis(2))),
            Verdict::Missed
        );
        assert_eq!(Target::Exactly(1.0).judge_count(Some(1.0)), Verdict::Met);
        assert_eq!(Target::Exactly(1.0).judge_count(Some(2.0)), Verdict::Missed);
        assert_eq!(Target::None.judge_ratio(Some(9.0)), Verdict::NoTarget);
    }

    #[test]
    fn markdown_numbers_notes_and_escapes_pipes() {
        let mut report = Report::default();
        report.push(Row {
            measure: "1 a|b".into(),
            driver: "postgres".into(),
            setup: "x".into(),
            ours: "1 ms".into(),
            raw: "1 ms".into(),
            ratio: Some(1.234),
            target: Target::RatioAtMost(1.15),
            verdict: Verdict::Missed,
            note: Some("because".into()),
        });
        report.push(Row::not_measured("2", "sqlite", Target::None, "no server"));
        let md = report.to_markdown();
        assert!(md.contains("1 a\\|b"), "{md}");
        assert!(md.contains("1.23×"), "{md}");
        assert!(md.contains("**missed** [1]"), "{md}");
        assert!(md.contains("1. because"), "{md}");
        assert!(md.contains("not measured: no server"), "{md}");
    }
}
