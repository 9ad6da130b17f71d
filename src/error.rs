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

/// Strips credentials from every URL in `text` (`https://user:token@host` → `https://***@host`).
///
/// Each URL is found by its `scheme://` and parsed with the WHATWG parser (`reqwest::Url`), so
/// the userinfo ends where a URL parser says it does (the last `@` of the authority), whatever
/// the password contains (quotes, `:`, `@`, `%`-escapes). A URL that does not parse but might
/// carry credentials (an `@` or a `user:secret` authority) is redacted conservatively, up to
/// its last `@`. scp-like remotes (`user:secret@host:path`) lose their userinfo when it holds a
/// password; a plain `git@host:path` is left alone (an ssh user name is not a secret). Text is
/// split at whitespace: a URL cannot contain any.
pub fn redact(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while !rest.is_empty() {
        let word = rest.find(|c: char| !c.is_whitespace()).unwrap_or(rest.len());
        out.push_str(&rest[..word]);
        rest = &rest[word..];
        let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
        redact_word(&rest[..end], &mut out);
        rest = &rest[end..];
    }
    out
}

/// Characters of a URL scheme (RFC 3986: `ALPHA *( ALPHA / DIGIT / "+" / "-" / "." )`).
fn is_scheme_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')
}

/// The byte offset where the scheme ending at `sep` (the offset of `://`) starts, if any.
fn scheme_start(word: &str, sep: usize) -> Option<usize> {
    let head = &word[..sep];
    let start = head.rfind(|c: char| !is_scheme_char(c)).map_or(0, |i| i + 1);
    let scheme = &head[start..];
    scheme.starts_with(|c: char| c.is_ascii_alphabetic()).then_some(start)
}

/// One whitespace-free word: every URL in it, or the word as an scp-like remote.
fn redact_word(word: &str, out: &mut String) {
    let mut rest = word;
    let mut found_url = false;
    let mut from = 0;
    while let Some(pos) = rest[from..].find("://").map(|p| p + from) {
        let Some(start) = scheme_start(rest, pos) else {
            from = pos + 3;
            continue;
        };
        found_url = true;
        // The URL runs to the next URL's scheme (or the end of the word).
        let mut end = rest.len();
        let mut next_from = pos + 3;
        while let Some(next) = rest[next_from..].find("://").map(|p| p + next_from) {
            if let Some(next_start) = scheme_start(rest, next) {
                end = next_start;
                break;
            }
            next_from = next + 3;
        }
        out.push_str(&rest[..start]);
        redact_url(&rest[start..end], pos - start, out);
        rest = &rest[end..];
        from = 0;
    }
    if found_url {
        out.push_str(rest);
    } else {
        redact_scp_like(word, out);
    }
}

/// Punctuation that usually ends a URL in prose (`'url'`, `(url)`, `url:`, `url.`).
const TRAILING: &[char] = &['\'', '"', '`', ')', ']', '}', '>', ',', '.', ';', ':'];

/// Writes `candidate` (`scheme://...`, the `://` at `sep`) with its userinfo replaced by `***`.
fn redact_url(candidate: &str, sep: usize, out: &mut String) {
    // Trailing punctuation is not part of the URL, but never strip into the userinfo.
    let last_at = candidate.rfind('@').map_or(0, |i| i + 1);
    let core_len = last_at.max(sep + 3).max(candidate.trim_end_matches(TRAILING).len());
    let (core, trailing) = candidate.split_at(core_len);
    let prefix = &core[..sep + 3];
    let after = &core[sep + 3..];
    let scheme = &core[..sep];
    match reqwest::Url::parse(core) {
        Ok(url) => {
            let ssh = matches!(url.scheme(), "ssh" | "git+ssh" | "ssh+git");
            let secret = url.password().is_some() || (!url.username().is_empty() && !ssh);
            if !secret {
                out.push_str(core);
            } else {
                // The authority ends at the first `/`, `?` or `#` (and `\` for web schemes);
                // its userinfo at the authority's last `@`.
                let special = matches!(scheme, "http" | "https" | "ws" | "wss" | "ftp" | "file");
                let authority_end = after
                    .find(|c: char| matches!(c, '/' | '?' | '#') || (special && c == '\\'))
                    .unwrap_or(after.len());
                match after[..authority_end].rfind('@') {
                    Some(at) => {
                        out.push_str(prefix);
                        out.push_str("***");
                        out.push_str(&after[at..]);
                    }
                    None => redact_conservatively(prefix, after, out),
                }
            }
        }
        Err(_) => redact_conservatively(prefix, after, out),
    }
    out.push_str(trailing);
}

/// An unparsable URL: hide everything up to its last `@`; without one, hide an authority
/// shaped like `user:secret` (a `:` not followed by a port number).
fn redact_conservatively(prefix: &str, after: &str, out: &mut String) {
    out.push_str(prefix);
    if let Some(at) = after.rfind('@') {
        out.push_str("***");
        out.push_str(&after[at..]);
        return;
    }
    let authority_end = after.find(['/', '?', '#', '\\']).unwrap_or(after.len());
    let authority = &after[..authority_end];
    let port_like =
        authority.rsplit_once(':').is_none_or(|(_, port)| port.chars().all(|c| c.is_ascii_digit()));
    if port_like {
        out.push_str(after);
    } else {
        out.push_str("***");
        out.push_str(&after[authority_end..]);
    }
}

/// `user:secret@host:path` (scp-like git remote syntax) → `***@host:path`. Words with an `@`
/// but no password (`git@host:path`, an e-mail address) are left alone.
fn redact_scp_like(word: &str, out: &mut String) {
    let lead = word.len() - word.trim_start_matches(['\'', '"', '`', '(', '[', '<', '{']).len();
    let (lead, body) = word.split_at(lead);
    let head_end = body.find('/').unwrap_or(body.len());
    match body[..head_end].rfind('@') {
        Some(at) if body[..at].contains(':') => {
            out.push_str(lead);
            out.push_str("***");
            out.push_str(&body[at..]);
        }
        _ => out.push_str(word),
    }
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

    /// Every case: (input, expected output, the secret that must not survive).
    const CASES: &[(&str, &str, &str)] = &[
        // The reported leak: a quote in the password ended the old pattern.
        ("https://u:pa'ss@h.example/x.git", "https://***@h.example/x.git", "pa'ss"),
        ("fetch 'https://u:pa'ss@h/x' failed", "fetch 'https://***@h/x' failed", "pa'ss"),
        ("https://u:pa\"ss@h/x", "https://***@h/x", "pa\"ss"),
        ("https://u:p@ss@h/x", "https://***@h/x", "p@ss"),
        ("https://u:p:a:ss@h/x", "https://***@h/x", "p:a:ss"),
        ("https://u:p%40ss%27@h/x", "https://***@h/x", "p%40ss"),
        ("https://u:pa/ss@h/x", "https://***@h/x", "pa/ss"),
        ("https://u:pa#ss@h/x", "https://***@h/x", "pa#ss"),
        ("https://u:pa?ss@h/x", "https://***@h/x", "pa?ss"),
        ("https://u:pa\\ss@h/x", "https://***@h/x", "pa\\ss"),
        ("https://ghp_token123@github.com/o/r", "https://***@github.com/o/r", "ghp_token123"),
        ("https://u:sekrit@h:8443", "https://***@h:8443", "sekrit"),
        ("(https://u:sekrit@h/x).", "(https://***@h/x).", "sekrit"),
        ("from https://u:sekrit@h/x: refused", "from https://***@h/x: refused", "sekrit"),
        ("http://u:sekrit@[::1]:80/x", "http://***@[::1]:80/x", "sekrit"),
        ("HTTPS://U:Sekrit@H/x", "HTTPS://***@H/x", "Sekrit"),
        // Two URLs in one word.
        ("a=https://u:one1@h/x,b=http://v:two2@h/y", "a=https://***@h/x,b=http://***@h/y", "two2"),
        // Unparsable but credential-shaped.
        ("https://u:sekrit", "https://***", "sekrit"),
        // ssh: the user name alone is not a secret; a password is.
        ("ssh://git@h.example:22/r.git", "ssh://git@h.example:22/r.git", "\u{0}"),
        ("ssh://git:sekrit@h/r.git", "ssh://***@h/r.git", "sekrit"),
        ("git+ssh://u:sek'rit@h/r", "git+ssh://***@h/r", "sek'rit"),
        // scp-like.
        ("git@gitlab.example:group/x.git", "git@gitlab.example:group/x.git", "\u{0}"),
        ("u:sek'rit@gitlab.example:group/x.git", "***@gitlab.example:group/x.git", "sek'rit"),
        ("'u:p@ss@h:r.git'", "'***@h:r.git'", "p@ss"),
        // Nothing to hide.
        ("http://127.0.0.1:9418/r.git", "http://127.0.0.1:9418/r.git", "\u{0}"),
        ("see https://h/a@b and ada@example.com", "see https://h/a@b and ada@example.com", "\u{0}"),
        ("/srv/git/infra.git", "/srv/git/infra.git", "\u{0}"),
        ("no url: at all", "no url: at all", "\u{0}"),
        ("://x 1://y", "://x 1://y", "\u{0}"),
    ];

    #[test]
    fn redact_parses_urls_whatever_the_password_holds() {
        for (input, expected, secret) in CASES {
            let got = redact(input);
            assert_eq!(&got, expected, "redact({input:?})");
            assert!(!got.contains(secret), "{secret:?} survived in {got:?}");
        }
    }

    #[test]
    fn redact_keeps_whitespace_and_is_idempotent() {
        let text = "a\thttps://u:p'w@h/x\n  b ";
        assert_eq!(redact(text), "a\thttps://***@h/x\n  b ");
        assert_eq!(redact(&redact(text)), redact(text));
    }
}
