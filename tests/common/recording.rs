//! A metrics recorder for tests that read what the runtime recorded: it keeps every value and
//! can be read without resetting anything (metrics-util's debugging recorder swaps values to
//! zero on every snapshot). One per test binary, installed by the first [`recorder`] call.

use std::sync::atomic::Ordering;
use std::sync::OnceLock;

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, SharedString, Unit};
use metrics_util::registry::{AtomicStorage, Registry};

/// Every series the runtime registered, with its current value.
pub struct Recording(pub Registry<Key, AtomicStorage>);

impl metrics::Recorder for Recording {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        self.0
            .get_or_create_counter(key, |c| Counter::from_arc(c.clone()))
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        self.0
            .get_or_create_gauge(key, |g| Gauge::from_arc(g.clone()))
    }
    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        self.0
            .get_or_create_histogram(key, |h| Histogram::from_arc(h.clone()))
    }
}

/// The test binary's recorder, installed as the global one on first use.
pub fn recorder() -> &'static Recording {
    static R: OnceLock<&'static Recording> = OnceLock::new();
    R.get_or_init(|| {
        let r: &'static Recording = Box::leak(Box::new(Recording(Registry::new(AtomicStorage))));
        metrics::set_global_recorder(r).expect("no other recorder in this test binary");
        r
    })
}

/// Whether `key` has every label of `want`.
pub fn labels_match(key: &Key, want: &[(&str, &str)]) -> bool {
    want.iter()
        .all(|(k, v)| key.labels().any(|l| l.key() == *k && l.value() == *v))
}

/// Sum of a counter over the series whose labels include `want`.
pub fn counter(name: &str, want: &[(&str, &str)]) -> u64 {
    recorder()
        .0
        .get_counter_handles()
        .into_iter()
        .filter(|(k, _)| k.name() == name && labels_match(k, want))
        .map(|(_, v)| v.load(Ordering::SeqCst))
        .sum()
}

/// The value of the first gauge series whose labels include `want`.
pub fn gauge(name: &str, want: &[(&str, &str)]) -> Option<f64> {
    recorder()
        .0
        .get_gauge_handles()
        .into_iter()
        .find(|(k, _)| k.name() == name && labels_match(k, want))
        .map(|(_, v)| f64::from_bits(v.load(Ordering::SeqCst)))
}

/// The largest value of a gauge over the series whose labels include `want` (0 when none).
pub fn max_gauge(name: &str, want: &[(&str, &str)]) -> f64 {
    recorder()
        .0
        .get_gauge_handles()
        .into_iter()
        .filter(|(k, _)| k.name() == name && labels_match(k, want))
        .map(|(_, v)| f64::from_bits(v.load(Ordering::SeqCst)))
        .fold(0.0, f64::max)
}

/// Every value recorded by a histogram over the series whose labels include `want`.
pub fn histogram(name: &str, want: &[(&str, &str)]) -> Vec<f64> {
    recorder()
        .0
        .get_histogram_handles()
        .into_iter()
        .filter(|(k, _)| k.name() == name && labels_match(k, want))
        .flat_map(|(_, v)| v.data())
        .collect()
}
