//! The certificate manager every node runs: each pass reads the CA record from the node's own
//! store, trusts exactly the CAs it lists, and issues the node a new certificate from the
//! signing CA when its current one comes from another CA (a rotation) or has less than a third
//! of its lifetime left. The decision is pure ([`plan`]); the pass applies it.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use flotilla_pki::authority::{not_after, NODE_CERTIFICATE_LIFETIME};
use flotilla_pki::{Credentials, Fingerprint, Subject};
use flotilla_raft::Replica;
use tokio_util::sync::CancellationToken;

use super::node_files::NodeFiles;
use super::{read_authority_record, NodeSecurity};

const PASS_INTERVAL: Duration = Duration::from_secs(1);

/// What a pass must change.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// Trust exactly the record's CAs (they differ from the trusted ones).
    pub trust_record: bool,
    /// Issue this node a new certificate from the signing CA.
    pub reissue: bool,
}

pub fn plan(
    trusted: &[Fingerprint],
    record_trusted: &[Fingerprint],
    signing: Fingerprint,
    own_issuer: Option<Fingerprint>,
    own_not_after: Option<SystemTime>,
    now: SystemTime,
) -> Plan {
    let expiring = own_not_after
        .map(|expiry| expiry < now + NODE_CERTIFICATE_LIFETIME / 3)
        .unwrap_or(true);
    Plan {
        trust_record: trusted != record_trusted,
        reissue: own_issuer != Some(signing) || expiring,
    }
}

/// Runs passes until `shutdown`.
pub async fn run(replica: Replica, security: Arc<NodeSecurity>, shutdown: CancellationToken) {
    let mut interval = tokio::time::interval(PASS_INTERVAL);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        if let Err(error) = pass(&replica, &security) {
            tracing::warn!(error = format!("{error:#}"), "certificate manager pass");
        }
    }
}

fn pass(replica: &Replica, security: &NodeSecurity) -> anyhow::Result<()> {
    let Some((record, _)) = read_authority_record(replica, security.keyring.root_key())? else {
        return Ok(());
    };
    let record_trusted = record.trusted_fingerprints()?;
    let signing = record.signing_authority()?;
    let own_chain = security.tls.own_chain();
    let own_not_after = own_chain
        .as_ref()
        .and_then(|chain| chain.first())
        .and_then(|leaf| not_after(leaf).ok());
    let decision = plan(
        &security.tls.authorities(),
        &record_trusted,
        signing.fingerprint()?,
        security.certificate_issuer(),
        own_not_after,
        SystemTime::now(),
    );
    if decision.trust_record {
        security
            .tls
            .set_authorities(record.trusted_certificates()?)?;
        tracing::info!(
            trusted = ?record_trusted,
            "trusting the CAs of the CA record"
        );
    }
    if decision.reissue {
        let issued = signing.issue(
            &Subject::Node(security.node_name.clone()),
            SystemTime::now(),
            NODE_CERTIFICATE_LIFETIME,
        )?;
        security
            .tls
            .set_credentials(Credentials::from_pem(&issued.chain_pem, &issued.key_pem)?)?;
        NodeFiles {
            chain_pem: issued.chain_pem,
            key_pem: issued.key_pem,
            authorities_pem: record.trusted_pem(),
        }
        .write(&security.data_dir)?;
        tracing::info!(issuer = %signing.fingerprint()?, "renewed this node's certificate");
    } else if decision.trust_record {
        if let Some(mut files) = NodeFiles::read(&security.data_dir)? {
            files.authorities_pem = record.trusted_pem();
            files.write(&security.data_dir)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fingerprint(byte: u8) -> Fingerprint {
        Fingerprint([byte; 32])
    }

    #[test]
    fn a_node_whose_certificate_comes_from_the_signing_ca_and_is_fresh_changes_nothing() {
        let now = SystemTime::now();
        let decision = plan(
            &[fingerprint(1)],
            &[fingerprint(1)],
            fingerprint(1),
            Some(fingerprint(1)),
            Some(now + NODE_CERTIFICATE_LIFETIME),
            now,
        );
        assert_eq!(decision, Plan::default());
    }

    #[test]
    fn a_rotation_first_adds_trust_then_reissues_from_the_new_ca() {
        let now = SystemTime::now();
        let fresh = Some(now + NODE_CERTIFICATE_LIFETIME);
        let both = [fingerprint(1), fingerprint(2)];
        let trust_first = plan(
            &[fingerprint(1)],
            &both,
            fingerprint(1),
            Some(fingerprint(1)),
            fresh,
            now,
        );
        assert_eq!(
            trust_first,
            Plan {
                trust_record: true,
                reissue: false
            }
        );
        let then_sign = plan(
            &both,
            &both,
            fingerprint(2),
            Some(fingerprint(1)),
            fresh,
            now,
        );
        assert_eq!(
            then_sign,
            Plan {
                trust_record: false,
                reissue: true
            }
        );
        let then_drop = plan(
            &both,
            &[fingerprint(2)],
            fingerprint(2),
            Some(fingerprint(2)),
            fresh,
            now,
        );
        assert_eq!(
            then_drop,
            Plan {
                trust_record: true,
                reissue: false
            }
        );
    }

    #[test]
    fn a_certificate_with_less_than_a_third_of_its_life_left_is_renewed() {
        let now = SystemTime::now();
        let decision = plan(
            &[fingerprint(1)],
            &[fingerprint(1)],
            fingerprint(1),
            Some(fingerprint(1)),
            Some(now + NODE_CERTIFICATE_LIFETIME / 4),
            now,
        );
        assert!(decision.reissue);
    }
}
