//! Runs the real `shardlock` binary: the demo on both drivers, and argument
//! errors.

use std::process::{Command, Output};

fn shardlock(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shardlock"))
        .args(args)
        .output()
        .expect("run shardlock")
}

fn summary_line<'a>(stdout: &'a str, needle: &str) -> &'a str {
    stdout
        .lines()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no line with {needle:?}:\n{stdout}"))
}

/// The default demo: real node processes on SQLite, one SIGKILLed, one
/// stopped; the summary comes from the nodes' own records.
#[test]
fn sqlite_process_demo_takes_over_after_kill_without_overlap() {
    // 12 s: the graceful stop comes at 6 s, leaving a loaded CI machine
    // time for the takeover.
    let output = shardlock(&["demo", "--duration", "12", "--plain"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "demo failed: {stdout}\n{stderr}");
    assert!(
        stdout.lines().any(|l| l == "overlaps: 0"),
        "no `overlaps: 0` line:\n{stdout}"
    );
    let kill = summary_line(&stdout, "kill -9 of");
    assert!(
        kill.contains("shards taken over"),
        "no takeover after the kill: {kill}"
    );
    let graceful = summary_line(&stdout, "graceful stop of");
    assert!(
        graceful.contains("shards taken over"),
        "nothing handed over: {graceful}"
    );
    assert!(stdout.contains("killed with SIGKILL"), "{stdout}");
}

#[test]
fn memory_demo_hands_over_without_overlap() {
    let output = shardlock(&["demo", "--driver", "memory", "--duration", "7", "--plain"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "demo failed: {stdout}\n{stderr}");
    assert!(
        stdout.lines().any(|l| l == "overlaps: 0"),
        "no `overlaps: 0` line:\n{stdout}"
    );
    let graceful = summary_line(&stdout, "graceful stop");
    assert!(
        graceful.contains("shards taken over"),
        "graceful stop handed nothing over: {graceful}"
    );
    let sever = summary_line(&stdout, "sever (");
    assert!(
        sever.contains("shards taken over"),
        "no takeover after the sever: {sever}"
    );
    assert!(
        stdout.contains(" moved node-"),
        "no shard moves shown:\n{stdout}"
    );
}

#[test]
fn bad_arguments_get_clear_messages() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["demo", "--nodes", "1"],
            "--nodes must be between 3 and 32",
        ),
        (
            &["demo", "--shards", "0"],
            "--shards must be between 1 and 10000",
        ),
        (&["node", "--driver", "sqlite"], "needs --dir"),
        (&["node", "--driver", "memory"], "lives inside one process"),
        (&["status"], "--dir"),
    ];
    for (args, needle) in cases {
        let output = shardlock(args);
        assert!(!output.status.success(), "{args:?} should fail");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}

#[test]
fn status_refuses_a_folder_that_is_not_a_lock_directory() {
    let output = shardlock(&["status", "--dir", env!("CARGO_MANIFEST_DIR")]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("not a shardlock lock directory"),
        "{stderr}"
    );
}
