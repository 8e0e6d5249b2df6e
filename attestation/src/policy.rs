//! Verification policy: which TCB statuses are acceptable, whether DEBUG TDs or simulated evidence
//! are allowed, and how old collateral may be.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What the verifier accepts beyond a valid signature chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// TCB statuses accepted, as dcap-qvl names them ("UpToDate", "SWHardeningNeeded",
    /// "ConfigurationNeeded", "OutOfDate", ...). Default: only "UpToDate". "Revoked" is never accepted.
    pub allowed_tcb_statuses: Vec<String>,
    /// Accept TDs with TD_ATTRIBUTES.DEBUG. Default false; only for local debugging.
    pub allow_debug: bool,
    /// Accept evidence from the simulated TEE (never in production). Default false.
    pub allow_simulated: bool,
    /// Accept a worker whose measured host config lets it serve on GPUs that are not in
    /// confidential-computing mode (development only). Default false.
    #[serde(default)]
    pub allow_dev_gpu_without_cc: bool,
    /// Reject collateral whose TCB info / QE identity was issued longer ago than this, measured at the
    /// verification time. `None`: only the collateral's own validity window applies.
    pub max_collateral_age: Option<Duration>,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            allowed_tcb_statuses: vec!["UpToDate".to_owned()],
            allow_debug: false,
            allow_simulated: false,
            allow_dev_gpu_without_cc: false,
            max_collateral_age: None,
        }
    }
}

impl Policy {
    /// Whether `status` is accepted (case-insensitive; "Revoked" never is).
    pub fn status_allowed(&self, status: &str) -> bool {
        !status.eq_ignore_ascii_case("Revoked")
            && self
                .allowed_tcb_statuses
                .iter()
                .any(|s| s.eq_ignore_ascii_case(status))
    }

    /// Also accept `status`.
    pub fn allow_status(mut self, status: &str) -> Self {
        self.allowed_tcb_statuses.push(status.to_owned());
        self
    }

    /// Accept or refuse simulated evidence.
    pub fn with_simulated(mut self, allow: bool) -> Self {
        self.allow_simulated = allow;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_accepts_only_up_to_date_and_never_revoked() {
        let p = Policy::default();
        assert!(p.status_allowed("UpToDate"));
        assert!(!p.status_allowed("OutOfDate"));
        assert!(!p.allow_debug && !p.allow_simulated);
        let p = p.allow_status("OutOfDate").allow_status("Revoked");
        assert!(p.status_allowed("outofdate"));
        assert!(!p.status_allowed("Revoked"));
    }
}
