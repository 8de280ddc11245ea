//! Moving data between an upgraded client and its upstream until both sides are closed.
//!
//! Each connection runs two pumps, one per direction, joined in one task. A pump waits for
//! its source holding no buffer, reads what is there into a pooled buffer ([`buffers`]),
//! splits it into frame pieces ([`codec`]), checks them ([`frames`]), rewrites them in place
//! for the other side (the step both relays share, `forward`) and writes the result on in
//! one write, then gives the buffer back. Frames are streamed,
//! never assembled: memory per connection does not depend on message sizes, and an idle
//! connection holds no buffer at all. A slow reader on one side stops the pump that writes
//! to it, which stops reading the other side (backpressure through the kernel's socket
//! buffers, nothing queued here).
//!
//! Shutdown, the close deadline and aborts act from outside the pumps:
//!
//! - a pump that sees the end of its side records who closed and why in `State`
//!   ([`state`]); the peers' writers are in [`peer`];
//! - the first Close frame (in either direction) starts `close_timeout`, after which whatever
//!   is still open is dropped;
//! - `abort` ends the connection at once (peer vanished, protocol error);
//! - the timers ([`timers`]) and, at the end, the lingering close ([`linger`]).

pub(crate) mod buffers;
mod coalesce;
pub mod codec;
mod forward;
pub mod frames;
mod halves;
mod linger;
mod peer;
mod shutdown;
mod state;
mod timers;
pub(crate) mod whole;
mod ws_stream;
mod ws_ws;

use std::future::Future;
use std::time::Duration;

use crate::config::{PingConfig, RouteConfig};
pub(crate) use coalesce::Coalescing;
use linger::linger;
pub(crate) use peer::close_payload;
use peer::{Peer, PeerWriter};
pub use shutdown::{ShutdownSignals, Stage};
use state::State;
pub use state::{Side, Summary};
use timers::{drive, is_keepalive_pong};
pub use ws_stream::relay_stream;
pub use ws_ws::relay_ws;

/// Limits and timers of one relayed connection, from its route and the gateway.
#[derive(Debug, Clone)]
pub struct RelaySettings {
    pub max_message_size: usize,
    pub max_frame_size: usize,
    pub close_timeout: Duration,
    pub idle_timeout: Option<Duration>,
    pub ping: Option<PingConfig>,
    /// permessage-deflate negotiated: end to end with ws upstreams (compressed frames pass
    /// unchanged), terminated by the stream relay for tcp and unix upstreams (it inflates
    /// the client's messages and deflates its own).
    pub compressed: bool,
}

impl RelaySettings {
    /// A route's, with the gateway's `close_timeout`.
    pub fn of_route(route: &RouteConfig, close_timeout: Duration, compressed: bool) -> Self {
        Self {
            max_message_size: route.max_message_size,
            max_frame_size: route.max_frame_size,
            close_timeout,
            idle_timeout: route.idle_timeout,
            ping: route.ping,
            compressed,
        }
    }
}

/// Awaits `$read` (a pinned read), but first, if it cannot finish at once, runs `$flush` (a
/// block that awaits the flush):
/// a burst of reads is written to the coalescing buffer without a system call each, and goes
/// out in one write when the source pauses. `$mid_frame` (an `Option<&AtomicBool>`) is raised
/// for the wait after the flush when the pump holds the other side's writer in the middle of
/// a frame (see keepalive).
///
/// A flush that finished in the same poll of the task as the read's `Pending` is not
/// followed by a second poll of the read: that poll registered the task's waker and no
/// wake-up can have been spent since, so the read would only find nothing again (a quarter
/// of the read polls of a connection that moves one message at a time). The wait then
/// yields once, and the read is polled at the next wake-up, whatever its cause. A flush
/// that had to wait let wake-ups pass, so the read is polled again at once. `$state` tells
/// the two apart: the timers, which poll the pumps, lower pump number `$pump`'s (0 or 1)
/// flush flag at every poll. The flags live in the relay's shared state, where they take
/// no room, not in the pump's, whose every byte across the flush's waits is held by every
/// connection.
///
/// A macro, not an async fn: expanded in the pump, the flush's state shares its place with
/// the pump's other waits; as a function taking the flush (or a future of it) it added 96 to
/// 128 bytes to every held ws connection (measured with relay_state_stays_small).
macro_rules! read_or_flush {
    ($read:expr, $state:expr, $pump:expr, $flush:block, $mid_frame:expr) => {{
        let mut read = $read;
        match $crate::relay::poll_once(read.as_mut()).await {
            ::std::task::Poll::Ready(value) => value,
            ::std::task::Poll::Pending => {
                $state.flush_starts($pump);
                $flush
                // `$mid_frame` is evaluated again after the wait (it is cheap), not kept
                // across it: every byte held across a wait is held by every connection.
                let flag: Option<&::std::sync::atomic::AtomicBool> = $mid_frame;
                if let Some(flag) = flag {
                    flag.store(true, ::std::sync::atomic::Ordering::Relaxed);
                }
                ::std::future::poll_fn(|_| {
                    if $state.flushed_in_the_same_poll($pump) {
                        ::std::task::Poll::Pending
                    } else {
                        ::std::task::Poll::Ready(())
                    }
                })
                .await;
                let value = read.await;
                let flag: Option<&::std::sync::atomic::AtomicBool> = $mid_frame;
                if let Some(flag) = flag {
                    flag.store(false, ::std::sync::atomic::Ordering::Relaxed);
                }
                value
            }
        }
    }};
}
use read_or_flush;

/// Polls a future once, without dropping it: `Pending` leaves it ready to be awaited on.
async fn poll_once<F: Future>(mut future: std::pin::Pin<&mut F>) -> std::task::Poll<F::Output> {
    std::future::poll_fn(|cx| std::task::Poll::Ready(future.as_mut().poll(cx))).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::metrics::Flow;

    /// A held connection costs its task's state: the relay future lives in the task for as
    /// long as the connection does. This pins the figure (debug build, where futures are
    /// largest) so that a change that makes it balloon shows here, not in a benchmark weeks
    /// later. It was 7.3 KiB before cold paths and rarely used timers were boxed and the pumps and
    /// reads lent pinned instead of moved, arguments turned into state before the future
    /// starts, the writer lock taken without a wait future when free. The close, abort and
    /// drain signals share one waker slot (a `Notify` wait took 64 bytes each, a slot per
    /// signal 32), the pumps borrow
    /// the stream halves the future captured instead of taking them (moved, each took room
    /// twice: 176 bytes of the tcp relay's state), and the timers are one hand-written
    /// future with one timer for all deadlines (as async blocks in a `select!` they took 600
    /// bytes; now about 380), and settings and flow counters are shared by the route's
    /// connections (copied, they took 112 bytes), and a Close owed to a peer is boxed (24
    /// bytes a peer). The streams themselves stay in the state (see `halves`: split the
    /// tokio way, each went to the heap behind an Arc, 96 bytes), which this test does not
    /// show (its streams are in-memory pipes, 16 bytes; a client's socket is 64):
    /// 2,120 bytes for ws, 1,872 for tcp (whose Pong moves into its boxed write, and whose
    /// permessage-deflate, when on, holds zlib state in a box only while a message is
    /// inflated), in debug and release builds alike (nightly `-Zprint-type-sizes`). The
    /// figure is near a boundary of the allocator's size classes: 24 bytes more (a poll
    /// count kept in the pumps, once) took a held ws connection from 3.5 to 4.1 kB. What
    /// remains is mostly the two pumps (about 580 bytes each, a third of it padding between
    /// the locals of different waits).
    #[tokio::test]
    async fn relay_state_stays_small() {
        let settings = std::sync::Arc::new(RelaySettings {
            max_message_size: 1,
            max_frame_size: 1,
            close_timeout: Duration::from_secs(1),
            idle_timeout: None,
            ping: None,
            compressed: false,
        });
        let (client, _far) = tokio::io::duplex(1);
        let (upstream, _far_upstream) = tokio::io::duplex(1);
        let ws = relay_ws(
            client,
            upstream,
            settings.clone(),
            Default::default(),
            Flow::default(),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (client, _far) = tokio::io::duplex(1);
        let upstream = crate::upstream::UpstreamStream::Tcp(tcp);
        let stream = relay_stream(
            client,
            upstream,
            settings,
            Default::default(),
            Flow::default(),
        );
        let (ws, stream) = (std::mem::size_of_val(&ws), std::mem::size_of_val(&stream));
        eprintln!("relay state per connection: ws {ws} bytes, stream {stream} bytes");
        assert!(ws <= 2120 && stream <= 1872, "ws {ws}, stream {stream}");
    }

    /// Counts the polls of the reader it wraps.
    struct Counted<R> {
        inner: R,
        polls: usize,
    }

    impl<R: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Counted<R> {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            self.polls += 1;
            std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    fn quiet_settings() -> RelaySettings {
        RelaySettings {
            max_message_size: 1 << 20,
            max_frame_size: 1 << 20,
            close_timeout: Duration::from_secs(1),
            idle_timeout: None,
            ping: None,
            compressed: false,
        }
    }

    /// Polls `future` once as the timers poll the pumps: first telling `state`.
    fn poll_as_drive<F: Future>(
        state: &State,
        future: std::pin::Pin<&mut F>,
    ) -> std::task::Poll<F::Output> {
        state.polling();
        poll_plain(future)
    }

    fn poll_plain<F: Future>(future: std::pin::Pin<&mut F>) -> std::task::Poll<F::Output> {
        future.poll(&mut std::task::Context::from_waker(std::task::Waker::noop()))
    }

    /// A read that found nothing, then a flush that finished in the same poll: the read is
    /// not polled a second time before the task is woken (it could only find nothing), and
    /// it is polled at the next poll.
    #[test]
    fn a_flush_done_at_once_leaves_the_read_to_the_next_poll() {
        let state = State::new(&quiet_settings(), Flow::default());
        let (near, mut far) = tokio::io::duplex(64);
        let mut reader = Counted {
            inner: near,
            polls: 0,
        };
        let mut flushes = 0;
        {
            let pump = std::pin::pin!(async {
                let read = std::pin::pin!(buffers::read(&mut reader));
                read_or_flush!(read, &state, 0, { flushes += 1 }, None)
            });
            assert!(poll_as_drive(&state, pump).is_pending());
        }
        assert_eq!(flushes, 1);
        assert_eq!(reader.polls, 1, "polled again after the flush");

        let mut pump = std::pin::pin!(async {
            let read = std::pin::pin!(buffers::read(&mut reader));
            read_or_flush!(read, &state, 0, {}, None)
        });
        assert!(poll_as_drive(&state, pump.as_mut()).is_pending());
        let mut far_write = std::pin::pin!(tokio::io::AsyncWriteExt::write_all(&mut far, b"hi"));
        assert!(poll_plain(far_write.as_mut()).is_ready());
        match poll_as_drive(&state, pump.as_mut()) {
            std::task::Poll::Ready(Ok(chunk)) => assert_eq!(&chunk[chunk.data_start()..], b"hi"),
            other => panic!(
                "the read was not polled at the next poll: {:?}",
                other.is_ready()
            ),
        }
    }

    /// A flush that had to wait: wake-ups may have been spent meanwhile (here the read's,
    /// for data that came during the flush), so the read is polled again as soon as the
    /// flush is done, in the same poll.
    #[test]
    fn a_flush_that_waited_is_followed_by_a_read() {
        let state = State::new(&quiet_settings(), Flow::default());
        let (near, mut far) = tokio::io::duplex(64);
        let mut reader = Counted {
            inner: near,
            polls: 0,
        };
        let (done, flushed) = tokio::sync::oneshot::channel::<()>();
        let mut pump = std::pin::pin!(async {
            let read = std::pin::pin!(buffers::read(&mut reader));
            read_or_flush!(
                read,
                &state,
                1,
                {
                    let _ = flushed.await;
                },
                None
            )
        });
        assert!(poll_as_drive(&state, pump.as_mut()).is_pending());
        let mut far_write = std::pin::pin!(tokio::io::AsyncWriteExt::write_all(&mut far, b"hi"));
        assert!(poll_plain(far_write.as_mut()).is_ready());
        done.send(()).unwrap();
        match poll_as_drive(&state, pump.as_mut()) {
            std::task::Poll::Ready(Ok(chunk)) => assert_eq!(&chunk[chunk.data_start()..], b"hi"),
            other => panic!(
                "the read waits for a wake-up already spent: {:?}",
                other.is_ready()
            ),
        }
    }
}
