//! SPEC §4 for tcp:// upstreams: byte-exact relaying, half-close, close codes, limits, and
//! no task left behind.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures_util::{SinkExt, StreamExt};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};

async fn echo_gateway(route_extra: &str) -> TestGateway {
    let upstream = tcp_echo().await;
    start_gateway(&simple_config(&format!("tcp://{upstream}"), route_extra)).await
}

/// Deterministic bytes that differ at every offset, so a reordering or a loss shows.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(31).wrapping_add(seed as u32) as u8)
        .collect()
}

/// Reads binary messages until `len` bytes arrived; the TCP side may re-chunk them.
async fn read_bytes(ws: &mut Client, len: usize) -> Vec<u8> {
    let mut got = Vec::with_capacity(len);
    while got.len() < len {
        match next_data(ws).await {
            Message::Binary(b) => got.extend_from_slice(&b),
            other => panic!("tcp upstream data must arrive as binary, got {other:?}"),
        }
    }
    assert_eq!(got.len(), len, "more bytes than sent");
    got
}

#[tokio::test]
async fn echo_binary_and_text_of_all_sizes() {
    let gw = echo_gateway("").await;
    let mut ws = connect(&gw.ws_url("/")).await;
    for (i, len) in [0usize, 1, 125, 126, 127, 65535, 65536, 100_000, 1 << 20]
        .into_iter()
        .enumerate()
    {
        let data = pattern(len, i as u8);
        ws.send(Message::binary(data.clone())).await.unwrap();
        assert_eq!(
            read_bytes(&mut ws, len).await,
            data,
            "binary of {len} bytes"
        );
        let text: String = "wsgate ✓ ".repeat(len / 10 + 1);
        ws.send(Message::text(text.clone())).await.unwrap();
        assert_eq!(
            read_bytes(&mut ws, text.len()).await,
            text.as_bytes(),
            "text of {} bytes",
            text.len()
        );
    }
    ws.close(None).await.unwrap();
    gw.wait_idle().await;
    gw.stop().await;
}

#[tokio::test]
async fn fragmented_messages_arrive_whole_and_in_order() {
    let gw = echo_gateway("").await;
    let mut ws = connect(&gw.ws_url("/")).await;
    let parts: [&[u8]; 3] = [b"frag", b"ment", b"ed!"];
    ws.send(Message::Frame(Frame::message(
        parts[0].to_vec(),
        OpCode::Data(Data::Binary),
        false,
    )))
    .await
    .unwrap();
    // A ping between fragments is allowed (RFC 6455 §5.4) and must not disturb the message.
    ws.send(Message::Ping(b"mid".to_vec().into()))
        .await
        .unwrap();
    ws.send(Message::Frame(Frame::message(
        parts[1].to_vec(),
        OpCode::Data(Data::Continue),
        false,
    )))
    .await
    .unwrap();
    ws.send(Message::Frame(Frame::message(
        parts[2].to_vec(),
        OpCode::Data(Data::Continue),
        true,
    )))
    .await
    .unwrap();
    // A text message split inside a multi-byte character.
    let text = "€uro".as_bytes();
    ws.send(Message::Frame(Frame::message(
        text[..2].to_vec(),
        OpCode::Data(Data::Text),
        false,
    )))
    .await
    .unwrap();
    ws.send(Message::Frame(Frame::message(
        text[2..].to_vec(),
        OpCode::Data(Data::Continue),
        true,
    )))
    .await
    .unwrap();
    let expected = [b"fragmented!".as_slice(), text].concat();
    assert_eq!(read_bytes(&mut ws, expected.len()).await, expected);
    gw.stop().await;
}

#[tokio::test]
async fn thousand_pipelined_messages_in_order() {
    let gw = echo_gateway("").await;
    let mut ws = connect(&gw.ws_url("/")).await;
    let mut expected = Vec::new();
    for i in 0..1000u32 {
        let msg = format!("message {i:04};");
        expected.extend_from_slice(msg.as_bytes());
        ws.feed(Message::text(msg)).await.unwrap();
    }
    ws.flush().await.unwrap();
    assert_eq!(read_bytes(&mut ws, expected.len()).await, expected);
    gw.stop().await;
}

#[tokio::test]
async fn client_close_half_closes_and_late_reply_still_arrives() {
    // The upstream reads until EOF (the gateway's half-close), then answers and closes.
    let (tx, mut rx) = mpsc::unbounded_channel();
    let upstream = tcp_upstream(move |mut stream| {
        let tx = tx.clone();
        async move {
            let mut received = Vec::new();
            stream.read_to_end(&mut received).await.unwrap();
            let reply = format!("got {} bytes after your EOF", received.len());
            stream.write_all(reply.as_bytes()).await.unwrap();
            stream.shutdown().await.unwrap();
            tx.send(received).unwrap();
        }
    })
    .await;
    let gw = start_gateway(&simple_config(&format!("tcp://{upstream}"), "")).await;
    let mut ws = connect(&gw.ws_url("/")).await;
    ws.send(Message::binary(b"request-1 ".to_vec()))
        .await
        .unwrap();
    ws.send(Message::binary(b"request-2".to_vec()))
        .await
        .unwrap();
    ws.send(Message::Close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "done".into(),
    })))
    .await
    .unwrap();
    // After our Close, the reply still comes, then the Close answer (our code echoed).
    let (data, close) = read_until_close(&mut ws).await;
    let bytes: Vec<u8> = data
        .into_iter()
        .flat_map(|m| m.into_data().to_vec())
        .collect();
    assert_eq!(bytes, b"got 19 bytes after your EOF");
    assert_eq!(close.map(|c| c.0), Some(1000));
    assert_eq!(
        within("upstream saw EOF", rx.recv()).await.unwrap(),
        b"request-1 request-2"
    );
    gw.wait_idle().await;
    gw.stop().await;
}

#[tokio::test]
async fn upstream_eof_delivers_everything_then_close_1000() {
    let total = 3 * 1024 * 1024 + 17;
    let upstream = tcp_upstream(move |mut stream| async move {
        stream.write_all(&pattern(total, 7)).await.unwrap();
        // EOF right behind the data.
    })
    .await;
    let gw = start_gateway(&simple_config(&format!("tcp://{upstream}"), "")).await;
    let mut ws = connect(&gw.ws_url("/")).await;
    let (data, close) = read_until_close(&mut ws).await;
    let bytes: Vec<u8> = data
        .into_iter()
        .flat_map(|m| m.into_data().to_vec())
        .collect();
    assert_eq!(bytes.len(), total);
    assert!(bytes == pattern(total, 7), "bytes differ");
    assert_eq!(close, Some((1000, String::new())));
    gw.wait_idle().await;
    gw.stop().await;
}

#[tokio::test]
async fn upstream_reset_closes_client_with_1011() {
    let upstream = tcp_upstream(|stream| async move {
        // SO_LINGER 0 turns the close into a reset.
        #[allow(deprecated)] // blocking on drop is harmless here: nothing is left to send
        stream.set_linger(Some(std::time::Duration::ZERO)).unwrap();
        let mut stream = stream;
        let mut buf = [0u8; 5];
        stream.read_exact(&mut buf).await.unwrap();
        drop(stream);
    })
    .await;
    let gw = start_gateway(&simple_config(&format!("tcp://{upstream}"), "")).await;
    let mut ws = connect(&gw.ws_url("/")).await;
    ws.send(Message::binary(b"hello".to_vec())).await.unwrap();
    let (_, close) = read_until_close(&mut ws).await;
    assert_eq!(close.map(|c| c.0), Some(1011));
    gw.wait_idle().await;
    gw.stop().await;
}

#[tokio::test]
async fn protocol_errors_close_with_1002() {
    let gw = echo_gateway("").await;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("unmasked frame", frame(true, 0x2, b"abc", None)),
        ("reserved bit", {
            let mut f = client_frame(true, 0x2, b"abc");
            f[0] |= 0x40;
            f
        }),
        ("unknown opcode", client_frame(true, 0x3, b"abc")),
        ("ping over 125 bytes", client_frame(true, 0x9, &[0u8; 126])),
        ("pong over 125 bytes", client_frame(true, 0xA, &[0u8; 126])),
        (
            "close over 125 bytes",
            client_frame(
                true,
                0x8,
                &[0x03, 0xe8]
                    .iter()
                    .copied()
                    .chain([b'x'; 124])
                    .collect::<Vec<_>>(),
            ),
        ),
        ("fragmented ping", client_frame(false, 0x9, b"abc")),
        ("unmasked ping", frame(true, 0x9, b"abc", None)),
        (
            "continuation without a message",
            client_frame(true, 0x0, b"abc"),
        ),
        (
            "new message inside a fragmented one",
            [
                client_frame(false, 0x2, b"a"),
                client_frame(true, 0x2, b"b"),
            ]
            .concat(),
        ),
        (
            "invalid close code",
            client_frame(true, 0x8, &1005u16.to_be_bytes()),
        ),
    ];
    for (what, bytes) in cases {
        let mut stream = raw_upgrade(gw.addr(), "/").await;
        stream.write_all(&bytes).await.unwrap();
        assert_eq!(read_raw_close(&mut stream).await, 1002, "{what}");
    }
    gw.wait_idle().await;
    gw.stop().await;
}

#[tokio::test]
async fn oversize_message_closes_with_1009() {
    let gw = echo_gateway("max_message_size = \"1KiB\"").await;
    // Exactly the limit passes.
    let mut stream = raw_upgrade(gw.addr(), "/").await;
    stream
        .write_all(&client_frame(true, 0x2, &[7u8; 1024]))
        .await
        .unwrap();
    let mut got = 0;
    while got < 1024 {
        let (_, opcode, payload) = read_raw_frame(&mut stream).await;
        assert_eq!(opcode, 0x2);
        got += payload.len();
    }
    // One frame over the limit.
    stream
        .write_all(&client_frame(true, 0x2, &[7u8; 1025]))
        .await
        .unwrap();
    assert_eq!(read_raw_close(&mut stream).await, 1009, "single frame");
    // Fragments that are each small but together too big.
    let mut stream = raw_upgrade(gw.addr(), "/").await;
    stream
        .write_all(&client_frame(false, 0x2, &[1u8; 600]))
        .await
        .unwrap();
    stream
        .write_all(&client_frame(true, 0x0, &[1u8; 600]))
        .await
        .unwrap();
    let code = loop {
        let (_, opcode, payload) = read_raw_frame(&mut stream).await;
        if opcode == 0x8 {
            break u16::from_be_bytes([payload[0], payload[1]]);
        }
    };
    assert_eq!(code, 1009, "fragmented");
    gw.wait_idle().await;
    gw.stop().await;
}

#[tokio::test]
async fn invalid_utf8_text_closes_with_1007() {
    let gw = echo_gateway("").await;
    // A whole text frame.
    let mut stream = raw_upgrade(gw.addr(), "/").await;
    stream
        .write_all(&client_frame(true, 0x1, &[0xff, 0xfe]))
        .await
        .unwrap();
    assert_eq!(read_raw_close(&mut stream).await, 1007, "whole frame");
    // Fragments whose join is invalid although the first part alone looks fine.
    let mut stream = raw_upgrade(gw.addr(), "/").await;
    stream
        .write_all(&client_frame(false, 0x1, &[b'a', 0xe2, 0x82]))
        .await
        .unwrap();
    stream
        .write_all(&client_frame(true, 0x0, b"b"))
        .await
        .unwrap();
    assert_eq!(read_raw_close(&mut stream).await, 1007, "fragmented");
    gw.wait_idle().await;
    gw.stop().await;
}

#[tokio::test]
async fn client_vanishing_mid_message_leaves_no_task_and_closes_upstream() {
    let upstream_closed = Arc::new(AtomicUsize::new(0));
    let counter = upstream_closed.clone();
    let upstream = tcp_upstream(move |mut stream| {
        let counter = counter.clone();
        async move {
            let mut sink = Vec::new();
            let _ = stream.read_to_end(&mut sink).await;
            counter.fetch_add(1, Ordering::SeqCst);
        }
    })
    .await;
    let gw = start_gateway(&simple_config(&format!("tcp://{upstream}"), "")).await;
    for _ in 0..5 {
        let mut stream = raw_upgrade(gw.addr(), "/").await;
        // Half of a 1000-byte frame, then gone.
        let f = client_frame(true, 0x2, &[9u8; 1000]);
        stream.write_all(&f[..500]).await.unwrap();
        let stats = gw.metrics().clone();
        wait_until("relay started", || stats.relays_total() > 0).await;
        drop(stream);
    }
    gw.wait_idle().await;
    let counter = upstream_closed.clone();
    wait_until("every upstream connection closed", move || {
        counter.load(Ordering::SeqCst) == 5
    })
    .await;
    assert_eq!(gw.metrics().relays_total(), 5);
    gw.stop().await;
}

#[tokio::test]
async fn pings_are_answered_by_the_gateway() {
    let gw = echo_gateway("").await;
    let mut ws = connect(&gw.ws_url("/")).await;
    ws.send(Message::Ping(b"are you there".to_vec().into()))
        .await
        .unwrap();
    let pong = within("pong", async {
        loop {
            if let Some(Ok(Message::Pong(p))) = ws.next().await {
                return p;
            }
        }
    })
    .await;
    assert_eq!(&pong[..], b"are you there");
    gw.stop().await;
}

#[tokio::test]
async fn backpressure_a_client_that_does_not_read_stops_the_upstream() {
    // The upstream writes as fast as it can and counts what the kernel accepted. With a
    // client that reads nothing, that count must stall at roughly the socket buffers rather
    // than grow without bound inside the gateway.
    let written = Arc::new(AtomicUsize::new(0));
    let counter = written.clone();
    let upstream = tcp_upstream(move |mut stream| {
        let counter = counter.clone();
        async move {
            let chunk = vec![0u8; 64 * 1024];
            while stream.write_all(&chunk).await.is_ok() {
                counter.fetch_add(chunk.len(), Ordering::SeqCst);
            }
        }
    })
    .await;
    let gw = start_gateway(&simple_config(&format!("tcp://{upstream}"), "")).await;
    let stream = raw_upgrade(gw.addr(), "/").await;
    // Wait until the count stops moving, then check its size.
    let mut last = usize::MAX;
    let stalled = within("upstream writes stall", async {
        loop {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            let now = written.load(Ordering::SeqCst);
            if now == last {
                return now;
            }
            last = now;
        }
    })
    .await;
    // Kernel buffers on loopback (both sockets, both directions) hold a few MiB at most;
    // 64 MiB would mean the gateway buffers on its own.
    assert!(
        stalled < 64 << 20,
        "upstream wrote {stalled} bytes to a client that reads nothing"
    );
    drop(stream);
    gw.wait_idle().await;
    gw.stop().await;
}

#[tokio::test]
async fn unix_socket_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("echo.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let gw = start_gateway(&simple_config(&format!("unix:{}", path.display()), "")).await;
    let mut ws = connect(&gw.ws_url("/")).await;
    ws.send(Message::binary(pattern(70_000, 3))).await.unwrap();
    assert_eq!(read_bytes(&mut ws, 70_000).await, pattern(70_000, 3));
    gw.stop().await;
}

/// A reader that drops a half-read frame when its future is dropped (as fastwebsockets'
/// `read_frame` did) would lose one here. A frame
/// split around the moment shutdown starts must still arrive whole, and the client's
/// Close answer after it must be recognised (the relay ends long before close_timeout).
#[tokio::test]
async fn frame_split_across_shutdown_is_not_lost() {
    let (upstream, mut rx) = recording_upstream().await;
    let config = simple_config(&format!("tcp://{upstream}"), "")
        .replace("close_timeout = \"1s\"", "close_timeout = \"60s\"");
    let gw = start_gateway(&config).await;
    let mut stream = raw_upgrade(gw.addr(), "/").await;
    let payload = pattern(4000, 9);
    let bytes = client_frame(true, 0x2, &payload);
    stream.write_all(&bytes[..1500]).await.unwrap();
    let stats = gw.metrics().clone();
    wait_until("relay running", move || stats.active_relays() == 1).await;
    gw.begin_shutdown();
    assert_eq!(read_raw_close(&mut stream).await, 1001);
    stream.write_all(&bytes[1500..]).await.unwrap();
    stream
        .write_all(&client_frame(true, 0x8, &1001u16.to_be_bytes()))
        .await
        .unwrap();
    gw.wait_idle().await;
    assert_eq!(within("upstream data", rx.recv()).await.unwrap(), payload);
    gw.stop().await;
}

/// Data and the Close that answers ours, arriving in one segment: the data still reaches
/// the upstream before the connection ends (it must not die in the write batch).
#[tokio::test]
async fn data_sent_with_the_closing_answer_reaches_the_upstream() {
    let (upstream, mut rx) = recording_upstream().await;
    let gw = start_gateway(&simple_config(&format!("tcp://{upstream}"), "")).await;
    let mut stream = raw_upgrade(gw.addr(), "/").await;
    let stats = gw.metrics().clone();
    wait_until("relay running", move || stats.active_relays() == 1).await;
    gw.begin_shutdown();
    assert_eq!(read_raw_close(&mut stream).await, 1001);
    let last_words = [
        client_frame(true, 0x1, b"exit\n"),
        client_frame(true, 0x8, &1001u16.to_be_bytes()),
    ]
    .concat();
    stream.write_all(&last_words).await.unwrap();
    gw.wait_idle().await;
    assert_eq!(within("upstream data", rx.recv()).await.unwrap(), b"exit\n");
    gw.stop().await;
}
