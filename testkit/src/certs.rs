//! Test certificate authorities and leaf certificates (rcgen), written as PEM files, for
//! TLS and mTLS tests: a CA, server and client certificates it signs, expired ones, and a
//! second, unrelated CA.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
    SanType, date_time_ymd,
};

/// A certificate authority.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A leaf certificate and its key, as PEM.
#[derive(Debug, Clone)]
pub struct Leaf {
    /// The certificate (PEM).
    pub cert: String,
    /// The private key (PEM).
    pub key: String,
}

impl Leaf {
    /// Writes `NAME.crt` and `NAME.key` into `dir`; returns their paths.
    pub fn write(&self, dir: &Path, name: &str) -> std::io::Result<(PathBuf, PathBuf)> {
        let (c, k) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, &self.cert)?;
        std::fs::write(&k, &self.key)?;
        Ok((c, k))
    }
}

impl TestCa {
    /// A new self-signed CA named `name`.
    pub fn new(name: &str) -> TestCa {
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("key");
        TestCa {
            issuer: CertifiedIssuer::self_signed(p, key).expect("CA"),
        }
    }

    /// The CA certificate (PEM).
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// Writes the CA certificate to `dir/NAME.crt`.
    pub fn write(&self, dir: &Path, name: &str) -> std::io::Result<PathBuf> {
        let p = dir.join(format!("{name}.crt"));
        std::fs::write(&p, self.pem())?;
        Ok(p)
    }

    /// A certificate for `localhost` and 127.0.0.1 (server and client use), valid now, or
    /// expired since 2021 when `expired`. `cn` names it.
    pub fn leaf(&self, cn: &str, expired: bool) -> Leaf {
        let mut p = CertificateParams::new(vec!["localhost".to_string()]).expect("params");
        p.subject_alt_names
            .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        p.distinguished_name.push(DnType::CommonName, cn);
        if expired {
            p.not_before = date_time_ymd(2020, 1, 1);
            p.not_after = date_time_ymd(2021, 1, 1);
        }
        let key = KeyPair::generate().expect("key");
        let cert = p.signed_by(&key, &self.issuer).expect("sign");
        Leaf {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}
