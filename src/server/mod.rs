//! The HTTP surface (axum): webhook receivers, the JSON API under `/api/v1`, SSE, `/metrics`.
//! Handlers translate HTTP into calls on [`AppState`] and back; they never run hooks or
//! providers themselves.
//!
//! OWNER: server helper.
