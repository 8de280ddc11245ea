//! Issue 3: limits, timeouts, keepalive, Origin patterns, reload, drain and metrics.

mod support;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use wsgate::gateway::Gateway;

fn config_with(gateway: &str, listener: &str, route: &str, upstream: &str) -> String {
    format!(
        "[gateway]\nclose_timeout = \"1s\"\n{gateway}\n\n[[listener]]\nbind = \"127.0.0.1:0\"\n{listener}\n\n[[route]]\npath = \"/\"\nupstream = \"{upstream}\"\n{route}\n"
    )
}

#[tokio::test]
async fn max_connections_gives_503_with_retry_after_and_frees_slots() {
    let upstream = format!("tcp://{}", tcp_echo().await);
    let gw = start_gateway(&config_with("max_connections = 2", "", "", &upstream)).await;
    let a = connect(&gw.ws_url("/")).await;
    let _b = connect(&gw.ws_url("/")).await;
    let r = gw.upgrade().await;
    assert_eq!(r.status, 503);
    assert_eq!(r.header("retry-after"), Some("5"));
    drop(a);
    let stats = gw.metrics().clone();
    wait_until("slot freed", move || stats.active_relays() == 1).await;
    let r = gw.upgrade().await;
    assert_eq!(r.status, 101);
    gw.stop().await;
}

#[tokio::test]
async fn listener_and_per_ip_limits() {
    let upstream = format!("tcp://{}", tcp_echo().await);
    let gw = start_gateway(&config_with(
        "max_connections_per_ip = 1",
        "max_connections = 2",
        "",
        &upstream,
    ))
    .await;
    let url = gw.ws_url("/");
    let _a = connect_from("127.0.0.2", &url)
        .await
        .expect("first from .2");
    let refused = connect_from("127.0.0.2", &url)
        .await
        .expect_err("second from .2");
    assert!(refused.to_string().contains("503"), "{refused}");
    let _b = connect_from("127.0.0.3", &url)
        .await
        .expect("first from .3");
    let refused = connect_from("127.0.0.4", &url)
        .await
        .expect_err("listener full");
    assert!(refused.to_string().contains("503"), "{refused}");
    gw.stop().await;
}

#[tokio::test]
async fn slowloris_is_cut_off_while_others_are_served() {
    let upstream = format!("tcp://{}", tcp_echo().await);
    let gw = start_gateway(&config_with(
        "handshake_timeout = \"400ms\"",
        "",
        "",
        &upstream,
    ))
    .await;
    let addr = gw.addr();
    let slow = tokio::spawn(async move {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let request = upgrade_request("/", "");
        let started = tokio::time::Instant::now();
        for byte in request.as_bytes() {
            if stream.write_all(&[*byte]).await.is_err() {
                return started.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            // Closed by the gateway?
            let mut probe = [0u8; 1];
            if let Ok(Ok(0)) = tokio::time::timeout(Duration::ZERO, stream.read(&mut probe)).await {
                return started.elapsed();
            }
        }
        panic!("the whole request went through at one byte per 50 ms");
    });
    // Meanwhile others are served.
    for _ in 0..3 {
        let mut ws = connect(&gw.ws_url("/")).await;
        ws.send(Message::text("ok")).await.unwrap();
        next_data(&mut ws).await;
    }
    let cut_after = within("slow client cut", slow).await.unwrap();
    assert!(
        cut_after >= Duration::from_millis(400),
        "cut after {cut_after:?}"
    );
    gw.stop().await;
}

#[tokio::test]
async fn oversized_request_head_is_431() {
    let upstream = format!("tcp://{}", tcp_echo().await);
    let gw = start_gateway(&config_with(
        "max_request_head_size = \"8KiB\"",
        "",
        "",
        &upstream,
    ))
    .await;
    let cookie = format!("Cookie: {}\r\n", "a".repeat(9000));
    let r = raw_request(gw.addr(), &upgrade_request("/", &cookie)).await;
    assert_eq!(r.status, 431);
    let r = raw_request(gw.addr(), &upgrade_request("/", "Cookie: small\r\n")).await;
    assert_eq!(r.status, 101);
    gw.stop().await;
}

#[tokio::test]
async fn max_frame_size_is_1009() {
    let upstream = format!("tcp://{}", tcp_echo().await);
    let gw = start_gateway(&config_with(
        "",
        "",
        "max_message_size = \"1MiB\"\nmax_frame_size = \"1KiB\"",
        &upstream,
    ))
    .await;
    // Fragments within the frame limit make a message above it.
    let mut stream = raw_upgrade(gw.addr(), "/").await;
    for i in 0..4 {
        stream
            .write_all(&client_frame(
                i == 3,
                if i == 0 { 0x2 } else { 0x0 },
                &[1u8; 1000],
            ))
            .await
            .unwrap();
    }
    let mut got = 0;
    while got < 4000 {
        got += read_raw_frame(&mut stream).await.2.len();
    }
    stream
        .write_all(&client_frame(true, 0x2, &[1u8; 1025]))
        .await
        .unwrap();
    assert_eq!(read_raw_close(&mut stream).await, 1009);
    gw.stop().await;
}

#[tokio::test]
async fn idle_timeout_closes_with_1001() {
    let upstream = ws_echo().await;
    let gw = start_gateway(&config_with(
        "",
        "",
        "idle_timeout = \"300ms\"",
        &format!("ws://{}", upstream.addr),
    ))
    .await;
    let mut ws = connect(&gw.ws_url("/")).await;
    ws.send(Message::text("active")).await.unwrap();
    next_data(&mut ws).await;
    let (_, close) = read_until_close(&mut ws).await;
    assert_eq!(close, Some((1001, "idle timeout".to_string())));
    // The upstream was closed after the client (its Close answered and passed on).
    let seen = upstream.seen.clone();
    wait_until("upstream closed", move || {
        !seen.lock().unwrap().closes.is_empty()
    })
    .await;
    gw.wait_idle().await;
    gw.stop().await;
}

#[tokio::test]
async fn keepalive_pings_a_live_client_and_drops_a_dead_one() {
    let upstream_addr = tcp_echo().await;
    let gw = start_gateway(&config_with(
        "",
        "",
        "ping_interval = \"100ms\"\nping_timeout = \"300ms\"",
        &format!("tcp://{upstream_addr}"),
    ))
    .await;
    // A live client (tungstenite answers pings while it reads) sees several and stays.
    let mut ws = connect(&gw.ws_url("/")).await;
    let mut pings = 0;
    within("three keepalive pings", async {
        while pings < 3 {
            if let Some(Ok(Message::Ping(p))) = ws.next().await {
                assert!(p.starts_with(b"wsgate-keepalive:"));
                pings += 1;
            }
        }
    })
    .await;
    ws.send(Message::text("still here")).await.unwrap();
    assert_eq!(
        next_data(&mut ws).await.into_data(),
        b"still here".as_slice()
    );
    // A dead client: upgraded, then never reads nor answers.
    let dead = raw_upgrade(gw.addr(), "/").await;
    let stats = gw.metrics().clone();
    wait_until("two relays", move || stats.active_relays() == 2).await;
    let stats = gw.metrics().clone();
    wait_until("dead client dropped", move || stats.active_relays() == 1).await;
    drop(dead);
    gw.stop().await;
}

#[tokio::test]
async fn a_client_that_stops_reading_is_detected() {
    // The upstream floods; the client stops reading, so the gateway's writes block. The
    // keepalive ping cannot be written either: the connection is dropped, the upstream closed.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let upstream = tcp_upstream(move |mut stream| {
        let tx = tx.clone();
        async move {
            let chunk = vec![7u8; 64 * 1024];
            while stream.write_all(&chunk).await.is_ok() {}
            let _ = tx.send(());
        }
    })
    .await;
    let gw = start_gateway(&config_with(
        "",
        "",
        "ping_interval = \"100ms\"\nping_timeout = \"200ms\"",
        &format!("tcp://{upstream}"),
    ))
    .await;
    let stuck = raw_upgrade(gw.addr(), "/").await;
    gw.wait_idle().await;
    within("upstream saw its connection end", rx.recv())
        .await
        .unwrap();
    drop(stuck);
    gw.stop().await;
}

#[tokio::test]
async fn origin_patterns() {
    let upstream = format!("tcp://{}", tcp_echo().await);
    let gw = start_gateway(&config_with(
        "",
        "",
        "allowed_origins = [\"https://*.example.com\", \"http://localhost:8080\"]",
        &upstream,
    ))
    .await;
    for (origin, status) in [
        ("https://app.example.com", 101),
        ("https://a.b.example.com", 101),
        ("http://localhost:8080", 101),
        ("https://example.com", 403),
        ("http://app.example.com", 403),
        ("https://example.com.evil.org", 403),
        ("null", 403),
    ] {
        let r = raw_request(
            gw.addr(),
            &upgrade_request("/", &format!("Origin: {origin}\r\n")),
        )
        .await;
        assert_eq!(r.status, status, "{origin}");
    }
    gw.stop().await;
}

#[tokio::test]
async fn reload_switches_routes_keeps_live_connections_and_rejects_bad_files() {
    let up1 = ws_echo().await;
    let up2 = ws_echo().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    let cfg = |up: std::net::SocketAddr, extra_listener: &str| {
        format!(
            "[gateway]\nclose_timeout = \"1s\"\n[admin]\nbind = \"127.0.0.1:0\"\n[[listener]]\nname = \"main\"\nbind = \"127.0.0.1:0\"\n{extra_listener}\n[[route]]\npath = \"/\"\nupstream = \"ws://{up}/\"\n"
        )
    };
    std::fs::write(&path, cfg(up1.addr, "")).unwrap();
    let gw = start_config(wsgate::config::Config::load(&path).unwrap()).await;
    let mut old = connect(&gw.ws_url("/")).await;
    old.send(Message::text("one")).await.unwrap();
    next_data(&mut old).await;

    // New routes and a second listener.
    std::fs::write(
        &path,
        cfg(
            up2.addr,
            "[[listener]]\nname = \"extra\"\nbind = \"127.0.0.1:0\"\n",
        ),
    )
    .unwrap();
    gw.server().reload_from(&path).await.expect("reload");
    let addrs = gw.server().local_addrs();
    assert_eq!(addrs.len(), 2);
    assert_eq!(addrs[0], gw.addr(), "the kept listener keeps its socket");
    for addr in &addrs {
        let mut new = connect(&format!("ws://{addr}/")).await;
        new.send(Message::text("two")).await.unwrap();
        next_data(&mut new).await;
    }
    assert_eq!(
        up2.seen.lock().unwrap().paths.len(),
        2,
        "new connections use the new route"
    );
    // The established connection still reaches its old upstream.
    old.send(Message::text("still one")).await.unwrap();
    assert_eq!(next_data(&mut old).await, Message::text("still one"));
    assert_eq!(up1.seen.lock().unwrap().paths.len(), 1);

    // A broken file is refused; everything stays.
    std::fs::write(&path, "[[listener]]\nbind = \"nonsense\"\n").unwrap();
    let err = gw
        .server()
        .reload_from(&path)
        .await
        .expect_err("bad config");
    assert!(err.to_string().contains("listener[0].bind"), "{err}");
    assert_eq!(gw.server().local_addrs(), addrs);

    // Removing the extra listener closes it for new connections.
    std::fs::write(&path, cfg(up2.addr, "")).unwrap();
    gw.server().reload_from(&path).await.expect("reload");
    let extra = addrs[1];
    wait_until_async_refused(extra).await;
    let admin = gw.server().admin_addr().unwrap();
    let (_, metrics) = admin_get(admin, "/metrics").await;
    assert_eq!(
        metric(&metrics, "wsgate_config_reloads_total{result=\"ok\"}"),
        2.0,
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "wsgate_config_reloads_total{result=\"failed\"}"),
        0.0,
        "{metrics}"
    );
    gw.stop().await;
}

async fn wait_until_async_refused(addr: std::net::SocketAddr) {
    within("listener closed", async {
        while TcpStream::connect(addr).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn reload_that_cannot_bind_changes_nothing() {
    let upstream = format!("tcp://{}", tcp_echo().await);
    let gw = start_gateway(&config_with("", "name = \"main\"", "", &upstream)).await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let text = format!(
        "{}\n[[listener]]\nname = \"busy\"\nbind = \"{}\"\n",
        config_with("", "name = \"main\"", "", "tcp://127.0.0.1:1"),
        taken.local_addr().unwrap()
    );
    let config = wsgate::config::Config::parse(&text, "t").unwrap();
    let err = gw
        .server()
        .reload(Gateway::prepare(config).unwrap())
        .await
        .expect_err("address in use");
    assert!(err.to_string().contains("cannot listen"), "{err}");
    // The old route (to the echo) is still in force.
    let mut ws = connect(&gw.ws_url("/")).await;
    ws.send(Message::text("x")).await.unwrap();
    next_data(&mut ws).await;
    gw.stop().await;
}

#[tokio::test]
async fn metrics_after_a_known_sequence_and_readyz_during_drain() {
    let tcp = tcp_echo().await;
    let text = format!(
        "[gateway]\nclose_timeout = \"1s\"\nshutdown_timeout = \"5s\"\n[admin]\nbind = \"127.0.0.1:0\"\n[[listener]]\nname = \"pub\"\nbind = \"127.0.0.1:0\"\n[[route]]\npath = \"/echo\"\nupstream = \"tcp://{tcp}\"\n[[route]]\npath = \"/down\"\nupstream = \"tcp://127.0.0.1:1\"\n"
    );
    let gw = start_gateway(&text).await;
    let admin = gw.server().admin_addr().expect("admin");
    assert_eq!(admin_get(admin, "/healthz").await.0, 200);
    assert_eq!(admin_get(admin, "/readyz").await.0, 200);
    for _ in 0..2 {
        let mut ws = connect(&gw.ws_url("/echo")).await;
        ws.send(Message::binary(vec![0u8; 100])).await.unwrap();
        next_data(&mut ws).await;
        ws.close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "".into(),
        }))
        .await
        .unwrap();
        read_until_close(&mut ws).await;
    }
    gw.wait_idle().await;
    assert_eq!(
        raw_request(gw.addr(), &upgrade_request("/nowhere", ""))
            .await
            .status,
        404
    );
    assert_eq!(
        raw_request(gw.addr(), &upgrade_request("/down", ""))
            .await
            .status,
        502
    );
    let live = connect(&gw.ws_url("/echo")).await;

    let (status, m) = admin_get(admin, "/metrics").await;
    assert_eq!(status, 200);
    let checks = [
        (
            "wsgate_connections_total{listener=\"pub\",route=\"/echo\"}",
            3.0,
        ),
        (
            "wsgate_connections_active{listener=\"pub\",route=\"/echo\"}",
            1.0,
        ),
        ("wsgate_handshake_rejections_total{status=\"404\"}", 1.0),
        ("wsgate_handshake_rejections_total{status=\"502\"}", 1.0),
        (
            "wsgate_upstream_connect_errors_total{upstream=\"tcp://127.0.0.1:1\"}",
            1.0,
        ),
        (
            &format!("wsgate_upstream_connect_seconds_count{{upstream=\"tcp://{tcp}\"}}"),
            3.0,
        ),
        (
            "wsgate_bytes_total{route=\"/echo\",direction=\"client_to_upstream\"}",
            200.0,
        ),
        (
            "wsgate_bytes_total{route=\"/echo\",direction=\"upstream_to_client\"}",
            200.0,
        ),
        ("wsgate_closes_total{code=\"1000\",side=\"client\"}", 2.0),
        (
            "wsgate_connection_duration_seconds_count{route=\"/echo\"}",
            2.0,
        ),
    ];
    for (sample, value) in checks {
        assert_eq!(metric(&m, sample), value, "{sample}\n{m}");
    }

    // Drain: readiness fails while the live connection is being closed.
    gw.begin_shutdown();
    assert_eq!(admin_get(admin, "/readyz").await.0, 503);
    drop(live);
    gw.stop().await;
}

#[tokio::test]
async fn rejections_are_logged_at_a_bounded_rate() {
    // Hundreds of bad requests do not each get a log line; the limiter unit test counts the
    // exact numbers. Here: the gateway stays responsive under a burst of refusals.
    let upstream = format!("tcp://{}", tcp_echo().await);
    let gw = start_gateway(&config_with("", "", "", &upstream)).await;
    for _ in 0..300 {
        let r = raw_request(gw.addr(), "GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert_eq!(r.status, 426);
    }
    let r = gw.upgrade().await;
    assert_eq!(r.status, 101);
    gw.stop().await;
}

#[tokio::test]
async fn close_timeout_answers_the_client_and_drops_an_upstream_that_never_finishes() {
    // The upstream reads to EOF (our half-close) but then keeps its side open forever.
    let upstream = tcp_upstream(|mut stream| async move {
        let mut sink = Vec::new();
        let _ = stream.read_to_end(&mut sink).await;
        std::future::pending::<()>().await;
    })
    .await;
    let gw = start_gateway(
        &config_with("", "", "", &format!("tcp://{upstream}"))
            .replace("close_timeout = \"1s\"", "close_timeout = \"300ms\""),
    )
    .await;
    let mut ws = connect(&gw.ws_url("/")).await;
    ws.send(Message::Close(Some(CloseFrame {
        code: CloseCode::from(4000),
        reason: "bye".into(),
    })))
    .await
    .unwrap();
    let (_, close) = read_until_close(&mut ws).await;
    // SPEC §4 (round 2): the upstream never finished, so the client is not told it did.
    assert_eq!(
        close.map(|c| c.0),
        Some(CloseCode::Error.into()),
        "an unfinished transfer is 1011 at the deadline"
    );
    gw.wait_idle().await;
    gw.stop().await;
}

#[tokio::test]
async fn shutdown_timeout_drops_clients_that_never_answer() {
    let upstream = format!("tcp://{}", tcp_echo().await);
    let text = config_with("shutdown_timeout = \"300ms\"", "", "", &upstream)
        .replace("close_timeout = \"1s\"", "close_timeout = \"60s\"");
    let gw = start_gateway(&text).await;
    // Upgraded, then silent: it will never answer the Close 1001.
    let silent = raw_upgrade(gw.addr(), "/").await;
    let stats = gw.metrics().clone();
    wait_until("relay running", move || stats.active_relays() == 1).await;
    gw.stop().await; // returns only because shutdown_timeout forces the rest closed
    drop(silent);
}

#[tokio::test]
async fn drain_delivers_what_the_upstream_already_sent_before_1001() {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let total = 64 * 1024;
    let upstream = tcp_upstream(move |mut stream| {
        let tx = tx.clone();
        async move {
            stream.write_all(&vec![5u8; total]).await.unwrap();
            tx.send(()).unwrap();
            std::future::pending::<()>().await;
        }
    })
    .await;
    let gw = start_gateway(&config_with("", "", "", &format!("tcp://{upstream}"))).await;
    let mut ws = connect(&gw.ws_url("/")).await;
    within("upstream wrote", rx.recv()).await.unwrap();
    gw.begin_shutdown();
    let (data, close) = read_until_close(&mut ws).await;
    let received: usize = data.iter().map(|m| m.len()).sum();
    assert_eq!(
        received, total,
        "everything the upstream sent before the drain"
    );
    assert_eq!(close.map(|c| c.0), Some(1001));
    gw.stop().await;
}

/// SPEC §4: idle means no data *in either direction*; traffic keeps resetting the timer.
#[tokio::test]
async fn data_keeps_an_idle_timeout_from_firing() {
    let upstream = tcp_echo().await;
    let gw = start_gateway(&config_with(
        "",
        "",
        "idle_timeout = \"1s\"",
        &format!("tcp://{upstream}"),
    ))
    .await;
    let mut ws = connect(&gw.ws_url("/")).await;
    // 15 echoes 100 ms apart span 1.5 s, longer than the idle timeout; each gap is far
    // shorter. A close in between would make next_data fail.
    for i in 0..15u8 {
        ws.send(Message::binary(vec![i])).await.unwrap();
        assert_eq!(next_data(&mut ws).await.into_data(), vec![i]);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Then silence: the timer fires.
    let (_, close) = read_until_close(&mut ws).await;
    assert_eq!(close, Some((1001, "idle timeout".to_string())));
    gw.stop().await;
}

/// `reuse_port = true`: several gateways listen on one address and the kernel spreads the
/// connections over them; without it the second one's bind fails, naming the address.
#[tokio::test]
async fn reuse_port_lets_several_gateways_share_a_port() {
    let echo = tcp_echo().await;
    let config = |port: u16, reuse: bool| {
        format!(
            "[[listener]]\nbind = \"127.0.0.1:{port}\"\nreuse_port = {reuse}\n\n[[route]]\npath = \"/\"\nupstream = \"tcp://{echo}\"\n"
        )
    };
    let first = TestGateway::from_toml(&config(0, true)).await.unwrap();
    let port = first.addr().port();
    let second = TestGateway::from_toml(&config(port, true)).await.unwrap();
    let refused = TestGateway::from_toml(&config(port, false))
        .await
        .err()
        .expect("a third gateway without reuse_port cannot bind");
    let message = refused.to_string();
    assert!(
        message.contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{message}"
    );
    // Each connection comes from its own port, and the kernel hashes the four-tuple: both
    // gateways get some of 32 (all on one: a chance of 2^-31).
    for _ in 0..32 {
        let mut ws = connect(&format!("ws://127.0.0.1:{port}/")).await;
        ws.send(Message::text("hi")).await.unwrap();
        next_data(&mut ws).await;
    }
    for gw in [&first, &second] {
        let upgrades = metric(
            &gw.metrics().encode(),
            "wsgate_upgrades_total{http=\"1.1\"}",
        );
        assert!(upgrades >= 1.0, "a gateway got no connection: {upgrades}");
    }
    first.stop().await;
    second.stop().await;
}

/// A connection the kernel completed in a passed socket's backlog before the gateway set the
/// listener's options (socket activation: systemd listened first) gets them all the same:
/// `ss` shows the keepalive timer on the gateway's end.
#[tokio::test]
async fn connections_queued_before_the_gateway_started_get_its_keepalive() {
    let echo = tcp_echo().await;
    let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = socket.local_addr().unwrap();
    let mut queued = TcpStream::connect(addr).await.unwrap();
    let client_port = queued.local_addr().unwrap().port();
    let config = wsgate::config::Config::parse(
        &format!(
            "[gateway]\ntcp_keepalive = {{ idle = \"7s\", interval = \"3s\", probes = 4 }}\n\n[[listener]]\nname = \"main\"\nbind = \"{addr}\"\n\n[[route]]\npath = \"/\"\nupstream = \"tcp://{echo}\"\n"
        ),
        "test.toml",
    )
    .unwrap();
    let sockets = wsgate::systemd::Activated::from_listeners([("main".to_string(), socket)]);
    let gw = TestGateway::with_sockets(config, sockets).await.unwrap();
    queued
        .write_all(upgrade_request("/", "").as_bytes())
        .await
        .unwrap();
    assert_eq!(read_response(&mut queued).await.status, 101);
    let filter = format!("( sport = :{} and dport = :{client_port} )", addr.port());
    let out = std::process::Command::new("ss")
        .args(["-tnoH", "state", "established", &filter])
        .output()
        .expect("ss (iproute2)");
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        listing.contains("timer:(keepalive"),
        "the gateway's end of the queued connection has no keepalive: {listing:?}"
    );
    drop(queued);
    gw.stop().await;
}
