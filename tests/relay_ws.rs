//! SPEC §4 for ws:// upstreams: messages keep type and bytes, subprotocols and close codes
//! pass through, pings travel end to end, paths map like nginx's proxy_pass.

mod support;

use futures_util::{SinkExt, StreamExt};
use support::*;
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};

async fn echo_gateway(path: &str, route_extra: &str) -> (TestGateway, WsUpstream) {
    let upstream = ws_echo().await;
    let gw = start_gateway(&simple_config(
        &format!("ws://{}{path}", upstream.addr),
        route_extra,
    ))
    .await;
    (gw, upstream)
}

#[tokio::test]
async fn messages_keep_type_and_bytes() {
    let (gw, _up) = echo_gateway("", "").await;
    let mut ws = connect(&gw.ws_url("/")).await;
    for len in [0usize, 1, 125, 126, 65535, 65536, 1 << 20] {
        let binary: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
        ws.send(Message::binary(binary.clone())).await.unwrap();
        assert_eq!(
            next_data(&mut ws).await,
            Message::binary(binary),
            "binary {len}"
        );
        let text = "ü".repeat(len / 2);
        ws.send(Message::text(text.clone())).await.unwrap();
        assert_eq!(next_data(&mut ws).await, Message::text(text), "text {len}");
    }
    ws.close(None).await.unwrap();
    gw.wait_idle().await;
    gw.stop().await;
}

#[tokio::test]
async fn fragmented_and_pipelined_messages() {
    let (gw, _up) = echo_gateway("", "").await;
    let mut ws = connect(&gw.ws_url("/")).await;
    ws.send(Message::Frame(Frame::message(
        b"hel".to_vec(),
        OpCode::Data(Data::Text),
        false,
    )))
    .await
    .unwrap();
    ws.send(Message::Frame(Frame::message(
        b"lo".to_vec(),
        OpCode::Data(Data::Continue),
        true,
    )))
    .await
    .unwrap();
    assert_eq!(next_data(&mut ws).await, Message::text("hello"));
    for i in 0..1000 {
        ws.feed(Message::text(format!("#{i}"))).await.unwrap();
    }
    ws.flush().await.unwrap();
    for i in 0..1000 {
        assert_eq!(next_data(&mut ws).await, Message::text(format!("#{i}")));
    }
    gw.stop().await;
}

#[tokio::test]
async fn subprotocol_round_trip() {
    let (gw, up) = echo_gateway("", "").await;
    let (mut ws, response) = connect_with(
        &gw.ws_url("/"),
        &[("sec-websocket-protocol", "v1.chat, v2.chat")],
    )
    .await
    .expect("handshake");
    // The test upstream picks the last offered protocol; the gateway returns its choice.
    assert_eq!(
        response.headers().get("sec-websocket-protocol").unwrap(),
        "v2.chat"
    );
    assert_eq!(
        up.seen.lock().unwrap().protocols,
        vec![Some("v1.chat, v2.chat".to_string())]
    );
    ws.send(Message::text("x")).await.unwrap();
    assert_eq!(next_data(&mut ws).await, Message::text("x"));
    gw.stop().await;
}

#[tokio::test]
async fn close_code_and_reason_pass_client_to_upstream() {
    let (gw, up) = echo_gateway("", "").await;
    let mut ws = connect(&gw.ws_url("/")).await;
    ws.send(Message::Close(Some(CloseFrame {
        code: CloseCode::from(4321),
        reason: "client says bye".into(),
    })))
    .await
    .unwrap();
    let (_, close) = read_until_close(&mut ws).await;
    // tungstenite echoes the code it got; it came back through the gateway.
    assert_eq!(close.map(|c| c.0), Some(4321));
    let seen = up.seen.clone();
    wait_until("upstream saw the close", move || {
        !seen.lock().unwrap().closes.is_empty()
    })
    .await;
    assert_eq!(
        up.seen.lock().unwrap().closes[0],
        Some((4321, "client says bye".to_string()))
    );
    gw.wait_idle().await;
    gw.stop().await;
}

#[tokio::test]
async fn close_code_and_reason_pass_upstream_to_client() {
    let (gw, _up) = echo_gateway("", "").await;
    let mut ws = connect(&gw.ws_url("/")).await;
    ws.send(Message::text("close 4002 upstream says bye"))
        .await
        .unwrap();
    let (_, close) = read_until_close(&mut ws).await;
    assert_eq!(close, Some((4002, "upstream says bye".to_string())));
    gw.wait_idle().await;
    gw.stop().await;
}

#[tokio::test]
async fn pings_pass_through_to_the_upstream() {
    let (gw, up) = echo_gateway("", "").await;
    let mut ws = connect(&gw.ws_url("/")).await;
    ws.send(Message::Ping(b"end-to-end".to_vec().into()))
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
    assert_eq!(&pong[..], b"end-to-end");
    // The upstream itself saw the ping: the gateway did not answer it locally.
    assert_eq!(up.seen.lock().unwrap().pings, vec![b"end-to-end".to_vec()]);
    gw.stop().await;
}

#[tokio::test]
async fn path_query_and_headers_are_forwarded() {
    let (gw, up) = echo_gateway("/base", "").await;
    let (mut ws, _) = connect_with(
        &gw.ws_url("/room/7?user=ann"),
        &[("origin", "https://app.example")],
    )
    .await
    .expect("handshake");
    ws.send(Message::text("x")).await.unwrap();
    next_data(&mut ws).await;
    {
        let seen = up.seen.lock().unwrap();
        assert_eq!(seen.paths, vec!["/base/room/7?user=ann".to_string()]);
        assert_eq!(seen.origins, vec![Some("https://app.example".to_string())]);
        assert_eq!(seen.hosts, vec![Some(up.addr.to_string())]);
    }
    gw.stop().await;
}

#[tokio::test]
async fn upstream_without_path_gets_the_client_path() {
    let upstream = ws_echo().await;
    let config = format!(
        "[[listener]]\nbind = \"127.0.0.1:0\"\n[[route]]\npath = \"/chat\"\nupstream = \"ws://{}\"\n",
        upstream.addr
    );
    let gw = start_gateway(&config).await;
    let mut ws = connect(&gw.ws_url("/chat/lobby")).await;
    ws.send(Message::text("x")).await.unwrap();
    next_data(&mut ws).await;
    assert_eq!(
        upstream.seen.lock().unwrap().paths,
        vec!["/chat/lobby".to_string()]
    );
    gw.stop().await;
}

#[tokio::test]
async fn upstream_dying_mid_stream_closes_client_with_1011() {
    // A WebSocket upstream that completes the handshake, reads one message, then drops TCP.
    let upstream = tcp_upstream(|stream| async move {
        let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
            return;
        };
        let _ = ws.next().await;
        drop(ws);
    })
    .await;
    let gw = start_gateway(&simple_config(&format!("ws://{upstream}/"), "")).await;
    let mut ws = connect(&gw.ws_url("/")).await;
    ws.send(Message::text("bye")).await.unwrap();
    let (_, close) = read_until_close(&mut ws).await;
    assert_eq!(close.map(|c| c.0), Some(1011));
    gw.wait_idle().await;
    gw.stop().await;
}

#[tokio::test]
async fn client_protocol_error_is_1002_and_upstream_is_told() {
    let (gw, up) = echo_gateway("", "").await;
    let mut stream = raw_upgrade(gw.addr(), "/").await;
    stream
        .write_all(&frame(true, 0x2, b"unmasked", None))
        .await
        .unwrap();
    assert_eq!(read_raw_close(&mut stream).await, 1002);
    let seen = up.seen.clone();
    wait_until("upstream told", move || {
        !seen.lock().unwrap().closes.is_empty()
    })
    .await;
    assert_eq!(
        up.seen.lock().unwrap().closes[0].as_ref().map(|c| c.0),
        Some(1001)
    );
    gw.wait_idle().await;
    gw.stop().await;
}

#[tokio::test]
async fn oversize_message_toward_ws_upstream_is_1009() {
    let (gw, _up) = echo_gateway("", "max_message_size = 100").await;
    let mut stream = raw_upgrade(gw.addr(), "/").await;
    stream
        .write_all(&client_frame(false, 0x2, &[0u8; 60]))
        .await
        .unwrap();
    stream
        .write_all(&client_frame(true, 0x0, &[0u8; 60]))
        .await
        .unwrap();
    assert_eq!(read_raw_close(&mut stream).await, 1009);
    gw.wait_idle().await;
    gw.stop().await;
}

#[tokio::test]
async fn client_vanishing_leaves_no_task() {
    let (gw, up) = echo_gateway("", "").await;
    // Between frames: the upstream is told with a Close.
    for _ in 0..5 {
        let mut stream = raw_upgrade(gw.addr(), "/").await;
        stream
            .write_all(&client_frame(true, 0x1, b"whole"))
            .await
            .unwrap();
        drop(stream);
    }
    gw.wait_idle().await;
    let seen = up.seen.clone();
    wait_until("upstreams told the client went away", move || {
        let seen = seen.lock().unwrap();
        seen.closes.len() == 5 && seen.ended == 5
    })
    .await;
    assert!(
        up.seen
            .lock()
            .unwrap()
            .closes
            .iter()
            .all(|c| c.as_ref().map(|c| c.0) == Some(1001)),
        "{:?}",
        up.seen.lock().unwrap().closes
    );
    // In the middle of a frame (part of it already went on): a Close would land inside the
    // frame, so the upstream connection is just closed.
    for _ in 0..5 {
        let mut stream = raw_upgrade(gw.addr(), "/").await;
        let f = client_frame(true, 0x1, &[b'a'; 300]);
        stream.write_all(&f[..100]).await.unwrap();
        drop(stream);
    }
    gw.wait_idle().await;
    assert_eq!(gw.metrics().relays_total(), 10);
    let seen = up.seen.clone();
    wait_until("upstream connections closed", move || {
        seen.lock().unwrap().ended == 10
    })
    .await;
    gw.stop().await;
}

#[tokio::test]
async fn upstream_pings_reach_the_client_and_its_pong_goes_back() {
    let (gw, up) = echo_gateway("", "").await;
    let mut ws = connect(&gw.ws_url("/")).await;
    ws.send(Message::text("ping from-upstream")).await.unwrap();
    let ping = within("ping", async {
        loop {
            if let Some(Ok(Message::Ping(p))) = ws.next().await {
                return p;
            }
        }
    })
    .await;
    assert_eq!(&ping[..], b"from-upstream");
    // tungstenite answers while we keep the stream moving.
    ws.send(Message::text("x")).await.unwrap();
    next_data(&mut ws).await;
    let seen = up.seen.clone();
    wait_until("upstream got the pong", move || {
        !seen.lock().unwrap().pongs.is_empty()
    })
    .await;
    assert_eq!(up.seen.lock().unwrap().pongs[0], b"from-upstream");
    gw.stop().await;
}

#[tokio::test]
async fn upstream_protocol_error_is_1011_to_the_client() {
    // An upstream that completes the handshake properly, then sends a masked frame.
    let upstream = tcp_upstream(|mut stream| async move {
        use tokio::io::AsyncReadExt;
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if stream.read(&mut byte).await.unwrap_or(0) == 0 {
                return;
            }
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).to_string();
        let key = head
            .lines()
            .find_map(|l| l.strip_prefix("sec-websocket-key: ").or_else(|| l.strip_prefix("Sec-WebSocket-Key: ")))
            .unwrap()
            .trim()
            .to_string();
        let accept = wsgate::handshake::accept_key(key.as_bytes());
        let response = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
        );
        stream.write_all(response.as_bytes()).await.unwrap();
        stream.write_all(&client_frame(true, 0x1, b"masked by a server")).await.unwrap();
        let mut sink = [0u8; 256];
        while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
    let gw = start_gateway(&simple_config(&format!("ws://{upstream}/"), "")).await;
    let mut ws = connect(&gw.ws_url("/")).await;
    let (_, close) = read_until_close(&mut ws).await;
    assert_eq!(close, Some((1011, "upstream protocol error".to_string())));
    gw.wait_idle().await;
    gw.stop().await;
}

#[tokio::test]
async fn nothing_is_written_into_the_middle_of_a_frame() {
    use tokio::io::AsyncReadExt;
    // A raw upstream that sends one 100 KB frame in slow pieces. Meanwhile the gateway's
    // keepalive wants to ping the client: the pings must wait for the frame's end, or the
    // client would read them as part of the payload; and the wait must not count against
    // the client (it is the upstream that is slow), or keepalive would drop it.
    let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
    let sent = payload.clone();
    let upstream = tcp_upstream(move |mut stream| {
        let payload = sent.clone();
        async move {
            accept_ws_handshake(&mut stream).await;
            stream
                .write_all(&frame(true, 0x2, &payload, None)[..10])
                .await
                .unwrap();
            for piece in payload.chunks(5_000) {
                // Pacing of the upstream, not a wait for a result: the frame takes about
                // a second, several keepalive rounds.
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                stream.write_all(piece).await.unwrap();
            }
            let mut rest = Vec::new();
            let _ = stream.read_to_end(&mut rest).await;
        }
    })
    .await;
    let gw = start_gateway(&simple_config(
        &format!("ws://{upstream}"),
        "ping_interval = \"10ms\"\nping_timeout = \"200ms\"",
    ))
    .await;
    let mut ws = connect(&gw.ws_url("/")).await;
    let got = within("the whole frame", async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Binary(data))) => return data,
                Some(Ok(Message::Ping(_))) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
    })
    .await;
    assert!(
        got.as_ref() == payload.as_slice(),
        "the frame arrived intact"
    );
    // The keepalive pings that waited behind the frame follow it.
    let ping = within("a ping after the frame", async {
        loop {
            if let Some(Ok(Message::Ping(p))) = ws.next().await {
                return p;
            }
        }
    })
    .await;
    assert!(!ping.is_empty());
    drop(ws);
    gw.wait_idle().await;
    gw.stop().await;
}

#[tokio::test]
async fn keepalive_does_not_judge_a_client_stuck_behind_a_slow_upstream() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::AsyncReadExt;
    // A ws upstream that completes its handshake, then reads nothing until released.
    let received = Arc::new(AtomicUsize::new(0));
    let release = Arc::new(tokio::sync::Notify::new());
    let (count, gate) = (received.clone(), release.clone());
    let upstream = tcp_upstream(move |mut stream| {
        let (count, gate) = (count.clone(), gate.clone());
        async move {
            accept_ws_handshake(&mut stream).await;
            gate.notified().await;
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n) = stream.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                count.fetch_add(n, Ordering::SeqCst);
            }
        }
    })
    .await;
    let gw = start_gateway(&simple_config(
        &format!("ws://{upstream}"),
        "ping_interval = \"50ms\"\nping_timeout = \"100ms\"",
    ))
    .await;
    // The client sends 8 MB and answers no ping: while the gateway is blocked writing to the
    // upstream it reads nothing from the client, pongs included, and must not hold that
    // against the client.
    let client = raw_upgrade(gw.addr(), "/").await;
    let (_reader, mut writer) = client.into_split();
    let frame = client_frame(true, 0x2, &vec![5u8; 64 * 1024]);
    let frames = 128;
    let sending = tokio::spawn(async move {
        for _ in 0..frames {
            writer.write_all(&frame).await.unwrap();
        }
        writer
    });
    // Many keepalive rounds pass with the upstream not reading (scenario time, not a wait
    // for a result).
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    release.notify_one();
    let expected = frames * 64 * 1024;
    wait_until("the upstream got all 8 MB", || {
        received.load(Ordering::SeqCst) >= expected
    })
    .await;
    drop(sending.await.unwrap());
    gw.wait_idle().await;
    gw.stop().await;
}

#[tokio::test]
async fn an_upstream_gone_after_a_bare_frame_header_is_1011() {
    // SPEC §4: upstream failure mid-stream closes the client with 1011. Only the header of
    // a frame arrived, so nothing of it was forwarded: the client can still get a Close.
    let upstream = tcp_upstream(|mut stream| async move {
        accept_ws_handshake(&mut stream).await;
        stream.write_all(&[0x82, 0x7e, 0x10, 0x00]).await.unwrap();
        // Dropped here: EOF in the middle of the frame.
    })
    .await;
    let gw = start_gateway(&simple_config(&format!("ws://{upstream}"), "")).await;
    let mut ws = connect(&gw.ws_url("/")).await;
    let (_, close) = read_until_close(&mut ws).await;
    assert_eq!(close.map(|c| c.0), Some(1011));
    gw.wait_idle().await;
    gw.stop().await;
}

#[tokio::test]
async fn an_oversize_message_from_the_upstream_is_1009_to_it_and_1011_to_the_client() {
    use tokio::io::AsyncReadExt;
    // SPEC §4: a message over max_message_size closes with 1009, here toward the side that
    // sent it; the client learns its upstream failed (1011).
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let upstream = tcp_upstream(move |mut stream| {
        let tx = tx.clone();
        async move {
            accept_ws_handshake(&mut stream).await;
            stream
                .write_all(&frame(true, 0x2, &[1u8; 2048], None))
                .await
                .unwrap();
            // The gateway's Close, masked as a client's (a Close carries at most 125 bytes).
            let mut head = [0u8; 6];
            stream.read_exact(&mut head).await.unwrap();
            assert_eq!((head[0], head[1] & 0x80), (0x88, 0x80), "a masked Close");
            let mut payload = vec![0u8; usize::from(head[1] & 0x7f)];
            stream.read_exact(&mut payload).await.unwrap();
            for (i, b) in payload.iter_mut().enumerate() {
                *b ^= head[2 + i % 4];
            }
            let _ = tx.send(u16::from_be_bytes([payload[0], payload[1]]));
        }
    })
    .await;
    let gw = start_gateway(&simple_config(
        &format!("ws://{upstream}"),
        "max_message_size = \"1KiB\"",
    ))
    .await;
    let mut ws = connect(&gw.ws_url("/")).await;
    let (data, close) = read_until_close(&mut ws).await;
    assert!(
        data.is_empty(),
        "nothing of the oversize message is passed on"
    );
    assert_eq!(close.map(|c| c.0), Some(1011));
    assert_eq!(within("the upstream's Close", rx.recv()).await, Some(1009));
    gw.wait_idle().await;
    gw.stop().await;
}
