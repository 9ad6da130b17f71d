//! Email over SMTP (lettre; STARTTLS required by default, rustls with the Mozilla roots plus an
//! optional `caFile`).

use std::time::Duration;

use lettre::message::header::ContentType;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport as _, Message, Tokio1Executor};

use super::message::Notice;
use super::sinks::{Failure, resolve};
use crate::manifest::{Sink, SmtpTls};
use crate::store::OutboxEntry;

/// The SMTP conversation's deadline (each command).
const SMTP_TIMEOUT: Duration = Duration::from_secs(20);

/// Sends the notice as a plain-text email whose Message-ID is the entry's idempotency id.
pub async fn send(entry: &OutboxEntry, sink: &Sink, notice: &Notice) -> Result<(), Failure> {
    let permanent =
        |what: &str, e: &dyn std::fmt::Display| Failure::Permanent(format!("{what}: {e}"));
    let smtp = sink.smtp.as_ref().ok_or_else(|| Failure::Permanent("no smtp settings".into()))?;
    let mut message = Message::builder()
        .from(sink.from.as_deref().unwrap_or_default().parse().map_err(|e| permanent("from", &e))?)
        .subject(&notice.title)
        .message_id(Some(format!("<{}@kiln>", entry.id)))
        .header(ContentType::TEXT_PLAIN);
    for to in &sink.to {
        message = message.to(to.parse().map_err(|e| permanent("to", &e))?);
    }
    let message = message.body(notice.text()).map_err(|e| permanent("message", &e))?;

    let tls = match smtp.tls {
        SmtpTls::None => Tls::None,
        mode => {
            let mut params = TlsParameters::builder(smtp.host.clone());
            if let Some(ca) = &smtp.ca_file {
                let pem = tokio::fs::read(ca)
                    .await
                    .map_err(|e| Failure::Transient(format!("cannot read {ca}: {e}")))?;
                let cert = Certificate::from_pem(&pem).map_err(|e| permanent(ca, &e))?;
                params = params.add_root_certificate(cert);
            }
            let params = params.build_rustls().map_err(|e| permanent("tls", &e))?;
            if mode == SmtpTls::Tls { Tls::Wrapper(params) } else { Tls::Required(params) }
        }
    };
    let mut transport = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&smtp.host)
        .port(smtp.port)
        .tls(tls)
        .timeout(Some(SMTP_TIMEOUT));
    if let Some(user) = &smtp.username {
        let password = match smtp.password() {
            Some(secret) => resolve(&secret).await?,
            None => String::new(),
        };
        transport = transport.credentials(Credentials::new(user.clone(), password));
    }
    match transport.build().send(message).await {
        Ok(_) => Ok(()),
        Err(e) if e.is_permanent() => Err(Failure::Permanent(format!("smtp: {}", chain(&e)))),
        Err(e) => Err(Failure::Transient(format!("smtp: {}", chain(&e)))),
    }
}

fn chain(e: &lettre::transport::smtp::Error) -> String {
    crate::error::redact(&crate::error::chain(e))
}
