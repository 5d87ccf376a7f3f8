//! TLS for QUIC: loading credentials, building rustls/quinn configurations, and
//! reading the authenticated identity (name and [`Role`]) of the other side.
//!
//! Every connection is mutual TLS 1.3 with ALPN [`crate::wire::ALPN`] and the
//! `ring` crypto provider, passed explicitly (never a process default). Trust is a
//! single private CA: `ca.pem` in the certificates directory.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::certs::CA_CERT;
use crate::wire::ALPN;

/// What a certificate's owner may do: recorded in the certificate's subject OU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A `dirsync-node`: may exchange indexes and files, and list.
    Node,
    /// A `dirsync-cli` user: may list, watch, and lock and unlock files (its own
    /// locks); never acts as a node.
    Client,
    /// A `dirsync-cli` user who may also break other users' locks
    /// (`unlock --force`).
    Admin,
}

impl Role {
    pub fn as_str(&self) -> &'static str {
        match self {
            Role::Node => "node",
            Role::Client => "client",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = TlsError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "node" => Ok(Role::Node),
            "client" => Ok(Role::Client),
            "admin" => Ok(Role::Admin),
            other => Err(TlsError::Identity(format!("unknown role {other:?}"))),
        }
    }
}

/// Who is on the other side of an authenticated connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub name: String,
    pub role: Role,
}

/// Errors loading credentials or reading identities.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {reason}. Make certificates with `just certs` (nodes a and b, client cli) or `dirsync-cli certs --out DIR --node NAME`, and point --certs at that directory")]
    Load { path: PathBuf, reason: String },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("TLS configuration: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("QUIC TLS configuration: {0}")]
    Quic(String),
    #[error("certificate identity: {0}")]
    Identity(String),
}

/// This party's certificate chain and key plus the CA it trusts.
#[derive(Debug)]
pub struct Credentials {
    pub ca: CertificateDer<'static>,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    /// The identity written in our own certificate.
    pub identity: Identity,
}

impl Clone for Credentials {
    fn clone(&self) -> Self {
        Credentials {
            ca: self.ca.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            identity: self.identity.clone(),
        }
    }
}

impl Credentials {
    /// Loads `ca.pem`, `NAME.pem` and `NAME.key` from `dir`.
    pub fn load(dir: &Path, name: &str) -> Result<Credentials, TlsError> {
        let ca_path = dir.join(CA_CERT);
        let cert_path = dir.join(format!("{name}.pem"));
        let key_path = dir.join(format!("{name}.key"));
        let load_err = |path: &Path, e: &dyn fmt::Display| TlsError::Load {
            path: path.to_path_buf(),
            reason: e.to_string(),
        };
        let ca = CertificateDer::from_pem_file(&ca_path).map_err(|e| load_err(&ca_path, &e))?;
        let chain = CertificateDer::pem_file_iter(&cert_path)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| load_err(&cert_path, &e))?;
        let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| load_err(&key_path, &e))?;
        let first = chain.first().ok_or_else(|| TlsError::Load {
            path: cert_path.clone(),
            reason: "no certificate in file".into(),
        })?;
        let identity = identity_of(first)?;
        if identity.name != name {
            return Err(TlsError::Identity(format!(
                "{} is issued to {:?}, not {name:?}",
                cert_path.display(),
                identity.name
            )));
        }
        Ok(Credentials {
            ca,
            chain,
            key,
            identity,
        })
    }

    fn roots(&self) -> Result<rustls::RootCertStore, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.clone())?;
        Ok(roots)
    }
}

/// ring, with AES-128-GCM preferred: every byte of a transfer is sealed and opened
/// once, and AES-128 takes 10 rounds per block where AES-256 takes 14 (both are
/// TLS 1.3 suites; the others stay available, after it).
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256;
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites
        .sort_by_key(|s| s.suite() != TLS13_AES_128_GCM_SHA256.suite());
    Arc::new(p)
}

/// QUIC transport settings shared by every connection: keep-alives so that an idle
/// peer session stays up, an idle timeout that notices a vanished peer, fewer
/// acknowledgements (see [`ACK_EVERY`]), and room for [`PEER_STREAMS`] streams.
fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_secs(3)));
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(Duration::from_secs(12)).expect("12 s is a valid timeout"),
    ));
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MAX_UDP_PAYLOAD);
    t.mtu_discovery_config(Some(mtu));
    let mut ack = quinn::AckFrequencyConfig::default();
    ack.ack_eliciting_threshold(quinn::VarInt::from_u32(ACK_EVERY));
    t.ack_frequency_config(Some(ack));
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(PEER_STREAMS));
    Arc::new(t)
}

/// The peer is asked (QUIC's ACK-frequency extension; both ends are quinn) to
/// acknowledge every ninth packet that needs it instead of every second one, or
/// after its usual short delay. During a bulk transfer each acknowledgement is a
/// datagram, a seal, a system call and a wake-up of the sender's connection
/// task; loss is still detected by packet number gaps as before. Measured on
/// `gen.py small` (both nodes, one process): 19% fewer `sendmsg`, 55% fewer
/// `recvmmsg`, 25% fewer context switches.
const ACK_EVERY: u32 = 8;

/// Bidirectional streams a peer may have open at once: every fetch in flight is
/// one (`PARALLEL_FETCHES` in `engine/apply.rs`) besides the index and control
/// streams; quinn's default of 100 would make a full window wait for credit.
const PEER_STREAMS: u32 = 256;

/// The largest UDP payload we probe for and accept. MTU discovery starts from
/// QUIC's safe 1200 bytes and only moves up as far as the path carries probes, so
/// on an Ethernet path this changes nothing, while loopback and jumbo-frame links
/// carry a file in a third of the packets (each packet costs a seal, an open and
/// its share of a system call on both sides). Measured on loopback (gen.py large):
/// 4096 needs 265k datagrams for 1 GiB where 1452 needs 757k; from 8192 up, bursts
/// of lost datagrams made quinn's black-hole detection fall back to 1200 bytes for
/// a minute, so the bound stays well below that.
pub const MAX_UDP_PAYLOAD: u16 = 4096;

/// Endpoint settings: accept packets up to [`MAX_UDP_PAYLOAD`].
pub fn endpoint_config() -> quinn::EndpointConfig {
    let mut c = quinn::EndpointConfig::default();
    c.max_udp_payload_size(MAX_UDP_PAYLOAD)
        .expect("within QUIC's limits");
    c
}

/// Configuration for accepting connections: a client certificate chained to our CA
/// is required.
pub fn server_config(creds: &Credentials) -> Result<quinn::ServerConfig, TlsError> {
    let provider = provider();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(creds.roots()?),
        provider.clone(),
    )
    .build()?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(creds.chain.clone(), creds.key.clone_key())?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(cfg)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(quic));
    server.transport_config(transport());
    Ok(server)
}

/// Configuration for dialing: the server must present a certificate from our CA,
/// valid for the name we dial; we present ours.
pub fn client_config(creds: &Credentials) -> Result<quinn::ClientConfig, TlsError> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(creds.roots()?)
        .with_client_auth_cert(creds.chain.clone(), creds.key.clone_key())?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(cfg)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut client = quinn::ClientConfig::new(Arc::new(quic));
    client.transport_config(transport());
    Ok(client)
}

/// Reads name (subject CN) and role (subject OU) from a DER certificate.
pub fn identity_of(cert: &CertificateDer<'_>) -> Result<Identity, TlsError> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| TlsError::Identity(format!("unparsable certificate: {e}")))?;
    let subject = x509.subject();
    let name = subject
        .iter_common_name()
        .next()
        .and_then(|a| a.as_str().ok())
        .ok_or_else(|| TlsError::Identity("certificate has no common name".into()))?;
    let role = subject
        .iter_organizational_unit()
        .next()
        .and_then(|a| a.as_str().ok())
        .ok_or_else(|| {
            TlsError::Identity(format!(
                "certificate of {name:?} carries no dirsync role (subject OU)"
            ))
        })?
        .parse()?;
    Ok(Identity {
        name: name.to_string(),
        role,
    })
}

/// The authenticated identity of the other side of `conn`.
pub fn peer_identity(conn: &quinn::Connection) -> Result<Identity, TlsError> {
    let certs = conn
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or_else(|| TlsError::Identity("the peer presented no certificate".into()))?;
    let first = certs
        .first()
        .ok_or_else(|| TlsError::Identity("the peer presented no certificate".into()))?;
    identity_of(first)
}

/// Turns a QUIC connection error into a sentence a user can act on, recognising
/// the TLS alerts a refused certificate produces.
pub fn explain_connection_error(e: &quinn::ConnectionError) -> String {
    use quinn::ConnectionError as E;
    let code = match e {
        E::ConnectionClosed(c) => Some(u64::from(c.error_code)),
        E::TransportError(t) => Some(u64::from(t.code)),
        _ => None,
    };
    // TLS alerts travel as QUIC CRYPTO_ERROR 0x100 + alert number.
    let alert = code
        .filter(|c| (0x100..0x200).contains(c))
        .map(|c| c - 0x100);
    match alert {
        Some(42 | 43 | 44 | 46 | 48 | 51) => format!(
            "the node refused our certificate ({e}): it was not signed by the node's CA; use certificates made by the same `dirsync-cli certs` run as the node's"
        ),
        Some(45) => format!("the node refused our certificate: it has expired ({e}); make new ones with `dirsync-cli certs --force`"),
        Some(116) => format!("the node requires a client certificate ({e})"),
        Some(120) => format!("the node does not speak this protocol version ({e}): ALPN {:?} not accepted", String::from_utf8_lossy(ALPN)),
        _ => match e {
            E::TimedOut => "timed out: no answer from the node (is it running, and is the address right?)".into(),
            E::ApplicationClosed(c) => format!(
                "the node closed the connection: {}",
                String::from_utf8_lossy(&c.reason)
            ),
            other => other.to_string(),
        },
    }
}
