//! Options set on every TCP socket the gateway relays on, toward clients and upstreams.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;

use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive as Probes, Type};
use tokio::net::{TcpListener, TcpStream};

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
    let socket = SockRef::from(stream);
    let Some(k) = keepalive else {
        if side == Side::Client {
            // Accepted from a listener that may still have had keepalive set (a reload).
            let _ = socket.set_keepalive(false);
            let _ = socket.set_tcp_user_timeout(None);
        }
        return;
    };
    let probes = Probes::new()
        .with_time(k.idle)
        .with_interval(k.interval)
        .with_retries(k.probes);
    let _ = socket.set_tcp_keepalive(&probes);
    if side == Side::Client {
        let _ = socket.set_tcp_user_timeout(Some(k.detection_time()));
    }
}

/// Sets the client-side options of [`prepare`] on a listening socket instead, once: Linux
/// copies them into every connection it accepts, which saves six system calls a handshake.
/// `keepalive = None` clears them (a reload may turn keepalive off on a kept listener).
/// Returns false where accepted sockets do not inherit them; [`prepare`] each one then.
pub fn prepare_listener(listener: &impl AsFd, keepalive: Option<&TcpKeepalive>) -> bool {
    if !cfg!(target_os = "linux") {
        return false;
    }
    let socket = SockRef::from(listener);
    let set = match keepalive {
        Some(k) => {
            let probes = Probes::new()
                .with_time(k.idle)
                .with_interval(k.interval)
                .with_retries(k.probes);
            socket.set_tcp_keepalive(&probes).is_ok()
                && socket
                    .set_tcp_user_timeout(Some(k.detection_time()))
                    .is_ok()
        }
        None => socket.set_keepalive(false).is_ok() && socket.set_tcp_user_timeout(None).is_ok(),
    };
    set && socket.set_tcp_nodelay(true).is_ok()
}

/// Binds and listens on `addr` as `TcpListener::bind` does (SO_REUSEADDR, backlog 1024),
/// with the client-side options set before `listen`: a connection the kernel completes
/// before the accept loop runs is made from the listener as it is then, so setting them
/// afterwards would leave those without keepalive.
///
/// `reuse_port` (SO_REUSEPORT) lets several processes listen on the same address; the
/// kernel spreads new connections over them.
pub fn listen(
    addr: SocketAddr,
    reuse_port: bool,
    keepalive: Option<&TcpKeepalive>,
) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    prepare_listener(&socket, keepalive);
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// Which end of a relay a socket is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Upstream,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// What `prepare_listener` relies on: every option it sets reaches the accepted socket.
    #[tokio::test]
    async fn accepted_sockets_inherit_the_listeners_options() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let k = TcpKeepalive {
            idle: Duration::from_secs(7),
            interval: Duration::from_secs(3),
            probes: 4,
        };
        if !prepare_listener(&listener, Some(&k)) {
            return; // not Linux: prepare() is used per socket
        }
        let addr = listener.local_addr().unwrap();
        let _client = TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let socket = SockRef::from(&accepted);
        assert!(socket.tcp_nodelay().unwrap());
        assert!(socket.keepalive().unwrap());
        assert_eq!(socket.tcp_keepalive_time().unwrap(), k.idle);
        assert_eq!(socket.tcp_keepalive_interval().unwrap(), k.interval);
        assert_eq!(socket.tcp_keepalive_retries().unwrap(), k.probes);
        assert_eq!(socket.tcp_user_timeout().unwrap(), Some(k.detection_time()));

        // Turned off on the listener (a reload), the next connection has none of it.
        assert!(prepare_listener(&listener, None));
        let _client = TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let socket = SockRef::from(&accepted);
        assert!(!socket.keepalive().unwrap());
        assert_eq!(socket.tcp_user_timeout().unwrap(), None);
    }
}
