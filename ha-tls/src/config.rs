//! TLS 1.3 configuration with mutual authentication against the cluster CA.
//!
//! Both ends present a node certificate. A certificate is accepted only if it
//! is signed directly by the cluster CA (checked by rustls' WebPKI verifiers;
//! the project issues no intermediates, so a chain that carries one is refused:
//! WebPKI does not enforce the CA's `pathlen:0`), is valid now, and names a
//! configured member as `node-<id>` ([`crate::certs::node_dns_name`]). A client
//! dials a peer under that peer's `node-<id>` name, so the server proves the
//! expected identity. There is no way to turn TLS off.
//!
//! Session resumption is off on both sides (no tickets, no session cache, no
//! stored sessions): a resumed TLS 1.3 handshake restores the stored peer chain
//! without running the verifiers, so a certificate that expired (or a node
//! removed from the members) would keep reconnecting. Every connection runs
//! the full handshake and the checks above at the current time of the
//! configuration's [`Clock`].
//!
//! The crypto provider is always passed explicitly (rustls' ring provider); the
//! process-wide default is never used or installed.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;

use ha_core::message::WIRE_VERSION;
use ha_core::types::NodeId;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{Resumption, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::time_provider::{DefaultTimeProvider, TimeProvider};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, RootCertStore,
    SignatureScheme,
};

use crate::certs::{node_id_of, CertError, Identity};

/// The ALPN protocol id naming the wire version: `ha-repl/<WIRE_VERSION>`.
pub fn alpn() -> Vec<u8> {
    format!("ha-repl/{WIRE_VERSION}").into_bytes()
}

/// The crypto provider every configuration uses: rustls' ring provider.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The configured cluster members: the node ids a peer certificate may name.
pub type Members = Arc<BTreeSet<NodeId>>;

/// The clock certificates are checked against (the system clock in service;
/// tests move a [`crate::testkit::ManualClock`] along).
pub type Clock = Arc<dyn TimeProvider>;

/// The system clock.
pub fn system_clock() -> Clock {
    Arc::new(DefaultTimeProvider)
}

fn roots(ca: &CertificateDer<'static>) -> Result<Arc<RootCertStore>, String> {
    let mut roots = RootCertStore::empty();
    roots
        .add(ca.clone())
        .map_err(|e| format!("bad CA certificate: {e}"))?;
    Ok(Arc::new(roots))
}

fn other(why: String) -> Error {
    Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(
        IdentityError(why),
    ))))
}

/// Refuses a chain that carries intermediates: node certificates are signed
/// directly by the cluster CA.
fn no_intermediates(intermediates: &[CertificateDer<'_>]) -> Result<(), Error> {
    if intermediates.is_empty() {
        Ok(())
    } else {
        Err(other(format!(
            "the chain carries {} intermediate certificate(s); node certificates are signed directly by the cluster CA",
            intermediates.len()
        )))
    }
}

/// Checks that `chain` (leaf first) is one leaf signed by `ca` and valid at
/// `now` for client authentication; returns the verifier's reason on failure.
pub fn verify_chain(
    ca: &CertificateDer<'static>,
    chain: &[CertificateDer<'static>],
    now: UnixTime,
) -> Result<(), String> {
    let Some((leaf, rest)) = chain.split_first() else {
        return Err("empty certificate chain".into());
    };
    no_intermediates(rest).map_err(|e| e.to_string())?;
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(ca)?, crypto_provider())
        .build()
        .map_err(|e| e.to_string())?;
    verifier
        .verify_client_cert(leaf, rest, now)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// The handshake-signature checks of a member verifier: WebPKI's, unchanged
/// (only the certificate checks add the member rules).
macro_rules! delegate_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            self.inner.verify_tls12_signature(message, cert, dss)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            self.inner.verify_tls13_signature(message, cert, dss)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.inner.supported_verify_schemes()
        }
    };
}

/// The member a verified certificate names, or a rustls error refusing it.
fn member_of(cert: &CertificateDer<'_>, members: &Members) -> Result<NodeId, Error> {
    let node = node_id_of(cert).map_err(|e| other(e.to_string()))?;
    if !members.contains(&node) {
        return Err(other(format!("{node} is not a cluster member")));
    }
    Ok(node)
}

/// Why a certificate's identity was refused.
#[derive(Debug)]
pub struct IdentityError(pub String);

impl fmt::Display for IdentityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for IdentityError {}

/// Accepts client certificates signed directly by the cluster CA that name a
/// member.
#[derive(Debug)]
pub struct MemberClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    members: Members,
}

impl MemberClientVerifier {
    /// A verifier for the CA `ca` and the given members.
    pub fn new(ca: &CertificateDer<'static>, members: Members) -> Result<Self, CertError> {
        let inner = WebPkiClientVerifier::builder_with_provider(
            roots(ca).map_err(CertError::Tls)?,
            crypto_provider(),
        )
        .build()
        .map_err(|e| CertError::Tls(e.to_string()))?;
        Ok(MemberClientVerifier { inner, members })
    }
}

impl ClientCertVerifier for MemberClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        no_intermediates(intermediates)?;
        let ok = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        member_of(end_entity, &self.members)?;
        Ok(ok)
    }

    delegate_signatures!();

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn offer_client_auth(&self) -> bool {
        true
    }
}

/// Accepts server certificates signed directly by the cluster CA that carry
/// the dialed `node-<id>` name and name a member.
#[derive(Debug)]
pub struct MemberServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
    members: Members,
}

impl MemberServerVerifier {
    /// A verifier for the CA `ca` and the given members.
    pub fn new(ca: &CertificateDer<'static>, members: Members) -> Result<Self, CertError> {
        let inner = WebPkiServerVerifier::builder_with_provider(
            roots(ca).map_err(CertError::Tls)?,
            crypto_provider(),
        )
        .build()
        .map_err(|e| CertError::Tls(e.to_string()))?;
        Ok(MemberServerVerifier { inner, members })
    }
}

impl ServerCertVerifier for MemberServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        no_intermediates(intermediates)?;
        let ok = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        member_of(end_entity, &self.members)?;
        Ok(ok)
    }

    delegate_signatures!();
}

/// A TLS 1.3 server configuration requiring member client certificates, with the
/// ALPN [`alpn`], no session resumption, checking certificates at `clock`'s time.
pub fn server_config(
    identity: &Identity,
    members: Members,
    clock: Clock,
) -> Result<rustls::ServerConfig, CertError> {
    let verifier = Arc::new(MemberClientVerifier::new(&identity.ca, members)?);
    let mut cfg = rustls::ServerConfig::builder_with_details(crypto_provider(), clock)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| CertError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())
        .map_err(|e| CertError::Tls(e.to_string()))?;
    cfg.alpn_protocols = vec![alpn()];
    // No resumption: every handshake verifies the client's certificate anew.
    cfg.session_storage = Arc::new(NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    Ok(cfg)
}

/// A TLS 1.3 client configuration presenting the node certificate and requiring
/// member server certificates, with the ALPN [`alpn`], no session resumption,
/// checking certificates at `clock`'s time.
pub fn client_config(
    identity: &Identity,
    members: Members,
    clock: Clock,
) -> Result<rustls::ClientConfig, CertError> {
    let verifier = Arc::new(MemberServerVerifier::new(&identity.ca, members)?);
    let mut cfg = rustls::ClientConfig::builder_with_details(crypto_provider(), clock)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| CertError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(identity.chain.clone(), identity.key.clone_key())
        .map_err(|e| CertError::Tls(e.to_string()))?;
    cfg.alpn_protocols = vec![alpn()];
    // No resumption: every handshake verifies the server's certificate anew.
    cfg.resumption = Resumption::disabled();
    Ok(cfg)
}

/// The server name to dial `node` under.
pub fn server_name(node: NodeId) -> Result<ServerName<'static>, CertError> {
    ServerName::try_from(crate::certs::node_dns_name(node))
        .map_err(|e| CertError::Tls(format!("bad server name for {node}: {e}")))
}

/// The member a verified peer chain proves (its leaf's `node-<id>` name).
pub fn peer_node(chain: &[CertificateDer<'_>]) -> Result<NodeId, CertError> {
    let leaf = chain.first().ok_or_else(|| CertError::NoNodeId {
        what: "peer certificate".into(),
        reason: "no certificate presented".into(),
    })?;
    node_id_of(leaf)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn resumption_is_off_on_both_sides() {
        let ca = crate::certs::CertificateAuthority::generate("t", 1).unwrap();
        let cert = ca
            .issue(&crate::certs::NodeCertSpec::new(NodeId(1), 1))
            .unwrap();
        let id = Identity::from_pem(&ca.cert_pem(), &cert.cert_pem, &cert.key_pem).unwrap();
        let members: Members = Arc::new([NodeId(1)].into_iter().collect());
        let server = server_config(&id, members.clone(), system_clock()).unwrap();
        assert_eq!(server.send_tls13_tickets, 0);
        assert!(!server.session_storage.can_cache());
        let client = client_config(&id, members, system_clock()).unwrap();
        assert_eq!(
            format!("{:?}", client.resumption),
            format!("{:?}", Resumption::disabled())
        );
    }
}
