//! Cold start: load a snapshot of N devices and N identities from SQLite into
//! memory, and report the time and the process RSS.
//!
//! Run: `cargo bench --bench snapshot_load` (N = 1,000,000 by default;
//! `PORTCULLIS_BENCH_N=200000 cargo bench --bench snapshot_load` for a quick
//! run). Targets: ≤ 5 s and ≤ 1.5 GiB RSS for 1M + 1M. The database is built
//! once per N under the target directory and reused.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Instant;

use portcullis::posture::Posture;
use portcullis::posture::event::Feed;
use portcullis::posture::model::{
    Compliance, Device, Identity, IdentityStatus, Lifecycle, Ownership,
};
use portcullis::store::sqlite::SqliteStore;
use portcullis::store::{CommitBatch, EventStore};
use portcullis::telemetry::Metrics;

// The same allocator as the `portcullis` binary, so RSS is what production sees.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn main() {
    // `cargo bench` passes `--bench`; ignore arguments.
    let n: u64 = std::env::var("PORTCULLIS_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    let dir = std::path::Path::new(&target).join("bench-data");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("snapshot-{n}.db"));
    if !path.exists() {
        let build = Instant::now();
        let tmp = dir.join(format!("snapshot-{n}.db.building"));
        let _ = std::fs::remove_file(&tmp);
        let mut store = SqliteStore::open(&tmp, false).unwrap();
        let mut i = 0;
        while i < n {
            let end = (i + 50_000).min(n);
            let mut b = CommitBatch::default();
            for k in i..end {
                b.devices.push(Device {
                    id: format!("device-{k:08}"),
                    platform: Some("macos".into()),
                    os_version: Some("15.3.2".into()),
                    ownership: Ownership::Corporate,
                    management_source: Some("jamf".into()),
                    lifecycle: Lifecycle::Enrolled,
                    compliance: Compliance::Compliant,
                    last_check_in_ms: Some(1_767_225_600_000),
                    subjects: vec![format!("user-{k:08}@example.com")],
                    updated_ms: 1_767_225_600_000,
                    source: Some(Feed::Jamf),
                    version: 1,
                    ..Device::default()
                });
                b.identities.push(Identity {
                    subject: format!("user-{k:08}@example.com"),
                    status: IdentityStatus::Active,
                    department: Some("engineering".into()),
                    groups: vec!["engineering".into(), "vpn".into()],
                    entitlements: vec!["git:write".into()],
                    devices: vec![format!("device-{k:08}")],
                    updated_ms: 1_767_225_600_000,
                    source: Some(Feed::Scim),
                    version: 1,
                    ..Identity::default()
                });
            }
            store.commit(&b).unwrap();
            i = end;
        }
        drop(store);
        std::fs::rename(&tmp, &path).unwrap();
        let _ = std::fs::rename(
            dir.join(format!("snapshot-{n}.db.building-wal")),
            dir.join(format!("snapshot-{n}.db-wal")),
        );
        eprintln!(
            "built {} in {:.1} s",
            path.display(),
            build.elapsed().as_secs_f64()
        );
    }
    {
        // Where the time goes: read + parse only, records dropped.
        let mut store = SqliteStore::open(&path, true).unwrap();
        let t = Instant::now();
        store.load(&|_| {}).unwrap();
        println!(
            "snapshot_load: read+parse only {:.2} s",
            t.elapsed().as_secs_f64()
        );
    }
    let rss_before = rss_kib();
    let start = Instant::now();
    let store = SqliteStore::open(&path, true).unwrap();
    let posture = Posture::start(Box::new(store), Arc::new(Metrics::new())).unwrap();
    let elapsed = start.elapsed();
    let (d, i) = posture.snapshot().counts();
    let rss_after = rss_kib();
    assert_eq!((d, i), (n, n));
    println!(
        "snapshot_load: {n} devices + {n} identities loaded in {:.2} s; RSS {:.0} MiB (before load {:.0} MiB)",
        elapsed.as_secs_f64(),
        rss_after as f64 / 1024.0,
        rss_before as f64 / 1024.0
    );
}
