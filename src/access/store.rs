//! Durable access memory: its own tables in the store's SQLite database,
//! written through its own connection (WAL lets it run beside the event
//! writer), and the background task that flushes changed rows, trims to the
//! bounds, and tails the event log for feed health.
//!
//! This task never runs on the request path; a failed flush keeps the rows
//! marked and is retried on the next tick.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::watch;

use super::memory::{AccessMemory, Dirty, Evicted, RouteRow, TokenRow};

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS access_routes (
    subject TEXT NOT NULL,
    device  TEXT NOT NULL,
    route   TEXT NOT NULL,
    last_ms INTEGER NOT NULL,
    body    TEXT NOT NULL,
    PRIMARY KEY (subject, device, route)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS access_tokens (
    hash    TEXT PRIMARY KEY,
    last_ms INTEGER NOT NULL,
    body    TEXT NOT NULL
) WITHOUT ROWID;
"#;

/// Most events read from the log per tail step.
const TAIL_BATCH: i64 = 10_000;

/// The access tables, through their own connection.
pub struct AccessStore {
    conn: Connection,
    /// The last event-log sequence folded into the feed health.
    tail_seq: i64,
}

impl std::fmt::Debug for AccessStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessStore")
            .field("tail_seq", &self.tail_seq)
            .finish()
    }
}

fn db(e: rusqlite::Error) -> String {
    e.to_string()
}

impl AccessStore {
    /// Opens (and creates) the access tables in the database at `path`.
    pub fn open(path: &Path) -> Result<Self, String> {
        let conn = Connection::open(path).map_err(db)?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA busy_timeout=5000; PRAGMA synchronous=NORMAL;",
        )
        .map_err(db)?;
        conn.execute_batch(SCHEMA).map_err(db)?;
        Ok(Self { conn, tail_seq: 0 })
    }

    /// Loads the stored rows into `mem` and the feed health from the event log.
    pub fn load(&mut self, mem: &AccessMemory) -> Result<(), String> {
        for body in self.bodies("SELECT body FROM access_routes")? {
            if let Ok(r) = serde_json::from_str::<RouteRow>(&body) {
                mem.restore_route(r);
            }
        }
        for body in self.bodies("SELECT body FROM access_tokens")? {
            if let Ok(r) = serde_json::from_str::<TokenRow>(&body) {
                mem.restore_token(r);
            }
        }
        self.load_feeds(mem)
    }

    fn bodies(&self, sql: &str) -> Result<Vec<String>, String> {
        let mut st = self.conn.prepare(sql).map_err(db)?;
        let rows = st
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(db)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(db)?;
        Ok(rows)
    }

    fn has_events_table(&self) -> Result<bool, String> {
        self.conn
            .query_row(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'events'",
                [],
                |_| Ok(()),
            )
            .optional()
            .map(|o| o.is_some())
            .map_err(db)
    }

    fn load_feeds(&mut self, mem: &AccessMemory) -> Result<(), String> {
        if !self.has_events_table()? {
            return Ok(());
        }
        let mut st = self
            .conn
            .prepare(
                "SELECT e.feed, e.accepted_ms, e.id, c.n FROM events e JOIN \
                 (SELECT feed, MAX(seq) AS s, COUNT(*) AS n FROM events GROUP BY feed) c \
                 ON e.seq = c.s",
            )
            .map_err(db)?;
        let rows = st
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                ))
            })
            .map_err(db)?;
        for row in rows {
            let (feed, ms, id, n) = row.map_err(db)?;
            mem.feed_seen(&feed, ms.max(0) as u64, &id, n.max(0) as u64);
        }
        drop(st);
        self.tail_seq = self
            .conn
            .query_row("SELECT COALESCE(MAX(seq), 0) FROM events", [], |r| r.get(0))
            .map_err(db)?;
        Ok(())
    }

    /// Folds events appended since the last call into the feed health.
    pub fn tail(&mut self, mem: &AccessMemory) -> Result<(), String> {
        if !self.has_events_table()? {
            return Ok(());
        }
        loop {
            let mut st = self
                .conn
                .prepare_cached(
                    "SELECT seq, feed, accepted_ms, id FROM events WHERE seq > ?1 ORDER BY seq LIMIT ?2",
                )
                .map_err(db)?;
            let rows: Vec<(i64, String, i64, String)> = st
                .query_map(params![self.tail_seq, TAIL_BATCH], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                })
                .map_err(db)?
                .collect::<Result<_, _>>()
                .map_err(db)?;
            let n = rows.len() as i64;
            for (seq, feed, ms, id) in rows {
                mem.feed_seen(&feed, ms.max(0) as u64, &id, 1);
                self.tail_seq = seq;
            }
            if n < TAIL_BATCH {
                return Ok(());
            }
        }
    }

    /// Writes changed rows and deletes evicted ones, in one transaction.
    pub fn flush(&mut self, d: &Dirty, ev: &Evicted) -> Result<(), String> {
        if d.routes.is_empty()
            && d.tokens.is_empty()
            && ev.routes.is_empty()
            && ev.tokens.is_empty()
        {
            return Ok(());
        }
        let tx = self.conn.transaction().map_err(db)?;
        {
            let mut up = tx
                .prepare_cached(
                    "INSERT INTO access_routes (subject, device, route, last_ms, body) \
                     VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (subject, device, route) \
                     DO UPDATE SET last_ms = excluded.last_ms, body = excluded.body",
                )
                .map_err(db)?;
            for r in &d.routes {
                let body = serde_json::to_string(r).map_err(|e| e.to_string())?;
                up.execute(params![
                    r.subject,
                    r.device.as_deref().unwrap_or(""),
                    r.route,
                    r.last_ms as i64,
                    body
                ])
                .map_err(db)?;
            }
            let mut del = tx
                .prepare_cached(
                    "DELETE FROM access_routes WHERE subject = ?1 AND device = ?2 AND route = ?3",
                )
                .map_err(db)?;
            for (s, dv, r) in &ev.routes {
                del.execute(params![s, dv.as_deref().unwrap_or(""), r])
                    .map_err(db)?;
            }
            let mut up = tx
                .prepare_cached(
                    "INSERT INTO access_tokens (hash, last_ms, body) VALUES (?1, ?2, ?3) \
                     ON CONFLICT (hash) DO UPDATE SET last_ms = excluded.last_ms, body = excluded.body",
                )
                .map_err(db)?;
            for t in &d.tokens {
                let body = serde_json::to_string(t).map_err(|e| e.to_string())?;
                up.execute(params![t.hash, t.last_ms as i64, body])
                    .map_err(db)?;
            }
            let mut del = tx
                .prepare_cached("DELETE FROM access_tokens WHERE hash = ?1")
                .map_err(db)?;
            for h in &ev.tokens {
                del.execute(params![h]).map_err(db)?;
            }
        }
        tx.commit().map_err(db)
    }
}

/// One flush step: trim, write what changed (`all`: every changed row, not
/// only those due), tail the event log.
fn step(store: &Mutex<AccessStore>, mem: &AccessMemory, all: bool) {
    let ev = mem.trim();
    let dirty = mem.take_dirty(crate::util::now_unix_ms(), all);
    let Ok(mut s) = store.lock() else {
        return;
    };
    if let Err(e) = s.flush(&dirty, &ev) {
        // The rows stay in memory; the next change of each marks it again.
        tracing::warn!(error = %e, rows = dirty.routes.len(), "access memory flush failed");
    }
    if let Err(e) = s.tail(mem) {
        tracing::warn!(error = %e, "reading the event log for feed health failed");
    }
}

/// Opens the access tables next to the event store and loads what they hold.
pub fn open_and_load(path: &Path, mem: &AccessMemory) -> Result<Arc<Mutex<AccessStore>>, String> {
    let mut s = AccessStore::open(path)?;
    s.load(mem)?;
    Ok(Arc::new(Mutex::new(s)))
}

/// Flushes every `interval` until shutdown, then once more.
pub async fn flush_loop(
    store: Arc<Mutex<AccessStore>>,
    mem: Arc<AccessMemory>,
    interval: impl Fn() -> Duration + Send + 'static,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let stop = tokio::select! {
            _ = tokio::time::sleep(interval()) => false,
            _ = shutdown.changed() => true,
        };
        let (s, m) = (store.clone(), mem.clone());
        let _ = tokio::task::spawn_blocking(move || step(&s, &m, stop)).await;
        if stop {
            break;
        }
    }
}

/// Flushes now (tests and the admin report use it to see the latest rows
/// and feeds without waiting a tick).
pub async fn flush_now(store: &Arc<Mutex<AccessStore>>, mem: &Arc<AccessMemory>) {
    let (s, m) = (store.clone(), mem.clone());
    let _ = tokio::task::spawn_blocking(move || step(&s, &m, true)).await;
}
