//! Retention policies: which backups to keep, as a pure function.

use std::collections::BTreeSet;

use chrono::{DateTime, Datelike, Utc};

/// How many backups to keep, restic-style. A backup kept by any rule stays.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// Keep the newest `n` backups.
    pub keep_last: usize,
    /// Keep the newest backup of each of the last `n` days that have one.
    pub keep_daily: usize,
    /// Keep the newest backup of each of the last `n` ISO weeks that have one.
    pub keep_weekly: usize,
    /// Keep the newest backup of each of the last `n` months that have one.
    pub keep_monthly: usize,
}

impl RetentionPolicy {
    /// True if the policy keeps nothing (prune would delete everything).
    pub fn is_empty(&self) -> bool {
        self.keep_last + self.keep_daily + self.keep_weekly + self.keep_monthly == 0
    }
}

/// Returns the ids to keep among `backups` (id, creation time) of one volume.
pub fn select_keep(
    backups: &[(String, DateTime<Utc>)],
    policy: &RetentionPolicy,
) -> BTreeSet<String> {
    let mut sorted: Vec<&(String, DateTime<Utc>)> = backups.iter().collect();
    sorted.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| b.0.cmp(&a.0)));
    let mut keep = BTreeSet::new();
    for (id, _) in sorted.iter().take(policy.keep_last) {
        keep.insert(id.clone());
    }
    let mut bucket = |n: usize, key: &dyn Fn(&DateTime<Utc>) -> (i32, u32)| {
        let mut last = None;
        let mut count = 0;
        for (id, t) in &sorted {
            if count >= n {
                break;
            }
            let k = key(t);
            if last != Some(k) {
                last = Some(k);
                count += 1;
                keep.insert(id.clone());
            }
        }
    };
    bucket(policy.keep_daily, &|t| (t.year(), t.ordinal()));
    bucket(policy.keep_weekly, &|t| {
        let w = t.iso_week();
        (w.year(), w.week())
    });
    bucket(policy.keep_monthly, &|t| (t.year(), t.month()));
    keep
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(d: u32, h: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, d, h, 0, 0)
            .single()
            .unwrap_or_default()
    }

    #[test]
    fn keeps_last_and_daily() {
        let b: Vec<(String, DateTime<Utc>)> = vec![
            ("a".into(), at(1, 1)),
            ("b".into(), at(1, 5)),
            ("c".into(), at(2, 1)),
            ("d".into(), at(3, 1)),
            ("e".into(), at(3, 2)),
        ];
        let p = RetentionPolicy {
            keep_last: 1,
            keep_daily: 2,
            ..Default::default()
        };
        let k = select_keep(&b, &p);
        assert_eq!(k.into_iter().collect::<Vec<_>>(), vec!["c", "e"]);
        let p = RetentionPolicy {
            keep_monthly: 1,
            ..Default::default()
        };
        assert_eq!(select_keep(&b, &p).len(), 1);
        assert!(select_keep(&b, &RetentionPolicy::default()).is_empty());
        let p = RetentionPolicy {
            keep_daily: 10,
            ..Default::default()
        };
        assert_eq!(
            select_keep(&b, &p).into_iter().collect::<Vec<_>>(),
            vec!["b", "c", "e"]
        );
    }
}
