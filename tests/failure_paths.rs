//! Failure paths, round 2 (SPEC §4): text is checked in both directions on every route,
//! a connection fails in order (nothing the other side had sent is lost), and a ping flood
//! on a tcp route costs one Pong per read.

mod support;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn code_of(payload: &[u8]) -> u16 {
    u16::from_be_bytes([payload[0], payload[1]])
}

/// A hand-written ws upstream whose connection the test drives.
async fn raw_ws_upstream() -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<TcpStream>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let addr = tcp_upstream(move |mut stream| {
        let tx = tx.clone();
        async move {
            accept_ws_handshake(&mut stream).await;
            let _ = tx.send(stream);
        }
    })
    .await;
    (addr, rx)
}

#[tokio::test]
async fn invalid_utf8_from_a_client_never_reaches_a_ws_upstream() {
    let (addr, mut upstreams) = raw_ws_upstream().await;
    let gw = start_gateway(&simple_config(&format!("ws://{addr}"), "")).await;
    let mut client = raw_upgrade(gw.addr(), "/").await;
    let mut upstream = within("upstream", upstreams.recv()).await.unwrap();
    // Valid text split over two fragments at a character, then a message whose second
    // fragment breaks the sequence.
    let mut bytes = client_frame(false, 1, &"✓".as_bytes()[..1]);
    bytes.extend(client_frame(true, 0, &"✓".as_bytes()[1..]));
    bytes.extend(client_frame(false, 1, b"ok \xe2\x9c"));
    bytes.extend(client_frame(true, 0, b"\x28"));
    client.write_all(&bytes).await.unwrap();
    let (op, first) = read_masked_frame(&mut upstream).await;
    assert_eq!((op, first.as_slice()), (1, &"✓".as_bytes()[..1]));
    let (op, second) = read_masked_frame(&mut upstream).await;
    assert_eq!((op, second.as_slice()), (0, &"✓".as_bytes()[1..]));
    // The first fragment of the bad message is a valid beginning and goes on; the one that
    // breaks the sequence does not.
    let (op, third) = read_masked_frame(&mut upstream).await;
    assert_eq!((op, third.as_slice()), (1, &b"ok \xe2\x9c"[..]));
    let (op, payload) = read_masked_frame(&mut upstream).await;
    assert_eq!(op, 8, "the invalid fragment went upstream: {payload:?}");
    assert_eq!(code_of(&payload), 1001);
    // The upstream answers; then the client gets its 1007.
    upstream
        .write_all(&frame(true, 8, &1001u16.to_be_bytes(), None))
        .await
        .unwrap();
    assert_eq!(read_raw_close(&mut client).await, 1007);
    gw.wait_idle().await;
    gw.stop().await;
}

#[tokio::test]
async fn invalid_utf8_from_a_ws_upstream_never_reaches_the_client() {
    let (addr, mut upstreams) = raw_ws_upstream().await;
    let gw = start_gateway(&simple_config(&format!("ws://{addr}"), "")).await;
    let mut client = raw_upgrade(gw.addr(), "/").await;
    let mut upstream = within("upstream", upstreams.recv()).await.unwrap();
    let mut bytes = frame(true, 1, "fine ✓".as_bytes(), None);
    bytes.extend(frame(true, 1, b"bad \xff", None));
    upstream.write_all(&bytes).await.unwrap();
    let (_, op, payload) = read_raw_frame(&mut client).await;
    assert_eq!((op, payload.as_slice()), (1, "fine ✓".as_bytes()));
    let (_, op, payload) = read_raw_frame(&mut client).await;
    assert_eq!(op, 8, "the invalid text reached the client: {payload:?}");
    assert_eq!(code_of(&payload), 1001);
    client
        .write_all(&client_frame(true, 8, &1001u16.to_be_bytes()))
        .await
        .unwrap();
    let (op, payload) = read_masked_frame(&mut upstream).await;
    assert_eq!((op, code_of(&payload)), (8, 1007));
    gw.wait_idle().await;
    gw.stop().await;
}

/// A text message, then a frame with RSV2 set: the answer to the message still arrives,
/// before the Close 1002.
async fn answer_arrives_before_the_error(upstream: &str, answer_opcode: u8) {
    let gw = start_gateway(&simple_config(upstream, "")).await;
    let mut client = raw_upgrade(gw.addr(), "/").await;
    let mut bytes = client_frame(true, 1, b"hello");
    let mut broken = client_frame(true, 2, b"x");
    broken[0] |= 0x20;
    bytes.extend(broken);
    client.write_all(&bytes).await.unwrap();
    let (_, op, payload) = read_raw_frame(&mut client).await;
    assert_eq!(
        (op, payload.as_slice()),
        (answer_opcode, &b"hello"[..]),
        "{upstream}: the echo was lost"
    );
    let (_, op, payload) = read_raw_frame(&mut client).await;
    assert_eq!((op, code_of(&payload)), (8, 1002), "{upstream}");
    gw.wait_idle().await;
    gw.stop().await;
}

#[tokio::test]
async fn a_protocol_error_loses_nothing_the_upstream_had_sent() {
    let ws = ws_echo().await;
    answer_arrives_before_the_error(&format!("ws://{}", ws.addr), 1).await;
    let closes = ws.seen.lock().unwrap().closes.clone();
    assert_eq!(closes, [Some((1001, "client protocol error".to_string()))]);
    let tcp = tcp_echo().await;
    answer_arrives_before_the_error(&format!("tcp://{tcp}"), 2).await;
}

#[tokio::test]
async fn a_ping_flood_on_a_tcp_route_gets_one_pong_per_read() {
    let upstream = tcp_echo().await;
    let gw = start_gateway(&simple_config(&format!("tcp://{upstream}"), "")).await;
    let mut client = raw_upgrade(gw.addr(), "/").await;
    let mut bytes = Vec::new();
    for n in 0..1000 {
        bytes.extend(client_frame(true, 9, format!("p{n}").as_bytes()));
    }
    bytes.extend(client_frame(true, 8, &1000u16.to_be_bytes()));
    client.write_all(&bytes).await.unwrap();
    let mut pongs = Vec::new();
    loop {
        let (_, op, payload) = read_raw_frame(&mut client).await;
        match op {
            10 => pongs.push(payload),
            8 => break,
            other => panic!("unexpected opcode {other}"),
        }
    }
    assert!(
        !pongs.is_empty() && pongs.len() <= 20,
        "{} pongs for 1000 pings in one write",
        pongs.len()
    );
    assert_eq!(pongs.last().map(Vec::as_slice), Some(&b"p999"[..]));
    gw.wait_idle().await;
    gw.stop().await;
}

/// A tcp upstream that, once the client's half-close reaches it (EOF), sends `chunks`
/// messages `gap` apart, and then closes, or stalls with the socket open when `stall`.
async fn slow_finisher(
    chunks: usize,
    gap: std::time::Duration,
    stall: bool,
) -> std::net::SocketAddr {
    tcp_upstream(move |mut stream| async move {
        let mut sink = Vec::new();
        let _ = stream.read_to_end(&mut sink).await;
        for n in 0..chunks {
            let _ = stream.write_all(format!("chunk {n}").as_bytes()).await;
            tokio::time::sleep(gap).await;
        }
        if stall {
            std::future::pending::<()>().await;
        }
    })
    .await
}

/// Sends Close 1000 and reads until the gateway's Close: (data messages, close code).
async fn close_and_collect(gw: &TestGateway) -> (Vec<Vec<u8>>, u16) {
    let mut client = raw_upgrade(gw.addr(), "/").await;
    client
        .write_all(&client_frame(true, 8, &1000u16.to_be_bytes()))
        .await
        .unwrap();
    let mut data = Vec::new();
    loop {
        let (_, op, payload) = read_raw_frame(&mut client).await;
        match op {
            2 => data.push(payload),
            8 => return (data, code_of(&payload)),
            other => panic!("unexpected opcode {other}"),
        }
    }
}

#[tokio::test]
async fn close_timeout_restarts_while_the_upstream_still_sends() {
    // close_timeout is 1s; the upstream needs 1.5s for its last 15 messages, 100ms apart.
    let upstream = slow_finisher(15, std::time::Duration::from_millis(100), false).await;
    let gw = start_gateway(&simple_config(&format!("tcp://{upstream}"), "")).await;
    let (data, code) = close_and_collect(&gw).await;
    assert_eq!(data.len(), 15, "the transfer was cut short");
    assert_eq!(
        code, 1000,
        "a complete transfer ends with the client's own code"
    );
    gw.wait_idle().await;
    gw.stop().await;
}

#[tokio::test]
async fn a_transfer_cut_short_by_close_timeout_is_1011() {
    let upstream = slow_finisher(1, std::time::Duration::ZERO, true).await;
    let gw = start_gateway(&simple_config(&format!("tcp://{upstream}"), "")).await;
    let (data, code) = close_and_collect(&gw).await;
    assert_eq!(data, [b"chunk 0".to_vec()]);
    assert_eq!(code, 1011, "an unfinished transfer must not look complete");
    gw.wait_idle().await;
    gw.stop().await;
}

#[tokio::test]
async fn a_client_that_trickles_data_cannot_hold_a_close_open() {
    // The upstream resets at once: the client gets 1011, never answers it, and sends a
    // byte more often than close_timeout (1s). Only data toward the client restarts the
    // close deadline, so the connection still ends.
    let upstream = tcp_upstream(|stream| async move {
        let _ = socket2::SockRef::from(&stream).set_linger(Some(std::time::Duration::ZERO));
    })
    .await;
    let gw = start_gateway(&simple_config(&format!("tcp://{upstream}"), "")).await;
    let mut client = raw_upgrade(gw.addr(), "/").await;
    let (_, op, payload) = read_raw_frame(&mut client).await;
    assert_eq!((op, code_of(&payload)), (8, 1011));
    let trickle = tokio::spawn(async move {
        loop {
            if client
                .write_all(&client_frame(true, 2, b"x"))
                .await
                .is_err()
            {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    });
    gw.wait_idle().await;
    trickle.abort();
    gw.stop().await;
}

#[tokio::test]
async fn a_transfer_cut_short_during_shutdown_is_1001() {
    let upstream = slow_finisher(1, std::time::Duration::ZERO, true).await;
    let gw = start_gateway(&simple_config(&format!("tcp://{upstream}"), "")).await;
    let mut client = raw_upgrade(gw.addr(), "/").await;
    client
        .write_all(&client_frame(true, 8, &1000u16.to_be_bytes()))
        .await
        .unwrap();
    let (_, op, payload) = read_raw_frame(&mut client).await;
    assert_eq!((op, payload.as_slice()), (2, &b"chunk 0"[..]));
    // Draining now: the close deadline still cuts the unfinished transfer, but the client
    // is told the gateway is going away rather than that its upstream failed.
    gw.begin_shutdown();
    let (_, op, payload) = read_raw_frame(&mut client).await;
    assert_eq!((op, code_of(&payload)), (8, 1001));
    gw.stop().await;
}
