//! The dead-letter flood breaker of one partition (see [`crate::config::BreakerConfig`]).
//!
//! A bad deploy makes every record fail; without a breaker the runtime faithfully drains the
//! whole topic into the DLQ, and on-call then replays millions of records. The breaker stops
//! that after a threshold: the partition is paused and its records stay where they are.
//!
//! ```text
//!            trip (N dead letters in a row, or M of the last W outcomes)
//!   Closed ───────────────────────────────────────────────▶ Open ◀──────────┐
//!     ▲                                                      │ cool-down     │ probe
//!     │ probe handled / sent to a retry tier                 ▼ (or operator) │ dead-lettered
//!     └────────────────────────────────────────────────── HalfOpen ──────────┘ (cool-down × 2)
//! ```
//!
//! [`Breaker`] is the pure state machine, driven by record outcomes and a clock passed in. The
//! partition task keeps it beside its batch counters (no lock per record) and asks it, for
//! every record outcome, whether the record may go where it was going:
//!
//! - *Closed*: every outcome is counted; the dead letter that reaches a limit is sent, and the
//!   breaker opens.
//! - *Open*: the task takes no new record. Handler calls already running finish; one that ends
//!   handled or in a retry tier gets that outcome, one that would be dead-lettered is *held*:
//!   not sent, no outcome, so the stored offset stays before it. Then the task drains its
//!   hand-offs, stores its frontier and ends; its supervisor keeps the partition paused until
//!   the cool-down ends (or an operator closes the breaker), seeks back to the stored offset
//!   (the first record without a durable outcome) and starts a task half-open.
//! - *HalfOpen*: one record is taken and tried. Handled or sent to a retry tier closes the
//!   breaker; dead-lettered (it is sent: a record that is poison by itself must not stop its
//!   partition for ever) opens it again with a doubled cool-down, capped.
//!
//! At-least-once holds throughout: nothing past a held record is stored, and the records after
//! it that finished meanwhile are handled again after the seek (as after a crash).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::config::BreakerConfig;
use crate::dead_letter::{Alerts, BreakerAlert, BreakerTransition};
use crate::metrics as m;

use super::signal::Signal;

/// Where the breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    /// Records flow; outcomes are counted.
    Closed,
    /// Paused until `until`.
    Open { until: Instant },
    /// One record may be tried; `probing` once it was taken.
    HalfOpen { probing: bool },
}

/// What to do with a record's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// As decided: handled, retried or dead-lettered.
    Admit,
    /// Dead-lettered, and this dead letter trips the breaker: it is sent, nothing after it.
    Trip,
    /// The record tried half-open is dead-lettered: it is sent, and the breaker opens again.
    Reopen,
    /// The record tried half-open was not dead-lettered: the breaker closes.
    Close,
    /// The breaker is open: the record is not dead-lettered, gets no outcome and stays in the
    /// topic (it is tried again after the cool-down).
    Hold,
}

/// The configured limits, clamped once by [`Breaker::new`] (every count at least 1,
/// `window_dead` within `window`, `max_cool_down` at least `cool_down`), so the state machine
/// needs no checks of its own: see [`BreakerConfig`] for each field's meaning.
#[derive(Debug, Clone, Copy)]
struct Limits {
    /// Dead letters in a row that trip (at least 1).
    consecutive: u32,
    /// Outcomes remembered in the ring (at least 1).
    window: u32,
    /// Dead letters in the ring that trip (1 to `window`).
    window_dead: u32,
    /// The first cool-down after tripping.
    cool_down: Duration,
    /// The longest cool-down doubling may reach (at least `cool_down`).
    max_cool_down: Duration,
}

/// The state machine of one partition's breaker.
#[derive(Debug, Clone)]
pub(crate) struct Breaker {
    /// `None`: disabled (every verdict is [`Verdict::Admit`]).
    limits: Option<Limits>,
    /// Closed, open until an instant, or half-open with one record being tried.
    state: State,
    /// Dead letters in a row.
    consecutive: u32,
    /// The last `window` outcomes, one bit each (1 = dead letter), as a ring.
    ring: Vec<u64>,
    /// Where the next outcome goes in the ring.
    next: u32,
    /// Outcomes in the ring (up to `window`).
    filled: u32,
    /// Dead letters in the ring.
    dead: u32,
    /// The cool-down of the next opening.
    cool_down: Duration,
}

impl Default for Breaker {
    /// A disabled breaker.
    fn default() -> Self {
        Breaker {
            limits: None,
            state: State::Closed,
            consecutive: 0,
            ring: Vec::new(),
            next: 0,
            filled: 0,
            dead: 0,
            cool_down: Duration::ZERO,
        }
    }
}

impl Breaker {
    /// A closed breaker with `config`'s limits (disabled if it says so).
    pub(crate) fn new(config: &BreakerConfig) -> Self {
        if !config.enabled {
            return Breaker::default();
        }
        let window = config.window.max(1);
        Breaker {
            limits: Some(Limits {
                consecutive: config.consecutive.max(1),
                window,
                window_dead: config.window_dead_letters.clamp(1, window),
                cool_down: config.cool_down,
                max_cool_down: config.max_cool_down.max(config.cool_down),
            }),
            ring: vec![0; window.div_ceil(64) as usize],
            cool_down: config.cool_down,
            ..Breaker::default()
        }
    }

    #[cfg(test)]
    pub(crate) fn state(&self) -> State {
        self.state
    }

    /// The outcome of a record: `dead` if it is to be dead-lettered. `now` is read only when
    /// the breaker opens.
    #[inline]
    pub(crate) fn outcome(&mut self, dead: bool, now: impl FnOnce() -> Instant) -> Verdict {
        let Some(limits) = self.limits else {
            return Verdict::Admit;
        };
        match self.state {
            State::Closed => {
                if !dead && self.dead == 0 {
                    // The common case: the ring holds no dead letter, so where this outcome
                    // goes in it does not matter.
                    self.consecutive = 0;
                    self.filled = self.filled.saturating_add(1).min(limits.window);
                    return Verdict::Admit;
                }
                self.count(dead, limits.window);
                if dead
                    && (self.consecutive >= limits.consecutive || self.dead >= limits.window_dead)
                {
                    self.open(now(), limits);
                    Verdict::Trip
                } else {
                    Verdict::Admit
                }
            }
            State::Open { .. } if dead => Verdict::Hold,
            State::Open { .. } => Verdict::Admit,
            State::HalfOpen { .. } if dead => {
                self.open(now(), limits);
                Verdict::Reopen
            }
            State::HalfOpen { .. } => {
                self.close();
                Verdict::Close
            }
        }
    }

    fn count(&mut self, dead: bool, window: u32) {
        let (word, bit) = ((self.next / 64) as usize, self.next % 64);
        if self.filled == window {
            if self.ring[word] & (1 << bit) != 0 {
                self.dead -= 1;
            }
        } else {
            self.filled += 1;
        }
        if dead {
            self.ring[word] |= 1 << bit;
            self.dead += 1;
            self.consecutive = self.consecutive.saturating_add(1);
        } else {
            self.ring[word] &= !(1 << bit);
            self.consecutive = 0;
        }
        self.next = (self.next + 1) % window;
    }

    fn open(&mut self, now: Instant, limits: Limits) {
        self.state = State::Open {
            until: now + self.cool_down,
        };
        self.cool_down = self.cool_down.saturating_mul(2).min(limits.max_cool_down);
    }

    /// Closed, counts cleared, the cool-down back to its first length.
    pub(crate) fn close(&mut self) {
        self.state = State::Closed;
        self.consecutive = 0;
        self.ring.iter_mut().for_each(|w| *w = 0);
        self.next = 0;
        self.filled = 0;
        self.dead = 0;
        if let Some(limits) = self.limits {
            self.cool_down = limits.cool_down;
        }
    }

    /// If open and the cool-down is over at `now`: half-open. True if it is half-open now.
    pub(crate) fn half_open(&mut self, now: Instant) -> bool {
        match self.state {
            State::Open { until } if now >= until => {
                self.state = State::HalfOpen { probing: false };
                true
            }
            State::HalfOpen { .. } => true,
            _ => false,
        }
    }

    /// The breaker is open but this state does not know it (its task ended by a failure, not
    /// by opening): half-open.
    pub(crate) fn resume_after_failure(&mut self) {
        if self.state == State::Closed && self.limits.is_some() {
            self.state = State::HalfOpen { probing: false };
        }
    }

    /// A record was taken: half-open, it is the one tried.
    #[inline]
    pub(crate) fn taken(&mut self) {
        if self.state == (State::HalfOpen { probing: false }) {
            self.state = State::HalfOpen { probing: true };
        }
    }

    /// Whether the partition may take a record: closed, or half-open with no record tried yet.
    #[inline]
    pub(crate) fn may_take(&self) -> bool {
        matches!(
            self.state,
            State::Closed | State::HalfOpen { probing: false }
        )
    }

    #[inline]
    pub(crate) fn is_open(&self) -> bool {
        matches!(self.state, State::Open { .. })
    }

    /// When an open breaker's cool-down ends.
    pub(crate) fn until(&self) -> Option<Instant> {
        match self.state {
            State::Open { until } => Some(until),
            _ => None,
        }
    }

    /// Dead letters in a row, dead letters in the window, outcomes in the window.
    pub(crate) fn counts(&self) -> (u32, u32, u32) {
        (self.consecutive, self.dead, self.filled)
    }

    /// Dead letters in a row, dead letters per window, window.
    fn limits(&self) -> (u32, u32, u32) {
        self.limits
            .map_or((0, 0, 0), |l| (l.consecutive, l.window_dead, l.window))
    }
}

/// What the rest of the process sees of one partition's breaker: whether it is open, and an
/// operator's request to close it. Owned by the partition's supervisor.
pub(crate) struct BreakerControl {
    group: String,
    topic: String,
    partition: i32,
    /// Open or half-open (the gauge's value).
    open: AtomicBool,
    close_requested: AtomicBool,
    wake: Notify,
    gauge: metrics::Gauge,
    trips: metrics::Counter,
}

impl BreakerControl {
    pub(crate) fn new(group: &str, topic: &str, partition: i32) -> Self {
        let (g, t) = (group.to_owned(), topic.to_owned());
        let gauge = metrics::gauge!(m::DEAD_LETTER_BREAKER_OPEN, "group" => g.clone(), "topic" => t.clone(), "partition" => partition.to_string());
        BreakerControl {
            trips: metrics::counter!(m::DEAD_LETTER_BREAKER_TRIPS, "group" => g.clone(), "topic" => t.clone()),
            group: g,
            topic: t,
            partition,
            open: AtomicBool::new(false),
            close_requested: AtomicBool::new(false),
            wake: Notify::new(),
            gauge,
        }
    }

    pub(crate) fn is_open(&self) -> bool {
        self.open.load(Ordering::SeqCst)
    }

    /// `tripped`: opened from closed (not again after a probe). A close request still set
    /// then raced with the last close and is not meant for this opening.
    fn opened(&self, tripped: bool) {
        if tripped {
            self.close_requested.store(false, Ordering::SeqCst);
        }
        self.open.store(true, Ordering::SeqCst);
        self.gauge.set(1.0);
        self.trips.increment(1);
    }

    fn closed(&self) {
        // A request made while the record tried was running is answered by this close.
        self.close_requested.store(false, Ordering::SeqCst);
        self.open.store(false, Ordering::SeqCst);
        self.gauge.set(0.0);
    }

    /// An operator's close: false if the breaker is not open. Open: the partition resumes at
    /// once; half-open: it resumes as soon as the record tried has an outcome, whatever it is.
    fn request_close(&self) -> bool {
        if !self.is_open() {
            return false;
        }
        self.close_requested.store(true, Ordering::SeqCst);
        self.wake.notify_one();
        true
    }

    fn take_close_request(&self) -> bool {
        self.close_requested.swap(false, Ordering::SeqCst)
    }

    /// Logs a transition and sends it to the notifiers (`alerts`).
    fn announce(
        &self,
        alerts: &Alerts,
        breaker: &Breaker,
        transition: BreakerTransition,
        offset: Option<i64>,
        cool_down: Option<Duration>,
    ) {
        let (consecutive, dead, outcomes) = breaker.counts();
        let limits = breaker.limits();
        let alert = BreakerAlert {
            group: self.group.clone(),
            topic: self.topic.clone(),
            partition: self.partition,
            transition,
            offset,
            consecutive,
            window_dead_letters: dead,
            window_outcomes: outcomes,
            limits,
            cool_down_ms: cool_down.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        };
        match transition {
            BreakerTransition::Opened | BreakerTransition::Reopened => tracing::error!(
                group = %self.group, topic = %self.topic, partition = self.partition, offset,
                transition = transition.as_str(), consecutive, window_dead_letters = dead,
                window_outcomes = outcomes, limit_consecutive = limits.0,
                limit_window_dead_letters = limits.1, limit_window = limits.2,
                cool_down = ?cool_down.unwrap_or_default(),
                "dead-letter breaker open: partition paused, its records stay in the topic; \
                 one record is tried after the cool-down (RuntimeHandle::close_breaker resumes it now)"
            ),
            _ => tracing::warn!(
                group = %self.group, topic = %self.topic, partition = self.partition, offset,
                transition = transition.as_str(), "dead-letter breaker closed: partition resumed"
            ),
        }
        alerts.breaker(alert);
    }
}

/// Every partition's breaker in this process, by (topic, partition), for the operator's
/// commands on `RuntimeHandle`.
#[derive(Default)]
pub(crate) struct Breakers {
    map: Mutex<HashMap<(String, i32), Arc<BreakerControl>>>,
}

impl Breakers {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<(String, i32), Arc<BreakerControl>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The partition's breaker control while `Registered` lives (a supervisor's lifetime).
    pub(crate) fn register(self: &Arc<Self>, control: Arc<BreakerControl>) -> Registered {
        let key = (control.topic.clone(), control.partition);
        // A partition (newly) assigned here starts closed.
        control.gauge.set(0.0);
        self.map().insert(key.clone(), Arc::clone(&control));
        Registered {
            breakers: Arc::clone(self),
            key,
            control,
        }
    }

    /// See `RuntimeHandle::close_breaker`.
    pub(crate) fn close(&self, topic: &str, partition: i32) -> bool {
        let control = self.map().get(&(topic.to_owned(), partition)).cloned();
        control.is_some_and(|c| c.request_close())
    }

    /// See `RuntimeHandle::reset_breakers`.
    pub(crate) fn close_all(&self) -> usize {
        let controls: Vec<_> = self.map().values().cloned().collect();
        controls.iter().filter(|c| c.request_close()).count()
    }

    /// See `RuntimeHandle::open_breakers`.
    pub(crate) fn open(&self) -> Vec<(String, i32)> {
        let mut open: Vec<_> = self
            .map()
            .iter()
            .filter(|(_, c)| c.is_open())
            .map(|(k, _)| k.clone())
            .collect();
        open.sort();
        open
    }
}

/// A registered breaker control; unregistered (and its gauge cleared) when dropped.
pub(crate) struct Registered {
    breakers: Arc<Breakers>,
    key: (String, i32),
    pub(crate) control: Arc<BreakerControl>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        let mut map = self.breakers.map();
        // A later supervisor of the same partition may have registered its own meanwhile.
        if map
            .get(&self.key)
            .is_some_and(|c| Arc::ptr_eq(c, &self.control))
        {
            map.remove(&self.key);
        }
        drop(map);
        // The partition is no longer ours: whatever the next owner does, not paused here.
        self.control.gauge.set(0.0);
    }
}

impl BreakerControl {
    /// Feeds one record's outcome to `breaker`, the partition task's own state, and announces
    /// what changed through this control (`dead`: the record is to be dead-lettered). False:
    /// the breaker is open and the record must not be dead-lettered; it gets no outcome.
    ///
    /// Called for every record: the common case (admitted, nothing changed) is one call into
    /// the state machine and no lock.
    #[inline]
    pub(crate) fn admits(
        &self,
        alerts: &Alerts,
        breaker: &mut Breaker,
        dead: bool,
        offset: i64,
    ) -> bool {
        let verdict = breaker.outcome(dead, Instant::now);
        if verdict == Verdict::Admit {
            return true;
        }
        let control = self;
        match verdict {
            Verdict::Trip | Verdict::Reopen => {
                control.opened(verdict == Verdict::Trip);
                let cool_down = breaker
                    .until()
                    .map(|until| until.saturating_duration_since(Instant::now()));
                let transition = if verdict == Verdict::Trip {
                    BreakerTransition::Opened
                } else {
                    BreakerTransition::Reopened
                };
                control.announce(alerts, breaker, transition, Some(offset), cool_down);
                true
            }
            Verdict::Close => {
                control.closed();
                control.announce(
                    alerts,
                    breaker,
                    BreakerTransition::Closed,
                    Some(offset),
                    None,
                );
                true
            }
            Verdict::Hold => {
                tracing::debug!(
                    topic = %control.topic, partition = control.partition, offset,
                    "dead-letter breaker open: record not dead-lettered, it stays in the topic"
                );
                false
            }
            Verdict::Admit => true,
        }
    }
}

/// Waits out an open breaker for its supervisor, the partition paused by the caller: until
/// the cool-down ends (half-open) or an operator closes it. False if the partition was
/// revoked or the runtime stops (`stop`) first. Transitions go to `alerts`.
pub(crate) async fn wait_out(
    (alerts, stop): (&Alerts, &Signal),
    control: &BreakerControl,
    breaker: &mut Breaker,
    revoked: &Signal,
) -> bool {
    loop {
        if control.take_close_request() {
            breaker.close();
            control.closed();
            control.announce(
                alerts,
                breaker,
                BreakerTransition::ClosedByOperator,
                None,
                None,
            );
            return true;
        }
        let Some(until) = breaker.until() else {
            // Half-open already (a task that failed while trying its record): try again.
            return true;
        };
        tokio::select! {
            _ = tokio::time::sleep_until(until.into()) => {
                breaker.half_open(Instant::now());
                tracing::info!(
                    topic = %control.topic, partition = control.partition,
                    "dead-letter breaker half-open: trying one record"
                );
                return true;
            }
            _ = control.wake.notified() => {}
            _ = revoked.cancelled() => return false,
            _ = stop.cancelled() => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(consecutive: u32, window: u32, window_dead: u32) -> BreakerConfig {
        BreakerConfig {
            enabled: true,
            consecutive,
            window,
            window_dead_letters: window_dead,
            cool_down: Duration::from_secs(60),
            max_cool_down: Duration::from_secs(600),
        }
    }

    /// Feeds `outcomes` (true = dead letter); the verdicts.
    fn feed(
        b: &mut Breaker,
        now: Instant,
        outcomes: impl IntoIterator<Item = bool>,
    ) -> Vec<Verdict> {
        outcomes.into_iter().map(|d| b.outcome(d, || now)).collect()
    }

    #[test]
    fn trips_on_the_nth_dead_letter_in_a_row() {
        let now = Instant::now();
        let mut b = Breaker::new(&config(5, 200, 200));
        let v = feed(&mut b, now, [true; 4]);
        assert!(v.iter().all(|v| *v == Verdict::Admit));
        assert!(b.may_take());
        // A success resets the run.
        assert_eq!(b.outcome(false, || now), Verdict::Admit);
        assert_eq!(feed(&mut b, now, [true; 4]), vec![Verdict::Admit; 4]);
        assert_eq!(b.outcome(true, || now), Verdict::Trip);
        assert_eq!(
            b.state(),
            State::Open {
                until: now + Duration::from_secs(60)
            }
        );
        assert!(!b.may_take());
        assert!(b.is_open());
        // While open: dead letters are held, other outcomes pass and are not counted.
        assert_eq!(b.outcome(true, || now), Verdict::Hold);
        assert_eq!(b.outcome(false, || now), Verdict::Admit);
        assert!(b.is_open());
    }

    #[test]
    fn trips_on_a_share_of_the_window() {
        let now = Instant::now();
        // 3 dead letters among the last 6 outcomes, never 3 in a row.
        let mut b = Breaker::new(&config(3, 6, 3));
        let v = feed(&mut b, now, [true, false, true, false, true]);
        assert_eq!(v[..4], [Verdict::Admit; 4]);
        assert_eq!(v[4], Verdict::Trip);
        assert_eq!(b.counts(), (1, 3, 5));
        // Dead letters that slid out of the window no longer count.
        let mut b = Breaker::new(&config(3, 6, 3));
        let v = feed(
            &mut b,
            now,
            [true, false, false, false, false, false, true, false, true],
        );
        assert!(v.iter().all(|v| *v == Verdict::Admit), "{v:?}");
        assert_eq!(b.counts(), (1, 2, 6));
        assert_eq!(b.outcome(true, || now), Verdict::Trip);
        assert_eq!(b.counts(), (2, 3, 6));
    }

    #[test]
    fn a_window_of_many_words_slides() {
        let now = Instant::now();
        let mut b = Breaker::new(&config(1000, 200, 100));
        // 3.5% spread out (one in 28), for a long time: never trips.
        for i in 0..100_000u32 {
            assert_eq!(b.outcome(i % 28 == 0, || now), Verdict::Admit, "at {i}");
        }
        assert!(b.counts().1 <= 8);
        // Every other record for 198 outcomes: 99 in the window. The next dead letter trips.
        b.close();
        let v = feed(&mut b, now, (0..198).map(|i| i % 2 == 0));
        assert!(v.iter().all(|v| *v == Verdict::Admit));
        assert_eq!(b.counts().1, 99);
        assert_eq!(b.outcome(false, || now), Verdict::Admit);
        assert_eq!(b.outcome(true, || now), Verdict::Trip);
    }

    #[test]
    fn half_open_probe_closes_or_reopens_with_a_growing_capped_cool_down() {
        let t0 = Instant::now();
        let mut b = Breaker::new(&config(2, 10, 10));
        feed(&mut b, t0, [true, true]);
        let until = b.until().unwrap();
        assert_eq!(until, t0 + Duration::from_secs(60));
        assert!(!b.half_open(until - Duration::from_millis(1)));
        assert!(b.half_open(until));
        assert!(b.may_take());
        b.taken();
        assert!(!b.may_take(), "one record at a time while half-open");
        // The probe is dead-lettered: open again, for twice as long.
        let t1 = until;
        assert_eq!(b.outcome(true, || t1), Verdict::Reopen);
        assert_eq!(b.until(), Some(t1 + Duration::from_secs(120)));
        // 240, 480, then capped at 600.
        for want in [240, 480, 600, 600] {
            let t = b.until().unwrap();
            assert!(b.half_open(t));
            b.taken();
            assert_eq!(b.outcome(true, || t), Verdict::Reopen);
            assert_eq!(b.until(), Some(t + Duration::from_secs(want)));
        }
        // A probe sent to a retry tier (not dead) closes it; the cool-down starts over.
        let t = b.until().unwrap();
        assert!(b.half_open(t));
        b.taken();
        assert_eq!(b.outcome(false, || t), Verdict::Close);
        assert_eq!(b.state(), State::Closed);
        assert_eq!(b.counts(), (0, 0, 0));
        feed(&mut b, t, [true, true]);
        assert_eq!(b.until(), Some(t + Duration::from_secs(60)));
    }

    #[test]
    fn an_operator_close_clears_everything() {
        let now = Instant::now();
        let mut b = Breaker::new(&config(1, 4, 4));
        assert_eq!(b.outcome(true, || now), Verdict::Trip);
        b.close();
        assert_eq!(b.state(), State::Closed);
        assert!(b.may_take());
        assert_eq!(b.outcome(false, || now), Verdict::Admit);
        assert_eq!(b.outcome(true, || now), Verdict::Trip);
    }

    #[test]
    fn disabled_admits_everything() {
        let now = Instant::now();
        let mut b = Breaker::new(&BreakerConfig {
            enabled: false,
            ..config(1, 1, 1)
        });
        assert!(feed(&mut b, now, [true; 1000])
            .iter()
            .all(|v| *v == Verdict::Admit));
        assert!(b.may_take());
        b.taken();
        assert!(b.may_take());
    }

    #[test]
    fn defaults_never_trip_on_a_steady_poison_rate() {
        // 10% poison, spread at random (a fixed seed), over a million records.
        let now = Instant::now();
        let mut b = Breaker::new(&BreakerConfig::default());
        let mut rng = fastrand::Rng::with_seed(7);
        for i in 0..1_000_000u32 {
            assert_eq!(
                b.outcome(rng.f64() < 0.10, || now),
                Verdict::Admit,
                "at {i}"
            );
        }
        // And a bad deploy trips it within 100 records (earlier if the window already held
        // some of the steady dead letters).
        let v = feed(&mut b, now, [true; 100]);
        let trip = v.iter().position(|v| *v == Verdict::Trip).expect("tripped");
        assert!(v[..trip].iter().all(|v| *v == Verdict::Admit));
        assert!(trip >= 60, "tripped after {} dead letters", trip + 1);
        // From closed and clear, after exactly 100.
        let mut b = Breaker::new(&BreakerConfig::default());
        let v = feed(&mut b, now, [true; 100]);
        assert_eq!(v[..99], vec![Verdict::Admit; 99][..]);
        assert_eq!(v[99], Verdict::Trip);
    }

    #[test]
    fn operator_requests_only_count_while_open() {
        let c = BreakerControl::new("g", "t", 0);
        assert!(!c.request_close(), "closed: nothing to close");
        assert!(!c.take_close_request());
        c.opened(true);
        assert!(c.request_close());
        assert!(c.take_close_request());
        assert!(!c.take_close_request());
        // A request made while half-open is answered by the probe's close…
        assert!(c.request_close());
        c.closed();
        assert!(!c.take_close_request());
        assert!(!c.is_open());
        // …or kept when the probe opens it again.
        c.opened(true);
        assert!(c.request_close());
        c.opened(false);
        assert!(c.take_close_request());
        // A request that raced with a close is not carried into the next trip.
        c.close_requested.store(true, Ordering::SeqCst);
        c.closed();
        c.close_requested.store(true, Ordering::SeqCst);
        c.opened(true);
        assert!(!c.take_close_request());
    }
}
