//! The clocks of a relayed connection: the close deadline, idle_timeout, keepalive pings and
//! shutdown, watched around the pumps by [`drive`].

use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::AsyncWrite;
use tokio::time::error::Elapsed;
use tokio::time::{Instant, Sleep};

use super::codec::OpCode;
use super::peer::{Peer, close_payload};
use super::shutdown::Cancelled;
use super::state::{Side, State};
use super::{RelaySettings, ShutdownSignals, frames};

/// Payloads of the gateway's own keepalive pings start with this, so that their pongs are
/// recognised and not passed on to a ws upstream that never sent them.
pub(super) const KEEPALIVE_MARK: &[u8] = b"wsgate-keepalive:";

pub(super) fn is_keepalive_pong(payload: &[u8]) -> bool {
    payload.starts_with(KEEPALIVE_MARK)
}

/// Runs the pumps until they finish, the connection is aborted, the close deadline passes or
/// shutdown is forced; then everything is dropped, which closes both sockets. Meanwhile it
/// watches the timers: `idle_timeout` and the keepalive pings.
///
/// Idle timeout and graceful shutdown send Close 1001 to the client; its answer completes
/// the close (and, for ws upstreams, is passed on, so the upstream closes after the client).
/// Without `close_on_shutdown` a pump handles shutdown itself when `state.drain` fires (the
/// stream relay, which first drains what the upstream already sent).
pub(super) fn drive<'a, W, P>(
    state: &'a State,
    settings: &'a RelaySettings,
    shutdown: &'a ShutdownSignals,
    client: &'a Peer<'a, W>,
    pumps: Pin<&'a mut P>,
    close_on_shutdown: bool,
) -> Drive<'a, W, P>
where
    W: AsyncWrite + Unpin + Send,
    P: Future<Output = ()>,
{
    Drive {
        state,
        settings,
        shutdown,
        client,
        pumps,
        close_on_shutdown,
        graceful_passed: false,
        clocks: Clocks::new(state, settings),
        timer: tokio::time::sleep_until(state.started),
        // Force only ever follows graceful (`Server::run`), so one wait watches both in turn.
        stage: shutdown.graceful.cancelled(),
        going_away: None,
        ping: None,
        ending: false,
    }
}

/// A boxed write the timers start and poll while it lasts.
type Write<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

pin_project_lite::pin_project! {
    /// The future of [`drive`]: a hand-written poll over plain data ([`Clocks`]), not async
    /// blocks raced in a `select!`. Every held connection carries this state; as six futures,
    /// each with its own timer or wait and the padding between their locals, it took 600
    /// bytes of it. Here one timer is set to the earliest deadline, one wait follows the
    /// shutdown stages, and what only runs for a moment (a ping's write, a Close) is boxed
    /// while it lasts.
    pub(super) struct Drive<'a, W, P> {
        state: &'a State,
        settings: &'a RelaySettings,
        shutdown: &'a ShutdownSignals,
        client: &'a Peer<'a, W>,
        pumps: Pin<&'a mut P>,
        close_on_shutdown: bool,
        graceful_passed: bool,
        clocks: Clocks,
        #[pin]
        timer: Sleep,
        #[pin]
        stage: Cancelled<'a>,
        // Close 1001 for idle_timeout or shutdown; once `ending`, the Close a client gets
        // when the close deadline passed, after which the relay ends.
        going_away: Option<Write<'a, ()>>,
        ping: Option<Write<'a, Result<io::Result<bool>, Elapsed>>>,
        ending: bool,
    }
}

impl<'a, W, P> Future for Drive<'a, W, P>
where
    W: AsyncWrite + Unpin + Send,
    P: Future<Output = ()>,
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        if *this.ending {
            return match this.going_away.as_mut() {
                Some(write) => write.as_mut().poll(cx),
                None => Poll::Ready(()),
            };
        }
        let (state, client) = (*this.state, *this.client);
        state.polling();
        if state.abort().poll_fired(cx).is_ready() || this.pumps.as_mut().poll(cx).is_ready() {
            return Poll::Ready(());
        }
        // Until nothing changes: each step may arm a deadline or start a write that must
        // then be polled to register its waker.
        loop {
            if state.abort().is_fired() {
                return Poll::Ready(());
            }
            if this.stage.as_mut().poll(cx).is_ready() {
                if *this.graceful_passed {
                    state.record(Side::Gateway, None, Some("shutdown_timeout passed".into()));
                    return Poll::Ready(());
                }
                *this.graceful_passed = true;
                this.stage.set(this.shutdown.force.cancelled());
                if !*this.close_on_shutdown {
                    state.drain().fire();
                } else if this.going_away.is_none() {
                    *this.going_away =
                        Some(Box::pin(client.going_away(state, "gateway shutting down")));
                }
                continue;
            }
            // A client that does not take the Close must not hold up the force: the wait
            // above comes first.
            if let Some(close) = this.going_away.as_mut()
                && close.as_mut().poll(cx).is_ready()
            {
                *this.going_away = None;
            }
            // Asked, not polled: the abort poll above put the task's waker in the slot that
            // all of the connection's signals share, so a Close fired later wakes it too.
            if this.clocks.close_open() && state.closing().is_fired() {
                this.clocks
                    .start_close_deadline(state, this.settings.close_timeout);
            }
            if let Some(at) = this.clocks.next() {
                if this.timer.deadline() != at {
                    this.timer.as_mut().reset(at);
                }
                if this.timer.as_mut().poll(cx).is_ready() {
                    // Tokio's timer never fires early; the max keeps a deadline it fired for
                    // from being rearmed as not yet due.
                    let now = Instant::now().max(at);
                    let due = this.clocks.due(now, state, this.settings);
                    if due.close_over {
                        // As `select!` did: the timers' writes end before the last words.
                        *this.going_away = None;
                        *this.ping = None;
                        *this.going_away = close_deadline_passed(state, client, this.shutdown);
                        *this.ending = true;
                        return match this.going_away.as_mut() {
                            Some(write) => write.as_mut().poll(cx),
                            None => Poll::Ready(()),
                        };
                    }
                    if due.idle && this.going_away.is_none() {
                        *this.going_away = Some(Box::pin(client.going_away(state, "idle timeout")));
                    }
                    if let (Some(n), Some(config)) = (due.ping, &this.settings.ping) {
                        *this.ping = Some(Box::pin(send_ping(client, n, config.timeout)));
                    }
                    continue;
                }
            }
            if let Some(write) = this.ping.as_mut()
                && let Poll::Ready(sent) = write.as_mut().poll(cx)
            {
                *this.ping = None;
                let midframe = client.awaiting_frame_rest.load(Ordering::Relaxed);
                this.clocks.ping_sent(sent, midframe, state, this.settings);
                continue;
            }
            return Poll::Pending;
        }
    }
}

/// The close deadline passed. A client whose Close is still unanswered gets its answer now,
/// if its socket takes it at once: its error if it broke the protocol; else the transfer
/// toward it was cut short, which must not look like a complete one (1011, or 1001 when the
/// gateway is shutting down).
fn close_deadline_passed<'a, W: AsyncWrite + Unpin + Send>(
    state: &'a State,
    client: &'a Peer<'a, W>,
    shutdown: &ShutdownSignals,
) -> Option<Write<'a, ()>> {
    state.timed_out.store(true, Ordering::Relaxed);
    if client.close_sent() {
        return None;
    }
    let reply = client.failure_owed().unwrap_or_else(|| {
        state.cut_short.store(true, Ordering::Relaxed);
        let code = if shutdown.graceful.is_cancelled() {
            frames::GOING_AWAY
        } else {
            frames::INTERNAL_ERROR
        };
        close_payload(code, "close_timeout: the upstream did not finish")
    });
    Some(Box::pin(async move {
        let _ = tokio::time::timeout(Duration::from_millis(100), client.close_with(&reply)).await;
    }))
}

/// The deadlines of one connection and where each timer is, as plain data.
struct Clocks {
    keepalive: Keepalive,
    /// Pings sent so far (each ping's payload carries its number).
    pings: u64,
    /// When the latest ping was asked for, in `State::now_ms` terms: a client frame read
    /// after it answers it.
    asked_at: u64,
    /// When idle_timeout is next checked.
    idle_at: Option<Instant>,
    close: Close,
}

enum Keepalive {
    Off,
    /// The next ping is due then.
    Waiting(Instant),
    /// A ping is being written.
    Sending,
    /// The client's answer is due by then.
    Answering(Instant),
}

/// `close_timeout` bounds inactivity once closing (SPEC §4): it restarts while data still
/// moves toward the client (checked once per period, so it fires after one to two periods of
/// silence), but never past CLOSE_CAP periods: a peer that trickles data cannot hold the
/// connection open.
enum Close {
    /// No Close yet.
    Open,
    Watching {
        at: Instant,
        /// `bytes_to_client` at the last check.
        moved: u64,
        periods: u32,
    },
}

/// What came due at one tick of the timer.
#[derive(Default)]
struct Due {
    /// Send ping number n.
    ping: Option<u64>,
    /// Idle for idle_timeout: Close 1001.
    idle: bool,
    close_over: bool,
}

impl Clocks {
    fn new(state: &State, settings: &RelaySettings) -> Self {
        let now = Instant::now();
        let keepalive = match (&settings.ping, &state.last_client_frame_ms) {
            (Some(ping), Some(_)) => Keepalive::Waiting(now + ping.interval),
            _ => Keepalive::Off,
        };
        let idle_at = match (settings.idle_timeout, &state.last_data_ms) {
            (Some(idle), Some(_)) => Some(state.started + idle),
            _ => None,
        };
        Self {
            keepalive,
            pings: 0,
            asked_at: 0,
            idle_at,
            close: Close::Open,
        }
    }

    fn close_open(&self) -> bool {
        matches!(self.close, Close::Open)
    }

    fn start_close_deadline(&mut self, state: &State, close_timeout: Duration) {
        self.close = Close::Watching {
            at: Instant::now() + close_timeout,
            moved: state.bytes_to_client.load(Ordering::Relaxed),
            periods: 0,
        };
    }

    /// The earliest deadline, if any timer runs.
    fn next(&self) -> Option<Instant> {
        let keepalive = match self.keepalive {
            Keepalive::Waiting(at) | Keepalive::Answering(at) => Some(at),
            Keepalive::Off | Keepalive::Sending => None,
        };
        let close = match self.close {
            Close::Watching { at, .. } => Some(at),
            Close::Open => None,
        };
        [keepalive, self.idle_at, close].into_iter().flatten().min()
    }

    /// Moves every timer whose deadline is `now` or earlier on, and says what to start.
    fn due(&mut self, now: Instant, state: &State, settings: &RelaySettings) -> Due {
        let mut due = Due::default();
        if let Close::Watching { at, moved, periods } = &mut self.close
            && *at <= now
        {
            let bytes = state.bytes_to_client.load(Ordering::Relaxed);
            *periods += 1;
            if bytes == *moved || *periods >= CLOSE_CAP {
                due.close_over = true;
            }
            *moved = bytes;
            *at = now + settings.close_timeout;
        }
        if let (Some(at), Some(idle), Some(last)) =
            (self.idle_at, settings.idle_timeout, &state.last_data_ms)
            && at <= now
        {
            let last = state.started + Duration::from_millis(last.load(Ordering::Relaxed));
            if now.saturating_duration_since(last) >= idle {
                due.idle = true;
                self.idle_at = None;
            } else {
                self.idle_at = Some(last + idle);
            }
        }
        if let (Some(ping), Some(last_frame)) = (&settings.ping, &state.last_client_frame_ms) {
            match self.keepalive {
                // Once closing, close_timeout bounds the rest; a pong may never come (a
                // client that has sent its Close is no longer read).
                Keepalive::Waiting(at) if at <= now && state.closing().is_fired() => {
                    self.keepalive = Keepalive::Off;
                }
                Keepalive::Waiting(at) if at <= now => {
                    self.pings += 1;
                    // A frame read from the client after this answers the ping.
                    self.asked_at = state.now_ms();
                    self.keepalive = Keepalive::Sending;
                    due.ping = Some(self.pings);
                }
                Keepalive::Answering(at) if at <= now => {
                    if last_frame.load(Ordering::Relaxed) < self.asked_at
                        && !state.upstream_backlog.load(Ordering::Relaxed)
                    {
                        self.keepalive = Keepalive::Off;
                        state.fail(
                            Side::Gateway,
                            None,
                            format!(
                                "no answer to a keepalive ping within {:?} (ping_timeout)",
                                ping.timeout
                            ),
                        );
                    } else {
                        self.keepalive = Keepalive::Waiting(now + ping.interval);
                    }
                }
                _ => {}
            }
        }
        due
    }

    /// A ping's write ended: wait for the answer, try again later, or fail the connection
    /// (after recording why). `midframe`: the client's writer was held by a frame from the
    /// upstream that is only partly here.
    fn ping_sent(
        &mut self,
        sent: Result<io::Result<bool>, Elapsed>,
        midframe: bool,
        state: &State,
        settings: &RelaySettings,
    ) {
        let Some(ping) = &settings.ping else {
            return;
        };
        self.keepalive = Keepalive::Off;
        match sent {
            Ok(Ok(true)) => {
                // The client's time to answer runs from when the ping was written, which
                // may have waited behind a frame.
                let sent_at = state.started + Duration::from_millis(state.now_ms());
                self.keepalive = Keepalive::Answering(sent_at + ping.timeout);
            }
            // A Close went out first.
            Ok(Ok(false)) => {}
            Ok(Err(e)) => state.fail(Side::Client, None, format!("keepalive ping failed: {e}")),
            // The wait was the upstream's, not the client's: try again next round.
            Err(_) if midframe => {
                self.keepalive = Keepalive::Waiting(Instant::now() + ping.interval);
            }
            Err(_) => state.fail(
                Side::Gateway,
                None,
                format!(
                    "client stopped reading: keepalive ping not written within {:?} (ping_timeout)",
                    ping.timeout
                ),
            ),
        }
    }
}

/// Writes keepalive ping number `n`; fails when that takes longer than `timeout` (a peer
/// that stopped reading fills its socket buffer and blocks our writes).
async fn send_ping<W: AsyncWrite + Unpin>(
    client: &Peer<'_, W>,
    n: u64,
    timeout: Duration,
) -> Result<io::Result<bool>, Elapsed> {
    let mut payload = KEEPALIVE_MARK.to_vec();
    payload.extend_from_slice(n.to_string().as_bytes());
    tokio::time::timeout(timeout, client.send_now(OpCode::Ping, &payload)).await
}

/// A close takes at most this many `close_timeout` periods, however busy.
pub(super) const CLOSE_CAP: u32 = 4;
