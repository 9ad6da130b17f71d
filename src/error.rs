//! How failures are classified for the loops that retry them.

use serde::{Deserialize, Serialize};

/// How a driver should react to a failure (Flux's Stalling / Waiting / Generic).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// Worth retrying with backoff (network blip, hook exit 75, provider throttling).
    Transient,
    /// Not a failure: a dependency is not ready yet; look again later.
    Waiting,
    /// Retrying cannot help (bad config, hook exit 1, image missing): stop and tell a human.
    Stalled,
}

/// Implemented by every module error that reaches a retry loop.
pub trait Classify {
    /// The class of this error.
    fn class(&self) -> ErrorClass;
}

/// Renders an error and its whole source chain on one line (`a: b: c`), with secrets redacted.
pub fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    redact(&out)
}

/// Strips credentials from URLs (`https://user:token@host` → `https://***@host`).
pub fn redact(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find("://") {
        let (head, tail) = rest.split_at(pos + 3);
        out.push_str(head);
        let end = tail
            .find(|c: char| c.is_whitespace() || c == '/' || c == '"' || c == '\'')
            .unwrap_or(tail.len());
        match tail[..end].rfind('@') {
            Some(at) => {
                out.push_str("***");
                out.push_str(&tail[at..end]);
            }
            None => out.push_str(&tail[..end]),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_strips_userinfo_only() {
        assert_eq!(
            redact("failed to fetch https://oauth2:glpat-XYZ@gitlab.example/x.git now"),
            "failed to fetch https://***@gitlab.example/x.git now"
        );
        assert_eq!(redact("git://127.0.0.1:9418/r"), "git://127.0.0.1:9418/r");
    }
}
