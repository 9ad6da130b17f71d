//! `notify:` (notification sinks, at the top level and per fleet) and `forge:` (commit statuses)
//! in `kiln.yaml`. Secrets are never written here: a sink names the daemon environment variable
//! or the file on the daemon's host that holds each one (`urlEnv`/`urlFile`,
//! `secretEnv`/`secretFile`, `passwordEnv`/`passwordFile`, `tokenEnv`/`tokenFile`). See
//! docs/notifications.md.

use serde::{Deserialize, Serialize};

use super::text::{Text, locate, locate_name};
use super::{Manifest, Report, is_safe_name};

/// The most sinks a manifest may declare (top level and fleets together).
pub const MAX_SINKS: usize = 64;

/// Where a secret comes from: a daemon environment variable or a file on the daemon's host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretRef {
    /// The value of this environment variable of `kiln run`.
    Env(String),
    /// The contents of this file (absolute path; trailing newline trimmed).
    File(String),
}

impl SecretRef {
    fn from_pair(env: &Option<String>, file: &Option<String>) -> Option<SecretRef> {
        match (env, file) {
            (Some(env), _) => Some(SecretRef::Env(env.clone())),
            (None, Some(file)) => Some(SecretRef::File(file.clone())),
            (None, None) => None,
        }
    }
}

/// What a sink delivers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SinkKind {
    /// A JSON POST signed per the Standard Webhooks spec (`webhook-id`, `webhook-timestamp`,
    /// `webhook-signature`), with a `whsec_` secret.
    Webhook,
    /// A Slack incoming webhook (`text` + `blocks`).
    Slack,
    /// A WeCom (WeChat Work) group robot (`msgtype: markdown`).
    Wecom,
    /// A DingTalk custom robot (`msgtype: markdown`; signed with `timestamp` and `sign` query
    /// parameters when a secret is given).
    Dingtalk,
    /// A Feishu/Lark custom bot (`msg_type: text`; `timestamp` and `sign` in the body when a
    /// secret is given).
    Feishu,
    /// Email over SMTP (STARTTLS by default).
    Email,
}

impl SinkKind {
    /// The name written in `kiln.yaml`.
    pub fn as_str(self) -> &'static str {
        match self {
            SinkKind::Webhook => "webhook",
            SinkKind::Slack => "slack",
            SinkKind::Wecom => "wecom",
            SinkKind::Dingtalk => "dingtalk",
            SinkKind::Feishu => "feishu",
            SinkKind::Email => "email",
        }
    }

    /// Chat robots whose URL carries their token: it may not be written in the repo.
    fn url_is_secret(self) -> bool {
        matches!(self, SinkKind::Slack | SinkKind::Wecom | SinkKind::Dingtalk | SinkKind::Feishu)
    }
}

/// What a sink can be told about.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
)]
pub enum NotifyEvent {
    /// A rollout started work (baking, reconciling or rolling).
    #[serde(rename = "rollout.started")]
    RolloutStarted,
    /// A rollout succeeded.
    #[serde(rename = "rollout.succeeded")]
    RolloutSucceeded,
    /// A rollout failed.
    #[serde(rename = "rollout.failed")]
    RolloutFailed,
    /// New instances failed their checks and the fleet was put back on its previous image.
    #[serde(rename = "rollout.rolled_back")]
    RolloutRolledBack,
    /// A rollout paused (an operator, or `onFailure: pause`).
    #[serde(rename = "rollout.paused")]
    RolloutPaused,
    /// A bake hook failed.
    #[serde(rename = "bake.failed")]
    BakeFailed,
    /// A drift check found differences from what kiln deployed.
    #[serde(rename = "drift.found")]
    DriftFound,
    /// A manual canary serves and waits for `kiln resume` to promote it.
    #[serde(rename = "canary.waiting")]
    CanaryWaiting,
}

impl NotifyEvent {
    /// Every kind, in a stable order.
    pub const ALL: [NotifyEvent; 8] = [
        NotifyEvent::RolloutStarted,
        NotifyEvent::RolloutSucceeded,
        NotifyEvent::RolloutFailed,
        NotifyEvent::RolloutRolledBack,
        NotifyEvent::RolloutPaused,
        NotifyEvent::BakeFailed,
        NotifyEvent::DriftFound,
        NotifyEvent::CanaryWaiting,
    ];

    /// The dotted name written in `kiln.yaml`.
    pub fn as_str(self) -> &'static str {
        match self {
            NotifyEvent::RolloutStarted => "rollout.started",
            NotifyEvent::RolloutSucceeded => "rollout.succeeded",
            NotifyEvent::RolloutFailed => "rollout.failed",
            NotifyEvent::RolloutRolledBack => "rollout.rolled_back",
            NotifyEvent::RolloutPaused => "rollout.paused",
            NotifyEvent::BakeFailed => "bake.failed",
            NotifyEvent::DriftFound => "drift.found",
            NotifyEvent::CanaryWaiting => "canary.waiting",
        }
    }
}

/// One notification sink (`notify:` list item, at the top level or in a fleet).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Sink {
    /// Unique in the manifest, a DNS label: it names the sink in `kiln status` and in each
    /// delivery's idempotency id.
    pub name: String,
    /// `webhook`, `slack`, `wecom`, `dingtalk`, `feishu` or `email`.
    pub kind: SinkKind,
    /// What the sink is told about (default: everything). `rollout.started`,
    /// `rollout.succeeded`, `rollout.failed`, `rollout.rolled_back`, `rollout.paused`,
    /// `bake.failed`, `drift.found`, `canary.waiting`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<NotifyEvent>,
    /// The endpoint, written out: only for `webhook` (chat robots' URLs carry their token; give
    /// them with `urlEnv` or `urlFile`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The daemon environment variable holding the endpoint URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_env: Option<String>,
    /// The file (absolute path on the daemon's host) holding the endpoint URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_file: Option<String>,
    /// The daemon environment variable holding the signing secret (`webhook`: `whsec_…`,
    /// required; `dingtalk`: `SEC…`; `feishu`: the bot's signing secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_env: Option<String>,
    /// The file (absolute path on the daemon's host) holding the signing secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<String>,
    /// `email`: the SMTP server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smtp: Option<Smtp>,
    /// `email`: the sender address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// `email`: the recipients.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<String>,
}

impl Sink {
    /// Whether the sink wants `event` (an empty `events:` wants all).
    pub fn wants(&self, event: NotifyEvent) -> bool {
        self.events.is_empty() || self.events.contains(&event)
    }

    /// Where the endpoint URL comes from: written out (`Ok`) or a secret reference (`Err`).
    pub fn url_source(&self) -> Option<Result<String, SecretRef>> {
        match (&self.url, SecretRef::from_pair(&self.url_env, &self.url_file)) {
            (Some(url), _) => Some(Ok(url.clone())),
            (None, Some(secret)) => Some(Err(secret)),
            (None, None) => None,
        }
    }

    /// Where the signing secret comes from, if the sink has one.
    pub fn secret(&self) -> Option<SecretRef> {
        SecretRef::from_pair(&self.secret_env, &self.secret_file)
    }
}

/// How the SMTP connection is secured.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum SmtpTls {
    /// Plain connection upgraded with STARTTLS, which is required (port 587).
    #[default]
    Starttls,
    /// TLS from the first byte (port 465).
    Tls,
    /// No TLS at all: only for a relay on the same host.
    None,
}

/// `email`: the SMTP server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Smtp {
    /// Host name (also the name its TLS certificate is checked against).
    pub host: String,
    /// Port (default 587).
    #[serde(default = "default_smtp_port")]
    pub port: u16,
    /// `starttls` (default), `tls` or `none`.
    #[serde(default)]
    pub tls: SmtpTls,
    /// Login user, if the server wants one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// The daemon environment variable holding the password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_env: Option<String>,
    /// The file (absolute path on the daemon's host) holding the password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<String>,
    /// A PEM certificate (absolute path on the daemon's host) trusted besides the public roots
    /// (a private CA, or the server's own self-signed certificate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
}

impl Smtp {
    /// Where the password comes from, if any.
    pub fn password(&self) -> Option<SecretRef> {
        SecretRef::from_pair(&self.password_env, &self.password_file)
    }
}

fn default_smtp_port() -> u16 {
    587
}

/// Which forge receives commit statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ForgeKind {
    /// `POST /api/v4/projects/:id/statuses/:sha` with a `PRIVATE-TOKEN`.
    Gitlab,
    /// `POST /repos/{owner}/{repo}/statuses/{sha}` with a bearer token.
    Github,
    /// `POST /api/v1/repos/{owner}/{repo}/statuses/{sha}` with a token.
    Gitea,
}

impl ForgeKind {
    /// The name written in `kiln.yaml`.
    pub fn as_str(self) -> &'static str {
        match self {
            ForgeKind::Gitlab => "gitlab",
            ForgeKind::Github => "github",
            ForgeKind::Gitea => "gitea",
        }
    }
}

/// `forge:`: commit statuses `kiln/bake`, `kiln/reconcile` and `kiln/rollout` on the commits
/// kiln deploys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Forge {
    /// `gitlab`, `github` or `gitea`.
    pub kind: ForgeKind,
    /// The API's base URL: `https://gitlab.example.com`, `https://api.github.com`,
    /// `https://gitea.example.com`.
    pub url: String,
    /// GitLab: the project id or `group/project` path; GitHub and Gitea: `owner/repo`.
    pub project: String,
    /// The daemon environment variable holding the API token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_env: Option<String>,
    /// The file (absolute path on the daemon's host) holding the API token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<String>,
}

impl Forge {
    /// Where the token comes from.
    pub fn token(&self) -> Option<SecretRef> {
        SecretRef::from_pair(&self.token_env, &self.token_file)
    }
}

/// Checks `notify:` (top level and per fleet) and `forge:`.
pub(super) fn check(report: &mut Report<'_>, manifest: &Manifest, text: &Text<'_>) {
    let mut names = std::collections::HashSet::new();
    let all = manifest
        .notify
        .iter()
        .map(|s| (None, s))
        .chain(manifest.fleets.iter().flat_map(|f| f.notify.iter().map(move |s| (Some(f), s))));
    let mut count = 0;
    let mut next = 1;
    for (_, sink) in all {
        count += 1;
        let at = locate_name(text, &sink.name, next)
            .or_else(|| locate_name(text, &sink.name, 1))
            .unwrap_or(1);
        next = at + 1;
        if !names.insert(sink.name.as_str()) {
            report.push(
                || locate(text, "name", &sink.name, at),
                format!("duplicate notification sink `{}`", sink.name),
            );
        }
        check_sink(report, sink, text, at);
    }
    if count > MAX_SINKS {
        report.push(
            || locate(text, "notify", "", 1),
            format!("{count} notification sinks, over the limit of {MAX_SINKS} (MAX_SINKS)"),
        );
    }
    if let Some(forge) = &manifest.forge {
        let at = locate(text, "forge", "", 1).0.max(1);
        if !forge.url.starts_with("https://") && !forge.url.starts_with("http://") {
            report.push(
                || locate(text, "url", &forge.url, at),
                format!("forge.url `{}` must be an http(s) URL", forge.url),
            );
        }
        let project_ok = match forge.kind {
            ForgeKind::Gitlab => !forge.project.is_empty(),
            ForgeKind::Github | ForgeKind::Gitea => forge
                .project
                .split_once('/')
                .is_some_and(|(o, r)| !o.is_empty() && !r.is_empty() && !r.contains('/')),
        };
        if !project_ok {
            report.push(
                || locate(text, "project", &forge.project, at),
                format!(
                    "forge.project `{}` must be {} for {}",
                    forge.project,
                    if forge.kind == ForgeKind::Gitlab {
                        "a project id or path"
                    } else {
                        "`owner/repo`"
                    },
                    forge.kind.as_str()
                ),
            );
        }
        check_pair(report, text, at, "forge", "token", &forge.token_env, &forge.token_file, true);
    }
}

/// A `xEnv`/`xFile` pair: at most one of them, a file path absolute, one required if `required`.
#[allow(clippy::too_many_arguments)]
fn check_pair(
    report: &mut Report<'_>,
    text: &Text<'_>,
    at: usize,
    what: &str,
    field: &str,
    env: &Option<String>,
    file: &Option<String>,
    required: bool,
) {
    let env_key = format!("{field}Env");
    let file_key = format!("{field}File");
    match (env, file) {
        (Some(_), Some(_)) => report.push(
            || locate(text, &file_key, "", at),
            format!("{what}: give {env_key} or {file_key}, not both"),
        ),
        (None, None) if required => report.push(
            || locate(text, "kind", "", at),
            format!(
                "{what} needs its {field} from the daemon's host: set {env_key} (an environment \
                 variable of `kiln run`) or {file_key} (an absolute path); never write it in the repo"
            ),
        ),
        (Some(var), None) if var.is_empty() || var.contains(['=', '\0']) => report.push(
            || locate(text, &env_key, var, at),
            format!("{what}: {env_key} `{var}` is not an environment variable name"),
        ),
        (None, Some(path)) if !path.starts_with('/') => report.push(
            || locate(text, &file_key, path, at),
            format!(
                "{what}: {file_key} `{path}` must be an absolute path on the daemon's host (secrets \
                 are not read from the repo)"
            ),
        ),
        _ => {}
    }
}

fn check_sink(report: &mut Report<'_>, sink: &Sink, text: &Text<'_>, at: usize) {
    let what = format!("notification sink `{}`", sink.name);
    if !is_safe_name(&sink.name) {
        report.push(
            || locate(text, "name", &sink.name, at),
            format!(
                "notification sink name `{}` must be 1 to 63 lowercase letters, digits and `-`, \
                 not starting with `-`",
                sink.name
            ),
        );
    }
    let kind = sink.kind;
    if kind == SinkKind::Email {
        for (key, set) in [
            ("url", sink.url.is_some()),
            ("urlEnv", sink.url_env.is_some()),
            ("urlFile", sink.url_file.is_some()),
            ("secretEnv", sink.secret_env.is_some()),
            ("secretFile", sink.secret_file.is_some()),
        ] {
            if set {
                report.push(
                    || locate(text, key, "", at),
                    format!("{what}: `{key}` is not a setting of an email sink (use `smtp:`)"),
                );
            }
        }
        match &sink.smtp {
            None => report.push(
                || locate(text, "kind", "email", at),
                format!("{what}: an email sink needs `smtp:` (host, port, credentials)"),
            ),
            Some(smtp) => {
                if smtp.host.is_empty() {
                    report.push(
                        || locate(text, "host", "", at),
                        format!("{what}: smtp.host is empty"),
                    );
                }
                check_pair(
                    report,
                    text,
                    at,
                    &what,
                    "password",
                    &smtp.password_env,
                    &smtp.password_file,
                    false,
                );
                if let Some(ca) = smtp.ca_file.as_deref().filter(|p| !p.starts_with('/')) {
                    report.push(
                        || locate(text, "caFile", ca, at),
                        format!("{what}: smtp.caFile `{ca}` must be an absolute path"),
                    );
                }
            }
        }
        if sink.from.as_deref().is_none_or(|f| !f.contains('@')) {
            report.push(
                || locate(text, "from", "", at),
                format!("{what}: an email sink needs `from:`, a sender address"),
            );
        }
        if sink.to.is_empty() {
            report.push(
                || locate(text, "to", "", at),
                format!("{what}: an email sink needs `to:`, at least one recipient"),
            );
        }
        for to in sink.to.iter().filter(|t| !t.contains('@')) {
            report.push(
                || locate(text, "to", "", at),
                format!("{what}: recipient `{to}` is not an email address"),
            );
        }
        return;
    }
    for (key, set) in [("smtp", sink.smtp.is_some()), ("from", sink.from.is_some())] {
        if set {
            report.push(
                || locate(text, key, "", at),
                format!(
                    "{what}: `{key}` is a setting of email sinks, not of {} sinks",
                    kind.as_str()
                ),
            );
        }
    }
    if !sink.to.is_empty() {
        report.push(
            || locate(text, "to", "", at),
            format!("{what}: `to` is a setting of email sinks, not of {} sinks", kind.as_str()),
        );
    }
    match (&sink.url, &sink.url_env, &sink.url_file) {
        (Some(url), _, _) if kind.url_is_secret() => report.push(
            || locate(text, "url", url, at),
            format!(
                "{what}: a {} URL carries the robot's token; give it with urlEnv or urlFile, \
                 never in the repo",
                kind.as_str()
            ),
        ),
        (Some(url), env, file) => {
            if env.is_some() || file.is_some() {
                report.push(
                    || locate(text, "url", url, at),
                    format!("{what}: give url, urlEnv or urlFile, only one"),
                );
            }
            if !url.starts_with("https://") && !url.starts_with("http://") {
                report.push(
                    || locate(text, "url", url, at),
                    format!("{what}: url `{url}` must be an http(s) URL"),
                );
            }
        }
        (None, env, file) => {
            check_pair(report, text, at, &what, "url", env, file, true);
        }
    }
    match kind {
        SinkKind::Slack | SinkKind::Wecom => {
            for (key, set) in [
                ("secretEnv", sink.secret_env.is_some()),
                ("secretFile", sink.secret_file.is_some()),
            ] {
                if set {
                    report.push(
                        || locate(text, key, "", at),
                        format!("{what}: {} robots are not signed; remove `{key}`", kind.as_str()),
                    );
                }
            }
        }
        SinkKind::Webhook => {
            check_pair(report, text, at, &what, "secret", &sink.secret_env, &sink.secret_file, true)
        }
        SinkKind::Dingtalk | SinkKind::Feishu => check_pair(
            report,
            text,
            at,
            &what,
            "secret",
            &sink.secret_env,
            &sink.secret_file,
            false,
        ),
        SinkKind::Email => {}
    }
}
