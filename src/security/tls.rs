//! The TLS device listener's setup (rustls with the ring provider, no
//! OpenSSL): certificates from PEM files, client-certificate verification
//! for `mtls`, and the subject CN a device certificate binds to.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_rustls::TlsAcceptor;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

use crate::config::{AuthMode, TlsConfig};
use crate::ops::metrics::HandshakeError;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {message}")]
    Read {
        what: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error("{what} {path} holds no PEM certificate")]
    NoCertificate { what: &'static str, path: PathBuf },
    #[error("the TLS certificate and key do not make a usable server identity: {0}")]
    Identity(rustls::Error),
    #[error("the client CA file {path} cannot be used: {message}")]
    ClientCa { path: PathBuf, message: String },
}

/// Builds the acceptor for `tls.address`; in `mtls` mode it requires a
/// client certificate signed by `tls.client_ca_file`.
/// The TLS listener's acceptor, replaced in place by a reload (SIGHUP): a
/// handshake uses the one current when it starts, so connections already
/// open keep theirs.
pub struct Acceptor(std::sync::RwLock<TlsAcceptor>);

impl Acceptor {
    pub fn new(acceptor: TlsAcceptor) -> Acceptor {
        Acceptor(std::sync::RwLock::new(acceptor))
    }

    pub fn current(&self) -> TlsAcceptor {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn replace(&self, acceptor: TlsAcceptor) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = acceptor;
    }
}

pub fn acceptor(cfg: &TlsConfig, mode: AuthMode) -> Result<TlsAcceptor, TlsError> {
    let (Some(cert_file), Some(key_file)) = (&cfg.cert_file, &cfg.key_file) else {
        unreachable!("config requires tls.cert_file and tls.key_file with tls.address");
    };
    let chain = certificates(cert_file, "TLS certificate file")?;
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| TlsError::Read {
        what: "TLS key file",
        path: key_file.clone(),
        message: e.to_string(),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Identity)?;
    let builder = match (mode, &cfg.client_ca_file) {
        (AuthMode::Mtls, Some(ca_file)) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates(ca_file, "client CA file")? {
                roots.add(cert).map_err(|e| TlsError::ClientCa {
                    path: ca_file.clone(),
                    message: e.to_string(),
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| TlsError::ClientCa {
                    path: ca_file.clone(),
                    message: e.to_string(),
                })?;
            builder.with_client_cert_verifier(verifier)
        }
        _ => builder.with_no_client_auth(),
    };
    let config = builder
        .with_single_cert(chain, key)
        .map_err(TlsError::Identity)?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

fn certificates(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read_err = |e: rustls::pki_types::pem::Error| TlsError::Read {
        what,
        path: path.to_owned(),
        message: e.to_string(),
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(read_err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(read_err)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            what,
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// Sorts a failed handshake into a metrics reason.
pub fn classify(e: &std::io::Error) -> HandshakeError {
    use rustls::Error as E;
    match e.get_ref().and_then(|inner| inner.downcast_ref::<E>()) {
        Some(E::InvalidMessage(_) | E::InappropriateMessage { .. }) => HandshakeError::NotTls,
        Some(E::NoCertificatesPresented) => HandshakeError::NoCertificate,
        Some(E::InvalidCertificate(_)) => HandshakeError::BadCertificate,
        _ => HandshakeError::Other,
    }
}

/// The first Common Name of a certificate's subject, if it is a string.
///
/// A few lines of DER walking instead of an X.509 crate: by the time this
/// runs, webpki has verified the certificate, and only one field is needed.
pub fn subject_common_name(cert_der: &[u8]) -> Option<String> {
    const SEQUENCE: u8 = 0x30;
    const SET: u8 = 0x31;
    const OID: u8 = 0x06;
    const VERSION: u8 = 0xa0; // [0] EXPLICIT
    const CN: &[u8] = &[0x55, 0x04, 0x03]; // 2.5.4.3

    let (cert, _) = expect(cert_der, SEQUENCE)?;
    let (tbs, _) = expect(cert, SEQUENCE)?;
    let mut rest = tbs;
    if rest.first() == Some(&VERSION) {
        rest = der(rest)?.2;
    }
    // serialNumber, signature, issuer, validity, then subject.
    for _ in 0..4 {
        rest = der(rest)?.2;
    }
    let (mut rdns, _) = expect(rest, SEQUENCE)?;
    while !rdns.is_empty() {
        let (mut set, after) = expect(rdns, SET)?;
        rdns = after;
        while !set.is_empty() {
            let (attribute, after) = expect(set, SEQUENCE)?;
            set = after;
            let (oid, value) = expect(attribute, OID)?;
            if oid == CN {
                let (tag, text, _) = der(value)?;
                return match tag {
                    // UTF8String, PrintableString, IA5String
                    0x0c | 0x13 | 0x16 => std::str::from_utf8(text).ok().map(str::to_owned),
                    _ => None,
                };
            }
        }
    }
    None
}

/// One DER element: (tag, contents, what follows).
fn der(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let mut len = 0usize;
        for &b in &rest[..n] {
            len = len << 8 | usize::from(b);
        }
        rest = &rest[n..];
        len
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

fn expect(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (t, contents, rest) = der(input)?;
    (t == tag).then_some((contents, rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a minimal certificate-shaped DER with the given subject RDNs.
    fn cert_with_subject(rdns: &[(&[u8], u8, &str)]) -> Vec<u8> {
        fn tlv(tag: u8, body: &[u8]) -> Vec<u8> {
            let mut out = vec![tag];
            if body.len() < 128 {
                out.push(body.len() as u8);
            } else {
                out.push(0x82);
                out.extend_from_slice(&(body.len() as u16).to_be_bytes());
            }
            out.extend_from_slice(body);
            out
        }
        let mut subject = Vec::new();
        for (oid, string_tag, value) in rdns {
            let mut attr = tlv(0x06, oid);
            attr.extend(tlv(*string_tag, value.as_bytes()));
            subject.extend(tlv(0x31, &tlv(0x30, &attr)));
        }
        let mut tbs = tlv(0xa0, &tlv(0x02, &[2]));
        tbs.extend(tlv(0x02, &[1, 2, 3]));
        tbs.extend(tlv(0x30, &tlv(0x06, &[0x2a, 0x86, 0x48])));
        tbs.extend(tlv(0x30, &[]));
        tbs.extend(tlv(0x30, &[0; 200])); // a long validity, for long-form lengths
        tbs.extend(tlv(0x30, &subject));
        tlv(0x30, &tlv(0x30, &tbs))
    }

    #[test]
    fn common_name_is_the_first_cn_of_the_subject() {
        let o: &[u8] = &[0x55, 0x04, 0x0a];
        let cn: &[u8] = &[0x55, 0x04, 0x03];
        let der = cert_with_subject(&[(o, 0x0c, "acme"), (cn, 0x0c, "dev-42"), (cn, 0x13, "x")]);
        assert_eq!(subject_common_name(&der).as_deref(), Some("dev-42"));
        let printable = cert_with_subject(&[(cn, 0x13, "dev-7")]);
        assert_eq!(subject_common_name(&printable).as_deref(), Some("dev-7"));
        assert_eq!(
            subject_common_name(&cert_with_subject(&[(o, 0x0c, "acme")])),
            None
        );
        // A BMPString CN is not read as text.
        assert_eq!(
            subject_common_name(&cert_with_subject(&[(cn, 0x1e, "ab")])),
            None
        );
    }

    proptest::proptest! {
        // A failing case is printed, not saved beside the sources.
        #![proptest_config(proptest::prelude::ProptestConfig { failure_persistence: None, ..Default::default() })]
        /// Damaged certificates and random bytes never panic the reader.
        #[test]
        fn common_name_reader_is_total(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400),
            edits in proptest::collection::vec((proptest::prelude::any::<usize>(), proptest::prelude::any::<u8>()), 1..6),
        ) {
            let _ = subject_common_name(&bytes);
            let cn: &[u8] = &[0x55, 0x04, 0x03];
            let mut der = cert_with_subject(&[(cn, 0x0c, "dev-42")]);
            for (at, byte) in edits {
                let at = at % der.len();
                der[at] = byte;
            }
            let _ = subject_common_name(&der);
        }
    }

    #[test]
    fn truncated_or_garbage_der_gives_none() {
        let cn: &[u8] = &[0x55, 0x04, 0x03];
        let der = cert_with_subject(&[(cn, 0x0c, "dev-42")]);
        for cut in 0..der.len() {
            // Every prefix is either unreadable or (never) a different name.
            let got = subject_common_name(&der[..cut]);
            assert!(got.is_none(), "prefix {cut} gave {got:?}");
        }
        assert_eq!(subject_common_name(&[0xff; 64]), None);
        assert_eq!(subject_common_name(&[]), None);
    }
}
