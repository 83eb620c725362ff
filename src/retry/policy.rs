//! The retry policy: the tiers (a delay and a number of attempts each), jitter, and
//! [`RetryPolicy::decide`], which turns a handler's failure and attempt number into a
//! [`Disposition`]. Pure arithmetic with no topic names: those are the topology's
//! ([`super::topics`]), and the envelope of the next hop is [`super::next_hop`]'s.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::handler::HandlerError;
use crate::outcome::{Disposition, Reason};

/// One retry tier: a fixed delay and how many retries are made with it.
///
/// Each tier is one topic (`{topic}.{group}.retry.{delay}` by default).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Tier {
    /// Delay between the failure and the next attempt.
    #[serde(with = "humantime_serde")]
    pub delay: Duration,
    /// Number of retries made with this delay before moving to the next tier.
    pub attempts: u32,
}

impl Tier {
    /// A tier of `attempts` retries, each `delay` after the previous failure.
    pub fn new(delay: Duration, attempts: u32) -> Self {
        Tier { delay, attempts }
    }
}

/// The resolved retry policy: an ordered list of tiers plus jitter.
///
/// Attempt numbering: attempt 1 is the delivery from the source topic; retry `n` is attempt
/// `n + 1`. A record that fails attempt `1 + max_retries()` is dead-lettered as `exhausted`.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// The tiers in order; a record moves to the next once a tier's attempts are used.
    tiers: Vec<Tier>,
    /// Fraction of a delay that may be added at random (0 to 1): spreads records that failed
    /// together so their retries do not arrive together.
    jitter: f64,
}

impl Default for RetryPolicy {
    /// `1s × 3`, `30s × 2`, `10m × 1`, no jitter.
    fn default() -> Self {
        RetryPolicy::new(
            vec![
                Tier::new(Duration::from_secs(1), 3),
                Tier::new(Duration::from_secs(30), 2),
                Tier::new(Duration::from_secs(600), 1),
            ],
            0.0,
        )
    }
}

impl RetryPolicy {
    /// A policy from explicit tiers and a jitter fraction in `[0, 1]`.
    pub fn new(tiers: Vec<Tier>, jitter: f64) -> Self {
        RetryPolicy {
            tiers,
            jitter: if jitter.is_nan() {
                0.0
            } else {
                jitter.clamp(0.0, 1.0)
            },
        }
    }

    /// The tiers, in order.
    pub fn tiers(&self) -> &[Tier] {
        &self.tiers
    }

    /// The jitter fraction.
    pub fn jitter(&self) -> f64 {
        self.jitter
    }

    /// Total number of retries over all tiers.
    pub fn max_retries(&self) -> u32 {
        self.tiers
            .iter()
            .fold(0u32, |n, t| n.saturating_add(t.attempts))
    }

    /// Tier used for retry number `retry` (1-based), or `None` once retries are exhausted.
    ///
    /// # Example
    ///
    /// ```
    /// use std::time::Duration;
    /// use sidetrack::{RetryPolicy, Tier};
    ///
    /// let policy = RetryPolicy::new(
    ///     vec![Tier::new(Duration::from_secs(1), 2), Tier::new(Duration::from_secs(60), 1)],
    ///     0.0,
    /// );
    /// assert_eq!(policy.max_retries(), 3);
    /// assert_eq!(policy.tier_for_retry(1), Some(0));
    /// assert_eq!(policy.tier_for_retry(2), Some(0));
    /// assert_eq!(policy.tier_for_retry(3), Some(1));
    /// assert_eq!(policy.tier_for_retry(4), None); // exhausted
    /// ```
    pub fn tier_for_retry(&self, retry: u32) -> Option<usize> {
        if retry == 0 {
            return None;
        }
        let mut last = 0u32;
        for (i, tier) in self.tiers.iter().enumerate() {
            last = last.saturating_add(tier.attempts);
            if retry <= last {
                return Some(i);
            }
        }
        None
    }

    /// Decides the fate of a record after its attempt number `attempt` (1-based) failed.
    ///
    /// A delay asked for by the handler picks the first tier whose delay is at least that long
    /// (the longest tier if none is) and is capped at that tier's delay. A tier is read in
    /// order, so a record due sooner than its tier's delay waits behind the records written
    /// before it: never early, possibly late by their wait. It does not change how many
    /// attempts are left.
    ///
    /// # Example
    ///
    /// ```
    /// use std::time::Duration;
    /// use sidetrack::{Disposition, HandlerError, Reason, RetryPolicy, Tier};
    ///
    /// let secs = Duration::from_secs;
    /// let policy = RetryPolicy::new(vec![Tier::new(secs(1), 2), Tier::new(secs(60), 1)], 0.0);
    /// let failed = HandlerError::retryable("timeout");
    /// // Attempts 1 and 2 fail into the first tier, attempt 3 into the second, then it is over.
    /// assert_eq!(policy.decide(1, &failed), Disposition::Retry { tier: 0, delay: secs(1) });
    /// assert_eq!(policy.decide(3, &failed), Disposition::Retry { tier: 1, delay: secs(60) });
    /// assert_eq!(policy.decide(4, &failed), Disposition::DeadLetter(Reason::Exhausted));
    /// // What retrying cannot fix skips the tiers.
    /// let bad = HandlerError::permanent("negative amount");
    /// assert_eq!(policy.decide(1, &bad), Disposition::DeadLetter(Reason::Permanent));
    /// // A requested delay picks the first tier at least that long, and is kept if shorter.
    /// let later = HandlerError::retryable("rate limited").retry_after(secs(10));
    /// assert_eq!(policy.decide(1, &later), Disposition::Retry { tier: 1, delay: secs(10) });
    /// ```
    pub fn decide(&self, attempt: u32, error: &HandlerError) -> Disposition {
        if let Some(reason) = error.kind().dead_letter_reason() {
            return Disposition::DeadLetter(reason);
        }
        let Some(normal) = self.tier_for_retry(attempt) else {
            return Disposition::DeadLetter(Reason::Exhausted);
        };
        match error.requested_delay() {
            None => Disposition::Retry {
                tier: normal,
                delay: self.tiers[normal].delay,
            },
            Some(requested) => {
                let tier = self
                    .tiers
                    .iter()
                    .position(|t| t.delay >= requested)
                    .unwrap_or(self.tiers.len() - 1);
                Disposition::Retry {
                    tier,
                    delay: requested.min(self.tiers[tier].delay),
                }
            }
        }
    }

    /// The latest due time (as a delay from the moment of publishing) a record on `tier` can
    /// legitimately carry: the tier delay plus the most jitter can add.
    pub fn max_due_delay(&self, tier: usize) -> Duration {
        self.tiers
            .get(tier)
            .map(|t| jittered(t.delay, self.jitter, 1.0))
            .unwrap_or_default()
    }
}

/// Expands the exponential shorthand into tiers: delay `n` is `initial × factor^n` capped at
/// `max_delay` and rounded to whole milliseconds; equal consecutive delays share a tier.
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use sidetrack::retry::expand_exponential;
/// use sidetrack::Tier;
///
/// let secs = Duration::from_secs;
/// // 1s, 2s, 4s, then capped at 4s: the two 4s retries share one tier (one topic).
/// let tiers = expand_exponential(secs(1), 2.0, secs(4), 4);
/// assert_eq!(tiers, vec![Tier::new(secs(1), 1), Tier::new(secs(2), 1), Tier::new(secs(4), 2)]);
/// ```
pub fn expand_exponential(
    initial: Duration,
    factor: f64,
    max_delay: Duration,
    retries: u32,
) -> Vec<Tier> {
    let mut tiers: Vec<Tier> = Vec::new();
    let mut delay_ms = initial.as_secs_f64() * 1000.0;
    let max_ms = max_delay.as_millis() as f64;
    for _ in 0..retries {
        let ms = delay_ms.min(max_ms).round().max(1.0) as u64;
        let delay = Duration::from_millis(ms);
        match tiers.last_mut() {
            Some(last) if last.delay == delay => last.attempts += 1,
            _ => tiers.push(Tier::new(delay, 1)),
        }
        delay_ms *= factor;
    }
    tiers
}

/// Adds jitter to a delay: `delay × (1 + jitter × unit)`, with `unit` a random number in
/// `[0, 1)`. Never shortens the delay, so a record is never due before its tier's delay.
/// Saturates at `Duration::MAX` and treats a NaN jitter or unit as 0, so no input panics.
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use sidetrack::retry::jittered;
///
/// let ten = Duration::from_secs(10);
/// assert_eq!(jittered(ten, 0.2, 0.5), Duration::from_secs(11)); // 10 s + 20 % × 0.5
/// assert_eq!(jittered(ten, 0.2, 0.0), ten); // never shorter than the tier's delay
/// assert_eq!(jittered(ten, f64::NAN, 0.5), ten); // a NaN adds nothing
/// ```
pub fn jittered(delay: Duration, jitter: f64, unit: f64) -> Duration {
    let fraction = |x: f64| if x.is_nan() { 0.0 } else { x.clamp(0.0, 1.0) };
    let extra = fraction(jitter) * fraction(unit);
    let added = Duration::try_from_secs_f64(delay.as_secs_f64() * extra).unwrap_or(Duration::MAX);
    delay.saturating_add(added)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn tier_for_retry_walks_the_tiers() {
        let p = RetryPolicy::default(); // 1s×3, 30s×2, 10m×1
        let got: Vec<_> = (0..=7).map(|r| p.tier_for_retry(r)).collect();
        assert_eq!(
            got,
            vec![
                None,
                Some(0),
                Some(0),
                Some(0),
                Some(1),
                Some(1),
                Some(2),
                None
            ]
        );
    }

    #[test]
    fn decide_by_kind_and_attempt() {
        let p = RetryPolicy::default();
        let retryable = HandlerError::retryable("boom");
        assert_eq!(
            p.decide(1, &retryable),
            Disposition::Retry {
                tier: 0,
                delay: secs(1)
            }
        );
        assert_eq!(
            p.decide(4, &retryable),
            Disposition::Retry {
                tier: 1,
                delay: secs(30)
            }
        );
        assert_eq!(
            p.decide(7, &retryable),
            Disposition::DeadLetter(Reason::Exhausted)
        );
        assert_eq!(
            p.decide(1, &HandlerError::permanent("no")),
            Disposition::DeadLetter(Reason::Permanent)
        );
        assert_eq!(
            p.decide(1, &HandlerError::poison("bad json")),
            Disposition::DeadLetter(Reason::Poison)
        );
        let none = RetryPolicy::new(vec![], 0.0);
        assert_eq!(
            none.decide(1, &retryable),
            Disposition::DeadLetter(Reason::Exhausted)
        );
    }

    #[test]
    fn requested_delay_picks_a_tier_and_is_capped() {
        let p = RetryPolicy::default();
        let e = HandlerError::retryable("later").retry_after(secs(10));
        assert_eq!(
            p.decide(1, &e),
            Disposition::Retry {
                tier: 1,
                delay: secs(10)
            }
        );
        let e = HandlerError::retryable("much later").retry_after(secs(3600));
        assert_eq!(
            p.decide(1, &e),
            Disposition::Retry {
                tier: 2,
                delay: secs(600)
            }
        );
        // A requested delay never buys extra attempts.
        assert_eq!(p.decide(7, &e), Disposition::DeadLetter(Reason::Exhausted));
    }

    #[test]
    fn exponential_expansion_merges_capped_delays() {
        let tiers = expand_exponential(secs(1), 2.0, secs(10), 6);
        let got: Vec<_> = tiers
            .iter()
            .map(|t| (t.delay.as_millis(), t.attempts))
            .collect();
        assert_eq!(
            got,
            vec![(1000, 1), (2000, 1), (4000, 1), (8000, 1), (10000, 2)]
        );
        let flat = expand_exponential(Duration::from_millis(500), 1.0, secs(1), 3);
        assert_eq!(flat, vec![Tier::new(Duration::from_millis(500), 3)]);
        let fractional = expand_exponential(Duration::from_millis(100), 1.5, secs(1), 3);
        let ms: Vec<_> = fractional.iter().map(|t| t.delay.as_millis()).collect();
        assert_eq!(ms, vec![100, 150, 225]);
    }

    #[test]
    fn jitter_only_lengthens() {
        assert_eq!(jittered(secs(10), 0.0, 0.9), secs(10));
        assert_eq!(jittered(secs(10), 0.5, 0.0), secs(10));
        assert_eq!(jittered(secs(10), 0.5, 0.5), Duration::from_millis(12_500));
        // Out-of-range inputs are clamped rather than producing a shorter delay.
        assert_eq!(jittered(secs(10), -1.0, 0.5), secs(10));
        assert_eq!(jittered(secs(10), 0.2, 7.0), secs(12));
        for i in 0..100 {
            let d = jittered(secs(1), 0.1, i as f64 / 100.0);
            assert!(d >= secs(1) && d <= Duration::from_millis(1100));
        }
    }

    #[test]
    fn max_due_delay_includes_jitter() {
        let p = RetryPolicy::new(vec![Tier::new(secs(10), 1)], 0.2);
        assert_eq!(p.max_due_delay(0), secs(12));
        assert_eq!(p.max_due_delay(5), Duration::ZERO);
    }
}
