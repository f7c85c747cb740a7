//! The embedded store: SQLite, bundled, WAL mode, `synchronous=FULL` by
//! default. The event log and the materialised records are written in one
//! transaction, so a crash leaves either both or neither.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};

use super::{CommitBatch, EventStore, Loaded, LoggedEvent, Outcome, Skipped, StoreError};

fn db(e: rusqlite::Error) -> StoreError {
    StoreError::Db(e.to_string())
}

fn corrupt(e: serde_json::Error) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS events (
    seq          INTEGER PRIMARY KEY,
    id           TEXT NOT NULL UNIQUE,
    feed         TEXT NOT NULL,
    kind         TEXT NOT NULL,
    origin_ms    INTEGER NOT NULL,
    accepted_ms  INTEGER NOT NULL,
    outcome      TEXT NOT NULL,
    body         TEXT NOT NULL,
    skipped      TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS event_keys (
    record_key   TEXT NOT NULL,
    seq          INTEGER NOT NULL,
    PRIMARY KEY (record_key, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS devices (
    id      TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    body    TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS identities (
    subject TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    body    TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS revocations (
    target       TEXT NOT NULL,
    key          TEXT NOT NULL,
    body         TEXT NOT NULL,
    PRIMARY KEY (target, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS groups (
    id      TEXT PRIMARY KEY,
    body    TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sessions (
    id_hash TEXT PRIMARY KEY,
    body    TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (
    k TEXT PRIMARY KEY,
    v TEXT NOT NULL
) WITHOUT ROWID;
"#;

/// The SQLite store.
pub struct SqliteStore {
    conn: Connection,
    path: std::path::PathBuf,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SqliteStore")
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`. `full_sync` picks
    /// `synchronous=FULL` (survives power loss) over `NORMAL` (survives a
    /// process kill, which WAL already guarantees).
    pub fn open(path: &Path, full_sync: bool) -> Result<Self, StoreError> {
        if let Some(parent) = path.parent()
            && !parent.as_os_str().is_empty()
        {
            std::fs::create_dir_all(parent)
                .map_err(|e| StoreError::Db(format!("{}: {e}", parent.display())))?;
        }
        let conn = Connection::open(path)
            .map_err(|e| StoreError::Db(format!("{}: {e}", path.display())))?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .map_err(db)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Db(format!(
                "{}: WAL mode refused ({mode})",
                path.display()
            )));
        }
        conn.execute_batch(if full_sync {
            "PRAGMA synchronous=FULL;"
        } else {
            "PRAGMA synchronous=NORMAL;"
        })
        .map_err(db)?;
        conn.execute_batch("PRAGMA foreign_keys=ON; PRAGMA busy_timeout=5000;")
            .map_err(db)?;
        conn.execute_batch(SCHEMA).map_err(db)?;
        // Stores created before per-field outcomes lack the column.
        let has_skipped = conn
            .prepare("SELECT 1 FROM pragma_table_info('events') WHERE name = 'skipped'")
            .map_err(db)?
            .exists([])
            .map_err(db)?;
        if !has_skipped {
            conn.execute_batch("ALTER TABLE events ADD COLUMN skipped TEXT NOT NULL DEFAULT ''")
                .map_err(db)?;
        }
        Ok(Self {
            conn,
            path: path.to_owned(),
        })
    }
}

impl EventStore for SqliteStore {
    fn contains(&mut self, event_id: &str) -> Result<bool, StoreError> {
        self.conn
            .prepare_cached("SELECT 1 FROM events WHERE id = ?1")
            .map_err(db)?
            .exists(params![event_id])
            .map_err(db)
    }

    fn commit(&mut self, batch: &CommitBatch) -> Result<(), StoreError> {
        let tx = self.conn.transaction().map_err(db)?;
        {
            let mut ins_event = tx
                .prepare_cached(
                    "INSERT INTO events (seq, id, feed, kind, origin_ms, accepted_ms, outcome, body, skipped)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                )
                .map_err(db)?;
            let mut ins_key = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO event_keys (record_key, seq) VALUES (?1, ?2)",
                )
                .map_err(db)?;
            for le in &batch.events {
                let e = &le.event;
                let body = serde_json::to_string(&e.changes).map_err(corrupt)?;
                let skipped = if le.skipped.is_empty() {
                    String::new()
                } else {
                    serde_json::to_string(&le.skipped).map_err(corrupt)?
                };
                ins_event
                    .execute(params![
                        le.seq as i64,
                        e.id,
                        e.feed.as_str(),
                        e.kind,
                        e.origin_ms as i64,
                        le.accepted_ms as i64,
                        le.outcome.as_str(),
                        body,
                        skipped
                    ])
                    .map_err(db)?;
                for k in e.touched() {
                    ins_key.execute(params![k, le.seq as i64]).map_err(db)?;
                }
            }
            let mut up_dev = tx
                .prepare_cached(
                    "INSERT INTO devices (id, version, body) VALUES (?1, ?2, ?3)
                     ON CONFLICT(id) DO UPDATE SET version = excluded.version, body = excluded.body",
                )
                .map_err(db)?;
            for d in &batch.devices {
                let body = serde_json::to_string(d).map_err(corrupt)?;
                up_dev
                    .execute(params![d.id, d.version as i64, body])
                    .map_err(db)?;
            }
            let mut up_id = tx
                .prepare_cached(
                    "INSERT INTO identities (subject, version, body) VALUES (?1, ?2, ?3)
                     ON CONFLICT(subject) DO UPDATE SET version = excluded.version, body = excluded.body",
                )
                .map_err(db)?;
            for i in &batch.identities {
                let body = serde_json::to_string(i).map_err(corrupt)?;
                up_id
                    .execute(params![i.subject, i.version as i64, body])
                    .map_err(db)?;
            }
            let mut up_rev = tx
                .prepare_cached(
                    "INSERT INTO revocations (target, key, body) VALUES (?1, ?2, ?3)
                     ON CONFLICT(target, key) DO UPDATE SET body = excluded.body",
                )
                .map_err(db)?;
            for r in &batch.revocations {
                let body = serde_json::to_string(r).map_err(corrupt)?;
                up_rev
                    .execute(params![r.target.as_str(), r.key, body])
                    .map_err(db)?;
            }
            let mut up_group = tx
                .prepare_cached(
                    "INSERT INTO groups (id, body) VALUES (?1, ?2)
                     ON CONFLICT(id) DO UPDATE SET body = excluded.body",
                )
                .map_err(db)?;
            let mut del_group = tx
                .prepare_cached("DELETE FROM groups WHERE id = ?1")
                .map_err(db)?;
            let mut up_session = tx
                .prepare_cached(
                    "INSERT INTO sessions (id_hash, body) VALUES (?1, ?2)
                     ON CONFLICT(id_hash) DO UPDATE SET body = excluded.body",
                )
                .map_err(db)?;
            let mut del_session = tx
                .prepare_cached("DELETE FROM sessions WHERE id_hash = ?1")
                .map_err(db)?;
            for (id, s) in &batch.sessions {
                match s {
                    Some(s) => {
                        let body = serde_json::to_string(s).map_err(corrupt)?;
                        up_session.execute(params![id, body]).map_err(db)?;
                    }
                    None => {
                        del_session.execute(params![id]).map_err(db)?;
                    }
                }
            }
            for (id, g) in &batch.groups {
                match g {
                    Some(g) => {
                        let body = serde_json::to_string(g).map_err(corrupt)?;
                        up_group.execute(params![id, body]).map_err(db)?;
                    }
                    None => {
                        del_group.execute(params![id]).map_err(db)?;
                    }
                }
            }
            if !batch.meta.is_empty() {
                let mut up_meta = tx
                    .prepare_cached(
                        "INSERT INTO meta (k, v) VALUES (?1, ?2) ON CONFLICT(k) DO UPDATE SET v = excluded.v",
                    )
                    .map_err(db)?;
                for (k, v) in &batch.meta {
                    up_meta.execute(params![k, v]).map_err(db)?;
                }
            }
        }
        tx.commit().map_err(db)
    }

    fn load(&mut self, sink: &(dyn Fn(Loaded) + Sync)) -> Result<u64, StoreError> {
        fn each<T: serde::de::DeserializeOwned>(
            conn: &Connection,
            sql: &str,
            sink: &(dyn Fn(Loaded) + Sync),
            wrap: fn(T) -> Loaded,
        ) -> Result<(), StoreError> {
            let mut stmt = conn.prepare(sql).map_err(db)?;
            let mut rows = stmt.query([]).map_err(db)?;
            while let Some(row) = rows.next().map_err(db)? {
                // Parse straight from SQLite's buffer: no per-row String.
                let text = row
                    .get_ref(0)
                    .map_err(db)?
                    .as_str()
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                sink(wrap(serde_json::from_str::<T>(text).map_err(corrupt)?));
            }
            Ok(())
        }
        let count = |sql: &str| -> Result<u64, StoreError> {
            self.conn
                .query_row(sql, [], |r| r.get::<_, i64>(0))
                .map(|n| n as u64)
                .map_err(db)
        };
        sink(Loaded::SizeHint {
            devices: count("SELECT COUNT(*) FROM devices")?,
            identities: count("SELECT COUNT(*) FROM identities")?,
        });
        // Identities load on a second read connection in parallel with the
        // devices (WAL allows concurrent readers); the snapshot maps are
        // concurrent, so the sink takes both streams at once.
        let second = Connection::open_with_flags(
            &self.path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(db)?;
        let conn = &self.conn;
        let (a, b) = std::thread::scope(|sc| {
            let ids = sc.spawn(move || {
                each(
                    &second,
                    "SELECT body FROM identities",
                    sink,
                    Loaded::Identity,
                )
            });
            let devs = each(conn, "SELECT body FROM devices", sink, Loaded::Device);
            (devs, ids.join())
        });
        a?;
        b.map_err(|_| StoreError::Db("identity loader panicked".into()))??;
        each(
            &self.conn,
            "SELECT body FROM revocations",
            sink,
            Loaded::Revocation,
        )?;
        each(&self.conn, "SELECT body FROM groups", sink, Loaded::Group)?;
        each(
            &self.conn,
            "SELECT body FROM sessions",
            sink,
            Loaded::Session,
        )?;
        let last_seq = self
            .conn
            .query_row("SELECT COALESCE(MAX(seq), 0) FROM events", [], |r| {
                r.get::<_, i64>(0)
            })
            .map_err(db)?;
        Ok(last_seq as u64)
    }

    fn history(&mut self, record_key: &str, limit: usize) -> Result<Vec<LoggedEvent>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT e.seq, e.id, e.feed, e.kind, e.origin_ms, e.accepted_ms, e.outcome, e.body, e.skipped
                 FROM event_keys k JOIN events e ON e.seq = k.seq
                 WHERE k.record_key = ?1 ORDER BY k.seq DESC LIMIT ?2",
            )
            .map_err(db)?;
        let rows = stmt
            .query_map(params![record_key, limit as i64], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, i64>(5)?,
                    r.get::<_, String>(6)?,
                    r.get::<_, String>(7)?,
                    r.get::<_, String>(8)?,
                ))
            })
            .map_err(db)?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, id, feed, kind, origin_ms, accepted_ms, outcome, body, skipped) =
                row.map_err(db)?;
            let skipped: Skipped = if skipped.is_empty() {
                Skipped::default()
            } else {
                serde_json::from_str(&skipped).map_err(corrupt)?
            };
            let feed = serde_json::from_value(serde_json::Value::String(feed)).map_err(corrupt)?;
            let outcome: Outcome =
                serde_json::from_value(serde_json::Value::String(outcome)).map_err(corrupt)?;
            out.push(LoggedEvent {
                seq: seq as u64,
                accepted_ms: accepted_ms as u64,
                outcome,
                skipped,
                event: crate::posture::event::PostureEvent {
                    id,
                    feed,
                    kind,
                    origin_ms: origin_ms as u64,
                    changes: serde_json::from_str(&body).map_err(corrupt)?,
                },
            });
        }
        out.reverse();
        Ok(out)
    }

    fn get_meta(&mut self, key: &str) -> Result<Option<String>, StoreError> {
        self.conn
            .query_row("SELECT v FROM meta WHERE k = ?1", params![key], |r| {
                r.get(0)
            })
            .optional()
            .map_err(db)
    }

    fn set_meta(&mut self, key: &str, value: &str) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT INTO meta (k, v) VALUES (?1, ?2) ON CONFLICT(k) DO UPDATE SET v = excluded.v",
                params![key, value],
            )
            .map(|_| ())
            .map_err(db)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::posture::event::{Change, DevicePatch, Feed, PostureEvent};

    /// A store written before per-field outcomes (no `events.skipped`)
    /// opens, keeps its history, and records skipped fields from then on.
    #[test]
    fn an_older_store_gains_the_skipped_column() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch(
                "CREATE TABLE events (seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE,
                    feed TEXT NOT NULL, kind TEXT NOT NULL, origin_ms INTEGER NOT NULL,
                    accepted_ms INTEGER NOT NULL, outcome TEXT NOT NULL, body TEXT NOT NULL);
                 CREATE TABLE event_keys (record_key TEXT NOT NULL, seq INTEGER NOT NULL,
                    PRIMARY KEY (record_key, seq)) WITHOUT ROWID;
                 INSERT INTO events VALUES (1, 'old-1', 'mdm', 'mdm.device-update', 5, 6,
                    'applied', '[]');
                 INSERT INTO event_keys VALUES ('device:d', 1);",
            )
            .unwrap();
        }
        let mut s = SqliteStore::open(&path, false).unwrap();
        let event = |id: &str| PostureEvent {
            id: id.into(),
            feed: Feed::Mdm,
            kind: "mdm.device-update".into(),
            origin_ms: 7,
            changes: vec![Change::Device {
                id: "d".into(),
                patch: DevicePatch::default(),
            }],
        };
        let skipped = Skipped {
            stale_fields: vec!["compliance".into()],
            held_fields: vec!["lifecycle".into()],
        };
        s.commit(&CommitBatch {
            events: vec![LoggedEvent {
                seq: 2,
                event: event("new-1"),
                accepted_ms: 8,
                outcome: Outcome::Partial,
                skipped: skipped.clone(),
            }],
            ..CommitBatch::default()
        })
        .unwrap();
        drop(s);
        let mut s = SqliteStore::open(&path, false).unwrap();
        let h = s.history("device:d", 10).unwrap();
        assert_eq!(h.len(), 2);
        assert_eq!(
            (h[0].outcome, h[0].skipped.is_empty()),
            (Outcome::Applied, true)
        );
        assert_eq!((h[1].outcome, &h[1].skipped), (Outcome::Partial, &skipped));
    }
}
