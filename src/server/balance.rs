//! Spreads accepted proxy connections evenly over the worker threads.
//!
//! Every worker waits on the same listening sockets and the kernel gives a
//! new connection to whichever takes it first, so nothing keeps the counts
//! even: 50 keep-alive clients came out about 27 / 23 on two workers, and a
//! sidecar's few long-lived HTTP/2 connections can all land on one. A
//! connection stays on its worker for life (thread per core, see
//! `spawn_workers`), so the busier worker's requests queue behind each
//! other while another core has time to spare. Here the worker that
//! accepted a connection hands it to the worker with the fewest open
//! connections when that is another one (Envoy's "exact balance"): one
//! cross-thread send per connection, nothing per request.

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{OwnedSemaphorePermit, mpsc, watch};

use crate::telemetry::{Metrics, WorkerLabel};

/// Open connections per worker (the `portcullis_worker_connections`
/// gauges are the counts), and each worker's inbox for connections another
/// worker accepted for it.
pub(crate) struct Balance {
    live: Box<[Gauge]>,
    inboxes: Box<[mpsc::UnboundedSender<Handoff>]>,
}

/// A connection's place on a worker: counted from the moment the worker is
/// chosen until the connection ends (dropped with it).
pub(crate) struct Seat {
    balance: Arc<Balance>,
    worker: usize,
}

impl Seat {
    /// The worker this connection runs on.
    pub(crate) fn worker(&self) -> usize {
        self.worker
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        self.balance.live[self.worker].dec();
    }
}

/// A connection accepted by one worker for another, with everything its
/// serving needs. The socket left the accepting worker's reactor; the
/// receiving worker registers it with its own.
pub(crate) struct Handoff {
    pub tcp: std::net::TcpStream,
    pub peer: SocketAddr,
    /// Which listener accepted it (TLS or plain HTTP) and that listener's
    /// serving settings.
    pub listener: Arc<super::ListenerCtx>,
    /// Its place under `proxy.max_connections`.
    pub permit: OwnedSemaphorePermit,
    /// The accepting listener's drain signal (see `accept_loop`).
    pub watcher: watch::Receiver<()>,
    pub seat: Seat,
}

impl Balance {
    /// A balance over `workers` workers, and each worker's inbox receiver.
    pub(crate) fn new(
        workers: usize,
        metrics: &Metrics,
    ) -> (Arc<Self>, Vec<mpsc::UnboundedReceiver<Handoff>>) {
        let (senders, receivers): (Vec<_>, Vec<_>) =
            (0..workers).map(|_| mpsc::unbounded_channel()).unzip();
        let balance = Arc::new(Self {
            live: (0..workers)
                .map(|w| {
                    metrics
                        .worker_connections
                        .get_or_create_owned(&WorkerLabel { worker: w as u64 })
                })
                .collect(),
            inboxes: senders.into_boxed_slice(),
        });
        (balance, receivers)
    }

    /// Takes a seat for a connection worker `here` just accepted: on the
    /// worker with the fewest open connections, `here` on a tie.
    pub(crate) fn seat(self: &Arc<Self>, here: usize) -> Seat {
        let mut best = here;
        let mut least = self.live[here].get();
        for (w, n) in self.live.iter().enumerate() {
            let n = n.get();
            if n < least {
                (best, least) = (w, n);
            }
        }
        self.take(best)
    }

    /// Takes a seat on worker `w` (a connection that stays where it is).
    pub(crate) fn take(self: &Arc<Self>, w: usize) -> Seat {
        self.live[w].inc();
        Seat {
            balance: self.clone(),
            worker: w,
        }
    }

    /// Sends a connection to the worker its seat is on; gives it back when
    /// that worker no longer takes any (it is shutting down).
    pub(crate) fn hand_off(&self, h: Handoff) -> Result<(), Box<Handoff>> {
        self.inboxes[h.seat.worker]
            .send(h)
            .map_err(|e| Box::new(e.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seats_go_to_the_least_loaded_worker_and_come_back_on_drop() {
        let metrics = Metrics::new();
        let (b, _rx) = Balance::new(3, &metrics);
        // Worker 0 accepts everything; the seats spread 0, 1, 2, 0, 1, 2.
        let seats: Vec<Seat> = (0..6).map(|_| b.seat(0)).collect();
        let on: Vec<usize> = seats.iter().map(Seat::worker).collect();
        assert_eq!(on, [0, 1, 2, 0, 1, 2]);
        // A tie stays where it was accepted.
        drop(seats);
        let kept = b.seat(2);
        assert_eq!(kept.worker(), 2);
        let gauge = |w: u64| {
            metrics
                .worker_connections
                .get_or_create(&WorkerLabel { worker: w })
                .get()
        };
        assert_eq!((gauge(0), gauge(1), gauge(2)), (0, 0, 1));
    }
}
