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

/// `GET /admin/v1/access?subject=…&device=…&route=…&finding=…&format=json|csv|table`
/// and `GET /admin/ui` (same filters): the access picture and its findings
/// (admin API token). A filter that matches nothing gives an empty picture.
async fn access(shared: &AdminState, req: &Request<Incoming>, ui: bool) -> Response<Full<Bytes>> {
    use crate::feeds::{error, json};
    let rt = shared.proxy.runtime.load_full();
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
    let (filter, format) =
        match crate::access::report::Filter::parse_query(req.uri().query().unwrap_or("")) {
            Ok(x) => x,
            Err(m) => return error(StatusCode::BAD_REQUEST, "invalid_request", m),
        };
    let report = crate::access::report::build(
        &shared.proxy.access,
        &shared.posture,
        &rt.config,
        &shared.proxy.metrics.encode(),
        &filter,
    )
    .await;
    let typed = |body: String, ct: &'static str| {
        let mut r = text(StatusCode::OK, body);
        r.headers_mut()
            .insert(header::CONTENT_TYPE, header::HeaderValue::from_static(ct));
        r.headers_mut().insert(
            header::CACHE_CONTROL,
            header::HeaderValue::from_static("no-store"),
        );
        r
    };
    if ui {
        let mut nonce = [0u8; 16];
        if aws_lc_rs::rand::fill(&mut nonce).is_err() {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "no randomness for the page nonce",
            );
        }
        let nonce = hex::encode(nonce);
        let mut r = typed(
            crate::access::ui::page(&report, &nonce),
            "text/html; charset=utf-8",
        );
        let h = r.headers_mut();
        if let Ok(v) = header::HeaderValue::from_str(&crate::access::ui::csp(&nonce)) {
            h.insert(header::CONTENT_SECURITY_POLICY, v);
        }
        h.insert(
            header::X_CONTENT_TYPE_OPTIONS,
            header::HeaderValue::from_static("nosniff"),
        );
        h.insert(
            header::REFERRER_POLICY,
            header::HeaderValue::from_static("no-referrer"),
        );
        h.insert(
            header::X_FRAME_OPTIONS,
            header::HeaderValue::from_static("DENY"),
        );
        return r;
    }
    match format {
        crate::access::report::Format::Json => match serde_json::to_value(&report) {
            Ok(v) => json(StatusCode::OK, &v),
            Err(_) => error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the report did not serialize",
            ),
        },
        crate::access::report::Format::Csv => typed(report.to_csv(), "text/csv; charset=utf-8"),
        crate::access::report::Format::Table => {
            typed(report.to_table(), "text/plain; charset=utf-8")
        }
    }
}

async fn handle(shared: &AdminState, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if path == "/admin/v1/explain" {
        return explain(shared, &req);
    }
    if path == "/admin/v1/access" || path == "/admin/ui" {
        return access(shared, &req, path == "/admin/ui").await;
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
