//! Who a connection is: token keys and the revocation list (`auth`),
//! damping of addresses that keep failing (`damping`), and the TLS
//! listener's configuration (`tls`).

pub mod auth;
pub mod damping;
pub mod tls;
