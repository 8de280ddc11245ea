//! PROXY protocol headers (v1 and v2) as a listener with `accept_proxy_protocol` reads them:
//! `proxy_protocol::accept` over a stream that delivers the input in reads of a fuzzed size.
//!
//! Checks that nothing panics; that a trusted peer gets `Some` and an untrusted one `None`
//! whenever `accept` succeeds; that the bytes left in the returned stream are exactly the
//! end of the input (all of it when there was no header). In round-trip mode, addresses
//! (and a v2 server name) built from the input go through `proxy_protocol::encode`, and
//! `accept` must give back the same source and destination (compared canonically: v4-mapped
//! addresses become v4) and leave the bytes that followed the header.
//!
//! Input: `[flags, step, ..]`. flags bit 0: trusted peer; bit 1: round trip; bit 2: v2;
//! bit 3: IPv6; bit 4: a server name. `step % 64` is the size of each read (0: all at
//! once). In round-trip mode the next 12 (v4) or 36 (v6) bytes are the source and
//! destination addresses and ports, then a length byte and the server name when asked for;
//! whatever is left follows the header.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};

use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};
use tokio::runtime::{Builder, Runtime};
use wsgate::config::ProxyProtocol;
use wsgate::proxy_protocol::{Proxied, ProxyHeaderError, accept, encode};

thread_local! {
    static RUNTIME: Runtime = Builder::new_current_thread().build().unwrap();
}

/// A stream that hands out its bytes at most `step` at a time.
struct Reads<'a> {
    data: &'a [u8],
    step: usize,
}

impl AsyncRead for Reads<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let n = this.data.len().min(buf.remaining()).min(this.step);
        buf.put_slice(&this.data[..n]);
        this.data = &this.data[n..];
        Poll::Ready(Ok(()))
    }
}

/// Runs `accept` and reads out what it left: the header's connection and the rest.
fn accept_all(
    data: &[u8],
    step: usize,
    trusted: bool,
) -> Result<(Option<Option<Proxied>>, Vec<u8>), ProxyHeaderError> {
    RUNTIME.with(|rt| {
        rt.block_on(async {
            let (proxied, mut rest) = accept(Reads { data, step }, trusted).await?;
            let mut after = Vec::new();
            rest.read_to_end(&mut after).await?;
            Ok((proxied, after))
        })
    })
}

fn take<'a>(data: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    let (head, rest) = data.split_at_checked(n)?;
    *data = rest;
    Some(head)
}

fn port(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn addresses(data: &mut &[u8], v6: bool) -> Option<(SocketAddr, SocketAddr)> {
    if v6 {
        let b = take(data, 36)?;
        let ip = |b: &[u8]| IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(b).unwrap()));
        Some((
            SocketAddr::new(ip(&b[0..16]), port(&b[32..34])),
            SocketAddr::new(ip(&b[16..32]), port(&b[34..36])),
        ))
    } else {
        let b = take(data, 12)?;
        let ip = |b: &[u8]| IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]));
        Some((
            SocketAddr::new(ip(&b[0..4]), port(&b[8..10])),
            SocketAddr::new(ip(&b[4..8]), port(&b[10..12])),
        ))
    }
}

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

fn round_trip(flags: u8, step: usize, mut data: &[u8]) {
    let version = if flags & 4 != 0 {
        ProxyProtocol::V2
    } else {
        ProxyProtocol::V1
    };
    let Some((source, destination)) = addresses(&mut data, flags & 8 != 0) else {
        return;
    };
    let name = if flags & 16 != 0 {
        let Some(&[len]) = take(&mut data, 1) else {
            return;
        };
        let Some(name) = take(&mut data, usize::from(len)) else {
            return;
        };
        Some(String::from_utf8_lossy(name).into_owned())
    } else {
        None
    };
    let Ok(mut wire) = encode(version, source, destination, name.as_deref()) else {
        return;
    };
    wire.extend_from_slice(data);
    match accept_all(&wire, step, true) {
        Ok((Some(Some(proxied)), after)) => {
            assert_eq!(canonical(proxied.source), canonical(source), "{version:?}");
            assert_eq!(
                canonical(proxied.destination),
                canonical(destination),
                "{version:?}"
            );
            assert_eq!(after, data, "the bytes after the header");
        }
        other => panic!("{version:?} {source} {destination} {name:?}: {other:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let [flags, step, rest @ ..] = data else {
        return;
    };
    let step = match step % 64 {
        0 => usize::MAX,
        n => usize::from(n),
    };
    if flags & 2 != 0 {
        return round_trip(*flags, step, rest);
    }
    let trusted = flags & 1 != 0;
    match accept_all(rest, step, trusted) {
        Ok((proxied, after)) => {
            assert_eq!(proxied.is_some(), trusted);
            assert!(
                rest.ends_with(&after),
                "what follows the header is the input's end"
            );
            if proxied.is_none() {
                assert_eq!(after, rest, "no header: every byte read is given back");
            }
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});
