//! `criterion-summary <dir>`: criterion's median estimates as a Markdown
//! table, with the ratio of each `shardlock` benchmark to the `raw` one of
//! the same group.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, Result};
use shardlock_benches::fmt_duration;

/// Reads `<dir>/<group>/<bench>/new/estimates.json` (criterion's layout)
/// and prints one row per group.
pub(crate) fn summary(dir: &Path) -> Result<String> {
    let mut groups: BTreeMap<String, BTreeMap<String, f64>> = BTreeMap::new();
    collect(dir, dir, &mut groups)?;
    let mut out = String::from(
        "| benchmark | shardlock (median) | raw (median) | ratio |\n|---|---|---|---|\n",
    );
    for (group, benches) in &groups {
        let ours = benches.get("shardlock").copied();
        let raw = benches.get("raw").copied();
        let show = |ns: Option<f64>| {
            ns.map_or("—".to_string(), |ns| {
                fmt_duration(Duration::from_nanos(ns.round() as u64))
            })
        };
        let ratio = match (ours, raw) {
            (Some(o), Some(r)) if r > 0.0 => format!("{:.2}×", o / r),
            _ => "—".to_string(),
        };
        let _ = writeln!(
            out,
            "| {group} | {} | {} | {ratio} |",
            show(ours),
            show(raw)
        );
    }
    Ok(out)
}

fn collect(
    root: &Path,
    dir: &Path,
    groups: &mut BTreeMap<String, BTreeMap<String, f64>>,
) -> Result<()> {
    let entries = std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    for entry in entries {
        let path = entry?.path();
        if !path.is_dir() {
            continue;
        }
        let estimates = path.join("new").join("estimates.json");
        if estimates.is_file() {
            let text = std::fs::read_to_string(&estimates)
                .with_context(|| format!("reading {}", estimates.display()))?;
            let Some(median) = median_ns(&text) else {
                continue;
            };
            let rel = path.strip_prefix(root).unwrap_or(&path);
            let bench = rel
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let group = rel
                .parent()
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default();
            groups.entry(group).or_default().insert(bench, median);
        } else if path.file_name().is_some_and(|n| n != "report") {
            collect(root, &path, groups)?;
        }
    }
    Ok(())
}

/// `median.point_estimate` of criterion's `estimates.json`, in nanoseconds,
/// found without a JSON parser: the first number after `"point_estimate":`
/// that follows `"median"`.
fn median_ns(json: &str) -> Option<f64> {
    let after = &json[json.find("\"median\"")?..];
    let value = &after[after.find("\"point_estimate\":")? + "\"point_estimate\":".len()..];
    let end = value
        .find(|c: char| !(c.is_ascii_digit() || matches!(c, '.' | '-' | '+' | 'e' | 'E')))
        .unwrap_or(value.len());
    value[..end].trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_is_read_from_estimates() {
        let json = r#"{"mean":{"confidence_interval":{"confidence_level":0.95,"lower_bound":1.0,"upper_bound":2.0},"point_estimate":1.5,"standard_error":0.1},"median":{"confidence_interval":{"confidence_level":0.95,"lower_bound":1.0,"upper_bound":2.0},"point_estimate":123.25,"standard_error":0.1}}"#;
        assert_eq!(median_ns(json), Some(123.25));
        assert_eq!(median_ns("{}"), None);
    }
}
