//! Who a connection is: token keys, the revocation list and damping of
//! failing addresses (`auth`), and the TLS listener's configuration
//! (`tls`).

pub mod auth;
pub mod tls;
