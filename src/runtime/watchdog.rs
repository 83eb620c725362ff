//! Handler calls seen from outside the partition tasks: the age of the oldest call running in
//! each partition (a gauge), and handlers that block their thread.
//!
//! A handler that blocks its thread (`std::thread::sleep`, a blocking client, a long
//! computation between two `.await`s) cannot be cancelled: the partition task is stuck inside
//! one `poll` of the handler's future, and no timer of that task can fire. It is seen from a
//! thread of its own, which advances a coarse clock ([`TICK`]) and reads, for every partition,
//! the tick at which the handler poll now running began. A poll still running
//! [`Config::handler_blocking_after`](crate::Config::handler_blocking_after) later is reported
//! once, at ERROR, with the advice to use `spawn_blocking` or an async client, and counted in
//! [`HANDLER_BLOCKING`](crate::metrics::HANDLER_BLOCKING).
//!
//! Why a plain thread and a per-poll mark rather than a task on the tokio runtime measuring
//! its own timer's lateness: a task on the runtime cannot run when every worker is blocked (the
//! worst case), a blocked worker does not even delay it while another worker drives the timers,
//! and lateness on a merely busy machine would be reported as blocking. A single poll that
//! lasts seconds, by contrast, only happens when something blocks (or the process gets no CPU
//! at all for that long, which is worth an ERROR too), and the report names the partition and
//! offset.
//!
//! The per-record cost is three relaxed atomic stores and one load per poll of a handler
//! future; the clock is read by this thread, not by the partition tasks.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use crate::metrics as m;

/// The watchdog's clock period: the resolution of the oldest-call gauge and of blocking
/// detection.
pub(crate) const TICK: Duration = Duration::from_millis(100);
/// The oldest-call gauges are published every this many ticks.
const GAUGE_EVERY: u64 = 5;

/// One per runtime: the coarse clock and the partitions it watches.
pub(crate) struct Watchdog {
    /// Ticks since start, from 1 (0 marks "not running" in [`Calls`]).
    tick: AtomicU64,
    /// A poll running this many ticks is blocking.
    blocking_ticks: u64,
    /// The partitions to check, held weakly: a task that ends drops its [`Calls`] and the next
    /// check forgets it, with no unregistering on the task's way out. Locked once per tick by the
    /// watchdog thread and once per task start, never per record.
    partitions: Mutex<Vec<Weak<Calls>>>,
}

impl Watchdog {
    /// Starts the watchdog thread; it ends by itself once the returned value is dropped.
    pub(crate) fn start(blocking_after: Duration) -> Arc<Watchdog> {
        let ticks = blocking_after.as_nanos().div_ceil(TICK.as_nanos()).max(1);
        let watchdog = Arc::new(Watchdog {
            tick: AtomicU64::new(1),
            blocking_ticks: u64::try_from(ticks).unwrap_or(u64::MAX),
            partitions: Mutex::new(Vec::new()),
        });
        let weak = Arc::downgrade(&watchdog);
        let spawned = std::thread::Builder::new()
            .name("sidetrack-watchdog".into())
            .spawn(move || loop {
                std::thread::sleep(TICK);
                let Some(watchdog) = weak.upgrade() else {
                    return;
                };
                watchdog.check();
            });
        if let Err(e) = spawned {
            // The runtime works without it; only the oldest-call gauge and blocking reports
            // are missing.
            tracing::error!(error = %e, "cannot start the handler watchdog thread; blocked handlers will not be reported");
        }
        watchdog
    }

    /// The coarse clock, for marking when a poll or a call began.
    fn now(&self) -> u64 {
        self.tick.load(Ordering::Relaxed)
    }

    /// Watches a partition task's calls (`slots`: how many may run at once).
    pub(crate) fn watch(
        self: &Arc<Self>,
        group: &str,
        topic: &str,
        partition: i32,
        slots: usize,
    ) -> Arc<Calls> {
        let calls = Arc::new(Calls {
            watchdog: Arc::clone(self),
            topic: topic.to_owned(),
            partition,
            polling_since: AtomicU64::new(0),
            polling_offset: AtomicI64::new(-1),
            reported: AtomicU64::new(0),
            started: (0..slots.max(1)).map(|_| AtomicU64::new(0)).collect(),
            oldest: metrics::gauge!(m::HANDLER_OLDEST_CALL_SECONDS, "group" => group.to_owned(), "topic" => topic.to_owned(), "partition" => partition.to_string()),
            blocking: metrics::counter!(m::HANDLER_BLOCKING, "group" => group.to_owned(), "topic" => topic.to_owned()),
        });
        let mut partitions = self.partitions.lock().unwrap_or_else(|e| e.into_inner());
        partitions.retain(|w| w.strong_count() > 0);
        partitions.push(Arc::downgrade(&calls));
        calls
    }

    /// One tick: blocking polls, and now and then the oldest-call gauges.
    fn check(&self) {
        let now = self.tick.fetch_add(1, Ordering::Relaxed) + 1;
        let gauges = now % GAUGE_EVERY == 0;
        let watched: Vec<Arc<Calls>> = {
            let mut partitions = self.partitions.lock().unwrap_or_else(|e| e.into_inner());
            partitions.retain(|w| w.strong_count() > 0);
            partitions.iter().filter_map(Weak::upgrade).collect()
        };
        for calls in watched {
            calls.check(now, self.blocking_ticks, gauges);
        }
    }
}

/// The handler calls of one partition task, as the watchdog sees them.
pub(crate) struct Calls {
    /// Keeps the clock running while the task lives.
    watchdog: Arc<Watchdog>,
    /// The partition's topic, for the blocking-poll log line.
    topic: String,
    /// The partition, for the log line (-1 for the test kit's detached calls).
    partition: i32,
    /// Tick at which the handler poll now running began (0: none running). A partition task
    /// polls one handler future at a time, so one mark per partition is enough.
    polling_since: AtomicU64,
    /// Offset of the record whose handler is being polled.
    polling_offset: AtomicI64,
    /// The `polling_since` last reported as blocking (each blocking poll is reported once).
    reported: AtomicU64,
    /// Per call slot: tick at which a call that waits began (0: free, or a call that has not
    /// waited yet).
    started: Box<[AtomicU64]>,
    /// [`HANDLER_OLDEST_CALL_SECONDS`](crate::metrics::HANDLER_OLDEST_CALL_SECONDS): age of
    /// the oldest running call, 0 when none runs.
    oldest: metrics::Gauge,
    /// [`HANDLER_BLOCKING`](crate::metrics::HANDLER_BLOCKING): polls that held their thread
    /// past `handler_blocking_after`, each counted once.
    blocking: metrics::Counter,
}

impl Calls {
    /// One look at the partition at tick `now`: reports (once) a poll running for
    /// `blocking_ticks` or more, with the record's offset and what to do about it, and, when
    /// `gauges`, sets the oldest-call gauge from the oldest mark (the running poll included).
    fn check(&self, now: u64, blocking_ticks: u64, gauges: bool) {
        let since = self.polling_since.load(Ordering::Relaxed);
        if since != 0
            && now.saturating_sub(since) >= blocking_ticks
            && self.reported.swap(since, Ordering::Relaxed) != since
        {
            self.blocking.increment(1);
            let blocked_for = TICK * u32::try_from(now - since).unwrap_or(u32::MAX);
            tracing::error!(
                topic = %self.topic,
                partition = self.partition,
                offset = self.polling_offset.load(Ordering::Relaxed),
                ?blocked_for,
                "a handler call is blocking its thread: one poll of its future has not returned \
                 for {blocked_for:?}, so the runtime cannot run other work on that thread nor \
                 cancel the call at handler_timeout. Run blocking code in \
                 tokio::task::spawn_blocking, or use an async client"
            );
        }
        if gauges {
            let oldest = self
                .started
                .iter()
                .map(|s| s.load(Ordering::Relaxed))
                .chain(std::iter::once(since))
                .filter(|&t| t != 0)
                .min();
            let age = oldest.map_or(0.0, |t| (now.saturating_sub(t)) as f64 * TICK.as_secs_f64());
            self.oldest.set(age);
        }
    }

    /// Calls that no watchdog checks (a caller outside a runtime: the test kit), with one
    /// slot and metric handles that record nothing. Marking calls still works; nobody reads
    /// the marks.
    pub(crate) fn detached() -> Arc<Calls> {
        Arc::new(Calls {
            watchdog: Arc::new(Watchdog {
                tick: AtomicU64::new(1),
                blocking_ticks: u64::MAX,
                partitions: Mutex::new(Vec::new()),
            }),
            topic: String::new(),
            partition: -1,
            polling_since: AtomicU64::new(0),
            polling_offset: AtomicI64::new(-1),
            reported: AtomicU64::new(0),
            started: Box::new([AtomicU64::new(0)]),
            oldest: metrics::Gauge::noop(),
            blocking: metrics::Counter::noop(),
        })
    }

    /// Makes the handler call in slot `slot` of the record at `offset` (watched too: a
    /// handler may block before it returns its future) and wraps it.
    pub(crate) fn watched<F: Future>(
        &self,
        slot: usize,
        offset: i64,
        make: impl FnOnce() -> F,
    ) -> Watched<'_, F> {
        self.polling_offset.store(offset, Ordering::Relaxed);
        self.polling_since
            .store(self.watchdog.now(), Ordering::Relaxed);
        let call = make();
        self.polling_since.store(0, Ordering::Relaxed);
        Watched {
            calls: self,
            slot,
            offset,
            call,
        }
    }
}

impl Drop for Calls {
    /// A task that ends leaves no call behind in the gauge.
    fn drop(&mut self) {
        self.oldest.set(0.0);
    }
}

pin_project_lite::pin_project! {
    /// A handler call marked for the watchdog while it is polled, and while it waits.
    pub(crate) struct Watched<'a, F> {
        calls: &'a Calls,
        slot: usize,
        offset: i64,
        #[pin]
        call: F,
    }

    impl<F> PinnedDrop for Watched<'_, F> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(s) = this.calls.started.get(*this.slot) {
                s.store(0, Ordering::Relaxed);
            }
        }
    }
}

impl<F: Future> Future for Watched<'_, F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let calls = *this.calls;
        let now = calls.watchdog.now();
        calls.polling_offset.store(*this.offset, Ordering::Relaxed);
        calls.polling_since.store(now, Ordering::Relaxed);
        let poll = this.call.poll(cx);
        calls.polling_since.store(0, Ordering::Relaxed);
        if poll.is_pending() {
            if let Some(s) = calls.started.get(*this.slot) {
                if s.load(Ordering::Relaxed) == 0 {
                    s.store(now, Ordering::Relaxed);
                }
            }
        }
        poll
    }
}
