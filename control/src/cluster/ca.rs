//! The cluster CA: made on the control plane's first start, kept in the
//! store (the certificate in clear, the private key sealed with the secrets
//! data key, so every replica shares it), and used to sign node
//! certificates and the control plane's own QUIC server certificate.

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest as _, Sha256};

use crate::secrets::{Keyring, SecretsError};
use crate::store::{Store, StoreError};

/// The name the control plane's QUIC certificate carries; nodes ask for it
/// whatever address they dial, since the pinned CA is what authenticates.
pub const SERVER_NAME: &str = "control.verge.internal";

const CERT_FACT: &str = "cluster_ca_cert";
const KEY_FACT: &str = "cluster_ca_key";

/// Why the CA could not be loaded or could not sign.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cluster CA: {0}")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Sealed(#[from] SecretsError),
    #[error("cluster CA: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("the node's certificate request is not valid: {0}")]
    BadCsr(rcgen::Error),
}

/// The CA's certificate and key.
pub struct ClusterCa {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    key: KeyPair,
    sha256: String,
}

impl std::fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClusterCa(sha256:{})", self.sha256)
    }
}

impl ClusterCa {
    /// The cluster's CA, made now when this is the cluster's first start
    /// (one replica wins a race; the others load the winner's).
    pub async fn load_or_create(store: &Store, keyring: &Keyring) -> Result<ClusterCa, CaError> {
        if store.cluster_fact(CERT_FACT).await?.is_none() {
            // The key first, claimed once; then the certificate made from
            // whichever key won, also claimed once. A replica that stopped
            // between the two leaves a key that the next start completes.
            let mine = KeyPair::generate()?;
            store
                .claim_once(
                    KEY_FACT,
                    &keyring.seal_fact(KEY_FACT, &mine.serialize_pem()),
                )
                .await?;
            let sealed = store.cluster_fact(KEY_FACT).await?.unwrap_or_default();
            let key = KeyPair::from_pem(&keyring.open_fact(KEY_FACT, &sealed)?.0)?;
            store
                .claim_once(CERT_FACT, &ca_params()?.self_signed(&key)?.pem())
                .await?;
        }
        let cert_pem = store
            .cluster_fact(CERT_FACT)
            .await?
            .ok_or(CaError::Cert(rcgen::Error::CouldNotParseCertificate))?;
        let sealed = store.cluster_fact(KEY_FACT).await?.unwrap_or_default();
        let (key_pem, stale) = keyring.open_fact(KEY_FACT, &sealed)?;
        if stale {
            store
                .update_cluster_fact(KEY_FACT, &keyring.seal_fact(KEY_FACT, &key_pem))
                .await?;
        }
        let key = KeyPair::from_pem(&key_pem)?;
        let cert_der = cert_from_pem(&cert_pem)
            .ok_or(CaError::Cert(rcgen::Error::CouldNotParseCertificate))?;
        Ok(ClusterCa {
            sha256: sha256_hex(&cert_der),
            cert_pem,
            cert_der,
            key,
        })
    }

    /// SHA-256 of the CA certificate's DER, hex: what join tokens pin.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    fn issuer(&self) -> Result<Issuer<'_, &KeyPair>, CaError> {
        Ok(Issuer::from_ca_cert_der(&self.cert_der, &self.key)?)
    }

    /// Signs a node's certificate for the key in its request. Only the key
    /// is taken from the request: the subject (the node ID) and the usage
    /// are the control plane's.
    pub fn sign_node(&self, csr_pem: &str, node_id: &str) -> Result<String, CaError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(CaError::BadCsr)?;
        let mut params = CertificateParams::new(vec![format!("{node_id}.nodes.verge.internal")])?;
        params.distinguished_name.push(DnType::CommonName, node_id);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.not_before = rcgen::date_time_ymd(2024, 1, 1);
        params.not_after = rcgen::date_time_ymd(2124, 1, 1);
        let cert = params.signed_by(&csr.public_key, &self.issuer()?)?;
        Ok(cert.pem())
    }

    /// A fresh certificate and key for the control plane's QUIC endpoint
    /// (made on every start; nodes trust it through the CA).
    pub fn server_identity(
        &self,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), CaError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![SERVER_NAME.to_string()])?;
        params
            .distinguished_name
            .push(DnType::CommonName, "Verge control plane");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let cert = params.signed_by(&key, &self.issuer()?)?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok((vec![cert.der().clone(), self.cert_der.clone()], key))
    }
}

/// What the cluster CA certificate says: a CA for node and server
/// certificates only (path length 0), valid for a century.
fn ca_params() -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, "Verge cluster CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2124, 1, 1);
    Ok(params)
}

/// The first certificate in PEM text.
pub fn cert_from_pem(pem: &str) -> Option<CertificateDer<'static>> {
    use rustls_pki_types::pem::PemObject as _;
    CertificateDer::from_pem_slice(pem.as_bytes()).ok()
}

/// SHA-256 of DER bytes, lower-case hex (certificate fingerprints).
pub fn sha256_hex(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}
