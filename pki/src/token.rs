//! Join tokens, as Swarm's: `FLOTILLA-1-<sha-256 of the CA certificate>-<secret>`. The joining
//! node checks the cluster's CA against the fingerprint before it sends anything; the cluster
//! checks the secret.

use std::fmt;
use std::str::FromStr;

use rand::Rng;

use crate::authority::PkiError;
use crate::identity::Fingerprint;

const PREFIX: &str = "FLOTILLA-1-";
const SECRET_LENGTH: usize = 32;
const SECRET_ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";

#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    pub authority: Fingerprint,
    pub secret: String,
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("authority", &self.authority)
            .finish_non_exhaustive()
    }
}

/// A new random secret for join tokens.
pub fn new_secret() -> String {
    let mut rng = rand::rng();
    (0..SECRET_LENGTH)
        .map(|_| SECRET_ALPHABET[rng.random_range(0..SECRET_ALPHABET.len())] as char)
        .collect()
}

/// Compares two secrets in time that depends only on their lengths.
pub fn secrets_match(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |difference, (x, y)| difference | (x ^ y))
            == 0
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}{}-{}", self.authority.hex(), self.secret)
    }
}

impl FromStr for JoinToken {
    type Err = PkiError;

    fn from_str(text: &str) -> Result<JoinToken, PkiError> {
        let malformed = || {
            PkiError::Token(format!(
                "malformed join token (expected {PREFIX}<64 hex digits>-<secret>, as `flotilla cluster join-token` prints)"
            ))
        };
        let rest = text.trim().strip_prefix(PREFIX).ok_or_else(malformed)?;
        let (fingerprint, secret) = rest.split_once('-').ok_or_else(malformed)?;
        let authority = Fingerprint::from_hex(fingerprint).ok_or_else(malformed)?;
        if secret.len() != SECRET_LENGTH || !secret.bytes().all(|b| SECRET_ALPHABET.contains(&b)) {
            return Err(malformed());
        }
        Ok(JoinToken {
            authority,
            secret: secret.to_string(),
        })
    }
}
