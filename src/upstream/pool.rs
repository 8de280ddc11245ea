//! A route's upstreams as a pool: which one a new connection goes to (`balance`, weights),
//! which ones are skipped for now (passive health after failed connects, active health
//! checks), and how many connections each one carries. Established connections are never
//! moved: a pool only decides where new ones go.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use rand::Rng;

use crate::config::{Balance, RouteConfig, Upstream};

pub struct Pool {
    members: Vec<Member>,
    balance: Balance,
    max_fails: u32,
    fail_timeout: Duration,
    /// Smooth weighted round robin (nginx's): the current weight of each member.
    current: Mutex<Vec<i64>>,
    /// Rotates the starting point among equally loaded members (least_connections).
    turn: AtomicUsize,
}

struct Member {
    upstream: Upstream,
    /// `upstream` as logs and metrics name it, made once: every connection names it.
    name: Arc<str>,
    weight: u32,
    state: Arc<MemberState>,
}

/// What is known about one upstream. Shared with the pool of the next configuration when a
/// reload keeps the upstream (same route, same URL), so connection counts, ejections and
/// health verdicts survive a reload.
struct MemberState {
    /// Connections open or being opened to it.
    active: AtomicUsize,
    /// Connect failures since `fails_since_ms`.
    fails: AtomicU32,
    /// When the current run of failures began (ms since `EPOCH`); failures older than
    /// `fail_timeout` no longer count, as in nginx.
    fails_since_ms: AtomicU64,
    /// Skipped until this time (ms since `EPOCH`, passive health).
    down_until_ms: AtomicU64,
    /// The active health check's verdict; true until a check says otherwise.
    healthy: AtomicBool,
}

impl Default for MemberState {
    fn default() -> Self {
        Self {
            active: AtomicUsize::new(0),
            fails: AtomicU32::new(0),
            fails_since_ms: AtomicU64::new(0),
            down_until_ms: AtomicU64::new(0),
            healthy: AtomicBool::new(true),
        }
    }
}

/// Times are kept as milliseconds since the first pool was made, so they fit an atomic
/// and mean the same in every pool.
static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

fn now_ms() -> u64 {
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// A connection's claim on its upstream, for `least_connections` and `random_two`; it
/// gives the slot back when dropped.
pub struct Lease {
    state: Arc<MemberState>,
    index: usize,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.state.active.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Lease {
    pub fn index(&self) -> usize {
        self.index
    }
}

/// What a failed connect did to the upstream's standing.
#[derive(Debug, PartialEq, Eq)]
pub enum Standing {
    Kept,
    /// Taken out of the rotation for this long.
    Ejected(Duration),
}

impl Pool {
    pub fn new(route: &RouteConfig) -> Self {
        let members = route
            .upstreams
            .iter()
            .map(|t| Member {
                upstream: t.upstream.clone(),
                name: t.upstream.to_string().into(),
                weight: t.weight.max(1),
                state: Arc::default(),
            })
            .collect::<Vec<_>>();
        Self {
            current: Mutex::new(vec![0; members.len()]),
            members,
            balance: route.balance,
            max_fails: route.max_fails,
            fail_timeout: route.fail_timeout,
            turn: AtomicUsize::new(0),
        }
    }

    /// Takes over what `old` knows about the upstreams both pools have.
    pub fn inherit(&mut self, old: &Pool) {
        for member in &mut self.members {
            if let Some(known) = old.members.iter().find(|m| m.upstream == member.upstream) {
                member.state = known.state.clone();
            }
        }
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    pub fn upstream(&self, index: usize) -> &Upstream {
        &self.members[index].upstream
    }

    /// The upstream's URL, as logs and metrics name it.
    pub fn name(&self, index: usize) -> &Arc<str> {
        &self.members[index].name
    }

    /// Whether the upstream is in the rotation now (health checks and passive health).
    pub fn is_available(&self, index: usize) -> bool {
        let m = &self.members[index].state;
        m.healthy.load(Ordering::Relaxed) && m.down_until_ms.load(Ordering::Relaxed) <= now_ms()
    }

    pub fn is_healthy(&self, index: usize) -> bool {
        self.members[index].state.healthy.load(Ordering::Relaxed)
    }

    /// Picks the upstream for the next connect attempt and claims a slot on it, skipping
    /// those already `tried` for this client and those out of the rotation. When the
    /// whole pool is out, every member is tried anyway (as nginx does): refusing every
    /// client helps nobody, and a check may simply be behind.
    pub fn pick(&self, tried: &[usize]) -> Option<Lease> {
        let all_out = !(0..self.members.len()).any(|i| self.is_available(i));
        let candidates: Vec<usize> = (0..self.members.len())
            .filter(|i| !tried.contains(i) && (all_out || self.is_available(*i)))
            .collect();
        let index = match (candidates.len(), self.balance) {
            (0, _) => return None,
            (1, _) => candidates[0],
            (_, Balance::RoundRobin) => self.round_robin(&candidates),
            (_, Balance::LeastConnections) => self.least_connections(&candidates),
            (_, Balance::RandomTwo) => self.random_two(&candidates),
        };
        let state = self.members[index].state.clone();
        state.active.fetch_add(1, Ordering::Relaxed);
        Some(Lease { state, index })
    }

    /// Smooth weighted round robin: every member gains its weight, the richest is chosen
    /// and pays the total. Weights 5:1:1 give a a b a c a a, not a a a a a b c.
    fn round_robin(&self, candidates: &[usize]) -> usize {
        let Ok(mut current) = self.current.lock() else {
            return candidates[0];
        };
        let mut total = 0i64;
        let mut best = candidates[0];
        for &i in candidates {
            let weight = i64::from(self.members[i].weight);
            current[i] += weight;
            total += weight;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        best
    }

    /// Load relative to weight: `a` is less loaded than `b` when active/weight is smaller.
    fn lighter(&self, a: usize, b: usize) -> bool {
        let (ma, mb) = (&self.members[a], &self.members[b]);
        let load = |m: &Member, other: &Member| {
            m.state.active.load(Ordering::Relaxed) as u64 * u64::from(other.weight)
        };
        load(ma, mb) < load(mb, ma)
    }

    fn least_connections(&self, candidates: &[usize]) -> usize {
        // Start the scan at a rotating point, so ties spread instead of all going first.
        let start = self.turn.fetch_add(1, Ordering::Relaxed) % candidates.len();
        let mut best = candidates[start];
        for k in 1..candidates.len() {
            let i = candidates[(start + k) % candidates.len()];
            if self.lighter(i, best) {
                best = i;
            }
        }
        best
    }

    /// Power of two choices: two different members drawn by weight, the less loaded wins.
    /// Nearly as even as least_connections without looking at every member.
    fn random_two(&self, candidates: &[usize]) -> usize {
        let mut rng = rand::thread_rng();
        let first = self.draw(candidates, &mut rng, None);
        let second = self.draw(candidates, &mut rng, Some(first));
        if self.lighter(second, first) {
            second
        } else {
            first
        }
    }

    fn draw(&self, candidates: &[usize], rng: &mut impl Rng, not: Option<usize>) -> usize {
        let weight = |i: usize| {
            if Some(i) == not {
                0
            } else {
                u64::from(self.members[i].weight)
            }
        };
        let total: u64 = candidates.iter().map(|&i| weight(i)).sum();
        let mut ticket = rng.gen_range(0..total.max(1));
        for &i in candidates {
            if ticket < weight(i) {
                return i;
            }
            ticket -= weight(i);
        }
        candidates[0]
    }

    /// A connect to the upstream failed: after `max_fails` failures within `fail_timeout`
    /// it is skipped for `fail_timeout` (nginx's rule; only in a pool of two or more: a lone
    /// upstream has no stand-in).
    pub fn failed(&self, index: usize) -> Standing {
        let m = &self.members[index].state;
        let now = now_ms();
        let window = self.fail_timeout.as_millis() as u64;
        if now.saturating_sub(m.fails_since_ms.load(Ordering::Relaxed)) > window {
            // The earlier failures are too old to count.
            m.fails.store(0, Ordering::Relaxed);
            m.fails_since_ms.store(now, Ordering::Relaxed);
        }
        let fails = m.fails.fetch_add(1, Ordering::Relaxed) + 1;
        if self.max_fails == 0 || self.members.len() < 2 || fails < self.max_fails {
            return Standing::Kept;
        }
        m.fails.store(0, Ordering::Relaxed);
        m.down_until_ms.store(now + window, Ordering::Relaxed);
        Standing::Ejected(self.fail_timeout)
    }

    pub fn succeeded(&self, index: usize) {
        self.members[index].state.fails.store(0, Ordering::Relaxed);
    }

    /// Records an active health check's verdict; true when it changed.
    pub fn set_healthy(&self, index: usize, healthy: bool) -> bool {
        self.members[index]
            .state
            .healthy
            .swap(healthy, Ordering::Relaxed)
            != healthy
    }

    pub fn active(&self, index: usize) -> usize {
        self.members[index].state.active.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn pool(upstreams: &str, extra: &str) -> Arc<Pool> {
        let text = format!(
            "[[listener]]\nbind = \"127.0.0.1:1\"\n[[route]]\npath = \"/\"\nupstreams = {upstreams}\n{extra}\n"
        );
        let config = Config::parse(&text, "t").unwrap();
        Arc::new(Pool::new(&config.routes[0]))
    }

    fn picks(pool: &Arc<Pool>, n: usize, hold: bool) -> Vec<usize> {
        let mut counts = vec![0; pool.len()];
        let mut held = Vec::new();
        for _ in 0..n {
            let lease = pool.pick(&[]).unwrap();
            counts[lease.index()] += 1;
            if hold {
                held.push(lease);
            }
        }
        counts
    }

    #[test]
    fn weighted_round_robin_is_exact_and_smooth() {
        let p = pool(
            r#"["tcp://a:1", { url = "tcp://b:1", weight = 3 }, "tcp://c:1"]"#,
            "",
        );
        assert_eq!(picks(&p, 500, false), vec![100, 300, 100]);
        let order: Vec<usize> = (0..5).map(|_| p.pick(&[]).unwrap().index()).collect();
        assert_eq!(order, vec![1, 0, 1, 2, 1], "b is spread out, not bunched");
    }

    #[test]
    fn least_connections_and_random_two_follow_load() {
        let p = pool(
            r#"["tcp://a:1", "tcp://b:1", "tcp://c:1"]"#,
            "balance = \"least_connections\"",
        );
        assert_eq!(picks(&p, 300, true), vec![100, 100, 100]);
        let p = pool(
            r#"["tcp://a:1", "tcp://b:1", "tcp://c:1"]"#,
            "balance = \"random_two\"",
        );
        let counts = picks(&p, 300, true);
        // Two choices keep held connections within a few of each other.
        assert!(
            counts.iter().all(|&c| (90..=110).contains(&c)),
            "{counts:?}"
        );
        assert_eq!(
            p.active(0) + p.active(1) + p.active(2),
            0,
            "leases given back"
        );
    }

    #[test]
    fn failures_eject_and_unhealthy_members_are_skipped_unless_all_are() {
        let p = pool(
            r#"["tcp://a:1", "tcp://b:1"]"#,
            "max_fails = 2\nfail_timeout = \"1h\"",
        );
        assert_eq!(p.failed(0), Standing::Kept);
        assert_eq!(p.failed(0), Standing::Ejected(Duration::from_secs(3600)));
        assert_eq!(picks(&p, 10, false), vec![0, 10]);
        assert!(p.set_healthy(1, false));
        // Everyone is out: try them anyway rather than refuse.
        assert_eq!(picks(&p, 10, false).iter().sum::<usize>(), 10);
        assert_eq!(p.pick(&[0, 1]).map(|l| l.index()), None, "all tried");
        // While one is available, a client that already tried it gets no second choice
        // among those that are out.
        p.set_healthy(1, true);
        assert_eq!(p.pick(&[1]).map(|l| l.index()), None);
    }

    #[test]
    fn a_reload_keeps_what_is_known_about_an_upstream() {
        let old = pool(
            r#"["tcp://a:1", "tcp://b:1"]"#,
            "balance = \"least_connections\"",
        );
        let lease = old.pick(&[]).unwrap();
        let busy = lease.index();
        old.set_healthy(1 - busy, false);
        let mut new = Pool::new(&Config::parse(
            "[[listener]]\nbind = \"127.0.0.1:1\"\n[[route]]\npath = \"/\"\nupstreams = [\"tcp://b:1\", \"tcp://a:1\", \"tcp://c:1\"]\n",
            "t",
        )
        .unwrap()
        .routes[0]);
        new.inherit(&old);
        let pos = |name: &str| {
            (0..3)
                .find(|&i| new.upstream(i).to_string() == format!("tcp://{name}:1"))
                .unwrap()
        };
        let (busy_new, out_new) = if busy == 0 {
            (pos("a"), pos("b"))
        } else {
            (pos("b"), pos("a"))
        };
        assert_eq!(new.active(busy_new), 1, "the open connection still counts");
        assert!(!new.is_healthy(out_new), "the health verdict carries over");
        drop(lease);
        assert_eq!(new.active(busy_new), 0, "and is given back to the new pool");
    }
}
