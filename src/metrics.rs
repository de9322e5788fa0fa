//! Process-wide counters, served as Prometheus text by the admin listener.
//!
//! One process, one set of counters (like the tracing subscriber): a global avoids threading
//! a handle through every module that counts something.

use std::sync::LazyLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// How a connection ended up where it went.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnLabels {
    /// `http`, `ssh` or `none` (closed before reaching a route).
    pub route: &'static str,
    /// `alpn`, `sni`, `peek`, `timeout`, `plaintext` or `none`.
    pub routed_by: &'static str,
    /// How it ended: `closed`, `refused`, `timeout`, `error` or `shutdown`.
    pub end: &'static str,
    /// Who ended it: `client`, `upstream` or `internal`.
    pub side: &'static str,
}

/// A direction of relayed bytes.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    /// `from_client` or `to_client`.
    pub direction: &'static str,
}

/// Why a connection was refused at accept.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// The limit or check that refused it.
    pub reason: &'static str,
}

/// Counts `result` in `family` (tunnel publishes and visits).
pub(crate) fn count(family: &Family<ResultLabels, Counter>, result: &'static str) {
    family.get_or_create(&ResultLabels { result }).inc();
}

/// `sluice tunnel` entered `state`: one gauge set, the others cleared, one change counted.
pub(crate) fn tunnel_state(state: &'static str) {
    let m = get();
    for s in ["connecting", "connected", "waiting", "stopped"] {
        m.tunnel_client_state
            .get_or_create(&StateLabels { state: s })
            .set(i64::from(s == state));
    }
    m.tunnel_client_changes
        .get_or_create(&StateLabels { state })
        .inc();
}

/// A grant's state.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    /// A grant's `live`, `revoked`, `expired` or `replaced`; a tunnel client's state.
    pub state: &'static str,
}

/// A route.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// `http` or `ssh`.
    pub route: &'static str,
}

/// An HTTPS request to a tunnel.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TunnelRequestLabels {
    /// The tunnel's name (names are bounded: `tunnels.max_per_identity` per key).
    pub tunnel: String,
    /// The status class: `2xx`, `4xx`, ...
    pub class: &'static str,
}

/// An outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `accepted`/`rejected`, or `success`/`failure`.
    pub result: &'static str,
}

/// What was reloaded, and how it went.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// `config`, `certificates` or `authorized_keys`.
    pub what: &'static str,
    /// `success` or `failure`.
    pub result: &'static str,
}

/// Every metric sluice exports. Names get the `sluice_` prefix (and `_total` for counters).
pub struct Metrics {
    registry: Registry,
    /// Connections that finished, by route and by how they were routed.
    pub connections: Family<ConnLabels, Counter>,
    /// Connections open now.
    pub connections_active: Gauge,
    /// Connections refused at accept (limits, PROXY header problems).
    pub refused: Family<ReasonLabels, Counter>,
    /// Payload bytes relayed, counted as they move.
    pub bytes: Family<DirectionLabels, Counter>,
    from_client: Counter,
    to_client: Counter,
    /// Of those, bytes moved by splice(2) on plain legs (the rest went through user space).
    pub spliced_bytes: Counter,
    /// TLS handshakes that failed or timed out.
    pub tls_handshake_failures: Counter,
    /// Upstreams that could not be reached.
    pub upstream_failures: Family<RouteLabels, Counter>,
    /// Seconds from the start of detection (accept, or the end of the TLS handshake) to the
    /// routing decision.
    pub detect_seconds: Histogram,
    /// Embedded SSH server: authentication results (one per connection that ends or succeeds).
    pub ssh_auth: Family<ResultLabels, Counter>,
    /// Embedded SSH server: authenticated sessions open now.
    pub ssh_sessions_active: Gauge,
    /// Embedded SSH server: open `-W`/`-L`/`-J` channels and `-R` listeners.
    pub ssh_forwards_active: Gauge,
    /// Tunnel names and ports published now (`ssh -R NAME:PORT`).
    pub tunnels_published: Gauge,
    /// `-R NAME:PORT` requests: `published`, or why not (`denied`, `owned`, `held`,
    /// `too_many`, `store_error`); `evicted` when a stale session of the same key lost it.
    pub tunnel_publish: Family<ResultLabels, Counter>,
    /// Access grants: `issued`, `used` (first authentication), `revoked`, `expired`,
    /// `replaced`, `refused` (a grant certificate turned away).
    pub grant_events: Family<ResultLabels, Counter>,
    /// Audit events not written: `queue_full`, `write`, `writer_gone`.
    pub audit_failures: Family<ResultLabels, Counter>,
    /// Control API requests refused before routing (`unauthorized`: no valid bearer token).
    pub control_refused: Family<ResultLabels, Counter>,
    /// Access grants kept in the store, by state.
    pub grants: Family<StateLabels, Gauge>,
    /// Visitors to a tunnel by name (`-W/-J/-L`): `opened`, `denied`, `no_tunnel`,
    /// `publisher_failed`.
    pub tunnel_visits: Family<ResultLabels, Counter>,
    /// HTTPS requests to tunnels, by tunnel and status class (sluice's own 404/421/502 too).
    pub tunnel_requests: Family<TunnelRequestLabels, Counter>,
    /// Reloads of the config, certificates and authorized keys.
    pub reloads: Family<ReloadLabels, Counter>,
    /// 1 while draining for shutdown (then `/readyz` answers 503).
    pub draining: Gauge,
    /// `sluice tunnel`: 1 for the state the client is in (`connecting`, `connected`,
    /// `waiting`, `stopped`), 0 for the others.
    pub tunnel_client_state: Family<StateLabels, Gauge>,
    /// `sluice tunnel`: state changes, by the state entered.
    pub tunnel_client_changes: Family<StateLabels, Counter>,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process's metrics.
pub fn get() -> &'static Metrics {
    &METRICS
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("sluice");
        let bytes = Family::<DirectionLabels, Counter>::default();
        let from_client = bytes
            .get_or_create(&DirectionLabels {
                direction: "from_client",
            })
            .clone();
        let to_client = bytes
            .get_or_create(&DirectionLabels {
                direction: "to_client",
            })
            .clone();
        let m = Metrics {
            connections: Family::default(),
            connections_active: Gauge::default(),
            refused: Family::default(),
            bytes,
            from_client,
            to_client,
            spliced_bytes: Counter::default(),
            tls_handshake_failures: Counter::default(),
            upstream_failures: Family::default(),
            // 50 us .. ~1.6 s, doubling: routing normally takes well under a millisecond after
            // the deciding byte; silent clients show up at detect.timeout.
            detect_seconds: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.00005, 2.0, 16),
            ),
            ssh_auth: Family::default(),
            ssh_sessions_active: Gauge::default(),
            ssh_forwards_active: Gauge::default(),
            tunnels_published: Gauge::default(),
            tunnel_publish: Family::default(),
            grant_events: Family::default(),
            grants: Family::default(),
            control_refused: Family::default(),
            audit_failures: Family::default(),
            tunnel_visits: Family::default(),
            tunnel_requests: Family::default(),
            reloads: Family::default(),
            draining: Gauge::default(),
            tunnel_client_state: Family::default(),
            tunnel_client_changes: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "connections",
            "Connections closed, by route, how they were routed, how they ended and who ended them",
            m.connections.clone(),
        );
        registry.register(
            "connections_active",
            "Connections open now",
            m.connections_active.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections refused at accept, by reason",
            m.refused.clone(),
        );
        registry.register("bytes", "Bytes relayed, by direction", m.bytes.clone());
        registry.register(
            "spliced_bytes",
            "Bytes relayed by splice(2) on plain legs (a subset of bytes)",
            m.spliced_bytes.clone(),
        );
        registry.register(
            "tls_handshake_failures",
            "TLS handshakes that failed or timed out",
            m.tls_handshake_failures.clone(),
        );
        registry.register(
            "upstream_connect_failures",
            "Upstreams that could not be reached, by route",
            m.upstream_failures.clone(),
        );
        registry.register(
            "detect_seconds",
            "Time from the start of detection to the routing decision",
            m.detect_seconds.clone(),
        );
        registry.register(
            "ssh_auth",
            "Embedded SSH server authentication results",
            m.ssh_auth.clone(),
        );
        registry.register(
            "ssh_sessions_active",
            "Embedded SSH server: authenticated sessions open now",
            m.ssh_sessions_active.clone(),
        );
        registry.register(
            "ssh_forwards_active",
            "Embedded SSH server: forwarding channels and -R listeners open now",
            m.ssh_forwards_active.clone(),
        );
        registry.register(
            "tunnels_published",
            "Tunnel names and ports published now",
            m.tunnels_published.clone(),
        );
        registry.register(
            "tunnel_publish",
            "ssh -R NAME:PORT requests, by result",
            m.tunnel_publish.clone(),
        );
        registry.register(
            "grant_events",
            "Access grant events: issued, used, revoked, expired, replaced, refused",
            m.grant_events.clone(),
        );
        registry.register(
            "grants",
            "Access grants kept in the store, by state (live, revoked, expired, replaced)",
            m.grants.clone(),
        );
        registry.register(
            "audit_failures",
            "Audit events not written, by reason (queue_full, write, writer_gone)",
            m.audit_failures.clone(),
        );
        registry.register(
            "control_refused",
            "Control API requests refused before routing, by reason",
            m.control_refused.clone(),
        );
        registry.register(
            "tunnel_visits",
            "Visitors to tunnels by name (-W/-J/-L), by result",
            m.tunnel_visits.clone(),
        );
        registry.register(
            "tunnel_requests",
            "HTTPS requests to tunnels, by tunnel and status class",
            m.tunnel_requests.clone(),
        );
        registry.register(
            "reloads",
            "Reloads of the config, certificates and authorized keys, by result",
            m.reloads.clone(),
        );
        registry.register(
            "tunnel_client_state",
            "sluice tunnel: 1 for the state the client is in",
            m.tunnel_client_state.clone(),
        );
        registry.register(
            "tunnel_client_state_changes",
            "sluice tunnel: state changes, by the state entered",
            m.tunnel_client_changes.clone(),
        );
        registry.register(
            "draining",
            "1 while draining for shutdown",
            m.draining.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The Prometheus/OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Counts a reload.
    pub fn reload(&self, what: &'static str, ok: bool) {
        self.reloads
            .get_or_create(&ReloadLabels {
                what,
                result: if ok { "success" } else { "failure" },
            })
            .inc();
    }

    /// Counts `n` bytes relayed from the client (`true`) or to it.
    pub fn relayed(&self, from_client: bool, n: u64) {
        if from_client {
            self.from_client.inc_by(n);
        } else {
            self.to_client.inc_by(n);
        }
    }

    /// Counts `n` bytes moved by splice(2).
    pub fn spliced(&self, n: u64) {
        self.spliced_bytes.inc_by(n);
    }

    /// Counts a refused connection.
    pub fn refuse(&self, reason: &'static str) {
        self.refused.get_or_create(&ReasonLabels { reason }).inc();
    }
}

/// Decrements a gauge when dropped: keeps "active" gauges right on every exit path.
pub struct GaugeGuard(&'static Gauge);

impl GaugeGuard {
    /// Increments `gauge` now and decrements it on drop.
    pub fn new(gauge: &'static Gauge) -> GaugeGuard {
        gauge.inc();
        GaugeGuard(gauge)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_prefixed_and_counters_move() {
        let m = Metrics::new();
        m.connections
            .get_or_create(&ConnLabels {
                route: "ssh",
                routed_by: "alpn",
                end: "closed",
                side: "client",
            })
            .inc();
        m.reload("config", false);
        let text = m.encode();
        assert!(
            text.contains(
                "sluice_connections_total{route=\"ssh\",routed_by=\"alpn\",end=\"closed\",side=\"client\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("sluice_reloads_total{what=\"config\",result=\"failure\"} 1"),
            "{text}"
        );
        assert!(text.contains("sluice_detect_seconds_bucket"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
