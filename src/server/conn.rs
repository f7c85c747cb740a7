//! What runs beside every served connection: the drain signal and, for
//! HTTP/1.1, the header-read deadline.
//!
//! Both used to be polled in full on every wake-up of a connection's task:
//! the drain signal's `watch::changed` future takes its `Notify`'s mutex on
//! each poll, and hyper's own header-read timeout arms a boxed tokio timer
//! per request (a clock read, a timer-wheel insert and removal, an
//! allocation). Here a wake-up costs one atomic load for the drain signal
//! (the `changed` future is polled again only when the task's waker
//! changes) and one poll of a single per-connection timer, which is
//! re-armed only when it fires.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::watch;

use crate::proxy::ProxyBody;
use crate::proxy::client::BoxError;

/// `HeadClock::idle_since` while a request is in flight.
const BUSY: u64 = u64::MAX;

/// The header-read deadline of one HTTP/1.1 connection: the time it may
/// wait for a request's head, counted from when it opened or from when its
/// last response was done with (hyper's `header_read_timeout` semantics:
/// it covers the keep-alive wait and a head that arrives slowly alike).
/// A request in flight (its head was read, its response body not yet done
/// with) stops the clock.
#[derive(Debug)]
pub struct HeadClock {
    timeout: Duration,
    opened: Instant,
    /// Nanoseconds after `opened` at which the connection went idle; `BUSY`
    /// while a request is in flight. (HTTP/1.1 serves one request at a time.)
    idle_since: AtomicU64,
}

impl HeadClock {
    /// A clock for a connection opened now.
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            opened: Instant::now(),
            idle_since: AtomicU64::new(0),
        }
    }

    /// A request's head was read.
    fn busy(&self) {
        self.idle_since.store(BUSY, Ordering::Relaxed);
    }

    /// The response was done with: the wait for the next head starts.
    fn idle(&self) {
        let ns = u64::try_from(self.opened.elapsed().as_nanos()).unwrap_or(BUSY - 1);
        self.idle_since.store(ns.min(BUSY - 1), Ordering::Relaxed);
    }

    /// When the head awaited now must have arrived; `None` while busy.
    fn deadline(&self) -> Option<Instant> {
        match self.idle_since.load(Ordering::Relaxed) {
            BUSY => None,
            ns => Some(self.opened + Duration::from_nanos(ns) + self.timeout),
        }
    }

    /// Marks a request in flight until the returned guard is dropped with
    /// its response body.
    pub fn request(self: &Arc<Self>) -> InFlight {
        self.busy();
        InFlight(self.clone())
    }
}

/// A request in flight on an HTTP/1.1 connection (see [`HeadClock`]).
#[derive(Debug)]
pub struct InFlight(Arc<HeadClock>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.idle();
    }
}

/// A response body that holds its connection's [`InFlight`] until hyper is
/// done with it (hyper drops the body once it has written the last frame,
/// or at once for `HEAD`, 204 and 304).
pub struct Tracked {
    body: ProxyBody,
    _in_flight: Option<InFlight>,
}

impl Tracked {
    /// `body`, holding `in_flight` (absent on HTTP/2 and plain listeners).
    pub fn new(body: ProxyBody, in_flight: Option<InFlight>) -> Self {
        Self {
            body,
            _in_flight: in_flight,
        }
    }
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Runs a connection to its end; on the drain signal asks it to finish
/// gracefully (no new requests, in-flight ones complete). Holding `drain`
/// until the end is what lets the accept loop wait for the last connection.
/// With `head`, a connection that waits longer than its header-read timeout
/// for a request's head is closed (dropped; also while draining).
pub async fn run<C, E>(
    conn: C,
    drain: watch::Receiver<()>,
    head: Option<&HeadClock>,
    graceful: impl FnOnce(Pin<&mut C>),
) -> Result<(), E>
where
    C: Future<Output = Result<(), E>>,
{
    let mut conn = std::pin::pin!(conn);
    let mut watch = HeadWatch::new(head);
    let mut probe = drain.clone();
    let mut drain = drain;
    {
        let changed = std::pin::pin!(drain.changed());
        let mut signal = DrainSignal {
            changed,
            probe: &mut probe,
            registered: None,
        };
        let first = std::future::poll_fn(|cx| {
            if let Poll::Ready(r) = conn.as_mut().poll(cx) {
                return Poll::Ready(Some(r));
            }
            if watch.poll_expired(cx) {
                return Poll::Ready(Some(head_timeout()));
            }
            if signal.poll_signalled(cx) {
                return Poll::Ready(None);
            }
            Poll::Pending
        })
        .await;
        if let Some(ended) = first {
            return ended;
        }
    }
    graceful(conn.as_mut());
    std::future::poll_fn(|cx| {
        if let Poll::Ready(r) = conn.as_mut().poll(cx) {
            return Poll::Ready(r);
        }
        if watch.poll_expired(cx) {
            return Poll::Ready(head_timeout());
        }
        Poll::Pending
    })
    .await
}

/// The end of a connection that sent no request head in time.
fn head_timeout<E>() -> Result<(), E> {
    tracing::debug!("no request head within the header-read timeout; connection closed");
    Ok(())
}

/// The drain signal, cheap to poll on every wake-up: an atomic load of the
/// watch's version; its `changed` future (whose poll takes a mutex) is
/// polled only when the task's waker is not the one it registered.
struct DrainSignal<'a, F> {
    changed: Pin<&'a mut F>,
    probe: &'a mut watch::Receiver<()>,
    registered: Option<Waker>,
}

impl<F: Future> DrainSignal<'_, F> {
    fn poll_signalled(&mut self, cx: &mut Context<'_>) -> bool {
        // A closed sender (`Err`) ends the connection's service as a signal does.
        if self.probe.has_changed().unwrap_or(true) {
            return true;
        }
        if self
            .registered
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            return false;
        }
        if self.changed.as_mut().poll(cx).is_ready() {
            return true;
        }
        self.registered = Some(cx.waker().clone());
        false
    }
}

/// The header-read timer of one connection: armed once at the first
/// deadline, and when it fires re-armed to the deadline the clock says now
/// (or a full timeout ahead while a request is in flight).
struct HeadWatch<'a> {
    armed: Option<(&'a HeadClock, Pin<Box<tokio::time::Sleep>>)>,
}

impl<'a> HeadWatch<'a> {
    fn new(head: Option<&'a HeadClock>) -> Self {
        Self {
            armed: head.map(|h| {
                let first = h.deadline().unwrap_or_else(|| Instant::now() + h.timeout);
                (h, Box::pin(tokio::time::sleep_until(first.into())))
            }),
        }
    }

    /// True once the connection waited too long for a head.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> bool {
        let Some((clock, sleep)) = self.armed.as_mut() else {
            return false;
        };
        while sleep.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            let next = match clock.deadline() {
                Some(d) if d <= now => return true,
                Some(d) => d,
                None => now + clock.timeout,
            };
            sleep.as_mut().reset(next.into());
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_stops_while_a_request_is_in_flight() {
        let clock = Arc::new(HeadClock::new(Duration::from_secs(5)));
        let first = clock.deadline().map(|d| d.duration_since(clock.opened));
        assert_eq!(first, Some(Duration::from_secs(5)));
        let guard = clock.request();
        assert_eq!(clock.deadline(), None);
        std::thread::sleep(Duration::from_millis(20));
        drop(guard);
        let d = clock.deadline();
        assert!(d.is_some_and(|d| d >= clock.opened + Duration::from_millis(5020)));
    }
}
