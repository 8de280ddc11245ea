//! On a real link between two network namespaces (see support/netns.rs), what loopback
//! hides: a client whose link went dead without FIN or RST is found by TCP keepalive within
//! its configured time, and a Close still queued behind data on a slow link reaches a
//! client that the gateway had stopped reading (no RST from a lingering close).

mod support;

use std::time::Duration;

use support::netns::{GATEWAY_IP, Link};
use support::*;
use tokio::io::AsyncWriteExt;

fn link_or_skip() -> Option<Link> {
    match Link::create() {
        Ok(link) => Some(link),
        Err(why) => {
            eprintln!("skipped: network namespaces are not available here ({why})");
            None
        }
    }
}

async fn upgrade_from_client(link: &Link, gw: &TestGateway) -> tokio::net::TcpStream {
    let mut client = link.connect_from_client(gw.addr()).await;
    client
        .write_all(upgrade_request("/", "").as_bytes())
        .await
        .unwrap();
    assert_eq!(read_response(&mut client).await.status, 101);
    client
}

#[test]
fn keepalive_finds_a_client_whose_link_went_dead() {
    let Some(link) = link_or_skip() else { return };
    link.run_on_gateway_side(|| async {
        let upstream = tcp_echo().await;
        // Pings off: only TCP keepalive can notice (1s idle, then 2 probes 1s apart).
        let config = format!(
            "[gateway]\ntcp_keepalive = {{ idle = \"1s\", interval = \"1s\", probes = 2 }}\n\n[[listener]]\nbind = \"{GATEWAY_IP}:0\"\n\n[[route]]\npath = \"/\"\nupstream = \"tcp://{upstream}\"\nping_interval = \"off\"\n"
        );
        let gw = start_gateway(&config).await;
        let mut client = upgrade_from_client(&link, &gw).await;
        client
            .write_all(&client_frame(true, 2, b"alive"))
            .await
            .unwrap();
        let (_, _, echo) = read_raw_frame(&mut client).await;
        assert_eq!(echo, b"alive");
        assert_eq!(gw.metrics().active_relays(), 1);

        link.cut();
        let cut_at = tokio::time::Instant::now();
        // Detection is due after 1s + 2 x 1s; the bound is a ceiling, not a pause.
        let ceiling = Duration::from_secs(20);
        while gw.metrics().active_relays() > 0 {
            assert!(
                cut_at.elapsed() < ceiling,
                "a dead client still holds its relay after {ceiling:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        eprintln!("dead client found {:?} after the link went down", cut_at.elapsed());
        drop(client);
        gw.stop().await;
    });
}

#[test]
fn the_close_reaches_a_client_on_a_slow_link_after_a_protocol_error() {
    let Some(link) = link_or_skip() else { return };
    // About 1.2s for the 150 kB echo to cross: the Close waits behind it in the gateway's
    // socket when the connection has already been failed.
    link.slow_gateway_egress("1mbit");
    link.run_on_gateway_side(|| async {
        let upstream = tcp_echo().await;
        let config = format!(
            "[gateway]\nclose_timeout = \"5s\"\n\n[[listener]]\nbind = \"{GATEWAY_IP}:0\"\n\n[[route]]\npath = \"/\"\nupstream = \"tcp://{upstream}\"\n"
        );
        let gw = start_gateway(&config).await;
        let client = upgrade_from_client(&link, &gw).await;
        let (mut reader, mut writer) = client.into_split();
        let message: Vec<u8> = (0..150_000u32).map(|i| (i % 251) as u8).collect();
        let mut bytes = client_frame(true, 2, &message);
        let mut broken = client_frame(true, 2, b"x");
        broken[0] |= 0x20;
        bytes.extend(broken);
        // More behind the broken frame, in the same write: bytes the gateway never reads,
        // more than one read takes, so some are left in its socket's receive buffer.
        bytes.extend(client_frame(true, 2, &[7u8; 100_000]));
        let sender = tokio::spawn(async move {
            let _ = writer.write_all(&bytes).await;
            writer
        });
        let mut echoed = Vec::new();
        let code = loop {
            let (_, op, payload) = read_raw_frame(&mut reader).await;
            match op {
                2 => echoed.extend(payload),
                8 => break u16::from_be_bytes([payload[0], payload[1]]),
                other => panic!("unexpected opcode {other}"),
            }
        };
        assert_eq!(echoed.len(), message.len(), "echo cut short");
        assert!(echoed == message, "echo differs");
        assert_eq!(code, 1002);
        drop(sender);
        gw.wait_idle().await;
        gw.stop().await;
    });
}
