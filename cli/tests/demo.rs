//! Runs the real `shardlock demo` binary and checks its summary.

use std::process::Command;

#[test]
fn demo_hands_over_without_overlap() {
    let output = Command::new(env!("CARGO_BIN_EXE_shardlock"))
        .args(["demo", "--duration", "7", "--plain"])
        .output()
        .expect("run shardlock demo");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "demo failed: {stdout}\n{stderr}");
    assert!(
        stdout.lines().any(|l| l == "overlaps: 0"),
        "no `overlaps: 0` line:\n{stdout}"
    );
    let graceful = stdout
        .lines()
        .find(|l| l.contains("graceful stop"))
        .unwrap_or_else(|| panic!("no graceful-stop summary:\n{stdout}"));
    assert!(
        graceful.contains("shards taken over"),
        "graceful stop handed nothing over: {graceful}"
    );
    let sever = stdout
        .lines()
        .find(|l| l.contains("sever ("))
        .unwrap_or_else(|| panic!("no sever summary:\n{stdout}"));
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
fn demo_rejects_bad_arguments_with_a_message() {
    let output = Command::new(env!("CARGO_BIN_EXE_shardlock"))
        .args(["demo", "--nodes", "1"])
        .output()
        .expect("run shardlock demo");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--nodes must be at least 3"), "{stderr}");
}
