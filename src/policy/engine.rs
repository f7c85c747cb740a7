//! The engine the request path holds: the active policy set, an optional
//! shadow set, the settings from `[policy]` / `[network]`, the decision
//! cache and the audit sink. Built whole and swapped atomically (arc-swap)
//! on reload; a request sees one engine from decision to audit line.
//!
//! The decision cache is keyed by a 128-bit keyed hash of: principal,
//! device, route, method class, the snapshot versions of the identity,
//! device and owner records, the token's policy-relevant claims (subject,
//! issuer, iat, auth_time, acr, amr, client_id, jti, exp: hashed once per
//! token), binding, SPIFFE id and client address. The policy version is
//! implicit: a reload builds a new engine with an empty cache (and empty
//! per-thread fronts, [`crate::util::front`]). Any feed event that changes
//! one of those records changes its version, so the next request misses:
//! that is why a long TTL (a minute by default) is safe. Entries live at
//! most `decision_cache_ttl_ms`, which bounds how stale the time-dependent
//! facts (ages, time of day) of a cached decision can be; each lives
//! between three quarters of it and all of it, picked by bits of its key
//! ([`entry_ttl`]), so decisions made together (after a restart, a reload,
//! the first minute of a busy morning) are not all made again in the same
//! second a TTL later, and again every TTL after that.

use std::hash::Hash;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use moka::sync::Cache;

use super::audit::AuditSink;
use super::facts::{Inputs, Limits, RequestFacts, Zone, parse_cidr, zone_of};
use super::{CompiledSet, Decision, LoadError, load_dir};
use crate::config::Config;

/// Settings read from the config, fixed for one engine.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `context.limits`.
    pub limits: Limits,
    /// `[[network.zones]]`.
    pub zones: Vec<Zone>,
    /// Longest a cached decision is reused.
    pub cache_ttl: Duration,
    /// Most cached decisions.
    pub cache_capacity: u64,
    /// Routes the shadow set runs on (empty: all).
    pub shadow_routes: Vec<String>,
    /// The policy directory.
    pub dir: PathBuf,
    /// The shadow policy directory.
    pub shadow_dir: Option<PathBuf>,
}

impl Settings {
    /// Reads the settings of a config that has a `[policy]` table.
    pub fn from_config(cfg: &Config) -> Option<Self> {
        let p = cfg.policy.as_ref()?;
        Some(Self {
            limits: Limits {
                posture_max_age_s: i64::try_from(p.posture_max_age_s).unwrap_or(i64::MAX),
                workload_max_credential_age_s: i64::try_from(p.workload_max_credential_age_s)
                    .unwrap_or(i64::MAX),
                snapshot_max_age_s: i64::try_from(p.snapshot_max_age_s).unwrap_or(i64::MAX),
            },
            zones: cfg
                .network
                .zones
                .iter()
                .map(|z| Zone {
                    name: z.name.clone(),
                    // INVARIANT: Config::validate checked every CIDR parses.
                    blocks: z.cidrs.iter().filter_map(|c| parse_cidr(c)).collect(),
                })
                .collect(),
            cache_ttl: Duration::from_millis(p.decision_cache_ttl_ms),
            cache_capacity: p.decision_cache_capacity,
            shadow_routes: p.shadow_routes.clone(),
            dir: p.dir.clone(),
            shadow_dir: p.shadow_dir.clone(),
        })
    }
}

/// One decision as the cache holds it and a request carries it: the
/// enforced decision, the shadow's, and the inputs both were made on. A
/// request holds the one `Arc` the cache holds (one reference count to
/// touch per request, not one per part); it reads as the enforced
/// [`Decision`] through `Deref`.
#[derive(Debug)]
pub struct Decided {
    /// The enforced decision.
    pub decision: Decision,
    /// The shadow set's decision, when a shadow set runs on this route.
    pub shadow: Option<Decision>,
    /// The inputs the decision was made on.
    pub inputs: Arc<Inputs>,
    /// When the shared cache's TTL ends for this entry (Unix ms): a copy in
    /// a thread's front is not used past it either.
    expires_ms: u64,
    /// The whole cache key. A thread's front keys its entries by half of it
    /// (a set of four then fits one cache line, the front half the size);
    /// a front hit counts only if this matches too, and it sits on the line
    /// the hit reads anyway.
    key: u128,
    /// The engine that made it ([`Engine`]'s front owner): a token's memo
    /// of it counts only for that engine, never after a reload.
    owner: u64,
}

impl Decided {
    /// Reads the fields a cached request reads, for
    /// [`crate::authn::VerifiedToken`]'s early, side-by-side reads: plain
    /// reads, their value means nothing.
    pub fn touch(&self) -> u64 {
        (self.key as u64)
            ^ self.expires_ms
            ^ self.owner
            ^ self.decision.action as u64
            ^ self.decision.session_ttl_s.unwrap_or(0)
            ^ u64::from(self.shadow.is_some())
    }
}

impl std::ops::Deref for Decided {
    type Target = Decision;

    fn deref(&self) -> &Decision {
        &self.decision
    }
}

/// A decision key as the front takes it: the low half picks the set, the
/// high half is the entry's key there, and the entry's own full key
/// ([`Decided`]) decides a hit.
fn front_key(key: u128) -> (u64, u64) {
    (key as u64, (key >> 64) as u64)
}

thread_local! {
    /// This thread's front of the decision cache ([`crate::util::front`]).
    static DECISIONS: std::cell::RefCell<crate::util::front::Front<u64, Arc<Decided>>> =
        const { std::cell::RefCell::new(crate::util::front::Front::new()) };
}

/// What [`Engine::decide`] returns.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The decision, its shadow and its inputs (shared with the cache).
    pub decided: Arc<Decided>,
    /// True when served from the decision cache.
    pub cache_hit: bool,
}

/// The active policy set and everything around it.
pub struct Engine {
    /// The enforced set.
    pub set: Arc<CompiledSet>,
    /// The shadow set: evaluated and logged, never enforced.
    pub shadow: Option<Arc<CompiledSet>>,
    /// Settings.
    pub settings: Settings,
    /// Where decisions are logged.
    pub audit: Option<Arc<AuditSink>>,
    /// Keyed by a keyed 128-bit hash, already uniform: moka's own hashing of
    /// the key is the cheap foldhash, not SipHash.
    cache: Cache<u128, Arc<Decided>, foldhash::fast::RandomState>,
    /// The key of that hash (SipHash-1-3, 128-bit output, one pass).
    sip_key: crate::util::HashKey,
    /// This engine's id in each thread's front of `cache`; 0 when the cache
    /// has no capacity or no TTL.
    front: u64,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("version", &self.set.version)
            .field("shadow", &self.shadow.as_ref().map(|s| &s.version))
            .finish_non_exhaustive()
    }
}

#[derive(Hash)]
struct KeyParts<'a> {
    /// `sub`, `iss`, `exp`, `iat`, `auth_time`, `acr`, `amr`, `client_id`
    /// and `jti`, hashed once per token ([`crate::claims::Claims::decision_fingerprint`]).
    claims: u128,
    device: Option<&'a str>,
    route: &'a str,
    method: super::MethodClass,
    identity_v: Option<u64>,
    device_v: Option<u64>,
    owner_v: Option<u64>,
    binding: &'a str,
    spiffe: Option<&'a str>,
    session_binding: Option<&'a str>,
    peer: IpAddr,
    snapshot_age_s: u64,
}

impl Engine {
    /// An engine over a loaded set.
    pub fn new(
        set: Arc<CompiledSet>,
        shadow: Option<Arc<CompiledSet>>,
        settings: Settings,
        audit: Option<Arc<AuditSink>>,
    ) -> Self {
        let cache = Cache::builder()
            .max_capacity(settings.cache_capacity)
            .expire_after(EntryTtl(settings.cache_ttl))
            .build_with_hasher(foldhash::fast::RandomState::default());
        let front = if settings.cache_capacity > 0 && !settings.cache_ttl.is_zero() {
            crate::util::front::new_owner()
        } else {
            0
        };
        Self {
            set,
            shadow,
            settings,
            audit,
            cache,
            front,
            sip_key: crate::util::HashKey::random(),
        }
    }

    /// Loads the policy (and shadow) directories named by a config.
    /// `prev` lends its audit sink when the audit settings are unchanged.
    pub fn from_config(
        cfg: &Config,
        prev: Option<&Engine>,
        metrics: Option<&crate::telemetry::Metrics>,
    ) -> Result<Option<Self>, LoadError> {
        let Some(settings) = Settings::from_config(cfg) else {
            return Ok(None);
        };
        let set = Arc::new(load_dir(&settings.dir)?);
        let shadow = match &settings.shadow_dir {
            Some(d) => Some(Arc::new(load_dir(d)?)),
            None => None,
        };
        let audit = match cfg.policy.as_ref().and_then(|p| p.audit.as_ref()) {
            None => None,
            Some(a) => match prev
                .and_then(|p| p.audit.clone())
                .filter(|s| s.same_config(a))
            {
                Some(s) => Some(s),
                None => Some(Arc::new(AuditSink::open(a, metrics).map_err(|source| {
                    LoadError::Read {
                        path: a.path.clone(),
                        source,
                    }
                })?)),
            },
        };
        Ok(Some(Self::new(set, shadow, settings, audit)))
    }

    /// The same settings and audit sink over freshly loaded directories
    /// (a file changed).
    pub fn reloaded(&self) -> Result<Self, LoadError> {
        let set = Arc::new(load_dir(&self.settings.dir)?);
        let shadow = match &self.settings.shadow_dir {
            Some(d) => Some(Arc::new(load_dir(d)?)),
            None => None,
        };
        Ok(Self::new(
            set,
            shadow,
            self.settings.clone(),
            self.audit.clone(),
        ))
    }

    /// The network zone of an address.
    pub fn zone(&self, ip: IpAddr) -> &str {
        zone_of(&self.settings.zones, ip)
    }

    fn key(&self, f: &RequestFacts<'_>) -> u128 {
        let c = f.claims;
        let r = f.resolved;
        let parts = KeyParts {
            claims: c.decision_fingerprint(),
            device: r.device_id.as_deref(),
            route: f.route,
            method: f.method,
            identity_v: r.identity.as_ref().map(|i| i.version),
            device_v: r.device.as_ref().map(|d| d.version),
            owner_v: f.owner.as_ref().map(|o| o.version),
            binding: f.binding,
            spiffe: f.spiffe_id,
            session_binding: f.session_binding,
            peer: f.peer,
            snapshot_age_s: f.resolved.snapshot_age_s,
        };
        self.sip_key.hash128(&parts)
    }

    fn shadow_for(&self, route: &str) -> Option<&Arc<CompiledSet>> {
        self.shadow.as_ref().filter(|_| {
            self.settings.shadow_routes.is_empty()
                || self.settings.shadow_routes.iter().any(|r| r == route)
        })
    }

    /// Decides a request: from the cache when the same principal, device,
    /// route, method class, record versions and token were decided recently,
    /// else by evaluating the set.
    pub fn decide(&self, f: &RequestFacts<'_>, now_s: u64) -> Outcome {
        self.decide_with(f, now_s, None)
    }

    /// [`Engine::decide`], first asking `memo`: the last decision a request
    /// of the same verified token got ([`crate::authn::VerifiedToken`]
    /// keeps it). It is used exactly as a copy in the thread's front is:
    /// the same engine, the same whole key, not past its expiry. A token's
    /// requests then read the decision through the token, whose lines they
    /// read anyway (and read early, side by side), instead of a front set
    /// and the decision one after the other. A decision got otherwise
    /// becomes the memo.
    pub fn decide_with(
        &self,
        f: &RequestFacts<'_>,
        now_s: u64,
        memo: Option<&ArcSwapOption<Decided>>,
    ) -> Outcome {
        let key = self.key(f);
        // `now_s` is whole seconds: a copy (memo or front) is used only
        // while even the end of that second is before its expiry (never
        // past the TTL).
        let fresh = |c: &Decided| {
            c.key == key && now_s.saturating_add(1).saturating_mul(1000) <= c.expires_ms
        };
        let memo = memo.filter(|_| self.front != 0);
        if let Some(m) = memo {
            let held = m.load();
            if let Some(c) = held.as_ref().filter(|c| c.owner == self.front && fresh(c)) {
                return Outcome {
                    decided: c.clone(),
                    cache_hit: true,
                };
            }
        }
        let out = self.decide_key(f, key, now_s, fresh);
        if let Some(m) = memo {
            m.store(Some(out.decided.clone()));
        }
        out
    }

    fn decide_key(
        &self,
        f: &RequestFacts<'_>,
        key: u128,
        now_s: u64,
        fresh: impl Fn(&Decided) -> bool,
    ) -> Outcome {
        let (bits, high) = front_key(key);
        let front = (self.front != 0)
            .then(|| DECISIONS.with_borrow(|d| d.get(self.front, bits, &high)))
            .flatten()
            .filter(|c| fresh(c));
        let cached = front.or_else(|| {
            let c = self.cache.get(&key).filter(|c| fresh(c))?;
            self.front_put(key, &c);
            Some(c)
        });
        if let Some(decided) = cached {
            return Outcome {
                decided,
                cache_hit: true,
            };
        }
        let inputs = Arc::new(Inputs::from_request(f, &self.settings.limits, now_s));
        let decision = self.set.evaluate(&inputs);
        let shadow = self.shadow_for(f.route).map(|s| s.evaluate(&inputs));
        let ttl_ms =
            u64::try_from(entry_ttl(self.settings.cache_ttl, key).as_millis()).unwrap_or(u64::MAX);
        let now_ms = crate::util::now_unix_ms();
        let c = Arc::new(Decided {
            decision,
            shadow,
            inputs,
            expires_ms: now_ms.saturating_add(ttl_ms),
            key,
            owner: self.front,
        });
        self.front_put(key, &c);
        self.cache.insert(key, c.clone());
        Outcome {
            decided: c,
            cache_hit: false,
        }
    }

    fn front_put(&self, key: u128, c: &Arc<Decided>) {
        if self.front != 0 {
            let (bits, high) = front_key(key);
            DECISIONS.with_borrow_mut(|d| d.put(self.front, bits, high, c.clone()));
        }
    }

    /// Evaluates inputs directly, without the cache (explain, tests).
    pub fn evaluate(&self, inputs: &Inputs) -> Decision {
        self.set.evaluate(inputs)
    }
}

/// How long the decision cached under `key` lives: `ttl` less up to a
/// quarter of it, the cut picked by the key's top bits (a keyed hash,
/// uniform and unknown outside the process). Never longer than `ttl`.
fn entry_ttl(ttl: Duration, key: u128) -> Duration {
    let Ok(ttl_ms) = u64::try_from(ttl.as_millis()) else {
        return ttl;
    };
    let spread = ttl_ms / 4;
    let cut = ((key >> 64) as u64) % (spread + 1);
    Duration::from_millis(ttl_ms.saturating_sub(cut))
}

/// The shared cache's expiry of an entry: [`entry_ttl`] from when it was
/// made (or replaced), the same span its [`Decided::expires_ms`] gives the
/// thread fronts and token memos; never past the configured TTL, so the
/// cache needs no `time_to_live` of its own.
struct EntryTtl(Duration);

impl moka::Expiry<u128, Arc<Decided>> for EntryTtl {
    fn expire_after_create(
        &self,
        key: &u128,
        _value: &Arc<Decided>,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(entry_ttl(self.0, *key))
    }

    fn expire_after_update(
        &self,
        key: &u128,
        _value: &Arc<Decided>,
        _updated_at: std::time::Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(entry_ttl(self.0, *key))
    }
}

/// The engine slot the proxy reads: empty when no `[policy]` is configured.
#[derive(Debug, Default)]
pub struct PolicyHandle {
    engine: ArcSwapOption<Engine>,
}

impl PolicyHandle {
    /// The current engine.
    pub fn load(&self) -> Option<Arc<Engine>> {
        self.engine.load_full()
    }

    /// Swaps in a new engine (or none).
    pub fn store(&self, e: Option<Arc<Engine>>) {
        self.engine.store(e);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::policy::facts::MethodClass;

    fn alice() -> crate::claims::Claims {
        serde_json::from_value(serde_json::json!({
            "sub": "alice@example.com", "iss": "https://idp.example", "exp": 4_000_000_000u64,
        }))
        .unwrap()
    }

    /// A read of `route` by `claims` from `peer`, nothing else set.
    fn facts<'a>(
        claims: &'a crate::claims::Claims,
        resolved: &'a crate::posture::Resolved,
        route: &'a str,
        peer: IpAddr,
    ) -> RequestFacts<'a> {
        RequestFacts {
            claims,
            issuer: "idp",
            resolved,
            owner: None,
            route,
            sensitivity: crate::config::Sensitivity::default(),
            workloads: &[],
            method: MethodClass::Read,
            peer,
            zone: "",
            binding: "none",
            spiffe_id: None,
            session_binding: None,
        }
    }

    /// A cached decision like `d` with the other action (allow for deny,
    /// deny otherwise), under `key` for `owner`, ending at `expires_ms`:
    /// what a test plants to see whether a lookup serves it.
    fn flipped(d: &Decided, key: u128, owner: u64, expires_ms: u64) -> Arc<Decided> {
        let mut decision = d.decision.clone();
        decision.action = if decision.action == crate::policy::Action::Deny {
            crate::policy::Action::Allow
        } else {
            crate::policy::Action::Deny
        };
        Arc::new(Decided {
            decision,
            shadow: None,
            inputs: d.inputs.clone(),
            expires_ms,
            key,
            owner,
        })
    }

    #[test]
    fn a_front_entry_matching_half_the_key_is_not_used() {
        let engine = memo_engine(100);
        let claims = alice();
        let resolved = crate::posture::Resolved::default();
        let facts = facts(&claims, &resolved, "app", IpAddr::from([127, 0, 0, 1]));
        let now = crate::util::now_unix();
        let first = engine.decide(&facts, now);
        assert!(!first.cache_hit);
        let key = engine.key(&facts);
        assert_eq!(first.decided.key, key);
        // Another decision whose key shares this one's set and high half
        // (it differs in a bit the set index does not read) takes this
        // key's place in the front.
        let planted = flipped(&first.decided, key ^ (1 << 40), engine.front, u64::MAX);
        engine.front_put(key, &planted);
        // The front finds it by half the key; its full key refuses it, and
        // the shared cache answers with this key's own decision.
        let again = engine.decide(&facts, now);
        assert!(again.cache_hit);
        assert_eq!(again.decided.key, key);
        assert_eq!(again.decided.decision, first.decided.decision);
    }

    #[test]
    fn entry_ttls_spread_over_the_last_quarter_and_never_exceed_the_ttl() {
        let key = crate::util::HashKey::random();
        let ttl = Duration::from_secs(60);
        let mut buckets = [0u32; 10];
        for i in 0..10_000u32 {
            let t = entry_ttl(ttl, key.hash128(&i));
            assert!(t <= ttl && t >= Duration::from_secs(45), "{t:?}");
            let b = (60_000 - t.as_millis()) * 10 / 15_001;
            buckets[usize::try_from(b).unwrap()] += 1;
        }
        // Uniform over the quarter: every tenth of it holds about 1,000.
        assert!(
            buckets.iter().all(|&n| (700..1300).contains(&n)),
            "{buckets:?}"
        );
        assert_eq!(entry_ttl(Duration::ZERO, u128::MAX), Duration::ZERO);
        assert!(entry_ttl(Duration::from_millis(3), u128::MAX) <= Duration::from_millis(3));
    }

    #[test]
    fn decisions_made_together_expire_apart() {
        let engine = memo_engine(1000);
        let claims = alice();
        let resolved = crate::posture::Resolved::default();
        let now = crate::util::now_unix();
        let before = crate::util::now_unix_ms();
        let mut expiries = Vec::new();
        for i in 0..200u8 {
            let facts = facts(&claims, &resolved, "app", IpAddr::from([10, 0, 0, i]));
            let out = engine.decide(&facts, now);
            assert!(!out.cache_hit);
            expiries.push(out.decided.expires_ms);
        }
        let after = crate::util::now_unix_ms();
        let (lo, hi) = (
            expiries.iter().min().unwrap(),
            expiries.iter().max().unwrap(),
        );
        assert!(*lo >= before + 45_000 && *hi <= after + 60_000, "{lo} {hi}");
        // 200 made in the same moment end over (nearly) the whole quarter.
        assert!(hi - lo >= 10_000, "{lo} {hi}");
    }

    #[test]
    fn a_shared_cache_entry_past_its_own_expiry_is_not_served() {
        let engine = memo_engine(100);
        let claims = alice();
        let resolved = crate::posture::Resolved::default();
        let facts = facts(&claims, &resolved, "app", IpAddr::from([127, 0, 0, 1]));
        let now = crate::util::now_unix();
        let key = engine.key(&facts);
        let first = engine.decide(&facts, now);
        // The shared cache still holds an entry whose own expiry has
        // passed (and this thread's front has none): it is decided again.
        engine.cache.insert(
            key,
            flipped(&first.decided, key, engine.front, now.saturating_mul(1000)),
        );
        DECISIONS.with_borrow_mut(|d| *d = crate::util::front::Front::new());
        let again = engine.decide(&facts, now);
        assert!(!again.cache_hit);
        assert_eq!(again.decided.decision, first.decided.decision);
    }

    fn memo_engine(capacity: u64) -> Engine {
        let set =
            load_dir(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/policies"))
                .unwrap();
        let settings = Settings {
            limits: Limits::default(),
            zones: Vec::new(),
            cache_ttl: Duration::from_secs(60),
            cache_capacity: capacity,
            shadow_routes: Vec::new(),
            dir: PathBuf::new(),
            shadow_dir: None,
        };
        Engine::new(Arc::new(set), None, settings, None)
    }

    #[test]
    fn a_tokens_memo_counts_only_for_its_engine_key_and_lifetime() {
        let engine = memo_engine(100);
        let claims = alice();
        let resolved = crate::posture::Resolved::default();
        let facts = |route| facts(&claims, &resolved, route, IpAddr::from([127, 0, 0, 1]));
        let now = crate::util::now_unix();
        let memo = ArcSwapOption::<Decided>::empty();
        let first = engine.decide_with(&facts("app"), now, Some(&memo));
        assert!(!first.cache_hit);
        // The decision became the token's memo.
        assert!(
            memo.load()
                .as_ref()
                .is_some_and(|m| Arc::ptr_eq(m, &first.decided))
        );
        let key = first.decided.key;
        let plant = |key: u128, owner: u64, expires_ms: u64| {
            let d = flipped(&first.decided, key, owner, expires_ms);
            memo.store(Some(d.clone()));
            d
        };
        // A memo of this engine, this key, not expired: served as it is.
        let good = plant(key, engine.front, u64::MAX);
        let served = engine.decide_with(&facts("app"), now, Some(&memo));
        assert!(served.cache_hit);
        assert!(Arc::ptr_eq(&served.decided, &good));
        // Another engine's (a reload), another key's, or an expired one:
        // never served; the cache's own decision is, and becomes the memo.
        let other = memo_engine(100);
        for (k, owner, exp) in [
            (key, other.front, u64::MAX),
            (key ^ 1, engine.front, u64::MAX),
            (key, engine.front, now.saturating_mul(1000)),
        ] {
            plant(k, owner, exp);
            let out = engine.decide_with(&facts("app"), now, Some(&memo));
            assert!(out.cache_hit);
            assert_eq!(out.decided.decision, first.decided.decision);
            assert!(
                memo.load()
                    .as_ref()
                    .is_some_and(|m| Arc::ptr_eq(m, &out.decided))
            );
        }
        // Another route is another key: decided on its own, not the memo's.
        plant(key, engine.front, u64::MAX);
        let elsewhere = engine.decide_with(&facts("admin"), now, Some(&memo));
        assert_ne!(elsewhere.decided.key, key);
        assert!(
            memo.load()
                .as_ref()
                .is_some_and(|m| m.key == elsewhere.decided.key)
        );
        // With no decision cache, no memo either: always evaluated.
        let uncached = memo_engine(0);
        let none = ArcSwapOption::<Decided>::empty();
        assert!(
            !uncached
                .decide_with(&facts("app"), now, Some(&none))
                .cache_hit
        );
        assert!(
            !uncached
                .decide_with(&facts("app"), now, Some(&none))
                .cache_hit
        );
        assert!(none.load().is_none());
    }
}
