//! Connection budgets: the whole gateway, each listener, each client IP address. A permit is
//! taken before the upstream is contacted and travels with the relay; dropping it gives the
//! slot back, however the connection ends.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Which budget was exhausted, for the 503 body and the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LimitHit {
    #[error("the gateway has reached max_connections ({0})")]
    Gateway(usize),
    #[error("this listener has reached its max_connections ({0})")]
    Listener(usize),
    #[error("this address has reached max_connections_per_ip ({0})")]
    Ip(usize),
}

/// A slot in a shared counter.
#[derive(Debug)]
pub struct Permit(Arc<AtomicUsize>);

impl Permit {
    /// Takes a slot when fewer than `max` are taken; `None` as `max` never refuses.
    pub fn try_acquire(count: &Arc<AtomicUsize>, max: Option<usize>) -> Option<Permit> {
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| match max {
                Some(max) if n >= max => None,
                _ => Some(n + 1),
            })
            .ok()
            .map(|_| Permit(count.clone()))
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Connections per client address. Entries are removed at zero, so the map holds only
/// addresses with open connections.
#[derive(Debug, Default)]
pub struct PerIp {
    counts: Mutex<HashMap<IpAddr, usize>>,
}

#[derive(Debug)]
pub struct IpPermit {
    table: Arc<PerIp>,
    ip: IpAddr,
}

impl PerIp {
    pub fn try_acquire(table: &Arc<PerIp>, ip: IpAddr, max: usize) -> Option<IpPermit> {
        // IPv4 clients on a dual-stack socket arrive as ::ffff:a.b.c.d; count them as IPv4.
        let ip = ip.to_canonical();
        let mut counts = table.counts.lock().ok()?;
        let n = counts.entry(ip).or_insert(0);
        if *n >= max {
            if *n == 0 {
                counts.remove(&ip);
            }
            return None;
        }
        *n += 1;
        Some(IpPermit {
            table: table.clone(),
            ip,
        })
    }

    pub fn len(&self) -> usize {
        self.counts.lock().map(|c| c.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for IpPermit {
    fn drop(&mut self) {
        if let Ok(mut counts) = self.table.counts.lock()
            && let Some(n) = counts.get_mut(&self.ip)
        {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

/// The permits one connection holds.
#[derive(Debug)]
pub struct ConnectionPermit {
    _gateway: Permit,
    _listener: Permit,
    _ip: Option<IpPermit>,
}

impl ConnectionPermit {
    pub fn new(gateway: Permit, listener: Permit, ip: Option<IpPermit>) -> Self {
        Self {
            _gateway: gateway,
            _listener: listener,
            _ip: ip,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_permits() {
        let count = Arc::new(AtomicUsize::new(0));
        let a = Permit::try_acquire(&count, Some(2)).unwrap();
        let _b = Permit::try_acquire(&count, Some(2)).unwrap();
        assert!(Permit::try_acquire(&count, Some(2)).is_none());
        drop(a);
        assert!(Permit::try_acquire(&count, Some(2)).is_some());
        assert!(Permit::try_acquire(&count, None).is_some());
    }

    #[test]
    fn per_ip_permits_and_cleanup() {
        let table = Arc::new(PerIp::default());
        let ip: IpAddr = "10.1.2.3".parse().unwrap();
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        let a = PerIp::try_acquire(&table, ip, 2).unwrap();
        let b = PerIp::try_acquire(&table, mapped, 2).unwrap();
        assert!(
            PerIp::try_acquire(&table, ip, 2).is_none(),
            "mapped address counts as the same"
        );
        assert!(PerIp::try_acquire(&table, "10.1.2.4".parse().unwrap(), 2).is_some());
        drop((a, b));
        assert!(table.is_empty());
    }
}
