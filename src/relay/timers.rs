//! The clocks of a relayed connection: the close deadline, idle_timeout, keepalive pings and
//! shutdown, watched around the pumps by [`drive`].

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::AsyncWrite;

use super::codec::OpCode;
use super::peer::{Peer, close_payload};
use super::state::{Side, State};
use super::{RelaySettings, ShutdownSignals, frames};
use crate::config::PingConfig;

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
pub(super) async fn drive<W: AsyncWrite + Unpin>(
    state: &State,
    settings: &RelaySettings,
    shutdown: &ShutdownSignals,
    client: &Peer<'_, W>,
    pumps: std::pin::Pin<&mut impl Future<Output = ()>>,
    close_on_shutdown: bool,
) {
    let close_timeout = settings.close_timeout;
    // Timers that most connections never reach are boxed when they start: their state
    // would otherwise be part of every held connection's.
    // `close_timeout` bounds inactivity once closing (SPEC §4): it restarts while data still
    // moves toward the client (checked once per period, so it fires after one to two
    // periods of silence), but never past CLOSE_CAP periods: a peer that trickles data
    // cannot hold the connection open.
    let close_deadline = async {
        state.closing.fired().await;
        Box::pin(async {
            let mut moved = state.bytes_to_client.load(Ordering::Relaxed);
            for _ in 0..CLOSE_CAP {
                tokio::time::sleep(close_timeout).await;
                let now = state.bytes_to_client.load(Ordering::Relaxed);
                if now == moved {
                    break;
                }
                moved = now;
            }
        })
        .await;
    };
    // Force only ever follows graceful (`Server::run`), so one wait watches both in turn.
    let shutdown_wait = async {
        shutdown.graceful.cancelled().await;
        if !close_on_shutdown {
            state.drain.fire();
        } else {
            Box::pin(async {
                tokio::select! {
                    _ = client.going_away(state, "gateway shutting down") => {}
                    // A client that does not take the Close must not hold up the force.
                    _ = shutdown.force.cancelled() => {}
                }
            })
            .await;
        }
        shutdown.force.cancelled().await;
    };
    let idle = async {
        if let (Some(idle), Some(last)) = (settings.idle_timeout, &state.last_data_ms) {
            Box::pin(async {
                loop {
                    let last = state.started + Duration::from_millis(last.load(Ordering::Relaxed));
                    if last.elapsed() >= idle {
                        client.going_away(state, "idle timeout").await;
                        break;
                    }
                    tokio::time::sleep_until(last + idle).await;
                }
            })
            .await;
        }
        std::future::pending::<()>().await
    };
    let keepalive = async {
        if let Some(ping) = &settings.ping {
            keepalive(state, client, ping).await;
        }
        std::future::pending::<()>().await
    };
    tokio::select! {
        _ = pumps => {}
        _ = idle => {}
        _ = keepalive => {}
        _ = state.abort.fired() => {}
        _ = shutdown_wait => {
            state.record(Side::Gateway, None, Some("shutdown_timeout passed".into()));
        }
        _ = close_deadline => {
            state.timed_out.store(true, Ordering::Relaxed);
            // A client whose Close is still unanswered gets its answer now, if its socket
            // takes it at once: its error if it broke the protocol; else the transfer toward
            // it was cut short, which must not look like a complete one (1011, or 1001 when
            // the gateway is shutting down).
            if !client.close_sent() {
                let reply = client.failure_owed().unwrap_or_else(|| {
                    state.cut_short.store(true, Ordering::Relaxed);
                    let code = if shutdown.graceful.is_cancelled() {
                        frames::GOING_AWAY
                    } else {
                        frames::INTERNAL_ERROR
                    };
                    close_payload(code, "close_timeout: the upstream did not finish")
                });
                let _ = Box::pin(tokio::time::timeout(Duration::from_millis(100), client.close_with(&reply))).await;
            }
        }
    }
}

/// A close takes at most this many `close_timeout` periods, however busy.
pub(super) const CLOSE_CAP: u32 = 4;

/// Pings the client every interval; returns (after recording why) when the client did not
/// answer within the timeout, or when the ping could not even be written in that time (a
/// peer that stopped reading fills its socket buffer and blocks our writes).
///
/// Pings are on by default, so this runs for every held connection and its state is part of
/// each one's memory: between pings that is one timer, reused, and two counters; the write
/// of a ping is boxed while it lasts.
pub(super) async fn keepalive<W: AsyncWrite + Unpin>(
    state: &State,
    client: &Peer<'_, W>,
    ping: &PingConfig,
) {
    let Some(last_frame) = &state.last_client_frame_ms else {
        return std::future::pending().await;
    };
    let mut timer = std::pin::pin!(tokio::time::sleep(ping.interval));
    let mut n: u64 = 0;
    loop {
        timer.as_mut().await;
        // Once closing, close_timeout bounds the rest; a pong may never come (a client that
        // has sent its Close is no longer read).
        if state.closing.is_fired() {
            return std::future::pending().await;
        }
        n += 1;
        // A frame read from the client after this answers the ping.
        let asked_at = state.now_ms();
        let mut payload = KEEPALIVE_MARK.to_vec();
        payload.extend_from_slice(n.to_string().as_bytes());
        let sent = Box::pin(tokio::time::timeout(
            ping.timeout,
            client.send_now(OpCode::Ping, &payload),
        ));
        match sent.await {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => return std::future::pending().await,
            Ok(Err(e)) => {
                return state.fail(Side::Client, None, format!("keepalive ping failed: {e}"));
            }
            // The writer is held by a frame from the upstream that is only partly here:
            // the wait is the upstream's, not the client's. Try again next round.
            Err(_) if client.awaiting_frame_rest.load(Ordering::Relaxed) => {
                timer
                    .as_mut()
                    .reset(tokio::time::Instant::now() + ping.interval);
                continue;
            }
            Err(_) => {
                return state.fail(
                    Side::Gateway,
                    None,
                    format!("client stopped reading: keepalive ping not written within {:?} (ping_timeout)", ping.timeout),
                );
            }
        }
        // The client's time to answer runs from when the ping was written, which may have
        // waited behind a frame.
        let sent_at = state.now_ms();
        timer
            .as_mut()
            .reset(state.started + Duration::from_millis(sent_at) + ping.timeout);
        timer.as_mut().await;
        if last_frame.load(Ordering::Relaxed) < asked_at
            && !state.upstream_backlog.load(Ordering::Relaxed)
        {
            return state.fail(
                Side::Gateway,
                None,
                format!(
                    "no answer to a keepalive ping within {:?} (ping_timeout)",
                    ping.timeout
                ),
            );
        }
        timer
            .as_mut()
            .reset(tokio::time::Instant::now() + ping.interval);
    }
}
