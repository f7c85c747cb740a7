//! Telemetry: Prometheus metrics, logs, and the per-request record.
//!
//! Metrics go through `prometheus-client`. Label values are bounded (route
//! names from config, status codes, action names): never a path, subject or
//! token. This room never decides anything.

pub mod logging;
pub mod sharded;
pub mod trace;

use std::sync::{Arc, OnceLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels for per-route request counts.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteStatus {
    /// Route name (`none` when no route matched).
    pub route: String,
    /// HTTP status code.
    pub status: u16,
}

/// Labels for decisions.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabel {
    /// allow, deny, …
    pub action: &'static str,
    /// Why, as a short code (`ok`, `invalid_token`, …).
    pub reason: &'static str,
}

/// Labels naming a route.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    /// Route name.
    pub route: String,
}

/// Labels naming a listener.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabel {
    /// `https`, `http` or `admin`.
    pub listener: &'static str,
}

/// Labels naming a proxy worker thread (`[listener] workers`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerLabel {
    /// The worker's index, from 0.
    pub worker: u64,
}

/// Labels naming an outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// Outcome.
    pub result: &'static str,
}

/// Labels for feed events.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FeedOutcomeLabel {
    /// Feed (`ssf`, `scim`, `jamf`, `intune`, `mdm`, `admin`).
    pub feed: &'static str,
    /// Event type label (a bounded set chosen by each feed).
    pub kind: String,
    /// `applied`, `stale`, `duplicate`, `rejected`, `ignored`.
    pub outcome: &'static str,
}

/// Labels for per-feed, per-type histograms.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FeedKindLabel {
    /// Feed.
    pub feed: &'static str,
    /// Event type label.
    pub kind: String,
}

/// Labels for live connections cut by a re-decision.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CutLabel {
    /// Why (`device_untrusted`, `revoked`, `subject_disabled`, `policy_deny`,
    /// `restrict_upgrade`, `expired`, …).
    pub reason: &'static str,
}

/// Labels naming a kind of live connection.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LiveKindLabel {
    /// `upgrade` (WebSocket and other upgrades) or `stream` (a response still streaming).
    pub kind: &'static str,
}

/// Every metric the proxy exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Requests by route and status.
    pub requests: Family<RouteStatus, sharded::Counter>,
    /// Decisions by action and reason.
    pub decisions: Family<ActionLabel, sharded::Counter>,
    /// Upstream response-header latency by route.
    pub upstream_seconds: Family<RouteLabel, sharded::Histogram>,
    /// Token verification cache hits.
    pub token_cache_hits: sharded::Counter,
    /// Token verification cache misses.
    pub token_cache_misses: sharded::Counter,
    /// Open client connections by listener.
    pub open_connections: Family<ListenerLabel, Gauge>,
    /// Open proxy connections by the worker thread serving them.
    pub worker_connections: Family<WorkerLabel, Gauge>,
    /// Connections refused at the connection limit or in the TLS handshake.
    pub connections_refused: Family<ResultLabel, Counter>,
    /// Config reloads by result.
    pub config_reloads: Family<ResultLabel, Counter>,
    /// Feed events by feed, type and outcome.
    pub feed_events: Family<FeedOutcomeLabel, Counter>,
    /// Time to make a batch of events durable and apply it.
    pub apply_seconds: Histogram,
    /// Accept → first request decided on the new state, by feed and type.
    pub control_window_seconds: Family<FeedKindLabel, Histogram>,
    /// Requests refused by the posture baseline, by reason.
    pub posture_denials: Family<ResultLabel, Counter>,
    /// Policy decisions served from the decision cache.
    pub policy_cache_hits: sharded::Counter,
    /// Policy decisions that needed a Cedar evaluation.
    pub policy_cache_misses: sharded::Counter,
    /// Policy set reloads by result (`ok`, `error`).
    pub policy_reloads: Family<ResultLabel, Counter>,
    /// Requests where the shadow set decided differently, by both actions.
    pub policy_shadow_divergences: Family<ShadowLabel, Counter>,
    /// Audit lines dropped because the writer fell behind.
    pub policy_audit_dropped: Counter,
    /// Access-memory rows evicted or not taken at the bound, by kind
    /// (`route_rows`, `tokens`, `dropped`).
    pub access_evicted: Family<ResultLabel, Counter>,
    /// Access-memory rows held, by kind (`route_rows`, `tokens`).
    pub access_entries: Family<ResultLabel, Gauge>,
    /// Live connections (upgrades, streaming responses) open now, by kind.
    pub live_connections: Family<LiveKindLabel, Gauge>,
    /// Live connections cut by a re-decision, by reason.
    pub live_connections_cut: Family<CutLabel, Counter>,
    /// New upstream connections, by why no pooled one was used.
    pub upstream_connections_opened: Family<ReasonLabel, Counter>,
    /// Cluster: seconds from the accepting replica's accept to this replica's apply, last batch.
    pub cluster_stream_lag_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Cluster: stream messages not yet delivered to this replica.
    pub cluster_stream_pending: Gauge,
    /// Cluster: stream messages counted and skipped, by reason.
    pub cluster_bad_messages: Family<ReasonLabel, Counter>,
    /// Cluster: the cluster-wide DPoP replay check (one KV create), seconds.
    pub cluster_dpop_check_seconds: Histogram,
    /// `decisions{reason="ok"}` of the three forwarding actions, looked up
    /// once instead of hashing the label set on every request.
    forwarded: [OnceLock<sharded::Counter>; 3],
}

/// A reason label (cluster bad input).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// Why.
    pub reason: &'static str,
}

/// Labels for shadow-mode divergences.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShadowLabel {
    /// What the enforced set decided.
    pub enforced: &'static str,
    /// What the shadow set decided.
    pub shadow: &'static str,
}

/// Latency buckets: 100 µs … ~52 s.
fn latency_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.0001, 2.0, 20)
}

fn latency_histogram() -> Histogram {
    Histogram::new(latency_buckets())
}

/// The same buckets, for the per-request series (one slot per worker, see
/// [`sharded`]).
fn sharded_latency_histogram() -> sharded::Histogram {
    sharded::Histogram::new(latency_buckets())
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric under the `portcullis` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("portcullis");
        let requests = Family::<RouteStatus, sharded::Counter>::default();
        let decisions = Family::<ActionLabel, sharded::Counter>::default();
        let upstream_seconds = Family::<RouteLabel, sharded::Histogram>::new_with_constructor(
            sharded_latency_histogram as fn() -> sharded::Histogram,
        );
        let token_cache_hits = sharded::Counter::default();
        let token_cache_misses = sharded::Counter::default();
        let open_connections = Family::<ListenerLabel, Gauge>::default();
        let worker_connections = Family::<WorkerLabel, Gauge>::default();
        let connections_refused = Family::<ResultLabel, Counter>::default();
        let config_reloads = Family::<ResultLabel, Counter>::default();
        registry.register("requests", "Requests by route and status", requests.clone());
        registry.register(
            "decisions",
            "Access decisions by action and reason",
            decisions.clone(),
        );
        registry.register(
            "upstream_response_seconds",
            "Time from forwarding a request to the upstream's response headers",
            upstream_seconds.clone(),
        );
        registry.register(
            "token_cache_hits",
            "Bearer tokens whose signature check was served from the cache",
            token_cache_hits.clone(),
        );
        registry.register(
            "token_cache_misses",
            "Bearer tokens that needed a full signature check",
            token_cache_misses.clone(),
        );
        registry.register(
            "open_connections",
            "Open client connections",
            open_connections.clone(),
        );
        registry.register(
            "worker_connections",
            "Open proxy connections by the worker thread serving them (each new one goes to the least loaded)",
            worker_connections.clone(),
        );
        registry.register(
            "connections_refused",
            "Client connections refused (limit, handshake failure or timeout)",
            connections_refused.clone(),
        );
        registry.register(
            "config_reloads",
            "Config reloads by result",
            config_reloads.clone(),
        );
        let feed_events = Family::<FeedOutcomeLabel, Counter>::default();
        let apply_seconds = latency_histogram();
        let control_window_seconds = Family::<FeedKindLabel, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        let posture_denials = Family::<ResultLabel, Counter>::default();
        registry.register(
            "feed_events",
            "Feed events by feed, type and outcome (applied, partial, held, stale, duplicate, future, unconfirmed, rejected, ignored)",
            feed_events.clone(),
        );
        registry.register(
            "apply_seconds",
            "Time to make a batch of feed events durable and apply it to the snapshot",
            apply_seconds.clone(),
        );
        registry.register(
            "control_window_seconds",
            "Time from accepting a feed event to the first request decided on the new state",
            control_window_seconds.clone(),
        );
        registry.register(
            "posture_denials",
            "Requests refused by the posture baseline, by reason",
            posture_denials.clone(),
        );
        let policy_cache_hits = sharded::Counter::default();
        let policy_cache_misses = sharded::Counter::default();
        let policy_reloads = Family::<ResultLabel, Counter>::default();
        let policy_shadow_divergences = Family::<ShadowLabel, Counter>::default();
        let policy_audit_dropped = Counter::default();
        registry.register(
            "policy_cache_hits",
            "Policy decisions served from the decision cache",
            policy_cache_hits.clone(),
        );
        registry.register(
            "policy_cache_misses",
            "Policy decisions that needed a Cedar evaluation",
            policy_cache_misses.clone(),
        );
        registry.register(
            "policy_reloads",
            "Policy set reloads by result",
            policy_reloads.clone(),
        );
        registry.register(
            "policy_shadow_divergences",
            "Requests where the shadow policy set decided differently from the enforced one",
            policy_shadow_divergences.clone(),
        );
        registry.register(
            "policy_audit_dropped",
            "Audit lines dropped because the audit writer fell behind",
            policy_audit_dropped.clone(),
        );
        let live_connections = Family::<LiveKindLabel, Gauge>::default();
        let live_connections_cut = Family::<CutLabel, Counter>::default();
        registry.register(
            "live_connections",
            "Live connections (upgrades, responses still streaming) registered for re-decision, by kind",
            live_connections.clone(),
        );
        registry.register(
            "live_connections_cut",
            "Live connections ended because a re-decision refused them, by reason",
            live_connections_cut.clone(),
        );
        let upstream_connections_opened = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "upstream_connections_opened",
            "New upstream connections, by why no pooled one served the request: none_idle (the pool had none), all_busy (every idle one was still busy), closed (the one taken had been closed by the upstream)",
            upstream_connections_opened.clone(),
        );
        let cluster_stream_lag_seconds = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        let cluster_stream_pending = Gauge::default();
        let cluster_bad_messages = Family::<ReasonLabel, Counter>::default();
        let cluster_dpop_check_seconds = latency_histogram();
        registry.register(
            "cluster_stream_lag_seconds",
            "Seconds from the accepting replica's accept to this replica's apply (last batch)",
            cluster_stream_lag_seconds.clone(),
        );
        registry.register(
            "cluster_stream_pending",
            "Cluster stream messages not yet delivered to this replica",
            cluster_stream_pending.clone(),
        );
        registry.register(
            "cluster_bad_messages",
            "Cluster stream messages counted and skipped, by reason",
            cluster_bad_messages.clone(),
        );
        registry.register(
            "cluster_dpop_check_seconds",
            "Time of the cluster-wide DPoP replay check (one JetStream KV create)",
            cluster_dpop_check_seconds.clone(),
        );
        let access_evicted = Family::<ResultLabel, Counter>::default();
        registry.register(
            "access_evicted",
            "Access-memory rows evicted (oldest first) or not taken at the bound, by kind",
            access_evicted.clone(),
        );
        let access_entries = Family::<ResultLabel, Gauge>::default();
        registry.register(
            "access_entries",
            "Access-memory rows held, by kind",
            access_entries.clone(),
        );
        Self {
            access_evicted,
            access_entries,
            live_connections,
            live_connections_cut,
            upstream_connections_opened,
            cluster_stream_lag_seconds,
            cluster_stream_pending,
            cluster_bad_messages,
            cluster_dpop_check_seconds,
            policy_cache_hits,
            policy_cache_misses,
            policy_reloads,
            policy_shadow_divergences,
            policy_audit_dropped,
            forwarded: Default::default(),
            feed_events,
            apply_seconds,
            control_window_seconds,
            posture_denials,
            registry,
            requests,
            decisions,
            upstream_seconds,
            token_cache_hits,
            token_cache_misses,
            open_connections,
            worker_connections,
            connections_refused,
            config_reloads,
        }
    }

    /// Counts one forwarded request under `decisions{action, reason="ok"}`.
    pub fn count_forwarded(&self, action: &'static str) {
        let slot = match action {
            "allow" => &self.forwarded[0],
            "shorten" => &self.forwarded[1],
            "restrict" => &self.forwarded[2],
            _ => {
                self.decisions
                    .get_or_create(&ActionLabel {
                        action,
                        reason: "ok",
                    })
                    .inc();
                return;
            }
        };
        slot.get_or_init(|| {
            self.decisions.get_or_create_owned(&ActionLabel {
                action,
                reason: "ok",
            })
        })
        .inc();
    }

    /// Registers a further metric (used by later rooms: feeds, policy).
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// Encodes the OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// An open-connection guard: the gauge goes up on creation, down on drop.
#[derive(Debug)]
pub struct ConnectionGuard {
    gauge: Gauge,
}

impl ConnectionGuard {
    /// Counts one connection on `listener`.
    pub fn new(metrics: &Arc<Metrics>, listener: &'static str) -> Self {
        let gauge = metrics
            .open_connections
            .get_or_create_owned(&ListenerLabel { listener });
        gauge.inc();
        Self { gauge }
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}
