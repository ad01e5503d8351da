//! One holder protocol for every driver: a separate process that takes keys
//! and holds them until it is killed, the "other process" of the crash test
//! (clause 9) and of the cross-process tests.
//!
//! Each driver crate has one holder, an `[[example]]` target whose `main`
//! is [`main`] with the driver's constructor (see the crate docs for why an
//! example and not a `[[bin]]`):
//!
//! ```text
//! SHARDLOCK_HOLDER_URL=<where> <holder> [--wait] <database> <key-name>...
//! ```
//!
//! - [`URL_ENV`] says where the server is, in the form the driver's
//!   constructor takes (a connection URL or string; for SQLite the lock
//!   directory). It is an environment variable, not an argument, so a
//!   password does not show in the process list.
//! - The holder opens one session on `<database>` as node `holder-<pid>`.
//! - With `--wait` it prints `WAITING` and waits in the database
//!   (`Session::acquire`) for each key in turn.
//! - Then it takes every key in one batched `try_acquire` and prints
//!   `GRANTED <bits>`: one `1` (granted) or `0` (held elsewhere) per key, in
//!   order. A partial grant is not an error; the caller judges the bits.
//! - It holds what it got until its standard input ends (then it releases
//!   everything, closes the session and exits 0) or it is killed
//!   (`kill -9`: the server, or the kernel for SQLite, frees the keys).
//! - Exit status 2 for a usage error (arguments, no [`URL_ENV`], a URL the
//!   driver refuses), 1 when the database fails (connect, lock); the error
//!   and its sources go to standard error as
//!   `<program>: holder failed: <error>`.
//!
//! The test side is [`HolderProcess`] (and [`spawn`] for
//! [`Harness::spawn_holder`](crate::Harness::spawn_holder)).

use std::fmt;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitCode, Stdio};

use shardlock_core::{BoxError, CancellationToken, DatabaseId, Driver, LockKey, NodeId, Session};

use crate::Holder;

/// The environment variable telling a holder where its server is.
pub const URL_ENV: &str = "SHARDLOCK_HOLDER_URL";

/// The line a holder prints once the batch is answered, before its bits.
const GRANTED: &str = "GRANTED";
/// The line a `--wait` holder prints before it starts waiting.
const WAITING: &str = "WAITING";

/// What went wrong in a holder, and its exit status.
enum Failure {
    Usage(String),
    Database(String),
}

/// The `main` of a holder process: parses the arguments, builds the driver
/// with `make_driver` from [`URL_ENV`]'s value, and runs the protocol of
/// this module.
///
/// ```ignore
/// // examples/shardlock-pg-holder.rs
/// fn main() -> std::process::ExitCode {
///     shardlock_contract_tests::holder::main(|url| PgOptions::parse(url).map(PgDriver::new))
/// }
/// ```
pub fn main<D, E>(make_driver: impl FnOnce(&str) -> Result<D, E>) -> ExitCode
where
    D: Driver,
    E: std::error::Error,
{
    let mut args = std::env::args();
    let program = args
        .next()
        .as_deref()
        .map(Path::new)
        .and_then(Path::file_name)
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "holder".to_string());
    match run(args.collect(), make_driver) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(message)) => {
            eprintln!("{program}: {message}");
            eprintln!("usage: {URL_ENV}=<server> {program} [--wait] <database> <key-name>...");
            ExitCode::from(2)
        }
        Err(Failure::Database(message)) => {
            eprintln!("{program}: holder failed: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run<D, E>(
    args: Vec<String>,
    make_driver: impl FnOnce(&str) -> Result<D, E>,
) -> Result<(), Failure>
where
    D: Driver,
    E: std::error::Error,
{
    let mut args = args.into_iter().peekable();
    let wait = args.next_if(|a| a == "--wait").is_some();
    let database = args
        .next()
        .ok_or_else(|| Failure::Usage("no database".into()))?;
    let keys = args
        .map(LockKey::new)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Failure::Usage(e.to_string()))?;
    if keys.is_empty() {
        return Err(Failure::Usage("no keys".into()));
    }
    let url = std::env::var(URL_ENV)
        .map_err(|_| Failure::Usage(format!("set {URL_ENV} to where the server is")))?;
    let driver = make_driver(&url).map_err(|e| Failure::Usage(report(&e)))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::Database(format!("cannot start a runtime: {e}")))?;
    let database = DatabaseId::new(database);
    let failed = |e: shardlock_core::Error| Failure::Database(e.report());
    runtime.block_on(async {
        let node = NodeId::new(format!("holder-{}", std::process::id()));
        let mut session = driver.connect(&database, &node).await.map_err(failed)?;
        if wait {
            say(WAITING)?;
            let never = CancellationToken::new();
            for key in &keys {
                session.acquire(key, &never).await.map_err(failed)?;
            }
        }
        let granted = session.try_acquire(&keys).await.map_err(failed)?;
        let bits: String = granted.iter().map(|g| if *g { '1' } else { '0' }).collect();
        say(&format!("{GRANTED} {bits}"))?;
        // Hold until the parent closes our input (or kills us); the runtime
        // keeps serving the session's background work meanwhile.
        let _ = tokio::task::spawn_blocking(|| std::io::stdin().read_to_end(&mut Vec::new())).await;
        session.release_all().await.map_err(failed)?;
        session.close().await.map_err(failed)
    })
}

/// Prints one protocol line and flushes it.
fn say(line: &str) -> Result<(), Failure> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .map_err(|e| Failure::Database(format!("cannot write to stdout: {e}")))
}

/// An error and its sources on one line.
fn report(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        out.push_str(&format!(": {e}"));
        source = e.source();
    }
    out
}

/// Where the holder example `name` of the crate under test is built:
/// `target/<profile>/examples/<name>`, found from the running test binary
/// (`target/<profile>/deps/<test>`).
pub fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let profile = exe
        .parent()
        .and_then(Path::parent)
        .unwrap_or_else(|| Path::new("."));
    profile
        .join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX))
}

/// A running holder process. Dropping it kills it (SIGKILL on Unix: no
/// clean-up in the holder); its standard input stays open until then.
pub struct HolderProcess {
    child: Child,
    stdout: BufReader<ChildStdout>,
    /// How many keys it was asked for.
    keys: usize,
    granted: Vec<bool>,
}

impl HolderProcess {
    /// Starts `program` (see [`example`]) for `keys` in `database` of the
    /// server at `url`, and waits for its `GRANTED` line. Blocks the thread.
    ///
    /// # Errors
    ///
    /// The program is missing or cannot start, or it exits or prints
    /// anything else (the process is then killed).
    pub fn start(
        program: &Path,
        url: &str,
        database: &DatabaseId,
        keys: &[LockKey],
    ) -> Result<Self, BoxError> {
        let mut holder = Self::launch(program, url, database, keys, false)?;
        holder.read_granted()?;
        Ok(holder)
    }

    /// Starts `program` with `--wait` and returns once it said `WAITING`:
    /// it then waits in the database for each key in turn. Blocks the
    /// thread.
    ///
    /// # Errors
    ///
    /// As for [`start`](Self::start).
    pub fn start_waiting(
        program: &Path,
        url: &str,
        database: &DatabaseId,
        keys: &[LockKey],
    ) -> Result<Self, BoxError> {
        let mut holder = Self::launch(program, url, database, keys, true)?;
        holder.expect_line(WAITING)?;
        Ok(holder)
    }

    fn launch(
        program: &Path,
        url: &str,
        database: &DatabaseId,
        keys: &[LockKey],
        wait: bool,
    ) -> Result<Self, BoxError> {
        if !program.is_file() {
            return Err(format!(
                "holder {} is not built: it is an example target, which `cargo test` and \
                 `cargo nextest run` build unless targets are picked (e.g. `--test <name>`); \
                 build it with `cargo build -p <driver crate> --examples`",
                program.display()
            )
            .into());
        }
        let mut command = Command::new(program);
        if wait {
            command.arg("--wait");
        }
        let mut child = command
            .arg(database.as_str())
            .args(keys.iter().map(LockKey::name))
            .env(URL_ENV, url)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", program.display()))?;
        let stdout = match child.stdout.take() {
            Some(stdout) => BufReader::new(stdout),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                return Err("no stdout pipe".into());
            }
        };
        Ok(Self {
            child,
            stdout,
            keys: keys.len(),
            granted: Vec::new(),
        })
    }

    /// For a `--wait` holder: waits until it prints its `GRANTED` line
    /// (after a wait for every key) and answers the bits. Blocks the thread.
    ///
    /// # Errors
    ///
    /// The holder exits or prints anything else.
    pub fn wait_granted(&mut self) -> Result<&[bool], BoxError> {
        self.read_granted()?;
        Ok(&self.granted)
    }

    /// Reads the `GRANTED <bits>` line, one bit per key.
    fn read_granted(&mut self) -> Result<(), BoxError> {
        let line = self.expect_line(GRANTED)?;
        let bits = line.trim_start_matches(GRANTED).trim();
        if bits.len() != self.keys || bits.chars().any(|c| c != '0' && c != '1') {
            return Err(format!("holder answered {line:?} for {} keys", self.keys).into());
        }
        self.granted = bits.chars().map(|c| c == '1').collect();
        Ok(())
    }

    /// Reads the next line, which must start with `word`; kills the
    /// process otherwise (when `self` is dropped with the error).
    fn expect_line(&mut self, word: &str) -> Result<String, BoxError> {
        let mut line = String::new();
        let read = self.stdout.read_line(&mut line);
        let line = line.trim().to_string();
        if read.is_err() || line.split_whitespace().next() != Some(word) {
            let _ = self.child.kill();
            let status = self.child.wait();
            return Err(
                format!("holder did not say {word}: {line:?} ({read:?}, exit {status:?})").into(),
            );
        }
        Ok(line)
    }

    /// Per key, in order: granted to the holder or not (empty for a
    /// `--wait` holder until [`wait_granted`](Self::wait_granted)).
    pub fn granted(&self) -> &[bool] {
        &self.granted
    }

    /// The holder's process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Kills the holder (SIGKILL on Unix) and reaps it.
    pub fn kill(self) {
        drop(self);
    }

    /// A [`Holder`] for the suite, provided the process got every key
    /// (otherwise it is killed and the bits are the error).
    ///
    /// # Errors
    ///
    /// Some key was held elsewhere.
    pub fn into_holder(self) -> Result<Holder, BoxError> {
        if self.granted.contains(&false) {
            return Err(format!("holder did not get every key: {self:?}").into());
        }
        let label = format!("{self:?}");
        Ok(Holder::new(label, move || drop(self)))
    }
}

impl Drop for HolderProcess {
    fn drop(&mut self) {
        // std's kill is SIGKILL on Unix.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl fmt::Debug for HolderProcess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bits: String = self
            .granted
            .iter()
            .map(|g| if *g { '1' } else { '0' })
            .collect();
        f.debug_struct("HolderProcess")
            .field("pid", &self.child.id())
            .field("granted", &bits)
            .finish()
    }
}

/// [`Harness::spawn_holder`](crate::Harness::spawn_holder) for a driver with
/// a holder example: starts `program` on a blocking thread and answers once
/// it holds every key.
///
/// # Errors
///
/// As for [`HolderProcess::start`] and [`HolderProcess::into_holder`].
pub async fn spawn(
    program: PathBuf,
    url: String,
    database: DatabaseId,
    keys: Vec<LockKey>,
) -> Result<Holder, BoxError> {
    tokio::task::spawn_blocking(move || {
        HolderProcess::start(&program, &url, &database, &keys)?.into_holder()
    })
    .await?
}
