//! The in-memory access memory the request path writes to: one row per
//! (subject, device, route) with its last decision, and one per token seen
//! (by hash) with `iat`, `exp` and the last use. Lock-free maps (papaya);
//! a known row is updated with atomic stores only.

use std::collections::BTreeMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use serde::{Deserialize, Serialize};

use crate::telemetry::{Metrics, ResultLabel};

type Map<K, V> = papaya::HashMap<K, V, foldhash::fast::RandomState>;

/// The decisions a row remembers, in a byte (index into [`DECISIONS`]).
pub const DECISIONS: [&str; 9] = [
    "none", "allow", "shorten", "restrict", "step_up", "deny", "revoke", "login", "error",
];

fn decision_code(d: &str) -> u8 {
    DECISIONS
        .iter()
        .position(|x| *x == d)
        .map_or(8, |i| i as u8)
}

/// True for the decisions that let the request reach the app.
pub fn forwarded(decision: &str) -> bool {
    matches!(decision, "allow" | "shorten" | "restrict")
}

/// A token as phase 7 saw it: the hash the token cache keys it by, never the token.
#[derive(Debug, Clone, Copy)]
pub struct TokenSeen {
    /// SHA-256 of the token.
    pub hash: [u8; 32],
    /// `iat`, seconds.
    pub iat: Option<u64>,
    /// `exp`, seconds.
    pub exp: u64,
}

/// One decided request, as phase 7 hands it over.
#[derive(Debug, Clone, Copy)]
pub struct Observed<'a> {
    /// The subject (token `sub`, session subject, or workload SPIFFE id).
    pub subject: &'a str,
    /// The device the request resolved to.
    pub device: Option<&'a str>,
    /// The matched route.
    pub route: &'a str,
    /// `allow`, `shorten`, `restrict`, `step_up`, `deny`, `revoke`, `login`, `error`.
    pub decision: &'a str,
    /// The request id.
    pub request_id: &'a str,
    /// True for a workload (SPIFFE certificate or client-credentials token).
    pub workload: bool,
    /// The bearer token, when one authenticated the request.
    pub token: Option<TokenSeen>,
}

/// What is remembered of one (subject, device, route).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteRow {
    /// Subject.
    pub subject: String,
    /// Device, if the request resolved one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Route name.
    pub route: String,
    /// The last decision.
    pub decision: String,
    /// First seen, ms since epoch.
    pub first_ms: u64,
    /// Last seen, ms since epoch.
    pub last_ms: u64,
    /// Request id of the last request.
    pub last_request: String,
    /// Last request that reached the app, ms (0 = never).
    pub last_forwarded_ms: u64,
    /// Its request id.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub last_forwarded_request: String,
    /// Requests counted.
    pub count: u64,
    /// A workload's request.
    #[serde(default)]
    pub workload: bool,
}

/// What is remembered of one token (never the token itself).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRow {
    /// Hex SHA-256 of the token.
    pub hash: String,
    /// Subject.
    pub subject: String,
    /// Device it was used from (the last one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// `iat`, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat_s: Option<u64>,
    /// `exp`, seconds.
    pub exp_s: u64,
    /// First use, ms.
    pub first_ms: u64,
    /// Last use, ms.
    pub last_ms: u64,
    /// Request id of the last use.
    pub last_request: String,
    /// Last use that reached the app, ms (0 = never).
    pub last_forwarded_ms: u64,
    /// Its request id.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub last_forwarded_request: String,
    /// A workload's token (client credentials).
    #[serde(default)]
    pub workload: bool,
}

/// Last request ids are kept as the counter of this process's ids; a row
/// restored from the store keeps the id it was written with until reused.
#[derive(Debug, Default)]
struct Stamp {
    ms: AtomicU64,
    req: AtomicU64,
}

/// The fields a request writes come first, together (`repr(C)`): with
/// the `Arc`'s counts they fill one cache line.
#[derive(Debug)]
#[repr(C)]
struct RouteEntry {
    decision: AtomicU8,
    dirty: AtomicBool,
    /// Set once the row has left the map (trimmed or replaced): a token's
    /// [`Memo`] stops writing to it.
    gone: AtomicBool,
    count: AtomicU64,
    last: Stamp,
    forwarded: Stamp,
    /// A second, independent hash of (subject, device, route): the row's
    /// identity check without touching its three strings (cache misses).
    check: u64,
    subject: Box<str>,
    device: Option<Box<str>>,
    route: Box<str>,
    workload: bool,
    first_ms: u64,
    restored: Option<(Box<str>, Box<str>)>,
    /// When this row was last handed to the store (0: not by this process),
    /// and the decision it had then.
    saved_ms: AtomicU64,
    saved_decision: AtomicU8,
}

/// As [`RouteEntry`], the fields a request writes first.
#[derive(Debug)]
#[repr(C)]
struct TokenEntry {
    dirty: AtomicBool,
    /// Set once the row has left the map.
    gone: AtomicBool,
    last: Stamp,
    forwarded: Stamp,
    subject: Box<str>,
    device: Option<Box<str>>,
    iat: Option<u64>,
    exp: u64,
    workload: bool,
    first_ms: u64,
    restored: Option<(Box<str>, Box<str>)>,
    /// When this row was last handed to the store (0: not by this process).
    saved_ms: AtomicU64,
}

/// The last event a feed delivered, from the event log.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeedSeen {
    /// When the proxy accepted its newest event, ms.
    pub last_accepted_ms: u64,
    /// That event's id.
    pub last_event_id: String,
    /// Events seen since the log began.
    pub events: u64,
}

/// Changed rows handed to the flusher.
#[derive(Debug, Default)]
pub struct Dirty {
    /// Route rows.
    pub routes: Vec<RouteRow>,
    /// Token rows.
    pub tokens: Vec<TokenRow>,
}

/// Rows evicted by [`AccessMemory::trim`], to delete from the store too.
#[derive(Debug, Default)]
pub struct Evicted {
    /// (subject, device, route).
    pub routes: Vec<(String, Option<String>, String)>,
    /// Token hashes (hex).
    pub tokens: Vec<String>,
}

/// How often the flusher's ticker applies queued observations. Every reader
/// drains first, so this bounds only the queue, not what a reader sees. Each
/// tick wakes the control runtime (and through it a sibling worker thread):
/// at 10 ms those were 100 wake-ups a second, most of the proxy's extra
/// kernel time at low request rates.
pub const DRAIN_INTERVAL: std::time::Duration = std::time::Duration::from_millis(50);
/// Observations queued between drains before new ones are dropped (about
/// 1.3 s at 50k requests/s, against a 50 ms drain interval).
const QUEUE_CAPACITY: usize = 1 << 16;
/// A row seen again, with nothing else changed, is written to the store at
/// most this often by the periodic flush: with 10k rows in use, writing each
/// at every 2 s tick cost about 4% of the proxy's CPU under load, for
/// last-seen times the findings read in days. A report or shutdown writes
/// everything. Each row waits this long plus a share of it picked by its
/// key ([`resave_after`]), between one and two minutes.
pub const RESAVE_AFTER_MS: u64 = 60_000;

/// A row's re-save wait: rows first written together (10k new clients in
/// a few seconds) come due spread over a minute instead of in one flush,
/// which with 10k tokens wrote 20k rows at once, a 90–170 ms burst of CPU
/// every minute under load.
fn resave_after(key: u64) -> u64 {
    RESAVE_AFTER_MS + key % RESAVE_AFTER_MS
}
/// Bits of each "probably known" bitmap (8 KiB each).
const KNOWN_BITS: u64 = 1 << 16;

/// One observation on its way from the request path to the rows.
struct Pending {
    now: u64,
    req: u64,
    code: u8,
    fwd: bool,
    workload: bool,
    key: u64,
    check: u64,
    token: Option<TokenSeen>,
    /// The row's strings, only when the row is probably new.
    names: Option<Box<Names>>,
}

struct Names {
    subject: Box<str>,
    device: Option<Box<str>>,
    route: Box<str>,
}

/// A fixed bitmap of atomics: "this key's row is probably present".
struct Bits(Box<[AtomicU64]>);

impl Bits {
    fn new() -> Self {
        Self((0..KNOWN_BITS / 64).map(|_| AtomicU64::new(0)).collect())
    }

    fn slot(&self, key: u64) -> Option<(&AtomicU64, u64)> {
        let bit = key % KNOWN_BITS;
        let word = usize::try_from(bit / 64).ok()?;
        Some((self.0.get(word)?, 1u64 << (bit % 64)))
    }

    fn test(&self, key: u64) -> bool {
        self.slot(key)
            .is_some_and(|(w, m)| w.load(Ordering::Relaxed) & m != 0)
    }

    fn set(&self, key: u64) {
        if let Some((w, m)) = self.slot(key) {
            w.fetch_or(m, Ordering::Relaxed);
        }
    }

    fn clear(&self, key: u64) {
        if let Some((w, m)) = self.slot(key) {
            w.fetch_and(!m, Ordering::Relaxed);
        }
    }
}

/// A token's bit: its hash is already uniform (SHA-256).
fn token_bit(hash: &[u8; 32]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&hash[..8]);
    u64::from_le_bytes(b)
}

/// A sighting's stamps and the row's changed mark (last, so a flusher that
/// sees the mark sees the stamps).
fn stamp(last: &Stamp, forwarded: &Stamp, dirty: &AtomicBool, fwd: bool, now: u64, req: u64) {
    last.ms.store(now, Ordering::Relaxed);
    last.req.store(req, Ordering::Relaxed);
    if fwd {
        forwarded.ms.store(now, Ordering::Relaxed);
        forwarded.req.store(req, Ordering::Relaxed);
    }
    dirty.store(true, Ordering::Release);
}

/// One more request on a known (subject, device, route) row.
fn touch_route(e: &RouteEntry, code: u8, fwd: bool, now: u64, req: u64) {
    e.decision.store(code, Ordering::Relaxed);
    e.count.fetch_add(1, Ordering::Relaxed);
    stamp(&e.last, &e.forwarded, &e.dirty, fwd, now, req);
}

/// One more use of a known token row.
fn touch_token(e: &TokenEntry, fwd: bool, now: u64, req: u64) {
    stamp(&e.last, &e.forwarded, &e.dirty, fwd, now, req);
}

/// A verified token's own rows, kept with the token
/// (`VerifiedToken::access`): its requests update them in place, with the
/// stores [`AccessMemory::drain`] would make, instead of queueing an
/// observation for the drain to look up in both maps (two cache misses per
/// row under many principals, and a burst of them on one worker every
/// [`DRAIN_INTERVAL`]). Set once, by the token's first request that finds
/// both rows in the maps; used only by the memory that set it, for the same
/// (subject, device, route) by both hashes, and while neither row has left
/// the maps. Any other request of the token (another route or device, a
/// trimmed row) takes the queue as before.
#[derive(Debug, Default)]
pub struct Memo(OnceLock<MemoRows>);

#[derive(Debug)]
struct MemoRows {
    /// The [`AccessMemory`] that holds the rows.
    owner: u64,
    key: u64,
    check: u64,
    /// [`token_bit`] of the token's hash (0 without a token row).
    token_bit: u64,
    route: Arc<RouteEntry>,
    token: Option<Arc<TokenEntry>>,
}

impl MemoRows {
    /// True when these rows are the request's and still in the maps.
    fn holds(&self, owner: u64, key: u64, check: u64, token: Option<&TokenSeen>) -> bool {
        self.owner == owner
            && self.key == key
            && self.check == check
            && match (&self.token, token) {
                (Some(e), Some(t)) => {
                    self.token_bit == token_bit(&t.hash) && !e.gone.load(Ordering::Relaxed)
                }
                (None, None) => true,
                _ => false,
            }
            && !self.route.gone.load(Ordering::Relaxed)
    }
}

/// Distinct ids of [`AccessMemory`] instances, for [`Memo`]'s owner check.
static MEMORY_IDS: AtomicU64 = AtomicU64::new(1);

/// The access memory: bounded, lock-free on the request path.
pub struct AccessMemory {
    /// This memory's id (tokens' [`Memo`]s name it).
    id: u64,
    routes: Map<u64, Arc<RouteEntry>>,
    tokens: Map<[u8; 32], Arc<TokenEntry>>,
    key_hasher: foldhash::fast::FixedState,
    check_hasher: foldhash::fast::FixedState,
    prefix: OnceLock<Box<str>>,
    /// Observations waiting for [`AccessMemory::drain`].
    queue: (
        crossbeam_channel::Sender<Pending>,
        crossbeam_channel::Receiver<Pending>,
    ),
    /// Rows probably present (by key), so a known row's strings are not copied.
    known_routes: Bits,
    /// Tokens probably present (by hash).
    known_tokens: Bits,
    max_routes: AtomicU64,
    max_tokens: AtomicU64,
    metrics: Option<Arc<Metrics>>,
    /// Feed name → its newest event, kept by the flusher.
    feeds: Mutex<BTreeMap<String, FeedSeen>>,
    /// When this process started remembering, ms.
    pub started_ms: u64,
}

impl std::fmt::Debug for AccessMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessMemory")
            .field("routes", &self.routes.len())
            .field("tokens", &self.tokens.len())
            .finish()
    }
}

/// The counter part of a request id `prefix-%016x`, and its prefix.
fn split_request_id(id: &str) -> Option<(&str, u64)> {
    let (p, n) = id.rsplit_once('-')?;
    Some((p, u64::from_str_radix(n, 16).ok()?))
}

fn now_ms() -> u64 {
    crate::util::now_unix_ms()
}

impl AccessMemory {
    /// An empty memory with these bounds.
    pub fn new(max_routes: usize, max_tokens: usize, metrics: Option<Arc<Metrics>>) -> Self {
        Self {
            id: MEMORY_IDS.fetch_add(1, Ordering::Relaxed),
            routes: Map::default(),
            tokens: Map::default(),
            key_hasher: foldhash::fast::FixedState::with_seed(0x5eed_acce55),
            check_hasher: foldhash::fast::FixedState::with_seed(0xc4ec_b0a7_7e11_0f5e),
            prefix: OnceLock::new(),
            queue: crossbeam_channel::bounded(QUEUE_CAPACITY),
            known_routes: Bits::new(),
            known_tokens: Bits::new(),
            max_routes: AtomicU64::new(max_routes as u64),
            max_tokens: AtomicU64::new(max_tokens as u64),
            metrics,
            feeds: Mutex::new(BTreeMap::new()),
            started_ms: now_ms(),
        }
    }

    /// Applies new bounds (on reload); the next trim enforces them.
    pub fn set_bounds(&self, max_routes: usize, max_tokens: usize) {
        self.max_routes.store(max_routes as u64, Ordering::Relaxed);
        self.max_tokens.store(max_tokens as u64, Ordering::Relaxed);
    }

    fn count(&self, what: &'static str) {
        if let Some(m) = &self.metrics {
            m.access_evicted
                .get_or_create(&ResultLabel { result: what })
                .inc();
        }
    }

    /// Phase 7: remembers one decided request. It hashes the row's key (the
    /// strings are in cache); a token whose [`Memo`] holds this very row
    /// gets its rows updated in place. Otherwise it copies a few words into
    /// a bounded queue and returns; [`AccessMemory::drain`] applies them on
    /// another thread (every [`DRAIN_INTERVAL`], and before every read).
    /// The row's strings are copied only when the row is probably new (a
    /// small shared bitmap); a row the bitmap wrongly calls known is not
    /// taken and its bit is cleared, so the next request brings the strings.
    /// A full queue drops the observation (counted as `dropped`).
    pub fn record(&self, o: &Observed<'_>, memo: Option<&Memo>) {
        let now = now_ms();
        let req = match split_request_id(o.request_id) {
            Some((p, n)) => {
                if self.prefix.get().is_none() {
                    let _ = self.prefix.set(p.into());
                }
                n
            }
            None => 0,
        };
        let key = self.key_hasher.hash_one((o.subject, o.device, o.route));
        let check = self.check_hasher.hash_one((o.subject, o.device, o.route));
        let code = decision_code(o.decision);
        let fwd = forwarded(o.decision);
        if let Some(memo) = memo {
            let rows = memo
                .0
                .get()
                // The token's first request after its rows exist: found
                // once in the maps, kept with the token.
                .or_else(|| {
                    self.find_rows(key, check, o.token.as_ref())
                        .map(|r| memo.0.get_or_init(|| r))
                })
                .filter(|r| r.holds(self.id, key, check, o.token.as_ref()));
            if let Some(rows) = rows {
                touch_route(&rows.route, code, fwd, now, req);
                if let Some(t) = &rows.token {
                    touch_token(t, fwd, now, req);
                }
                return;
            }
        }
        let known = self.known_routes.test(key)
            && o.token
                .is_none_or(|t| self.known_tokens.test(token_bit(&t.hash)));
        let pending = Pending {
            now,
            req,
            code,
            fwd,
            workload: o.workload,
            key,
            check,
            token: o.token,
            names: (!known).then(|| {
                Box::new(Names {
                    subject: o.subject.into(),
                    device: o.device.map(Into::into),
                    route: o.route.into(),
                })
            }),
        };
        if self.queue.0.try_send(pending).is_err() {
            self.count("dropped");
        }
    }

    /// A request's two rows, when both are in the maps (for a [`Memo`]).
    fn find_rows(&self, key: u64, check: u64, token: Option<&TokenSeen>) -> Option<MemoRows> {
        let route = self
            .routes
            .pin()
            .get(&key)
            .filter(|e| e.check == check)?
            .clone();
        let (token, token_bit) = match token {
            Some(t) => (
                Some(self.tokens.pin().get(&t.hash)?.clone()),
                token_bit(&t.hash),
            ),
            None => (None, 0),
        };
        Some(MemoRows {
            owner: self.id,
            key,
            check,
            token_bit,
            route,
            token,
        })
    }

    /// Applies every queued observation to the rows (the flusher's ticker
    /// and every reader call it; concurrent calls share the work).
    pub fn drain(&self) {
        while let Ok(p) = self.queue.1.try_recv() {
            self.apply(p);
        }
    }

    /// One observation into its rows: a known row costs a map lookup and a
    /// few atomic stores; at twice the bound new rows are not taken
    /// (counted) until the flusher trims.
    fn apply(&self, p: Pending) {
        let Pending {
            now,
            req,
            code,
            fwd,
            workload,
            key,
            check,
            token,
            names,
        } = p;
        let routes = self.routes.pin();
        let entry = match (routes.get(&key), &names) {
            (Some(e), _) => Some(e),
            (None, Some(n)) => {
                if routes.len() as u64 >= 2 * self.max_routes.load(Ordering::Relaxed) {
                    self.count("dropped");
                    return;
                }
                let e = routes.get_or_insert_with(key, || {
                    Arc::new(RouteEntry {
                        check,
                        subject: n.subject.clone(),
                        device: n.device.clone(),
                        route: n.route.clone(),
                        workload,
                        first_ms: now,
                        decision: AtomicU8::new(0),
                        count: AtomicU64::new(0),
                        last: Stamp::default(),
                        forwarded: Stamp::default(),
                        restored: None,
                        dirty: AtomicBool::new(true),
                        gone: AtomicBool::new(false),
                        saved_ms: AtomicU64::new(0),
                        saved_decision: AtomicU8::new(0),
                    })
                });
                self.known_routes.set(key);
                Some(e)
            }
            (None, None) => {
                // The bitmap said "known" for a row that is not (another
                // row's bit, or an evicted row): the next request brings
                // the strings.
                self.known_routes.clear(key);
                self.count("unknown");
                None
            }
        };
        // A 64-bit key collision names another row: leave that row alone
        // (the two independent hashes together are 128 bits).
        if let Some(entry) = entry
            && entry.check == check
        {
            touch_route(entry, code, fwd, now, req);
        }
        if let Some(t) = token {
            let tokens = self.tokens.pin();
            let entry = match (tokens.get(&t.hash), &names) {
                (Some(e), _) => e,
                (None, Some(n)) => {
                    if tokens.len() as u64 >= 2 * self.max_tokens.load(Ordering::Relaxed) {
                        self.count("dropped");
                        return;
                    }
                    let e = tokens.get_or_insert_with(t.hash, || {
                        Arc::new(TokenEntry {
                            subject: n.subject.clone(),
                            device: n.device.clone(),
                            iat: t.iat,
                            exp: t.exp,
                            workload,
                            first_ms: now,
                            last: Stamp::default(),
                            forwarded: Stamp::default(),
                            restored: None,
                            dirty: AtomicBool::new(true),
                            gone: AtomicBool::new(false),
                            saved_ms: AtomicU64::new(0),
                        })
                    });
                    self.known_tokens.set(token_bit(&t.hash));
                    e
                }
                (None, None) => {
                    self.known_tokens.clear(token_bit(&t.hash));
                    self.count("unknown");
                    return;
                }
            };
            touch_token(entry, fwd, now, req);
        }
    }

    fn request_id(&self, n: u64, restored: Option<&str>) -> String {
        if n == 0 {
            return restored.unwrap_or_default().to_owned();
        }
        let p = self.prefix.get().map_or("", |p| p);
        format!("{p}-{n:016x}")
    }

    fn route_row(&self, e: &RouteEntry) -> RouteRow {
        let (rl, rf) = e
            .restored
            .as_ref()
            .map_or((None, None), |(a, b)| (Some(&**a), Some(&**b)));
        RouteRow {
            subject: e.subject.to_string(),
            device: e.device.as_deref().map(str::to_owned),
            route: e.route.to_string(),
            decision: DECISIONS
                .get(usize::from(e.decision.load(Ordering::Relaxed)))
                .copied()
                .unwrap_or("error")
                .to_owned(),
            first_ms: e.first_ms,
            last_ms: e.last.ms.load(Ordering::Relaxed),
            last_request: self.request_id(e.last.req.load(Ordering::Relaxed), rl),
            last_forwarded_ms: e.forwarded.ms.load(Ordering::Relaxed),
            last_forwarded_request: self.request_id(e.forwarded.req.load(Ordering::Relaxed), rf),
            count: e.count.load(Ordering::Relaxed),
            workload: e.workload,
        }
    }

    fn token_row(&self, hash: &[u8; 32], e: &TokenEntry) -> TokenRow {
        let (rl, rf) = e
            .restored
            .as_ref()
            .map_or((None, None), |(a, b)| (Some(&**a), Some(&**b)));
        TokenRow {
            hash: hex::encode(hash),
            subject: e.subject.to_string(),
            device: e.device.as_deref().map(str::to_owned),
            iat_s: e.iat,
            exp_s: e.exp,
            first_ms: e.first_ms,
            last_ms: e.last.ms.load(Ordering::Relaxed),
            last_request: self.request_id(e.last.req.load(Ordering::Relaxed), rl),
            last_forwarded_ms: e.forwarded.ms.load(Ordering::Relaxed),
            last_forwarded_request: self.request_id(e.forwarded.req.load(Ordering::Relaxed), rf),
            workload: e.workload,
        }
    }

    /// Every route row (unordered).
    pub fn route_rows(&self) -> Vec<RouteRow> {
        self.drain();
        self.routes
            .pin()
            .values()
            .map(|e| self.route_row(e))
            .collect()
    }

    /// Every token row (unordered).
    pub fn token_rows(&self) -> Vec<TokenRow> {
        self.drain();
        self.tokens
            .pin()
            .iter()
            .map(|(h, e)| self.token_row(h, e))
            .collect()
    }

    /// Takes the rows changed since the last call (clearing their mark).
    /// With `all` false (the periodic flush), a row whose only change is a
    /// later sighting (count, last seen) waits [`resave_after`] its last
    /// write; new rows and changed decisions go at once. `all` (a report,
    /// shutdown) takes every changed row.
    pub fn take_dirty(&self, now_ms: u64, all: bool) -> Dirty {
        self.drain();
        let due = |saved: u64, key: u64| {
            all || saved == 0 || now_ms.saturating_sub(saved) >= resave_after(key)
        };
        let mut d = Dirty::default();
        for (k, e) in self.routes.pin().iter() {
            let decision = e.decision.load(Ordering::Relaxed);
            if (due(e.saved_ms.load(Ordering::Relaxed), *k)
                || decision != e.saved_decision.load(Ordering::Relaxed))
                && e.dirty.swap(false, Ordering::AcqRel)
            {
                e.saved_ms.store(now_ms.max(1), Ordering::Relaxed);
                e.saved_decision.store(decision, Ordering::Relaxed);
                d.routes.push(self.route_row(e));
            }
        }
        for (h, e) in self.tokens.pin().iter() {
            let key = u64::from_le_bytes([h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]]);
            if due(e.saved_ms.load(Ordering::Relaxed), key) && e.dirty.swap(false, Ordering::AcqRel)
            {
                e.saved_ms.store(now_ms.max(1), Ordering::Relaxed);
                d.tokens.push(self.token_row(h, e));
            }
        }
        d
    }

    /// Evicts the least recently seen rows beyond the bounds; returns them.
    pub fn trim(&self) -> Evicted {
        self.drain();
        let mut out = Evicted::default();
        let max = self.max_routes.load(Ordering::Relaxed) as usize;
        let routes = self.routes.pin();
        if routes.len() > max {
            let mut all: Vec<(u64, u64)> = routes
                .iter()
                .map(|(k, e)| (e.last.ms.load(Ordering::Relaxed), *k))
                .collect();
            all.sort_unstable();
            let n = all.len().saturating_sub(max);
            for (_, k) in all.into_iter().take(n) {
                if let Some(e) = routes.remove(&k) {
                    e.gone.store(true, Ordering::Relaxed);
                    self.known_routes.clear(k);
                    out.routes.push((
                        e.subject.to_string(),
                        e.device.as_deref().map(str::to_owned),
                        e.route.to_string(),
                    ));
                    self.count("route_rows");
                }
            }
        }
        let max = self.max_tokens.load(Ordering::Relaxed) as usize;
        let tokens = self.tokens.pin();
        if tokens.len() > max {
            let mut all: Vec<(u64, [u8; 32])> = tokens
                .iter()
                .map(|(k, e)| (e.last.ms.load(Ordering::Relaxed), *k))
                .collect();
            all.sort_unstable();
            let n = all.len().saturating_sub(max);
            for (_, k) in all.into_iter().take(n) {
                if let Some(e) = tokens.remove(&k) {
                    e.gone.store(true, Ordering::Relaxed);
                    self.known_tokens.clear(token_bit(&k));
                    out.tokens.push(hex::encode(k));
                    self.count("tokens");
                }
            }
        }
        if let Some(m) = &self.metrics {
            m.access_entries
                .get_or_create(&ResultLabel {
                    result: "route_rows",
                })
                .set(routes.len() as i64);
            m.access_entries
                .get_or_create(&ResultLabel { result: "tokens" })
                .set(tokens.len() as i64);
        }
        out
    }

    /// Puts back a row read from the store (on start); never marks it dirty.
    pub fn restore_route(&self, r: RouteRow) {
        let key =
            self.key_hasher
                .hash_one((r.subject.as_str(), r.device.as_deref(), r.route.as_str()));
        let check =
            self.check_hasher
                .hash_one((r.subject.as_str(), r.device.as_deref(), r.route.as_str()));
        let e = RouteEntry {
            check,
            subject: r.subject.into(),
            device: r.device.map(Into::into),
            route: r.route.into(),
            workload: r.workload,
            first_ms: r.first_ms,
            decision: AtomicU8::new(decision_code(&r.decision)),
            count: AtomicU64::new(r.count),
            last: Stamp {
                ms: AtomicU64::new(r.last_ms),
                req: AtomicU64::new(0),
            },
            forwarded: Stamp {
                ms: AtomicU64::new(r.last_forwarded_ms),
                req: AtomicU64::new(0),
            },
            restored: Some((r.last_request.into(), r.last_forwarded_request.into())),
            dirty: AtomicBool::new(false),
            gone: AtomicBool::new(false),
            saved_ms: AtomicU64::new(0),
            saved_decision: AtomicU8::new(decision_code(&r.decision)),
        };
        if let Some(old) = self.routes.pin().insert(key, Arc::new(e)) {
            old.gone.store(true, Ordering::Relaxed);
        }
        self.known_routes.set(key);
    }

    /// Puts back a token row read from the store (on start).
    pub fn restore_token(&self, r: TokenRow) {
        let mut hash = [0u8; 32];
        if hex::decode_to_slice(&r.hash, &mut hash).is_err() {
            return;
        }
        let e = TokenEntry {
            subject: r.subject.into(),
            device: r.device.map(Into::into),
            iat: r.iat_s,
            exp: r.exp_s,
            workload: r.workload,
            first_ms: r.first_ms,
            last: Stamp {
                ms: AtomicU64::new(r.last_ms),
                req: AtomicU64::new(0),
            },
            forwarded: Stamp {
                ms: AtomicU64::new(r.last_forwarded_ms),
                req: AtomicU64::new(0),
            },
            restored: Some((r.last_request.into(), r.last_forwarded_request.into())),
            dirty: AtomicBool::new(false),
            gone: AtomicBool::new(false),
            saved_ms: AtomicU64::new(0),
        };
        if let Some(old) = self.tokens.pin().insert(hash, Arc::new(e)) {
            old.gone.store(true, Ordering::Relaxed);
        }
        self.known_tokens.set(token_bit(&hash));
    }

    /// Records a feed's newest event (from the event-log tail).
    pub fn feed_seen(&self, feed: &str, accepted_ms: u64, event_id: &str, added: u64) {
        if let Ok(mut m) = self.feeds.lock() {
            let f = m.entry(feed.to_owned()).or_default();
            if accepted_ms >= f.last_accepted_ms {
                f.last_accepted_ms = accepted_ms;
                f.last_event_id = event_id.to_owned();
            }
            f.events += added;
        }
    }

    /// Every feed's newest event.
    pub fn feeds(&self) -> BTreeMap<String, FeedSeen> {
        self.feeds.lock().map(|m| m.clone()).unwrap_or_default()
    }
}

/// Applies the queued observations every [`DRAIN_INTERVAL`] until shutdown
/// (a tick, not a wake-up per request: the request path never wakes a task).
pub async fn drain_loop(mem: Arc<AccessMemory>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(DRAIN_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => mem.drain(),
            _ = shutdown.changed() => {
                mem.drain();
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn obs<'a>(sub: &'a str, route: &'a str, decision: &'a str, id: &'a str) -> Observed<'a> {
        Observed {
            subject: sub,
            device: Some("d1"),
            route,
            decision,
            request_id: id,
            workload: false,
            token: Some(TokenSeen {
                hash: [7; 32],
                iat: Some(10),
                exp: 20,
            }),
        }
    }

    #[test]
    fn a_row_wrongly_marked_known_is_taken_at_its_next_request() {
        let m = AccessMemory::new(10, 10, None);
        // Another row's bit (a bitmap collision) or an evicted row's: the
        // request path sends no strings, the row cannot be made, the bit goes.
        let key = m.key_hasher.hash_one(("bob", Some("d1"), "app"));
        m.known_routes.set(key);
        m.known_tokens.set(token_bit(&[7; 32]));
        m.record(&obs("bob", "app", "allow", "abc-0000000000000001"), None);
        assert!(m.route_rows().is_empty());
        assert!(!m.known_routes.test(key));
        // The next request brings the strings: the row exists from then on,
        // and known rows need no strings.
        m.record(&obs("bob", "app", "deny", "abc-0000000000000002"), None);
        m.record(&obs("bob", "app", "allow", "abc-0000000000000003"), None);
        let rows = m.route_rows();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].count, 2);
        assert_eq!(rows[0].last_request, "abc-0000000000000003");
        assert_eq!(m.token_rows().len(), 1);
        assert!(m.known_routes.test(key));
    }

    #[test]
    fn a_sighting_alone_is_written_within_two_minutes_a_new_decision_at_once() {
        let m = AccessMemory::new(10, 10, None);
        m.record(&obs("alice", "app", "allow", "abc-0000000000000001"), None);
        let d = m.take_dirty(1_000, false);
        assert_eq!(
            (d.routes.len(), d.tokens.len()),
            (1, 1),
            "new rows go at once"
        );
        // Seen again, same decision: not yet due, but still marked.
        m.record(&obs("alice", "app", "allow", "abc-0000000000000002"), None);
        let d = m.take_dirty(2_000, false);
        assert_eq!((d.routes.len(), d.tokens.len()), (0, 0));
        let d = m.take_dirty(RESAVE_AFTER_MS, false);
        assert_eq!(
            (d.routes.len(), d.tokens.len()),
            (0, 0),
            "never before a minute"
        );
        let d = m.take_dirty(1_000 + 2 * RESAVE_AFTER_MS, false);
        assert_eq!(
            (d.routes.len(), d.tokens.len()),
            (1, 1),
            "due within two minutes"
        );
        assert_eq!(d.routes[0].count, 2);
        // A changed decision is written at the next flush.
        m.record(&obs("alice", "app", "deny", "abc-0000000000000003"), None);
        let d = m.take_dirty(2_000 + 2 * RESAVE_AFTER_MS, false);
        assert_eq!(d.routes.len(), 1);
        assert_eq!(d.routes[0].decision, "deny");
        // A report or shutdown takes every changed row.
        m.record(&obs("alice", "app", "deny", "abc-0000000000000004"), None);
        assert!(
            m.take_dirty(3_000 + 2 * RESAVE_AFTER_MS, false)
                .routes
                .is_empty()
        );
        let d = m.take_dirty(3_000 + 2 * RESAVE_AFTER_MS, true);
        assert_eq!((d.routes.len(), d.tokens.len()), (1, 1));
        assert_eq!(d.routes[0].last_request, "abc-0000000000000004");
        assert!(
            m.take_dirty(4_000 + 2 * RESAVE_AFTER_MS, true)
                .routes
                .is_empty()
        );
    }

    #[test]
    fn rows_first_written_together_are_resaved_spread_over_a_minute() {
        let m = AccessMemory::new(2_000, 2_000, None);
        let subjects: Vec<String> = (0..1_000).map(|i| format!("user-{i}")).collect();
        for s in &subjects {
            m.record(&obs(s, "app", "allow", "abc-0000000000000001"), None);
        }
        assert_eq!(m.take_dirty(1_000, false).routes.len(), 1_000);
        for s in &subjects {
            m.record(&obs(s, "app", "allow", "abc-0000000000000002"), None);
        }
        // The 2 s flushes of the next two minutes.
        let (mut most, mut total) = (0, 0);
        for tick in 1..=60 {
            let n = m.take_dirty(1_000 + tick * 2_000, false).routes.len();
            (most, total) = (most.max(n), total + n);
        }
        assert_eq!(total, 1_000, "every row re-saved once within two minutes");
        assert!(most <= 100, "one flush took {most} of the 1,000 rows");
    }
    #[test]
    fn a_tokens_memo_writes_its_own_rows_in_place_and_only_while_they_are_held() {
        let m = AccessMemory::new(10, 10, None);
        let memo = Memo::default();
        // The token's first request: no rows yet, so it is queued.
        m.record(
            &obs("alice", "app", "allow", "abc-0000000000000001"),
            Some(&memo),
        );
        assert!(memo.0.get().is_none());
        m.drain();
        // The next finds both rows, keeps them and writes them in place.
        m.record(
            &obs("alice", "app", "deny", "abc-0000000000000002"),
            Some(&memo),
        );
        assert!(memo.0.get().is_some());
        assert!(m.queue.1.is_empty(), "written in place, not queued");
        let d = m.take_dirty(1_000, true);
        assert_eq!((d.routes.len(), d.tokens.len()), (1, 1), "marked changed");
        let r = &d.routes[0];
        assert_eq!((r.count, r.decision.as_str()), (2, "deny"));
        assert_eq!(r.last_request, "abc-0000000000000002");
        assert_eq!(r.last_forwarded_request, "abc-0000000000000001");
        assert_eq!(d.tokens[0].last_request, "abc-0000000000000002");
        m.record(
            &obs("alice", "app", "allow", "abc-0000000000000003"),
            Some(&memo),
        );
        assert!(m.queue.1.is_empty());
        let rows = m.route_rows();
        assert_eq!(rows[0].count, 3);
        assert_eq!(rows[0].last_forwarded_request, "abc-0000000000000003");
        assert_eq!(
            m.token_rows()[0].last_forwarded_request,
            "abc-0000000000000003"
        );
        // Another route of the same token is not the memo's row.
        m.record(
            &obs("alice", "other", "allow", "abc-0000000000000004"),
            Some(&memo),
        );
        assert_eq!(m.queue.1.len(), 1);
        assert_eq!(m.route_rows().len(), 2);
        // Nor is another memory's.
        let m2 = AccessMemory::new(10, 10, None);
        m2.record(
            &obs("alice", "app", "allow", "abc-0000000000000005"),
            Some(&memo),
        );
        assert_eq!(m2.route_rows().len(), 1);
        assert_eq!(m.route_rows().iter().map(|r| r.count).sum::<u64>(), 4);
        // A trimmed row is no longer written through the memo: the next
        // request brings it back through the queue.
        m.set_bounds(0, 10);
        let ev = m.trim();
        assert_eq!((ev.routes.len(), ev.tokens.len()), (2, 0));
        m.set_bounds(10, 10);
        m.record(
            &obs("alice", "app", "allow", "abc-0000000000000006"),
            Some(&memo),
        );
        assert_eq!(m.queue.1.len(), 1, "queued, not written to the evicted row");
        let rows = m.route_rows();
        assert_eq!(rows.len(), 1);
        assert_eq!(
            (rows[0].count, rows[0].last_request.as_str()),
            (1, "abc-0000000000000006")
        );
        // So is a trimmed token row.
        let m = AccessMemory::new(10, 10, None);
        let memo = Memo::default();
        m.record(
            &obs("bob", "app", "allow", "abc-0000000000000001"),
            Some(&memo),
        );
        m.drain();
        m.record(
            &obs("bob", "app", "allow", "abc-0000000000000002"),
            Some(&memo),
        );
        assert!(memo.0.get().is_some() && m.queue.1.is_empty());
        m.set_bounds(10, 0);
        assert_eq!(m.trim().tokens.len(), 1);
        m.set_bounds(10, 10);
        m.record(
            &obs("bob", "app", "allow", "abc-0000000000000003"),
            Some(&memo),
        );
        assert_eq!(m.queue.1.len(), 1);
        let t = m.token_rows();
        assert_eq!(
            (t.len(), t[0].last_request.as_str()),
            (1, "abc-0000000000000003")
        );
    }

    #[test]
    fn remembers_last_decision_and_request_and_trims_oldest() {
        let m = AccessMemory::new(2, 10, None);
        m.record(&obs("alice", "app", "allow", "abc-0000000000000001"), None);
        m.record(&obs("alice", "app", "deny", "abc-0000000000000002"), None);
        let rows = m.route_rows();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].decision, "deny");
        assert_eq!(rows[0].count, 2);
        assert_eq!(rows[0].last_request, "abc-0000000000000002");
        assert_eq!(rows[0].last_forwarded_request, "abc-0000000000000001");
        let t = m.token_rows();
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].hash, hex::encode([7u8; 32]));
        assert_eq!(m.take_dirty(1_000, false).routes.len(), 1);
        assert!(m.take_dirty(1_000, false).routes.is_empty());
        m.record(&obs("bob", "app", "allow", "abc-0000000000000003"), None);
        m.record(&obs("carol", "app", "allow", "abc-0000000000000004"), None);
        let ev = m.trim();
        assert_eq!(ev.routes.len(), 1);
        assert_eq!(m.route_rows().len(), 2);
    }
}
