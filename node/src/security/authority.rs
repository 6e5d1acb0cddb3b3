//! The CA record: every CA the cluster trusts (more than one only during a rotation), which one
//! signs, and the join secret. Kept as the ConfigMap `kube-system/flotilla-ca`, its content
//! sealed with the root key; only the CAs' public fingerprints are in clear.

use base64::Engine;
use flotilla_pki::authority::certificate_from_pem;
use flotilla_pki::{Authority, Fingerprint, JoinToken, PkiError};
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::RECORDS_NAMESPACE;
use crate::encryption::{EncryptionError, RootKey};

pub const RECORD_NAME: &str = "flotilla-ca";
const SEALED_FIELD: &str = "sealed";

#[derive(Debug, thiserror::Error)]
pub enum AuthorityRecordError {
    #[error("the CA record kube-system/{RECORD_NAME} has no sealed content")]
    Missing,
    #[error("the CA record is not valid base64: {0}")]
    Encoding(#[from] base64::DecodeError),
    #[error("open the CA record: {0}")]
    Open(#[from] EncryptionError),
    #[error("parse the CA record: {0}")]
    Parse(#[from] serde_json::Error),
    #[error("the CA record has no signing CA")]
    NoSigningAuthority,
    #[error(transparent)]
    Pki(#[from] PkiError),
}

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthorityRecord {
    /// Every trusted CA, oldest first.
    pub authorities: Vec<Authority>,
    /// The index in `authorities` of the CA that issues certificates.
    pub signing: usize,
    pub join_secret: String,
}

impl std::fmt::Debug for AuthorityRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthorityRecord")
            .field("authorities", &self.authorities)
            .field("signing", &self.signing)
            .finish_non_exhaustive()
    }
}

impl AuthorityRecord {
    pub fn new(authority: Authority) -> AuthorityRecord {
        AuthorityRecord {
            authorities: vec![authority],
            signing: 0,
            join_secret: flotilla_pki::token::new_secret(),
        }
    }

    pub fn signing_authority(&self) -> Result<&Authority, AuthorityRecordError> {
        self.authorities
            .get(self.signing)
            .ok_or(AuthorityRecordError::NoSigningAuthority)
    }

    pub fn trusted_certificates(
        &self,
    ) -> Result<Vec<CertificateDer<'static>>, AuthorityRecordError> {
        Ok(self
            .authorities
            .iter()
            .map(|a| certificate_from_pem(&a.cert_pem))
            .collect::<Result<_, _>>()?)
    }

    pub fn trusted_fingerprints(&self) -> Result<Vec<Fingerprint>, AuthorityRecordError> {
        Ok(self
            .authorities
            .iter()
            .map(Authority::fingerprint)
            .collect::<Result<_, _>>()?)
    }

    /// The CAs' certificates as one PEM bundle.
    pub fn trusted_pem(&self) -> String {
        self.authorities
            .iter()
            .map(|a| a.cert_pem.as_str())
            .collect()
    }

    /// The join token of the signing CA.
    pub fn join_token(&self) -> Result<JoinToken, AuthorityRecordError> {
        Ok(JoinToken {
            authority: self.signing_authority()?.fingerprint()?,
            secret: self.join_secret.clone(),
        })
    }

    /// The ConfigMap holding this record, sealed with `key`.
    pub fn to_object(&self, key: &RootKey) -> Result<Value, AuthorityRecordError> {
        let plaintext = serde_json::to_vec(self)?;
        let sealed = key.seal(&plaintext, RECORD_NAME.as_bytes());
        let fingerprints: Vec<String> = self
            .trusted_fingerprints()?
            .iter()
            .map(ToString::to_string)
            .collect();
        Ok(json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": RECORD_NAME, "namespace": RECORDS_NAMESPACE},
            "data": {
                "trusted": fingerprints.join(","),
                "signing": self.signing_authority()?.fingerprint()?.to_string(),
                SEALED_FIELD: base64::engine::general_purpose::STANDARD.encode(sealed),
            }
        }))
    }

    pub fn from_object(
        object: &Value,
        key: &RootKey,
    ) -> Result<AuthorityRecord, AuthorityRecordError> {
        let sealed = object
            .get("data")
            .and_then(|d| d.get(SEALED_FIELD))
            .and_then(Value::as_str)
            .ok_or(AuthorityRecordError::Missing)?;
        let sealed = base64::engine::general_purpose::STANDARD.decode(sealed)?;
        let plaintext = key.open(&sealed, RECORD_NAME.as_bytes())?;
        Ok(serde_json::from_slice(&plaintext)?)
    }
}

/// The next step of a CA rotation from `record`, with the CA to add when one starts. A
/// rotation moves through three records, each written once every member caught up with the
/// previous one: trust both (old signs) → trust both (new signs) → trust only the new.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RotationStep {
    /// Add a new CA, still signing with the old.
    TrustNew,
    /// Sign with the newest CA.
    SignWithNew,
    /// Drop every CA but the newest.
    DropOld,
    /// One CA, signing: the rotation is complete.
    Done,
}

pub fn next_rotation_step(record: &AuthorityRecord, started: bool) -> RotationStep {
    let newest = record.authorities.len().saturating_sub(1);
    match (record.authorities.len(), record.signing == newest) {
        (0, _) => RotationStep::TrustNew,
        (1, _) if !started => RotationStep::TrustNew,
        (1, _) => RotationStep::Done,
        (_, false) => RotationStep::SignWithNew,
        (_, true) => RotationStep::DropOld,
    }
}

/// `record` after `step` (`new` is the CA a [`RotationStep::TrustNew`] adds).
pub fn apply_rotation_step(
    record: &AuthorityRecord,
    step: &RotationStep,
    new: Option<Authority>,
) -> AuthorityRecord {
    let mut next = record.clone();
    match step {
        RotationStep::TrustNew => {
            if let Some(new) = new {
                next.authorities.push(new);
            }
        }
        RotationStep::SignWithNew => next.signing = next.authorities.len().saturating_sub(1),
        RotationStep::DropOld => {
            let newest = next.authorities.len().saturating_sub(1);
            next.authorities = next.authorities.split_off(newest);
            next.signing = 0;
        }
        RotationStep::Done => {}
    }
    next
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;

    fn authority(name: &str) -> Authority {
        Authority::generate(name, SystemTime::now()).expect("CA")
    }

    #[test]
    fn the_record_is_sealed_in_its_config_map_and_opens_with_the_same_key_only() {
        let record = AuthorityRecord::new(authority("a"));
        let key = RootKey::generate();
        let object = record.to_object(&key).expect("seal");
        let text = serde_json::to_string(&object).expect("json");
        assert!(!text.contains("PRIVATE KEY"));
        assert!(!text.contains(&record.join_secret));
        assert_eq!(
            AuthorityRecord::from_object(&object, &key).expect("open"),
            record
        );
        assert!(AuthorityRecord::from_object(&object, &RootKey::generate()).is_err());
    }

    #[test]
    fn a_rotation_trusts_both_then_signs_with_the_new_then_drops_the_old() {
        let old = authority("old");
        let new = authority("new");
        let start = AuthorityRecord::new(old.clone());
        assert_eq!(next_rotation_step(&start, false), RotationStep::TrustNew);
        let both = apply_rotation_step(&start, &RotationStep::TrustNew, Some(new.clone()));
        assert_eq!(both.authorities, vec![old.clone(), new.clone()]);
        assert_eq!(both.signing_authority().expect("signing"), &old);
        assert_eq!(next_rotation_step(&both, true), RotationStep::SignWithNew);
        let signing_new = apply_rotation_step(&both, &RotationStep::SignWithNew, None);
        assert_eq!(signing_new.signing_authority().expect("signing"), &new);
        assert_eq!(
            next_rotation_step(&signing_new, true),
            RotationStep::DropOld
        );
        let done = apply_rotation_step(&signing_new, &RotationStep::DropOld, None);
        assert_eq!(done.authorities, vec![new.clone()]);
        assert_eq!(done.signing, 0);
        assert_eq!(next_rotation_step(&done, true), RotationStep::Done);
        assert_eq!(done.join_secret, start.join_secret);
    }
}
