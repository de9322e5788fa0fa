//! A grant bundle: the JSON `sluice grant issue` (and `POST /v1/grants`) returns, read
//! by `sluice tunnel --grant FILE`: the key (unless the device brought its own), the
//! certificate, the user (the device id), the server, its host keys and the forwards.

use serde::Deserialize;

use super::spec::Forward;
use super::{KeySource, TunnelError};

#[derive(Deserialize)]
struct Issued {
    grant: Grant,
    private_key: Option<String>,
    certificate: String,
    tunnel: Tunnel,
}

#[derive(Deserialize)]
struct Grant {
    id: String,
    device: String,
}

#[derive(Deserialize)]
struct Tunnel {
    server: String,
    host_keys: Vec<String>,
    forwards: Vec<String>,
}

/// What a grant bundle says.
#[derive(Debug, Clone)]
pub struct Bundle {
    /// The grant id (`g-...`), for messages.
    pub id: String,
    /// The SSH user: the device id.
    pub user: String,
    /// `HOST:PORT` to dial.
    pub server: String,
    /// Host key fingerprints to accept.
    pub host_keys: Vec<String>,
    /// The `-R` forwards.
    pub forwards: Vec<Forward>,
    /// The key with its certificate, or the certificate alone (the device keeps its own key:
    /// give it with `-i`).
    pub key: BundleKey,
}

/// The bundle's key material.
#[derive(Debug, Clone)]
pub enum BundleKey {
    /// sluice made the key: both are here.
    Both(KeySource),
    /// The device brought its own public key: only the certificate is here.
    CertificateOnly(String),
}

impl Bundle {
    /// Parses bundle text; `from` names it in errors.
    pub fn parse(text: &str, from: &str) -> Result<Bundle, TunnelError> {
        let bad = |m: String| TunnelError::Config(format!("{from}: {m}"));
        let de = &mut serde_json::Deserializer::from_str(text);
        let i: Issued = serde_path_to_error::deserialize(de).map_err(|e| {
            bad(format!(
                "not a grant bundle ({} at {}): save what `sluice grant issue` printed",
                e.inner(),
                e.path()
            ))
        })?;
        if i.tunnel.host_keys.is_empty() {
            return Err(bad("tunnel.host_keys is empty".into()));
        }
        let forwards = i
            .tunnel
            .forwards
            .iter()
            .map(|f| Forward::remote(f).map_err(|e| bad(format!("tunnel.forwards: {e}"))))
            .collect::<Result<Vec<_>, _>>()?;
        let key = match i.private_key {
            Some(k) => BundleKey::Both(KeySource::WithCertificate {
                key: k,
                certificate: i.certificate,
                from: format!("{from} (grant {})", i.grant.id),
            }),
            None => BundleKey::CertificateOnly(i.certificate),
        };
        Ok(Bundle {
            id: i.grant.id,
            user: i.grant.device,
            server: i.tunnel.server,
            host_keys: i.tunnel.host_keys,
            forwards,
            key,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundles_parse_and_mistakes_name_the_field() {
        let text = r#"{"grant":{"id":"g-1","device":"cam-7","port":2201},"private_key":null,
            "certificate":"ssh-ed25519-cert-v01@openssh.com AAAA","ssh_command":"","ssh_config":"",
            "tunnel":{"server":"sluice.example.org:443","host_keys":["SHA256:x"],
            "forwards":["2201:localhost:22","cam-7:22:localhost:22"]}}"#;
        let b = Bundle::parse(text, "g.json").unwrap();
        assert_eq!(b.user, "cam-7");
        assert_eq!(b.server, "sluice.example.org:443");
        assert_eq!(b.forwards.len(), 2);
        assert!(matches!(b.key, BundleKey::CertificateOnly(_)));
        let e = Bundle::parse(&text.replace("\"server\"", "\"srv\""), "g.json")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("g.json: not a grant bundle") && e.contains("tunnel"),
            "{e}"
        );
        let e = Bundle::parse(&text.replace("2201:localhost:22", "x"), "g.json")
            .unwrap_err()
            .to_string();
        assert!(e.contains("tunnel.forwards: -R x"), "{e}");
    }
}
