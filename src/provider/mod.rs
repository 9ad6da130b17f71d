//! The seam to where instances live.
//!
//! A [`Provider`] launches instances from an image, attaches them to and detaches them from the
//! fleet's load balancer, and terminates them. Every method is idempotent: the rollout driver
//! may call it again after a crash, with the same idempotency key for `launch`.
//!
//! Backends: `local` (processes on this machine behind kiln's own load balancer; the embedded
//! default) and `exec` (one executable per operation, speaking JSON, for any cloud CLI).

pub mod exec;
pub mod local;

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Classify, ErrorClass};
use crate::model::{ImageRef, InstanceId, Timestamp};

/// One instance as the provider sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    /// Provider id.
    pub id: InstanceId,
    /// The image it was launched from.
    pub image: ImageRef,
    /// `host:port` its health check and traffic go to, when known.
    pub address: Option<String>,
    /// Whether it is running (a dead process, a stopped VM: false).
    pub running: bool,
    /// Whether the load balancer sends it traffic.
    pub attached: bool,
    /// When it was launched.
    pub launched_at: Option<Timestamp>,
    /// The idempotency key it was launched with.
    pub launch_key: Option<String>,
}

/// An instance's health as a provider reports it (when it can).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// Serving.
    Healthy,
    /// Not serving (yet).
    Unhealthy,
}

/// What [`Provider::observe`] reports of a fleet.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observation {
    /// The fleet's instances, as [`Provider::list`] reports them.
    pub instances: Vec<Instance>,
    /// The number of instances the provider wants the fleet to have, when it owns that number
    /// (an AWS Auto Scaling group's or an Alibaba ESS group's desired capacity, which scaling
    /// rules move). `None`: the manifest's `capacity` decides.
    pub desired: Option<u32>,
    /// Health the provider reported with the list, per instance id (an exec `list` reply's
    /// `"healthy"`: one call for the whole fleet, e.g. a target group's health). Instances it
    /// does not name have no reported health.
    pub health: std::collections::HashMap<InstanceId, bool>,
}

/// Errors from a provider.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The backend could not be reached or answered with a retryable error.
    #[error("provider `{provider}` failed to {op}: {message}")]
    Transient {
        /// Backend name.
        provider: &'static str,
        /// Operation.
        op: &'static str,
        /// What went wrong.
        message: String,
    },
    /// The backend refused or answered junk; retrying will not help.
    #[error("provider `{provider}` failed to {op}: {message}")]
    Failed {
        /// Backend name.
        provider: &'static str,
        /// Operation.
        op: &'static str,
        /// What went wrong.
        message: String,
    },
    /// The instance does not exist (already terminated is fine for `terminate`).
    #[error("instance `{0}` not found")]
    NotFound(InstanceId),
}

impl Classify for ProviderError {
    fn class(&self) -> ErrorClass {
        match self {
            ProviderError::Transient { .. } => ErrorClass::Transient,
            ProviderError::Failed { .. } | ProviderError::NotFound(_) => ErrorClass::Stalled,
        }
    }
}

/// Where a fleet's instances live.
#[async_trait::async_trait]
pub trait Provider: Send + Sync + std::fmt::Debug {
    /// Backend name (`local`, `exec`).
    fn name(&self) -> &'static str;

    /// The fleet's instances, running or not, with their image and LB membership.
    async fn list(&self) -> Result<Vec<Instance>, ProviderError>;

    /// The fleet's instances and, when the provider owns it, its desired count (see
    /// [`Observation`]). The default lists and reports no desired count.
    async fn observe(&self) -> Result<Observation, ProviderError> {
        Ok(Observation { instances: self.list().await?, ..Observation::default() })
    }

    /// Launches one instance on `image`. Calling it again with the same `key` returns the
    /// instance launched the first time instead of a second one.
    async fn launch(&self, image: &ImageRef, key: &str) -> Result<Instance, ProviderError>;

    /// The provider's own view of an instance's health, or `None` to let kiln probe
    /// `healthCheck.http` on the instance's address.
    async fn health(&self, _id: &InstanceId) -> Result<Option<Health>, ProviderError> {
        Ok(None)
    }

    /// Adds the instance to the load balancer. Idempotent.
    async fn attach(&self, id: &InstanceId) -> Result<(), ProviderError>;

    /// Stops new traffic to the instance, lets requests in flight finish for up to `drain`,
    /// then removes it from the load balancer. Idempotent.
    async fn detach(&self, id: &InstanceId, drain: Duration) -> Result<(), ProviderError>;

    /// Stops the instance for good. Idempotent (an unknown instance is already gone).
    async fn terminate(&self, id: &InstanceId) -> Result<(), ProviderError>;

    /// Load-balancer backends kiln did not attach, found since the last call (for the drift
    /// report). The local provider removes each on sight and remembers it until this call;
    /// a provider that cannot tell returns none.
    async fn foreign_backends(&self) -> Result<Vec<ForeignBackend>, ProviderError> {
        Ok(Vec::new())
    }

    /// The address clients use (the load balancer URL), when there is one.
    fn endpoint(&self) -> Option<String> {
        None
    }

    /// Routes the fleet's traffic for a rollout in progress (see [`Route`]), or as usual with
    /// `None`. Idempotent. The default does nothing: only kiln's own load balancer splits
    /// traffic by image.
    async fn route(&self, _route: Option<&Route>) -> Result<(), ProviderError> {
        Ok(())
    }

    /// Retires what the fleet has besides its instances (its load balancer) once a `prune`
    /// rollout terminated them all. Idempotent. The default does nothing: an exec provider's
    /// load balancer belongs to the infra its hooks manage.
    async fn retire(&self) -> Result<(), ProviderError> {
        Ok(())
    }
}

/// How a rollout routes traffic while it rolls (`rollout::step::route`): instances on `image`
/// are the new side; the load balancer's gray listener serves only them, and with `percent`
/// they take that share of the main listener's requests, whatever their count.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// The rollout's new image.
    pub image: ImageRef,
    /// The new side's share of requests (1 to 99); `None`: its round-robin share.
    pub percent: Option<u32>,
}

/// A load-balancer backend kiln did not attach.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForeignBackend {
    /// The backend's id in the load balancer.
    pub id: String,
    /// Where it sent traffic.
    pub address: String,
    /// When kiln saw it.
    pub seen_at: Timestamp,
    /// Whether kiln removed it from the load balancer.
    pub removed: bool,
}

/// A shared provider handle.
pub type SharedProvider = Arc<dyn Provider>;

/// What [`open`] needs besides the fleet.
#[derive(Debug, Clone)]
pub struct OpenContext {
    /// `<data-dir>/fleets`: each fleet's provider state lives in `<fleets>/<fleet>/`.
    pub fleets_dir: std::path::PathBuf,
    /// The bare mirror (the exec provider runs its scripts from an export of the commit).
    pub mirror: std::path::PathBuf,
    /// The kiln executable (the local provider starts `kiln lb` from it).
    pub kiln_exe: std::path::PathBuf,
    /// The ports local instances listen on (`kiln run --instance-ports`; `None`: any).
    pub instance_ports: Option<local::PortRange>,
}

/// Why a provider could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The provider itself failed (a busy load balancer port, an unreachable backend).
    #[error(transparent)]
    Provider(#[from] ProviderError),
    /// The fleet's settings or data dir are unusable.
    #[error("fleet `{fleet}`: {message}")]
    Setup {
        /// The fleet.
        fleet: String,
        /// What was wrong.
        message: String,
    },
}

impl OpenError {
    /// Worth retrying later (the backend may come back), rather than a setup that will fail again.
    pub fn is_transient(&self) -> bool {
        matches!(self, OpenError::Provider(ProviderError::Transient { .. }))
    }
}

/// Identifies the provider a fleet needs at `revision`: an open provider with the same key is
/// reused. The local provider depends on its load balancer port, the exec provider on the
/// commit its scripts come from.
pub fn open_key(fleet: &crate::manifest::Fleet, revision: &crate::model::Revision) -> String {
    match &fleet.rollout.provider {
        crate::manifest::ProviderSpec::Local { load_balancer } => match load_balancer.gray_port {
            Some(gray) => format!("local:{}:{gray}", load_balancer.port),
            None => format!("local:{}", load_balancer.port),
        },
        crate::manifest::ProviderSpec::Exec(_) => format!("exec:{revision}"),
    }
}

/// The provider factory: opens the provider `fleet` names in its manifest at `revision`.
/// May be slow (the local provider starts or adopts its load balancer, the exec provider exports
/// the commit's scripts): callers run it off any shared loop.
pub async fn open(
    fleet: &crate::manifest::Fleet,
    revision: &crate::model::Revision,
    cx: &OpenContext,
) -> Result<SharedProvider, OpenError> {
    let setup = |message: String| OpenError::Setup { fleet: fleet.name.clone(), message };
    let fleet_dir =
        crate::fsutil::safe_join(&cx.fleets_dir, &fleet.name).map_err(|e| setup(e.to_string()))?;
    let policy = &fleet.rollout;
    Ok(match &policy.provider {
        crate::manifest::ProviderSpec::Local { load_balancer } => {
            let provider = local::LocalProvider::open(local::LocalConfig {
                fleet: fleet.name.clone(),
                dir: fleet_dir,
                lb_port: load_balancer.port,
                kiln_exe: cx.kiln_exe.clone(),
            })
            .await?
            .with_instance_ports(cx.instance_ports);
            // A gray port that cannot be bound leaves the fleet serving on its traffic port.
            if let Err(error) = provider.set_gray_port(load_balancer.gray_port).await {
                tracing::error!(fleet = %fleet.name, error = %crate::error::chain(&error), "Cannot serve the gray port.");
            }
            Arc::new(provider)
        }
        crate::manifest::ProviderSpec::Exec(spec) => {
            let repo_dir = crate::fsutil::safe_join(&fleet_dir.join("provider"), revision.as_str())
                .map_err(|e| setup(e.to_string()))?;
            if !repo_dir.exists() {
                let (mirror, revision, dest) =
                    (cx.mirror.clone(), revision.clone(), repo_dir.clone());
                tokio::task::spawn_blocking(move || {
                    crate::source::git::export(&mirror, &revision, &dest)
                })
                .await
                .map_err(|e| setup(format!("exporting the provider scripts: {e}")))?
                .map_err(|e| {
                    setup(format!("exporting the provider scripts: {}", crate::error::chain(&e)))
                })?;
            }
            Arc::new(exec::ExecProvider::new(&fleet.name, spec, repo_dir, fleet_dir.join("exec")))
        }
    })
}
