//! Measure 10: what recording metrics costs the coordinator's steady cycle.
//!
//! Two coordinators on the memory driver, each holding the same number of
//! sets on its own server, cycle alternately (each woken in turn): one was
//! built and ran its first cycle before any metrics recorder existed, so its
//! handles are no-ops (metrics off); the other was built after the
//! Prometheus recorder was installed (metrics on). Both run in the same
//! process at the same time, so the machine's noise hits both alike.
//!
//! It installs a process-wide recorder: it runs last.

use std::time::Duration;

use shardlock_benches::{Row, Samples, Target};
use shardlock_core::{Assignment, CoordinatorHandle, DatabaseId};
use shardlock_memory::MemoryServer;
use tokio::sync::watch;

use crate::coordinated::{sets, start, Switchable};
use crate::micro::ratio_row;
use crate::{err, progress, Ctx};

const M10: &str = "10 steady cycle, metrics recorded vs not";

/// The bench's own poll interval: long, so only its wake-ups cycle.
const POLL: Duration = Duration::from_secs(600);

pub(crate) async fn run(ctx: &mut Ctx) {
    progress("measure 10: metrics cost of a steady cycle");
    let n = ctx.config.pick(1_000, 10_000);
    let row = measure(ctx, n)
        .await
        .unwrap_or_else(|why| Row::not_measured(M10, "memory", Target::None, why));
    ctx.report.push(row);
}

/// Wakes `handle` and waits for the cycle after `after`; answers its
/// duration and number.
async fn one_cycle(
    handle: &CoordinatorHandle,
    rx: &mut watch::Receiver<Assignment>,
    after: u64,
) -> Result<(Duration, u64), String> {
    handle.wake();
    let wait = async {
        loop {
            {
                let a = rx.borrow_and_update();
                if a.cycles > after {
                    if a.owned.iter().any(|s| !s.held) {
                        return Err("a set was lost during the steady state".to_string());
                    }
                    return Ok((a.last_cycle, a.cycles));
                }
            }
            rx.changed()
                .await
                .map_err(|_| "the coordinator stopped".to_string())?;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), wait)
        .await
        .map_err(|_| "no cycle within 60 s".to_string())?
}

/// Starts a coordinator holding `n` sets and waits until it holds them all.
async fn holding(
    n: usize,
    node: &str,
) -> Result<(CoordinatorHandle, watch::Receiver<Assignment>, u64), String> {
    let db = DatabaseId::new(crate::BENCH_DB);
    let distributor = Switchable::default();
    distributor.set(sets(&db, node, n)?);
    // The release window must exceed poll + loss timeout + stop timeout.
    let server = MemoryServer::with_release_window(POLL * 2);
    let handle = start(server.driver(), distributor, node, POLL)?;
    let mut rx = handle.assignment();
    let mut seen = 0;
    for _ in 0..10 {
        let (_, cycles) = one_cycle(&handle, &mut rx, seen).await?;
        seen = cycles;
        let owned = rx.borrow().owned.len();
        if owned == n {
            return Ok((handle, rx, seen));
        }
    }
    Err(format!("{node} did not take its {n} sets"))
}

async fn measure(ctx: &Ctx, n: usize) -> Result<Row, String> {
    // Off: built, and its database's handles registered, before the
    // recorder exists.
    let (off, mut off_rx, mut off_seen) = holding(n, "metrics-off").await?;
    let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .map_err(err)?;
    let (on, mut on_rx, mut on_seen) = holding(n, "metrics-on").await?;
    let rounds = ctx.config.pick(40, 200);
    let (mut ours, mut raw) = (Samples::default(), Samples::default());
    for round in 0..rounds {
        // Which one goes first alternates, so neither always follows the
        // other's cycle.
        for on_turn in [round % 2 == 0, round % 2 == 1] {
            if on_turn {
                let (took, cycles) = one_cycle(&on, &mut on_rx, on_seen).await?;
                on_seen = cycles;
                ours.push(took);
            } else {
                let (took, cycles) = one_cycle(&off, &mut off_rx, off_seen).await?;
                off_seen = cycles;
                raw.push(took);
            }
        }
    }
    let page = prometheus.render();
    if !page.contains("shardlock_cycle_seconds") || page.contains("node=\"metrics-off\"") {
        return Err("the recorder did not see exactly the metrics-on coordinator".into());
    }
    let _ = on.stop().await;
    let _ = off.stop().await;
    let mut row = ratio_row(
        M10,
        "memory",
        format!(
            "N = {n} sets held by each of two coordinators in one process, cycled \
             alternately ({rounds} cycles each, woken in turn, which goes first alternating); \
             ours: built after the Prometheus recorder was installed (every metric recorded); \
             raw: built before it (no-op handles)"
        ),
        &ours,
        &raw,
        Target::RatioAtMost(1.02),
    );
    if n < 10_000 {
        row.note = Some("quick run: N = 1,000; the target is stated for 10,000 sets".into());
    }
    Ok(row)
}
