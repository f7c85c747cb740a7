//! The transmitter's durable state, in the store's SQLite database through
//! its own connection (WAL lets it write beside the posture writer):
//!
//! - `tx_streams`: stream configurations and status;
//! - `tx_subjects`: subjects added to or removed from a stream;
//! - `tx_outbox`: signed SETs and webhook bodies, one row per (target, jti),
//!   with their delivery state;
//! - `tx_meta`: the cursor, the last event-log `seq` turned into outbox rows.
//!
//! INVARIANT: outbox rows and the cursor move in one transaction, and the
//! event log is written before any decision takes effect, so everything
//! committed to the log is turned into SETs exactly once even across
//! SIGKILL; a row's bytes (and `jti`) never change after it is written.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// An error of the transmitter's store.
#[derive(Debug, thiserror::Error)]
#[error("transmitter store: {0}")]
pub struct DbError(pub String);

fn db(e: rusqlite::Error) -> DbError {
    DbError(e.to_string())
}

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS tx_streams (
    stream_id TEXT PRIMARY KEY,
    receiver  TEXT NOT NULL,
    body      TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tx_subjects (
    stream_id TEXT NOT NULL,
    subject   TEXT NOT NULL,
    included  INTEGER NOT NULL,
    PRIMARY KEY (stream_id, subject)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tx_outbox (
    id           INTEGER PRIMARY KEY,
    target       TEXT NOT NULL,
    jti          TEXT NOT NULL,
    event_type   TEXT NOT NULL,
    body         TEXT NOT NULL,
    control      INTEGER NOT NULL DEFAULT 0,
    state        TEXT NOT NULL DEFAULT 'pending',
    attempts     INTEGER NOT NULL DEFAULT 0,
    next_ms      INTEGER NOT NULL,
    created_ms   INTEGER NOT NULL,
    last_error   TEXT NOT NULL DEFAULT '',
    UNIQUE (target, jti)
);
CREATE INDEX IF NOT EXISTS tx_outbox_due ON tx_outbox (state, target, id);
CREATE TABLE IF NOT EXISTS tx_meta (
    k TEXT PRIMARY KEY,
    v TEXT NOT NULL
) WITHOUT ROWID;
"#;

/// The meta key of the cursor into the event log.
pub const CURSOR_KEY: &str = "events.cursor";

/// A stream's delivery.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Delivery {
    /// `urn:ietf:rfc:8935`.
    pub method: String,
    /// The receiver's push endpoint.
    pub endpoint_url: String,
    /// Sent verbatim as `Authorization` on every push.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization_header: Option<String>,
}

/// A stream, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stream {
    /// Its id.
    pub stream_id: String,
    /// The receiver (config name) that owns it.
    pub receiver: String,
    /// The SETs' `aud`.
    pub aud: String,
    /// What the receiver asked for.
    pub events_requested: Vec<String>,
    /// What it gets: supported ∩ requested.
    pub events_delivered: Vec<String>,
    /// Where SETs go.
    pub delivery: Delivery,
    /// The receiver's description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// `enabled`, `paused` or `disabled`.
    pub status: String,
    /// Why the status was set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// A configuration alarm from the receiver (`invalid_key`, …), cleared on delivery.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alarm: Option<String>,
    /// When the last verification was requested (ms).
    #[serde(default)]
    pub last_verification_ms: u64,
}

/// A row to deliver.
#[derive(Debug, Clone)]
pub struct Row {
    /// Row id.
    pub id: i64,
    /// `stream:<id>` or `webhook:<name>`.
    pub target: String,
    /// The SET's `jti` (or the webhook event id).
    pub jti: String,
    /// The compact SET or the webhook JSON.
    pub body: String,
    /// Attempts so far.
    pub attempts: u32,
    /// A stream-updated / verification SET (sent even while paused).
    pub control: bool,
}

/// Opens the transmitter's tables in the store database. A new cursor
/// starts at the end of the log: streams get what happens from now on.
pub fn open(path: &Path, full_sync: bool) -> Result<Connection, DbError> {
    if let Some(parent) = path.parent()
        && !parent.as_os_str().is_empty()
    {
        std::fs::create_dir_all(parent).map_err(|e| DbError(e.to_string()))?;
    }
    let conn = Connection::open(path).map_err(|e| DbError(format!("{}: {e}", path.display())))?;
    let _: String = conn
        .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
        .map_err(db)?;
    conn.execute_batch(if full_sync {
        "PRAGMA synchronous=FULL; PRAGMA busy_timeout=5000;"
    } else {
        "PRAGMA synchronous=NORMAL; PRAGMA busy_timeout=5000;"
    })
    .map_err(db)?;
    conn.execute_batch(SCHEMA).map_err(db)?;
    // The event log may not exist yet (the posture store creates it); the
    // transmitter is opened after it, so this reads the current end.
    let max: i64 = conn
        .query_row("SELECT COALESCE(MAX(seq), 0) FROM events", [], |r| r.get(0))
        .unwrap_or(0);
    conn.execute(
        "INSERT OR IGNORE INTO tx_meta (k, v) VALUES (?1, ?2)",
        params![CURSOR_KEY, max.to_string()],
    )
    .map_err(db)?;
    Ok(conn)
}

/// The cursor: the last event `seq` turned into outbox rows.
pub fn cursor(conn: &Connection) -> Result<i64, DbError> {
    let v: Option<String> = conn
        .query_row(
            "SELECT v FROM tx_meta WHERE k = ?1",
            params![CURSOR_KEY],
            |r| r.get(0),
        )
        .optional()
        .map_err(db)?;
    Ok(v.and_then(|v| v.parse().ok()).unwrap_or(0))
}

/// Stores (inserts or replaces) a stream.
pub fn put_stream(conn: &Connection, s: &Stream) -> Result<(), DbError> {
    let body = serde_json::to_string(s).map_err(|e| DbError(e.to_string()))?;
    conn.execute(
        "INSERT OR REPLACE INTO tx_streams (stream_id, receiver, body) VALUES (?1, ?2, ?3)",
        params![s.stream_id, s.receiver, body],
    )
    .map_err(db)?;
    Ok(())
}

/// One stream.
pub fn get_stream(conn: &Connection, id: &str) -> Result<Option<Stream>, DbError> {
    let body: Option<String> = conn
        .query_row(
            "SELECT body FROM tx_streams WHERE stream_id = ?1",
            params![id],
            |r| r.get(0),
        )
        .optional()
        .map_err(db)?;
    Ok(body.and_then(|b| serde_json::from_str(&b).ok()))
}

/// Every stream, or a receiver's.
pub fn streams(conn: &Connection, receiver: Option<&str>) -> Result<Vec<Stream>, DbError> {
    let mut st = conn
        .prepare_cached(
            "SELECT body FROM tx_streams WHERE ?1 IS NULL OR receiver = ?1 ORDER BY stream_id",
        )
        .map_err(db)?;
    let rows = st
        .query_map(params![receiver], |r| r.get::<_, String>(0))
        .map_err(db)?;
    let mut out = Vec::new();
    for b in rows {
        if let Ok(s) = serde_json::from_str(&b.map_err(db)?) {
            out.push(s);
        }
    }
    Ok(out)
}

/// Deletes a stream, its subjects and its undelivered SETs.
pub fn delete_stream(conn: &mut Connection, id: &str) -> Result<(), DbError> {
    let tx = conn.transaction().map_err(db)?;
    tx.execute("DELETE FROM tx_streams WHERE stream_id = ?1", params![id])
        .map_err(db)?;
    tx.execute("DELETE FROM tx_subjects WHERE stream_id = ?1", params![id])
        .map_err(db)?;
    tx.execute(
        "UPDATE tx_outbox SET state = 'dropped' WHERE target = ?1 AND state = 'pending'",
        params![format!("stream:{id}")],
    )
    .map_err(db)?;
    tx.commit().map_err(db)
}

/// Adds (`included`) or removes a subject of a stream.
pub fn set_subject(
    conn: &Connection,
    stream: &str,
    subject: &Value,
    included: bool,
) -> Result<(), DbError> {
    conn.execute(
        "INSERT OR REPLACE INTO tx_subjects (stream_id, subject, included) VALUES (?1, ?2, ?3)",
        params![stream, subject.to_string(), included],
    )
    .map_err(db)?;
    Ok(())
}

/// A stream's subject entries: (subject, included).
pub fn subjects(conn: &Connection, stream: &str) -> Result<Vec<(Value, bool)>, DbError> {
    let mut st = conn
        .prepare_cached("SELECT subject, included FROM tx_subjects WHERE stream_id = ?1")
        .map_err(db)?;
    let rows = st
        .query_map(params![stream], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, bool>(1)?))
        })
        .map_err(db)?;
    let mut out = Vec::new();
    for r in rows {
        let (s, inc) = r.map_err(db)?;
        if let Ok(v) = serde_json::from_str(&s) {
            out.push((v, inc));
        }
    }
    Ok(out)
}

/// Marks a stream's undelivered, non-control SETs dropped (stream disabled).
pub fn drop_pending(conn: &Connection, target: &str) -> Result<usize, DbError> {
    conn.execute(
        "UPDATE tx_outbox SET state = 'dropped' WHERE target = ?1 AND state = 'pending' AND control = 0",
        params![target],
    )
    .map_err(db)
}

/// One row to insert.
#[derive(Debug, Clone)]
pub struct NewRow {
    /// Target.
    pub target: String,
    /// jti.
    pub jti: String,
    /// Event type URI.
    pub event_type: String,
    /// Body.
    pub body: String,
    /// Control event.
    pub control: bool,
}

/// Inserts rows (a duplicate (target, jti) is ignored) and, when given,
/// moves the cursor, in one transaction. Returns the rows inserted per
/// target and the oldest rows dropped beyond `max_per_target`.
pub fn insert(
    conn: &mut Connection,
    rows: &[NewRow],
    cursor: Option<i64>,
    now_ms: u64,
    max_per_target: u64,
) -> Result<(usize, usize), DbError> {
    let tx = conn.transaction().map_err(db)?;
    let mut inserted = 0;
    let mut dropped = 0;
    {
        let mut ins = tx
            .prepare_cached(
                "INSERT OR IGNORE INTO tx_outbox (target, jti, event_type, body, control, next_ms, created_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)",
            )
            .map_err(db)?;
        let mut targets = std::collections::BTreeSet::new();
        for r in rows {
            inserted += ins
                .execute(params![
                    r.target,
                    r.jti,
                    r.event_type,
                    r.body,
                    r.control,
                    now_ms as i64
                ])
                .map_err(db)?;
            targets.insert(r.target.as_str());
        }
        for t in targets {
            let depth: i64 = tx
                .query_row(
                    "SELECT COUNT(*) FROM tx_outbox WHERE target = ?1 AND state = 'pending'",
                    params![t],
                    |r| r.get(0),
                )
                .map_err(db)?;
            let over = depth - max_per_target as i64;
            if over > 0 {
                dropped += tx
                    .execute(
                        "UPDATE tx_outbox SET state = 'dropped' WHERE id IN (
                           SELECT id FROM tx_outbox WHERE target = ?1 AND state = 'pending'
                           ORDER BY id LIMIT ?2)",
                        params![t, over],
                    )
                    .map_err(db)?;
            }
        }
        if let Some(c) = cursor {
            tx.execute(
                "UPDATE tx_meta SET v = ?2 WHERE k = ?1",
                params![CURSOR_KEY, c.to_string()],
            )
            .map_err(db)?;
        }
    }
    tx.commit().map_err(db)?;
    Ok((inserted, dropped))
}

/// A committed event of the log.
#[derive(Debug, Clone)]
pub struct LogRow {
    /// Its `seq`.
    pub seq: i64,
    /// The event, when it changed something (applied or partial) and reads back.
    pub event: Option<crate::posture::event::PostureEvent>,
}

/// Events after `cursor`; `event` is set for those that changed something.
pub fn events_after(conn: &Connection, cursor: i64, limit: usize) -> Result<Vec<LogRow>, DbError> {
    let mut st = conn
        .prepare_cached(
            "SELECT seq, id, feed, kind, origin_ms, outcome, body FROM events
             WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        )
        .map_err(db)?;
    let rows = st
        .query_map(params![cursor, limit as i64], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, String>(5)?,
                r.get::<_, String>(6)?,
            ))
        })
        .map_err(db)?;
    let mut out = Vec::new();
    for r in rows {
        let (seq, id, feed, kind, origin_ms, outcome, body) = r.map_err(db)?;
        // Held, stale and duplicate events changed nothing; the seq still
        // moves the cursor.
        let event = if outcome == "applied" || outcome == "partial" {
            let feed = serde_json::from_value(Value::String(feed)).ok();
            let changes = serde_json::from_str(&body).ok();
            match (feed, changes) {
                (Some(feed), Some(changes)) => Some(crate::posture::event::PostureEvent {
                    id,
                    feed,
                    kind,
                    origin_ms: origin_ms.max(0) as u64,
                    changes,
                }),
                _ => {
                    tracing::warn!(seq, "transmitter: unreadable event in the log; skipped");
                    None
                }
            }
        } else {
            None
        };
        out.push(LogRow { seq, event });
    }
    Ok(out)
}

/// The oldest pending row of each target that is due.
pub fn due(conn: &Connection, now_ms: u64) -> Result<Vec<Row>, DbError> {
    let mut st = conn
        .prepare_cached(
            "SELECT o.id, o.target, o.jti, o.body, o.attempts, o.control, o.next_ms FROM tx_outbox o
             JOIN (SELECT target, MIN(id) AS id FROM tx_outbox WHERE state = 'pending' GROUP BY target) h
             ON o.id = h.id",
        )
        .map_err(db)?;
    let rows = st
        .query_map([], |r| {
            Ok((
                Row {
                    id: r.get(0)?,
                    target: r.get(1)?,
                    jti: r.get(2)?,
                    body: r.get(3)?,
                    attempts: r.get::<_, i64>(4)? as u32,
                    control: r.get(5)?,
                },
                r.get::<_, i64>(6)?,
            ))
        })
        .map_err(db)?;
    let mut out = Vec::new();
    for r in rows {
        let (row, next) = r.map_err(db)?;
        if next as u64 <= now_ms {
            out.push(row);
        }
    }
    Ok(out)
}

/// The oldest pending control row of a target (a paused stream still gets these).
pub fn due_control(conn: &Connection, target: &str, now_ms: u64) -> Result<Option<Row>, DbError> {
    conn.query_row(
        "SELECT id, target, jti, body, attempts, control FROM tx_outbox
         WHERE target = ?1 AND state = 'pending' AND control = 1 AND next_ms <= ?2 ORDER BY id LIMIT 1",
        params![target, now_ms as i64],
        |r| {
            Ok(Row {
                id: r.get(0)?,
                target: r.get(1)?,
                jti: r.get(2)?,
                body: r.get(3)?,
                attempts: r.get::<_, i64>(4)? as u32,
                control: r.get(5)?,
            })
        },
    )
    .optional()
    .map_err(db)
}

/// Records the end of an attempt: `delivered`, `failed` (dead letter) or
/// still `pending` with the next attempt time.
pub fn finish(
    conn: &Connection,
    id: i64,
    state: &str,
    next_ms: u64,
    error: &str,
) -> Result<(), DbError> {
    conn.execute(
        "UPDATE tx_outbox SET state = ?2, attempts = attempts + 1, next_ms = ?3, last_error = ?4 WHERE id = ?1",
        params![id, state, next_ms as i64, error],
    )
    .map_err(db)?;
    Ok(())
}

/// Whether a row is still waiting for delivery (a dispatcher that read the
/// queue before the previous attempt finished must not send it again).
pub fn is_pending(conn: &Connection, id: i64) -> Result<bool, DbError> {
    conn.query_row(
        "SELECT state = 'pending' FROM tx_outbox WHERE id = ?1",
        params![id],
        |r| r.get(0),
    )
    .optional()
    .map(|v| v.unwrap_or(false))
    .map_err(db)
}

/// Undelivered rows, all targets.
pub fn depth(conn: &Connection) -> Result<i64, DbError> {
    conn.query_row(
        "SELECT COUNT(*) FROM tx_outbox WHERE state = 'pending'",
        [],
        |r| r.get(0),
    )
    .map_err(db)
}
