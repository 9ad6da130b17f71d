//! Retrying one operation with exponential backoff: the only module that imports `backoff`.
//!
//! For in-process retries of a single call (a fetch, a transient hook exit). Retries that must
//! survive a restart are computed from persisted attempt counts instead (see `rollout`).

use std::future::Future;
use std::time::Duration;

use backoff::ExponentialBackoffBuilder;

/// Backoff settings.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// First wait.
    pub initial: Duration,
    /// Longest wait.
    pub max_interval: Duration,
    /// Give up after this long in total (`None`: never).
    pub max_elapsed: Option<Duration>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            initial: Duration::from_millis(500),
            max_interval: Duration::from_secs(60),
            max_elapsed: Some(Duration::from_secs(15 * 60)),
        }
    }
}

/// Whether a failed attempt may be retried.
pub enum Attempt<E> {
    /// Retry after the next backoff interval.
    Retry(E),
    /// Stop now with this error.
    Stop(E),
}

impl RetryPolicy {
    fn backoff(&self) -> backoff::ExponentialBackoff {
        ExponentialBackoffBuilder::new()
            .with_initial_interval(self.initial)
            .with_max_interval(self.max_interval)
            .with_max_elapsed_time(self.max_elapsed)
            .build()
    }

    /// Runs `op` until it succeeds, says `Stop`, or the policy gives up. `on_retry` sees each
    /// retried error and the wait before the next attempt.
    pub async fn run<T, E, F, Fut>(
        &self,
        mut op: F,
        mut on_retry: impl FnMut(&E, Duration),
    ) -> Result<T, E>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Attempt<E>>>,
    {
        backoff::future::retry_notify(
            self.backoff(),
            || {
                let fut = op();
                async move {
                    fut.await.map_err(|attempt| match attempt {
                        Attempt::Retry(e) => backoff::Error::transient(e),
                        Attempt::Stop(e) => backoff::Error::permanent(e),
                    })
                }
            },
            |e: E, wait| on_retry(&e, wait),
        )
        .await
    }
}

/// The n-th (0-based) wait of an exponential backoff with jitter, from a persisted attempt
/// count: `min(max, initial * 2^n)` ± 20%.
pub fn nth_delay(policy: &RetryPolicy, attempt: u32) -> Duration {
    let base = policy.initial.saturating_mul(1u32 << attempt.min(16));
    let capped = base.min(policy.max_interval);
    capped.mul_f64(0.8 + fastrand::f64() * 0.4)
}
