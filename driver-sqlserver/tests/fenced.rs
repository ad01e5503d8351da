//! Session-fenced transactions on SQL Server (issue 14 item 4, issue 16):
//! the projection's writes and its checkpoint commit in one transaction on
//! the connection whose server session owns the leadership lock, so a
//! leader whose session was `KILL`ed cannot commit a stale effect. Same
//! gate as the contract suite (`SHARDLOCK_MSSQL_URL`, a local
//! `SHARDLOCK_MSSQL_IMAGE`, or a loud `SKIPPED` line): see `common/mod.rs`.

mod common;

use shardlock_contract_tests::{
    fenced_commits_atomically, fenced_leader_ended_mid_batch,
    fenced_lost_leader_gets_no_transaction, unique_name, FencedHarness, Harness,
};
use shardlock_core::{
    acquire_leadership, projection_leadership_key, CheckpointError, CheckpointStore, Error,
    FencedError, LeadershipGuard, NodeId,
};
use shardlock_sqlserver::{MssqlCheckpoints, MssqlSession, MssqlTransaction};

use common::MssqlHarness;

impl FencedHarness for MssqlHarness {
    type Tx<'s> = MssqlTransaction<'s>;
    type Checkpoints = MssqlCheckpoints;

    async fn checkpoints(&self) -> MssqlCheckpoints {
        MssqlCheckpoints::connect(self.options(), &self.database())
            .await
            .expect("checkpoint store")
    }

    async fn create_effects(&self, table: &str) {
        let mut side = self.raw(self.database().as_str()).await;
        side.simple_query(format!(
            "CREATE TABLE {table} (position bigint PRIMARY KEY, leader int NOT NULL)"
        ))
        .await
        .expect("effects table")
        .into_results()
        .await
        .expect("created");
        let _ = side.close().await;
    }

    /// `READPAST`: rows locked by an open (or rolling back) transaction are
    /// skipped, so the count is what is committed, without waiting for the
    /// writer under READ COMMITTED (with or without RCSI).
    async fn count_effects(&self, table: &str, by_leaders: bool) -> i64 {
        let filter = if by_leaders { " WHERE leader > 0" } else { "" };
        let mut side = self.raw(self.database().as_str()).await;
        let n: Option<i64> = side
            .simple_query(format!(
                "SELECT COUNT_BIG(*) FROM {table} WITH (READPAST){filter}"
            ))
            .await
            .expect("count effects")
            .into_row()
            .await
            .expect("row")
            .and_then(|row| row.get(0));
        let _ = side.close().await;
        n.unwrap_or(0)
    }

    async fn transaction(session: &mut MssqlSession) -> Result<MssqlTransaction<'_>, Error> {
        session.transaction().await
    }

    fn session_connection(session: &MssqlSession) -> u64 {
        u64::try_from(session.spid()).unwrap_or(0)
    }

    fn tx_connection(tx: &Self::Tx<'_>) -> u64 {
        u64::try_from(tx.spid()).unwrap_or(0)
    }

    async fn connection_in(tx: &mut Self::Tx<'_>) -> u64 {
        let spid: Option<i16> = tx
            .query("SELECT CAST(@@SPID AS smallint)", &[])
            .await
            .expect("spid")
            .first()
            .and_then(|row| row.get(0));
        spid.and_then(|s| u64::try_from(s).ok()).unwrap_or(0)
    }

    async fn write_effect(tx: &mut Self::Tx<'_>, table: &str, position: i64, leader: i32) {
        write_effect(tx, table, position, leader).await;
    }

    async fn save_in(
        tx: &mut Self::Tx<'_>,
        subscription: &str,
        epoch: i64,
        position: i64,
    ) -> Result<(), CheckpointError> {
        MssqlCheckpoints::save_in(tx, subscription, epoch, position).await
    }

    async fn commit(tx: Self::Tx<'_>) -> Result<(), Error> {
        tx.commit().await
    }

    async fn commit_checkpoint(
        tx: Self::Tx<'_>,
        subscription: &str,
        epoch: i64,
        position: i64,
    ) -> Result<(), FencedError> {
        tx.commit_checkpoint(subscription, epoch, position).await
    }

    async fn rollback(tx: Self::Tx<'_>) -> Result<(), Error> {
        tx.rollback().await
    }

    /// `KILL <spid>` from a side connection (KILL takes no variables; the
    /// spid is an integer the server gave us).
    async fn end_connection(&self, id: u64) {
        let mut side = self.raw("master").await;
        side.simple_query(format!("KILL {id}"))
            .await
            .expect("KILL")
            .into_results()
            .await
            .expect("killed");
        let _ = side.close().await;
    }

    /// Every statement through the transaction is a request on the
    /// session's connection and counts as a round trip there.
    fn fenced_round_trips(&self, _session: &MssqlSession) -> Option<u64> {
        None
    }
}

async fn write_effect(tx: &mut MssqlTransaction<'_>, table: &str, position: i64, leader: i32) {
    let inserted = tx
        .execute(
            &format!("INSERT INTO {table} (position, leader) VALUES (@P1, @P2)"),
            &[&position, &leader],
        )
        .await
        .expect("effect row");
    assert_eq!(inserted, 1);
}

/// The positive path (the contract's): effects and checkpoint commit
/// together on the leader's own session; a fenced-off or unclaimed save
/// rolls the effects back; a dropped transaction rolls back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fenced_transaction_commits_effects_and_checkpoint_atomically() {
    if let Some(h) = common::harness().await {
        fenced_commits_atomically(&h).await;
    }
}

/// The leader's session is `KILL`ed mid-batch: 0 stale effects (KILL rolls
/// the transaction back before the session, and its locks, end), and the
/// follower resumes from the last commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_leader_cannot_commit_its_fenced_transaction() {
    if let Some(h) = common::harness().await {
        fenced_leader_ended_mid_batch(&h).await;
    }
}

/// A guard whose session was lost answers `SessionLost` before any
/// transaction is opened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_leader_gets_no_transaction() {
    if let Some(h) = common::harness().await {
        fenced_lost_leader_gets_no_transaction(&h).await;
    }
}

async fn lead(h: &MssqlHarness, projector: &str, node: &str) -> LeadershipGuard<MssqlSession> {
    let key = projection_leadership_key(projector).expect("key");
    acquire_leadership(&h.driver(), &h.database(), &NodeId::new(node), key)
        .await
        .expect("leadership")
}

/// SQL Server's own: a failing statement rolls the whole transaction back
/// (`XACT_ABORT ON`): the commit is refused, nothing of it is committed, and
/// the session stays the leader's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_statement_aborts_the_fenced_transaction() {
    let Some(h) = common::harness().await else {
        return;
    };
    let name = unique_name("fenced-abort");
    let table = format!("fx_{}", name.replace('-', "_").to_lowercase());
    h.create_effects(&table).await;
    let store = h.checkpoints().await;
    let mut guard = lead(&h, &name, "leader").await;
    let claimed = store.claim(&name).await.expect("claim");
    let mut tx = guard
        .leader_session()
        .expect("session")
        .transaction()
        .await
        .expect("begin");
    write_effect(&mut tx, &table, 1, 1).await;
    let duplicate = tx
        .execute(
            &format!("INSERT INTO {table} (position, leader) VALUES (@P1, @P2)"),
            &[&1i64, &1i32],
        )
        .await;
    assert!(duplicate.is_err(), "a duplicate key fails");
    match tx.commit_checkpoint(&name, claimed.epoch, 1).await {
        Err(e) if !e.is_session_lost() => {}
        other => panic!("a failed statement makes the commit fail: {other:?}"),
    }
    assert_eq!(
        h.count_effects(&table, false).await,
        0,
        "nothing of it committed"
    );
    assert_eq!(
        store.load(&name).await.expect("load").map(|c| c.position),
        Some(0)
    );
    guard
        .verify()
        .await
        .expect("a failed statement leaves the session sound");
    guard.release().await.expect("release");
}
