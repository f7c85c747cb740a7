//! Upstreams for live-connection tests: a WebSocket echo server that records
//! the close frame each connection received, and a server-sent-events
//! server whose streams send an event per tick and that records which
//! connections the proxy dropped.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response};
use http_body_util::StreamBody;
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{
    Request as WsRequest, Response as WsResponse,
};

use super::DEADLINE;

/// `(path, close code)` per close frame received.
pub type Closes = Arc<Mutex<Vec<(String, Option<u16>)>>>;

/// A WebSocket echo server; `closes` holds `(path, close code)` for every
/// close frame a connection received (`None`: a close without a code).
pub struct RecordingWs {
    pub addr: SocketAddr,
    pub closes: Closes,
}

impl RecordingWs {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let closes: Closes = Arc::default();
        let c2 = closes.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let closes = c2.clone();
                tokio::spawn(async move {
                    let path = Arc::new(Mutex::new(String::new()));
                    let p2 = path.clone();
                    #[allow(clippy::result_large_err)] // tungstenite's callback signature
                    let cb = move |req: &WsRequest, resp: WsResponse| {
                        *p2.lock().unwrap() = req.uri().path().to_owned();
                        Ok(resp)
                    };
                    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(tcp, cb).await else {
                        return;
                    };
                    while let Some(Ok(msg)) = ws.next().await {
                        if let Message::Close(frame) = &msg {
                            let path = path.lock().unwrap().clone();
                            closes
                                .lock()
                                .unwrap()
                                .push((path, frame.as_ref().map(|f| u16::from(f.code))));
                            // Keep reading: tungstenite sends the close reply.
                        } else if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err()
                        {
                            break;
                        }
                    }
                });
            }
        });
        Self { addr, closes }
    }

    /// The close code the connection on `path` received, if any yet.
    pub fn close_for(&self, path: &str) -> Option<Option<u16>> {
        self.closes
            .lock()
            .unwrap()
            .iter()
            .find(|(p, _)| p == path)
            .map(|(_, c)| *c)
    }
}

/// An SSE upstream: `GET /stream/<name>` answers 200 and sends one event at
/// once and one more per [`EventStreams::tick`], never ending by itself.
/// `dropped` lists the names whose upstream connection was closed by the proxy.
pub struct EventStreams {
    pub addr: SocketAddr,
    pub dropped: Arc<Mutex<Vec<String>>>,
    ticks: watch::Sender<u64>,
}

impl EventStreams {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let dropped: Arc<Mutex<Vec<String>>> = Arc::default();
        let (ticks, rx) = watch::channel(0u64);
        let d2 = dropped.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let dropped = d2.clone();
                let rx = rx.clone();
                tokio::spawn(async move {
                    let name = Arc::new(Mutex::new(String::new()));
                    let n2 = name.clone();
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let rx = rx.clone();
                        let n = req.uri().path().trim_start_matches("/stream/").to_owned();
                        *n2.lock().unwrap() = n.clone();
                        async move {
                            let first = futures_util::stream::once(async move {
                                Ok::<_, Infallible>(Frame::data(Bytes::from(format!(
                                    "data: hello {n}\n\n"
                                ))))
                            });
                            let more = futures_util::stream::unfold(rx, |mut rx| async move {
                                rx.changed().await.ok()?;
                                let t = *rx.borrow_and_update();
                                Some((
                                    Ok::<_, Infallible>(Frame::data(Bytes::from(format!(
                                        "data: tick {t}\n\n"
                                    )))),
                                    rx,
                                ))
                            });
                            let mut r = Response::new(StreamBody::new(first.chain(more)));
                            r.headers_mut().insert(
                                "content-type",
                                http::HeaderValue::from_static("text/event-stream"),
                            );
                            Ok::<_, Infallible>(r)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                    let n = name.lock().unwrap().clone();
                    dropped.lock().unwrap().push(n);
                });
            }
        });
        Self {
            addr,
            dropped,
            ticks,
        }
    }

    /// Sends one more event on every open stream.
    pub fn tick(&self) {
        self.ticks.send_modify(|t| *t += 1);
    }

    pub fn was_dropped(&self, name: &str) -> bool {
        self.dropped.lock().unwrap().iter().any(|n| n == name)
    }
}

/// A WebSocket client through the proxy: TLS with ALPN http/1.1, a bearer token.
pub async fn ws_connect(
    proxy: SocketAddr,
    ca_pem: &str,
    path: &str,
    token: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let stream = super::tls_stream(proxy, ca_pem, &[b"http/1.1"]).await;
    let mut req = format!("wss://localhost:{}{path}", proxy.port())
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let (ws, resp) = tokio::time::timeout(DEADLINE, tokio_tungstenite::client_async(req, stream))
        .await
        .expect("websocket handshake timed out")
        .expect("websocket handshake failed");
    assert_eq!(resp.status(), http::StatusCode::SWITCHING_PROTOCOLS);
    ws
}
