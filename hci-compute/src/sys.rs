//! Small process facts read from `/proc` (thread ids, CPU time, memory).

use std::fs;
use std::time::Duration;

/// The calling thread's kernel thread ID.
pub fn gettid() -> i32 {
    // SAFETY: gettid has no preconditions and cannot fail.
    unsafe { libc::gettid() }
}

/// CPU time a thread of this process has used (`/proc/self/task/TID/schedstat`).
pub fn thread_cpu_time(tid: i32) -> Option<Duration> {
    let s = fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).ok()?;
    let ns: u64 = s.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_nanos(ns))
}

/// Resident set size of this process, bytes.
pub fn process_rss() -> u64 {
    let Ok(s) = fs::read_to_string("/proc/self/statm") else {
        return 0;
    };
    let pages: u64 = s
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    pages * page_size()
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(v).unwrap_or(4096)
}

/// Resident bytes of the mappings that start at the given host addresses
/// (guest RAM), from `/proc/self/smaps`.
pub fn mapping_rss(starts: &[u64]) -> u64 {
    let Ok(smaps) = fs::read_to_string("/proc/self/smaps") else {
        return 0;
    };
    let mut total = 0;
    let mut counting = false;
    for line in smaps.lines() {
        // Mapping header lines look like "7f00-7f80 rw-p ...".
        if let Some((range, _)) = line.split_once(' ')
            && let Some((start, _)) = range.split_once('-')
            && let Ok(start) = u64::from_str_radix(start, 16)
        {
            counting = starts.contains(&start);
            continue;
        }
        if counting && let Some(kb) = line.strip_prefix("Rss:") {
            total += kb
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .unwrap_or(0)
                * 1024;
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_facts_are_readable() {
        assert!(process_rss() > 0);
        assert!(thread_cpu_time(gettid()).is_some());
        assert_eq!(mapping_rss(&[1]), 0);
    }
}
