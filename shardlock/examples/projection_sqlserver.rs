//! A read model on SQL Server with two nodes, one of which is killed
//! mid-stream: the other takes leadership, resumes from the checkpoint, and
//! no event is skipped.
//!
//! ```text
//! cargo run -p shardlock --features sqlserver --example projection_sqlserver -- \
//!     "Server=tcp:127.0.0.1,1433;User Id=sa;Password=...;Database=app;TrustServerCertificate=true"
//! ```
//! (or set `SHARDLOCK_MSSQL_URL`; a `sqlserver://` URL works too). It
//! creates the tables `example_events`, `example_totals` and
//! `subscriptions` in the connection string's database if they are missing.
//! Killing a node's session needs `ALTER ANY CONNECTION` (e.g. `sa`).

use std::sync::Arc;
use std::time::Duration;

use shardlock::sqlserver::{
    DatabaseMapping, MssqlCheckpoints, MssqlDriver, MssqlOptions, TdsClient,
};
use shardlock::{
    BoxError, CancellationToken, CheckpointStore, DatabaseId, DriverLeadership, EventReader,
    NodeId, Positioned, ProjectionBackend, ProjectionError, ProjectionOptions, ProjectionRunner,
    Projector,
};
use tokio::sync::Mutex;

/// tiberius has no pool: the example shares one connection.
type Shared = Arc<Mutex<TdsClient>>;

/// Events are rows of `example_events(position bigint identity, amount bigint)`.
#[derive(Clone)]
struct EventTable(Shared);

impl EventReader for EventTable {
    type Event = i64;

    async fn read_after(&self, after: i64, limit: usize) -> Result<Vec<Positioned<i64>>, BoxError> {
        let limit = i64::try_from(limit)?;
        let rows = self
            .0
            .lock()
            .await
            .query(
                "SELECT TOP (@P2) position, amount FROM example_events WHERE position > @P1 ORDER BY position",
                &[&after, &limit],
            )
            .await?
            .into_first_result()
            .await?;
        rows.iter()
            .map(|row| {
                let position: Option<i64> = row.try_get(0)?;
                let amount: Option<i64> = row.try_get(1)?;
                Ok(Positioned {
                    position: position.ok_or("position is NULL")?,
                    event: amount.ok_or("amount is NULL")?,
                })
            })
            .collect()
    }
}

/// Keeps one row per applied event (idempotent: at-least-once delivery may
/// apply an event twice after a failover).
struct Totals {
    db: Shared,
    node: &'static str,
}

impl Projector for Totals {
    type Event = i64;

    fn name(&self) -> &str {
        "example-totals"
    }

    async fn apply(&self, event: &Positioned<i64>) -> Result<(), BoxError> {
        tokio::time::sleep(Duration::from_millis(5)).await; // some real work
        self.db
            .lock()
            .await
            .execute(
                "INSERT INTO example_totals (position, amount, node)
                 SELECT @P1, @P2, @P3
                 WHERE NOT EXISTS (SELECT 1 FROM example_totals WHERE position = @P1)",
                &[&event.position, &event.event, &self.node],
            )
            .await?;
        Ok(())
    }
}

/// One node: its runner waits for leadership in the database (no polling,
/// no connection per attempt) and takes over as soon as the leader's lock is
/// freed.
fn node(
    options: &MssqlOptions,
    db: &Shared,
    checkpoints: &MssqlCheckpoints,
    name: &'static str,
    cancel: CancellationToken,
) -> tokio::task::JoinHandle<Result<(), ProjectionError>> {
    // The connection string's database: the id is only a label.
    let leadership = DriverLeadership::new(
        MssqlDriver::new(options.clone()),
        DatabaseId::new("main"),
        NodeId::new(name),
    );
    let backend = ProjectionBackend {
        events: EventTable(db.clone()),
        checkpoints: checkpoints.clone(),
        leadership,
    };
    let projector = Totals {
        db: db.clone(),
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

/// Runs a batch without parameters (DDL, setup).
async fn batch(db: &Shared, sql: &str) -> Result<(), BoxError> {
    db.lock()
        .await
        .simple_query(sql)
        .await?
        .into_results()
        .await?;
    Ok(())
}

async fn checkpoint(checkpoints: &MssqlCheckpoints) -> Result<i64, BoxError> {
    Ok(checkpoints
        .load("example-totals")
        .await?
        .map(|c| c.position)
        .unwrap_or(0))
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let url = std::env::args()
        .nth(1)
        .or_else(|| std::env::var("SHARDLOCK_MSSQL_URL").ok())
        .ok_or(
            "give a SQL Server connection string as the first argument or in SHARDLOCK_MSSQL_URL",
        )?;
    // Every id maps to the connection string's database.
    let options = MssqlOptions::parse(&url)?.database_mapping(DatabaseMapping::ConnectionString);
    let main = DatabaseId::new("main");
    let client = MssqlDriver::new(options.clone())
        .connect_client(&main, "example-projection")
        .await?;
    let db: Shared = Arc::new(Mutex::new(client));
    batch(
        &db,
        "IF OBJECT_ID(N'example_events', N'U') IS NULL
            CREATE TABLE example_events (position bigint IDENTITY(1, 1) PRIMARY KEY, amount bigint NOT NULL);
         IF OBJECT_ID(N'example_totals', N'U') IS NULL
            CREATE TABLE example_totals (position bigint PRIMARY KEY, amount bigint NOT NULL, node nvarchar(64) NOT NULL);
         TRUNCATE TABLE example_events;
         TRUNCATE TABLE example_totals;
         DECLARE @i bigint = 1;
         WHILE @i <= 300
         BEGIN
            INSERT INTO example_events (amount) VALUES (@i);
            SET @i = @i + 1;
         END;",
    )
    .await?;
    let checkpoints = MssqlCheckpoints::connect(&options, &main).await?;
    db.lock()
        .await
        .execute(
            "DELETE FROM subscriptions WHERE subscription_name = @P1",
            &[&"example-totals"],
        )
        .await?;

    let cancel = CancellationToken::new();
    let a = node(&options, &db, &checkpoints, "node-a", cancel.clone());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let b = node(&options, &db, &checkpoints, "node-b", cancel.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Kill node-a: its runner stops mid-stream and its server session is
    // ended (as when the process is killed), freeing its leadership lock.
    // KILL takes no variables: the server builds it from the session ids.
    a.abort();
    db.lock()
        .await
        .execute(
            "DECLARE @sql nvarchar(max) = N'';
             SELECT @sql = @sql + N'KILL ' + CAST(session_id AS nvarchar(11)) + N'; '
               FROM sys.dm_exec_sessions WHERE program_name = @P1;
             EXEC (@sql);",
            &[&"shardlock:node-a"],
        )
        .await?;
    let at_kill = checkpoint(&checkpoints).await?;
    println!("node-a killed at checkpoint {at_kill}");

    while checkpoint(&checkpoints).await? < 300 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cancel.cancel();
    b.await??;
    let row = db
        .lock()
        .await
        .simple_query(
            "SELECT COUNT_BIG(*), COUNT_BIG(CASE WHEN node = N'node-b' THEN 1 END) FROM example_totals",
        )
        .await?
        .into_row()
        .await?
        .ok_or("no count")?;
    let rows: i64 = row.try_get(0)?.unwrap_or(0);
    let by_b: i64 = row.try_get(1)?.unwrap_or(0);
    println!("{rows} of 300 events projected, {by_b} of them by node-b after the takeover");
    if rows != 300 {
        return Err(format!("events were skipped: {rows} of 300").into());
    }
    Ok(())
}
