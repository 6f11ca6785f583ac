//! Thread per core: the client connections are served by N single-threaded
//! runtimes, one per OS thread, the way nginx runs a worker per core. A
//! connection lives on one of them with every task it spawns (its
//! streams' pumps and their provider connections), so a stream's wake-ups
//! never cross a thread: with tokio's work-stealing runtime every event of
//! a paced stream woke the other, idle worker (a `futex` pair and a
//! context switch per event; benches/OPTIMISATIONS.md, "thread per core").
//!
//! The process's own runtime keeps the listener, the drain's timeline and
//! the background tasks; each accepted socket is handed to the worker
//! serving the fewest connections.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The worker runtimes, running until [`Workers::stop`] (or drop).
pub struct Workers {
    workers: Vec<Worker>,
    stop: CancellationToken,
}

struct Worker {
    /// Work to start on the worker's thread: what it spawns is allocated
    /// there, not on the thread that accepted.
    jobs: mpsc::UnboundedSender<Job>,
    /// Connections it serves now.
    connections: Arc<AtomicUsize>,
}

type Job = Box<dyn FnOnce() + Send>;

/// The runtime this code runs on (`None` outside one): what a resource
/// registered with a runtime's reactor is kept per, so a worker uses only
/// its own.
pub fn current_runtime() -> Option<tokio::runtime::Id> {
    tokio::runtime::Handle::try_current().ok().map(|h| h.id())
}

/// Counts a connection on its worker while it lives.
pub struct Connection(Arc<AtomicUsize>);

impl Drop for Connection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Workers {
    /// Start `n` worker threads (at least one), each with its own runtime.
    pub fn start(n: usize) -> std::io::Result<Workers> {
        let stop = CancellationToken::new();
        let mut workers = Vec::with_capacity(n.max(1));
        for i in 0..n.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (jobs, mut queue) = mpsc::unbounded_channel::<Job>();
            let until = stop.clone();
            std::thread::Builder::new()
                .name(format!("tidegate-worker-{i}"))
                .spawn(move || {
                    runtime.block_on(async move {
                        loop {
                            tokio::select! {
                                job = queue.recv() => match job {
                                    Some(job) => job(),
                                    None => break,
                                },
                                _ = until.cancelled() => break,
                            }
                        }
                    })
                })?;
            workers.push(Worker {
                jobs,
                connections: Arc::new(AtomicUsize::new(0)),
            });
        }
        Ok(Workers { workers, stop })
    }

    /// Call `start` on the thread of the worker with the fewest
    /// connections, with a guard that counts one connection there while
    /// it lives. `start` spawns the connection's task (on that worker's
    /// runtime) and makes its sockets there (`TcpStream::from_std`), so
    /// that they are registered with that worker's reactor.
    pub fn spawn(&self, start: impl FnOnce(Connection) + Send + 'static) {
        let Some(worker) = self
            .workers
            .iter()
            .min_by_key(|w| w.connections.load(Ordering::Relaxed))
        else {
            return;
        };
        worker.connections.fetch_add(1, Ordering::Relaxed);
        let counted = Connection(worker.connections.clone());
        // Only fails once the worker has stopped, at exit.
        let _ = worker.jobs.send(Box::new(move || start(counted)));
    }

    /// End the worker runtimes: what still runs on them is dropped.
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connections_go_to_the_least_busy_worker_and_stay_on_its_thread() {
        let workers = Workers::start(2).unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let release = CancellationToken::new();
        for _ in 0..4 {
            let tx = tx.clone();
            let release = release.clone();
            workers.spawn(move |counted| {
                tokio_util::task::TaskTracker::new().spawn(async move {
                    let _counted = counted;
                    let before = std::thread::current().id();
                    // A task it spawns runs on the same thread.
                    let spawned = tokio_util::task::TaskTracker::new()
                        .spawn(async { std::thread::current().id() })
                        .await
                        .unwrap();
                    tx.send((before, spawned)).unwrap();
                    release.cancelled().await;
                });
            });
        }
        let mut threads = std::collections::HashMap::new();
        for _ in 0..4 {
            let (at, spawned) = rx.recv().await.unwrap();
            assert_eq!(at, spawned, "a connection's tasks stay on its thread");
            *threads.entry(at).or_insert(0) += 1;
        }
        assert_eq!(threads.len(), 2, "{threads:?}");
        assert!(threads.values().all(|&n| n == 2), "{threads:?}");
        assert_ne!(
            threads.keys().next(),
            Some(&std::thread::current().id()),
            "served off the caller's runtime"
        );
        release.cancel();
        workers.stop();
    }
}
