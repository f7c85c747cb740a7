//! `[tracing]`: a real proxy exports its spans over OTLP/HTTP to a loopback
//! receiver, which decodes them with the OTLP protobuf types
//! (opentelemetry-proto). The test checks the span tree (a SERVER span, one
//! child per phase, a CLIENT span for the upstream), the HTTP semantic-
//! convention attributes, and that the upstream received a `traceparent` naming
//! the CLIENT span (a fresh trace: an inbound `traceparent` is not trusted by
//! default). Without `[tracing]` nothing is exported and nothing is injected.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use common::*;
use http::StatusCode;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::{Span, span::SpanKind};
use prost::Message;

const ISS: &str = "https://idp.test";

/// A loopback OTLP/HTTP receiver: every POST /v1/traces body, decoded.
struct Receiver {
    addr: SocketAddr,
    spans: Arc<Mutex<Vec<Span>>>,
    content_types: Arc<Mutex<Vec<String>>>,
}

impl Receiver {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let spans: Arc<Mutex<Vec<Span>>> = Arc::default();
        let content_types: Arc<Mutex<Vec<String>>> = Arc::default();
        let (s2, c2) = (spans.clone(), content_types.clone());
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (spans, cts) = (s2.clone(), c2.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let (spans, cts) = (spans.clone(), cts.clone());
                        async move {
                            assert_eq!(req.uri().path(), "/v1/traces");
                            let ct = req
                                .headers()
                                .get("content-type")
                                .map(|v| v.to_str().unwrap().to_owned())
                                .unwrap_or_default();
                            cts.lock().unwrap().push(ct);
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let export = ExportTraceServiceRequest::decode(body).unwrap();
                            for rs in export.resource_spans {
                                for ss in rs.scope_spans {
                                    spans.lock().unwrap().extend(ss.spans);
                                }
                            }
                            let mut r = http::Response::new(Full::new(Bytes::new()));
                            r.headers_mut().insert(
                                "content-type",
                                http::HeaderValue::from_static("application/x-protobuf"),
                            );
                            Ok::<_, Infallible>(r)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        Self {
            addr,
            spans,
            content_types,
        }
    }

    fn spans(&self) -> Vec<Span> {
        self.spans.lock().unwrap().clone()
    }
}

fn attrs(s: &Span) -> HashMap<String, AnyValue> {
    s.attributes
        .iter()
        .filter_map(|kv| {
            let v = kv.value.as_ref()?.value.clone()?;
            Some((kv.key.clone(), v))
        })
        .collect()
}

fn str_attr(s: &Span, k: &str) -> String {
    match attrs(s).get(k) {
        Some(AnyValue::StringValue(v)) => v.clone(),
        other => panic!("{}: attribute {k} is {other:?}", s.name),
    }
}

fn int_attr(s: &Span, k: &str) -> i64 {
    match attrs(s).get(k) {
        Some(AnyValue::IntValue(v)) => *v,
        other => panic!("{}: attribute {k} is {other:?}", s.name),
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

async fn start(tracing: &str) -> (TestPki, Upstream, portcullis::server::RunningServer, String) {
    let pki = TestPki::new();
    let upstream = Upstream::start().await;
    let key = pki.issuer_key("user-1");
    pki.policy_dir(
        "p.cedar",
        "@id(\"open\")\npermit (principal is User, action, resource);\n",
    );
    let routes = format!(
        "[[routes]]\nname = \"app\"\npath_prefix = \"/app\"\nupstream = \"{}\"\nauth = \"bearer\"\n",
        upstream.url()
    );
    let text = base_config(ISS, r#"jwks_file = "jwks.json""#, &routes).replace(
        "[log]",
        &format!("[policy]\ndir = \"policies\"\n\n{tracing}\n\n[log]"),
    );
    let cfg = pki.write_config("p.toml", &text);
    let server = portcullis::server::start(cfg).await.unwrap();
    let token = key.sign(&claims(ISS, "alice")).unwrap();
    (pki, upstream, server, token)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_an_otlp_receiver_and_the_upstream_gets_traceparent() {
    let rx = Receiver::start().await;
    let (pki, upstream, server, token) = start(&format!(
        "[tracing]\notlp_endpoint = \"http://{}/v1/traces\"\nsample_ratio = 1.0\nexport_interval_ms = 50\nservice_name = \"portcullis-test\"",
        rx.addr
    ))
    .await;
    let c = client(&pki.ca_pem, false);
    let url = format!(
        "https://localhost:{}/app/items?q=1",
        server.proxy_addr.port()
    );
    // An inbound traceparent from the internet: not trusted by default.
    let inbound = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let (st, _, _) = get(
        &c,
        &url,
        Some(&token),
        &[("traceparent", inbound), ("user-agent", "trace-test/1")],
    )
    .await;
    assert_eq!(st, StatusCode::OK);

    // The upstream saw a traceparent, not the client's.
    let seen = upstream.last();
    let tp = seen
        .headers
        .get("traceparent")
        .expect("the upstream got a traceparent")
        .to_str()
        .unwrap()
        .to_owned();
    assert_ne!(tp, inbound);
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts.len(), 4, "{tp}");
    assert_eq!(
        (parts[0], parts[3]),
        ("00", "01"),
        "version 00, sampled: {tp}"
    );

    wait_until("the request's spans", || {
        let spans = rx.spans();
        spans.iter().any(|s| s.kind == SpanKind::Server as i32)
            && spans.iter().any(|s| s.kind == SpanKind::Client as i32)
            && spans
                .iter()
                .filter(|s| s.kind == SpanKind::Internal as i32)
                .count()
                >= 5
    })
    .await;
    assert!(
        rx.content_types
            .lock()
            .unwrap()
            .iter()
            .all(|c| c == "application/x-protobuf")
    );
    let spans = rx.spans();
    let server_span = spans
        .iter()
        .find(|s| s.kind == SpanKind::Server as i32)
        .unwrap();
    let trace_id = server_span.trace_id.clone();
    assert_eq!(
        hex(&trace_id),
        parts[1],
        "traceparent carries the request's trace id"
    );
    assert_ne!(
        hex(&trace_id),
        "0af7651916cd43dd8448eb211c80319c",
        "a new trace, not the inbound one"
    );
    assert!(
        server_span.parent_span_id.is_empty(),
        "the SERVER span is the root"
    );

    // SERVER span: name and semantic-convention attributes.
    assert_eq!(server_span.name, "GET app");
    assert_eq!(str_attr(server_span, "http.request.method"), "GET");
    assert_eq!(str_attr(server_span, "url.path"), "/app/items");
    assert_eq!(str_attr(server_span, "url.scheme"), "https");
    assert_eq!(str_attr(server_span, "http.route"), "app");
    assert_eq!(int_attr(server_span, "http.response.status_code"), 200);
    assert_eq!(str_attr(server_span, "network.peer.address"), "127.0.0.1");
    assert_eq!(str_attr(server_span, "network.protocol.version"), "1.1");
    assert_eq!(str_attr(server_span, "server.address"), "localhost");
    assert_eq!(
        int_attr(server_span, "server.port"),
        i64::from(server.proxy_addr.port())
    );
    assert_eq!(str_attr(server_span, "user_agent.original"), "trace-test/1");
    assert_eq!(str_attr(server_span, "portcullis.decision"), "allow");
    assert!(
        !attrs(server_span).contains_key("url.query"),
        "no query in spans"
    );

    // One child per phase, under the SERVER span, in the same trace.
    let children: Vec<&Span> = spans
        .iter()
        .filter(|s| s.trace_id == trace_id && s.parent_span_id == server_span.span_id)
        .collect();
    let mut names: Vec<&str> = children
        .iter()
        .filter(|s| s.kind == SpanKind::Internal as i32)
        .map(|s| s.name.as_str())
        .collect();
    names.sort_unstable();
    assert_eq!(
        names,
        ["authenticate", "bind", "decide", "resolve", "route"]
    );
    for c in &children {
        assert!(
            c.start_time_unix_nano >= server_span.start_time_unix_nano,
            "{}",
            c.name
        );
        assert!(
            c.end_time_unix_nano <= server_span.end_time_unix_nano,
            "{}",
            c.name
        );
    }

    // CLIENT span for the upstream: its id is the traceparent's parent id.
    let client_span = children
        .iter()
        .find(|s| s.kind == SpanKind::Client as i32)
        .expect("a CLIENT span under the SERVER span");
    assert_eq!(hex(&client_span.span_id), parts[2]);
    assert_eq!(client_span.name, "GET");
    assert_eq!(str_attr(client_span, "http.request.method"), "GET");
    assert_eq!(str_attr(client_span, "server.address"), "127.0.0.1");
    assert_eq!(
        int_attr(client_span, "server.port"),
        i64::from(upstream.addr.port())
    );
    assert_eq!(
        str_attr(client_span, "url.full"),
        format!("{}/app/items", upstream.url())
    );
    assert_eq!(int_attr(client_span, "http.response.status_code"), 200);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_tracing_nothing_is_injected() {
    let (pki, upstream, server, token) = start("").await;
    let c = client(&pki.ca_pem, false);
    let url = format!("https://localhost:{}/app/x", server.proxy_addr.port());
    let (st, _, _) = get(&c, &url, Some(&token), &[]).await;
    assert_eq!(st, StatusCode::OK);
    assert!(upstream.last().headers.get("traceparent").is_none());
    server.shutdown().await;
}

#[tokio::test]
async fn sampling_zero_exports_nothing_but_still_propagates() {
    let rx = Receiver::start().await;
    let (pki, upstream, server, token) = start(&format!(
        "[tracing]\notlp_endpoint = \"http://{}/v1/traces\"\nsample_ratio = 0.0\nexport_interval_ms = 50",
        rx.addr
    ))
    .await;
    let c = client(&pki.ca_pem, false);
    let url = format!("https://localhost:{}/app/x", server.proxy_addr.port());
    let (st, _, _) = get(&c, &url, Some(&token), &[]).await;
    assert_eq!(st, StatusCode::OK);
    let tp = upstream
        .last()
        .headers
        .get("traceparent")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    assert!(tp.ends_with("-00"), "not sampled: {tp}");
    server.shutdown().await;
    assert!(rx.spans().is_empty());
}
