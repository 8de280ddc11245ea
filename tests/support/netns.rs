//! A real link for what loopback hides (a link that goes dead, a slow link): two network
//! namespaces made by the test (it runs as root in CI) and joined by a veth pair, the
//! gateway's side at 10.213.0.1 and the client's at 10.213.0.2. Only addresses inside these
//! namespaces are used; both are deleted when the [`Link`] is dropped. [`Link::create`] is
//! `None`, with the reason, where `ip netns` is not permitted.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

pub const GATEWAY_IP: Ipv4Addr = Ipv4Addr::new(10, 213, 0, 1);

pub struct Link {
    gateway_ns: String,
    client_ns: String,
    gateway_dev: String,
    client_dev: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Link {
    pub fn create() -> Result<Link, String> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}x{n}", std::process::id() % 100_000);
        let link = Link {
            gateway_ns: format!("wsgate-test-{id}-gw"),
            client_ns: format!("wsgate-test-{id}-cl"),
            // Interface names have at most 15 characters.
            gateway_dev: format!("wg{id}"),
            client_dev: format!("wc{id}"),
        };
        let (g, c) = (link.gateway_ns.as_str(), link.client_ns.as_str());
        ip(&["netns", "add", g])?;
        ip(&["netns", "add", c])?;
        ip(&[
            "-n",
            g,
            "link",
            "add",
            &link.gateway_dev,
            "type",
            "veth",
            "peer",
            "name",
            &link.client_dev,
            "netns",
            c,
        ])?;
        ip(&[
            "-n",
            g,
            "addr",
            "add",
            "10.213.0.1/24",
            "dev",
            &link.gateway_dev,
        ])?;
        ip(&[
            "-n",
            c,
            "addr",
            "add",
            "10.213.0.2/24",
            "dev",
            &link.client_dev,
        ])?;
        for (ns, dev) in [(g, &link.gateway_dev), (c, &link.client_dev)] {
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        Ok(link)
    }

    /// Runs `make()`'s future on a thread of its own inside the gateway's namespace, on a
    /// current-thread runtime: every socket it makes (listeners, upstreams) lives there.
    pub fn run_on_gateway_side<F, Fut>(&self, make: F) -> Fut::Output
    where
        F: FnOnce() -> Fut + Send,
        Fut: Future,
        Fut::Output: Send,
    {
        let ns = self.gateway_ns.clone();
        std::thread::scope(|s| {
            s.spawn(move || {
                enter(&ns);
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime")
                    .block_on(make())
            })
            .join()
            .expect("gateway side panicked")
        })
    }

    /// A TCP connection from the client's namespace to `addr`.
    pub async fn connect_from_client(&self, addr: SocketAddr) -> tokio::net::TcpStream {
        let ns = self.client_ns.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            enter(&ns);
            let _ = tx.send(std::net::TcpStream::connect(addr));
        });
        let stream = rx.await.expect("client thread").expect("connect");
        stream.set_nonblocking(true).expect("nonblocking");
        tokio::net::TcpStream::from_std(stream).expect("tokio stream")
    }

    /// The client's end of the link goes down: from now on nothing crosses it, no FIN, no
    /// RST (a pulled cable, a NAT that forgot the flow).
    pub fn cut(&self) {
        ip(&[
            "-n",
            &self.client_ns,
            "link",
            "set",
            &self.client_dev,
            "down",
        ])
        .expect("link down");
    }

    /// Limits what the gateway sends over the link (token bucket), so that its data waits
    /// in its socket instead of reaching the client at once.
    pub fn slow_gateway_egress(&self, rate: &str) {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.gateway_ns,
                "tc",
                "qdisc",
                "add",
                "dev",
            ])
            .arg(&self.gateway_dev)
            .args([
                "root", "tbf", "rate", rate, "burst", "16kb", "latency", "5s",
            ])
            .output()
            .expect("tc");
        assert!(
            out.status.success(),
            "tc: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Moves the calling thread into a network namespace.
fn enter(ns: &str) {
    let file = std::fs::File::open(format!("/var/run/netns/{ns}")).expect("netns file");
    nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
}

impl Drop for Link {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veth end in it, and with it the pair.
        let _ = ip(&["netns", "del", &self.gateway_ns]);
        let _ = ip(&["netns", "del", &self.client_ns]);
    }
}
