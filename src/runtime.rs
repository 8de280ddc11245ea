//! The tokio runtime the gateway runs on.
//!
//! One worker per CPU in the process's affinity mask by default (tokio's count, so a gateway
//! pinned with `taskset` does not contend with itself), or `[gateway] workers`. With one
//! worker the gateway runs on tokio's current-thread scheduler: the multi-thread one with a
//! single worker keeps its work-stealing bookkeeping for nobody to steal, and parks through
//! more layers. On one CPU, a connection that moves one message at a time costs 13% fewer
//! instructions per round trip that way (callgrind, README "Performance").

use std::io;

use tokio::runtime::{Builder, Runtime};

/// The runtime for `workers` workers (`None`: one per CPU the process may run on).
pub fn build(workers: Option<usize>) -> io::Result<Runtime> {
    let workers =
        workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let mut builder = if workers == 1 {
        Builder::new_current_thread()
    } else {
        let mut builder = Builder::new_multi_thread();
        builder.worker_threads(workers);
        builder
    };
    builder.enable_all().build()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::runtime::RuntimeFlavor;

    #[test]
    fn one_worker_runs_on_the_current_thread() {
        let runtime = build(Some(1)).unwrap();
        assert_eq!(
            runtime.handle().runtime_flavor(),
            RuntimeFlavor::CurrentThread
        );
        // Timers and sockets are enabled as on the multi-thread runtime.
        runtime.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            drop(listener);
        });
    }

    #[test]
    fn more_workers_run_on_as_many_threads() {
        let runtime = build(Some(3)).unwrap();
        assert_eq!(
            runtime.handle().runtime_flavor(),
            RuntimeFlavor::MultiThread
        );
        assert_eq!(runtime.metrics().num_workers(), 3);
    }
}
