//! Keeps a flood of bad requests from filling the disk with log lines: at most `per_second`
//! lines pass in each one-second window; the rest are counted, and the count is reported with
//! the next line that passes.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug)]
pub struct LogLimiter {
    per_second: u32,
    window: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    start: Instant,
    passed: u32,
    suppressed: u64,
}

/// What the caller should do with one log line.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Log it; `suppressed` lines were dropped since the last one that passed.
    Log {
        suppressed: u64,
    },
    Drop,
}

impl LogLimiter {
    pub fn new(per_second: u32) -> Self {
        Self {
            per_second,
            window: Mutex::new(Window {
                start: Instant::now(),
                passed: 0,
                suppressed: 0,
            }),
        }
    }

    pub fn check(&self) -> Verdict {
        self.check_at(Instant::now())
    }

    fn check_at(&self, now: Instant) -> Verdict {
        let Ok(mut w) = self.window.lock() else {
            return Verdict::Log { suppressed: 0 };
        };
        if now.duration_since(w.start) >= Duration::from_secs(1) {
            w.start = now;
            w.passed = 0;
        }
        if w.passed < self.per_second {
            w.passed += 1;
            let suppressed = std::mem::take(&mut w.suppressed);
            Verdict::Log { suppressed }
        } else {
            w.suppressed += 1;
            Verdict::Drop
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_per_window_and_reports_the_dropped() {
        let limiter = LogLimiter::new(3);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(limiter.check_at(t0), Verdict::Log { suppressed: 0 });
        }
        for _ in 0..100 {
            assert_eq!(limiter.check_at(t0), Verdict::Drop);
        }
        let t1 = t0 + Duration::from_millis(1001);
        assert_eq!(limiter.check_at(t1), Verdict::Log { suppressed: 100 });
        assert_eq!(limiter.check_at(t1), Verdict::Log { suppressed: 0 });
    }
}
