//! Session-fenced transactions (issue 14, item 4): the projection's writes
//! and its checkpoint commit in one transaction on the connection that
//! holds the leadership lock, so a leader whose backend was terminated
//! cannot commit a stale effect (eventcore 2.1's
//! `leadership_loss_fencing_contract`: "stale effect must not commit"). The
//! scenarios are the contract suite's `fenced_*`; this file wires them to
//! `PgTransaction`.

mod common;

use shardlock_contract_tests::{
    fenced_commits_atomically, fenced_leader_ended_mid_batch,
    fenced_lost_leader_gets_no_transaction, FencedHarness, Harness,
};
use shardlock_core::{CheckpointError, Error, FencedError};
use shardlock_postgres::sqlx::{self, Connection};
use shardlock_postgres::{PgCheckpoints, PgSession, PgTransaction};

use common::PgHarness;

/// A backend pid as the suite's connection id.
fn id(pid: i32) -> u64 {
    u64::from(pid.unsigned_abs())
}

impl FencedHarness for PgHarness {
    type Tx<'s> = PgTransaction<'s>;
    type Checkpoints = PgCheckpoints;

    /// The session's one connection is read only between calls: an open
    /// transaction learns of the end at its commit.
    fn loss_signal_during_transaction(&self) -> bool {
        false
    }

    async fn checkpoints(&self) -> PgCheckpoints {
        PgCheckpoints::connect(self.options(), &self.database())
            .await
            .expect("checkpoint store")
    }

    async fn create_effects(&self, table: &str) {
        let mut conn = self.raw().await;
        sqlx::query(&format!(
            "CREATE TABLE {table} (position bigint PRIMARY KEY, leader int NOT NULL)"
        ))
        .execute(&mut conn)
        .await
        .expect("effects table");
        let _ = conn.close().await;
    }

    async fn count_effects(&self, table: &str, by_leaders: bool) -> i64 {
        let filter = if by_leaders { " WHERE leader > 0" } else { "" };
        let mut conn = self.raw().await;
        let n = sqlx::query_scalar(&format!("SELECT count(*) FROM {table}{filter}"))
            .fetch_one(&mut conn)
            .await
            .expect("count effects");
        let _ = conn.close().await;
        n
    }

    async fn transaction(session: &mut PgSession) -> Result<PgTransaction<'_>, Error> {
        session.transaction().await
    }

    fn session_connection(session: &PgSession) -> u64 {
        id(session.backend_pid())
    }

    fn tx_connection(tx: &Self::Tx<'_>) -> u64 {
        id(tx.backend_pid())
    }

    async fn connection_in(tx: &mut Self::Tx<'_>) -> u64 {
        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut **tx)
            .await
            .expect("pid");
        id(pid)
    }

    async fn write_effect(tx: &mut Self::Tx<'_>, table: &str, position: i64, leader: i32) {
        sqlx::query(&format!("INSERT INTO {table} VALUES ($1, $2)"))
            .bind(position)
            .bind(leader)
            .execute(&mut **tx)
            .await
            .expect("effect row");
    }

    async fn save_in(
        tx: &mut Self::Tx<'_>,
        subscription: &str,
        epoch: i64,
        position: i64,
    ) -> Result<(), CheckpointError> {
        PgCheckpoints::save_in(tx, subscription, epoch, position).await
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

    /// `pg_terminate_backend`, waiting (up to 5 s, PostgreSQL 14+) until
    /// the backend has exited.
    async fn end_connection(&self, id: u64) {
        let pid = i32::try_from(id).expect("a backend pid");
        let mut side = self.raw().await;
        let ended: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1, 5000)")
            .bind(pid)
            .fetch_one(&mut side)
            .await
            .expect("terminate");
        assert!(ended, "backend {pid} was running");
        let _ = side.close().await;
    }
}

/// The positive path: effects and checkpoint commit together on the
/// leader's own connection; a fenced-off save rolls the effects back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fenced_transaction_commits_effects_and_checkpoint_atomically() {
    if let Some(h) = common::harness().await {
        fenced_commits_atomically(&h).await;
    }
}

/// The leader's backend is terminated mid-batch: 0 stale effects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_leader_cannot_commit_its_fenced_transaction() {
    if let Some(h) = common::harness().await {
        fenced_leader_ended_mid_batch(&h).await;
    }
}

/// A lost session opens no transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_leader_gets_no_transaction() {
    if let Some(h) = common::harness().await {
        fenced_lost_leader_gets_no_transaction(&h).await;
    }
}
