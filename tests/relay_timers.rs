//! The relay's timers on tokio's paused clock: the relay runs over in-memory pipes, so time
//! only moves when every task waits, and hours pass in no wall-clock time. What is pinned:
//! idle_timeout, keepalive pings (answered and not), and the close deadline.

mod support;

use std::time::Duration;

use support::client_frame;
use tokio::io::{AsyncWriteExt, DuplexStream};
use wsgate::config::PingConfig;
use wsgate::relay::{RelaySettings, ShutdownSignals, Summary, relay_ws};
use wsgate::telemetry::metrics::Flow;

fn settings(idle: Option<u64>, ping: Option<(u64, u64)>) -> RelaySettings {
    RelaySettings {
        max_message_size: 1 << 20,
        max_frame_size: 1 << 20,
        close_timeout: Duration::from_secs(5),
        idle_timeout: idle.map(Duration::from_secs),
        ping: ping.map(|(interval, timeout)| PingConfig {
            interval: Duration::from_secs(interval),
            timeout: Duration::from_secs(timeout),
        }),
        compressed: false,
    }
}

/// A ws relay between two pipes; returns the client's and the upstream's far ends and the
/// relay's task.
fn start(
    settings: RelaySettings,
) -> (DuplexStream, DuplexStream, tokio::task::JoinHandle<Summary>) {
    let (client, client_far) = tokio::io::duplex(64 << 10);
    let (upstream, upstream_far) = tokio::io::duplex(64 << 10);
    let relay = tokio::spawn(relay_ws(
        client,
        upstream,
        std::sync::Arc::new(settings),
        ShutdownSignals::default(),
        Flow::default(),
    ));
    (client_far, upstream_far, relay)
}

/// One frame from the relay: (fin, opcode, payload). The harness's own reader gives up
/// after 10 s, which on a paused clock passes before the timers under test fire; this one
/// allows a day.
async fn read_raw_frame(stream: &mut DuplexStream) -> (bool, u8, Vec<u8>) {
    let read = support::read_any_frame(stream);
    let (fin, opcode, masked, payload) = tokio::time::timeout(Duration::from_secs(86_400), read)
        .await
        .expect("a frame within a day");
    assert!(!masked, "frames toward the client are not masked");
    (fin, opcode, payload)
}

fn code(payload: &[u8]) -> u16 {
    u16::from_be_bytes([payload[0], payload[1]])
}

#[tokio::test(start_paused = true)]
async fn idle_timeout_closes_with_1001_after_exactly_that_long() {
    let (mut client, _upstream, relay) = start(settings(Some(300), None));
    let started = tokio::time::Instant::now();
    let (_, op, payload) = read_raw_frame(&mut client).await;
    assert_eq!((op, code(&payload)), (8, 1001));
    assert_eq!(&payload[2..], b"idle timeout");
    assert_eq!(started.elapsed(), Duration::from_secs(300));
    client
        .write_all(&client_frame(true, 8, &1001u16.to_be_bytes()))
        .await
        .unwrap();
    drop(client);
    // The upstream (which never answers here) was told too; the close deadline ends it.
    let summary = relay.await.unwrap();
    let detail = summary.detail.unwrap_or_default();
    assert!(detail.starts_with("idle timeout"), "{detail}");
}

#[tokio::test(start_paused = true)]
async fn an_answered_ping_keeps_the_connection_and_a_silent_client_is_dropped() {
    let (mut client, _upstream, relay) = start(settings(None, Some((30, 10))));
    // Three rounds answered: the connection stays.
    for _ in 0..3 {
        let (_, op, payload) = read_raw_frame(&mut client).await;
        assert_eq!(op, 9, "a ping");
        client
            .write_all(&client_frame(true, 10, &payload))
            .await
            .unwrap();
    }
    assert!(!relay.is_finished());
    // Then silence: the next ping goes unanswered and the relay ends ping_timeout later.
    let (_, op, _) = read_raw_frame(&mut client).await;
    assert_eq!(op, 9);
    let pinged = tokio::time::Instant::now();
    let summary = relay.await.unwrap();
    // ping_timeout, then 250 ms of lingering close on a client that sends nothing more.
    assert_eq!(pinged.elapsed(), Duration::from_millis(10_250));
    let detail = summary.detail.unwrap_or_default();
    assert!(detail.contains("no answer to a keepalive ping"), "{detail}");
}

#[tokio::test(start_paused = true)]
async fn an_upstream_that_never_answers_a_close_gets_the_client_1011_at_the_deadline() {
    let (mut client, _upstream, relay) = start(settings(None, None));
    client
        .write_all(&client_frame(true, 8, &1000u16.to_be_bytes()))
        .await
        .unwrap();
    let sent = tokio::time::Instant::now();
    let (_, op, payload) = read_raw_frame(&mut client).await;
    assert_eq!((op, code(&payload)), (8, 1011));
    // One close_timeout period without data, checked once per period.
    assert_eq!(sent.elapsed(), Duration::from_secs(5));
    drop(client);
    let summary = relay.await.unwrap();
    assert!(
        summary.detail.unwrap_or_default().contains("cut short"),
        "the log line says the transfer was cut short"
    );
}
