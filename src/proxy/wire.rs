//! The upstream HTTP/1.1 exchange for the common request, without hyper's
//! client dispatch.
//!
//! Most proxied requests are a `GET` or `HEAD` with no body. For those, the
//! pool ([`super::client`]) writes the request head itself and reads the
//! answer here, in the request's own task, on a connection it owns outright:
//! no connection task, no channel to it and back, and a small answer whose
//! body is already in the read buffer goes back to the pool before the
//! response is even returned. Under load hyper's client connection task was
//! about a quarter of a request's instructions (callgrind, stop 32); every
//! other request (a body, an upgrade, another method) stays on hyper.
//!
//! The reading follows hyper's client rules (RFC 9112 §6.3), with its
//! limits: `httparse` parses the head (hyper's own parser, same strict
//! defaults), 1xx answers other than 101 are skipped, a `HEAD` answer and
//! 1xx, 204 and 304 have no body, `Transfer-Encoding` wins over
//! `Content-Length` (which is then dropped and the connection not reused),
//! every `Content-Length` must agree, a non-chunked transfer coding or no
//! framing at all reads to the close. A connection is reused only when the
//! answer was read exactly to its end with nothing after it, on HTTP/1.1
//! without `Connection: close` (or HTTP/1.0 with `keep-alive`).

use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Version};
use hyper::body::{Frame, SizeHint};
use smallvec::SmallVec;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::headers::connection_has;

/// Header lines an answer (or its trailers) may have: hyper's default.
pub const MAX_HEADERS: usize = 100;
/// Bytes an answer's head may take, 1xx heads included: hyper's default
/// read-buffer limit.
pub const MAX_HEAD_BYTES: usize = 8192 + 4096 * 100;
/// Bytes of one chunk-size line (with its extensions) or of the trailers,
/// and of all of one body's chunk extensions together (hyper's limits).
const MAX_CHUNK_META: usize = 16 * 1024;
/// Informational (1xx) answers skipped before the final one.
const MAX_INFORMATIONAL: usize = 16;
/// Bytes asked of the socket per read.
const READ_SIZE: usize = 16 * 1024;

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The connection failed before any byte of an answer came back: on a
    /// reused connection the upstream had closed it while idle, and the
    /// request (idempotent, no body) may be sent again on a new one.
    #[error("upstream connection closed before answering: {0}")]
    Unanswered(#[source] io::Error),
    /// Reading or writing failed after the answer had begun.
    #[error("upstream connection: {0}")]
    Io(#[source] io::Error),
    /// The answer broke HTTP/1.1's syntax or framing rules.
    #[error("malformed upstream answer: {0}")]
    Malformed(&'static str),
}

/// One upstream connection this module drives, with its read buffer (empty
/// between exchanges) and the buffer its request heads are written from.
pub struct Conn<IO> {
    io: IO,
    buf: BytesMut,
    out: Vec<u8>,
}

impl<IO> std::fmt::Debug for Conn<IO> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("buffered", &self.buf.len())
            .finish_non_exhaustive()
    }
}

/// A final answer's head, and how its body is framed.
#[derive(Debug)]
pub struct Head {
    /// Status (never 1xx).
    pub status: StatusCode,
    /// HTTP/1.1 or HTTP/1.0.
    pub version: Version,
    /// The header lines as sent (a `Content-Length` beside a
    /// `Transfer-Encoding` dropped).
    pub headers: HeaderMap,
    /// A reason phrase other than the status's canonical one.
    pub reason: Option<hyper::ext::ReasonPhrase>,
    framing: Framing,
    keep_alive: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(u64),
    Chunked,
    Close,
}

impl<IO: AsyncRead + AsyncWrite + Unpin> Conn<IO> {
    /// A connection over `io`, fresh or handed over with nothing buffered.
    pub fn new(io: IO) -> Self {
        Self {
            io,
            buf: BytesMut::new(),
            out: Vec::new(),
        }
    }

    /// Sends a request head (no body) and reads the final answer's head.
    /// `target` is the origin-form request target; `headers` go as they
    /// are (a header value never holds CR or LF), then `set`, the lines
    /// the proxy adds (names `headers` does not hold).
    pub async fn exchange(
        &mut self,
        method: &Method,
        target: &str,
        headers: &HeaderMap,
        set: &[(&HeaderName, HeaderValue)],
    ) -> Result<Head, WireError> {
        encode_head(&mut self.out, method, target, headers, set);
        let written = async {
            self.io.write_all(&self.out).await?;
            self.io.flush().await
        }
        .await;
        written.map_err(WireError::Unanswered)?;
        let head_request = *method == Method::HEAD;
        let mut informational = 0;
        let mut answered = false;
        loop {
            if !self.buf.is_empty() {
                answered = true;
                if let Some(head) = parse_head(&mut self.buf, head_request, &mut informational)? {
                    return Ok(head);
                }
                if self.buf.len() > MAX_HEAD_BYTES {
                    return Err(WireError::Malformed("answer head too large"));
                }
            }
            self.buf.reserve(READ_SIZE);
            match self.io.read_buf(&mut self.buf).await {
                Ok(0) if !answered => {
                    return Err(WireError::Unanswered(io::ErrorKind::UnexpectedEof.into()));
                }
                Ok(0) => return Err(WireError::Malformed("connection closed within the head")),
                Ok(_) => {}
                Err(e) if !answered => return Err(WireError::Unanswered(e)),
                Err(e) => return Err(WireError::Io(e)),
            }
        }
    }

    /// The body of the answer whose head `exchange` just read, and the
    /// connection back at once when the body is already whole in the
    /// buffer (or there is none) and the connection may be reused.
    pub fn body(mut self, head: &Head) -> (WireBody<IO>, Option<Self>) {
        let state = match head.framing {
            Framing::Empty => State::Done,
            Framing::Length(n) => match usize::try_from(n) {
                Ok(n) if n <= self.buf.len() => {
                    State::Buffered(Some(self.buf.split_to(n).freeze()))
                }
                _ => State::Length(n),
            },
            Framing::Chunked => State::Chunked(Chunk::Size),
            Framing::Close => State::Close,
        };
        let mut body = WireBody {
            conn: None,
            state,
            keep_alive: head.keep_alive,
            extensions: 0,
        };
        match body.state {
            State::Done | State::Buffered(_) => {
                // Bytes after a whole answer: the upstream is out of step.
                let back = (body.keep_alive && self.buf.is_empty()).then_some(self);
                (body, back)
            }
            _ => {
                body.conn = Some(self);
                (body, None)
            }
        }
    }

    /// Whether the upstream has closed the idle connection (or sent
    /// something unasked): a read that does not wait. On a socket it asks
    /// the runtime's readiness flag first (cleared by the last short
    /// read), so a quiet connection costs no syscall.
    pub fn is_closed(&mut self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut probe = [0u8; 1];
        let mut rb = tokio::io::ReadBuf::new(&mut probe);
        // Outside the task's budget: a task that has spent it gets
        // `Pending` from every read, whatever the socket holds, and a
        // connection that talked would pass for quiet.
        let read = std::future::poll_fn(|cx| Pin::new(&mut self.io).poll_read(cx, &mut rb));
        let mut read = std::pin::pin!(tokio::task::coop::unconstrained(read));
        !matches!(read.as_mut().poll(&mut cx), Poll::Pending)
    }
}

/// Writes `method target HTTP/1.1`, the headers, the set lines and the
/// blank line.
fn encode_head(
    out: &mut Vec<u8>,
    method: &Method,
    target: &str,
    headers: &HeaderMap,
    set: &[(&HeaderName, HeaderValue)],
) {
    out.clear();
    out.reserve(32 + target.len() + (headers.len() + set.len()) * 48);
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in headers.iter().chain(set.iter().map(|(n, v)| (*n, v))) {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Parses the answer heads at the front of `buf`, taking 1xx ones off it
/// (counted in `informational`): the final head, or `Ok(None)` when more
/// bytes are needed.
fn parse_head(
    buf: &mut BytesMut,
    head_request: bool,
    informational: &mut usize,
) -> Result<Option<Head>, WireError> {
    loop {
        let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        // Offsets of each line's name and value in `buf`: the lines are
        // copied out after `buf` is split, when `res` no longer borrows it.
        // Inline room for every line httparse may fill, none of it zeroed
        // (an array of 100 was 1.6 KB written a request, ~23 cache lines).
        let mut spans: SmallVec<[(u32, u32, u32, u32); MAX_HEADERS]> = SmallVec::new();
        let mut res = httparse::Response::new(&mut []);
        let parsed = httparse::ParserConfig::default()
            .parse_response_with_uninit_headers(&mut res, buf, &mut slots);
        let len = match parsed {
            // However it arrived (one read may bring it all), a head over
            // the bound is refused, as one still growing past it is.
            Ok(httparse::Status::Complete(len)) if len > MAX_HEAD_BYTES => {
                return Err(WireError::Malformed("answer head too large"));
            }
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(WireError::Malformed("too many header lines"));
            }
            Err(_) => return Err(WireError::Malformed("invalid head")),
        };
        let code = res.code.unwrap_or(0);
        let status =
            StatusCode::from_u16(code).map_err(|_| WireError::Malformed("invalid status"))?;
        let version = if res.version == Some(1) {
            Version::HTTP_11
        } else {
            Version::HTTP_10
        };
        let reason = res
            .reason
            .filter(|r| Some(*r) != status.canonical_reason())
            .map(|r| Bytes::copy_from_slice(r.as_bytes()));
        let base = buf.as_ptr().addr();
        for h in res.headers.iter() {
            let at = |s: &[u8]| u32::try_from(s.as_ptr().addr() - base).unwrap_or(u32::MAX);
            let (n, v) = (h.name.as_bytes(), h.value);
            spans.push((at(n), at(n) + n.len() as u32, at(v), at(v) + v.len() as u32));
        }
        let head = buf.split_to(len).freeze();
        if status.is_informational() {
            if status == StatusCode::SWITCHING_PROTOCOLS {
                return Err(WireError::Malformed(
                    "101 to a request that asked no upgrade",
                ));
            }
            *informational += 1;
            if *informational > MAX_INFORMATIONAL {
                return Err(WireError::Malformed("too many informational answers"));
            }
            if buf.is_empty() {
                return Ok(None);
            }
            continue;
        }
        let mut headers = HeaderMap::with_capacity(spans.len());
        for &(n0, n1, v0, v1) in &spans {
            let name = head
                .get(n0 as usize..n1 as usize)
                .and_then(|n| HeaderName::from_bytes(n).ok())
                .ok_or(WireError::Malformed("invalid header name"))?;
            let value = HeaderValue::from_maybe_shared(head.slice(v0 as usize..v1 as usize))
                .map_err(|_| WireError::Malformed("invalid header value"))?;
            headers.append(name, value);
        }
        let reason = reason
            .map(hyper::ext::ReasonPhrase::try_from)
            .transpose()
            .map_err(|_| WireError::Malformed("invalid reason phrase"))?;
        return finish_head(status, version, headers, reason, head_request).map(Some);
    }
}

/// The body's framing and whether the connection may be reused.
fn finish_head(
    status: StatusCode,
    version: Version,
    mut headers: HeaderMap,
    reason: Option<hyper::ext::ReasonPhrase>,
    head_request: bool,
) -> Result<Head, WireError> {
    let mut keep_alive = !connection_has(&headers, "close")
        && (version == Version::HTTP_11 || connection_has(&headers, "keep-alive"));
    let coded = headers.contains_key(header::TRANSFER_ENCODING);
    // A coding list is tokens: one with other bytes is no framing anyone
    // agrees on (hyper would read it as "not chunked").
    if coded
        && headers
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .any(|v| v.to_str().is_err())
    {
        return Err(WireError::Malformed("invalid transfer-encoding"));
    }
    // Two framings, even on an answer without a body: the coding wins, the
    // length goes, and the connection is not trusted again.
    if coded && headers.remove(header::CONTENT_LENGTH).is_some() {
        keep_alive = false;
    }
    let framing =
        if head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
            Framing::Empty
        } else if coded {
            if version == Version::HTTP_10 {
                return Err(WireError::Malformed("transfer-encoding on HTTP/1.0"));
            }
            if chunked_is_last(&headers) {
                Framing::Chunked
            } else {
                Framing::Close
            }
        } else {
            match content_length(&headers) {
                Length::Absent => Framing::Close,
                Length::Invalid => return Err(WireError::Malformed("invalid content-length")),
                Length::Is(0) => Framing::Empty,
                Length::Is(n) => Framing::Length(n),
            }
        };
    if framing == Framing::Close {
        keep_alive = false;
    }
    Ok(Head {
        status,
        version,
        headers,
        reason,
        framing,
        keep_alive,
    })
}

/// Whether `chunked` is the last transfer coding (of the last line).
fn chunked_is_last(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .next_back()
        .and_then(|v| v.as_bytes().rsplit(|b| *b == b',').next())
        .is_some_and(|t| t.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

/// What the `Content-Length` lines say.
enum Length {
    /// There is none.
    Absent,
    /// Not one length every line and list item agrees on.
    Invalid,
    /// The one length they all give.
    Is(u64),
}

/// The one length every `Content-Length` line (and list item) agrees on
/// (one lookup: the answer's lines are read once).
fn content_length(headers: &HeaderMap) -> Length {
    let mut found = None;
    for v in headers.get_all(header::CONTENT_LENGTH) {
        for item in v.as_bytes().split(|b| *b == b',') {
            let digits = item.trim_ascii();
            if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
                return Length::Invalid;
            }
            let Some(n) = digits.iter().try_fold(0u64, |n, d| {
                n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
            }) else {
                return Length::Invalid;
            };
            // hyper keeps the top two values for itself and refuses them.
            if n > u64::MAX - 2 || found.is_some_and(|f| f != n) {
                return Length::Invalid;
            }
            found = Some(n);
        }
    }
    found.map_or(Length::Absent, Length::Is)
}

/// An answer's body, read from its connection as it is polled.
pub struct WireBody<IO> {
    /// The connection, while the body is being read from it; back to the
    /// caller through [`WireBody::take_idle`] once read exactly to its end.
    conn: Option<Conn<IO>>,
    state: State,
    keep_alive: bool,
    /// Chunk-extension bytes read so far in this body.
    extensions: usize,
}

enum State {
    Buffered(Option<Bytes>),
    Length(u64),
    Chunked(Chunk),
    Close,
    Done,
    /// Read to its end, connection reusable (taken by `take_idle`).
    Idle,
}

#[derive(Clone, Copy)]
enum Chunk {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
}

impl<IO> WireBody<IO> {
    /// The connection, once the body was read exactly to its end and the
    /// connection may carry another request.
    pub fn take_idle(&mut self) -> Option<Conn<IO>> {
        if matches!(self.state, State::Idle) {
            self.state = State::Done;
            return self.conn.take();
        }
        None
    }

    /// Whether nothing more will come.
    pub fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done | State::Idle)
    }

    /// The exact length, when framed by one.
    pub fn size_hint(&self) -> SizeHint {
        match &self.state {
            State::Done | State::Idle => SizeHint::with_exact(0),
            State::Buffered(Some(b)) => SizeHint::with_exact(b.len() as u64),
            State::Length(n) => SizeHint::with_exact(*n),
            _ => SizeHint::default(),
        }
    }

    /// The end of a framed body: the connection stays for reuse only when
    /// nothing follows the body.
    fn ended(&mut self) {
        let clean = self.keep_alive && self.conn.as_ref().is_some_and(|c| c.buf.is_empty());
        if clean {
            self.state = State::Idle;
        } else {
            self.state = State::Done;
            self.conn = None;
        }
    }

    fn fail(&mut self, e: WireError) -> Poll<Option<Result<Frame<Bytes>, WireError>>> {
        self.state = State::Done;
        self.conn = None;
        Poll::Ready(Some(Err(e)))
    }
}

impl<IO: AsyncRead + Unpin> WireBody<IO> {
    /// Reads more into the buffer: `Ready(Ok(false))` at the end of input.
    fn fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        let Some(conn) = self.conn.as_mut() else {
            return Poll::Ready(Ok(false));
        };
        conn.buf.reserve(READ_SIZE);
        match tokio_util::io::poll_read_buf(Pin::new(&mut conn.io), cx, &mut conn.buf) {
            Poll::Ready(Ok(n)) => Poll::Ready(Ok(n > 0)),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }

    fn buffered(&self) -> usize {
        self.conn.as_ref().map_or(0, |c| c.buf.len())
    }

    /// Up to `max` buffered bytes, off the front.
    fn take(&mut self, max: u64) -> Bytes {
        let Some(conn) = self.conn.as_mut() else {
            return Bytes::new();
        };
        let n = usize::try_from(max)
            .unwrap_or(usize::MAX)
            .min(conn.buf.len());
        conn.buf.split_to(n).freeze()
    }

    /// Polls the next frame: data, then the trailers of a chunked body.
    pub fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, WireError>>> {
        loop {
            match self.state {
                State::Done | State::Idle => return Poll::Ready(None),
                State::Buffered(ref mut b) => {
                    let data = b.take();
                    self.state = State::Done;
                    if let Some(data) = data.filter(|d| !d.is_empty()) {
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                State::Length(left) | State::Chunked(Chunk::Data(left)) => {
                    if self.buffered() == 0 {
                        match self.fill(cx) {
                            Poll::Pending => return Poll::Pending,
                            Poll::Ready(Ok(true)) => {}
                            Poll::Ready(Ok(false)) => {
                                return self.fail(WireError::Malformed(
                                    "connection closed within the body",
                                ));
                            }
                            Poll::Ready(Err(e)) => return self.fail(WireError::Io(e)),
                        }
                    }
                    let data = self.take(left);
                    let left = left - data.len() as u64;
                    let length = matches!(self.state, State::Length(_));
                    match (length, left) {
                        (true, 0) => self.ended(),
                        (true, _) => self.state = State::Length(left),
                        (false, 0) => self.state = State::Chunked(Chunk::DataEnd),
                        (false, _) => self.state = State::Chunked(Chunk::Data(left)),
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                State::Close => {
                    if self.buffered() > 0 {
                        return Poll::Ready(Some(Ok(Frame::data(self.take(u64::MAX)))));
                    }
                    match self.fill(cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Ok(true)) => {}
                        Poll::Ready(Ok(false)) => {
                            self.state = State::Done;
                            self.conn = None;
                        }
                        Poll::Ready(Err(e)) => return self.fail(WireError::Io(e)),
                    }
                }
                State::Chunked(step) => {
                    let buf = self.conn.as_ref().map(|c| &c.buf[..]).unwrap_or_default();
                    let parsed = match step {
                        // No line end yet: nothing to parse (parsing a
                        // trickled line again from its start at every
                        // read would cost its length squared).
                        Chunk::Size if !buf.contains(&b'\n') => Ok(None),
                        Chunk::Size => match chunk_size(buf) {
                            Ok(Some((n, ext, next))) => {
                                self.extensions += ext;
                                if self.extensions > MAX_CHUNK_META {
                                    Err(WireError::Malformed("chunk extensions too long"))
                                } else {
                                    Ok(Some((n, next)))
                                }
                            }
                            Ok(None) => Ok(None),
                            Err(e) => Err(e),
                        },
                        Chunk::DataEnd => match buf.get(..2) {
                            Some(b"\r\n") => Ok(Some((2, Chunk::Size))),
                            Some(_) => Err(WireError::Malformed("chunk not followed by CRLF")),
                            None if buf.first().is_some_and(|b| *b != b'\r') => {
                                Err(WireError::Malformed("chunk not followed by CRLF"))
                            }
                            None => Ok(None),
                        },
                        Chunk::Trailers => match trailers(buf) {
                            Ok(Some((n, map))) => {
                                if let Some(c) = self.conn.as_mut() {
                                    c.buf.advance(n);
                                }
                                self.ended();
                                if map.is_empty() {
                                    return Poll::Ready(None);
                                }
                                return Poll::Ready(Some(Ok(Frame::trailers(map))));
                            }
                            Ok(None) => Ok(None),
                            Err(e) => Err(e),
                        },
                        Chunk::Data(_) => Ok(None),
                    };
                    match parsed {
                        Err(e) => return self.fail(e),
                        Ok(Some((n, next))) => {
                            if let Some(c) = self.conn.as_mut() {
                                c.buf.advance(n);
                            }
                            self.state = State::Chunked(next);
                        }
                        Ok(None) => {
                            if self.buffered() > MAX_CHUNK_META {
                                return self.fail(WireError::Malformed("chunk metadata too long"));
                            }
                            match self.fill(cx) {
                                Poll::Pending => return Poll::Pending,
                                Poll::Ready(Ok(true)) => {}
                                Poll::Ready(Ok(false)) => {
                                    return self.fail(WireError::Malformed(
                                        "connection closed within the body",
                                    ));
                                }
                                Poll::Ready(Err(e)) => return self.fail(WireError::Io(e)),
                            }
                        }
                    }
                }
            }
        }
    }
}

/// A chunk-size line at the front of `buf`: its length, its extension
/// bytes (the line past the digits) and what follows (the chunk's data, or
/// the trailers after the last chunk). Stricter than
/// `httparse` alone: at least one hex digit, no control byte in an
/// extension.
fn chunk_size(buf: &[u8]) -> Result<Option<(usize, usize, Chunk)>, WireError> {
    let bad = || WireError::Malformed("invalid chunk size");
    match buf.first() {
        None => return Ok(None),
        Some(b) if !b.is_ascii_hexdigit() => return Err(bad()),
        Some(_) => {}
    }
    match httparse::parse_chunk_size(buf) {
        Ok(httparse::Status::Complete((n, size))) => {
            let line = buf.get(..n.saturating_sub(2)).unwrap_or_default();
            if line.iter().any(|b| b.is_ascii_control() && *b != b'\t') {
                return Err(bad());
            }
            let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
            Ok(Some((
                n,
                line.len() - digits,
                if size == 0 {
                    Chunk::Trailers
                } else {
                    Chunk::Data(size)
                },
            )))
        }
        Ok(httparse::Status::Partial) => Ok(None),
        Err(_) => Err(bad()),
    }
}

/// The trailer section at the front of `buf` (possibly empty: just CRLF).
fn trailers(buf: &[u8]) -> Result<Option<(usize, HeaderMap)>, WireError> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    match httparse::parse_headers(buf, &mut slots) {
        Ok(httparse::Status::Complete((n, lines))) => {
            // `httparse` takes a bare LF for a line's end; a trailer line
            // ends in CRLF (RFC 9112 §7.1.2), as hyper's decoder requires.
            let section = buf.get(..n).unwrap_or_default();
            if section
                .iter()
                .enumerate()
                .any(|(i, b)| *b == b'\n' && (i == 0 || section.get(i - 1) != Some(&b'\r')))
            {
                return Err(WireError::Malformed("trailer line not ended by CRLF"));
            }
            let mut map = HeaderMap::with_capacity(lines.len());
            for h in lines {
                let name = HeaderName::from_bytes(h.name.as_bytes())
                    .map_err(|_| WireError::Malformed("invalid trailer name"))?;
                let value = HeaderValue::from_bytes(h.value)
                    .map_err(|_| WireError::Malformed("invalid trailer value"))?;
                map.append(name, value);
            }
            Ok(Some((n, map)))
        }
        Ok(httparse::Status::Partial) => Ok(None),
        Err(_) => Err(WireError::Malformed("invalid trailers")),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Runs one exchange of a GET (or `method`) against `answer` written
    /// by the far end of an in-memory pipe; returns the head, the body's
    /// frames (data joined, trailers apart) and whether the connection
    /// came back for reuse.
    async fn run(
        method: Method,
        answer: &[u8],
    ) -> Result<(Head, Result<(Vec<u8>, Option<HeaderMap>), WireError>, bool), WireError> {
        let (near, mut far) = tokio::io::duplex(1 << 20);
        // The far end answers at once (the pipe holds it), then reads the
        // request and hangs up, so an answer framed by the close ends and
        // an empty answer is a silent close.
        let answer = answer.to_vec();
        let upstream = tokio::spawn(async move {
            far.write_all(&answer).await?;
            let mut seen = Vec::new();
            while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                if far.read_buf(&mut seen).await? == 0 {
                    break;
                }
            }
            Ok::<_, io::Error>(())
        });
        let mut conn = Conn::new(near);
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("up"));
        let head = conn.exchange(&method, "/p?q=1", &headers, &[]).await;
        upstream
            .await
            .map_err(|e| WireError::Io(io::Error::other(e)))?
            .map_err(WireError::Io)?;
        let head = head?;
        let (mut body, mut back) = conn.body(&head);
        let mut data = Vec::new();
        let mut trailers = None;
        let out = loop {
            match std::future::poll_fn(|cx| body.poll_frame(cx)).await {
                None => break Ok((data, trailers)),
                Some(Err(e)) => break Err(e),
                Some(Ok(f)) => match f.into_data() {
                    Ok(d) => data.extend_from_slice(&d),
                    Err(f) => trailers = f.into_trailers().ok(),
                },
            }
        };
        if back.is_none() {
            back = body.take_idle();
        }
        Ok((head, out, back.is_some()))
    }

    async fn get(answer: &str) -> Result<(Head, Vec<u8>, bool), WireError> {
        let (head, body, reused) = run(Method::GET, answer.as_bytes()).await?;
        Ok((head, body?.0, reused))
    }

    #[test]
    fn the_request_head_is_the_request_line_the_headers_and_a_blank_line() {
        let mut out = Vec::new();
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("up:8080"));
        h.append("x-a", HeaderValue::from_static("1"));
        h.append("x-a", HeaderValue::from_static("2"));
        encode_head(&mut out, &Method::GET, "/a?b=c", &h, &[]);
        assert_eq!(
            out,
            b"GET /a?b=c HTTP/1.1\r\nhost: up:8080\r\nx-a: 1\r\nx-a: 2\r\n\r\n"
        );
    }

    #[test]
    fn the_set_lines_follow_the_request_headers_in_their_order() {
        let mut out = Vec::new();
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("up"));
        let (s, d) = (
            HeaderName::from_static("x-s"),
            HeaderName::from_static("x-d"),
        );
        let set = [
            (&s, HeaderValue::from_static("alice")),
            (&d, HeaderValue::from_static("dev-1")),
        ];
        encode_head(&mut out, &Method::HEAD, "/", &h, &set);
        assert_eq!(
            out,
            b"HEAD / HTTP/1.1\r\nhost: up\r\nx-s: alice\r\nx-d: dev-1\r\n\r\n"
        );
    }

    #[tokio::test]
    async fn a_length_framed_answer_in_one_read_gives_its_connection_back_at_once() {
        let (head, body, reused) =
            get("HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-up: 1\r\n\r\nhello")
                .await
                .unwrap();
        assert_eq!(head.status, StatusCode::OK);
        assert_eq!(head.headers["x-up"], "1");
        assert!(head.reason.is_none());
        assert_eq!(body, b"hello");
        assert!(reused);
    }

    #[tokio::test]
    async fn bytes_after_the_body_keep_the_connection_out_of_the_pool() {
        let (_, body, reused) = get("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhijunk")
            .await
            .unwrap();
        assert_eq!(body, b"hi");
        assert!(!reused);
    }

    #[tokio::test]
    async fn chunked_bodies_are_decoded_with_extensions_and_trailers() {
        let (head, body, reused) = run(
            Method::GET,
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n1\r\n!\r\n0\r\nx-sum: 7\r\n\r\n",
        )
        .await
        .unwrap();
        let (data, trailers) = body.unwrap();
        assert_eq!(data, b"hello!");
        assert_eq!(trailers.unwrap()["x-sum"], "7");
        assert!(head.headers.contains_key(header::TRANSFER_ENCODING));
        assert!(reused);
    }

    #[tokio::test]
    async fn malformed_chunks_fail_the_body_and_drop_the_connection() {
        for bad in [
            "\r\nhello\r\n0\r\n\r\n",         // no digits
            "5\r\nhelloXX0\r\n\r\n",          // no CRLF after the data
            "g\r\n",                          // not hex
            "5;a\x01b\r\nhello\r\n0\r\n\r\n", // control byte in an extension
            "11111111111111111\r\n",          // 17 hex digits
        ] {
            let answer = format!("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n{bad}");
            let (_, body, reused) = run(Method::GET, answer.as_bytes()).await.unwrap();
            assert!(body.is_err(), "{bad:?} was accepted");
            assert!(!reused);
        }
    }

    #[tokio::test]
    async fn chunk_extensions_are_bounded_per_body_not_only_per_line() {
        let ext = "e".repeat(6000);
        let mut answer = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_string();
        for _ in 0..3 {
            answer.push_str(&format!("1;{ext}\r\nx\r\n"));
        }
        answer.push_str("0\r\n\r\n");
        let (_, body, reused) = run(Method::GET, answer.as_bytes()).await.unwrap();
        assert!(body.is_err(), "18 KB of extensions accepted");
        assert!(!reused);
        // Many chunks with small extensions are fine.
        let mut answer = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_string();
        for _ in 0..500 {
            answer.push_str("1;a=b\r\nx\r\n");
        }
        answer.push_str("0\r\n\r\n");
        let (_, body, reused) = run(Method::GET, answer.as_bytes()).await.unwrap();
        assert_eq!(body.unwrap().0, vec![b'x'; 500]);
        assert!(reused);
    }

    #[tokio::test]
    async fn transfer_encoding_wins_over_content_length_and_the_connection_is_not_reused() {
        let (head, body, reused) = get(
            "HTTP/1.1 200 OK\r\ncontent-length: 99\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        )
        .await
        .unwrap();
        assert_eq!(body, b"ok");
        assert!(!head.headers.contains_key(header::CONTENT_LENGTH));
        assert!(!reused);
    }

    #[tokio::test]
    async fn no_framing_reads_to_the_close() {
        let (_, body, reused) = get("HTTP/1.1 200 OK\r\n\r\nuntil the end").await.unwrap();
        assert_eq!(body, b"until the end");
        assert!(!reused);
        let (_, body, reused) = get("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\nzz")
            .await
            .unwrap();
        assert_eq!(body, b"zz");
        assert!(!reused);
    }

    #[tokio::test]
    async fn informational_answers_are_skipped_and_101_is_refused() {
        let (head, body, reused) = get(
            "HTTP/1.1 103 Early Hints\r\nlink: </a>; rel=preload\r\n\r\nHTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nx",
        )
        .await
        .unwrap();
        assert_eq!(head.status, StatusCode::OK);
        assert!(!head.headers.contains_key("link"));
        assert_eq!(body, b"x");
        assert!(reused);
        let e = get("HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n\r\n").await;
        assert!(matches!(e, Err(WireError::Malformed(_))));
        let many = "HTTP/1.1 100 Continue\r\n\r\n".repeat(MAX_INFORMATIONAL + 1);
        let e = get(&format!(
            "{many}HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
        ))
        .await;
        assert!(matches!(e, Err(WireError::Malformed(_))));
    }

    #[tokio::test]
    async fn head_204_and_304_answers_have_no_body_whatever_they_declare() {
        let (head, body, reused) = run(
            Method::HEAD,
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n",
        )
        .await
        .unwrap();
        assert_eq!(head.headers[header::CONTENT_LENGTH], "5");
        assert!(body.unwrap().0.is_empty());
        assert!(reused);
        for answer in [
            "HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n",
            "HTTP/1.1 304 Not Modified\r\netag: \"a\"\r\n\r\n",
        ] {
            let (_, body, reused) = get(answer).await.unwrap();
            assert!(body.is_empty());
            assert!(reused);
        }
    }

    #[tokio::test]
    async fn content_length_must_be_one_agreed_number() {
        let (_, body, _) = get("HTTP/1.1 200 OK\r\ncontent-length: 2, 2\r\n\r\nok")
            .await
            .unwrap();
        assert_eq!(body, b"ok");
        for bad in [
            "content-length: 5\r\ncontent-length: 6",
            "content-length: 5, 6",
            "content-length: +5",
            "content-length: -1",
            "content-length: 0x5",
            "content-length: ",
            "content-length: 99999999999999999999999",
        ] {
            let e = get(&format!("HTTP/1.1 200 OK\r\n{bad}\r\n\r\nhello!")).await;
            assert!(matches!(e, Err(WireError::Malformed(_))), "{bad} accepted");
        }
    }

    #[tokio::test]
    async fn malformed_and_oversized_heads_are_refused() {
        for bad in [
            "HTTP/1.1 2x0 OK\r\n\r\n",
            "HTTP/2 200 OK\r\n\r\n",
            "HTTP/1.1 200 OK\r\nbad header\r\n\r\n",
            "HTTP/1.1 200 OK\r\nx: a\r\n b\r\n\r\n",
            "HTTP/1.1 200 OK\r\nx : a\r\n\r\n",
            "HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
        ] {
            let e = get(bad).await;
            assert!(
                matches!(e, Err(WireError::Malformed(_))),
                "{bad:?} accepted"
            );
        }
        for n in [u64::MAX, u64::MAX - 1] {
            let e = get(&format!("HTTP/1.1 200 OK\r\ncontent-length: {n}\r\n\r\n")).await;
            assert!(matches!(e, Err(WireError::Malformed(_))), "{n} accepted");
        }
        let many: String = (0..=MAX_HEADERS).map(|i| format!("x-{i}: v\r\n")).collect();
        let e = get(&format!("HTTP/1.1 200 OK\r\n{many}\r\n")).await;
        assert!(matches!(e, Err(WireError::Malformed(_))));
        let big = "a".repeat(MAX_HEAD_BYTES + 1);
        let e = get(&format!("HTTP/1.1 200 OK\r\nx: {big}\r\n\r\n")).await;
        assert!(matches!(e, Err(WireError::Malformed(_))));
    }

    #[tokio::test]
    async fn connection_close_http_1_0_and_reason_phrases() {
        let (_, _, reused) =
            get("HTTP/1.1 200 OK\r\nconnection: foo, close\r\ncontent-length: 0\r\n\r\n")
                .await
                .unwrap();
        assert!(!reused);
        let (head, _, reused) = get("HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(head.version, Version::HTTP_10);
        assert!(!reused);
        let (_, _, reused) =
            get("HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 0\r\n\r\n")
                .await
                .unwrap();
        assert!(reused);
        let (head, _, _) = get("HTTP/1.1 200 Fine\r\ncontent-length: 0\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(
            head.reason.as_ref().map(|r| r.as_bytes()),
            Some(&b"Fine"[..])
        );
    }

    #[tokio::test]
    async fn a_short_body_fails_and_a_silent_close_is_unanswered() {
        let (_, body, reused) = run(
            Method::GET,
            b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc",
        )
        .await
        .unwrap();
        assert!(body.is_err());
        assert!(!reused);
        let e = get("").await;
        assert!(matches!(e, Err(WireError::Unanswered(_))), "{e:?}");
        let e = get("HTTP/1.1 200").await;
        assert!(matches!(e, Err(WireError::Malformed(_))), "{e:?}");
    }

    #[tokio::test]
    async fn a_body_split_over_reads_arrives_whole_and_in_order() {
        let (near, mut far) = tokio::io::duplex(64);
        let mut conn = Conn::new(near);
        let writer = tokio::spawn(async move {
            let mut head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
            for i in 0..200u32 {
                let data = format!("chunk {i};");
                head.extend_from_slice(format!("{:x}\r\n{data}\r\n", data.len()).as_bytes());
            }
            head.extend_from_slice(b"0\r\n\r\n");
            for piece in head.chunks(7) {
                far.write_all(piece).await.unwrap();
            }
            far
        });
        let head = conn
            .exchange(&Method::GET, "/", &HeaderMap::new(), &[])
            .await
            .unwrap();
        let (mut body, back) = conn.body(&head);
        assert!(back.is_none());
        let mut data = Vec::new();
        while let Some(f) = std::future::poll_fn(|cx| body.poll_frame(cx)).await {
            data.extend_from_slice(&f.unwrap().into_data().unwrap());
        }
        let want: String = (0..200).map(|i| format!("chunk {i};")).collect();
        assert_eq!(data, want.as_bytes());
        assert!(body.take_idle().is_some());
        drop(writer.await.unwrap());
    }

    /// What a client gets from one answer, whichever reader read it: the
    /// head (or `None`: refused) and the body (data and trailers, or
    /// `None`: failed part-way).
    #[derive(Debug, PartialEq)]
    struct Seen {
        head: Option<(StatusCode, Version, HeaderMap, Option<Vec<u8>>)>,
        body: Option<(Vec<u8>, Option<HeaderMap>)>,
    }

    async fn through_wire(method: Method, answer: &[u8]) -> Seen {
        match run(method, answer).await {
            Err(_) => Seen {
                head: None,
                body: None,
            },
            Ok((head, body, _)) => Seen {
                head: Some((
                    head.status,
                    head.version,
                    head.headers,
                    head.reason.map(|r| r.as_bytes().to_vec()),
                )),
                body: body.ok(),
            },
        }
    }

    /// The same exchange through hyper's client, over the same kind of
    /// pipe and far end. A `Content-Length` hyper keeps beside a
    /// `Transfer-Encoding` is taken out, as the pool does after it.
    async fn through_hyper(method: Method, answer: &[u8]) -> Seen {
        use http_body_util::BodyExt;
        let refused = Seen {
            head: None,
            body: None,
        };
        let (near, mut far) = tokio::io::duplex(1 << 20);
        let answer = answer.to_vec();
        // hyper takes bytes that come before its request for an unasked
        // answer: this far end reads the request first.
        tokio::spawn(async move {
            let mut seen = Vec::new();
            while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                if far.read_buf(&mut seen).await? == 0 {
                    break;
                }
            }
            far.write_all(&answer).await
        });
        let Ok((mut send, conn)) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(near)).await
        else {
            return refused;
        };
        tokio::spawn(conn);
        let req = http::Request::builder()
            .method(method)
            .uri("/p?q=1")
            .header(header::HOST, "up")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let Ok(resp) = send.send_request(req).await else {
            return refused;
        };
        let (mut parts, mut body) = resp.into_parts();
        if parts.headers.contains_key(header::TRANSFER_ENCODING) {
            parts.headers.remove(header::CONTENT_LENGTH);
        }
        let reason = parts
            .extensions
            .get::<hyper::ext::ReasonPhrase>()
            .map(|r| r.as_bytes().to_vec());
        let mut data = Vec::new();
        let mut trailers = None;
        let body = loop {
            match body.frame().await {
                None => break Some((data, trailers)),
                Some(Err(_)) => break None,
                Some(Ok(f)) => match f.into_data() {
                    Ok(d) => data.extend_from_slice(&d),
                    // hyper may hand over an empty trailer section; the
                    // pool's reader ends the body without one.
                    Err(f) => trailers = f.into_trailers().ok().filter(|t| !t.is_empty()),
                },
            }
        };
        Seen {
            head: Some((parts.status, parts.version, parts.headers, reason)),
            body,
        }
    }

    /// An answer built from parts, well-formed unless its framing is
    /// meant to be wrong (a length off by a little, two lengths, a coding
    /// other than chunked last), with whatever junk follows it.
    struct Shape<'a> {
        informational: u8,
        version: &'a str,
        status: u16,
        reason: &'a str,
        extra: &'a [&'a str],
        framing: u8,
        body: &'a [u8],
        splits: &'a [usize],
        junk: &'a str,
    }

    fn answer(shape: &Shape<'_>) -> Vec<u8> {
        let &Shape {
            informational,
            version,
            status,
            reason,
            extra,
            framing,
            body,
            splits,
            junk,
        } = shape;
        let mut a = Vec::new();
        match informational {
            1 => a.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n"),
            2 => a.extend_from_slice(b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n"),
            _ => {}
        }
        a.extend_from_slice(format!("{version} {status} {reason}\r\n").as_bytes());
        for h in extra {
            a.extend_from_slice(h.as_bytes());
            a.extend_from_slice(b"\r\n");
        }
        let n = body.len();
        let chunked = |a: &mut Vec<u8>, ext: bool, trailers: bool| {
            let mut at = 0;
            for &s in splits.iter().chain([&n]) {
                let end = s.clamp(at, n);
                if end > at {
                    let e = if ext { ";a=b" } else { "" };
                    a.extend_from_slice(format!("{:x}{e}\r\n", end - at).as_bytes());
                    a.extend_from_slice(&body[at..end]);
                    a.extend_from_slice(b"\r\n");
                    at = end;
                }
            }
            a.extend_from_slice(b"0\r\n");
            if trailers {
                a.extend_from_slice(b"x-sum: 1\r\n");
            }
            a.extend_from_slice(b"\r\n");
        };
        match framing {
            0 => {
                a.extend_from_slice(format!("content-length: {n}\r\n\r\n").as_bytes());
                a.extend_from_slice(body);
            }
            1 => {
                a.extend_from_slice(format!("content-length: {}\r\n\r\n", n + 2).as_bytes());
                a.extend_from_slice(body);
            }
            2 => {
                let m = n.saturating_sub(2);
                a.extend_from_slice(format!("content-length: {m}\r\n\r\n").as_bytes());
                a.extend_from_slice(body);
            }
            3 => {
                a.extend_from_slice(
                    format!("content-length: {n}\r\ncontent-length: {n}\r\n\r\n").as_bytes(),
                );
                a.extend_from_slice(body);
            }
            4 => {
                a.extend_from_slice(format!("content-length: {n}, {}\r\n\r\n", n + 1).as_bytes());
                a.extend_from_slice(body);
            }
            5 => {
                a.extend_from_slice(b"transfer-encoding: chunked\r\n\r\n");
                chunked(&mut a, false, false);
            }
            6 => {
                a.extend_from_slice(b"transfer-encoding: chunked\r\n\r\n");
                chunked(&mut a, true, true);
            }
            7 => {
                a.extend_from_slice(b"transfer-encoding: gzip, chunked\r\n\r\n");
                chunked(&mut a, false, false);
            }
            8 => {
                a.extend_from_slice(
                    format!("transfer-encoding: chunked\r\ncontent-length: {n}\r\n\r\n").as_bytes(),
                );
                chunked(&mut a, false, true);
            }
            9 => {
                a.extend_from_slice(b"transfer-encoding: gzip\r\n\r\n");
                a.extend_from_slice(body);
            }
            _ => {
                a.extend_from_slice(b"\r\n");
                a.extend_from_slice(body);
            }
        }
        a.extend_from_slice(junk.as_bytes());
        a
    }

    /// The pool's reader against hyper's client as the oracle. On answers
    /// built well-formed (framing errors included, on purpose) both give
    /// the client the same thing: status, version, headers, reason, body
    /// and trailers, or both refuse. After random edits to the bytes the
    /// pool's reader is never more lenient: whatever it accepts, hyper
    /// accepts and reads alike.
    #[test]
    fn reads_every_answer_as_hyper_does_and_never_accepts_more() {
        use proptest::prelude::*;
        use proptest::sample::select;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let extra = proptest::collection::vec(
            select(vec![
                "server: t",
                "x-a: 1",
                "x-a: 2",
                "set-cookie: a=b",
                "x-b: \tv w",
                "x-c:",
                "connection: close",
                "connection: keep-alive",
                "connection: foo, close",
                "content-type: text/plain; charset=utf-8",
            ]),
            0..4,
        );
        let parts = (
            0u8..3,
            select(vec!["HTTP/1.1", "HTTP/1.0"]),
            select(vec![200u16, 201, 204, 206, 301, 304, 404, 500, 599]),
            select(vec!["OK", "", "Fine Thanks", "Not Found"]),
            extra,
            0u8..11,
            proptest::collection::vec(select(b"ab\r\n0;:x".to_vec()), 0..40),
            proptest::collection::vec(0usize..40, 0..4),
            select(vec![
                "",
                "x",
                "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
            ]),
            any::<bool>(),
        );
        let edits = crate::util::edits::edits(b"\r\n :;,0aX\x00\x7f\xff\t", 0..3);
        proptest!(
            ProptestConfig::with_cases(20_000),
            |(p in parts, edits in edits)| {
                let (info, version, status, reason, extra, framing, body, splits, junk, head) = p;
                let mut a = answer(&Shape {
                    informational: info,
                    version,
                    status,
                    reason,
                    extra: &extra,
                    framing,
                    body: &body,
                    splits: &splits,
                    junk,
                });
                let edited = !edits.is_empty();
                crate::util::edits::apply(&mut a, &edits);
                let method = if head { Method::HEAD } else { Method::GET };
                let (ours, theirs) = rt.block_on(async {
                    let limit = std::time::Duration::from_secs(10);
                    let ours = tokio::time::timeout(limit, through_wire(method.clone(), &a)).await;
                    let theirs = tokio::time::timeout(limit, through_hyper(method, &a)).await;
                    (ours.unwrap(), theirs.unwrap())
                });
                let text = String::from_utf8_lossy(&a);
                if !edited {
                    prop_assert_eq!(&ours, &theirs, "{:?}", text);
                } else if ours.head.is_some() {
                    prop_assert_eq!(&ours.head, &theirs.head, "{:?}", text);
                    if ours.body.is_some() {
                        prop_assert_eq!(&ours.body, &theirs.body, "{:?}", text);
                    }
                }
            }
        );
    }
}
