//! CPU time of this process, from `/proc` (no extra dependency).

use std::fs;
use std::io;
use std::time::Duration;

/// Clock ticks per second of `/proc/<pid>/stat` on Linux (`USER_HZ`,
/// 100 on every mainstream architecture).
const USER_HZ: u64 = 100;

/// CPU time (user + system) this process has used so far, summed over its
/// threads.
///
/// Reads the first field of `/proc/self/task/<tid>/schedstat` (nanoseconds
/// on the CPU) of every thread; if schedstat is not available, falls back to
/// `utime + stime` of `/proc/self/stat` (10 ms resolution). Threads that
/// already exited are not counted by the first method, so measure over a
/// window in which no thread ends.
///
/// # Errors
///
/// When `/proc` cannot be read (not Linux).
pub fn process_cpu_time() -> io::Result<Duration> {
    match schedstat_total() {
        Ok(total) => Ok(total),
        Err(_) => stat_total(),
    }
}

/// CPU time on the CPU so far of each live thread of this process, by
/// thread id (`/proc/self/task/<tid>/schedstat`).
#[derive(Debug, Clone, Default)]
pub struct CpuSnapshot(std::collections::HashMap<String, u64>);

impl CpuSnapshot {
    /// Reads every live thread's schedstat now.
    ///
    /// # Errors
    ///
    /// When `/proc/self/task` cannot be read (not Linux).
    pub fn now() -> io::Result<Self> {
        let mut threads = std::collections::HashMap::new();
        for entry in fs::read_dir("/proc/self/task")? {
            let entry = entry?;
            if let Some(ns) = thread_ns(&entry.path().join("schedstat"))? {
                threads.insert(entry.file_name().to_string_lossy().into_owned(), ns);
            }
        }
        Ok(Self(threads))
    }

    /// CPU time used between `earlier` and this snapshot: per thread, so a
    /// thread that exited in between (a runtime's idle blocking thread)
    /// does not make the total go down; a thread born in between counts
    /// from zero.
    pub fn since(&self, earlier: &CpuSnapshot) -> Duration {
        let ns: u64 = self
            .0
            .iter()
            .map(|(tid, now)| now.saturating_sub(earlier.0.get(tid).copied().unwrap_or(0)))
            .sum();
        Duration::from_nanos(ns)
    }
}

/// The first field of a thread's schedstat; `None` if the thread is gone.
fn thread_ns(path: &std::path::Path) -> io::Result<Option<u64>> {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    text.split_whitespace()
        .next()
        .and_then(|n| n.parse::<u64>().ok())
        .map(Some)
        .ok_or_else(|| io::Error::other(format!("unexpected {}: {text:?}", path.display())))
}

fn schedstat_total() -> io::Result<Duration> {
    let mut total = 0u64;
    for entry in fs::read_dir("/proc/self/task")? {
        let path = entry?.path().join("schedstat");
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            // The thread ended between the listing and the read.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let first = text
            .split_whitespace()
            .next()
            .and_then(|n| n.parse::<u64>().ok())
            .ok_or_else(|| io::Error::other(format!("unexpected {}: {text:?}", path.display())))?;
        total += first;
    }
    Ok(Duration::from_nanos(total))
}

fn stat_total() -> io::Result<Duration> {
    let text = fs::read_to_string("/proc/self/stat")?;
    // The command name (field 2) may hold spaces: count from its closing ')'.
    let after = text
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| io::Error::other("unexpected /proc/self/stat"))?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After ')': field 3 is at index 0, so utime (14) and stime (15) are at 11 and 12.
    let ticks = |i: usize| -> io::Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| io::Error::other("unexpected /proc/self/stat"))
    };
    let total = ticks(11)? + ticks(12)?;
    Ok(Duration::from_millis(total * 1000 / USER_HZ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_grows_with_work() {
        let (Ok(before), Ok(_)) = (process_cpu_time(), stat_total()) else {
            eprintln!("no /proc here");
            return;
        };
        let mut x = 0u64;
        let started = std::time::Instant::now();
        while started.elapsed() < Duration::from_millis(30) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        let after = process_cpu_time().unwrap();
        assert!(after > before, "{before:?} -> {after:?}");
    }
}
