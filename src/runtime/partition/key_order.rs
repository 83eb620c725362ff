//! The key-order stage of a partition task (`[retry] keep_key_order`): the partition's side of
//! `docs/key-order.md`. On a source partition it routes each record before it starts (run it,
//! or hold it in the key-order log), marks a failing record as its key's head, reads the log
//! (first, before any source record, then beside the queue) and runs the held records when
//! their key is released. On a retry tier it appends the `release` of a head that ended, and
//! dead-letters a head whose key waited past `max_key_wait`.
//!
//! A stage of its own because the loops only ask it a few questions (may the partition take a
//! record, what does this record become, what does this log event lead to); the promise
//! itself is in the pure [`crate::key_order::state`] model, and the bytes in
//! [`crate::key_order::wire`]. Its mutable state sits behind a `Mutex` that only this task
//! takes (never across an await), so the loops and the futures they drive share it without
//! threading it through every step.
//!
//! # The rules this stage keeps
//!
//! The order of writes is what makes the promise survive a crash, a rebalance or a restart
//! (each crash point and what it leaves is tabled in `docs/key-order.md`):
//!
//! 1. A source record that fails while its key is free: its `head` event is acknowledged by the
//!    log **before** its hand-off to the retry tier starts, and its source offset is durable
//!    only once both are acknowledged ([`key_order_failed`](PartitionTask::key_order_failed)
//!    says whether a `head` is owed; [`append_head`](PartitionTask::append_head) writes it).
//! 2. A source record of a waiting key is not called: its `held` event (the whole record) is
//!    appended instead, and its source offset is durable when that is acknowledged.
//! 3. A head that ends on its retry tier (handled, or acknowledged by the DLQ) appends its
//!    `release` **before** the tier's offset may be stored; a head that fails again moves on
//!    to its next tier carrying its marker and writes nothing.
//! 4. A new owner reads its log partition up to where it ended at the assignment before it
//!    takes any source record ([`key_order_may_take`](PartitionTask::key_order_may_take) is
//!    false until then), so the waiting keys and their held records are rebuilt first.
//! 5. Appends of one partition go one at a time, from send to acknowledgement, in the order
//!    the partition decided them (a ticket taken with the decision, [`Ticket`]): a resent append
//!    never lands behind a later one, and a record held behind a head is never in the log
//!    before that head's `head` event.
//!
//! What it never does: store a source offset whose record has no durable outcome, store a log
//! offset past a `head` whose `release` was not read, or release a key while any of its pending
//! records has no `release` read (the caps dead-letter rather than release).

use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::FutureExt;

use crate::handler::{Handler, Message};
use crate::key_order::log::{append, LogReader, Read};
use crate::key_order::state::{HeldRead, Next, Route};
use crate::key_order::wire::{Ended, Event, HeldRecord};
use crate::metrics as m;
use crate::outcome::{Disposition, Reason};
use crate::retry::scheduler::now_ms;
use crate::runtime::handoff::{is_too_large, Abandoned, Mark};
use crate::runtime::scheduler::key_hash;

use super::call::{Nothing, Step};
use super::key_order_state::{
    Held, HeldEnd, HeldFuture, KeyOrderStage, Routed, SourceStage, Ticket,
};
use super::task::{End, PartitionTask};

impl PartitionTask {
    /// Opens the key-order log of a source partition (before the loop takes any record).
    pub(super) async fn key_order_open(&self) -> Result<(), End> {
        let Some(KeyOrderStage::Source(s)) = &self.key_order else {
            return Ok(());
        };
        let config = self.shared.config.clone();
        let group = self.shared.topology.key_order_group();
        let (topic, partition) = (s.log_topic.to_string(), s.partition);
        let timeout = config.provisioning.timeout;
        let opened = tokio::task::spawn_blocking(move || {
            LogReader::open(&config, &group, &topic, partition, timeout)
        })
        .await
        .map_err(|e| End::Failed(format!("opening the key-order log: {e}")))?
        .map_err(|e| End::Failed(e.to_string()))?;
        *s.reader.lock().await = Some(opened);
        Ok(())
    }

    /// Whether the key-order stage lets the partition take another record: the log was read
    /// up to where it ended at the assignment, fewer than `max_waiting_keys` keys wait, and
    /// (`partition` ordering) no held record is running.
    #[inline]
    pub(super) fn key_order_may_take(&self, held_running: usize) -> bool {
        let Some(KeyOrderStage::Source(s)) = &self.key_order else {
            return true;
        };
        let caught_up = s
            .reader
            .try_lock()
            .map(|r| r.as_ref().is_some_and(LogReader::caught_up))
            .unwrap_or(false);
        caught_up && s.inner().state.may_take() && !(s.sequential && held_running > 0)
    }

    /// What a source record about to start becomes (`Run` on a partition without the stage or
    /// with no key waiting: one branch).
    #[inline]
    pub(super) fn key_order_route(&self, msg: &Message) -> Routed {
        let Some(KeyOrderStage::Source(s)) = &self.key_order else {
            return Routed::Run;
        };
        let Some(key) = msg.key() else {
            return Routed::Run;
        };
        let mut inner = s.inner();
        if inner.state.is_idle() && inner.notes.is_empty() {
            return Routed::Run;
        }
        let k = key_hash(key);
        let route = inner.state.route(k, msg.offset());
        tracing::debug!(offset = msg.offset(), key_hash = %format_args!("{k:016x}"), ?route, "key-order route");
        match route {
            Route::Run => {
                if let Some(head) = inner.state.take_note(k) {
                    inner.notes.push((msg.offset(), head));
                }
                Routed::Run
            }
            Route::RunHead => Routed::Run,
            Route::Hold { head } => {
                s.held_total.increment(1);
                Routed::Hold(head)
            }
            Route::Full { head } => {
                s.full_total.increment(1);
                Routed::Full(head)
            }
        }
    }

    /// A record handled: `Step::Done`, or, for its key's own head read again on its source
    /// after a crash or a head ending on its retry tier, `Step::Release` (durable once the
    /// `release` is in the log).
    pub(super) fn key_order_done(&self, msg: Message) -> Step {
        match &self.key_order {
            None => Step::Done,
            Some(KeyOrderStage::Tier { .. }) => {
                if msg.envelope().is_some_and(|e| e.key_order_since.is_some()) {
                    Step::Release(msg, Ended::Handled)
                } else {
                    Step::Done
                }
            }
            Some(KeyOrderStage::Source(s)) => {
                let Some(key) = msg.key() else {
                    return Step::Done;
                };
                let mut inner = s.inner();
                if !inner.notes.is_empty() {
                    let offset = msg.offset();
                    inner.notes.retain(|(o, _)| *o != offset);
                }
                if inner.state.is_idle() || !inner.state.head_handled(key_hash(key), msg.offset()) {
                    return Step::Done;
                }
                drop(inner);
                Step::Release(msg, Ended::Handled)
            }
        }
    }

    /// Just before a record's handler call: `Ok(msg)` to call it, or the step it takes
    /// instead — held behind its key's head, dead-lettered because its key holds too many
    /// (`key-order-full`), or, on a retry tier, a head whose key waited too long
    /// (`key-order-timeout`). `Ok` at once without the stage.
    // Not an error type: both sides carry the record, and `Err` is the rare path.
    #[allow(clippy::result_large_err)]
    #[inline]
    pub(super) fn key_order_before_call(&self, msg: Message) -> Result<Message, Step> {
        if self.key_order.is_none() {
            return Ok(msg);
        }
        if self.key_order_expired(&msg) {
            metrics::counter!(m::KEY_ORDER_CAP_REACHED, "group" => self.shared.topology.group().to_owned(), "topic" => msg.topic().to_owned(), "cap" => "key_wait").increment(1);
            return Err(Step::HandOff(
                msg,
                Disposition::DeadLetter(Reason::KeyOrderTimeout),
                "its key waited longer than retry.max_key_wait behind it".to_owned(),
            ));
        }
        match self.key_order_route(&msg) {
            Routed::Run => Ok(msg),
            Routed::Hold(head) => Err(Step::Hold(msg, head)),
            Routed::Full(head) => Err(Step::HandOff(
                msg,
                Disposition::DeadLetter(Reason::KeyOrderFull),
                format!(
                    "its key already holds retry.max_held_per_key records behind record {head}"
                ),
            )),
        }
    }

    /// Commits the key-order log's stored position (at the end of a task).
    pub(super) fn key_order_commit(&self) {
        if let Some(KeyOrderStage::Source(s)) = &self.key_order {
            if let Ok(reader) = s.reader.try_lock() {
                if let Some(reader) = reader.as_ref() {
                    self.store_log(s, reader);
                    reader.commit();
                }
            }
        }
    }

    /// A retry tier's head whose key waited past `max_key_wait`: dead-lettered instead of run
    /// (`key-order-timeout`).
    pub(super) fn key_order_expired(&self, msg: &Message) -> bool {
        let Some(KeyOrderStage::Tier { max_wait_ms, .. }) = &self.key_order else {
            return false;
        };
        msg.envelope()
            .and_then(|e| e.key_order_since)
            .is_some_and(|since| now_ms().saturating_sub(since) > *max_wait_ms)
    }

    /// The mark a failing record's next hop carries, and whether a `head` event must be
    /// appended before it (a source record handed to a retry tier whose key was free).
    pub(super) fn key_order_failed(&self, msg: &Message, disposition: Disposition) -> (Mark, bool) {
        let Some(KeyOrderStage::Source(s)) = &self.key_order else {
            return (Mark::default(), false);
        };
        let Some(key) = msg.key() else {
            return (Mark::default(), false);
        };
        let mut inner = s.inner();
        let note = inner
            .notes
            .iter()
            .position(|(o, _)| *o == msg.offset())
            .map(|i| inner.notes.swap_remove(i).1);
        let mut mark = Mark {
            since: None,
            after_dead_letter: note,
        };
        if !matches!(disposition, Disposition::Retry { .. }) {
            return (mark, false);
        }
        let now = now_ms();
        let head = inner.state.failed(key_hash(key), msg.offset(), now);
        if head && !inner.state.may_take() {
            // The key just made the partition reach `max_waiting_keys`: intake pauses.
            s.waiting_cap_total.increment(1);
        }
        tracing::debug!(offset = msg.offset(), key_hash = %format_args!("{:016x}", key_hash(key)), head, "key-order: failed to a retry tier");
        mark.since = Some(now);
        (mark, head)
    }

    /// Whether a record that went to `went` (acknowledged) ended a record its key waits on in
    /// the DLQ — a head on its retry tier, or, on the source, a pending record read again (or
    /// just made pending and then too large for its tier) — so that its `release` is appended
    /// now: `Some(ticket)` (the ticket is `None` on a tier, whose releases need no order).
    pub(super) fn key_order_releases_dead(
        &self,
        msg: &Message,
        went: Disposition,
    ) -> Option<Option<Ticket<'_>>> {
        if !matches!(went, Disposition::DeadLetter(_)) {
            return None;
        }
        match &self.key_order {
            Some(KeyOrderStage::Tier { .. })
                if msg.envelope().is_some_and(|e| e.key_order_since.is_some()) =>
            {
                Some(None)
            }
            Some(KeyOrderStage::Source(s)) => {
                let key = msg.key()?;
                let pending = s.inner().state.runs_head(key_hash(key), msg.offset());
                // The ticket is taken with the decision, before any await: what was decided
                // before (records held behind it) is in the log before its release.
                pending.then(|| Some(s.appends.ticket()))
            }
            _ => None,
        }
    }

    /// Appends `event` for `key` to the log partition `partition` of `topic`, until the broker
    /// acknowledges it or the task is told to stop (then the record it stands for has no
    /// outcome, and its offset is not stored). `Ok(false)`: the event is too large for the log
    /// (librdkafka's or the broker's limit) — sending it again cannot help, and every later
    /// append of the partition would wait behind it.
    pub(super) async fn append_durably(
        &self,
        (topic, partition): (&str, i32),
        key: &[u8],
        event: &Event,
    ) -> Result<bool, Abandoned> {
        let shared = &self.shared;
        let (event_kind, event_head) = match event {
            Event::Head { head, .. } => ("head", *head),
            Event::Held { record, .. } => ("held", record.offset),
            Event::Release { head, .. } => ("release", *head),
        };
        let mut backoff = shared.config.handoff.backoff_initial;
        loop {
            let generation = shared.producer.current();
            match append(
                &generation.producer,
                (topic, partition),
                key,
                event,
                shared.config.handoff.timeout,
            )
            .await
            {
                Ok(at) => {
                    tracing::debug!(topic, partition, at, key_hash = %format_args!("{:016x}", key_hash(key)), ?event_kind, head = event_head, "key-order event appended");
                    return Ok(true);
                }
                Err(e) if is_too_large(&e) => {
                    tracing::warn!(topic, partition, error = %e, ?event_kind, head = event_head, "key-order event too large for its log");
                    return Ok(false);
                }
                Err(_) if self.revoked.is_cancelled() || self.stop.is_cancelled() => {
                    return Err(Abandoned::Told)
                }
                Err(e) => {
                    if let Ok(true) = shared.producer.recover(&generation) {
                        continue;
                    }
                    tracing::warn!(topic, partition, error = %e, retry_in = ?backoff, "key-order log append failed; retrying");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = self.stop.cancelled() => return Err(Abandoned::Told),
                _ = self.revoked.cancelled() => return Err(Abandoned::Told),
            }
            backoff = backoff
                .saturating_mul(2)
                .min(shared.config.handoff.backoff_max);
        }
    }

    /// A place in this source partition's append order (`None` on a retry tier, whose releases
    /// need none: each follows its head's `head` event by causality). Taken when the decision
    /// to append is made, before any await.
    pub(super) fn key_order_ticket(&self) -> Option<Ticket<'_>> {
        match &self.key_order {
            Some(KeyOrderStage::Source(s)) => Some(s.appends.ticket()),
            _ => None,
        }
    }

    /// Appends `held(key, msg, head)` to this source partition's log, in `ticket`'s turn.
    pub(super) async fn append_held(
        &self,
        msg: &Message,
        head: i64,
        ticket: Option<Ticket<'_>>,
    ) -> Result<(), Abandoned> {
        let Some(KeyOrderStage::Source(s)) = &self.key_order else {
            return Ok(());
        };
        let event = Event::Held {
            head,
            record: HeldRecord {
                offset: msg.offset(),
                timestamp: msg.timestamp(),
                payload: msg.payload().map(<[u8]>::to_vec),
                headers: msg.headers().to_vec(),
            },
        };
        let key = msg.key().unwrap_or_default();
        let appended = {
            if let Some(t) = &ticket {
                t.turn().await;
            }
            let appended = self
                .append_durably((&s.log_topic, s.partition), key, &event)
                .await;
            drop(ticket);
            appended
        };
        match appended {
            Ok(true) => Ok(()),
            Ok(false) => {
                // Too large to be held: it cannot wait in order, so it goes to the DLQ as
                // `oversized` (without its payload, which stays at its source position), as a
                // record too large for a retry tier does; its key keeps waiting.
                s.inner().state.hold_abandoned(key_hash(key), msg.offset());
                self.handoff
                    .hand_off(
                        msg,
                        Disposition::DeadLetter(Reason::Oversized),
                        "too large for the key-order log, where its key's records wait",
                    )
                    .await
            }
            Err(a) => {
                s.inner().state.hold_abandoned(key_hash(key), msg.offset());
                Err(a)
            }
        }
    }

    /// Appends `head(key, msg)` to this source partition's log (before its hand-off), in
    /// `ticket`'s turn.
    pub(super) async fn append_head(
        &self,
        msg: &Message,
        since: i64,
        ticket: Option<Ticket<'_>>,
    ) -> Result<(), Abandoned> {
        let Some(KeyOrderStage::Source(s)) = &self.key_order else {
            return Ok(());
        };
        let event = Event::Head {
            head: msg.offset(),
            since_ms: since,
        };
        if let Some(t) = &ticket {
            t.turn().await;
        }
        self.append_small(
            (&s.log_topic, s.partition),
            msg.key().unwrap_or_default(),
            &event,
        )
        .await
    }

    /// Appends `release(key, head, ended)` for `msg`, a head (read again on its source
    /// partition, or ending on its retry tier), to its source partition's log, in `ticket`'s
    /// turn on a source partition.
    pub(super) async fn append_release(
        &self,
        msg: &Message,
        ended: Ended,
        ticket: Option<Ticket<'_>>,
    ) -> Result<(), Abandoned> {
        let (topic, partition, head) = match &self.key_order {
            Some(KeyOrderStage::Source(s)) => (Arc::clone(&s.log_topic), s.partition, msg.offset()),
            Some(KeyOrderStage::Tier { log_topic, .. }) => {
                let Some(e) = msg.envelope() else {
                    return Ok(());
                };
                (
                    Arc::clone(log_topic),
                    e.original_partition,
                    e.original_offset,
                )
            }
            None => return Ok(()),
        };
        let event = Event::Release { head, ended };
        if let Some(t) = &ticket {
            t.turn().await;
        }
        self.append_small((&topic, partition), msg.key().unwrap_or_default(), &event)
            .await
    }

    /// Appends a `head` or `release` event (a few bytes besides the record's key). One too large
    /// for the log (a key near the log's size limit) ends the task, loudly: it cannot be left
    /// out without breaking the order, and sending it again cannot help.
    async fn append_small(
        &self,
        at: (&str, i32),
        key: &[u8],
        event: &Event,
    ) -> Result<(), Abandoned> {
        match self.append_durably(at, key, event).await? {
            true => Ok(()),
            false => Err(Abandoned::Failed(format!(
                "a key-order event for a key of {} bytes is too large for the key-order log `{}`",
                key.len(),
                at.0
            ))),
        }
    }

    /// Serves the key-order log without waiting: events already fetched and held records
    /// that finished.
    pub(super) fn key_order_poll<'a, H: Handler>(
        &'a self,
        handler: &'a H,
        held: &mut FuturesUnordered<HeldFuture<'a>>,
    ) -> Result<(), End> {
        let Some(KeyOrderStage::Source(s)) = &self.key_order else {
            return Ok(());
        };
        while let Some(Some(end)) = held.next().now_or_never() {
            self.held_ended(handler, end, held)?;
        }
        let Ok(mut reader) = s.reader.try_lock() else {
            return Ok(());
        };
        let Some(reader) = reader.as_mut() else {
            return Ok(());
        };
        reader.check_position();
        for _ in 0..256 {
            match reader.next().now_or_never() {
                Some(Ok(read)) => self.on_log(handler, s, read, held),
                Some(Err(e)) => {
                    tracing::warn!(topic = %s.log_topic, partition = s.partition, error = %e, "key-order log fetch error");
                    break;
                }
                None => break,
            }
        }
        self.store_log(s, reader);
        Ok(())
    }

    /// Waits for the next key-order event (a log record, or a held record that finished) and
    /// serves it. Never resolves on a partition without the stage.
    pub(super) async fn key_order_next<'a, H: Handler>(
        &'a self,
        handler: &'a H,
        held: &mut FuturesUnordered<HeldFuture<'a>>,
    ) -> Result<(), End> {
        let Some(KeyOrderStage::Source(s)) = &self.key_order else {
            return std::future::pending().await;
        };
        let mut guard = s.reader.lock().await;
        let Some(reader) = guard.as_mut() else {
            return std::future::pending().await;
        };
        tokio::select! {
            Some(end) = held.next(), if !held.is_empty() => {
                drop(guard);
                self.held_ended(handler, end, held)
            }
            read = reader.next() => {
                match read {
                    Ok(read) => self.on_log(handler, s, read, held),
                    Err(e) => {
                        tracing::warn!(topic = %s.log_topic, partition = s.partition, error = %e, "key-order log fetch error");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
                self.store_log(s, reader);
                Ok(())
            }
        }
    }

    fn store_log(&self, s: &SourceStage, reader: &LogReader) {
        if let Some(offset) = s.inner().log.take_store() {
            reader.store(offset);
        }
    }

    /// One record of the log, read.
    fn on_log<'a, H: Handler>(
        &'a self,
        handler: &'a H,
        s: &SourceStage,
        read: Read,
        held: &mut FuturesUnordered<HeldFuture<'a>>,
    ) {
        let mut inner = s.inner();
        let seq = inner.log.take(read.offset);
        let (Some(key), Ok(event)) = (read.key, read.event.as_ref()) else {
            if let Err(e) = &read.event {
                tracing::warn!(topic = %s.log_topic, partition = s.partition, offset = read.offset, error = %e, "unreadable key-order log record skipped");
            }
            inner.log.durable(seq);
            return;
        };
        let k = key_hash(&key);
        tracing::debug!(topic = %s.log_topic, partition = s.partition, offset = read.offset, key_hash = %format_args!("{k:016x}"), ?event, "key-order event read");
        let mut next = Vec::new();
        match event.clone() {
            Event::Head { head, since_ms } => {
                if !inner.state.on_head(k, head, since_ms, seq) {
                    inner.log.durable(seq);
                }
            }
            Event::Held { head, record } => {
                let offset = record.offset;
                let h = Held {
                    log_seq: seq,
                    key,
                    record,
                };
                match inner.state.on_held(k, offset, head, h) {
                    HeldRead::Duplicate => {
                        inner.log.durable(seq);
                    }
                    HeldRead::Queued => {}
                    HeldRead::Now(n) => next.push(n),
                }
            }
            Event::Release { head, ended } => {
                inner.log.durable(seq);
                if let Some(released) = inner.state.on_release(k, head, ended) {
                    for h in released.done {
                        inner.log.durable(h);
                    }
                    next = released.next;
                }
            }
        }
        drop(inner);
        for n in next {
            held.push(self.launch(handler, n));
        }
    }

    /// A held record's run ended.
    fn held_ended<'a, H: Handler>(
        &'a self,
        handler: &'a H,
        end: HeldEnd,
        held: &mut FuturesUnordered<HeldFuture<'a>>,
    ) -> Result<(), End> {
        let Some(KeyOrderStage::Source(s)) = &self.key_order else {
            return Ok(());
        };
        let next = end.result.map_err(|a| self.end(a))?;
        if end.done {
            s.inner().log.durable(end.log_seq);
        }
        if let Some(n) = next {
            held.push(self.launch(handler, n));
        }
        Ok(())
    }

    /// Runs (or dead-letters) a held record, in a future of its own.
    fn launch<'a, H: Handler>(&'a self, handler: &'a H, next: Next<Held>) -> HeldFuture<'a> {
        Box::pin(async move {
            let Some(KeyOrderStage::Source(s)) = &self.key_order else {
                unreachable!("held records exist on source partitions with the stage only")
            };
            let (held, dead_head, note) = match next {
                Next::Run {
                    record,
                    after_dead_letter,
                } => (record, None, after_dead_letter),
                Next::DeadLetter { record, head } => (record, Some(head), Some(head)),
            };
            let Held {
                log_seq,
                key,
                record,
            } = held;
            let k = key_hash(&key);
            let offset = record.offset;
            let msg = Message::from_parts(
                (&s.source_topic, s.partition, offset),
                record.timestamp,
                Some(key),
                record.payload,
                record.headers,
                None,
            );
            let concluded = match dead_head {
                Some(head) => Some((
                    Disposition::DeadLetter(Reason::KeyDeadLettered),
                    format!("held behind record {head} of its key, which was dead-lettered"),
                )),
                None => {
                    let slot = s.inner().slots.pop().unwrap_or(0);
                    let timer = pin!(None);
                    let called = s
                        .caller
                        .call(
                            handler,
                            &msg,
                            (&self.shared.cx, &self.shared.policy),
                            slot,
                            None,
                            timer,
                            &mut Nothing,
                        )
                        .await;
                    s.inner().slots.push(slot);
                    match called {
                        Ok(c) => c,
                        Err(never) => match never {},
                    }
                }
            };
            let mut done = true;
            let result = match concluded {
                None => {
                    self.shared.stats.handled(1);
                    // Its key's own head (an earlier owner's `head` event read back): its
                    // release first, as for a source record read again.
                    let own_head = s.inner().state.runs_head(k, offset);
                    let released = if own_head {
                        let ticket = self.key_order_ticket();
                        self.append_release(&msg, Ended::Handled, ticket).await
                    } else {
                        Ok(())
                    };
                    released.map(|()| s.inner().state.finished(k))
                }
                Some((disposition, error)) => {
                    let mut mark = Mark {
                        since: None,
                        after_dead_letter: note,
                    };
                    let retry = matches!(disposition, Disposition::Retry { .. });
                    let mut ticket = None;
                    if retry {
                        let now = now_ms();
                        if s.inner().state.failed_held(k, offset, now, log_seq) {
                            ticket = self.key_order_ticket();
                        }
                        // Its log position is done when its release is read, not now (also
                        // when it was pending already: its `head` event may be further on in
                        // the log than the records held behind it).
                        done = false;
                        mark.since = Some(now);
                    }
                    let sent = async {
                        if ticket.is_some() {
                            self.append_head(&msg, mark.since.unwrap_or_default(), ticket)
                                .await?;
                        }
                        let went = self
                            .handoff
                            .hand_off_marked(&msg, disposition, &error, mark)
                            .await?;
                        // A held record its key waits on that ended in the DLQ (failed for
                        // good when read again, or too large for its tier) releases its key.
                        if let Some(ticket) = self.key_order_releases_dead(&msg, went) {
                            self.append_release(&msg, Ended::DeadLettered, ticket)
                                .await?;
                        }
                        Ok(())
                    }
                    .await;
                    match sent {
                        Ok(()) if retry => Ok(None),
                        Ok(()) => Ok(s.inner().state.finished(k)),
                        Err(a) => Err(a),
                    }
                }
            };
            HeldEnd {
                log_seq,
                done,
                result,
            }
        })
    }
}
