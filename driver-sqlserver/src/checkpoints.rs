//! A checkpoint store in SQL Server, with fencing epochs.
//!
//! Every statement is T-SQL with bound parameters (`@P1`, …, sent through
//! `sp_executesql` by tiberius); none carries user data in its text.

use std::fmt;
use std::sync::Arc;

use shardlock_core::{BoxError, Checkpoint, CheckpointError, CheckpointStore, DatabaseId};
use tiberius::{Row, ToSql};
use tokio::sync::Mutex;
use tracing::debug;

use crate::connection::TdsClient;
use crate::driver::MssqlDriver;
use crate::error::{tiberius_connection_lost, MssqlError};
use crate::fenced::MssqlExecutor;
use crate::options::MssqlOptions;
use crate::sql::utf16_len;

/// The login's application name of the store's connection, so operators
/// tell it apart from lock sessions (`shardlock:<node>`) in
/// `sys.dm_exec_sessions.program_name`.
const APPLICATION_NAME: &str = "shardlock:checkpoints";

/// The longest subscription name, in UTF-16 code units: the primary key is
/// `nvarchar(450)` (900 bytes, the classic clustered-index key limit). A
/// longer name is refused before anything is sent (a server with
/// `ANSI_WARNINGS OFF` would silently cut it, merging two subscriptions).
pub const MAX_SUBSCRIPTION_NAME: usize = 450;

/// Error 2714, "There is already an object named … in the database": a
/// concurrent opener created the table between our check and our create.
const ALREADY_EXISTS: u32 = 2714;

/// Created only when missing. Names are compared exactly (a binary
/// collation, `_BIN2`), like every other store, whatever the database's
/// collation.
const SCHEMA: &str = "IF OBJECT_ID(N'subscriptions', N'U') IS NULL
    CREATE TABLE subscriptions (
        subscription_name nvarchar(450) COLLATE Latin1_General_100_BIN2 NOT NULL PRIMARY KEY,
        last_position bigint NOT NULL,
        epoch bigint NOT NULL,
        updated_at datetime2(6) NOT NULL DEFAULT SYSUTCDATETIME());";

/// Creates the row at position 0 and epoch 1, or bumps its epoch, in one
/// statement, answering the new row. `HOLDLOCK` (serializable) holds the
/// key-range lock from the match to the insert, so two claimants of a
/// missing row cannot both insert (one waits, then matches and bumps);
/// without it `MERGE` can fail with a duplicate key under concurrency
/// (<https://learn.microsoft.com/sql/t-sql/statements/merge-transact-sql>,
/// "Concurrency considerations for MERGE"). Claims of an existing row
/// serialize on its row lock, so every claim answers a distinct epoch.
const CLAIM: &str = "SET NOCOUNT ON;
MERGE subscriptions WITH (HOLDLOCK) AS t
USING (SELECT @P1 AS subscription_name) AS s
    ON t.subscription_name = s.subscription_name
WHEN MATCHED THEN
    UPDATE SET epoch = t.epoch + 1, updated_at = SYSUTCDATETIME()
WHEN NOT MATCHED THEN
    INSERT (subscription_name, last_position, epoch, updated_at)
    VALUES (s.subscription_name, 0, 1, SYSUTCDATETIME())
OUTPUT inserted.last_position, inserted.epoch;";

/// Saves the position if the stored epoch is ours, never backwards (no
/// `GREATEST` before SQL Server 2022: a `CASE`), and answers in the same
/// round trip whether it did (`saved`, from `@@ROWCOUNT`) and the stored
/// epoch (`current_epoch`, NULL without a row), so a refusal needs no
/// second statement. The update's row lock is held until the surrounding
/// transaction ends, so inside a fenced transaction a newer claim waits for
/// it.
const SAVE: &str = "SET NOCOUNT ON;
DECLARE @saved int;
UPDATE subscriptions
    SET last_position = CASE WHEN last_position < @P3 THEN @P3 ELSE last_position END,
        updated_at = SYSUTCDATETIME()
    WHERE subscription_name = @P1 AND epoch = @P2;
SELECT @saved = @@ROWCOUNT;
SELECT @saved AS saved,
    (SELECT epoch FROM subscriptions WHERE subscription_name = @P1) AS current_epoch;";

const LOAD: &str = "SELECT last_position, epoch FROM subscriptions WHERE subscription_name = @P1;";

fn store_err(e: impl Into<BoxError>) -> CheckpointError {
    CheckpointError::store(e)
}

fn query_err(e: tiberius::error::Error) -> CheckpointError {
    store_err(MssqlError::from_query("checkpoint store", e))
}

/// Refuses a name the key column cannot hold.
fn check_name(subscription: &str) -> Result<(), CheckpointError> {
    let len = utf16_len(subscription);
    if len > MAX_SUBSCRIPTION_NAME {
        return Err(store_err(format!(
            "subscription name of {len} UTF-16 code units is longer than the {MAX_SUBSCRIPTION_NAME} the subscriptions table holds"
        )));
    }
    Ok(())
}

fn get_i64(row: &Row, index: usize, what: &str) -> Result<i64, CheckpointError> {
    row.try_get::<i64, _>(index)
        .map_err(query_err)?
        .ok_or_else(|| store_err(format!("{what} is NULL")))
}

fn checkpoint(row: &Row) -> Result<Checkpoint, CheckpointError> {
    Ok(Checkpoint {
        position: get_i64(row, 0, "last_position")?,
        epoch: get_i64(row, 1, "epoch")?,
    })
}

/// Reads the answer of [`SAVE`].
fn saved(rows: &[Row], subscription: &str, epoch: i64) -> Result<(), CheckpointError> {
    let [row] = rows else {
        return Err(store_err(format!(
            "the save answered {} rows, expected 1",
            rows.len()
        )));
    };
    let saved = row.try_get::<i32, _>(0).map_err(query_err)?.unwrap_or(0);
    if saved == 1 {
        return Ok(());
    }
    // SQL Server counts matched rows, so 0 means no row had our epoch.
    let current = row.try_get::<i64, _>(1).map_err(query_err)?;
    CheckpointError::unchanged_save(subscription, epoch, current)
}

/// Checkpoints in the table `subscriptions(subscription_name nvarchar(450)
/// primary key (binary collation), last_position bigint, epoch bigint,
/// updated_at datetime2)`, created idempotently when the store is opened.
///
/// Opened like every checkpoint store (see `shardlock_core`'s projection
/// docs): [`MssqlCheckpoints::connect`] from the driver's [`MssqlOptions`]
/// and the [`DatabaseId`] (the same inputs as the driver's `connect`, so
/// the table lives in the database the id's locks live in), or
/// [`MssqlCheckpoints::from_client`] with a tiberius connection you already
/// have.
///
/// To write a projection's own rows and its checkpoint in **one
/// transaction**, call [`MssqlCheckpoints::save_in`] with that transaction:
/// the leader's session-fenced
/// [`MssqlTransaction`](crate::MssqlTransaction), or a tiberius client of
/// your own inside `BEGIN TRANSACTION`.
///
/// # Connection
///
/// tiberius has no pool: the store keeps **one** connection (labelled
/// `shardlock:checkpoints`) behind an async mutex, so its calls run one at a
/// time; each is one short statement, so one connection serves many
/// projections. A connection that broke (the server restarted or ended it,
/// or a call was dropped half-way) is dropped, and the next call opens a
/// new one and tries once more (claims, saves and loads are all safe to
/// repeat: a repeated claim only bumps the epoch once more). A store made
/// with [`from_client`](Self::from_client) cannot reopen its connection.
/// Clones share the connection. Use the store on the tokio runtime that
/// opened it (a new one is opened if that runtime is gone).
///
/// ```no_run
/// use shardlock_core::{CheckpointStore, DatabaseId};
/// use shardlock_sqlserver::{MssqlCheckpoints, MssqlOptions};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
/// let options = MssqlOptions::parse(
///     "Server=tcp:db.internal,1433;User Id=app;Password=secret;TrustServerCertificate=true",
/// )?;
/// let store = MssqlCheckpoints::connect(&options, &DatabaseId::new("orders")).await?;
/// let claimed = store.claim("orders-view").await?;
/// store.save("orders-view", claimed.epoch, 42).await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct MssqlCheckpoints {
    inner: Arc<Inner>,
}

struct Inner {
    conn: Mutex<Slot>,
    /// How to open a new connection, when the store may.
    reopen: Option<(MssqlDriver, DatabaseId)>,
}

/// The store's one connection.
#[derive(Default)]
struct Slot {
    client: Option<TdsClient>,
    /// A call was running on it and did not finish (its future was
    /// dropped): the connection may be mid-request, so it is not reused.
    busy: bool,
}

impl fmt::Debug for MssqlCheckpoints {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MssqlCheckpoints")
            .field(
                "database",
                &self.inner.reopen.as_ref().map(|(_, db)| db.as_str()),
            )
            .finish_non_exhaustive()
    }
}

impl MssqlCheckpoints {
    /// Opens a connection of its own (labelled `shardlock:checkpoints`) to
    /// the database `database` maps to under `options` (as the driver's
    /// sessions do: [`MssqlOptions::database_mapping`]) and creates the table
    /// if it is missing: the SQL Server form of every store's
    /// `connect(target)`.
    ///
    /// # Errors
    ///
    /// [`CheckpointError::Store`] with the driver's [`MssqlError`] when it
    /// cannot connect (within [`MssqlOptions::connect_timeout`]) or create
    /// the table.
    pub async fn connect(
        options: &MssqlOptions,
        database: &DatabaseId,
    ) -> Result<Self, CheckpointError> {
        let driver = MssqlDriver::new(options.clone());
        let client = driver
            .connect_client(database, APPLICATION_NAME)
            .await
            .map_err(store_err)?;
        Self::open(client, Some((driver, database.clone()))).await
    }

    /// Uses `client` (e.g. from
    /// [`MssqlDriver::connect_client`](crate::MssqlDriver::connect_client))
    /// and creates the table if it is missing. The store cannot reopen this
    /// connection if it breaks; prefer [`connect`](Self::connect).
    ///
    /// # Errors
    ///
    /// [`CheckpointError::Store`] if the table cannot be created.
    pub async fn from_client(client: TdsClient) -> Result<Self, CheckpointError> {
        Self::open(client, None).await
    }

    async fn open(
        client: TdsClient,
        reopen: Option<(MssqlDriver, DatabaseId)>,
    ) -> Result<Self, CheckpointError> {
        let store = Self {
            inner: Arc::new(Inner {
                conn: Mutex::new(Slot {
                    client: Some(client),
                    busy: false,
                }),
                reopen,
            }),
        };
        match store.fetch(SCHEMA, &[]).await {
            Ok(_) => Ok(store),
            // Another opener created it first.
            Err(CheckpointError::Store(e))
                if e.downcast_ref::<MssqlError>()
                    .and_then(MssqlError::server_error_code)
                    == Some(ALREADY_EXISTS) =>
            {
                Ok(store)
            }
            Err(e) => Err(e),
        }
    }

    /// Runs one statement on the store's connection, reopening it (once per
    /// call) when it is broken.
    async fn fetch(&self, sql: &str, params: &[&dyn ToSql]) -> Result<Vec<Row>, CheckpointError> {
        let mut guard = self.inner.conn.lock().await;
        let slot = &mut *guard;
        if slot.busy {
            debug!("a checkpoint call was abandoned mid-request: reconnecting");
            slot.client = None;
        }
        let mut retried = false;
        loop {
            let client = match slot.client.as_mut() {
                Some(client) => client,
                None => {
                    let Some((driver, database)) = &self.inner.reopen else {
                        return Err(store_err(MssqlError::ConnectionLost {
                            operation: "checkpoint store",
                            source: None,
                        }));
                    };
                    let client = driver
                        .connect_client(database, APPLICATION_NAME)
                        .await
                        .map_err(store_err)?;
                    slot.client.insert(client)
                }
            };
            slot.busy = true;
            let result = async { client.query(sql, params).await?.into_first_result().await }.await;
            slot.busy = false;
            match result {
                Ok(rows) => return Ok(rows),
                Err(e) if tiberius_connection_lost(&e) => {
                    slot.client = None;
                    if retried || self.inner.reopen.is_none() {
                        return Err(query_err(e));
                    }
                    debug!(error = %e, "the checkpoint connection broke: reconnecting once");
                    retried = true;
                }
                Err(e) => return Err(query_err(e)),
            }
        }
    }

    /// Saves a checkpoint through `conn` (typically the transaction that
    /// wrote the projection's rows: the session-fenced
    /// [`MssqlTransaction`](crate::MssqlTransaction), or a tiberius client of
    /// your own inside `BEGIN TRANSACTION`), with the same fencing as
    /// [`CheckpointStore::save`]: if it answers [`CheckpointError::FencedOff`],
    /// roll the transaction back and the stale writes vanish with it.
    ///
    /// # Errors
    ///
    /// [`CheckpointError::NotClaimed`] when the subscription was never
    /// claimed (or `epoch` is below 1); [`CheckpointError::FencedOff`] when
    /// `epoch` is not the stored one. Nothing is written either way.
    /// [`CheckpointError::Store`] when the statement failed.
    pub async fn save_in<E: MssqlExecutor + ?Sized>(
        conn: &mut E,
        subscription: &str,
        epoch: i64,
        position: i64,
    ) -> Result<(), CheckpointError> {
        CheckpointError::check_save_epoch(subscription, epoch)?;
        check_name(subscription)?;
        let rows = conn
            .fetch_rows(SAVE, &[&subscription, &epoch, &position])
            .await
            .map_err(CheckpointError::Store)?;
        saved(&rows, subscription, epoch)
    }
}

impl CheckpointStore for MssqlCheckpoints {
    async fn claim(&self, subscription: &str) -> Result<Checkpoint, CheckpointError> {
        check_name(subscription)?;
        let rows = self.fetch(CLAIM, &[&subscription]).await?;
        match rows.as_slice() {
            [row] => checkpoint(row),
            _ => Err(store_err(format!(
                "the claim answered {} rows, expected 1",
                rows.len()
            ))),
        }
    }

    async fn load(&self, subscription: &str) -> Result<Option<Checkpoint>, CheckpointError> {
        if check_name(subscription).is_err() {
            // No such row can exist.
            return Ok(None);
        }
        let rows = self.fetch(LOAD, &[&subscription]).await?;
        rows.first().map(checkpoint).transpose()
    }

    async fn save(
        &self,
        subscription: &str,
        epoch: i64,
        position: i64,
    ) -> Result<(), CheckpointError> {
        CheckpointError::check_save_epoch(subscription, epoch)?;
        check_name(subscription)?;
        let rows = self
            .fetch(SAVE, &[&subscription, &epoch, &position])
            .await?;
        saved(&rows, subscription, epoch)
    }
}

#[cfg(test)]
mod tests {
    use tiberius::{ColumnData, ColumnType};

    use super::*;

    fn save_answer(saved: i32, current: Option<i64>) -> Row {
        Row::builder()
            .column("saved", ColumnType::Int4, ColumnData::I32(Some(saved)))
            .column("current_epoch", ColumnType::Int8, ColumnData::I64(current))
            .build()
    }

    #[test]
    fn a_save_answer_is_saved_fenced_off_or_not_claimed() {
        assert!(saved(&[save_answer(1, Some(3))], "s", 3).is_ok());
        match saved(&[save_answer(0, Some(4))], "s", 3) {
            Err(CheckpointError::FencedOff { ours, current, .. }) => {
                assert_eq!((ours, current), (3, 4));
            }
            other => panic!("expected FencedOff, got {other:?}"),
        }
        match saved(&[save_answer(0, None)], "s", 1) {
            Err(CheckpointError::NotClaimed { subscription }) => assert_eq!(subscription, "s"),
            other => panic!("expected NotClaimed, got {other:?}"),
        }
        assert!(matches!(saved(&[], "s", 1), Err(CheckpointError::Store(_))));
    }

    #[test]
    fn names_longer_than_the_key_are_refused() {
        assert!(check_name(&"x".repeat(MAX_SUBSCRIPTION_NAME)).is_ok());
        assert!(check_name(&"x".repeat(MAX_SUBSCRIPTION_NAME + 1)).is_err());
        // Counted in UTF-16 code units, as nvarchar is: 226 emoji are 452.
        assert!(check_name(&"😀".repeat(226)).is_err());
    }

    #[test]
    fn statements_bind_their_inputs() {
        // No user data is ever formatted into the text.
        for sql in [CLAIM, SAVE, LOAD] {
            assert!(sql.contains("@P1"), "{sql}");
            assert!(!sql.contains('{'), "{sql}");
        }
        assert!(SAVE.contains("epoch = @P2") && SAVE.contains("@P3"));
        assert!(CLAIM.contains("WITH (HOLDLOCK)") && CLAIM.contains("OUTPUT inserted"));
    }
}
