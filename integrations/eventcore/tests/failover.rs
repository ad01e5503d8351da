//! End to end across processes: two `eventcore-node` processes (the crate's
//! example) run one eventcore projection over SQLite; the leader is killed
//! with SIGKILL mid-stream and the follower resumes from its checkpoint.
#![cfg(all(unix, feature = "sqlite"))]

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use shardlock_core::CheckpointStore as _;
use shardlock_eventcore::{position_prefix, PositionTable as _, SqlitePositions};
use shardlock_sqlite::SqliteCheckpoints;

const EVENTS: u64 = 400;

fn program() -> PathBuf {
    let program = shardlock_contract_tests::holder::example("eventcore-node");
    assert!(
        program.exists(),
        "{} is missing: run `cargo build -p shardlock-eventcore --examples`",
        program.display()
    );
    program
}

fn node(dir: &Path, name: &str) -> Child {
    Command::new(program())
        .args([
            "run",
            &dir.to_string_lossy(),
            name,
            "--exit-on-eof",
            "--pace-ms",
            "2",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start eventcore-node: {e}"))
}

/// `applied.log` as (node, event number) lines.
fn applied(dir: &Path) -> Vec<(String, u64)> {
    let text = std::fs::read_to_string(dir.join("applied.log")).unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let (node, n) = line.split_once(' ')?;
            Some((node.to_string(), n.parse().ok()?))
        })
        .collect()
}

fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(
            started.elapsed() < limit,
            "{what} did not happen within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projection_failover_sqlite_kill_9() {
    let dir = common::temp_dir("failover");
    let seeded = Command::new(program())
        .args(["seed", &dir.to_string_lossy(), &EVENTS.to_string()])
        .status()
        .unwrap_or_else(|e| panic!("cannot run eventcore-node seed: {e}"));
    assert!(seeded.success(), "seeding failed: {seeded}");

    let mut a = node(&dir, "node-a");
    wait_for("node-a applying 60 events", Duration::from_secs(30), || {
        applied(&dir).len() >= 60
    });
    let mut b = node(&dir, "node-b");
    // node-b is a follower: it waits in the database.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        applied(&dir).iter().all(|(n, _)| n == "node-a"),
        "node-b applied events while node-a led"
    );

    // SIGKILL: no clean-up in node-a; the kernel frees its SQLite locks.
    a.kill().unwrap_or_else(|e| panic!("kill node-a: {e}"));
    let _ = a.wait();
    let by_a = applied(&dir).len();
    assert!(
        (by_a as u64) < EVENTS,
        "node-a finished before it was killed"
    );

    wait_for(
        "node-b applying every event",
        Duration::from_secs(60),
        || {
            applied(&dir)
                .iter()
                .any(|(n, e)| n == "node-b" && *e == EVENTS)
        },
    );
    drop(b.stdin.take());
    let status = b.wait().unwrap_or_else(|e| panic!("wait node-b: {e}"));
    assert!(status.success(), "node-b exited with {status}");

    let lines = applied(&dir);
    let of = |node: &str| -> Vec<u64> {
        lines
            .iter()
            .filter(|(n, _)| n == node)
            .map(|(_, e)| *e)
            .collect()
    };
    let (a_events, b_events) = (of("node-a"), of("node-b"));
    // Each node applied a contiguous run, in order.
    assert_eq!(a_events, (1..=a_events.len() as u64).collect::<Vec<_>>());
    let a_last = *a_events.last().unwrap_or(&0);
    let b_first = *b_events.first().unwrap_or(&0);
    assert_eq!(b_events, (b_first..=EVENTS).collect::<Vec<_>>());
    // No event lost; at most the one node-a applied but had not checkpointed
    // when it died is applied again.
    assert!(
        b_first == a_last || b_first == a_last + 1,
        "node-b started at {b_first}, node-a's last event was {a_last}"
    );
    let mut counts: BTreeMap<u64, usize> = BTreeMap::new();
    for (_, e) in &lines {
        *counts.entry(*e).or_default() += 1;
    }
    assert_eq!(counts.len() as u64, EVENTS, "events missing");
    let twice: Vec<u64> = counts
        .iter()
        .filter(|(_, c)| **c > 1)
        .map(|(e, _)| *e)
        .collect();
    assert!(twice.len() <= 1, "applied twice: {twice:?}");

    // Two leaders, two claims; the checkpoint is the last event's.
    let file = dir.join("checkpoints.db");
    let store = SqliteCheckpoints::connect(&file)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let row = store
        .load("ledger")
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("no checkpoint row"));
    assert_eq!(row.epoch, 2, "epochs claimed: node-a, then node-b");
    let positions = SqlitePositions::connect(&file)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let last = positions
        .load("ledger")
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("no position"));
    assert_eq!(row.position, position_prefix(last));
    println!(
        "failover: node-a applied 1..={a_last} and was killed (SIGKILL); node-b resumed at \
         {b_first} and applied through {EVENTS}; applied twice: {twice:?}; epoch {}",
        row.epoch
    );
    let _ = std::fs::remove_dir_all(&dir);
}
