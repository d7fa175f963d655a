//! The engine's side of the dirty-region log (see [`crate::replica::dirty`]).
//!
//! Before a write, zeroes or discard touches a region that is not marked yet,
//! the region is marked dirty on every writable replica (persisted there)
//! and only then is the request sent. Regions stay marked while they are hot;
//! after a flush, at most every [`CLEAR_EVERY`], the regions with nothing in
//! flight whose last write completed before that flush started are cleared
//! again. After an engine crash, reconcile compares only the marked regions.
//!
//! Ordering: marks and clears are sent under one async lock (so a clear can
//! never overtake the mark of a later write on a replica), and a write enters
//! a marked region under the same state lock that a clear uses to pick its
//! regions, so no region is cleared with a write in flight.

use std::ops::Range;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Smallest region tracked.
const MIN_REGION: u64 = 1 << 20;
/// Most regions a volume is split into (the region size doubles beyond).
const MAX_REGIONS: u64 = 1 << 16;
/// Clearing is lazy: at most once per this interval, after a flush.
pub const CLEAR_EVERY: Duration = Duration::from_secs(1);

/// The region size for a volume of `size` bytes: 1 MiB, doubled until the
/// volume has at most 65,536 regions.
pub fn region_size_for(size: u64) -> u64 {
    let mut r = MIN_REGION;
    while size / r > MAX_REGIONS {
        r *= 2;
    }
    r
}

#[derive(Debug, Default)]
struct State {
    marked: Vec<bool>,
    inflight: Vec<u32>,
    /// Completion sequence number of the last request that touched a region.
    last_done: Vec<u64>,
    done_seq: u64,
    /// Regions some request waits to have marked (taken by the lock holder).
    wanted: Vec<u64>,
}

impl State {
    fn grow(&mut self, end: u64) {
        let end = end as usize;
        if self.marked.len() < end {
            self.marked.resize(end, false);
            self.inflight.resize(end, 0);
            self.last_done.resize(end, 0);
        }
    }
}

/// Tracks which regions are marked on the replicas and which have requests
/// in flight.
#[derive(Debug)]
pub(crate) struct DirtyTracker {
    region_size: u64,
    state: Mutex<State>,
    /// Held while marks or clears are sent to the replicas.
    pub(crate) log_lock: tokio::sync::Mutex<()>,
    last_clear: Mutex<Instant>,
}

impl DirtyTracker {
    pub(crate) fn new(size: u64) -> Self {
        DirtyTracker {
            region_size: region_size_for(size),
            state: Mutex::new(State::default()),
            log_lock: tokio::sync::Mutex::new(()),
            last_clear: Mutex::new(Instant::now()),
        }
    }

    pub(crate) fn region_size(&self) -> u64 {
        self.region_size
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The regions `[offset, offset + len)` touches (at least one).
    pub(crate) fn regions(&self, offset: u64, len: u64) -> Range<u64> {
        let first = offset / self.region_size;
        let last = offset.saturating_add(len.max(1) - 1) / self.region_size;
        first..last + 1
    }

    /// Enters `regions` if all are marked: counts the request in flight.
    pub(crate) fn try_enter(&self, regions: &Range<u64>) -> bool {
        let mut st = self.state();
        st.grow(regions.end);
        if regions.clone().any(|r| !st.marked[r as usize]) {
            return false;
        }
        for r in regions.clone() {
            st.inflight[r as usize] += 1;
        }
        true
    }

    /// Records that `regions` are wanted marked; returns every unmarked
    /// region wanted so far (to be marked by the caller, which holds
    /// `log_lock`).
    pub(crate) fn want(&self, regions: &Range<u64>) {
        let mut st = self.state();
        st.grow(regions.end);
        let missing: Vec<u64> = regions
            .clone()
            .filter(|&r| !st.marked[r as usize])
            .collect();
        st.wanted.extend(missing);
    }

    /// Takes the wanted regions that are still unmarked, and those of `also`.
    pub(crate) fn take_wanted(&self, also: &Range<u64>) -> Vec<u64> {
        let mut st = self.state();
        st.grow(also.end);
        let mut w = std::mem::take(&mut st.wanted);
        w.extend(also.clone());
        w.retain(|&r| !st.marked[r as usize]);
        w.sort_unstable();
        w.dedup();
        w
    }

    /// Records `regions` as marked on the replicas.
    pub(crate) fn set_marked(&self, regions: &[u64]) {
        let mut st = self.state();
        for &r in regions {
            st.grow(r + 1);
            st.marked[r as usize] = true;
        }
    }

    /// Every marked region.
    pub(crate) fn marked(&self) -> Vec<u64> {
        let st = self.state();
        (0..st.marked.len() as u64)
            .filter(|&r| st.marked[r as usize])
            .collect()
    }

    /// A request on `regions` ended (successfully or not).
    pub(crate) fn leave(&self, regions: Range<u64>) {
        let mut st = self.state();
        st.done_seq += 1;
        let seq = st.done_seq;
        for r in regions {
            let r = r as usize;
            if r < st.inflight.len() {
                st.inflight[r] = st.inflight[r].saturating_sub(1);
                st.last_done[r] = seq;
            }
        }
    }

    /// The completion sequence number now: a flush that starts now covers
    /// every request that completed up to it.
    pub(crate) fn flush_point(&self) -> u64 {
        self.state().done_seq
    }

    /// True if a lazy clear is due.
    pub(crate) fn clear_due(&self) -> bool {
        self.last_clear
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .elapsed()
            >= CLEAR_EVERY
    }

    /// Unmarks (in memory) and returns the regions that a flush which started
    /// at `point` made clean: nothing in flight, last request done before it.
    /// The caller holds `log_lock` and sends the clear to the replicas.
    pub(crate) fn take_clearable(&self, point: u64) -> Vec<u64> {
        *self.last_clear.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        let mut st = self.state();
        let mut out = Vec::new();
        for r in 0..st.marked.len() {
            if st.marked[r] && st.inflight[r] == 0 && st.last_done[r] <= point {
                st.marked[r] = false;
                out.push(r as u64);
            }
        }
        out
    }
}

/// Leaves its regions when dropped (also when the request is cancelled).
pub(crate) struct DirtyGuard<'a> {
    pub(crate) tracker: &'a DirtyTracker,
    pub(crate) regions: Range<u64>,
}

impl Drop for DirtyGuard<'_> {
    fn drop(&mut self) {
        self.tracker.leave(self.regions.clone());
    }
}

/// Merges byte ranges `(offset, len)` into sorted, non-overlapping ones.
pub(crate) fn merge_ranges(mut v: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    v.retain(|&(_, l)| l > 0);
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (o, l) in v {
        let end = o.saturating_add(l);
        match out.last_mut() {
            Some((po, pl)) if *po + *pl >= o => *pl = (*pl).max(end - *po),
            _ => out.push((o, end - o)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_sizes_bound_the_count() {
        assert_eq!(region_size_for(0), 1 << 20);
        assert_eq!(region_size_for(64 << 30), 1 << 20);
        assert_eq!(region_size_for(1 << 40), 16 << 20);
    }

    #[test]
    fn clears_skip_regions_in_flight_or_written_after_the_flush() {
        let t = DirtyTracker::new(16 << 20);
        let a = t.regions(0, 4096);
        let b = t.regions(3 << 20, 2 << 20);
        assert_eq!(b, 3..5);
        assert!(!t.try_enter(&a));
        t.want(&a);
        t.want(&b);
        assert_eq!(t.take_wanted(&(1..2)), vec![0, 1, 3, 4]);
        t.set_marked(&[0, 3, 4]);
        assert!(t.take_wanted(&(0..1)).is_empty());
        assert!(t.try_enter(&a));
        assert!(t.try_enter(&b));
        t.leave(a.clone());
        let point = t.flush_point();
        // b is still in flight; a completed before the flush.
        assert_eq!(t.take_clearable(point), vec![0]);
        assert!(t.take_clearable(point).is_empty());
        t.leave(b.clone());
        // b completed after the flush started: not clean yet.
        assert!(t.take_clearable(point).is_empty());
        assert_eq!(t.take_clearable(t.flush_point()), vec![3, 4]);
        assert!(t.marked().is_empty());
    }

    #[test]
    fn ranges_merge() {
        assert_eq!(
            merge_ranges(vec![(10, 5), (0, 4), (4, 2), (12, 10), (30, 0)]),
            vec![(0, 6), (10, 12)]
        );
    }
}
