//! Session-fenced transactions on MySQL/MariaDB (issue 14): the
//! projection's writes and its checkpoint commit in one transaction on the
//! connection that holds the leadership lock (`GET_LOCK`), so a leader whose
//! connection was killed cannot commit a stale effect (eventcore 2.1's
//! `leadership_loss_fencing_contract`: "stale effect must not commit"). The
//! server rolls a killed connection's transaction back before it frees its
//! named locks (`THD::cleanup`); the contract suite's `fenced_*` scenarios,
//! wired here to `MySqlTransaction`, check the outcome.

mod common;

use shardlock_contract_tests::{
    fenced_commits_atomically, fenced_leader_ended_mid_batch,
    fenced_lost_leader_gets_no_transaction, FencedHarness, Harness,
};
use shardlock_core::{CheckpointError, Error, FencedError};
use shardlock_mysql::sqlx::{self, Connection};
use shardlock_mysql::{MySqlCheckpoints, MySqlSession, MySqlTransaction};

use common::MySqlHarness;

impl FencedHarness for MySqlHarness {
    type Tx<'s> = MySqlTransaction<'s>;
    type Checkpoints = MySqlCheckpoints;

    async fn checkpoints(&self) -> MySqlCheckpoints {
        MySqlCheckpoints::connect(self.options(), &self.database())
            .await
            .expect("checkpoint store")
    }

    /// An InnoDB table: MyISAM writes are not fenced.
    async fn create_effects(&self, table: &str) {
        let mut conn = self.raw().await;
        sqlx::query(&format!(
            "CREATE TABLE {table} (position BIGINT PRIMARY KEY, leader INT NOT NULL) \
             ENGINE = InnoDB"
        ))
        .execute(&mut conn)
        .await
        .expect("effects table");
        let _ = conn.close().await;
    }

    async fn count_effects(&self, table: &str, by_leaders: bool) -> i64 {
        let filter = if by_leaders { " WHERE leader > 0" } else { "" };
        let mut conn = self.raw().await;
        let n = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {table}{filter}"))
            .fetch_one(&mut conn)
            .await
            .expect("count effects");
        let _ = conn.close().await;
        n
    }

    async fn transaction(session: &mut MySqlSession) -> Result<MySqlTransaction<'_>, Error> {
        session.transaction().await
    }

    fn session_connection(session: &MySqlSession) -> u64 {
        session.connection_id()
    }

    fn tx_connection(tx: &Self::Tx<'_>) -> u64 {
        tx.connection_id()
    }

    async fn connection_in(tx: &mut Self::Tx<'_>) -> u64 {
        sqlx::query_scalar("SELECT CONNECTION_ID()")
            .fetch_one(&mut **tx)
            .await
            .expect("connection id")
    }

    async fn write_effect(tx: &mut Self::Tx<'_>, table: &str, position: i64, leader: i32) {
        sqlx::query(&format!("INSERT INTO {table} VALUES (?, ?)"))
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
        MySqlCheckpoints::save_in(tx, subscription, epoch, position).await
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

    /// `KILL CONNECTION` from a side connection.
    async fn end_connection(&self, id: u64) {
        let mut side = self.raw().await;
        sqlx::query(&format!("KILL CONNECTION {id}"))
            .execute(&mut side)
            .await
            .expect("KILL CONNECTION");
        let _ = side.close().await;
    }

    async fn connection_listed(&self, id: u64) -> Option<bool> {
        let mut conn = self.raw().await;
        let n: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE ID = ?")
                .bind(id)
                .fetch_one(&mut conn)
                .await
                .expect("processlist");
        let _ = conn.close().await;
        Some(n > 0)
    }
}

/// The positive path: effects and checkpoint commit together on the
/// leader's own connection; a fenced-off or unclaimed save rolls the effects
/// back; a dropped transaction rolls back; the session stays usable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fenced_transaction_commits_effects_and_checkpoint_atomically() {
    if let Some(h) = common::harness().await {
        fenced_commits_atomically(&h).await;
    }
}

/// The leader's connection is killed (`KILL CONNECTION`) mid-batch: 0 stale
/// effects, and the follower got the lock only after the connection ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_leader_cannot_commit_its_fenced_transaction() {
    if let Some(h) = common::harness().await {
        fenced_leader_ended_mid_batch(&h).await;
    }
}

/// A lost session opens no transaction, and sends no `BEGIN`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_leader_gets_no_transaction() {
    if let Some(h) = common::harness().await {
        fenced_lost_leader_gets_no_transaction(&h).await;
    }
}
