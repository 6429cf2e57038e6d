//! Test PKI: root CAs and workload certificates made the way Ambit's CA makes them.
#![allow(dead_code)]

use ambit_hbone::tls::WorkloadKey;
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

pub struct Ca {
    pub issuer: Issuer<'static, KeyPair>,
    pub pem: String,
}

/// A root CA named `name` (two CAs with one name: an impostor root).
pub fn ca_named(name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(rcgen::DnType::CommonName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = p.self_signed(&key).unwrap();
    let pem = cert.pem();
    Ca {
        issuer: Issuer::from_ca_cert_pem(&pem, key).unwrap(),
        pem,
    }
}

pub const ROOT_NAME: &str = "Ambit root CA";

pub fn ca() -> Ca {
    ca_named(ROOT_NAME)
}

/// A workload certificate as Ambit's CA makes them.
pub fn leaf(ca: &Ca, id: &str) -> WorkloadKey {
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
    WorkloadKey::from_pem(&[cert.pem(), ca.pem.clone()], &key.serialize_pem()).unwrap()
}

pub const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
pub const FRONTEND: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
