//! Test PKI: the mesh's root (read from the control plane's CA directory), impostor roots,
//! and workload certificates made the way Ambit's CA makes them.

use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// A certificate authority: its signing key and its certificate.
pub struct Ca {
    /// Signs certificates as this CA.
    pub issuer: Issuer<'static, KeyPair>,
    /// The CA's certificate, PEM-encoded.
    pub pem: String,
}

/// The mesh's own root, read from the control plane's CA directory.
pub fn mesh_root(dir: &std::path::Path) -> Ca {
    let pem = std::fs::read_to_string(dir.join("root-cert.pem")).unwrap();
    let key = std::fs::read_to_string(dir.join("root-key.pem")).unwrap();
    Ca {
        issuer: Issuer::from_ca_cert_pem(&pem, KeyPair::from_pem(&key).unwrap()).unwrap(),
        pem,
    }
}

/// Another root with the same name as the mesh's.
pub fn impostor_root() -> Ca {
    root()
}

/// A fresh root CA, named like the mesh's (beside a running mesh: an impostor).
pub fn root() -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "Ambit root CA");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let pem = p.self_signed(&key).unwrap().pem();
    Ca {
        issuer: Issuer::from_ca_cert_pem(&pem, key).unwrap(),
        pem,
    }
}

/// (chain PEMs, key PEM) for `id`, as Ambit's CA issues them.
pub fn leaf(ca: &Ca, id: &str) -> (Vec<String>, String) {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.is_ca = IsCa::ExplicitNoCa;
    let cert = p.signed_by(&key, &ca.issuer).unwrap();
    (vec![cert.pem(), ca.pem.clone()], key.serialize_pem())
}
