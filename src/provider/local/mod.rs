//! The local provider: instances are processes started from a baked directory image, fronted by
//! a load balancer process of kiln's own. Both outlive the daemon, as servers outlive a control
//! plane; on restart kiln re-adopts them by pid and start time.
//!
//! OWNER: provider helper. Signatures are the contract.

pub mod lb;

use std::path::PathBuf;
use std::time::Duration;

use crate::model::{ImageRef, InstanceId};
use crate::provider::{Instance, Provider, ProviderError};

/// Settings of one fleet's local provider.
#[derive(Debug, Clone)]
pub struct LocalConfig {
    /// The fleet.
    pub fleet: String,
    /// Where instances' state, work dirs and logs live (`<data-dir>/fleets/<fleet>`).
    pub dir: PathBuf,
    /// The load balancer's listening port on 127.0.0.1 (0 = pick one, remembered in `dir`).
    pub lb_port: u16,
    /// The kiln executable (started as `kiln lb ...` for the load balancer process).
    pub kiln_exe: PathBuf,
}

/// The local provider for one fleet.
#[derive(Debug)]
pub struct LocalProvider {
    config: LocalConfig,
}

impl LocalProvider {
    /// Opens the fleet's state under `config.dir`, re-adopting live instances and starting the
    /// load balancer process if it is not running.
    pub async fn open(config: LocalConfig) -> Result<LocalProvider, ProviderError> {
        Ok(LocalProvider { config })
    }
}

#[async_trait::async_trait]
impl Provider for LocalProvider {
    fn name(&self) -> &'static str {
        "local"
    }
    async fn list(&self) -> Result<Vec<Instance>, ProviderError> {
        todo!("provider helper")
    }
    async fn launch(&self, image: &ImageRef, key: &str) -> Result<Instance, ProviderError> {
        let _ = (image, key, &self.config);
        todo!("provider helper")
    }
    async fn attach(&self, id: &InstanceId) -> Result<(), ProviderError> {
        let _ = id;
        todo!("provider helper")
    }
    async fn detach(&self, id: &InstanceId, drain: Duration) -> Result<(), ProviderError> {
        let _ = (id, drain);
        todo!("provider helper")
    }
    async fn terminate(&self, id: &InstanceId) -> Result<(), ProviderError> {
        let _ = id;
        todo!("provider helper")
    }
}
