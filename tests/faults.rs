//! Faults on purpose (`allow_faults`), each seen by a real client through a real gateway and
//! counted in /metrics.

mod support;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use wsgate::testing::TestGateway;

async fn faulty(upstream: &str, faults: &str) -> TestGateway {
    init_logs();
    TestGateway::builder()
        .allow_faults()
        .gateway("close_timeout = \"2s\"")
        .admin()
        .route_with("/ws", upstream, &format!("faults = {{ {faults} }}"))
        .start()
        .await
        .expect("start")
}

fn injected(gw: &TestGateway, fault: &str) -> f64 {
    metric(
        &gw.metrics().encode(),
        &format!("wsgate_faults_injected_total{{route=\"/ws\",fault=\"{fault}\"}}"),
    )
}

fn text(n: usize) -> Message {
    Message::text(format!("message {n}"))
}

/// `text(n)` as a tcp upstream's echo brings it back.
fn binary(n: usize) -> Message {
    Message::binary(format!("message {n}").into_bytes())
}

#[tokio::test]
async fn close_after_messages_lets_exactly_that_many_through() {
    let upstream = ws_echo().await;
    let gw = faulty(
        &format!("ws://{}", upstream.addr),
        "close_after = { messages = 3, code = 1012, reason = \"restart\" }",
    )
    .await;
    let mut ws = connect(&gw.url("/ws")).await;
    for n in 0..5 {
        ws.send(text(n)).await.unwrap();
    }
    let (data, close) = read_until_close(&mut ws).await;
    assert_eq!(data, vec![text(0), text(1), text(2)]);
    assert_eq!(close, Some((1012, "restart".into())));
    // The upstream is told the same, as the client's side of the conversation.
    wait_until("the upstream sees the close", || {
        !upstream.seen.lock().unwrap().closes.is_empty()
    })
    .await;
    assert_eq!(
        upstream.seen.lock().unwrap().closes[0],
        Some((1012, "restart".into()))
    );
    gw.wait_idle().await;
    assert_eq!(injected(&gw, "close"), 1.0);
    gw.stop().await;
}

#[tokio::test]
async fn close_after_bytes_and_after_a_time() {
    let echo = tcp_echo().await;
    let gw = faulty(
        &format!("tcp://{echo}"),
        "close_after = { bytes = 10, code = 4000 }",
    )
    .await;
    let mut ws = connect(&gw.url("/ws")).await;
    // 6 bytes up and 6 back: 12 relayed, past the threshold of 10.
    ws.send(Message::binary(b"abcdef".to_vec())).await.unwrap();
    let (data, close) = read_until_close(&mut ws).await;
    assert_eq!(data, vec![Message::binary(b"abcdef".to_vec())]);
    assert_eq!(close.map(|c| c.0), Some(4000));
    gw.stop().await;

    let gw = faulty(
        &format!("tcp://{echo}"),
        "close_after = { after = \"200ms\" }",
    )
    .await;
    let mut ws = connect(&gw.url("/ws")).await;
    let (_, close) = read_until_close(&mut ws).await;
    assert_eq!(close.map(|c| c.0), Some(1012), "the default code");
    gw.stop().await;
}

#[tokio::test]
async fn reset_after_resets_the_tcp_connection() {
    let echo = tcp_echo().await;
    let gw = faulty(&format!("tcp://{echo}"), "reset_after = { messages = 1 }").await;
    let mut stream = raw_upgrade(gw.addr(), "/ws").await;
    stream
        .write_all(&client_frame(true, 0x2, b"one"))
        .await
        .unwrap();
    let (_, opcode, payload) = read_raw_frame(&mut stream).await;
    assert_eq!((opcode, payload.as_slice()), (0x2, &b"one"[..]));
    // No Close frame, no FIN: a reset.
    let mut rest = Vec::new();
    let error = within("the reset", stream.read_to_end(&mut rest))
        .await
        .expect_err("a reset, not an orderly end");
    assert_eq!(
        error.kind(),
        std::io::ErrorKind::ConnectionReset,
        "{rest:?}"
    );
    gw.wait_idle().await;
    assert_eq!(injected(&gw, "reset"), 1.0);
    gw.stop().await;
}

#[tokio::test]
async fn stall_after_stops_relaying_and_keeps_the_connection() {
    let upstream = ws_echo().await;
    let gw = faulty(
        &format!("ws://{}", upstream.addr),
        "stall_after = { messages = 1 }",
    )
    .await;
    let mut ws = connect(&gw.url("/ws")).await;
    ws.send(text(1)).await.unwrap();
    assert_eq!(next_data(&mut ws).await, text(1));
    wait_until("the stall", || injected(&gw, "stall") == 1.0).await;
    ws.send(text(2)).await.unwrap();
    // Nothing comes back, and the connection stays open: a bounded look, not a pause.
    let nothing = tokio::time::timeout(Duration::from_millis(300), ws.next()).await;
    assert!(nothing.is_err(), "{nothing:?}");
    assert_eq!(gw.metrics().active_relays(), 1);
    // The client giving up ends it.
    drop(ws);
    gw.wait_idle().await;
    gw.stop().await;
}

#[tokio::test]
async fn latency_delays_every_message_and_keeps_their_order() {
    let upstream = ws_echo().await;
    let gw = faulty(&format!("ws://{}", upstream.addr), "latency = \"150ms\"").await;
    let mut ws = connect(&gw.url("/ws")).await;
    let sent = tokio::time::Instant::now();
    for n in 0..20 {
        ws.send(text(n)).await.unwrap();
    }
    for n in 0..20 {
        assert_eq!(next_data(&mut ws).await, text(n));
    }
    // There and back, each way delayed: a lower bound, which load cannot make fail.
    assert!(
        sent.elapsed() >= Duration::from_millis(300),
        "{:?}",
        sent.elapsed()
    );
    // Every frame each way was delayed (the client's 20 and the echoes).
    assert!(injected(&gw, "latency") >= 40.0);
    gw.stop().await;
}

#[tokio::test]
async fn fragment_sends_each_message_as_that_many_frames() {
    let echo = tcp_echo().await;
    let gw = faulty(&format!("tcp://{echo}"), "fragment = 3").await;
    let mut stream = raw_upgrade(gw.addr(), "/ws").await;
    stream
        .write_all(&client_frame(true, 0x2, b"abcdefgh"))
        .await
        .unwrap();
    let frames = [
        read_raw_frame(&mut stream).await,
        read_raw_frame(&mut stream).await,
        read_raw_frame(&mut stream).await,
    ];
    let shape: Vec<(bool, u8)> = frames.iter().map(|f| (f.0, f.1)).collect();
    assert_eq!(shape, vec![(false, 0x2), (false, 0x0), (true, 0x0)]);
    let joined: Vec<u8> = frames.iter().flat_map(|f| f.2.clone()).collect();
    assert_eq!(joined, b"abcdefgh");
    assert_eq!(injected(&gw, "fragment"), 1.0);
    // A client library reassembles them.
    let mut ws = connect(&gw.url("/ws")).await;
    ws.send(Message::binary(b"whole".to_vec())).await.unwrap();
    assert_eq!(next_data(&mut ws).await, Message::binary(b"whole".to_vec()));
    gw.stop().await;
}

#[tokio::test]
async fn refuse_first_refuses_the_first_handshakes() {
    let echo = tcp_echo().await;
    let gw = faulty(
        &format!("tcp://{echo}"),
        "refuse_first = { count = 2, status = 503 }",
    )
    .await;
    for _ in 0..2 {
        let response = raw_request(gw.addr(), &upgrade_request("/ws", "")).await;
        assert_eq!(response.status, 503);
        assert!(response.body.contains("refused on purpose"), "{response:?}");
        assert!(response.header("retry-after").is_some());
    }
    let mut ws = connect(&gw.url("/ws")).await;
    ws.send(text(0)).await.unwrap();
    assert_eq!(next_data(&mut ws).await, binary(0));
    assert_eq!(injected(&gw, "refuse"), 2.0);
    gw.stop().await;
}

async fn admin_post(gw: &TestGateway, target: &str) -> RawResponse {
    let admin = gw.server().admin_addr().expect("admin");
    raw_request(
        admin,
        &format!("POST {target} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"),
    )
    .await
}

#[tokio::test]
async fn admin_close_closes_every_live_connection_of_the_route() {
    let upstream = ws_echo().await;
    // A route with no faults of its own still takes the admin's orders.
    let gw = TestGateway::builder()
        .allow_faults()
        .admin()
        .route("/ws", &format!("ws://{}", upstream.addr))
        .start()
        .await
        .expect("start");
    let mut first = connect(&gw.url("/ws")).await;
    let mut second = connect(&gw.url("/ws")).await;
    for ws in [&mut first, &mut second] {
        ws.send(text(0)).await.unwrap();
        assert_eq!(next_data(ws).await, text(0));
    }
    let response = admin_post(&gw, "/faults/close?route=%2Fws&code=1012&reason=restart").await;
    assert_eq!(response.status, 200, "{response:?}");
    assert!(
        response.body.contains("closing 2 connections"),
        "{response:?}"
    );
    for ws in [&mut first, &mut second] {
        let (_, close) = read_until_close(ws).await;
        assert_eq!(close, Some((1012, "restart".into())));
    }
    wait_until("both closes counted", || injected(&gw, "close") == 2.0).await;
    // A reconnect works at once.
    let mut again = connect(&gw.url("/ws")).await;
    again.send(text(1)).await.unwrap();
    assert_eq!(next_data(&mut again).await, text(1));

    // Mistakes get a precise answer.
    assert_eq!(
        admin_post(&gw, "/faults/close?route=/nope").await.status,
        404
    );
    assert_eq!(
        admin_post(&gw, "/faults/close?route=/ws&code=99")
            .await
            .status,
        400
    );
    assert_eq!(admin_post(&gw, "/faults/close").await.status, 400);
    gw.stop().await;
}

#[tokio::test]
async fn admin_refuse_refuses_the_next_handshakes() {
    let echo = tcp_echo().await;
    let gw = faulty(&format!("tcp://{echo}"), "").await;
    let response = admin_post(&gw, "/faults/refuse?route=/ws&count=1&status=429").await;
    assert_eq!(response.status, 200, "{response:?}");
    let refused = raw_request(gw.addr(), &upgrade_request("/ws", "")).await;
    assert_eq!(refused.status, 429);
    assert_eq!(injected(&gw, "refuse"), 1.0);
    let mut ws = connect(&gw.url("/ws")).await;
    ws.send(text(0)).await.unwrap();
    assert_eq!(next_data(&mut ws).await, binary(0));
    gw.stop().await;
}

#[tokio::test]
async fn faults_need_allow_faults() {
    let text = "[[listener]]\nbind = \"127.0.0.1:0\"\n\n[[route]]\npath = \"/ws\"\nupstream = \"tcp://127.0.0.1:1\"\nfaults = { latency = \"1s\" }\n";
    let error = wsgate::config::Config::parse(text, "t.toml")
        .expect_err("faults without allow_faults")
        .to_string();
    assert!(
        error.starts_with("t.toml:7:")
            && error.contains("route[0].faults")
            && error.contains("allow_faults = true"),
        "{error}"
    );
    let bad = [
        ("close_after = { }", "needs one of messages"),
        (
            "close_after = { messages = 1, after = \"1s\" }",
            "not several",
        ),
        (
            "close_after = { messages = 1, code = 1005 }",
            "close_after.code",
        ),
        (
            "reset_after = { messages = 1, code = 1012 }",
            "code and reason belong to close_after",
        ),
        ("refuse_first = { status = 200 }", "refuse_first.status"),
        ("fragment = 0", "faults.fragment"),
        ("latency = \"soon\"", "faults.latency"),
    ];
    for (faults, expected) in bad {
        let text = format!(
            "[gateway]\nallow_faults = true\n\n[[listener]]\nbind = \"127.0.0.1:0\"\n\n[[route]]\npath = \"/ws\"\nupstream = \"tcp://127.0.0.1:1\"\nfaults = {{ {faults} }}\n"
        );
        let error = wsgate::config::Config::parse(&text, "t.toml")
            .expect_err(faults)
            .to_string();
        assert!(error.contains(expected), "{faults}: {error}");
    }

    // Without allow_faults the admin listener knows no /faults.
    let echo = tcp_echo().await;
    let gw = TestGateway::builder()
        .admin()
        .route("/ws", &format!("tcp://{echo}"))
        .start()
        .await
        .unwrap();
    let response = admin_post(&gw, "/faults/close?route=/ws").await;
    assert_eq!(response.status, 404);
    assert!(response.body.contains("allow_faults"), "{response:?}");
    gw.stop().await;
}

#[tokio::test]
async fn faults_act_on_wss_connections_too() {
    let upstream = ws_echo().await;
    let gw = TestGateway::builder()
        .allow_faults()
        .self_signed()
        .route_with(
            "/ws",
            &format!("ws://{}", upstream.addr),
            "faults = { reset_after = { messages = 1 } }",
        )
        .start()
        .await
        .expect("start");
    let connector = tokio_rustls::TlsConnector::from(gw.rustls_client_config().unwrap());
    let mut ws = connect_tls(&connector, gw.addr(), &gw.url("/ws")).await;
    ws.send(text(1)).await.unwrap();
    assert_eq!(next_data(&mut ws).await, text(1));
    // The TCP connection under the TLS session is reset.
    let end = within("the reset", ws.next()).await;
    let error = format!("{end:?}");
    assert!(
        error.contains("ConnectionReset") || error.contains("reset"),
        "{error}"
    );
    gw.stop().await;
}
