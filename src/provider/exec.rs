//! The exec provider: each operation is an executable in the repo speaking JSON.
//!
//! kiln sends the request as JSON on the script's stdin (and in a file named by `$KILN_REQUEST`),
//! runs the operation's script
//! through the hook runner (clean environment, own process group, timeout), and parses the
//! script's stdout as the reply. The protocol is documented in `docs/exec-provider.md`; every
//! reply is validated, and a bad one is an error naming the script and what was wrong.
//!
//! Exit status: 0 is success, 75 is transient (retry later), anything else is a failure carrying
//! the tail of the script's stderr.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::hooks::{self, HookError, HookSpec, Stream};
use crate::model::{ImageRef, InstanceId, Timestamp};
use crate::provider::{Health, Instance, Observation, Provider, ProviderError};

/// How much of a junk reply an error quotes.
const QUOTE_CHARS: usize = 200;

/// A provider whose operations are scripts in the repo.
#[derive(Debug)]
pub struct ExecProvider {
    fleet: String,
    spec: crate::manifest::ExecProvider,
    repo_dir: PathBuf,
    work_dir: PathBuf,
}

/// One instance as a script reports it (`list` items and the `launch` reply).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecInstance {
    /// Provider id (required, non-empty).
    pub id: String,
    /// The image; defaults to the requested one in a `launch` reply.
    #[serde(default)]
    pub image: Option<String>,
    /// `host:port` for health checks and traffic.
    #[serde(default)]
    pub address: Option<String>,
    /// Whether it runs (default true).
    #[serde(default = "yes")]
    pub running: bool,
    /// Whether the load balancer sends it traffic (default false).
    #[serde(default)]
    pub attached: bool,
    /// When it was launched (RFC 3339).
    #[serde(default)]
    pub launched_at: Option<Timestamp>,
    /// The idempotency key it was launched with.
    #[serde(default)]
    pub launch_key: Option<String>,
    /// Whether it serves, when the script can tell in its `list` reply (optional).
    #[serde(default)]
    pub healthy: Option<bool>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
struct ListReply {
    instances: Vec<ExecInstance>,
    /// The group's desired count, when the cloud owns it (an autoscaling group).
    #[serde(default)]
    desired: Option<serde_json::Number>,
}

#[derive(Debug, Deserialize)]
struct HealthReply {
    health: Option<Health>,
}

/// The request written to `$KILN_REQUEST`.
#[derive(Debug, Serialize)]
struct Request<'a> {
    operation: &'static str,
    fleet: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    image: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    drain_ms: Option<u64>,
}

impl<'a> Request<'a> {
    fn new(operation: &'static str, fleet: &'a str) -> Request<'a> {
        Request { operation, fleet, id: None, image: None, key: None, drain_ms: None }
    }
}

/// `KILN_PROVIDER_<NAME>` for a setting name (upper case, non-alphanumerics as `_`); the same
/// rule validation uses to check `exec.env` against the provider's `settings.yaml`.
pub fn setting_var(name: &str) -> String {
    crate::manifest::setting_env_name(name)
}

impl ExecProvider {
    /// A provider running `spec`'s scripts from `repo_dir` (an export of the repo), keeping
    /// request files under `work_dir`.
    pub fn new(
        fleet: &str,
        spec: &crate::manifest::ExecProvider,
        repo_dir: PathBuf,
        work_dir: PathBuf,
    ) -> ExecProvider {
        ExecProvider { fleet: fleet.to_owned(), spec: spec.clone(), repo_dir, work_dir }
    }

    /// Runs `script` with `request`; returns its stdout.
    async fn call(
        &self,
        op: &'static str,
        script: &str,
        request: &Request<'_>,
        extra_time: Duration,
    ) -> Result<String, ProviderError> {
        let program = match crate::fsutil::safe_join(&self.repo_dir, script) {
            Ok(program) if !script.is_empty() => program,
            _ => {
                return Err(failed(
                    op,
                    format!("script `{script}` must be a path inside the repo"),
                ));
            }
        };
        if !program.is_file() {
            return Err(failed(op, format!("script `{script}` does not exist in the repo")));
        }
        let requests = self.work_dir.join("requests");
        std::fs::create_dir_all(&requests)
            .map_err(|e| failed(op, format!("cannot create {}: {e}", requests.display())))?;
        let request_file =
            requests.join(format!("{op}-{}-{:08x}.json", std::process::id(), fastrand::u32(..)));
        let json = serde_json::to_vec(request).map_err(|e| failed(op, e.to_string()))?;
        std::fs::write(&request_file, &json)
            .map_err(|e| failed(op, format!("cannot write {}: {e}", request_file.display())))?;

        let mut env = vec![
            ("KILN_OPERATION".to_owned(), op.to_owned()),
            ("KILN_FLEET".to_owned(), self.fleet.clone()),
            ("KILN_REQUEST".to_owned(), request_file.display().to_string()),
        ];
        env.extend(self.spec.env.iter().map(|(k, v)| (setting_var(k), v.clone())));
        let spec = HookSpec {
            name: format!("provider {op} ({script})"),
            program,
            args: Vec::new(),
            workdir: self.repo_dir.clone(),
            env,
            timeout: self.spec.timeout + extra_time,
            stdin: Some(json),
        };
        let fleet = self.fleet.clone();
        let sink = move |stream: Stream, line: &str| {
            if stream == Stream::Stderr {
                tracing::debug!(fleet = %fleet, op, line, "Provider script output.");
            }
        };
        // Routine (list and health run at every tick): logged at DEBUG, failures by the caller.
        let res = hooks::run_routine(&spec, &sink, &CancellationToken::new()).await;
        let _ = std::fs::remove_file(&request_file);
        match res {
            Ok(outcome) => Ok(outcome.stdout),
            Err(error @ HookError::Exited { code: hooks::contract::EXIT_TRANSIENT, .. })
            | Err(error @ HookError::TimedOut { .. })
            | Err(error @ HookError::Cancelled { .. }) => {
                Err(transient(op, crate::error::chain(&error)))
            }
            Err(error) => Err(failed(op, crate::error::chain(&error))),
        }
    }

    fn junk(
        op: &'static str,
        script: &str,
        expected: &str,
        detail: String,
        stdout: &str,
    ) -> ProviderError {
        let quoted: String = stdout.trim().chars().take(QUOTE_CHARS).collect();
        failed(
            op,
            format!(
                "script `{script}` replied with junk (expected {expected}): {detail}; stdout was `{quoted}`"
            ),
        )
    }

    /// Checks and converts one reported instance.
    fn instance(
        op: &'static str,
        script: &str,
        reported: ExecInstance,
        default_image: Option<&ImageRef>,
    ) -> Result<Instance, ProviderError> {
        let bad = |what: String| failed(op, format!("script `{script}` replied with junk: {what}"));
        if reported.id.trim().is_empty() || reported.id.chars().any(char::is_control) {
            return Err(bad(format!(
                "instance id `{}` is empty or has control characters",
                reported.id.escape_default()
            )));
        }
        if let Some(address) = &reported.address {
            let port_ok = address.rsplit_once(':').is_some_and(|(host, port)| {
                !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0)
            });
            if !port_ok {
                return Err(bad(format!(
                    "address `{address}` of `{}` is not host:port",
                    reported.id
                )));
            }
        }
        let image = match (reported.image, default_image) {
            (Some(image), _) if !image.trim().is_empty() => ImageRef(image),
            (_, Some(image)) => image.clone(),
            _ => return Err(bad(format!("instance `{}` has no image", reported.id))),
        };
        Ok(Instance {
            id: InstanceId(reported.id),
            image,
            address: reported.address,
            running: reported.running,
            attached: reported.attached,
            launched_at: reported.launched_at,
            launch_key: reported.launch_key,
        })
    }

    /// Checks and converts a `list` reply: `{"instances": [...], "desired": N}`, `desired`
    /// optional (`null` or absent: the manifest's capacity decides).
    fn list_reply(script: &str, stdout: &str) -> Result<Observation, ProviderError> {
        let expected = r#"{"instances": [...], "desired": N}"#;
        let reply: ListReply = serde_json::from_str(stdout)
            .map_err(|e| Self::junk("list", script, expected, e.to_string(), stdout))?;
        let desired = match reply.desired {
            None => None,
            Some(n) => match n.as_u64().and_then(|n| u32::try_from(n).ok()) {
                Some(n) if n <= crate::manifest::MAX_CAPACITY => Some(n),
                _ => {
                    return Err(Self::junk(
                        "list",
                        script,
                        expected,
                        format!(
                            "desired `{n}` is not a whole number from 0 to {}",
                            crate::manifest::MAX_CAPACITY
                        ),
                        stdout,
                    ));
                }
            },
        };
        let mut health = std::collections::HashMap::new();
        let mut instances = Vec::with_capacity(reply.instances.len());
        for reported in reply.instances {
            let healthy = reported.healthy;
            let instance = Self::instance("list", script, reported, None)?;
            if let Some(healthy) = healthy {
                health.insert(instance.id.clone(), healthy);
            }
            instances.push(instance);
        }
        Ok(Observation { instances, desired, health })
    }

    /// An acknowledgement: nothing, or a JSON object.
    fn ack(op: &'static str, script: &str, stdout: &str) -> Result<(), ProviderError> {
        if stdout.trim().is_empty() {
            return Ok(());
        }
        match serde_json::from_str::<serde_json::Value>(stdout) {
            Ok(serde_json::Value::Object(_)) => Ok(()),
            Ok(_) => Err(Self::junk(
                op,
                script,
                "nothing or a JSON object",
                "not an object".to_owned(),
                stdout,
            )),
            Err(e) => {
                Err(Self::junk(op, script, "nothing or a JSON object", e.to_string(), stdout))
            }
        }
    }
}

fn failed(op: &'static str, message: String) -> ProviderError {
    ProviderError::Failed { provider: "exec", op, message }
}

fn transient(op: &'static str, message: String) -> ProviderError {
    ProviderError::Transient { provider: "exec", op, message }
}

#[async_trait::async_trait]
impl Provider for ExecProvider {
    fn name(&self) -> &'static str {
        "exec"
    }

    async fn list(&self) -> Result<Vec<Instance>, ProviderError> {
        Ok(self.observe().await?.instances)
    }

    async fn observe(&self) -> Result<Observation, ProviderError> {
        let script = &self.spec.list;
        let stdout =
            self.call("list", script, &Request::new("list", &self.fleet), Duration::ZERO).await?;
        Self::list_reply(script, &stdout)
    }

    async fn launch(&self, image: &ImageRef, key: &str) -> Result<Instance, ProviderError> {
        let script = &self.spec.launch;
        let request = Request {
            image: Some(image.as_str()),
            key: Some(key),
            ..Request::new("launch", &self.fleet)
        };
        let stdout = self.call("launch", script, &request, Duration::ZERO).await?;
        let reported: ExecInstance = serde_json::from_str(&stdout).map_err(|e| {
            Self::junk(
                "launch",
                script,
                r#"{"id": "...", "address": "host:port"}"#,
                e.to_string(),
                &stdout,
            )
        })?;
        let mut instance = Self::instance("launch", script, reported, Some(image))?;
        instance.launch_key.get_or_insert_with(|| key.to_owned());
        Ok(instance)
    }

    async fn health(&self, id: &InstanceId) -> Result<Option<Health>, ProviderError> {
        let Some(script) = &self.spec.health else {
            return Ok(None);
        };
        let request = Request { id: Some(id.as_str()), ..Request::new("health", &self.fleet) };
        let stdout = self.call("health", script, &request, Duration::ZERO).await?;
        let reply: HealthReply = serde_json::from_str(&stdout).map_err(|e| {
            Self::junk(
                "health",
                script,
                r#"{"health": "healthy"|"unhealthy"|null}"#,
                e.to_string(),
                &stdout,
            )
        })?;
        Ok(reply.health)
    }

    async fn attach(&self, id: &InstanceId) -> Result<(), ProviderError> {
        let script = &self.spec.attach;
        let request = Request { id: Some(id.as_str()), ..Request::new("attach", &self.fleet) };
        let stdout = self.call("attach", script, &request, Duration::ZERO).await?;
        Self::ack("attach", script, &stdout)
    }

    async fn detach(&self, id: &InstanceId, drain: Duration) -> Result<(), ProviderError> {
        let script = &self.spec.detach;
        let drain_ms = u64::try_from(drain.as_millis()).unwrap_or(u64::MAX);
        let request = Request {
            id: Some(id.as_str()),
            drain_ms: Some(drain_ms),
            ..Request::new("detach", &self.fleet)
        };
        let stdout = self.call("detach", script, &request, drain).await?;
        Self::ack("detach", script, &stdout)
    }

    async fn terminate(&self, id: &InstanceId) -> Result<(), ProviderError> {
        let script = &self.spec.terminate;
        let request = Request { id: Some(id.as_str()), ..Request::new("terminate", &self.fleet) };
        let stdout = self.call("terminate", script, &request, Duration::ZERO).await?;
        Self::ack("terminate", script, &stdout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_become_provider_variables() {
        assert_eq!(setting_var("target_group_arn"), "KILN_PROVIDER_TARGET_GROUP_ARN");
        assert_eq!(setting_var("lb-admin.url"), "KILN_PROVIDER_LB_ADMIN_URL");
    }

    #[test]
    fn reported_instances_are_validated() {
        let reported = |id: &str, address: Option<&str>| ExecInstance {
            id: id.to_owned(),
            image: None,
            address: address.map(str::to_owned),
            running: true,
            attached: false,
            launched_at: None,
            launch_key: None,
            healthy: None,
        };
        let image = ImageRef::from("ami-1");
        let ok = ExecProvider::instance(
            "launch",
            "s",
            reported("i-1", Some("10.0.0.1:80")),
            Some(&image),
        )
        .expect("valid");
        assert_eq!(ok.image, image);
        for (id, address) in
            [("", None), ("i-1", Some("10.0.0.1")), ("i-1", Some(":80")), ("i-1", Some("h:0"))]
        {
            let res = ExecProvider::instance("launch", "s", reported(id, address), Some(&image));
            assert!(matches!(res, Err(ProviderError::Failed { .. })), "{id:?} {address:?}");
        }
        let no_image = ExecProvider::instance("list", "s", reported("i-1", None), None);
        assert!(no_image.expect_err("list needs an image").to_string().contains("no image"));
        assert!(ExecProvider::ack("attach", "s", "  \n").is_ok());
        assert!(ExecProvider::ack("attach", "s", "{\"ok\": true}").is_ok());
        assert!(ExecProvider::ack("attach", "s", "[1]").is_err());
    }

    #[test]
    fn list_replies_may_carry_the_desired_count() {
        let one = r#"{"id": "i-1", "image": "ami-1"}"#;
        let old_shape = ExecProvider::list_reply("s", &format!(r#"{{"instances": [{one}]}}"#))
            .expect("the reply without `desired` still works");
        assert_eq!((old_shape.instances.len(), old_shape.desired), (1, None));
        let null = ExecProvider::list_reply("s", r#"{"instances": [], "desired": null}"#);
        assert_eq!(null.expect("null desired").desired, None);
        let five =
            ExecProvider::list_reply("s", &format!(r#"{{"instances": [{one}], "desired": 5}}"#));
        assert_eq!(five.expect("desired 5").desired, Some(5));
        let zero = ExecProvider::list_reply("s", r#"{"instances": [], "desired": 0}"#);
        assert_eq!(zero.expect("desired 0").desired, Some(0));
        for bad in ["-1", "2.5", "\"5\"", "10001", "99999999999", "true"] {
            let reply = format!(r#"{{"instances": [], "desired": {bad}}}"#);
            let error = ExecProvider::list_reply("s", &reply).expect_err(bad).to_string();
            assert!(error.contains("desired") && error.contains("script `s`"), "{bad}: {error}");
        }
    }
}
