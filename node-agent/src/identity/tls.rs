//! rustls configurations for HBONE, built from the current workload certificates.
//!
//! A configuration is built once per certificate (and, for clients, per destination
//! identity) and reused until the certificate is renewed: the next handshake after a
//! renewal picks up the new one, while connections already open keep theirs, so a rotation
//! never breaks a connection.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use ambit_hbone::tls::{self, MeshRoots, TlsError, WorkloadKey};
use ambit_identity::Identity;

use super::{Certificates, WorkloadCert};

/// Why no TLS configuration could be made.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    /// The agent holds no certificate for the identity (yet).
    #[error("no certificate for {0} yet")]
    NoCertificate(Identity),
    /// The certificate or key held cannot be used.
    #[error("the certificate of {identity} cannot be used: {source}")]
    Material {
        /// Whose.
        identity: Identity,
        /// What is wrong.
        #[source]
        source: TlsError,
    },
}

/// A configuration and the serial of the certificate it was built from.
type Cached<C> = (String, Arc<C>);

/// Cached TLS configurations, keyed by identity (and destination identity for clients).
///
/// Read-mostly: a connection finds its configuration under a shared read lock; a missing
/// or outdated one (a new identity, a renewed certificate) is built with no lock held
/// (parsing the key and roots takes milliseconds) and then stored, so one rebuild never
/// stalls the handshakes of other workloads.
#[derive(Debug)]
pub struct TlsConfigs {
    certs: Arc<Certificates>,
    servers: RwLock<HashMap<Identity, Cached<rustls::ServerConfig>>>,
    clients: RwLock<HashMap<Identity, HashMap<Identity, Cached<rustls::ClientConfig>>>>,
}

impl TlsConfigs {
    /// Configurations from the certificates in `certs`.
    pub fn new(certs: Arc<Certificates>) -> Self {
        Self {
            certs,
            servers: RwLock::default(),
            clients: RwLock::default(),
        }
    }

    /// The server side for a local workload's `identity`: requires clients of its trust
    /// domain chaining to the mesh root.
    pub fn server(&self, identity: &Identity) -> Result<Arc<rustls::ServerConfig>, TlsConfigError> {
        let cert = self.cert(identity)?;
        if let Some((serial, c)) = read(&self.servers).get(identity)
            && *serial == cert.serial
        {
            return Ok(c.clone());
        }
        let material = |source| TlsConfigError::Material {
            identity: identity.clone(),
            source,
        };
        let (key, roots) = keys(&cert).map_err(material)?;
        let config = tls::server_config(&key, &roots, identity.trust_domain()).map_err(material)?;
        let mut cache = write(&self.servers);
        // Renewed again while this one was built: keep the newer entry (this connection
        // still uses the configuration of the certificate it looked up).
        if !self.is_current(identity, &cert.serial) {
            return Ok(config);
        }
        // Bounded: entries for identities no longer held are dropped on the way.
        cache.retain(|id, _| self.certs.get(id).is_some());
        cache.insert(identity.clone(), (cert.serial.clone(), config.clone()));
        Ok(config)
    }

    /// The client side for a local workload's `identity` dialing a workload that must
    /// present `peer`.
    pub fn client(
        &self,
        identity: &Identity,
        peer: &Identity,
    ) -> Result<Arc<rustls::ClientConfig>, TlsConfigError> {
        let cert = self.cert(identity)?;
        if let Some((serial, c)) = read(&self.clients).get(identity).and_then(|m| m.get(peer))
            && *serial == cert.serial
        {
            return Ok(c.clone());
        }
        let material = |source| TlsConfigError::Material {
            identity: identity.clone(),
            source,
        };
        let (key, roots) = keys(&cert).map_err(material)?;
        let config = tls::client_config(&key, &roots, [peer.clone()]).map_err(material)?;
        let mut cache = write(&self.clients);
        if !self.is_current(identity, &cert.serial) {
            return Ok(config);
        }
        cache.retain(|id, _| self.certs.get(id).is_some());
        let mine = cache.entry(identity.clone()).or_default();
        // A renewed certificate outdates every peer's configuration of this identity.
        mine.retain(|_, (serial, _)| *serial == cert.serial);
        mine.insert(peer.clone(), (cert.serial.clone(), config.clone()));
        Ok(config)
    }

    /// How many configurations are cached (servers, clients).
    pub fn cached(&self) -> (usize, usize) {
        (
            read(&self.servers).len(),
            read(&self.clients).values().map(HashMap::len).sum(),
        )
    }

    /// Whether `serial` is still the certificate held for `identity`.
    fn is_current(&self, identity: &Identity, serial: &str) -> bool {
        self.certs.get(identity).is_some_and(|c| c.serial == serial)
    }

    fn cert(&self, identity: &Identity) -> Result<Arc<WorkloadCert>, TlsConfigError> {
        self.certs
            .get(identity)
            .ok_or_else(|| TlsConfigError::NoCertificate(identity.clone()))
    }
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|e| e.into_inner())
}

/// The workload key and the mesh root (the last certificate of the CA's chain).
fn keys(cert: &WorkloadCert) -> Result<(WorkloadKey, MeshRoots), TlsError> {
    let key = WorkloadKey::from_pem(&cert.chain_pem, &cert.key_pem)?;
    let root = cert.chain_pem.last().ok_or(TlsError::NoCertificate)?;
    let roots = MeshRoots::from_pem(root)?;
    Ok((key, roots))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};

    fn root() -> (Issuer<'static, KeyPair>, String) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let pem = p.self_signed(&key).unwrap().pem();
        (Issuer::from_ca_cert_pem(&pem, key).unwrap(), pem)
    }

    fn issue(ca: &(Issuer<'static, KeyPair>, String), id: &Identity, serial: &str) -> WorkloadCert {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![SanType::URI(id.as_str().try_into().unwrap())];
        let leaf = p.signed_by(&key, &ca.0).unwrap();
        WorkloadCert {
            identity: id.clone(),
            serial: serial.into(),
            not_before: 0,
            not_after: u64::MAX,
            received: 0,
            key_pem: key.serialize_pem(),
            chain_pem: vec![leaf.pem(), ca.1.clone()],
        }
    }

    #[test]
    fn configurations_are_cached_per_certificate_and_rebuilt_on_renewal() {
        let ca = root();
        let me = Identity::parse("spiffe://td/ns/a/sa/me").unwrap();
        let peer = Identity::parse("spiffe://td/ns/b/sa/peer").unwrap();
        let certs = Arc::new(Certificates::default());
        let tls = TlsConfigs::new(certs.clone());
        assert!(matches!(
            tls.server(&me),
            Err(TlsConfigError::NoCertificate(_))
        ));

        certs.insert(issue(&ca, &me, "01"));
        let (s1, c1) = (tls.server(&me).unwrap(), tls.client(&me, &peer).unwrap());
        // Same certificate: the very same configurations.
        assert!(Arc::ptr_eq(&s1, &tls.server(&me).unwrap()));
        assert!(Arc::ptr_eq(&c1, &tls.client(&me, &peer).unwrap()));
        // Renewed: new configurations; the old ones stay valid for whoever holds them.
        certs.insert(issue(&ca, &me, "02"));
        assert!(!Arc::ptr_eq(&s1, &tls.server(&me).unwrap()));
        assert!(!Arc::ptr_eq(&c1, &tls.client(&me, &peer).unwrap()));
        assert_eq!(tls.cached(), (1, 1));
        // An identity no longer held: its entries go on the next build.
        let other = Identity::parse("spiffe://td/ns/a/sa/other").unwrap();
        certs.insert(issue(&ca, &other, "03"));
        certs.retain(|id| *id == other);
        tls.client(&other, &peer).unwrap();
        tls.server(&other).unwrap();
        assert_eq!(tls.cached(), (1, 1));
        // Broken material is an error naming whose.
        let mut bad = issue(&ca, &me, "04");
        bad.key_pem = "not a key".into();
        certs.insert(bad);
        let e = tls.server(&me).unwrap_err().to_string();
        assert!(e.contains("spiffe://td/ns/a/sa/me"), "{e}");
    }

    /// Handshakes on several workers while the certificate is renewed: every call gets a
    /// configuration, and once renewals stop, all of them agree on the latest one.
    #[test]
    fn concurrent_lookups_during_renewals_converge_on_the_latest_certificate() {
        let ca = root();
        let me = Identity::parse("spiffe://td/ns/a/sa/me").unwrap();
        let peers: Vec<Identity> = (0..4)
            .map(|i| Identity::parse(&format!("spiffe://td/ns/b/sa/p{i}")).unwrap())
            .collect();
        let certs = Arc::new(Certificates::default());
        let tls = TlsConfigs::new(certs.clone());
        let renewed: Vec<WorkloadCert> = (1..=5)
            .map(|n| issue(&ca, &me, &format!("{n:02}")))
            .collect();
        certs.insert(renewed[0].clone());
        let done = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            for t in 0..3 {
                let (tls, peers, done, me) = (&tls, &peers, &done, &me);
                s.spawn(move || {
                    let mut i = 0;
                    while !done.load(std::sync::atomic::Ordering::Relaxed) || i < 20 {
                        tls.server(me).unwrap();
                        tls.client(me, &peers[(t + i) % peers.len()]).unwrap();
                        i += 1;
                    }
                });
            }
            for c in &renewed[1..] {
                std::thread::sleep(std::time::Duration::from_millis(5));
                certs.insert(c.clone());
            }
            done.store(true, std::sync::atomic::Ordering::Relaxed);
        });
        let latest = tls.server(&me).unwrap();
        assert!(Arc::ptr_eq(&latest, &tls.server(&me).unwrap()));
        for p in &peers {
            let c = tls.client(&me, p).unwrap();
            assert!(Arc::ptr_eq(&c, &tls.client(&me, p).unwrap()));
        }
        assert_eq!(tls.cached(), (1, peers.len()));
        // And every cached configuration is the latest certificate's.
        let latest_serial = &renewed.last().unwrap().serial;
        assert_eq!(&read(&tls.servers)[&me].0, latest_serial);
        for p in &peers {
            assert_eq!(&read(&tls.clients)[&me][p].0, latest_serial);
        }
    }
}
