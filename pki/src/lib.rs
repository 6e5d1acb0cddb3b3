//! The cluster's public-key infrastructure: its certificate authority, the certificates of
//! nodes and users, join tokens, and the mutual-TLS transport every gRPC connection uses.
//!
//! Pure where it can be: issuing takes `now`, parsing and verification take bytes. The only IO
//! is in [`transport`] (TLS handshakes on sockets).

pub mod authority;
pub mod credentials;
pub mod files;
pub mod identity;
pub mod tls;
pub mod token;
pub mod transport;

pub use authority::{Authority, Issued, PkiError, Subject};
pub use credentials::CredentialsFile;
pub use identity::{Fingerprint, Identity, PeerInfo};
pub use tls::{Credentials, TlsState};
pub use token::JoinToken;
