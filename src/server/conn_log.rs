//! What is known about one connection as it goes, counted and logged once when it closes.

use std::net::SocketAddr;

use tokio::time::Instant;
use tracing::info;

use super::shared::Shared;
use crate::outcome::Outcome;
use crate::relay;
use crate::route::RoutedBy;

/// What is known about a connection, logged once when it closes.
pub(super) struct ConnLog {
    pub(super) id: u64,
    pub(super) peer: SocketAddr,
    pub(super) local: SocketAddr,
    pub(super) start: Instant,
    pub(super) tls: bool,
    /// The TLS session was resumed (from a ticket or the session cache).
    pub(super) resumed: bool,
    pub(super) sni: Option<String>,
    pub(super) alpn: Option<String>,
    pub(super) by: Option<RoutedBy>,
    /// `http`, `ssh` or `tunnel`.
    pub(super) route: Option<&'static str>,
    pub(super) target: Option<String>,
    pub(super) bytes: relay::Bytes,
    /// Which relay core moved the bytes: `splice` or `copy`.
    pub(super) relay: Option<&'static str>,
    /// Set by whichever phase ends the connection.
    pub(super) outcome: Option<Outcome>,
    /// Failures before routing (scanners, junk) are logged through a throttle.
    pub(super) noisy: bool,
}

impl ConnLog {
    pub(super) fn emit(&self, shared: &Shared) {
        debug_assert!(
            self.outcome.is_some(),
            "connection {} ended without an outcome",
            self.id
        );
        let outcome = self.outcome.as_ref().unwrap_or(&Outcome::Closed);
        let m = crate::metrics::get();
        m.connections
            .get_or_create(&crate::metrics::ConnLabels {
                route: self.route.unwrap_or("none"),
                routed_by: self.by.map_or("none", RoutedBy::as_str),
                end: outcome.kind().as_str(),
                side: outcome.side().as_str(),
            })
            .inc();
        if let Some(route) = self.route {
            crate::audit::record(|| crate::audit::Event::ConnectionClosed {
                id: self.id,
                peer: self.peer.to_string(),
                sni: self.sni.clone(),
                alpn: self.alpn.clone(),
                route: route.to_string(),
                backend: self.target.clone(),
                bytes_up: self.bytes.up,
                bytes_down: self.bytes.down,
                duration_ms: self.start.elapsed().as_millis() as u64,
                end: outcome.kind().as_str().to_string(),
            });
        }
        // Only throttled lines say how many similar ones were dropped before them.
        let suppressed = if self.noisy {
            match shared.failures.allow() {
                Some(n) => Some(n).filter(|n| *n > 0),
                None => return,
            }
        } else {
            None
        };
        info!(
            target: "sluice::conn",
            id = self.id,
            peer = %self.peer,
            local = %self.local,
            tls = self.tls,
            resumed = self.resumed,
            sni = self.sni.as_deref().unwrap_or("-"),
            alpn = self.alpn.as_deref().unwrap_or("-"),
            routed_by = self.by.map_or("-", RoutedBy::as_str),
            route = self.route.unwrap_or("-"),
            backend = self.target.as_deref().unwrap_or("-"),
            bytes_up = self.bytes.up,
            bytes_down = self.bytes.down,
            relay = self.relay.unwrap_or("-"),
            duration_ms = self.start.elapsed().as_millis() as u64,
            end = outcome.kind().as_str(),
            side = outcome.side().as_str(),
            outcome = %outcome,
            suppressed_similar = suppressed,
            "connection closed"
        );
    }
}
