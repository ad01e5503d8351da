//! Statement counts from the server itself: a batched try-acquire of 1,000
//! keys is one statement, and so is release-all.
//!
//! The count is the server's, read from a separate connection before and
//! after, for the session's connection alone (other tests share the server):
//!
//! - `performance_schema` on (MySQL 8's default): the session thread's
//!   statement events (`events_statements_summary_by_thread_by_event_name`);
//! - otherwise (MariaDB's default) the server's user statistics
//!   (`userstat`, switched on here with `SET GLOBAL userstat = 1` and left
//!   on: other tests may be counting): the session connects as a user of
//!   its own, so `information_schema.USER_STATISTICS` counts only its two
//!   connections; its watcher sits in one `GET_LOCK` for the whole test,
//!   which the server counts only when it ends.
//!
//! Both servers update these counters after they have sent a statement's
//! answer and before the connection shows `Sleep` in the processlist, so
//! each reading first waits for `Sleep` (a state to reach, never a count
//! retried until it fits): the numbers are exact.

mod common;

use std::time::{Duration, Instant};

use shardlock_contract_tests::{unique_keys, Harness};
use shardlock_core::{Driver, NodeId, Session};
use shardlock_mysql::sqlx::mysql::MySqlConnection;
use shardlock_mysql::sqlx::{self, Connection, Executor};
use shardlock_mysql::{MySqlDriver, MySqlSession};

/// How the server counts one connection's statements.
enum Counter {
    /// `performance_schema`: the statement events of the session's thread.
    PerformanceSchema,
    /// MariaDB's user statistics, for the session's own user.
    UserStatistics { user: String },
}

/// Statements the server executed for the session, by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Counts {
    /// `SELECT`s.
    selects: i64,
    /// Every statement (`SHOW`s excepted, which the session never sends).
    all: i64,
}

impl Counts {
    fn minus(self, earlier: Counts) -> Counts {
        Counts {
            selects: self.selects - earlier.selects,
            all: self.all - earlier.all,
        }
    }
}

/// The side connection and the way it counts.
struct Statements {
    side: MySqlConnection,
    counter: Counter,
}

fn check<T, E: std::fmt::Display>(r: Result<T, E>, what: &str) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("{what}: {e}"),
    }
}

impl Statements {
    /// Chooses the counter and makes the driver that connects so that it
    /// counts: the harness's own, or one for a fresh user.
    async fn new(h: &common::MySqlHarness) -> (Self, MySqlDriver) {
        let mut side = h.raw().await;
        let schema: i64 = check(
            sqlx::query_scalar("SELECT @@performance_schema + 0")
                .fetch_one(&mut side)
                .await,
            "read @@performance_schema",
        );
        if schema == 1 {
            let driver = h.driver();
            return (
                Self {
                    side,
                    counter: Counter::PerformanceSchema,
                },
                driver,
            );
        }
        if let Err(e) = side.execute("SET GLOBAL userstat = 1").await {
            panic!(
                "the server counts no statements per connection: performance_schema is off \
                 and `SET GLOBAL userstat = 1` failed ({e}); start it with \
                 --performance-schema=ON, or let the test's user set userstat"
            );
        }
        // A user of its own: its statistics are this session's alone.
        let user = format!("st{}_{:08x}", std::process::id(), fastrand::u32(..));
        let password = format!("pw{:016x}", fastrand::u64(..));
        let database = h
            .options()
            .get_connect_options()
            .get_database()
            .unwrap_or("test")
            .replace('`', "``");
        for statement in [
            format!("CREATE USER '{user}'@'%' IDENTIFIED BY '{password}'"),
            format!("GRANT ALL PRIVILEGES ON `{database}`.* TO '{user}'@'%'"),
        ] {
            if let Err(e) = side.execute(statement.as_str()).await {
                panic!("{statement}: {e}");
            }
        }
        let driver = MySqlDriver::new(h.options().clone().username(&user).password(&password));
        (
            Self {
                side,
                counter: Counter::UserStatistics { user },
            },
            driver,
        )
    }

    /// Waits until the session's connection is idle (`Sleep`: the server
    /// has updated its counters for the last statement) and its watcher
    /// waits in `GET_LOCK` (its earlier statements are counted, its wait is
    /// not yet).
    async fn settle(&mut self, session: &MySqlSession) {
        let started = Instant::now();
        loop {
            let idle: i64 = check(
                sqlx::query_scalar(
                    "SELECT (SELECT COUNT(*) FROM information_schema.PROCESSLIST \
                             WHERE ID = ? AND COMMAND = 'Sleep') \
                          + (SELECT COUNT(*) FROM information_schema.PROCESSLIST \
                             WHERE ID = ? AND STATE = 'User lock')",
                )
                .bind(session.connection_id())
                .bind(session.watcher_id())
                .fetch_one(&mut self.side)
                .await,
                "read the processlist",
            );
            if idle == 2 {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "session {} never became idle with its watcher waiting",
                session.connection_id()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The server's counts for the session now.
    async fn read(&mut self, session: &MySqlSession) -> Counts {
        self.settle(session).await;
        let (selects, all): (i64, i64) = match &self.counter {
            Counter::PerformanceSchema => check(
                sqlx::query_as(
                    "SELECT CAST(COALESCE(SUM(CASE WHEN e.EVENT_NAME = 'statement/sql/select' \
                                 THEN e.COUNT_STAR ELSE 0 END), 0) AS SIGNED), \
                            CAST(COALESCE(SUM(e.COUNT_STAR), 0) AS SIGNED) \
                     FROM performance_schema.events_statements_summary_by_thread_by_event_name e \
                     JOIN performance_schema.threads t ON t.THREAD_ID = e.THREAD_ID \
                     WHERE t.PROCESSLIST_ID = ? AND e.EVENT_NAME LIKE 'statement/sql/%'",
                )
                .bind(session.connection_id())
                .fetch_one(&mut self.side)
                .await,
                "read performance_schema",
            ),
            Counter::UserStatistics { user } => check(
                sqlx::query_as(
                    "SELECT CAST(SELECT_COMMANDS AS SIGNED), \
                            CAST(SELECT_COMMANDS + UPDATE_COMMANDS + OTHER_COMMANDS AS SIGNED) \
                     FROM information_schema.USER_STATISTICS WHERE USER = ?",
                )
                .bind(user)
                .fetch_one(&mut self.side)
                .await,
                "read USER_STATISTICS",
            ),
        };
        Counts { selects, all }
    }

    async fn finish(mut self) {
        if let Counter::UserStatistics { user } = &self.counter {
            let _ = self
                .side
                .execute(format!("DROP USER IF EXISTS '{user}'@'%'").as_str())
                .await;
        }
        let _ = self.side.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1000_key_try_acquire_and_its_release_all_are_one_statement_each() {
    let Some(h) = common::harness().await else {
        return;
    };
    let (mut statements, driver) = Statements::new(&h).await;
    let keys = unique_keys("stmts", 1000);
    let mut session = check(
        driver.connect(&h.database(), &NodeId::new("stmts")).await,
        "connect",
    );

    let before = statements.read(&session).await;
    let granted = check(session.try_acquire(&keys).await, "try_acquire");
    assert!(granted.iter().all(|g| *g), "every key was free");
    let after_try = statements.read(&session).await;
    assert_eq!(
        after_try.minus(before),
        Counts { selects: 1, all: 1 },
        "a batched try-acquire of 1,000 keys is one statement on the server"
    );

    check(session.release_all().await, "release_all");
    let after_release = statements.read(&session).await;
    assert_eq!(
        after_release.minus(after_try),
        Counts { selects: 1, all: 1 },
        "release-all of 1,000 held keys is one statement on the server"
    );
    assert!(session.held().is_empty());

    check(session.close().await, "close");
    statements.finish().await;
}
