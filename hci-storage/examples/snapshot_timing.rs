//! Times snapshot, snapshot deletion (merge) and reopen of a large volume.
//!
//! ```text
//! cargo run --release -p hci-storage --example snapshot_timing -- [DIR] [SIZE_GIB] [ALLOC_GIB]
//! ```
//!
//! Defaults: a temporary directory under /dev/shm (RAM), a 10 GiB volume with
//! 5 GiB allocated in 1 MiB writes spread over the volume.
#![allow(clippy::print_stdout)]

use std::path::PathBuf;
use std::time::Instant;

use hci_storage::local::Replica;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let base = args
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/dev/shm"));
    let size_gib: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(10);
    let alloc_gib: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(5);
    let tmp = tempfile::tempdir_in(&base)?;
    let dir = tmp.path().join("vol");
    let size = size_gib << 30;
    let r = Replica::create(&dir, size, None)?;

    let chunk = vec![0x5au8; 1 << 20];
    let chunks = (alloc_gib << 30) >> 20;
    let stride = size / chunks.max(1);
    let t = Instant::now();
    for i in 0..chunks {
        r.write(&chunk, i * stride / (1 << 20) * (1 << 20), false)?;
    }
    r.flush()?;
    println!(
        "wrote {alloc_gib} GiB into a {size_gib} GiB volume in {:.1?}",
        t.elapsed()
    );

    let mut times = Vec::new();
    for i in 0..5 {
        r.write(&chunk[..4096], 4096 * i, false)?;
        let t = Instant::now();
        r.snapshot(&format!("s{i}"))?;
        times.push(t.elapsed());
    }
    times.sort();
    println!(
        "snapshot: median {:.2?} (min {:.2?}, max {:.2?}) over 5",
        times[2], times[0], times[4]
    );

    let t = Instant::now();
    r.delete_snapshot("s4")?;
    println!(
        "delete newest snapshot (merge a 4 KiB layer into the head): {:.2?}",
        t.elapsed()
    );
    let t = Instant::now();
    r.delete_snapshot("s0")?;
    println!(
        "delete oldest snapshot (merge {alloc_gib} GiB into a small child): {:.2?}",
        t.elapsed()
    );

    drop(r);
    let t = Instant::now();
    let r = Replica::open(&dir, None)?;
    println!(
        "reopen (rebuild the block map from {} layers): {:.2?}",
        r.snapshots().len() + 1,
        t.elapsed()
    );
    Ok(())
}
