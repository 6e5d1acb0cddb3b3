use std::time::{Duration, SystemTime};

use super::*;
use crate::identity::Identity;
use crate::token::{new_secret, secrets_match, JoinToken};

#[test]
fn a_node_certificate_names_the_node_and_a_user_certificate_the_user() {
    let now = SystemTime::now();
    let authority = Authority::generate("test CA", now).expect("CA");
    let node = authority
        .issue(&Subject::Node("n1".into()), now, NODE_CERTIFICATE_LIFETIME)
        .expect("node certificate");
    let user = authority
        .issue(
            &Subject::User("alice".into()),
            now,
            USER_CERTIFICATE_LIFETIME,
        )
        .expect("user certificate");
    let node_der = certificate_from_pem(&node.cert_pem).expect("node PEM");
    let user_der = certificate_from_pem(&user.cert_pem).expect("user PEM");
    assert!(matches!(
        Identity::from_certificate(&node_der).expect("node identity"),
        Identity::Node { name, .. } if name == "n1"
    ));
    assert!(matches!(
        Identity::from_certificate(&user_der).expect("user identity"),
        Identity::User { name, .. } if name == "alice"
    ));
    assert_eq!(
        certificates_from_pem(&node.chain_pem).expect("chain").len(),
        2
    );
}

#[test]
fn a_certificate_expires_when_it_was_asked_to() {
    let now = SystemTime::now();
    let authority = Authority::generate("test CA", now).expect("CA");
    let issued = authority
        .issue_between(
            &Subject::User("old".into()),
            now - Duration::from_secs(7200),
            now - Duration::from_secs(3600),
        )
        .expect("expired certificate");
    let expiry = not_after(&certificate_from_pem(&issued.cert_pem).expect("PEM")).expect("expiry");
    assert!(expiry < now);
}

#[test]
fn a_join_token_round_trips_and_rejects_garbage() {
    let now = SystemTime::now();
    let authority = Authority::generate("test CA", now).expect("CA");
    let token = JoinToken {
        authority: authority.fingerprint().expect("fingerprint"),
        secret: new_secret(),
    };
    let parsed: JoinToken = token.to_string().parse().expect("parse");
    assert_eq!(parsed, token);
    for garbage in ["", "FLOTILLA-1-", "FLOTILLA-1-zz-abc", "SWMTKN-1-abc-def"] {
        assert!(garbage.parse::<JoinToken>().is_err(), "{garbage:?}");
    }
    assert!(secrets_match(&token.secret, &parsed.secret));
    assert!(!secrets_match(&token.secret, &new_secret()));
}
