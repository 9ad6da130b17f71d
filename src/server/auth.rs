//! Who may change things: the API token (`Authorization: Bearer`), or a dashboard session.
//!
//! A session is made by `POST /login` with the API token. Its id (32 random bytes, hex) lives
//! in the server's memory only and reaches the browser as a cookie that is `HttpOnly`,
//! `SameSite=Strict`, and `Secure` when the request came through HTTPS (`X-Forwarded-Proto:
//! https` from the TLS proxy). Each session has its own CSRF token, written into the page; a
//! state-changing request made with the cookie must carry it in `X-Kiln-CSRF` (or the `csrf`
//! form field of `POST /logout`). Every state-changing request whose `Origin` is another origin
//! is refused, whatever its credentials. Ids and CSRF tokens are compared in constant time
//! (`subtle`). Sessions end at logout, after [`SESSION_TTL`], or when the daemon restarts.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode, header};
use subtle::{Choice, ConstantTimeEq};

use super::{ApiError, Shared};

/// The session cookie's name.
pub(crate) const COOKIE: &str = "kiln_session";
/// The header carrying the session's CSRF token.
pub(crate) const CSRF_HEADER: &str = "x-kiln-csrf";
/// How long a session lasts after login.
pub(crate) const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Sessions held at most; a login past it ends the oldest one.
const MAX_SESSIONS: usize = 256;

/// Who made a state-changing request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Principal {
    /// The API token.
    Token,
    /// A dashboard session (its CSRF token was checked).
    Session,
}

#[derive(Debug)]
struct Session {
    id: String,
    csrf: String,
    expires: Instant,
}

/// The live sessions, in memory (a restart logs everyone out).
#[derive(Debug, Default)]
pub(crate) struct Sessions {
    inner: Mutex<Vec<Session>>,
}

/// 32 bytes from the kernel's CSPRNG, hex.
fn random_hex() -> std::io::Result<String> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))?;
    Ok(hex::encode(bytes))
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Session>> {
        // A panic while holding the lock leaves a plain list: still usable.
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A new session: (id, CSRF token).
    pub(crate) fn create(&self) -> std::io::Result<(String, String)> {
        let id = random_hex()?;
        let csrf = random_hex()?;
        let now = Instant::now();
        let mut sessions = self.lock();
        sessions.retain(|s| s.expires > now);
        if sessions.len() >= MAX_SESSIONS {
            sessions.remove(0);
        }
        sessions.push(Session { id: id.clone(), csrf: csrf.clone(), expires: now + SESSION_TTL });
        Ok((id, csrf))
    }

    /// The CSRF token of the live session `id`. Every session is compared, in constant time.
    pub(crate) fn csrf(&self, id: &str) -> Option<String> {
        let now = Instant::now();
        let sessions = self.lock();
        let mut found: Option<&Session> = None;
        for session in sessions.iter() {
            let equal: Choice = session.id.as_bytes().ct_eq(id.as_bytes());
            if bool::from(equal) && session.expires > now {
                found = Some(session);
            }
        }
        found.map(|s| s.csrf.clone())
    }

    /// Ends session `id`; whether it existed.
    pub(crate) fn remove(&self, id: &str) -> bool {
        let mut sessions = self.lock();
        let before = sessions.len();
        sessions.retain(|s| !bool::from(s.id.as_bytes().ct_eq(id.as_bytes())));
        sessions.len() != before
    }
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub(crate) fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value.trim())
}

/// The session the request's cookie names, if it is live: (id, CSRF token).
pub(crate) fn session(shared: &Shared, headers: &HeaderMap) -> Option<(String, String)> {
    let id = cookie(headers, COOKIE)?;
    if id.is_empty() {
        return None;
    }
    let csrf = shared.sessions.csrf(id)?;
    Some((id.to_owned(), csrf))
}

/// Whether the request came to the TLS proxy over HTTPS (then cookies are `Secure`).
pub(crate) fn is_https(headers: &HeaderMap) -> bool {
    let proto = |name: &str| {
        headers.get(name).and_then(|v| v.to_str().ok()).map(|v| v.trim().to_ascii_lowercase())
    };
    proto("x-forwarded-proto").is_some_and(|p| p.split(',').next().map(str::trim) == Some("https"))
        || proto("forwarded").is_some_and(|f| f.contains("proto=https"))
}

/// `Set-Cookie` for a new session.
pub(crate) fn set_cookie(id: &str, headers: &HeaderMap) -> String {
    let secure = if is_https(headers) { "; Secure" } else { "" };
    format!(
        "{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
        SESSION_TTL.as_secs()
    )
}

/// `Set-Cookie` that clears the session cookie.
pub(crate) fn clear_cookie(headers: &HeaderMap) -> String {
    let secure = if is_https(headers) { "; Secure" } else { "" };
    format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{secure}")
}

/// Refuses a state-changing request a browser sent from another origin: an `Origin` that is
/// not this server's (`Host`, or `X-Forwarded-Host` behind a proxy), `Origin: null`, or
/// `Sec-Fetch-Site: cross-site`. Requests without these headers (curl, the CLI) pass.
pub(crate) fn same_origin(headers: &HeaderMap) -> Result<(), ApiError> {
    let text = |name: &str| headers.get(name).map(|v| v.to_str().unwrap_or("\u{0}"));
    if text("sec-fetch-site").is_some_and(|site| site.eq_ignore_ascii_case("cross-site")) {
        return Err(cross_origin("Sec-Fetch-Site: cross-site"));
    }
    let Some(origin) = text(header::ORIGIN.as_str()) else { return Ok(()) };
    let authority = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
        .filter(|rest| !rest.is_empty() && !rest.contains('/'))
        .ok_or_else(|| cross_origin(&format!("Origin: {origin}")))?;
    let hosts = [text(header::HOST.as_str()), text("x-forwarded-host")];
    if hosts.iter().flatten().any(|host| host.trim().eq_ignore_ascii_case(authority)) {
        Ok(())
    } else {
        Err(cross_origin(&format!("Origin: {origin}")))
    }
}

fn cross_origin(what: &str) -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        format!("cross-origin request refused ({what}); state changes come from kiln's own pages"),
    )
}

/// Authorizes a state-changing call: same origin, then the API token, or a live session
/// cookie with its CSRF token in `X-Kiln-CSRF`. Reads headers only (no body is read before).
pub(crate) fn authorize(shared: &Shared, headers: &HeaderMap) -> Result<Principal, ApiError> {
    same_origin(headers)?;
    let token = &shared.app.config.api_token;
    if token.0.is_empty() {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "this kiln has no API token configured; mutating calls are disabled",
        ));
    }
    if let Some(value) = headers.get(header::AUTHORIZATION) {
        let sent =
            value.to_str().ok().and_then(|v| v.strip_prefix("Bearer ")).ok_or_else(|| {
                ApiError::new(StatusCode::UNAUTHORIZED, "`Authorization` must be `Bearer <token>`")
            })?;
        return if token.matches(sent.trim().as_bytes()) {
            Ok(Principal::Token)
        } else {
            Err(ApiError::new(StatusCode::UNAUTHORIZED, "wrong API token"))
        };
    }
    if cookie(headers, COOKIE).is_some() {
        let Some((_, csrf)) = session(shared, headers) else {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "the dashboard session is unknown or expired; log in again",
            ));
        };
        let sent = headers.get(CSRF_HEADER).map(|v| v.as_bytes()).unwrap_or_default();
        return if csrf_matches(&csrf, sent) {
            Ok(Principal::Session)
        } else {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "missing or wrong CSRF token (`X-Kiln-CSRF`); reload the dashboard",
            ))
        };
    }
    Err(ApiError::new(
        StatusCode::UNAUTHORIZED,
        "missing `Authorization: Bearer <token>` (the token is in <data-dir>/token) or a dashboard login",
    ))
}

/// Constant-time comparison of a session's CSRF token with what the request sent.
pub(crate) fn csrf_matches(csrf: &str, sent: &[u8]) -> bool {
    !csrf.is_empty() && bool::from(csrf.as_bytes().ct_eq(sent))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_str(value).unwrap_or(HeaderValue::from_static("")));
        }
        map
    }

    #[test]
    fn the_origin_must_be_this_server() {
        assert!(same_origin(&headers(&[("host", "127.0.0.1:7878")])).is_ok());
        let same = [("host", "127.0.0.1:7878"), ("origin", "http://127.0.0.1:7878")];
        assert!(same_origin(&headers(&same)).is_ok());
        for origin in ["http://evil.example", "null", "http://127.0.0.1:7879", "file://x"] {
            let h = headers(&[("host", "127.0.0.1:7878"), ("origin", origin)]);
            assert_eq!(same_origin(&h).map_err(|e| e.status), Err(StatusCode::FORBIDDEN));
        }
        let proxied = [
            ("host", "127.0.0.1:7878"),
            ("x-forwarded-host", "kiln.example.com"),
            ("origin", "https://kiln.example.com"),
        ];
        assert!(same_origin(&headers(&proxied)).is_ok());
        let site = headers(&[("host", "a"), ("sec-fetch-site", "cross-site")]);
        assert!(same_origin(&site).is_err());
    }

    #[test]
    fn sessions_are_found_by_id_and_end_at_logout() {
        let sessions = Sessions::default();
        let (id, csrf) = sessions.create().expect("urandom");
        assert_eq!(id.len(), 64);
        assert_ne!(id, csrf);
        assert_eq!(sessions.csrf(&id).as_deref(), Some(csrf.as_str()));
        assert_eq!(sessions.csrf(&id[..63]), None);
        assert_eq!(sessions.csrf(""), None);
        assert!(sessions.remove(&id));
        assert_eq!(sessions.csrf(&id), None);
        assert!(!csrf_matches("", b""));
        assert!(csrf_matches(&csrf, csrf.as_bytes()));
    }

    #[test]
    fn cookies_are_http_only_strict_and_secure_behind_https() {
        let plain = set_cookie("abc", &HeaderMap::new());
        assert!(plain.contains("HttpOnly") && plain.contains("SameSite=Strict"), "{plain}");
        assert!(!plain.contains("Secure"), "{plain}");
        let tls = set_cookie("abc", &headers(&[("x-forwarded-proto", "https")]));
        assert!(tls.ends_with("; Secure"), "{tls}");
        let h = headers(&[("cookie", "a=1; kiln_session=xyz; b=2")]);
        assert_eq!(cookie(&h, COOKIE), Some("xyz"));
    }
}
