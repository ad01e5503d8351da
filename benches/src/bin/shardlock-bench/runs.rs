//! `shardlock-bench median-of OUT RUN...`: one table from several runs of
//! the harness, each row the median run's row.
//!
//! One run is one process (the metrics measure installs a process-wide
//! recorder, and every run should start cold alike), so `scripts/bench.sh`
//! runs the harness N times and merges their Markdown here. Rows are matched
//! by measure, driver and their order among the rows with that measure and
//! driver. Of the runs' rows the one with the median **ratio** is kept whole
//! (its shardlock and raw values and its verdict belong together); a row
//! without a ratio is ranked by shardlock's value (a duration or a number);
//! one with neither keeps the first run's row. The setup cell then lists
//! every run's value, so the spread is in the table.

use std::fmt::Write as _;

use anyhow::{bail, Context as _, Result};

/// A parsed table row: its eight cells and its footnote, if any.
#[derive(Debug, Clone, PartialEq)]
struct Row {
    cells: Vec<String>,
    note: Option<String>,
}

/// One harness output: the text before the table, and the rows.
#[derive(Debug)]
struct Run {
    preamble: String,
    rows: Vec<Row>,
}

const HEADER: &str =
    "| measure | driver | setup | shardlock | raw baseline | ratio | target | result |";

/// Splits a table line into cells, keeping escaped pipes (`\|`) inside.
fn cells(line: &str) -> Vec<String> {
    let inner = line.trim().trim_start_matches('|');
    let inner = inner.strip_suffix('|').unwrap_or(inner);
    let mut out = Vec::new();
    let mut cell = String::new();
    let mut chars = inner.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'|') => {
                cell.push_str("\\|");
                chars.next();
            }
            '|' => out.push(std::mem::take(&mut cell).trim().to_string()),
            _ => cell.push(c),
        }
    }
    out.push(cell.trim().to_string());
    out
}

/// The footnote number a result cell points at (`**missed** [3]`).
fn note_ref(result: &str) -> Option<usize> {
    let open = result.rfind('[')?;
    result[open + 1..].strip_suffix(']')?.parse().ok()
}

fn parse(text: &str) -> Result<Run> {
    let start = text
        .find(HEADER)
        .context("no results table (is this a shardlock-bench output?)")?;
    let preamble = text[..start].trim_end().to_string();
    let mut rows = Vec::new();
    let mut notes = std::collections::HashMap::new();
    for line in text[start..].lines().skip(2) {
        let line = line.trim();
        if line.starts_with('|') {
            let cells = cells(line);
            if cells.len() != 8 {
                bail!("a row with {} cells, not 8: {line}", cells.len());
            }
            rows.push(Row { cells, note: None });
        } else if let Some((n, text)) = line.split_once(". ") {
            if let Ok(n) = n.parse::<usize>() {
                notes.insert(n, text.to_string());
            }
        }
    }
    for row in &mut rows {
        if let Some(n) = note_ref(&row.cells[7]) {
            row.note = notes.get(&n).cloned();
            let plain = row.cells[7][..row.cells[7].rfind('[').unwrap_or(row.cells[7].len())]
                .trim_end()
                .to_string();
            row.cells[7] = plain;
        }
    }
    Ok(Run { preamble, rows })
}

/// A ratio cell (`1.17×`).
fn ratio(cell: &str) -> Option<f64> {
    cell.strip_suffix('×')?.trim().parse().ok()
}

/// A value cell: a duration in seconds (`5.33 ms`, `196 µs`, `1.2 s`,
/// `840 ns`), else the first number in it.
fn value(cell: &str) -> Option<f64> {
    let mut parts = cell.split_whitespace();
    let number: f64 = parts.next()?.replace(',', "").parse().ok()?;
    let scale = match parts.next() {
        Some("ns") => 1e-9,
        Some("µs" | "us") => 1e-6,
        Some("ms") => 1e-3,
        Some("s") => 1.0,
        _ => 1.0,
    };
    Some(number * scale)
}

/// The rank of a row among its runs' rows, and how it reads in the list.
fn rank(row: &Row) -> Option<(f64, String)> {
    if let Some(r) = ratio(&row.cells[5]) {
        return Some((r, row.cells[5].clone()));
    }
    value(&row.cells[3]).map(|v| (v, row.cells[3].clone()))
}

/// Merges runs: see the module docs.
fn merge(runs: &[Run]) -> Result<String> {
    let Some(first) = runs.first() else {
        bail!("no runs to merge");
    };
    let key = |row: &Row| (row.cells[0].clone(), row.cells[1].clone());
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}\n\nEach row below is the median of {} runs of the harness (one process each), by \
         ratio, else by shardlock's value; the setup cell lists every run's value.\n",
        first.preamble,
        runs.len()
    );
    let _ = writeln!(out, "{HEADER}\n|---|---|---|---|---|---|---|---|");
    let mut notes: Vec<String> = Vec::new();
    let mut seen: std::collections::HashMap<(String, String), usize> = Default::default();
    for row in &first.rows {
        let k = key(row);
        let nth = {
            let n = seen.entry(k.clone()).or_default();
            *n += 1;
            *n - 1
        };
        let candidates: Vec<&Row> = runs
            .iter()
            .filter_map(|run| run.rows.iter().filter(|r| key(r) == k).nth(nth))
            .collect();
        let ranked: Option<Vec<(f64, String, &Row)>> = candidates
            .iter()
            .map(|r| rank(r).map(|(v, text)| (v, text, *r)))
            .collect();
        let mut chosen = row.clone();
        if let Some(mut ranked) = ranked.filter(|r| r.len() == runs.len() && r.len() > 1) {
            let listed: Vec<String> = ranked.iter().map(|(_, text, _)| text.clone()).collect();
            ranked.sort_by(|a, b| a.0.total_cmp(&b.0));
            chosen = ranked[(ranked.len() - 1) / 2].2.clone();
            let sep = if chosen.cells[2].is_empty() { "" } else { "; " };
            chosen.cells[2] = format!(
                "{}{sep}median of {} runs: {}",
                chosen.cells[2],
                runs.len(),
                listed.join(", ")
            );
        }
        let mut result = chosen.cells[7].clone();
        if let Some(note) = &chosen.note {
            notes.push(note.clone());
            let _ = write!(result, " [{}]", notes.len());
        }
        chosen.cells[7] = result;
        let _ = writeln!(out, "| {} |", chosen.cells.join(" | "));
    }
    if !notes.is_empty() {
        out.push('\n');
        for (i, note) in notes.iter().enumerate() {
            let _ = writeln!(out, "{}. {note}", i + 1);
        }
    }
    Ok(out)
}

/// `median-of OUT RUN...`.
pub(crate) fn median_of(args: &[String]) -> Result<()> {
    let (out, inputs) = args
        .split_first()
        .context("usage: median-of <out.md> <run1.md> <run2.md> ...")?;
    if inputs.is_empty() {
        bail!("usage: median-of <out.md> <run1.md> <run2.md> ...");
    }
    let runs = inputs
        .iter()
        .map(|path| {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
            parse(&text).with_context(|| format!("parsing {path}"))
        })
        .collect::<Result<Vec<_>>>()?;
    std::fs::write(out, merge(&runs)?).with_context(|| format!("writing {out}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(rows: &[(&str, &str, &str, &str, Option<&str>)]) -> String {
        let mut t = format!("PostgreSQL: 15\n\n{HEADER}\n|---|---|---|---|---|---|---|---|\n");
        let mut notes = Vec::new();
        for (measure, ours, ratio, verdict, note) in rows {
            let mut result = verdict.to_string();
            if let Some(n) = note {
                notes.push(n.to_string());
                result = format!("{result} [{}]", notes.len());
            }
            t.push_str(&format!(
                "| {measure} | postgres | N = 1 \\| x | {ours} | 1 ms | {ratio} | ≤1.20× raw | {result} |\n"
            ));
        }
        t.push('\n');
        for (i, n) in notes.iter().enumerate() {
            t.push_str(&format!("{}. {n}\n", i + 1));
        }
        t
    }

    #[test]
    fn keeps_the_median_row_whole_and_lists_the_runs() {
        let runs: Vec<Run> = [
            table(&[
                ("2 batch", "1.3 ms", "1.30×", "**missed**", Some("slow a")),
                ("5 cpu", "4 ms", "—", "—", None),
            ]),
            table(&[
                ("2 batch", "1.1 ms", "1.10×", "met", None),
                ("5 cpu", "2 ms", "—", "—", None),
            ]),
            table(&[
                ("2 batch", "1.25 ms", "1.25×", "**missed**", Some("slow c")),
                ("5 cpu", "900 µs", "—", "—", None),
            ]),
        ]
        .iter()
        .map(|t| parse(t).unwrap())
        .collect();
        let md = merge(&runs).unwrap();
        assert!(md.contains("| 2 batch | postgres | N = 1 \\| x; median of 3 runs: 1.30×, 1.10×, 1.25× | 1.25 ms | 1 ms | 1.25× | ≤1.20× raw | **missed** [1] |"), "{md}");
        assert!(md.contains("1. slow c"), "{md}");
        assert!(!md.contains("slow a"), "{md}");
        assert!(
            md.contains(
                "| 5 cpu | postgres | N = 1 \\| x; median of 3 runs: 4 ms, 2 ms, 900 µs | 2 ms |"
            ),
            "{md}"
        );
        assert!(md.starts_with("PostgreSQL: 15"), "{md}");
    }

    #[test]
    fn rows_that_cannot_be_ranked_keep_the_first_run() {
        let a = parse(&table(&[(
            "4 crash",
            "not measured: no server",
            "—",
            "not measured",
            None,
        )]))
        .unwrap();
        let b = parse(&table(&[("4 crash", "3 ms", "1.00×", "met", None)])).unwrap();
        let md = merge(&[a, b]).unwrap();
        assert!(
            md.contains("| 4 crash | postgres | N = 1 \\| x | not measured: no server |"),
            "{md}"
        );
    }

    #[test]
    fn values_read_units() {
        let close = |cell: &str, want: f64| value(cell).is_some_and(|v| (v - want).abs() < 1e-12);
        assert!(close("5.33 ms", 5.33e-3));
        assert!(close("196 µs p50", 196e-6));
        assert_eq!(value("1,000 statements"), Some(1000.0));
        assert_eq!(value("not measured"), None);
        assert_eq!(ratio("1.17×"), Some(1.17));
        assert_eq!(cells("| a \\| b | c |"), vec!["a \\| b", "c"]);
    }
}
