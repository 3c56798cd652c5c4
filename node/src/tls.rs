//! TLS for the node's QUIC connections to the control plane.
//!
//! - Joining: the node has no CA yet, only the CA's SHA-256 from the join
//!   token. [`PinnedCa`] accepts a server chain only if it contains a
//!   certificate with exactly that hash, and the server certificate is
//!   validly signed by it; otherwise the handshake fails before the node
//!   sends anything.
//! - Joined: the saved CA is the only root, and the node presents its own
//!   certificate (mutual TLS).

use std::sync::{Arc, Mutex};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{DigitallySignedStruct, Error as TlsError, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use sha2::{Digest as _, Sha256};
use verge_api::wire::{ALPN_JOIN, ALPN_NODE};

use crate::identity::Identity;

/// The name the control plane's certificate carries (see the control
/// plane's `cluster::ca::SERVER_NAME`).
pub const SERVER_NAME: &str = "control.verge.internal";

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Where [`PinnedCa`] leaves why it refused a server.
pub type Refusal = Arc<Mutex<Option<String>>>;

/// Accepts only a server whose chain includes the pinned CA.
#[derive(Debug)]
pub struct PinnedCa {
    sha256: String,
    provider: Arc<CryptoProvider>,
    /// Why the last check failed, for the operator (rustls reports only a code).
    pub failure: Refusal,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        let fail = |why: String| {
            *self.failure.lock().expect("not poisoned") = Some(why.clone());
            TlsError::General(why)
        };
        let Some(ca) = intermediates
            .iter()
            .find(|c| hex::encode(Sha256::digest(c.as_ref())) == self.sha256)
        else {
            return Err(fail(format!(
                "the control plane's CA does not match the join token: the token pins CA sha256 {}, \
                 the server presented none with that hash. Is --server the right cluster? \
                 Mint a token on that cluster with `verge nodes join-token`",
                self.sha256
            )));
        };
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(ca.clone().into_owned())
            .map_err(|e| fail(format!("the pinned CA certificate is not usable: {e}")))?;
        let verifier =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| fail(e.to_string()))?;
        verifier
            .verify_server_cert(end_entity, &[], server_name, ocsp, now)
            .map_err(|e| {
                fail(format!(
                    "the control plane's certificate is not signed by the pinned CA: {e}"
                ))
            })
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The QUIC client config of a join, and where a CA mismatch is explained.
pub fn join_config(ca_sha256: &str) -> Result<(quinn::ClientConfig, Refusal), String> {
    let failure = Arc::new(Mutex::new(None));
    let verifier = PinnedCa {
        sha256: ca_sha256.to_string(),
        provider: provider(),
        failure: failure.clone(),
    };
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN_JOIN.to_vec()];
    Ok((quic_client(tls)?, failure))
}

/// The QUIC client config of a joined node's sessions (mutual TLS).
pub fn session_config(id: &Identity) -> Result<quinn::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(id.ca.clone())
        .map_err(|e| format!("the saved cluster CA is not usable: {e}"))?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_client_auth_cert(vec![id.cert.clone()], id.key())
        .map_err(|e| format!("the saved node certificate is not usable: {e}"))?;
    tls.alpn_protocols = vec![ALPN_NODE.to_vec()];
    quic_client(tls)
}

/// Streams the control plane may open at once on a session.
const MAX_TUNNELS: u32 = 10_000;

fn quic_client(tls: rustls::ClientConfig) -> Result<quinn::ClientConfig, String> {
    let crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| e.to_string())?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        .keep_alive_interval(Some(std::time::Duration::from_secs(2)))
        .max_idle_timeout(Some(
            std::time::Duration::from_secs(10)
                .try_into()
                .expect("10s is a valid idle timeout"),
        ))
        // The control plane opens a stream on a session per client
        // connection it tunnels to an instance here (`crate::tunnel`).
        .max_concurrent_bidi_streams(MAX_TUNNELS.into());
    config.transport_config(Arc::new(transport));
    Ok(config)
}
