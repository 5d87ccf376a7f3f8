//! Small blocking file operations (reading or writing one small file) without one
//! `spawn_blocking` per file.
//!
//! Handing each 8 KiB file to tokio's blocking pool costs more than the file itself:
//! a pool lock, a condvar wake-up and two context switches per call, thousands of
//! times a second during a bulk transfer. Here a job joins a queue; a few blocking
//! workers (started only when none is free) drain it, taking whatever queued up
//! while they ran, so under load one blocking call serves many files, and when
//! idle a job costs what `spawn_blocking` costs.

use std::sync::{Arc, Mutex};

type Job = Box<dyn FnOnce() + Send>;

/// The queue was shut down or a job panicked: its result never came.
#[derive(Debug, thiserror::Error)]
#[error("a blocking file operation did not complete (panicked or shut down)")]
pub struct Lost;

/// A queue of short blocking jobs drained by at most `workers` blocking tasks.
pub struct IoQueue {
    inner: Arc<Mutex<State>>,
    workers: usize,
}

#[derive(Default)]
struct State {
    jobs: Vec<Job>,
    running: usize,
}

impl IoQueue {
    pub fn new(workers: usize) -> IoQueue {
        IoQueue {
            inner: Arc::default(),
            workers: workers.max(1),
        }
    }

    /// Runs `f` on a blocking worker and returns its result. Needs a tokio runtime.
    pub async fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> Result<R, Lost> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        let start = {
            let mut state = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            state.jobs.push(job);
            let start = state.running < self.workers;
            if start {
                state.running += 1;
            }
            start
        };
        if start {
            let inner = self.inner.clone();
            tokio::task::spawn_blocking(move || drain(&inner));
        }
        rx.await.map_err(|_| Lost)
    }
}

/// Runs queued jobs until the queue is empty; then this worker ends (the count
/// drops under the same lock that producers check, so no job is left behind).
fn drain(inner: &Mutex<State>) {
    loop {
        let jobs = {
            let mut state = inner.lock().unwrap_or_else(|p| p.into_inner());
            if state.jobs.is_empty() {
                state.running -= 1;
                return;
            }
            std::mem::take(&mut state.jobs)
        };
        for job in jobs {
            // A panicking job drops its sender (its caller gets `Lost`); the
            // others still run.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_job_runs_once_and_a_panic_loses_only_its_own_result() {
        let q = Arc::new(IoQueue::new(2));
        let mut tasks = Vec::new();
        for i in 0..500u32 {
            let q = q.clone();
            tasks.push(tokio::spawn(async move {
                q.run(move || {
                    if i == 7 {
                        panic!("job 7");
                    }
                    i * 2
                })
                .await
            }));
        }
        for (i, t) in tasks.into_iter().enumerate() {
            match t.await.unwrap() {
                Ok(v) => assert_eq!(v, i as u32 * 2),
                Err(Lost) => assert_eq!(i, 7),
            }
        }
        // Workers all ended; a new job starts one again.
        assert_eq!(q.run(|| 42).await.unwrap(), 42);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while q.inner.lock().unwrap().running != 0 {
            assert!(std::time::Instant::now() < deadline, "a worker never ended");
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    }
}
