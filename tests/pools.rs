//! Routes with several upstreams: how connections spread (each balance mode), failover past
//! an upstream that is down, passive ejection and recovery, active health checks.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures_util::{SinkExt, StreamExt};
use support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

/// A TCP upstream that says its name to each connection, then echoes. It can be stopped
/// (its port then refuses connections) and started again on the same port.
struct Named {
    name: &'static str,
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    task: Option<JoinHandle<()>>,
}

impl Named {
    async fn start(name: &'static str) -> Named {
        let mut upstream = Named {
            name,
            // An address of its own: a port it gives up while "down" cannot be taken by
            // another test's listener on 127.0.0.1 in the meantime.
            addr: "127.0.0.77:0".parse().unwrap(),
            accepted: Arc::new(AtomicUsize::new(0)),
            task: None,
        };
        upstream.listen().await;
        upstream
    }

    /// A name whose port refuses connections: bound once, then closed.
    async fn down(name: &'static str) -> Named {
        let mut upstream = Named::start(name).await;
        upstream.stop();
        upstream
    }

    async fn listen(&mut self) {
        let listener = TcpListener::bind(self.addr).await.expect("bind upstream");
        self.addr = listener.local_addr().unwrap();
        let (name, accepted) = (self.name, self.accepted.clone());
        self.task = Some(tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                accepted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let _ = stream.write_all(name.as_bytes()).await;
                    let (mut r, mut w) = stream.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        }));
    }

    fn stop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn url(&self) -> String {
        format!("tcp://{}", self.addr)
    }
}

fn pool_config(upstreams: &[String], extra: &str) -> String {
    let list: Vec<String> = upstreams.iter().map(|u| format!("{u:?}")).collect();
    format!(
        "[[listener]]\nbind = \"127.0.0.1:0\"\n\n[[route]]\npath = \"/\"\nupstreams = [{}]\n{extra}\n",
        list.join(", ")
    )
}

/// Opens a client and returns it with the name of the upstream it reached.
async fn open(gw: &TestGateway) -> (Client, String) {
    let mut ws = connect(&gw.ws_url("/")).await;
    let first = within("upstream greeting", ws.next())
        .await
        .expect("a message")
        .expect("no error");
    let Message::Binary(name) = first else {
        panic!("expected the upstream's name, got {first:?}")
    };
    (ws, String::from_utf8(name.to_vec()).unwrap())
}

fn count(names: &[String], name: &str) -> usize {
    names.iter().filter(|n| *n == name).count()
}

#[tokio::test]
async fn round_robin_spreads_by_weight() {
    let (a, b, c) = (
        Named::start("a").await,
        Named::start("b").await,
        Named::start("c").await,
    );
    let upstreams = [
        a.url(),
        format!("{{ url = \"{}\", weight = 2 }}", b.url()),
        c.url(),
    ];
    // The weighted entry is a table, not a string: write the list by hand.
    let config = format!(
        "[[listener]]\nbind = \"127.0.0.1:0\"\n\n[[route]]\npath = \"/\"\nupstreams = [\"{}\", {}, \"{}\"]\n",
        upstreams[0], upstreams[1], upstreams[2]
    );
    let gw = start_gateway(&config).await;
    let mut names = Vec::new();
    for _ in 0..40 {
        let (mut ws, name) = open(&gw).await;
        names.push(name);
        ws.close(None).await.unwrap();
    }
    // Round robin is deterministic: exactly by weight, 1:2:1.
    assert_eq!(
        (count(&names, "a"), count(&names, "b"), count(&names, "c")),
        (10, 20, 10),
        "{names:?}"
    );
    gw.wait_idle().await;
    gw.stop().await;
}

#[tokio::test]
async fn least_connections_and_random_two_spread_held_connections() {
    for (balance, tolerance) in [("least_connections", 0), ("random_two", 6)] {
        let (a, b, c) = (
            Named::start("a").await,
            Named::start("b").await,
            Named::start("c").await,
        );
        let gw = start_gateway(&pool_config(
            &[a.url(), b.url(), c.url()],
            &format!("balance = \"{balance}\""),
        ))
        .await;
        let mut held = Vec::new();
        let mut names = Vec::new();
        for _ in 0..60 {
            let (ws, name) = open(&gw).await;
            held.push(ws);
            names.push(name);
        }
        for name in ["a", "b", "c"] {
            let n = count(&names, name);
            // least_connections is exact; two random choices keep the spread within a few.
            assert!(
                n.abs_diff(20) <= tolerance,
                "{balance}: {name} got {n} of 60: {names:?}"
            );
        }
        drop(held);
        gw.wait_idle().await;
        gw.stop().await;
    }
}

#[tokio::test]
async fn failover_past_an_upstream_that_is_down() {
    let dead = Named::down("dead").await;
    let live = Named::start("live").await;
    // max_fails = 0: the dead upstream stays in the rotation, so every other client meets it
    // first and must still be served.
    let gw = start_gateway(&pool_config(&[dead.url(), live.url()], "max_fails = 0")).await;
    for _ in 0..6 {
        let (mut ws, name) = open(&gw).await;
        assert_eq!(name, "live");
        ws.close(None).await.unwrap();
    }
    let metrics = gw.metrics().encode();
    let failures = metric(
        &metrics,
        &format!(
            "wsgate_upstream_connect_errors_total{{upstream=\"{}\"}}",
            dead.url()
        ),
    );
    assert_eq!(
        failures, 3.0,
        "every second client tried the dead one first"
    );
    gw.wait_idle().await;
    gw.stop().await;
}

#[tokio::test]
async fn one_attempt_only_answers_502() {
    let dead = Named::down("dead").await;
    let live = Named::start("live").await;
    let gw = start_gateway(&pool_config(
        &[dead.url(), live.url()],
        "connect_attempts = 1\nmax_fails = 0",
    ))
    .await;
    // Round robin sends the first client to the dead upstream, with no second try.
    let response = gw.upgrade().await;
    assert_eq!(response.status, 502, "{response:?}");
    gw.stop().await;
}

#[tokio::test]
async fn passive_ejection_and_recovery() {
    let mut flaky = Named::down("flaky").await;
    let good = Named::start("good").await;
    let gw = start_gateway(&pool_config(
        &[flaky.url(), good.url()],
        "max_fails = 1\nfail_timeout = \"3s\"",
    ))
    .await;
    // The first client meets the flaky upstream down: it is ejected, the client served.
    let (mut ws, name) = open(&gw).await;
    assert_eq!(name, "good");
    ws.close(None).await.unwrap();
    assert_eq!(
        metric(
            &gw.metrics().encode(),
            &format!(
                "wsgate_upstream_ejections_total{{upstream=\"{}\"}}",
                flaky.url()
            )
        ),
        1.0
    );
    // It comes back at once, but sits out its cool-down.
    flaky.listen().await;
    for _ in 0..6 {
        let (mut ws, name) = open(&gw).await;
        assert_eq!(
            name, "good",
            "an ejected upstream gets nobody during fail_timeout"
        );
        ws.close(None).await.unwrap();
    }
    assert_eq!(flaky.accepted(), 0);
    // After the cool-down it is back in the rotation.
    let started = tokio::time::Instant::now();
    loop {
        let (mut ws, name) = open(&gw).await;
        ws.close(None).await.unwrap();
        if name == "flaky" {
            break;
        }
        assert!(started.elapsed() < DEADLINE, "flaky never came back");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    gw.wait_idle().await;
    gw.stop().await;
}

#[tokio::test]
async fn active_health_check_takes_an_upstream_out_and_back_in() {
    let mut a = Named::start("a").await;
    let b = Named::start("b").await;
    let gw = start_gateway(&pool_config(
        &[a.url(), b.url()],
        "max_fails = 0\nhealth_check = { interval = \"300ms\", timeout = \"300ms\", fails = 2, passes = 2 }",
    ))
    .await;
    let health = |gw: &TestGateway, upstream: &str| {
        metric(
            &gw.metrics().encode(),
            &format!("wsgate_upstream_healthy{{upstream=\"{upstream}\"}}"),
        )
    };
    let a_url = a.url();
    wait_until("a checked", || a.accepted() > 0).await;
    assert_eq!(health(&gw, &a_url), 1.0);
    a.stop();
    wait_until("a taken out", || health(&gw, &a_url) == 0.0).await;
    let before = a.accepted();
    for _ in 0..4 {
        let (mut ws, name) = open(&gw).await;
        assert_eq!(
            name, "b",
            "no client is sent to an upstream the checks took out"
        );
        ws.close(None).await.unwrap();
    }
    a.listen().await;
    wait_until("a back in", || health(&gw, &a_url) == 1.0).await;
    assert!(a.accepted() > before, "the checks connected to it");
    let mut names = Vec::new();
    for _ in 0..4 {
        let (mut ws, name) = open(&gw).await;
        names.push(name);
        ws.close(None).await.unwrap();
    }
    assert_eq!(count(&names, "a"), 2, "back in the rotation: {names:?}");
    gw.wait_idle().await;
    gw.stop().await;
}

/// A TCP upstream that accepts and then says nothing: a ws handshake with it times out.
async fn silent() -> SocketAddr {
    tcp_upstream(|stream| async move {
        let _keep = stream;
        std::future::pending::<()>().await
    })
    .await
}

#[tokio::test]
async fn a_timeout_moves_on_to_the_next_upstream_within_the_budget() {
    let (mute, echo) = (silent().await, ws_echo().await);
    let gw = start_gateway(&pool_config(
        &[format!("ws://{mute}"), format!("ws://{}", echo.addr)],
        "connect_timeout = \"300ms\"\nmax_fails = 0",
    ))
    .await;
    // Every client reaches the echo, whichever upstream it is tried on first.
    for _ in 0..2 {
        let mut ws = connect(&gw.ws_url("/")).await;
        ws.send(Message::text("hello")).await.unwrap();
        assert_eq!(next_data(&mut ws).await, Message::text("hello"));
        ws.close(None).await.unwrap();
    }
    gw.wait_idle().await;
    gw.stop().await;

    // A budget shorter than two timeouts leaves no time for the second silent upstream.
    let (mute2, echo) = (silent().await, ws_echo().await);
    let gw = start_gateway(&pool_config(
        &[
            format!("ws://{mute}"),
            format!("ws://{mute2}"),
            format!("ws://{}", echo.addr),
        ],
        "connect_timeout = \"300ms\"\nconnect_budget = \"400ms\"\nmax_fails = 0",
    ))
    .await;
    let response = gw.upgrade().await;
    assert_eq!(response.status, 504, "{response:?}");
    assert!(
        echo.seen.lock().unwrap().paths.is_empty(),
        "the budget ran out first"
    );
    gw.stop().await;
}

#[tokio::test]
async fn ws_health_checks_use_a_handshake_on_their_path() {
    let up = ws_echo().await;
    let gw = start_gateway(&pool_config(
        &[format!("ws://{}", up.addr)],
        "health_check = { interval = \"100ms\", timeout = \"100ms\", path = \"/healthz\" }",
    ))
    .await;
    let seen = up.seen.clone();
    wait_until("a health check handshake", move || {
        seen.lock().unwrap().paths.iter().any(|p| p == "/healthz")
    })
    .await;
    gw.stop().await;
}

#[tokio::test]
async fn a_reload_keeps_what_the_pool_learned() {
    let dead = Named::down("dead").await;
    let live = Named::start("live").await;
    let text = pool_config(
        &[dead.url(), live.url()],
        "max_fails = 1\nfail_timeout = \"1h\"",
    );
    let gw = start_gateway(&text).await;
    let errors = |gw: &TestGateway| {
        metric(
            &gw.metrics().encode(),
            &format!(
                "wsgate_upstream_connect_errors_total{{upstream=\"{}\"}}",
                dead.url()
            ),
        )
    };
    let (mut ws, name) = open(&gw).await;
    assert_eq!(name, "live");
    ws.close(None).await.unwrap();
    assert_eq!(errors(&gw), 1.0, "the first client found it down: ejected");
    // SIGHUP with the same file: a new configuration, but the ejection stands.
    let config = wsgate::config::Config::parse(&text, "test.toml").unwrap();
    let gateway = wsgate::gateway::Gateway::prepare(config).unwrap();
    gw.server().reload(gateway).await.unwrap();
    for _ in 0..4 {
        let (mut ws, name) = open(&gw).await;
        assert_eq!(name, "live");
        ws.close(None).await.unwrap();
    }
    assert_eq!(
        errors(&gw),
        1.0,
        "no client was sent to the ejected upstream after the reload"
    );
    gw.wait_idle().await;
    gw.stop().await;
}
