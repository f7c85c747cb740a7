//! Traces: one OpenTelemetry SERVER span per request, a child span per phase,
//! a CLIENT span for the upstream call, exported as OTLP/HTTP protobuf
//! (`[tracing]`, off by default: without it nothing here runs or allocates).
//!
//! Attributes follow the HTTP semantic conventions (server: method, scheme,
//! path, route, status, peer, protocol version, server address/port; client:
//! method, `url.full`, server address/port, status); decisions go under the
//! project's own `portcullis.*` names, since there is no convention for them.
//! The upstream receives a W3C `traceparent` for the CLIENT span. An inbound
//! `traceparent` is trusted as the parent only with `trust_inbound = true`;
//! by default each request starts a new trace (the sender is on the internet).
//!
//! Spans are exported on the SDK's batch thread; its HTTP client runs the
//! request on the server's tokio runtime over the proxy's own hyper + rustls
//! (aws-lc-rs) stack, so no second TLS stack or crypto provider comes in.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{Span as _, SpanKind, Status, TraceContextExt, Tracer as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider,
};

use crate::config::TracingConfig;

/// The largest OTLP response body read back (the exporter ignores it anyway).
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// Why tracing could not start.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// Not inside a tokio runtime.
    #[error("tracing needs the server's tokio runtime")]
    NoRuntime,
    /// The OTLP exporter rejected its settings.
    #[error("otlp exporter: {0}")]
    Exporter(String),
}

/// The tracer of a running config (`None` in [`crate::proxy::Runtime`] when off).
pub struct Tracing {
    /// The settings it was built from (a reload with the same ones reuses it).
    pub config: TracingConfig,
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    propagator: TraceContextPropagator,
}

impl std::fmt::Debug for Tracing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracing")
            .field("endpoint", &self.config.otlp_endpoint)
            .finish()
    }
}

impl Drop for Tracing {
    fn drop(&mut self) {
        // Flush what is queued; bounded by the export timeout.
        let _ = self.provider.force_flush();
    }
}

/// The exporter's HTTP client: requests run on the tokio runtime, so the
/// SDK's batch thread can wait for them without a reactor of its own.
#[derive(Debug)]
struct OtlpClient {
    handle: tokio::runtime::Handle,
    client: hyper_util::client::legacy::Client<
        hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
        Full<Bytes>,
    >,
    timeout: Duration,
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for OtlpClient {
    async fn send_bytes(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, opentelemetry_http::HttpError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (client, timeout) = (self.client.clone(), self.timeout);
        self.handle.spawn(async move {
            let run = async {
                let resp = client.request(request.map(Full::new)).await?;
                let (parts, body) = resp.into_parts();
                let body = http_body_util::Limited::new(body, MAX_RESPONSE_BYTES)
                    .collect()
                    .await?
                    .to_bytes();
                Ok::<_, opentelemetry_http::HttpError>(http::Response::from_parts(parts, body))
            };
            let out = match tokio::time::timeout(timeout, run).await {
                Ok(r) => r,
                Err(_) => Err("otlp export timed out".into()),
            };
            let _ = tx.send(out);
        });
        rx.await
            .map_err(|_| "otlp export task ended".into())
            .and_then(|r| r)
    }
}

impl Tracing {
    /// Builds the exporter, the batch processor and the tracer.
    pub fn new(config: &TracingConfig) -> Result<Arc<Self>, TraceError> {
        let handle = tokio::runtime::Handle::try_current().map_err(|_| TraceError::NoRuntime)?;
        let timeout = Duration::from_millis(config.export_timeout_ms);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::aws_lc_rs::default_provider())
            .map_err(|e| TraceError::Exporter(e.to_string()))?
            .https_or_http()
            .enable_http1()
            .build();
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build(https);
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(OtlpClient {
                handle,
                client,
                timeout,
            })
            .with_endpoint(config.otlp_endpoint.clone())
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_timeout(timeout)
            .build()
            .map_err(|e| TraceError::Exporter(e.to_string()))?;
        let batch = BatchSpanProcessor::builder(exporter)
            .with_batch_config(
                BatchConfigBuilder::default()
                    .with_scheduled_delay(Duration::from_millis(config.export_interval_ms))
                    .build(),
            )
            .build();
        let root = Sampler::TraceIdRatioBased(config.sample_ratio);
        let provider = SdkTracerProvider::builder()
            .with_span_processor(batch)
            .with_sampler(Sampler::ParentBased(Box::new(root)))
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name(config.service_name.clone())
                    .build(),
            )
            .build();
        let tracer = opentelemetry::trace::TracerProvider::tracer(&provider, "portcullis");
        Ok(Arc::new(Self {
            config: config.clone(),
            provider,
            tracer,
            propagator: TraceContextPropagator::new(),
        }))
    }

    /// Exports every finished span now (tests, shutdown).
    pub fn flush(&self) {
        let _ = self.provider.force_flush();
    }

    /// Starts the SERVER span of a request.
    pub fn start<B>(
        self: &Arc<Self>,
        req: &http::Request<B>,
        peer: std::net::SocketAddr,
        tls: bool,
    ) -> RequestTrace {
        let parent = if self.config.trust_inbound {
            self.propagator
                .extract(&opentelemetry_http::HeaderExtractor(req.headers()))
        } else {
            Context::new()
        };
        let (method, original) = semconv_method(req.method());
        let mut attrs = vec![
            KeyValue::new("http.request.method", method),
            KeyValue::new("url.path", req.uri().path().to_owned()),
            KeyValue::new("url.scheme", if tls { "https" } else { "http" }),
            KeyValue::new("network.peer.address", peer.ip().to_string()),
            KeyValue::new("network.peer.port", i64::from(peer.port())),
            KeyValue::new("client.address", peer.ip().to_string()),
            KeyValue::new("network.protocol.version", protocol_version(req.version())),
        ];
        if let Some(o) = original {
            attrs.push(KeyValue::new("http.request.method_original", o));
        }
        if let Some((host, port)) = authority(req) {
            attrs.push(KeyValue::new("server.address", host));
            if let Some(p) = port {
                attrs.push(KeyValue::new("server.port", i64::from(p)));
            }
        }
        if let Some(ua) = req
            .headers()
            .get(http::header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
        {
            attrs.push(KeyValue::new("user_agent.original", ua.to_owned()));
        }
        let span = self
            .tracer
            .span_builder(method.to_owned())
            .with_kind(SpanKind::Server)
            .with_attributes(attrs)
            .start_with_context(&self.tracer, &parent);
        RequestTrace {
            tracing: self.clone(),
            cx: parent.with_span(span),
            method,
        }
    }
}

/// The trace of one request: its SERVER span, and the phase spans under it.
pub struct RequestTrace {
    tracing: Arc<Tracing>,
    cx: Context,
    method: &'static str,
}

impl std::fmt::Debug for RequestTrace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestTrace")
            .field("trace_id", &self.trace_id())
            .finish()
    }
}

/// A running CLIENT span for the upstream call.
pub struct UpstreamSpan(opentelemetry_sdk::trace::Span);

impl RequestTrace {
    /// The trace id (hex), for the audit record.
    pub fn trace_id(&self) -> String {
        self.cx.span().span_context().trace_id().to_string()
    }

    /// Records a finished phase as a child span from `started` to now.
    pub fn phase(&self, name: &'static str, started: SystemTime) {
        let mut span = self
            .tracing
            .tracer
            .span_builder(name)
            .with_kind(SpanKind::Internal)
            .with_start_time(started)
            .start_with_context(&self.tracing.tracer, &self.cx);
        span.end();
    }

    /// Adds an attribute to the SERVER span.
    pub fn set(&self, kv: KeyValue) {
        self.cx.span().set_attribute(kv);
    }

    /// Starts the CLIENT span and writes its `traceparent` (and
    /// `tracestate`) into the upstream request's headers.
    pub fn upstream(
        &self,
        method: &http::Method,
        uri: &http::Uri,
        headers: &mut http::HeaderMap,
    ) -> UpstreamSpan {
        let (m, _) = semconv_method(method);
        // url.full without user:pass@ (never present in an upstream URI we build) or query secrets.
        let full = format!(
            "{}://{}{}",
            uri.scheme_str().unwrap_or("http"),
            uri.authority().map_or("", |a| a.as_str()),
            uri.path()
        );
        let port = uri
            .port_u16()
            .unwrap_or(if uri.scheme_str() == Some("https") {
                443
            } else {
                80
            });
        let span = self
            .tracing
            .tracer
            .span_builder(m.to_owned())
            .with_kind(SpanKind::Client)
            .with_attributes(vec![
                KeyValue::new("http.request.method", m),
                KeyValue::new("url.full", full),
                KeyValue::new("server.address", uri.host().unwrap_or("").to_owned()),
                KeyValue::new("server.port", i64::from(port)),
            ])
            .start_with_context(&self.tracing.tracer, &self.cx);
        let cx = self
            .cx
            .with_remote_span_context(span.span_context().clone());
        headers.remove("traceparent");
        headers.remove("tracestate");
        self.tracing
            .propagator
            .inject_context(&cx, &mut opentelemetry_http::HeaderInjector(headers));
        UpstreamSpan(span)
    }

    /// Ends the SERVER span with the response status (5xx is an error; a
    /// 4xx refusal is not, per the conventions), the matched route and the
    /// policy decision.
    pub fn finish(
        self,
        status: http::StatusCode,
        route: Option<&str>,
        decision: Option<&'static str>,
    ) {
        let span = self.cx.span();
        span.set_attribute(KeyValue::new(
            "http.response.status_code",
            i64::from(status.as_u16()),
        ));
        if let Some(r) = route {
            span.set_attribute(KeyValue::new("http.route", r.to_owned()));
            span.update_name(format!("{} {r}", self.method));
        }
        if let Some(d) = decision {
            span.set_attribute(KeyValue::new("portcullis.decision", d));
        }
        if status.is_server_error() {
            span.set_attribute(KeyValue::new("error.type", status.as_u16().to_string()));
            span.set_status(Status::error(status.as_u16().to_string()));
        }
        span.end();
    }
}

impl UpstreamSpan {
    /// Ends the CLIENT span with the upstream's status, or an error type.
    pub fn end(mut self, outcome: Result<http::StatusCode, &'static str>) {
        match outcome {
            Ok(status) => {
                self.0.set_attribute(KeyValue::new(
                    "http.response.status_code",
                    i64::from(status.as_u16()),
                ));
                if status.is_client_error() || status.is_server_error() {
                    self.0
                        .set_attribute(KeyValue::new("error.type", status.as_u16().to_string()));
                    self.0
                        .set_status(Status::error(status.as_u16().to_string()));
                }
            }
            Err(kind) => {
                self.0.set_attribute(KeyValue::new("error.type", kind));
                self.0.set_status(Status::error(kind));
            }
        }
        self.0.end();
    }
}

/// The semconv method: a known method, or `_OTHER` plus the original.
fn semconv_method(m: &http::Method) -> (&'static str, Option<String>) {
    let known = match *m {
        http::Method::GET => "GET",
        http::Method::HEAD => "HEAD",
        http::Method::POST => "POST",
        http::Method::PUT => "PUT",
        http::Method::DELETE => "DELETE",
        http::Method::CONNECT => "CONNECT",
        http::Method::OPTIONS => "OPTIONS",
        http::Method::TRACE => "TRACE",
        http::Method::PATCH => "PATCH",
        _ => return ("_OTHER", Some(m.as_str().to_owned())),
    };
    (known, None)
}

fn protocol_version(v: http::Version) -> &'static str {
    match v {
        http::Version::HTTP_09 => "0.9",
        http::Version::HTTP_10 => "1.0",
        http::Version::HTTP_2 => "2",
        http::Version::HTTP_3 => "3",
        _ => "1.1",
    }
}

/// Host and port from `:authority` or `Host`.
fn authority<B>(req: &http::Request<B>) -> Option<(String, Option<u16>)> {
    if let Some(a) = req.uri().authority() {
        return Some((a.host().to_owned(), a.port_u16()));
    }
    let h = req.headers().get(http::header::HOST)?.to_str().ok()?;
    let a: http::uri::Authority = h.parse().ok()?;
    Some((a.host().to_owned(), a.port_u16()))
}
