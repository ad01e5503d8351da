//! What a driver provides to run the suite.

use std::fmt;
use std::future::Future;

use shardlock_core::{BoxError, DatabaseId, Driver, LockKey};

/// How the suite reaches a driver's server.
pub trait Harness: Send + Sync + 'static {
    /// The driver under test.
    type Driver: Driver;

    /// A driver as one node would have it. Every call stands for a separate
    /// node (process): faults injected through one must not affect another.
    fn driver(&self) -> Self::Driver;

    /// The database the suite's keys live in.
    fn database(&self) -> DatabaseId;

    /// Ends `session` from the server's side, as an operator would (e.g.
    /// `pg_terminate_backend`): the server frees its locks at once.
    fn terminate(
        &self,
        session: &<Self::Driver as Driver>::Session,
    ) -> impl Future<Output = ()> + Send;

    /// Starts a holder of `keys` in a separate process (or what stands for
    /// one in this driver) and returns once it holds them all.
    fn spawn_holder(
        &self,
        keys: Vec<LockKey>,
    ) -> impl Future<Output = Result<Holder, BoxError>> + Send;
}

/// A process holding keys, to be killed hard.
pub struct Holder {
    label: String,
    kill: Box<dyn FnOnce() + Send>,
}

impl Holder {
    /// A holder that `kill` ends hard (SIGKILL or the driver's equivalent).
    pub fn new(label: impl Into<String>, kill: impl FnOnce() + Send + 'static) -> Self {
        Self {
            label: label.into(),
            kill: Box::new(kill),
        }
    }

    /// Kills the holder without letting it clean up.
    pub fn kill(self) {
        (self.kill)();
    }
}

impl fmt::Debug for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Holder")
            .field("label", &self.label)
            .finish()
    }
}

/// Starts a holder process and waits for its first line on standard output,
/// which must start with `ready` and say the process holds its keys (`check`
/// judges the line). The returned [`Holder`] kills it with SIGKILL.
///
/// # Errors
///
/// The process cannot start, or its first line is missing or refused by
/// `check` (the process is then killed).
pub fn spawn_holder_process(
    mut command: std::process::Command,
    ready: &str,
    check: impl FnOnce(&str) -> bool,
) -> Result<Holder, BoxError> {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = child.stdout.take().ok_or("no stdout pipe")?;
    let mut line = String::new();
    // The holder prints one line once it holds its keys, or exits.
    let read = BufReader::new(stdout).read_line(&mut line);
    if read.is_err() || !line.starts_with(ready) || !check(line.trim()) {
        let _ = child.kill();
        let status = child.wait();
        return Err(format!("holder did not get ready: {line:?} {read:?} {status:?}").into());
    }
    let label = format!("holder pid {} ({})", child.id(), line.trim());
    Ok(Holder::new(label, move || {
        // std's kill is SIGKILL on Unix: no clean-up in the holder.
        let _ = child.kill();
        let _ = child.wait();
    }))
}

/// A fresh name, unique per call: `<what>-<random>`.
pub fn unique_name(what: &str) -> String {
    let suffix: String = (0..10).map(|_| fastrand::alphanumeric()).collect();
    format!("contract-{what}-{suffix}")
}

/// `n` fresh keys for one test.
pub fn unique_keys(what: &str, n: usize) -> Vec<LockKey> {
    let base = unique_name(what);
    (0..n)
        .map(|i| LockKey::new(format!("{base}-{i}")).expect("BUG: generated names are valid"))
        .collect()
}

/// Prints the loud skip line for a test whose server is not available.
///
/// `env` names the variable that makes it run.
pub fn skip(test_group: &str, why: &str, env: &str) {
    eprintln!("SKIPPED: {test_group}: {why}, set {env} to run");
    if std::env::var("SHARDLOCK_REQUIRE")
        .map(|v| v.split(',').any(|d| test_group.contains(d.trim())))
        .unwrap_or(false)
    {
        panic!("{test_group} is required (SHARDLOCK_REQUIRE) but skipped: {why}");
    }
}
