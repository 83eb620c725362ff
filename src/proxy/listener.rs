//! The listener: the accept loop, the connection slots and the life of one connection (TLS,
//! HTTP/1 or HTTP/2, timeouts, graceful shutdown).
//!
//! Rules every connection is held to, whatever its protocol:
//! - **Head deadline.** From the moment it is accepted, a connection has `head_timeout` to
//!   complete its TLS handshake (if any) and one request head. The deadline is kept here, not
//!   by hyper, because hyper's own header timeout starts only once a connection is known to be
//!   HTTP/1: a socket that sends nothing or half an HTTP/2 preface, or an HTTP/2 connection that
//!   opens no stream, would otherwise be held for ever. Such a connection has nothing in flight
//!   and is closed at once (no GOAWAY). On HTTP/1, each later request head must also complete
//!   within `head_timeout` of its first byte.
//! - **Idle timeout.** A connection with no request in progress (HTTP/2: no open stream) for
//!   `idle_timeout` is closed (HTTP/2: GOAWAY first, see [`CLOSE_GRACE`]). A request counts as
//!   in progress from its head until its response has been handed to the socket, so a slow but
//!   valid client is never cut by these timers (its request has its own `request_timeout`).
//!   But a client that stops reading, with answers ready and none taken for `idle_timeout`
//!   (an HTTP/2 flow-control window kept shut would hold its stream for ever), is dropped.
//! - **HTTP/2 keep-alive pings** every `http2_keep_alive_interval`; a peer that does not answer
//!   within `http2_keep_alive_timeout` is gone and its connection closed (hyper's own pings).
//! - **A bounded share for unproven connections.** A connection is *unproven* until it has
//!   presented a valid bearer token (with auth on) or completed a request head (auth off). At
//!   most `max_unproven_connections` are unproven at once; when that share or every slot is
//!   taken, a new connection evicts the oldest unproven one instead of waiting. Proven
//!   connections are never evicted, and a client with a token gets in however many idle or
//!   unauthenticated sockets are open: each of them is either evicted or closed by the timers.
//!   Only when every slot is held by proven connections do new ones wait in the listen backlog.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::Router;
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use super::app::App;
use super::auth::Access;
use super::config::ProxyConfig;
use super::observe::Peer;
use super::routes;
use super::tls::Tls;
use crate::metrics as m;

/// How long a connection closed for idleness may take to finish after its GOAWAY before it is
/// dropped. A client that never reads it (or never answers the PING hyper's graceful shutdown
/// sends) would otherwise hold the connection; a request that started just before the GOAWAY
/// is still served to its end.
pub(crate) const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Connections of a running proxy, from [`ProxyHandle::connections`](super::ProxyHandle::connections).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Connections {
    /// Open connections (at most `max_connections`).
    pub open: usize,
    /// Of those, connections that have not proven themselves yet (no valid token with auth
    /// on, no complete request head with auth off); at most `max_unproven_connections`.
    pub unproven: usize,
}

/// The connection slots: `max_connections` in all, at most `max_unproven` of them unproven.
pub(crate) struct Gate {
    /// `max_connections`.
    max: usize,
    /// `max_unproven_connections` (or its default share of `max`).
    max_unproven: usize,
    /// The counts; a std mutex, held for a few instructions and never across an await.
    inner: Mutex<GateInner>,
    /// A slot was freed or a connection became unproven (the accept loop may go on).
    changed: Notify,
}

/// The counts behind the [`Gate`]'s lock.
#[derive(Default)]
struct GateInner {
    /// Connections holding a slot (proven or not).
    open: usize,
    /// Unproven connections by age (ids grow); each one's eviction signal.
    unproven: BTreeMap<u64, CancellationToken>,
    /// The id of the next connection (its age among the unproven).
    next_id: u64,
}

impl Gate {
    /// The gate of an instance: `max_connections` slots, of which at most
    /// `max_unproven_connections` (or its default share) unproven.
    pub(crate) fn new(config: &ProxyConfig) -> Arc<Gate> {
        Arc::new(Gate {
            max: config.max_connections,
            max_unproven: config.unproven_cap(),
            inner: Mutex::new(GateInner::default()),
            changed: Notify::new(),
        })
    }

    /// The counts, whatever a panicking holder left (they stay consistent: see below).
    fn lock(&self) -> MutexGuard<'_, GateInner> {
        // Nothing under this lock can panic half-way; a poisoned lock still holds counts.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The open and unproven connections now (for [`ProxyHandle::connections`](super::ProxyHandle::connections)).
    pub(crate) fn stats(&self) -> Connections {
        let g = self.lock();
        Connections {
            open: g.open,
            unproven: g.unproven.len(),
        }
    }

    /// Returns once a new connection can be admitted: a free slot, or an unproven connection
    /// to evict.
    async fn ready(&self) {
        loop {
            {
                let g = self.lock();
                if g.open < self.max || !g.unproven.is_empty() {
                    return;
                }
            }
            // `notify_one` keeps a permit when nobody waits: no wake-up is lost between the
            // check above and this wait.
            self.changed.notified().await;
        }
    }

    /// Admits an accepted connection as unproven, evicting the oldest unproven one when every
    /// slot or the unproven share is taken. `None` when every slot is held by a proven
    /// connection.
    fn admit(self: &Arc<Self>) -> Option<Ticket> {
        let mut g = self.lock();
        if g.open >= self.max || g.unproven.len() >= self.max_unproven {
            let (_, victim) = g.unproven.pop_first()?;
            // Its slot is this connection's now: its ticket, finding itself neither proven
            // nor listed, frees nothing.
            victim.cancel();
            g.open = g.open.saturating_sub(1);
            metrics::gauge!(m::PROXY_CONNECTIONS_OPEN).decrement(1.0);
            metrics::gauge!(m::PROXY_CONNECTIONS_UNPROVEN).decrement(1.0);
            metrics::counter!(m::PROXY_CONNECTIONS_CLOSED, "reason" => m::CLOSE_UNPROVEN_EVICTED)
                .increment(1);
        }
        let id = g.next_id;
        g.next_id += 1;
        let evict = CancellationToken::new();
        g.unproven.insert(id, evict.clone());
        g.open += 1;
        metrics::gauge!(m::PROXY_CONNECTIONS_OPEN).increment(1.0);
        metrics::gauge!(m::PROXY_CONNECTIONS_UNPROVEN).increment(1.0);
        Some(Ticket {
            conn: Arc::new(ConnState::new(self.clone(), id)),
            evict,
        })
    }

    /// Marks `conn` proven (it leaves the unproven share). False if it was evicted meanwhile.
    fn prove(&self, conn: &ConnState) -> bool {
        let mut g = self.lock();
        if g.unproven.remove(&conn.id).is_some() {
            conn.proven.store(true, Ordering::Release);
            metrics::gauge!(m::PROXY_CONNECTIONS_UNPROVEN).decrement(1.0);
            true
        } else {
            conn.proven.load(Ordering::Acquire)
        }
    }
}

/// A connection's slot, freed when its task ends.
struct Ticket {
    /// The connection holding the slot (its id and whether it is proven decide what the
    /// drop gives back).
    conn: Arc<ConnState>,
    /// Cancelled when a newer connection evicts this (unproven) one.
    evict: CancellationToken,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let gate = &self.conn.gate;
        let mut g = gate.lock();
        if self.conn.proven.load(Ordering::Acquire) {
            g.open = g.open.saturating_sub(1);
            metrics::gauge!(m::PROXY_CONNECTIONS_OPEN).decrement(1.0);
        } else if g.unproven.remove(&self.conn.id).is_some() {
            g.open = g.open.saturating_sub(1);
            metrics::gauge!(m::PROXY_CONNECTIONS_OPEN).decrement(1.0);
            metrics::gauge!(m::PROXY_CONNECTIONS_UNPROVEN).decrement(1.0);
        }
        // else: evicted, its slot went to the connection that evicted it.
        drop(g);
        gate.changed.notify_one();
    }
}

/// What one connection's task and its requests share.
struct ConnState {
    /// The gate its slot is in.
    gate: Arc<Gate>,
    /// Its id at the gate (ids grow: the smallest unproven id is the oldest).
    id: u64,
    /// Accepted at; the times below are milliseconds after it, plus one (0: never).
    base: Instant,
    /// Set once the connection has proven itself (see the module doc); never unset.
    proven: AtomicBool,
    /// Requests whose head arrived (the first one ends the accept-time head deadline).
    requests: AtomicU64,
    /// Requests in progress: from the head until the response is handed to the socket.
    active: AtomicUsize,
    /// When `active` last fell to zero.
    idle_since: AtomicU64,
    /// HTTP/1: first byte received since `idle_since` (a head under way), or 0.
    head_started: AtomicU64,
    /// The connection speaks HTTP/2 (control frames arrive between streams: no head rule).
    h2: AtomicBool,
    /// The first request came, or `head_started` was set: the task re-arms its deadline.
    wake: Notify,
    /// Answers ready whose body hyper has not taken yet (the client does not read: an HTTP/2
    /// flow-control window kept shut).
    unread: AtomicUsize,
    /// When an answer body was last taken, or when `unread` last rose from zero.
    taken: AtomicU64,
}

impl ConnState {
    fn new(gate: Arc<Gate>, id: u64) -> Self {
        ConnState {
            gate,
            id,
            base: Instant::now(),
            proven: AtomicBool::new(false),
            requests: AtomicU64::new(0),
            active: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            head_started: AtomicU64::new(0),
            h2: AtomicBool::new(false),
            wake: Notify::new(),
            unread: AtomicUsize::new(0),
            taken: AtomicU64::new(0),
        }
    }

    fn stamp(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_millis())
            .unwrap_or(u64::MAX - 1)
            .saturating_add(1)
    }

    fn at(&self, stamp: u64) -> Instant {
        self.base + Duration::from_millis(stamp.saturating_sub(1))
    }

    /// A request head arrived: counts it in progress, and proves the connection if the request
    /// carries a valid token (or auth is off).
    fn begin(
        self: &Arc<Self>,
        req: &axum::http::Request<hyper::body::Incoming>,
        access: &Access,
    ) -> InProgress {
        if req.version() == axum::http::Version::HTTP_2 {
            self.h2.store(true, Ordering::Relaxed);
        }
        self.active.fetch_add(1, Ordering::AcqRel);
        if self.requests.fetch_add(1, Ordering::Relaxed) == 0 {
            // The task sleeps until the head deadline: re-arm it for the idle rules (which
            // may be due sooner when `idle_timeout` < `head_timeout`).
            self.wake.notify_one();
        }
        // Once per connection at most while it is unproven; a proven one pays one load.
        if !self.proven.load(Ordering::Relaxed)
            && (!access.enabled() || access.authenticate(req.headers()).is_ok())
        {
            self.gate.prove(self);
        }
        InProgress(self.clone(), false)
    }

    /// Bytes arrived (from the socket wrapper). Only an idle HTTP/1 connection cares: they
    /// are the start of the next request head.
    fn received(&self) {
        if self.head_started.load(Ordering::Relaxed) == 0
            && self.requests.load(Ordering::Relaxed) > 0
            && !self.h2.load(Ordering::Relaxed)
            && self.active.load(Ordering::Acquire) == 0
        {
            self.head_started.store(self.stamp(), Ordering::Relaxed);
            self.wake.notify_one();
        }
    }

    /// When the timers are next due, or the reason to close now.
    fn due(&self, limits: &Limits, now: Instant) -> Result<Instant, &'static str> {
        if self.requests.load(Ordering::Relaxed) == 0 {
            let d = self.base + limits.head;
            return if now >= d {
                Err(m::CLOSE_HEAD_TIMEOUT)
            } else {
                Ok(d)
            };
        }
        if self.active.load(Ordering::Acquire) > 0 {
            // Answers ready and none taken for `idle`: the client has stopped reading (an
            // HTTP/2 window kept shut holds a stream, and so the connection, for ever).
            if self.unread.load(Ordering::Acquire) > 0 {
                let stalled = self.at(self.taken.load(Ordering::Relaxed)) + limits.idle;
                if now >= stalled {
                    return Err(m::CLOSE_STALLED);
                }
                return Ok(stalled.min(now + limits.head.min(limits.idle)));
            }
            // Look again later: it cannot be idle for `idle` before `now + idle`.
            return Ok(now + limits.head.min(limits.idle));
        }
        let idle = self.at(self.idle_since.load(Ordering::Relaxed)) + limits.idle;
        if now >= idle {
            return Err(m::CLOSE_IDLE_TIMEOUT);
        }
        let mut next = idle;
        if !self.h2.load(Ordering::Relaxed) {
            let started = self.head_started.load(Ordering::Relaxed);
            if started != 0 {
                let d = self.at(started) + limits.head;
                if now >= d {
                    return Err(m::CLOSE_HEAD_TIMEOUT);
                }
                next = next.min(d);
            }
        }
        Ok(next)
    }
}

/// A request in progress; dropped with its response body (or its future, if the client went
/// away first).
struct InProgress(Arc<ConnState>, bool);

impl InProgress {
    /// Its answer is ready: from now on hyper only has to take the body.
    fn answered(&mut self) {
        let c = &self.0;
        if c.unread.load(Ordering::Relaxed) == 0 {
            c.taken.store(c.stamp(), Ordering::Relaxed);
        }
        c.unread.fetch_add(1, Ordering::AcqRel);
        self.1 = true;
    }
}

impl Drop for InProgress {
    fn drop(&mut self) {
        let c = &self.0;
        if self.1 {
            c.taken.store(c.stamp(), Ordering::Relaxed);
            c.unread.fetch_sub(1, Ordering::AcqRel);
        }
        c.head_started.store(0, Ordering::Relaxed);
        c.idle_since.store(c.stamp(), Ordering::Relaxed);
        c.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The timers of every connection, from the configuration.
#[derive(Clone, Copy)]
struct Limits {
    /// `head_timeout`.
    head: Duration,
    /// `idle_timeout`.
    idle: Duration,
}

/// A byte stream a connection can run on (plain TCP or TLS), boxed so that one connection
/// type serves both.
trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

/// The socket, telling the connection's state when bytes arrive.
struct Watched {
    /// The stream.
    inner: Box<dyn Io>,
    /// Told of every read, for the head and idle timers.
    conn: Arc<ConnState>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.conn.received();
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Counts a connection closed by the proxy, by `reason` (a `CLOSE_*` label of `metrics`).
fn closed(reason: &'static str) {
    metrics::counter!(m::PROXY_CONNECTIONS_CLOSED, "reason" => reason).increment(1);
}

/// Accepts connections until `stop`, then shuts down gracefully: no new connections, new
/// requests on open ones answered 503, requests in flight finished within
/// `shutdown_timeout`, then the producer flushed.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    app: Arc<App>,
    tls: Tls,
    gate: Arc<Gate>,
    stop: CancellationToken,
) {
    let router = routes::router(app.clone());
    let mut conns = JoinSet::new();
    let closing = CancellationToken::new();
    let limits = Limits {
        head: app.config.head_timeout,
        idle: app.config.idle_timeout,
    };
    'accept: loop {
        // Every slot held by a proven connection: stop accepting until one closes (the
        // kernel's backlog holds the rest).
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = gate.ready() => {}
        }
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: do not spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let ticket = loop {
            // Between `ready` and here the last unproven connection may have proven itself.
            if let Some(t) = gate.admit() {
                break t;
            }
            tokio::select! {
                _ = stop.cancelled() => break 'accept,
                _ = gate.ready() => {}
            }
        };
        let _ = stream.set_nodelay(true);
        #[allow(clippy::clone_on_copy)] // a Copy placeholder without `proxy-tls`
        let (router, closing, tls, app) =
            (router.clone(), closing.clone(), tls.clone(), app.clone());
        conns.spawn(connection(
            stream, peer, tls, router, app, ticket, closing, limits,
        ));
    }
    drop(listener);
    app.shutting_down.store(true, Ordering::Relaxed);
    let started = Instant::now();
    let timeout = app.config.shutdown_timeout;
    tracing::info!(
        connections = conns.len(),
        "proxy shutting down: listener closed, finishing requests in flight"
    );
    closing.cancel();
    if tokio::time::timeout(timeout, async {
        while conns.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        tracing::warn!(connections = conns.len(), "shutdown timeout: closing connections with requests still running (their clients get no answer, never a false 200)");
        conns.abort_all();
    }
    let left = timeout
        .saturating_sub(started.elapsed())
        .max(Duration::from_secs(1));
    match app.producer.flush(left).await {
        Ok(()) => tracing::info!("proxy stopped; producer flushed"),
        Err(e) => {
            tracing::error!(error = %e, queued = app.producer.queued(), "producer flush incomplete at shutdown")
        }
    }
}

/// The TLS handshake, within the connection's head deadline.
#[cfg(feature = "proxy-tls")]
async fn handshake(
    acceptor: tokio_rustls::TlsAcceptor,
    stream: tokio::net::TcpStream,
    deadline: Instant,
) -> Result<Box<dyn Io>, &'static str> {
    match tokio::time::timeout_at(deadline.into(), acceptor.accept(stream)).await {
        Ok(Ok(s)) => Ok(Box::new(s)),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "TLS handshake failed");
            Err(m::CLOSE_TLS_FAILED)
        }
        Err(_) => Err(m::CLOSE_HEAD_TIMEOUT),
    }
}

#[cfg(not(feature = "proxy-tls"))]
async fn handshake(
    never: Infallible,
    _: tokio::net::TcpStream,
    _: Instant,
) -> Result<Box<dyn Io>, &'static str> {
    match never {}
}

/// One connection, from its TLS handshake to its close.
#[allow(clippy::too_many_arguments)]
async fn connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    tls: Tls,
    router: Router,
    app: Arc<App>,
    ticket: Ticket,
    closing: CancellationToken,
    limits: Limits,
) {
    let conn = ticket.conn.clone();
    let io: Box<dyn Io> = match tls {
        None => Box::new(stream),
        Some(acceptor) => {
            tokio::select! {
                _ = ticket.evict.cancelled() => return,
                _ = closing.cancelled() => return closed(m::CLOSE_SHUTDOWN),
                r = handshake(acceptor, stream, conn.base + limits.head) => match r {
                    Ok(io) => io,
                    Err(reason) => return closed(reason),
                },
            }
        }
    };
    let (ping, ping_timeout) = (
        app.config.http2_keep_alive_interval,
        app.config.http2_keep_alive_timeout,
    );
    let state = conn.clone();
    let svc =
        hyper::service::service_fn(move |mut req: axum::http::Request<hyper::body::Incoming>| {
            let mut in_progress = state.begin(&req, &app.access);
            req.extensions_mut().insert(Peer(peer));
            let router = router.clone();
            async move {
                let resp = router
                    .oneshot(req.map(Body::new))
                    .await
                    .unwrap_or_else(|e| match e {});
                in_progress.answered();
                // The request stays in progress until hyper has taken the whole body.
                Ok::<_, Infallible>(resp.map(move |b| {
                    Body::new(b.map_frame(move |f| {
                        let _keep = &in_progress;
                        f
                    }))
                }))
            }
        });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // This task keeps the head and idle deadlines; hyper's own header timeout (which would
    // otherwise default to 30 s between keep-alive requests) only backs it up.
    // Transport buffers per connection, which `max_buffered_bytes` does not count, are kept
    // small: an unproven connection may hold them until it is evicted or times out, so at the
    // default 5,000 unproven connections hyper's HTTP/1 default (~400 KiB for a head that never
    // ends) would be ~2 GiB. 64 KiB holds any sane request head; bodies stream through it.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.head + limits.idle)
        .max_buf_size(64 * 1024);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(ping)
        .keep_alive_timeout(ping_timeout)
        .max_header_list_size(64 * 1024)
        .max_concurrent_streams(100);
    let io = Watched {
        inner: io,
        conn: conn.clone(),
    };
    let served = builder.serve_connection(TokioIo::new(io), svc);
    let mut served = std::pin::pin!(served);
    let mut shutting = false;
    // An idle connection told to go away: by when it must be gone, and why.
    let mut going: Option<(Instant, &'static str)> = None;
    loop {
        let now = Instant::now();
        let wake = match going {
            Some((until, reason)) if now >= until => {
                if conn.active.load(Ordering::Acquire) == 0 {
                    return closed(reason);
                }
                // A request that came in before the GOAWAY: serve it (it has its own limits).
                now + CLOSE_GRACE
            }
            Some((until, _)) => until,
            None => match conn.due(&limits, now) {
                Ok(t) => t,
                // No request in progress, and none ever (or a head under way), or a client that
                // stopped reading its answers (a GOAWAY would wait for them too): drop it.
                Err(reason) if reason == m::CLOSE_HEAD_TIMEOUT || reason == m::CLOSE_STALLED => {
                    return closed(reason)
                }
                Err(reason) => {
                    served.as_mut().graceful_shutdown();
                    going = Some((now + CLOSE_GRACE, reason));
                    now + CLOSE_GRACE
                }
            },
        };
        tokio::select! {
            biased;
            _ = ticket.evict.cancelled() => return,
            res = served.as_mut() => {
                let reason = match (going, res) {
                    (Some((_, reason)), _) => reason,
                    _ if shutting => m::CLOSE_SHUTDOWN,
                    (None, Ok(())) => m::CLOSE_CLIENT,
                    (None, Err(e)) => {
                        tracing::debug!(error = %e, "connection ended with an error");
                        m::CLOSE_ERROR
                    }
                };
                return closed(reason);
            }
            _ = closing.cancelled(), if !shutting => {
                shutting = true;
                served.as_mut().graceful_shutdown();
            }
            _ = conn.wake.notified() => {}
            _ = tokio::time::sleep_until(wake.into()) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(max: usize, unproven: usize) -> Arc<Gate> {
        Gate::new(&ProxyConfig {
            max_connections: max,
            max_unproven_connections: Some(unproven),
            ..ProxyConfig::default()
        })
    }

    fn stats(g: &Gate) -> (usize, usize) {
        let s = g.stats();
        (s.open, s.unproven)
    }

    #[test]
    fn the_oldest_unproven_connection_makes_room() {
        let g = gate(3, 2);
        let a = g.admit().unwrap();
        let b = g.admit().unwrap();
        assert_eq!(stats(&g), (2, 2));
        // The unproven share is full: the oldest (a) goes.
        let c = g.admit().unwrap();
        assert!(a.evict.is_cancelled() && !b.evict.is_cancelled());
        assert_eq!(stats(&g), (2, 2));
        // Its ticket frees nothing: its slot is c's.
        drop(a);
        assert_eq!(stats(&g), (2, 2));
        // b proves itself: never evicted, and it leaves the share.
        assert!(g.prove(&b.conn));
        let d = g.admit().unwrap();
        assert_eq!(stats(&g), (3, 2));
        // Every slot taken: the oldest unproven (c) goes, never b.
        let e = g.admit().unwrap();
        assert!(c.evict.is_cancelled() && !b.evict.is_cancelled());
        assert!(
            !g.prove(&c.conn),
            "an evicted connection cannot prove itself"
        );
        assert_eq!(stats(&g), (3, 2));
        drop(c);
        assert!(g.prove(&d.conn) && g.prove(&e.conn));
        // All proven: nobody to evict, the new connection must wait.
        assert!(g.admit().is_none());
        drop((b, d));
        assert_eq!(stats(&g), (1, 0));
        drop(e);
        assert_eq!(stats(&g), (0, 0));
    }
}
