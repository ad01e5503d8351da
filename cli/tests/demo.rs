//! Runs the real `shardlock` binary: the demo on both drivers (balanced and,
//! for comparison, single-tenant), `status` with balanced nodes, and
//! argument errors.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

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

/// The summary's phase lines, `  phase N, <event>: <counts> (<per node>),
/// settled ...`, as (event, counts); fails on a phase that did not settle.
fn phases(stdout: &str) -> Vec<(String, String)> {
    let out: Vec<(String, String)> = stdout
        .lines()
        .filter(|l| l.starts_with("  phase "))
        .map(|l| {
            assert!(
                l.contains(", settled "),
                "phase did not settle: {l}\n{stdout}"
            );
            let (head, rest) = l.split_once(": ").expect("phase line shape");
            let counts = rest.split(' ').next().expect("counts");
            (head.to_string(), counts.to_string())
        })
        .collect();
    assert_eq!(out.len(), 4, "four phases in the summary:\n{stdout}");
    out
}

fn counts(phases: &[(String, String)]) -> Vec<&str> {
    phases.iter().map(|(_, c)| c.as_str()).collect()
}

fn assert_demo_ok(output: &Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "demo failed: {stdout}\n{stderr}");
    assert!(
        stdout.lines().any(|l| l == "overlaps: 0"),
        "no `overlaps: 0` line:\n{stdout}"
    );
    stdout
}

/// The default demo: real balanced node processes on SQLite: 4/4/4, one
/// SIGKILLed (6/6), one stopped (12), one started (6/6); the summary comes
/// from the nodes' own records.
#[test]
fn sqlite_process_demo_balances_through_kill_stop_and_join() {
    let stdout = assert_demo_ok(&shardlock(&["demo", "--plain"]));
    let phases = phases(&stdout);
    assert_eq!(counts(&phases), ["4/4/4", "6/6", "12", "6/6"], "{stdout}");
    assert!(phases[1].0.contains("kill -9 of"), "{phases:?}");
    assert!(phases[2].0.contains("graceful stop of"), "{phases:?}");
    assert!(phases[3].0.contains("start of node-4"), "{phases:?}");
    let kill = summary_line(&stdout, "  kill -9 of");
    assert!(
        kill.contains("4 shards taken over"),
        "the killed node's 4 shards taken over: {kill}"
    );
    let graceful = summary_line(&stdout, "  graceful stop of");
    assert!(
        graceful.contains("6 shards taken over"),
        "the stopped node's 6 shards handed over: {graceful}"
    );
    assert!(stdout.contains("killed with SIGKILL"), "{stdout}");
    // Each node's balance comes from its `assignment` records.
    let last = summary_line(&stdout, "  node-4: ");
    assert!(last.contains("share 6 (2 members)"), "{last}");
}

#[test]
fn memory_demo_balances_through_crash_stop_and_join() {
    let stdout = assert_demo_ok(&shardlock(&["demo", "--driver", "memory", "--plain"]));
    let phases = phases(&stdout);
    assert_eq!(counts(&phases), ["4/4/4", "6/6", "12", "6/6"], "{stdout}");
    let graceful = summary_line(&stdout, "  graceful stop of");
    assert!(
        graceful.contains("6 shards taken over"),
        "graceful stop handed 6 shards over: {graceful}"
    );
    let join = summary_line(&stdout, "  start of node-4");
    assert!(
        join.contains("6 shards taken over"),
        "6 shards moved to the new node: {join}"
    );
    assert!(
        stdout.contains(" moved node-"),
        "no shard moves shown:\n{stdout}"
    );
}

/// With `--sever` the crash is a network cut: the node fences itself, the
/// others take its shards once the server frees its locks.
#[test]
fn memory_demo_sever_fences_then_rebalances() {
    let stdout = assert_demo_ok(&shardlock(&[
        "demo", "--driver", "memory", "--sever", "--plain",
    ]));
    assert_eq!(
        counts(&phases(&stdout)),
        ["4/4/4", "6/6", "12", "6/6"],
        "{stdout}"
    );
    assert!(stdout.contains("fenced itself"), "{stdout}");
    let sever = summary_line(&stdout, "  sever of");
    assert!(sever.contains("4 shards taken over"), "{sever}");
}

/// Without balancing the first node takes everything and the others stand
/// by, also the node started last.
#[test]
fn memory_demo_single_tenant_keeps_standbys() {
    let stdout = assert_demo_ok(&shardlock(&[
        "demo",
        "--driver",
        "memory",
        "--distributor",
        "single-tenant",
        "--plain",
    ]));
    let phases = phases(&stdout);
    let mut first: Vec<&str> = phases[0].1.split('/').collect();
    first.sort_unstable();
    assert_eq!(
        first,
        ["0", "0", "12"],
        "one node runs everything: {phases:?}"
    );
    assert_eq!(phases[2].1, "12", "{phases:?}");
    assert_eq!(phases[3].1, "12/0", "the new node stands by: {phases:?}");
}

/// Two balanced SQLite nodes, weights 1 and 2: `status` shows their member
/// slots and sets, in the table and in JSON.
#[test]
fn status_shows_balanced_members() {
    let dir = std::env::temp_dir().join(format!("shardlock-cli-status-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let dir_s = dir.display().to_string();
    let node = |id: &str, weight: &str| {
        Command::new(env!("CARGO_BIN_EXE_shardlock"))
            .args([
                "node",
                "--driver",
                "sqlite",
                "--dir",
                &dir_s,
                "--node-id",
                id,
            ])
            .args([
                "--weight",
                weight,
                "--poll-ms",
                "200",
                "--stop-on-stdin-eof",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start node")
    };
    let mut nodes = [node("light", "1"), node("heavy", "2")];
    // Hang guard only: the nodes settle within a few polls.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (table, holders) = loop {
        let out = shardlock(&["status", "--dir", &dir_s, "--json"]);
        let doc: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        let holders: Vec<(String, usize, usize)> = doc["members"][0]["holders"]
            .as_array()
            .map(|hs| {
                let mut v: Vec<_> = hs
                    .iter()
                    .map(|h| {
                        (
                            h["holder"].as_str().unwrap_or("").to_string(),
                            h["slots"].as_array().map_or(0, Vec::len),
                            h["sets"].as_u64().unwrap_or(0) as usize,
                        )
                    })
                    .collect();
                v.sort();
                v
            })
            .unwrap_or_default();
        if holders == [("heavy".to_string(), 2, 8), ("light".to_string(), 1, 4)] {
            let table = shardlock(&["status", "--dir", &dir_s]);
            break (String::from_utf8_lossy(&table.stdout).to_string(), doc);
        }
        assert!(
            Instant::now() < deadline,
            "status never showed heavy 2 slots 8 sets, light 1 slot 4 sets: {holders:?}\n{doc}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(holders["members"][0]["group"], "main:app", "{holders}");
    assert_eq!(holders["members"][0]["live"], 3, "{holders}");
    assert_eq!(
        holders["locks"].as_array().map(Vec::len),
        Some(15),
        "12 sets and 3 member slots: {holders}"
    );
    assert!(
        table.contains("balancing group main:app in main: 3 live member slots (0,1,2 of 64)"),
        "{table}"
    );
    assert!(table.contains("members:main:app:0"), "{table}");
    for n in &mut nodes {
        drop(n.stdin.take());
    }
    for n in &mut nodes {
        assert!(
            n.wait().expect("node exit").success(),
            "graceful stop exits 0"
        );
    }
    let after = shardlock(&["status", "--dir", &dir_s]);
    let after = String::from_utf8_lossy(&after.stdout);
    assert!(after.contains("no locks held"), "{after}");
    assert!(after.contains("no live members"), "{after}");
    let _ = std::fs::remove_dir_all(&dir);
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
        (&["demo", "--sever"], "--sever needs --driver memory"),
        (&["node", "--driver", "sqlite"], "needs --dir"),
        (&["node", "--driver", "memory"], "lives inside one process"),
        (
            &[
                "node",
                "--driver",
                "sqlite",
                "--dir",
                "/nonexistent",
                "--distributor",
                "single-tenant",
                "--weight",
                "2",
            ],
            "need --distributor balanced",
        ),
        (
            &[
                "node",
                "--driver",
                "sqlite",
                "--dir",
                "/nonexistent",
                "--weight",
                "0",
            ],
            "weight must be within",
        ),
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
