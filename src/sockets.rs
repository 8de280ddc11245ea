//! Options set on every TCP socket the gateway relays on, toward clients and upstreams.

use socket2::{SockRef, TcpKeepalive as Probes};
use tokio::net::TcpStream;

use crate::config::TcpKeepalive;

/// No Nagle delay (frames are written whole; waiting only delays interactive traffic) and,
/// unless turned off, TCP keepalive, so that a peer that vanished without FIN or RST (power
/// loss, a NAT that forgot the flow) is noticed while the connection is idle.
///
/// `Side::Client` sockets also get the same bound as TCP_USER_TIMEOUT: keepalive probes
/// are not sent while data waits for its acknowledgement, and without it a client that
/// vanished mid-transfer holds the socket for the kernel's retransmission limit (about 15
/// minutes). Upstreams do not: the limit also covers a closed receive window, and an
/// upstream that is alive but slow to read must be waited for (backpressure, SPEC §4). A
/// client that stops reading is found by keepalive pings anyway.
pub fn prepare(stream: &TcpStream, keepalive: Option<&TcpKeepalive>, side: Side) {
    // Failures here leave a working connection with the kernel's defaults.
    let _ = stream.set_nodelay(true);
    let Some(k) = keepalive else {
        return;
    };
    let socket = SockRef::from(stream);
    let probes = Probes::new()
        .with_time(k.idle)
        .with_interval(k.interval)
        .with_retries(k.probes);
    let _ = socket.set_tcp_keepalive(&probes);
    if side == Side::Client {
        let _ = socket.set_tcp_user_timeout(Some(k.detection_time()));
    }
}

/// Which end of a relay a socket is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Upstream,
}
