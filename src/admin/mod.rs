//! The admin listener: `/metrics`, `/healthz`, `/readyz` (and, in later
//! rooms, the feeds and the operator API), each with its own authentication.
//! It never serves proxied traffic.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::telemetry::ConnectionGuard;

/// What the admin listener reads: the proxy (runtime, metrics, policy), the
/// posture service and the feed receivers of the running config.
pub struct AdminState {
    /// The proxy.
    pub proxy: Arc<crate::proxy::Proxy>,
    /// The posture service.
    pub posture: Arc<crate::posture::Posture>,
    /// Feed receivers, swapped on reload.
    pub feeds: Arc<arc_swap::ArcSwap<crate::feeds::FeedContext>>,
    /// The Shared Signals transmitter, with `[transmitter]` (fixed at start).
    pub transmitter: Option<Arc<crate::transmit::Transmitter>>,
}

impl std::fmt::Debug for AdminState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminState").finish_non_exhaustive()
    }
}

/// Longest time an admin client may take to send its headers.
const ADMIN_HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves the admin listener until shutdown.
pub async fn serve(
    shared: Arc<AdminState>,
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
) {
    let graceful = GracefulShutdown::new();
    loop {
        let (tcp, _peer) = tokio::select! {
            r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
            _ = shutdown.changed() => break,
        };
        let shared = shared.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _guard = ConnectionGuard::new(&shared.proxy.metrics, "admin");
            let svc = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(&shared, req).await) }
            });
            let mut b = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            b.http1()
                .timer(TokioTimer::new())
                .header_read_timeout(ADMIN_HEADER_TIMEOUT);
            let conn = b.serve_connection(TokioIo::new(tcp), svc);
            let _ = watcher.watch(conn.into_owned()).await;
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), graceful.shutdown()).await;
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn authorized(req: &Request<Incoming>, secret: Option<&str>) -> bool {
    secret.is_none_or(|secret| crate::feeds::bearer_is(req, secret))
}

/// `GET /admin/v1/explain?subject=…&route=…[&device=…&method=…&acr=…]`:
/// how the running policy set would decide, and why (admin API token).
fn explain(shared: &AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    use crate::feeds::{error, json};
    let rt = shared.proxy.runtime.load();
    if let Some(refusal) =
        crate::feeds::admin::api_token_refusal(&rt.config, &shared.proxy.metrics, req)
    {
        return refusal;
    }
    if req.method() != http::Method::GET {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "GET only",
        );
    }
    let Some(engine) = shared.proxy.policy.load() else {
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            "no policy set is configured ([policy])",
        );
    };
    let q = crate::policy::explain::parse_query(req.uri().query().unwrap_or(""));
    match crate::policy::explain::explain(&engine, &shared.posture, &rt.config, &q) {
        Ok(v) => json(StatusCode::OK, &v),
        Err(m) => error(StatusCode::BAD_REQUEST, "invalid_request", m),
    }
}

async fn handle(shared: &AdminState, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if path == "/admin/v1/explain" {
        return explain(shared, &req);
    }
    if let Some(t) = &shared.transmitter
        && crate::transmit::api::owns(path)
    {
        return t.handle(req).await;
    }
    if path.starts_with("/admin/v1/")
        || path == "/ssf/push"
        || path.starts_with("/scim/v2")
        || path.starts_with("/mdm/")
    {
        let feeds = shared.feeds.load_full();
        return if path.starts_with("/admin/v1/") {
            crate::feeds::admin::handle(&feeds, req).await
        } else if path == "/ssf/push" {
            crate::feeds::ssf::push(&feeds, req).await
        } else if path.starts_with("/scim/v2") {
            crate::feeds::scim::handle(&feeds, req).await
        } else if path == "/mdm/jamf" {
            crate::feeds::jamf::webhook(&feeds, req).await
        } else {
            crate::feeds::mdm::handle(&feeds, req).await
        };
    }
    let rt = shared.proxy.runtime.load();
    match (req.method().as_str(), req.uri().path()) {
        ("GET", "/healthz") => text(StatusCode::OK, "ok\n"),
        ("GET", "/readyz") => {
            if let Some(c) = shared.posture.cluster()
                && c.snapshot_age_s() > c.max_staleness_s()
            {
                return text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "not ready: no word from the cluster for {} s\n",
                        c.snapshot_age_s()
                    ),
                );
            }
            if rt.auth.ready() {
                text(StatusCode::OK, "ready\n")
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: an issuer has no keys\n",
                )
            }
        }
        ("GET", "/metrics") => {
            if !authorized(&req, rt.config.admin.metrics_token.as_deref()) {
                let mut r = text(StatusCode::UNAUTHORIZED, "metrics need a bearer token\n");
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static("Bearer realm=\"portcullis-admin\""),
                );
                return r;
            }
            let mut body = shared.proxy.metrics.encode();
            if let Some(t) = &shared.transmitter {
                // One exposition: the first `# EOF` goes, the transmitter's ends it.
                body.truncate(body.trim_end().trim_end_matches("# EOF").len());
                body.push_str(&t.metrics.encode());
            }
            let mut r = text(StatusCode::OK, body);
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            r
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}
