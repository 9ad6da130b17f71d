//! Reading request bodies within bounds: a per-request cap (a declared `Content-Length` over it
//! is refused before a byte is read), a budget of body bytes held across all requests at once
//! (a request that would exceed it gets 503 + `Retry-After`, again before reading when the
//! length is declared), and a deadline for the whole body.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, StatusCode, header};
use http_body_util::BodyExt as _;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Seconds a client is told to wait when the body budget is spent.
pub const RETRY_AFTER_SECS: u64 = 1;

/// Why a body was not read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyError {
    /// Larger than the per-request cap (413).
    TooLarge {
        /// The cap in bytes.
        limit: usize,
    },
    /// The shared body budget is spent (503 + `Retry-After`).
    Busy,
    /// The body did not arrive within the deadline (408).
    Timeout {
        /// The deadline.
        after: Duration,
    },
    /// The connection failed while reading (400).
    Read(String),
}

impl BodyError {
    /// The HTTP status to answer with.
    pub fn status(&self) -> StatusCode {
        match self {
            BodyError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            BodyError::Busy => StatusCode::SERVICE_UNAVAILABLE,
            BodyError::Timeout { .. } => StatusCode::REQUEST_TIMEOUT,
            BodyError::Read(_) => StatusCode::BAD_REQUEST,
        }
    }

    /// The metrics label.
    pub fn result(&self) -> &'static str {
        match self {
            BodyError::TooLarge { .. } => "too_large",
            BodyError::Busy => "overloaded",
            BodyError::Timeout { .. } => "timeout",
            BodyError::Read(_) => "bad_request",
        }
    }
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyError::TooLarge { limit } => {
                write!(f, "request body larger than {limit} bytes (kiln's body limit)")
            }
            BodyError::Busy => {
                write!(f, "too many request bodies in flight; retry in {RETRY_AFTER_SECS} s")
            }
            BodyError::Timeout { after } => {
                write!(f, "request body not received within {} s", after.as_secs_f64())
            }
            BodyError::Read(error) => write!(f, "failed to read the request body: {error}"),
        }
    }
}

/// The bytes of a body, holding their share of the budget until dropped.
#[derive(Debug)]
pub struct HeldBody {
    /// The body.
    pub bytes: Bytes,
    _permit: Option<OwnedSemaphorePermit>,
}

/// The budget of body bytes all requests may hold at once.
#[derive(Debug, Clone)]
pub struct BodyBudget {
    bytes: Arc<Semaphore>,
}

impl BodyBudget {
    /// A budget of `total` bytes.
    pub fn new(total: usize) -> Self {
        BodyBudget { bytes: Arc::new(Semaphore::new(total.min(Semaphore::MAX_PERMITS))) }
    }

    /// Bytes not held by any request right now.
    pub fn available(&self) -> usize {
        self.bytes.available_permits()
    }

    fn take(&self, bytes: usize) -> Result<Option<OwnedSemaphorePermit>, BodyError> {
        if bytes == 0 {
            return Ok(None);
        }
        let bytes = u32::try_from(bytes).map_err(|_| BodyError::Busy)?;
        self.bytes.clone().try_acquire_many_owned(bytes).map(Some).map_err(|_| BodyError::Busy)
    }

    /// Reads `body` whole: at most `max` bytes, within `timeout`, and within the budget.
    pub async fn read(
        &self,
        headers: &HeaderMap,
        body: Body,
        max: usize,
        timeout: Duration,
    ) -> Result<HeldBody, BodyError> {
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if declared.is_some_and(|len| len > max as u64) {
            return Err(BodyError::TooLarge { limit: max });
        }
        let declared = declared.map_or(0, |len| len as usize);
        let mut permit = self.take(declared)?;
        let mut buf = Vec::with_capacity(declared);
        let mut body = body;
        let read = async {
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| BodyError::Read(e.to_string()))?;
                let Ok(data) = frame.into_data() else { continue };
                let len = buf.len() + data.len();
                if len > max {
                    return Err(BodyError::TooLarge { limit: max });
                }
                let held = permit.as_ref().map_or(0, OwnedSemaphorePermit::num_permits);
                if len > held {
                    if let Some(more) = self.take(len - held)? {
                        match &mut permit {
                            Some(permit) => permit.merge(more),
                            None => permit = Some(more),
                        }
                    }
                }
                buf.extend_from_slice(&data);
            }
            Ok(())
        };
        match tokio::time::timeout(timeout, read).await {
            Ok(Ok(())) => Ok(HeldBody { bytes: Bytes::from(buf), _permit: permit }),
            Ok(Err(error)) => Err(error),
            Err(_) => Err(BodyError::Timeout { after: timeout }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_length(len: usize) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_LENGTH, len.into());
        headers
    }

    #[tokio::test]
    async fn declared_lengths_over_the_cap_or_the_budget_are_refused_unread() {
        let budget = BodyBudget::new(100);
        let t = Duration::from_secs(5);
        // A body that would fail if polled: refusing must not read it.
        let unreadable = || Body::new(http_body_util::StreamBody::new(futures_never()));
        let error = budget.read(&with_length(51), unreadable(), 50, t).await.unwrap_err();
        assert_eq!(error, BodyError::TooLarge { limit: 50 });
        let held = budget.read(&with_length(40), Body::from(vec![b'x'; 40]), 50, t).await;
        let held = held.expect("fits");
        assert_eq!((held.bytes.len(), budget.available()), (40, 60));
        let second = budget.read(&with_length(50), Body::from(vec![b'y'; 50]), 50, t).await;
        let second = second.expect("fits in what is left");
        let error = budget.read(&with_length(20), unreadable(), 50, t).await.unwrap_err();
        assert_eq!(error, BodyError::Busy);
        drop((held, second));
        assert_eq!(budget.available(), 100, "dropping a body returns its bytes to the budget");
    }

    #[tokio::test]
    async fn undeclared_bodies_are_counted_as_they_arrive() {
        let budget = BodyBudget::new(100);
        let t = Duration::from_secs(5);
        let error = budget.read(&HeaderMap::new(), Body::from(vec![0u8; 60]), 50, t).await;
        assert_eq!(error.unwrap_err(), BodyError::TooLarge { limit: 50 });
        let small = budget.read(&HeaderMap::new(), Body::from(vec![0u8; 30]), 50, t).await;
        assert_eq!(small.expect("small").bytes.len(), 30);
        assert_eq!(budget.available(), 100);
    }

    #[tokio::test]
    async fn a_stalled_body_times_out() {
        let budget = BodyBudget::new(100);
        let stalled = Body::new(http_body_util::StreamBody::new(futures_never()));
        let error = budget.read(&HeaderMap::new(), stalled, 50, Duration::from_millis(50)).await;
        assert!(matches!(error.unwrap_err(), BodyError::Timeout { .. }));
    }

    /// A body stream that never yields.
    fn futures_never()
    -> impl tokio_stream::Stream<Item = Result<hyper::body::Frame<Bytes>, std::convert::Infallible>>
    + Send
    + 'static {
        tokio_stream::pending()
    }
}
