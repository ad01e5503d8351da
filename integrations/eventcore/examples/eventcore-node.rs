//! A node running an eventcore projection under shardlock leadership, on
//! SQLite: any number of these processes on one host share a folder; one
//! leads, the others wait; kill the leader (even with `kill -9`) and another
//! takes over from the last checkpoint.
//!
//! ```text
//! cargo run -p shardlock-eventcore --example eventcore-node -- seed /tmp/ec 500
//! cargo run -p shardlock-eventcore --example eventcore-node -- run /tmp/ec node-a &
//! cargo run -p shardlock-eventcore --example eventcore-node -- run /tmp/ec node-b &
//! kill -9 %1        # node-b resumes where node-a's checkpoint was
//! cat /tmp/ec/applied.log
//! ```
//!
//! The folder holds `events.db` (a small eventcore `EventReader` over an
//! SQLite table, standing in for your event store), `locks/` (the SQLite
//! lock driver), `checkpoints.db` (shardlock's `subscriptions` with the
//! fencing epochs, and `eventcore_positions`) and `applied.log`, where the
//! projector writes `<node> <event number>` for every event it applies.
//!
//! `run ... --exit-on-eof` exits when standard input ends (the failover
//! test's way to stop a node); `run ... --pace-ms N` sleeps N ms per event.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventcore::ProjectionConfig;
use eventcore_types::{
    Event, EventFilter, EventPage, EventReader, Projector, StreamId, StreamPosition,
};
use shardlock_core::{DatabaseId, NodeId};
use shardlock_eventcore::{
    run_projection, RunError, ShardlockBackend, ShardlockCheckpoints, ShardlockCoordinator,
    SqlitePositions,
};
use shardlock_sqlite::rusqlite::{params, Connection};
use shardlock_sqlite::{SqliteCheckpoints, SqliteDriver};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The projector's name: the leadership key and the checkpoint's row.
const PROJECTOR: &str = "ledger";

/// The event: the `n`th tick of a stream.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Tick {
    stream: StreamId,
    n: u64,
}

impl Event for Tick {
    fn stream_id(&self) -> &StreamId {
        &self.stream
    }

    fn event_type_name() -> &'static str {
        "Tick"
    }
}

/// An eventcore `EventReader` over the table `events(position, event_type,
/// data)`: positions are UUIDs stored as lowercase hyphenated text, whose
/// text order is their order.
struct SqliteEvents {
    conn: Arc<Mutex<Connection>>,
}

#[derive(Debug, thiserror::Error)]
enum EventsError {
    #[error("the event table failed")]
    Sqlite(#[from] shardlock_sqlite::rusqlite::Error),
    #[error("an event or position does not parse")]
    Parse(#[source] BoxError),
    #[error("the reading task failed")]
    Task(#[from] tokio::task::JoinError),
}

impl SqliteEvents {
    fn open(path: &Path) -> Result<Self, EventsError> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS events(
                position TEXT PRIMARY KEY, event_type TEXT NOT NULL, data TEXT NOT NULL)",
        )?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Appends `n` ticks with increasing positions.
    fn seed(&self, n: u64) -> Result<(), BoxError> {
        let stream = StreamId::try_new("ticks")?;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
        let base = u128::from(now.as_secs()) << 64;
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let tx = conn.transaction()?;
        for i in 1..=n {
            let position = uuid::Uuid::from_u128(base | u128::from(i));
            let data = serde_json::to_string(&Tick {
                stream: stream.clone(),
                n: i,
            })?;
            tx.execute(
                "INSERT INTO events(position, event_type, data) VALUES (?1, ?2, ?3)",
                params![
                    position.hyphenated().to_string(),
                    Tick::event_type_name(),
                    data
                ],
            )?;
        }
        tx.commit()?;
        Ok(())
    }
}

impl EventReader for SqliteEvents {
    type Error = EventsError;

    async fn read_events<E: Event>(
        &self,
        filter: EventFilter,
        page: EventPage,
    ) -> Result<Vec<(E, StreamPosition)>, EventsError> {
        let conn = Arc::clone(&self.conn);
        let event_type = filter
            .event_type()
            .unwrap_or_else(|| E::event_type_name())
            .to_string();
        // "" sorts before every position.
        let after = page
            .after_position()
            .map(|p| uuid::Uuid::from(p).hyphenated().to_string())
            .unwrap_or_default();
        let limit = i64::try_from(page.limit().into_inner()).unwrap_or(i64::MAX);
        tokio::task::spawn_blocking(move || {
            let conn = conn.lock().unwrap_or_else(|p| p.into_inner());
            let mut query = conn.prepare(
                "SELECT position, data FROM events WHERE event_type = ?1 AND position > ?2
                 ORDER BY position LIMIT ?3",
            )?;
            let rows = query.query_map(params![event_type, after, limit], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
            })?;
            let mut events = Vec::new();
            for row in rows {
                let (position, data) = row?;
                let position =
                    uuid::Uuid::parse_str(&position).map_err(|e| EventsError::Parse(e.into()))?;
                let event =
                    serde_json::from_str(&data).map_err(|e| EventsError::Parse(e.into()))?;
                events.push((event, StreamPosition::new(position)));
            }
            Ok(events)
        })
        .await?
    }
}

/// Writes `<node> <n>` to `applied.log` for every tick it applies.
struct Ledger {
    node: String,
    log: File,
    pace: Duration,
}

impl Projector for Ledger {
    type Event = Tick;
    type Error = std::io::Error;
    type Context = ();

    fn apply(&mut self, tick: Tick, _: StreamPosition, _: &mut ()) -> Result<(), Self::Error> {
        // One write per line on an append-only file: a killed process
        // leaves whole lines.
        self.log
            .write_all(format!("{} {}\n", self.node, tick.n).as_bytes())?;
        std::thread::sleep(self.pace);
        Ok(())
    }

    fn name(&self) -> &str {
        PROJECTOR
    }
}

async fn run(dir: PathBuf, node: String, pace: Duration) -> Result<(), BoxError> {
    let checkpoints = dir.join("checkpoints.db");
    let backend = ShardlockBackend::new(
        SqliteEvents::open(&dir.join("events.db"))?,
        ShardlockCoordinator::new(
            SqliteDriver::open(dir.join("locks"))?,
            DatabaseId::new("main"),
        )
        .with_node(NodeId::new(&node)),
        ShardlockCheckpoints::new(
            SqliteCheckpoints::connect(&checkpoints).await?,
            SqlitePositions::connect(&checkpoints).await?,
        ),
    );
    let config = ProjectionConfig::default()
        .continuous()
        .poll_interval(Duration::from_millis(10))
        .empty_poll_backoff(Duration::from_millis(50));
    let never = shardlock_core::CancellationToken::new();
    loop {
        // Follow: wait in the database until the leader's lock is freed (no
        // polling); run_projection's try_acquire then answers this lock.
        if !backend.wait_for_leadership(PROJECTOR, &never).await? {
            return Ok(());
        }
        eprintln!("{node}: leading");
        let ledger = Ledger {
            node: node.clone(),
            log: OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join("applied.log"))?,
            pace,
        };
        match run_projection(ledger, &backend, config.clone()).await {
            Ok(()) => return Ok(()),
            // Lost or fenced off (or led elsewhere after all): follow again.
            Err(
                e @ (RunError::LeadershipLost { .. }
                | RunError::FencedOff { .. }
                | RunError::Projection(eventcore::ProjectionError::LeadershipError(_))),
            ) => eprintln!("{node}: {e}; following"),
            Err(e) => return Err(e.into()),
        }
    }
}

fn usage() -> BoxError {
    "usage: eventcore-node seed <dir> <count> | run <dir> <node> [--exit-on-eof] [--pace-ms N]"
        .into()
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (command, dir) = match args.as_slice() {
        [command, dir, ..] => (command.as_str(), PathBuf::from(dir)),
        _ => return Err(usage()),
    };
    std::fs::create_dir_all(&dir)?;
    match (command, args.get(2)) {
        ("seed", Some(count)) => SqliteEvents::open(&dir.join("events.db"))?.seed(count.parse()?),
        ("run", Some(node)) => {
            let mut pace = Duration::from_millis(2);
            let mut rest = args[3..].iter();
            while let Some(flag) = rest.next() {
                match flag.as_str() {
                    "--exit-on-eof" => {
                        std::thread::spawn(|| {
                            let _ = std::io::stdin().read_to_end(&mut Vec::new());
                            std::process::exit(0);
                        });
                    }
                    "--pace-ms" => {
                        let ms = rest.next().ok_or_else(usage)?.parse()?;
                        pace = Duration::from_millis(ms);
                    }
                    _ => return Err(usage()),
                }
            }
            eprintln!("{node}: started, following");
            run(dir, node.clone(), pace).await
        }
        _ => Err(usage()),
    }
}
