//! How a fleet command reaches etcd (`--etcd` and its TLS files), and how a fleet error
//! becomes the command's one line and exit status.

use std::path::PathBuf;

use warmvm_fleet::{EtcdOptions, FleetError};

use crate::failure::{Failure, EXIT_BAD_INPUT, EXIT_HOST};

/// How a fleet command reaches etcd.
#[derive(clap::Args, Debug, Clone)]
pub struct EtcdArgs {
    /// The etcd members, http(s)://HOST:PORT, comma separated.
    #[arg(long, value_name = "URL[,URL...]")]
    pub etcd: String,
    /// The CA (PEM) that signed the etcd members' certificates (https endpoints).
    #[arg(long, value_name = "FILE")]
    pub etcd_ca: Option<PathBuf>,
    /// A client certificate (PEM) for etcd; with --etcd-key.
    #[arg(long, value_name = "FILE", requires_all = ["etcd_key", "etcd_ca"])]
    pub etcd_cert: Option<PathBuf>,
    /// The key of --etcd-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,
}

impl EtcdArgs {
    /// Checked whole before anything is connected.
    pub fn options(&self) -> Result<EtcdOptions, Failure> {
        // The daemon's flags are named --fleet-etcd*; here they are --etcd*.
        let rename = |m: String| m.replace("--fleet-etcd", "--etcd");
        let o = EtcdOptions::new(
            &self.etcd,
            self.etcd_ca.clone(),
            self.etcd_cert.clone(),
            self.etcd_key.clone(),
        )
        .map_err(|e| Failure::new(EXIT_BAD_INPUT, rename(e.to_string())))?;
        o.connect_options()
            .map_err(|e| Failure::from_error(EXIT_BAD_INPUT, &e))?;
        Ok(o)
    }
}

/// The operator's mistakes exit 2; etcd or the host failing, 3.
pub(crate) fn fleet_failure(e: FleetError) -> Failure {
    let code = match &e {
        FleetError::Invalid(_)
        | FleetError::Refused(_)
        | FleetError::ReadFile { .. }
        | FleetError::StepNotAssigned { .. } => EXIT_BAD_INPUT,
        _ => EXIT_HOST,
    };
    Failure::from_error(code, &e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_etcd_flags_are_bad_input_and_named_as_this_commands() {
        let args = EtcdArgs {
            etcd: "https://10.0.0.1:2379".into(),
            etcd_ca: None,
            etcd_cert: None,
            etcd_key: None,
        };
        let e = args.options().unwrap_err();
        assert!(e.to_string().contains("--etcd-ca"), "{e}");
        assert!(!e.to_string().contains("--fleet-etcd"), "{e}");
    }
}
