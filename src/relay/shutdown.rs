//! The gateway's shutdown stages as every relay sees them, cheap to ask on the hot path.
//!
//! A `CancellationToken` is shared by the whole server: asking it `is_cancelled()` takes the
//! mutex of its tree node, and polling a wait on it takes that mutex and the waiter list's
//! (tokio's `Notify`). Every relay asked on every read and polled its wait on every wake, so
//! all connections on all worker threads met at the same two locks. A [`Stage`] keeps a
//! flag next to the token, raised before the token is cancelled: asking is one atomic load,
//! and a wait that is already registered is not polled again while the flag is down.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Waker};

use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

/// One stage of shutdown (graceful or forced): a token for the tasks that hang child
/// tokens from it, and a flag for the relays. One pointer, as the token alone was: every
/// relay keeps both stages in its state.
#[derive(Debug, Clone, Default)]
pub struct Stage(Arc<Reached>);

#[derive(Debug, Default)]
struct Reached {
    token: CancellationToken,
    flag: AtomicBool,
}

impl Stage {
    pub fn cancel(&self) {
        // Raised first: whoever the token wakes sees the flag up.
        self.0.flag.store(true, Ordering::Release);
        self.0.token.cancel();
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.flag.load(Ordering::Acquire)
    }

    /// A token cancelled with this stage, for tasks that wait on it rarely. A child, not the
    /// token itself: cancelled directly, the token would leave the relays' flag down.
    pub fn child_token(&self) -> CancellationToken {
        self.0.token.child_token()
    }

    /// Resolves once the stage is reached.
    pub fn cancelled(&self) -> Cancelled<'_> {
        Cancelled {
            flag: &self.0.flag,
            registered: None,
            wait: self.0.token.cancelled(),
        }
    }
}

pin_project_lite::pin_project! {
    /// The wait of [`Stage::cancelled`]: the token's wait is polled only to register a waker
    /// it does not hold yet, so a relay woken by its sockets does not touch the shared locks.
    pub struct Cancelled<'a> {
        flag: &'a AtomicBool,
        registered: Option<Waker>,
        #[pin]
        wait: WaitForCancellationFuture<'a>,
    }
}

impl Future for Cancelled<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        if this.flag.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        // `cancel` raises the flag before it wakes the registered waker, so one that is still
        // in place will bring the task back to see the flag.
        if this
            .registered
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            return Poll::Pending;
        }
        let poll = this.wait.poll(cx);
        if poll.is_pending() {
            *this.registered = Some(cx.waker().clone());
        }
        poll
    }
}

/// The two stages of shutdown a relay listens to: `graceful` asks it to close with 1001 and
/// finish the close handshake; `force` (after `shutdown_timeout`) drops it at once.
#[derive(Debug, Clone, Default)]
pub struct ShutdownSignals {
    pub graceful: Stage,
    pub force: Stage,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The flag-only path must still end a wait: a registered wait that is not polled again
    /// is woken by the token when the stage is reached.
    #[tokio::test]
    async fn a_registered_wait_ends_when_the_stage_is_reached() {
        let stage = Stage::default();
        let waiter = {
            let stage = stage.clone();
            tokio::spawn(async move {
                let mut wait = std::pin::pin!(stage.cancelled());
                // Polled repeatedly with the same waker: only the first poll registers.
                for _ in 0..3 {
                    assert!(crate::relay::poll_once(wait.as_mut()).await.is_pending());
                }
                wait.await;
            })
        };
        tokio::task::yield_now().await;
        assert!(!stage.is_cancelled());
        stage.cancel();
        assert!(stage.is_cancelled() && stage.child_token().is_cancelled());
        tokio::time::timeout(std::time::Duration::from_secs(10), waiter)
            .await
            .expect("the wait ended when the stage was reached")
            .expect("the waiter did not panic");
    }
}
