//! A read model on PostgreSQL with two nodes, one of which is killed
//! mid-stream: the other takes leadership, resumes from the checkpoint, and
//! no event is skipped.
//!
//! ```text
//! cargo run -p shardlock --features postgres --example projection_postgres -- postgres://postgres:postgres@127.0.0.1:5432/postgres
//! ```
//! (or set `SHARDLOCK_PG_URL`). It creates the tables `example_events`,
//! `example_totals` and `subscriptions` if they are missing.

use std::time::Duration;

use shardlock::postgres::sqlx::{self, postgres::PgPoolOptions, PgPool};
use shardlock::postgres::{PgCheckpoints, PgDriver, PgOptions};
use shardlock::{
    BoxError, CancellationToken, CheckpointStore, DatabaseId, DriverLeadership, EventReader,
    NodeId, Positioned, ProjectionBackend, ProjectionError, ProjectionOptions, ProjectionRunner,
    Projector,
};

/// Events are rows of `example_events(position bigserial, amount bigint)`.
#[derive(Clone)]
struct EventTable(PgPool);

impl EventReader for EventTable {
    type Event = i64;

    async fn read_after(&self, after: i64, limit: usize) -> Result<Vec<Positioned<i64>>, BoxError> {
        let rows: Vec<(i64, i64)> =
            sqlx::query_as("SELECT position, amount FROM example_events WHERE position > $1 ORDER BY position LIMIT $2")
                .bind(after)
                .bind(i64::try_from(limit)?)
                .fetch_all(&self.0)
                .await?;
        Ok(rows
            .into_iter()
            .map(|(position, event)| Positioned { position, event })
            .collect())
    }
}

/// Keeps one row per applied event (idempotent: at-least-once delivery may
/// apply an event twice after a failover).
struct Totals {
    pool: PgPool,
    node: &'static str,
}

impl Projector for Totals {
    type Event = i64;

    fn name(&self) -> &str {
        "example-totals"
    }

    async fn apply(&self, event: &Positioned<i64>) -> Result<(), BoxError> {
        tokio::time::sleep(Duration::from_millis(5)).await; // some real work
        sqlx::query("INSERT INTO example_totals(position, amount, node) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING")
            .bind(event.position)
            .bind(event.event)
            .bind(self.node)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

/// One node: its runner waits for leadership in the database (no polling,
/// no connection per attempt) and takes over as soon as the leader's lock is
/// freed.
fn node(
    options: &PgOptions,
    pool: &PgPool,
    checkpoints: &PgCheckpoints,
    name: &'static str,
    cancel: CancellationToken,
) -> tokio::task::JoinHandle<Result<(), ProjectionError>> {
    // The URL's database is the default mapping: the id is only a label.
    let leadership = DriverLeadership::new(
        PgDriver::new(options.clone()),
        DatabaseId::new("main"),
        NodeId::new(name),
    );
    let backend = ProjectionBackend {
        events: EventTable(pool.clone()),
        checkpoints: checkpoints.clone(),
        leadership,
    };
    let projector = Totals {
        pool: pool.clone(),
        node: name,
    };
    tokio::spawn(async move {
        ProjectionRunner::new(&projector, &backend)
            .options(
                ProjectionOptions::default()
                    .batch_size(20)
                    .wait_for_leadership(true),
            )
            .run(&cancel)
            .await
    })
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let url = std::env::args()
        .nth(1)
        .or_else(|| std::env::var("SHARDLOCK_PG_URL").ok())
        .ok_or("give a postgres:// URL as the first argument or in SHARDLOCK_PG_URL")?;
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect(&url)
        .await?;
    sqlx::query("CREATE TABLE IF NOT EXISTS example_events(position bigserial PRIMARY KEY, amount bigint NOT NULL)")
        .execute(&pool)
        .await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS example_totals(position bigint PRIMARY KEY, amount bigint NOT NULL, node text NOT NULL)",
    )
    .execute(&pool)
    .await?;
    sqlx::query("TRUNCATE example_events, example_totals RESTART IDENTITY")
        .execute(&pool)
        .await?;
    sqlx::query("DELETE FROM subscriptions WHERE subscription_name = 'example-totals'")
        .execute(&pool)
        .await
        .ok();
    sqlx::query("INSERT INTO example_events(amount) SELECT g FROM generate_series(1, 300) g")
        .execute(&pool)
        .await?;
    let options = PgOptions::parse(&url)?;
    let checkpoints = PgCheckpoints::connect(&options, &DatabaseId::new("main")).await?;

    let cancel = CancellationToken::new();
    let a = node(&options, &pool, &checkpoints, "node-a", cancel.clone());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let b = node(&options, &pool, &checkpoints, "node-b", cancel.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Kill node-a: its runner stops mid-stream and its database session
    // dies (as when the process is killed), freeing its leadership lock.
    a.abort();
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'shardlock:node-a'")
        .execute(&pool)
        .await?;
    let at_kill = checkpoints
        .load("example-totals")
        .await?
        .map(|c| c.position)
        .unwrap_or(0);
    println!("node-a killed at checkpoint {at_kill}");

    loop {
        let cp = checkpoints
            .load("example-totals")
            .await?
            .map(|c| c.position)
            .unwrap_or(0);
        if cp == 300 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cancel.cancel();
    b.await??;
    let (rows, by_b): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE node = 'node-b') FROM example_totals",
    )
    .fetch_one(&pool)
    .await?;
    println!("{rows} of 300 events projected, {by_b} of them by node-b after the takeover");
    if rows != 300 {
        return Err(format!("events were skipped: {rows} of 300").into());
    }
    Ok(())
}
