//! Config parsing and validation from strings.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use super::validate::expand_env;
use super::*;
use crate::proxy_protocol::ProxyVersion;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(
        text,
        Some(Path::new("/etc/sluice/sluice.toml")),
        Path::new("/etc/sluice"),
    )
}

fn err(text: &str) -> String {
    parse(text)
        .expect_err("config should be rejected")
        .to_string()
}

#[test]
fn interface_example_parses() {
    let c = parse(
        r#"
listen = ["127.0.0.1:8443", "[::1]:8443"]
[tls]
cert = "cert.pem"
key = "/abs/key.pem"
[detect]
timeout = "2s"
on_timeout = "ssh"
[routes.http]
upstream = "127.0.0.1:8080"
proxy_protocol = "v2"
[routes.ssh]
upstream = "127.0.0.1:22"
"#,
    )
    .unwrap();
    assert_eq!(c.listen.len(), 2);
    match &c.tls.cert {
        CertSource::Files { cert, key } => {
            assert_eq!(cert.path, Path::new("/etc/sluice/cert.pem"));
            assert_eq!(key.path, Path::new("/abs/key.pem"));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(c.detect.timeout, Duration::from_secs(2));
    assert_eq!(c.detect.on_timeout, Fallback::Route(RouteKind::Ssh));
    let up = c.http.upstream.as_ref().unwrap();
    assert_eq!(up.addr, "127.0.0.1:8080");
    assert_eq!(up.proxy_protocol, Some(ProxyVersion::V2));
    assert_eq!(c.ssh.upstream.as_ref().unwrap().proxy_protocol, None);
    assert_eq!(
        c.alpn_offered(),
        vec![b"http/1.1".to_vec(), b"ssh".to_vec()]
    );
}

#[test]
fn empty_file_is_the_embedded_default() {
    let c = parse("").unwrap();
    assert_eq!(
        c.listen,
        vec![DEFAULT_LISTEN.parse::<SocketAddr>().unwrap()]
    );
    assert!(matches!(c.tls.cert, CertSource::SelfSigned));
    assert!(c.http.upstream.is_none() && c.ssh.upstream.is_none());
    assert_eq!(c.detect.on_unknown, Fallback::Close);
}

#[test]
fn unknown_key_names_key_and_position() {
    let e = err("listen = [\"127.0.0.1:1\"]\nbogus_key = 1\n");
    assert!(e.starts_with("/etc/sluice/sluice.toml:2:1: "), "{e}");
    assert!(e.contains("bogus_key"), "{e}");
    let e = err("[routes.http]\nupstream = \"a:1\"\nupstrem = \"b:2\"\n");
    assert!(
        e.contains(":3:1: routes.http.upstrem: unknown field `upstrem`"),
        "{e}"
    );
}

#[test]
fn wrong_types_and_values_name_the_key() {
    let e = err("[detect]\ntimeout = 5\n");
    assert!(e.contains(":2:11: detect.timeout: "), "{e}");
    let e = err("[detect]\ntimeout = \"5 parsecs\"\n");
    assert!(e.contains("detect.timeout"), "{e}");
    let e = err("listen = [\"localhost:443\"]\n");
    assert!(
        e.contains(":1:11: listen: `localhost:443` is not an IP address"),
        "{e}"
    );
    let e = err("[detect]\non_timeout = \"ftp\"\n");
    assert!(
        e.contains(":2:14: detect.on_timeout: `ftp` is not a route"),
        "{e}"
    );
    let e = err("[routes.http]\nupstream = \"127.0.0.1\"\n");
    assert!(
        e.contains(":2:12: routes.http.upstream: `127.0.0.1` is not host:port"),
        "{e}"
    );
    let e = err("[routes.http]\nupstream = \"127.0.0.1:80\"\nproxy_protocol = \"v3\"\n");
    assert!(
        e.contains(":3:") && e.contains("routes.http.proxy_protocol"),
        "{e}"
    );
    let e = err("[routes.ssh]\nplaintext = \"redirect\"\n");
    assert!(
        e.contains(":2:13: routes.ssh.plaintext: \"redirect\" is for the http route only"),
        "{e}"
    );
    let e = err("[tls]\ncert = \"c.pem\"\n");
    assert!(e.contains("set both `cert` and `key`"), "{e}");
    let e = err("[routes.http]\nproxy_protocol = \"v2\"\n");
    assert!(
        e.contains("routes.http.proxy_protocol: only applies to an `upstream`"),
        "{e}"
    );
    let e = err("[routes.http]\nsni = [\"a.example\"]\n[routes.ssh]\nsni = [\"a.example\"]\n");
    assert!(e.contains("bound to both routes"), "{e}");
    let e = err("[limits]\nmax_connections = 0\n");
    assert!(
        e.contains("limits.max_connections: must be at least 1"),
        "{e}"
    );
    let e = err("[routes.http]\nh2 = true\n");
    assert!(e.contains("h2 needs an `upstream`"), "{e}");
}

#[test]
fn syntax_error_has_position() {
    let e = err("listen = [\"127.0.0.1:1\"\n[tls\n");
    assert!(e.starts_with("/etc/sluice/sluice.toml:"), "{e}");
}

#[test]
fn h2_and_custom_ssh_alpn() {
    let c = parse("[routes.http]\nupstream = \"127.0.0.1:80\"\nh2 = true\n[routes.ssh]\nalpn = [\"ssh\", \"x-ssh\"]\nsni = [\"SSH.Example.com.\"]\n").unwrap();
    assert_eq!(
        c.alpn_offered(),
        vec![
            b"h2".to_vec(),
            b"http/1.1".to_vec(),
            b"ssh".to_vec(),
            b"x-ssh".to_vec()
        ]
    );
    assert_eq!(c.ssh.sni, vec!["ssh.example.com".to_string()]);
}

#[test]
fn describe_lists_routes() {
    let c =
        parse("[routes.http]\nupstream = \"127.0.0.1:8080\"\nproxy_protocol = \"v1\"\n").unwrap();
    let d = c.describe();
    assert!(
        d.contains("route http    -> upstream 127.0.0.1:8080"),
        "{d}"
    );
    assert!(d.contains("PROXY v1"), "{d}");
    assert!(d.contains("route ssh     -> embedded SSH server"), "{d}");
}

#[test]
fn durations_are_bounded_and_located() {
    let e = err("[routes.ssh]\nupstream = \"a:1\"\nidle_timeout = \"0s\"\n");
    assert!(
        e.contains(":3:16: routes.ssh.idle_timeout: 0s is out of range"),
        "{e}"
    );
    let e = err("[routes.ssh]\nupstream = \"a:1\"\nconnect_timeout = \"500000000000y\"\n");
    assert!(e.contains("routes.ssh.connect_timeout"), "{e}");
    let e = err("[detect]\ntimeout = \"0s\"\n");
    assert!(
        e.contains(":2:11: detect.timeout: 0s is out of range"),
        "{e}"
    );
    let e = err("shutdown_grace = \"2days\"\n");
    assert!(
        e.contains(":1:18: shutdown_grace: 2days is out of range"),
        "{e}"
    );
    assert_eq!(
        parse("shutdown_grace = \"0s\"\n").unwrap().shutdown_grace,
        Duration::ZERO
    );
}

#[test]
fn duplicate_sni_names_are_refused() {
    let e = err("[[tls.sni]]\nnames = [\"a.test\"]\ncert = \"c\"\nkey = \"k\"\n[[tls.sni]]\nnames = [\"A.test\"]\ncert = \"c2\"\nkey = \"k2\"\n");
    assert!(
        e.contains(":6:") && e.contains("`a.test` is already listed"),
        "{e}"
    );
}

#[test]
fn client_certificate_requirements() {
    let e = err("[routes.ssh]\nrequire_client_cert = true\n");
    assert!(
        e.contains(":2:23: routes.ssh.require_client_cert: needs [tls] client_ca"),
        "{e}"
    );
    let e = err("[tls]\nclient_ca = \"ca.pem\"\n[routes.ssh]\nrequire_client_cert = true\nplaintext = \"accept\"\n");
    assert!(
        e.contains(
            "routes.ssh.plaintext: a route that requires client certificates takes no plaintext"
        ),
        "{e}"
    );
    let c =
        parse("[tls]\nclient_ca = \"ca.pem\"\n[routes.ssh]\nrequire_client_cert = true\n").unwrap();
    assert!(c.ssh.require_client_cert && c.ssh.plaintext == Plaintext::Reject);
    assert_eq!(
        c.tls.client_ca.unwrap().path,
        Path::new("/etc/sluice/ca.pem")
    );
}

#[test]
fn trusted_proxies_and_admin() {
    let c = parse(
        "trusted_proxies = [\"10.0.0.0/8\", \"fd00::/8\", \"192.0.2.7\"]\n[admin]\nlisten = \"127.0.0.1:9191\"\n",
    )
    .unwrap();
    assert_eq!(c.trusted_proxies.len(), 3);
    assert!(c.trusted_proxies[0].contains("10.1.2.3".parse().unwrap()));
    assert!(!c.trusted_proxies[0].contains("11.1.2.3".parse().unwrap()));
    assert_eq!(c.admin, Some("127.0.0.1:9191".parse().unwrap()));
    // An empty [admin] table turns it on at the default address; no table: off.
    let c = parse("[admin]\n").unwrap();
    assert_eq!(c.admin, Some(DEFAULT_ADMIN_LISTEN));
    assert_eq!(parse("").unwrap().admin, None);
    let e = err("trusted_proxies = [\"10.0.0.0/33\"]\n");
    assert!(
        e.contains(":1:") && e.contains("trusted_proxies") && e.contains("10.0.0.0/33"),
        "{e}"
    );
    let e = err("[admin]\nlisten = \"localhost:9090\"\n");
    assert!(e.contains(":2:") && e.contains("admin.listen"), "{e}");
    let e = err("[admin]\nport = 9090\n");
    assert!(e.contains("port"), "{e}");
}

#[test]
fn paths_expand_environment_variables() {
    let env = |v: &str| match v {
        "CREDENTIALS_DIRECTORY" => {
            Some(std::ffi::OsString::from("/run/credentials/sluice.service"))
        }
        "EMPTY" => Some(std::ffi::OsString::new()),
        _ => None,
    };
    assert_eq!(
        expand_env("${CREDENTIALS_DIRECTORY}/tls.key", env).unwrap(),
        "/run/credentials/sluice.service/tls.key"
    );
    assert_eq!(expand_env("/plain/path", env).unwrap(), "/plain/path");
    let e = expand_env("${STATE_DIRECTORY}/k", env).unwrap_err();
    assert!(
        e.contains("STATE_DIRECTORY") && e.contains("not set"),
        "{e}"
    );
    assert!(expand_env("${EMPTY}/k", env).is_err());
    assert!(expand_env("${CREDENTIALS_DIRECTORY/k", env).is_err());
    // Through the parser: the error names the key and where it stands.
    let e = err("[tls]\ncert = \"${SLUICE_TEST_SURELY_UNSET}/c.pem\"\nkey = \"k.pem\"\n");
    assert!(
        e.contains(":2:") && e.contains("tls.cert") && e.contains("SLUICE_TEST_SURELY_UNSET"),
        "{e}"
    );
}

#[test]
fn threads_is_bounded() {
    assert_eq!(parse("threads = 3\n").unwrap().threads, Some(3));
    assert_eq!(parse("").unwrap().threads, None);
    let e = err("threads = 0\n");
    assert!(e.contains(":1:") && e.contains("threads"), "{e}");
}

#[test]
fn tls_poll_interval_is_bounded() {
    let c = parse("[tls]\npoll_interval = \"30s\"\n").unwrap();
    assert_eq!(c.tls.poll_interval, Duration::from_secs(30));
    let e = err("[tls]\npoll_interval = \"1ms\"\n");
    assert!(e.contains(":2:") && e.contains("tls.poll_interval"), "{e}");
}

#[test]
fn ssh_settings_compare_by_meaning_not_position() {
    // A reload keeps the embedded SSH server when only comments or layout changed.
    let text = "[routes.ssh]\n[ssh]\nauthorized_keys = [\"/etc/sluice/keys\"]\n";
    let a = parse(text).unwrap();
    let b = parse(&format!("# a comment\n\n{text}")).unwrap();
    assert_eq!(a.embedded_ssh, b.embedded_ssh);
    let c = parse(&text.replace("/keys", "/other")).unwrap();
    assert_ne!(a.embedded_ssh, c.embedded_ssh);
}

#[test]
fn proxy_header_policy() {
    let c = parse("trusted_proxies = [\"10.0.3.17\"]\n").unwrap();
    assert_eq!(c.proxy_header, ProxyHeader::Required, "required by default");
    let c = parse("trusted_proxies = [\"10.0.3.17\"]\nproxy_header = \"optional\"\n").unwrap();
    assert_eq!(c.proxy_header, ProxyHeader::Optional);
    let e = err("trusted_proxies = [\"10.0.3.17\"]\nproxy_header = \"maybe\"\n");
    assert!(
        e.contains(":2:") && e.contains("proxy_header") && e.contains("`maybe`"),
        "{e}"
    );
    let e = err("proxy_header = \"optional\"\n");
    assert!(e.contains("trusted_proxies, which is not set"), "{e}");
}

#[test]
fn half_closed_timeout_per_route() {
    let c = parse(
        "[routes.http]\nupstream = \"a:1\"\nhalf_closed_timeout = \"5s\"\n[routes.ssh]\nupstream = \"b:2\"\n",
    )
    .unwrap();
    assert_eq!(c.http.idle().half_closed, Duration::from_secs(5));
    assert_eq!(c.ssh.idle().half_closed, crate::relay::HALF_CLOSED_IDLE);
    let e = err("[routes.http]\nupstream = \"a:1\"\nhalf_closed_timeout = \"0s\"\n");
    assert!(
        e.contains(":3:") && e.contains("routes.http.half_closed_timeout"),
        "{e}"
    );
}

#[test]
fn ssh_penalty_exempt_and_the_deprecated_lockout_key() {
    let c =
        parse("[routes.ssh]\n[ssh]\npenalty_exempt = [\"10.0.0.0/8\", \"2001:db8::1\"]\n").unwrap();
    let exempt = &c.embedded_ssh.penalty_exempt;
    assert_eq!(exempt.len(), 2);
    assert!(exempt[0].contains("10.9.8.7".parse().unwrap()));
    let e = err("[routes.ssh]\n[ssh]\npenalty_exempt = [\"10.0.0.0/99\"]\n");
    assert!(
        e.contains(":3:") && e.contains("`10.0.0.0/99` is not an address or CIDR"),
        "{e}"
    );
    // Still accepted (with a warning at load), so that old files keep loading.
    parse("[routes.ssh]\n[ssh]\nmax_auth_failures_per_ip = 30\n").unwrap();
}

#[test]
fn dns_servers_and_timeout() {
    let c = parse(
        "[dns]\nservers = [\"10.0.0.2\", \"127.0.0.1:5353\", \"::1\"]\ntimeout = \"500ms\"\n",
    )
    .unwrap();
    assert_eq!(
        c.dns.servers,
        vec![
            "10.0.0.2:53".parse().unwrap(),
            "127.0.0.1:5353".parse().unwrap(),
            "[::1]:53".parse().unwrap()
        ]
    );
    assert_eq!(c.dns.timeout, Duration::from_millis(500));
    assert!(parse("").unwrap().dns.servers.is_empty());
    let e = err("[dns]\nservers = [\"dns.example.org\"]\n");
    assert!(
        e.contains(":2:") && e.contains("dns.servers") && e.contains("dns.example.org"),
        "{e}"
    );
    let e = err("[dns]\ntimeout = \"2h\"\n");
    assert!(e.contains("dns.timeout"), "{e}");
}

#[test]
fn tunnels_table() {
    assert_eq!(
        parse("").unwrap().tunnels,
        None,
        "nothing changes without [tunnels]"
    );
    let c = parse("[tunnels]\ndomain = \"T.Example.org.\"\n").unwrap();
    assert_eq!(
        c.tunnels,
        Some(TunnelSettings::with_domain("t.example.org"))
    );
    let c = parse(
        "[tunnels]\ndomain = \"t.example.org\"\npermit_listen = [\"preview-*:80\", \"myapp:*\"]\n",
    )
    .unwrap();
    assert_eq!(c.tunnels.unwrap().permit_listen.len(), 2);
    let e = err("[tunnels]\ndomain = \"t.example.org\"\npermit_listen = [\"8080\"]\n");
    assert!(
        e.contains("sluice.toml:3:18") && e.contains("not a name pattern"),
        "{e}"
    );
    let c = parse("[tunnels]\ndomain = \"t.example.org\"\nheader_timeout = \"3s\"\nmax_visitors = 8\npool_idle = \"1m\"\n").unwrap();
    let t = c.tunnels.unwrap();
    assert_eq!(
        (
            t.header_timeout.as_secs(),
            t.max_visitors,
            t.pool_idle.as_secs()
        ),
        (3, 8, 60)
    );
    let e = err("[tunnels]\ndomain = \"t.example.org\"\nmax_visitors = 0\n");
    assert!(
        e.contains("sluice.toml:3:16") && e.contains("1 to 1000000"),
        "{e}"
    );
    let e = err("[tunnels]\ndomain = \"t.example.org\"\nheader_timeout = \"1h\"\n");
    assert!(
        e.contains("tunnels.header_timeout") || e.contains("header_timeout"),
        "{e}"
    );
    let e = err("[tunnels]\ndomain = \"*.t.example.org\"\n");
    assert!(
        e.contains("sluice.toml:2:10") && e.contains("without `*.`"),
        "{e}"
    );
    let e = err("[tunnels]\ndomain = \"no spaces.org\"\n");
    assert!(e.contains("not a DNS name"), "{e}");
    let e = err("[tunnels]\ndomain = \"t.example.org\"\nmax_per_identity = 0\n");
    assert!(
        e.contains("sluice.toml:3:20") && e.contains("1 to 10000"),
        "{e}"
    );
    let e = err("[tunnels]\n");
    assert!(e.contains("domain"), "{e}");
    let e =
        err("[routes.ssh]\nupstream = \"127.0.0.1:22\"\n[tunnels]\ndomain = \"t.example.org\"\n");
    assert!(e.contains("embedded SSH server"), "{e}");
    let e = err("[tunnels]\ndomain = \"t.example.org\"\nbogus = 1\n");
    assert!(e.contains("bogus"), "{e}");
}

#[test]
fn cipher_suites_and_min_version() {
    use rustls::CipherSuite as C;
    let c = parse("").unwrap();
    assert_eq!(
        (c.tls.cipher_suites, c.tls.min_version),
        (None, TlsVersion::V1_2)
    );
    // Both spellings, any case, the order kept.
    let c = parse(
        "[tls]\nmin_version = \"1.3\"\ncipher_suites = [\"tls_chacha20_poly1305_sha256\", \"TLS13_AES_128_GCM_SHA256\", \"ECDHE-RSA-AES128-GCM-SHA256\"]\n",
    )
    .unwrap();
    assert_eq!(c.tls.min_version, TlsVersion::V1_3);
    assert_eq!(
        c.tls.cipher_suites.unwrap(),
        [
            C::TLS13_CHACHA20_POLY1305_SHA256,
            C::TLS13_AES_128_GCM_SHA256,
            C::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
        ]
    );
    let e =
        err("[tls]\ncipher_suites = [\"TLS_AES_128_GCM_SHA256\", \"TLS13_AES_128_GCM_SHA256\"]\n");
    assert!(
        e.contains(":2:44: tls.cipher_suites") && e.contains("listed twice"),
        "{e}"
    );
    let e = err("[tls]\ncipher_suites = []\n");
    assert!(
        e.contains(":2:17: tls.cipher_suites: list at least one"),
        "{e}"
    );
    // Every name the table knows is one aws-lc-rs offers.
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let offered: Vec<_> = provider.cipher_suites.iter().map(|s| s.suite()).collect();
    let tls13: Vec<_> = provider
        .cipher_suites
        .iter()
        .filter(|s| matches!(s, rustls::SupportedCipherSuite::Tls13(_)))
        .map(|s| s.suite())
        .collect();
    for (suite, name, openssl) in CIPHER_SUITES {
        assert!(offered.contains(suite), "{name}");
        assert_eq!(cipher_suite_by_name(openssl), Some(*suite));
        assert_eq!(is_tls13_suite(*suite), tls13.contains(suite), "{name}");
    }
    assert_eq!(offered.len(), CIPHER_SUITES.len());
}
