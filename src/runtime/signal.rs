//! A cancellation cheap enough to check for every record: tokio-util's `CancellationToken`
//! takes a lock in `is_cancelled`, so an atomic flag stands beside it.
//!
//! The record loops ask "stopped?" once per record and wait for it in `select!`s; the flag
//! answers the first without a lock, the token serves the second. `cancel` sets both, flag
//! first, so whoever the token wakes also sees the flag.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

/// Shutdown of the runtime, or revocation of one partition.
#[derive(Clone, Default)]
pub(crate) struct Signal {
    token: CancellationToken,
    flag: Arc<AtomicBool>,
}

impl Signal {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Raises the signal (idempotent).
    pub(crate) fn cancel(&self) {
        self.flag.store(true, Ordering::Release);
        self.token.cancel();
    }

    /// True once raised; one atomic load.
    pub(crate) fn is_cancelled(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }

    /// Completes once raised.
    pub(crate) fn cancelled(&self) -> WaitForCancellationFuture<'_> {
        self.token.cancelled()
    }

    /// The token behind it (for the handler's `Context`).
    pub(crate) fn token(&self) -> &CancellationToken {
        &self.token
    }
}
