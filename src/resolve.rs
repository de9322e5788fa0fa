//! Name resolution for upstreams and SSH forward targets: hickory's async resolver, so that a
//! lookup is an ordinary future (cancelled with its connection, bounded by a timeout, cached)
//! instead of getaddrinfo on a blocking thread that outlives its caller.
//!
//! One resolver per thread (each per-core runtime gets its own, with its own cache), built from
//! the settings in force: `[dns] servers`, or /etc/resolv.conf, and always /etc/hosts.

use std::cell::RefCell;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_resolver::config::{LookupIpStrategy, NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::TokioResolver;
use tracing::warn;

/// `[dns]`: where names are resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsSettings {
    /// Name servers; empty: those of /etc/resolv.conf.
    pub servers: Vec<SocketAddr>,
    /// How long one attempt at one server may take (two attempts per server).
    pub timeout: Duration,
}

impl Default for DnsSettings {
    fn default() -> DnsSettings {
        DnsSettings {
            servers: Vec::new(),
            timeout: Duration::from_secs(2),
        }
    }
}

/// Settings and their generation: threads rebuild their resolver when it moves.
static SETTINGS: Mutex<Option<Arc<DnsSettings>>> = Mutex::new(None);
static GENERATION: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static RESOLVER: RefCell<Option<(u64, TokioResolver)>> = const { RefCell::new(None) };
}

/// Puts `settings` in force for lookups from now on (start-up and reload).
pub(crate) fn configure(settings: &DnsSettings) {
    let mut cur = SETTINGS.lock().unwrap_or_else(|p| p.into_inner());
    if cur.as_deref() != Some(settings) {
        *cur = Some(Arc::new(settings.clone()));
        GENERATION.fetch_add(1, Ordering::AcqRel);
    }
}

/// A resolver with no name servers: /etc/hosts and IP literals only.
fn hosts_only() -> hickory_resolver::ResolverBuilder<TokioRuntimeProvider> {
    TokioResolver::builder_with_config(
        ResolverConfig::from_name_servers(Vec::new()),
        TokioRuntimeProvider::default(),
    )
}

fn build(settings: &DnsSettings) -> TokioResolver {
    let provider = TokioRuntimeProvider::default();
    let mut builder = if settings.servers.is_empty() {
        match TokioResolver::builder_tokio() {
            Ok(b) => b,
            Err(e) => {
                warn!(error = %e, "no DNS servers: /etc/resolv.conf does not load; only /etc/hosts names resolve (set [dns] servers)");
                hosts_only()
            }
        }
    } else {
        let servers = settings
            .servers
            .iter()
            .map(|s| {
                let mut ns = NameServerConfig::udp_and_tcp(s.ip());
                for c in &mut ns.connections {
                    c.port = s.port();
                }
                ns
            })
            .collect();
        TokioResolver::builder_with_config(ResolverConfig::from_name_servers(servers), provider)
    };
    let opts: &mut ResolverOpts = builder.options_mut();
    opts.timeout = settings.timeout;
    opts.attempts = 2;
    // One query when there is an IPv4 address; IPv6 when there is none.
    opts.ip_strategy = LookupIpStrategy::Ipv4thenIpv6;
    opts.cache_size = 1024;
    // Names move (failover, deploys): cached answers live at most a minute, failures 5 s.
    opts.positive_max_ttl = Some(Duration::from_secs(60));
    opts.negative_max_ttl = Some(Duration::from_secs(5));
    match builder.build() {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e, "DNS resolver: configuration refused; only /etc/hosts names resolve");
            let mut b = hosts_only();
            b.options_mut().timeout = settings.timeout;
            // An empty configuration is always accepted.
            b.build().expect("an empty resolver configuration builds")
        }
    }
}

/// This thread's resolver for the settings in force.
fn resolver() -> TokioResolver {
    let generation = GENERATION.load(Ordering::Acquire);
    RESOLVER.with(|r| {
        let mut r = r.borrow_mut();
        match &*r {
            Some((g, res)) if *g == generation => res.clone(),
            _ => {
                let settings = SETTINGS
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone()
                    .unwrap_or_default();
                let res = build(&settings);
                *r = Some((generation, res.clone()));
                res
            }
        }
    })
}

/// The addresses of `host` (a name, an IPv4 address, or an IPv6 address with or without
/// brackets) with `port`. IP literals need no lookup.
pub(crate) async fn lookup(host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let found = resolver()
        .lookup_ip(host)
        .await
        .map_err(|e| io::Error::new(io::ErrorKind::NotFound, e.to_string()))?;
    let addrs: Vec<SocketAddr> = found.iter().map(|ip| SocketAddr::new(ip, port)).collect();
    if addrs.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{host} has no addresses"),
        ));
    }
    Ok(addrs)
}

/// Splits `host:port` (`[v6]:port` for IPv6) and resolves it.
pub(crate) async fn lookup_host_port(addr: &str) -> io::Result<Vec<SocketAddr>> {
    let bad = || {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("`{addr}` is not host:port"),
        )
    };
    let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    if host.contains(':') && !host.starts_with('[') {
        return Err(bad());
    }
    lookup(host, port).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_configuration_builds() {
        assert!(hosts_only().build().is_ok());
    }

    #[tokio::test]
    async fn literals_and_hosts_need_no_server() {
        configure(&DnsSettings {
            servers: vec!["127.0.0.1:9".parse().unwrap()],
            timeout: Duration::from_millis(200),
        });
        assert_eq!(
            lookup_host_port("[::1]:22").await.unwrap(),
            vec!["[::1]:22".parse().unwrap()]
        );
        assert_eq!(
            lookup("10.1.2.3", 80).await.unwrap(),
            vec!["10.1.2.3:80".parse().unwrap()]
        );
        // /etc/hosts answers localhost without asking the (dead) server.
        let local = lookup("localhost", 80).await.unwrap();
        assert!(local.iter().all(|a| a.ip().is_loopback()), "{local:?}");
        assert!(lookup_host_port("nocolon").await.is_err());
        assert!(lookup_host_port("::1:22").await.is_err());
    }
}
