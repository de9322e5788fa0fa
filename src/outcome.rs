//! How a connection ended and which side ended it: the last field of the connection log line
//! (`end`, `side`, `outcome`) and two labels on `sluice_connections_total`.
//!
//! A leaf: the relay and the SSH server report in these terms, `conn` logs and counts them.

use std::fmt;
use std::io;
use std::time::Duration;

/// Who ended a connection, or whose fault it was (as pingora tags its errors).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    /// The client: it closed, sent something refused, failed its handshake, or went silent.
    Client,
    /// The upstream: unreachable, reset, or an I/O error.
    Upstream,
    /// sluice itself: its idle timeout, its shutdown, or a route it has no target for.
    Internal,
}

impl Side {
    /// The label value: `client`, `upstream` or `internal`.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Upstream => "upstream",
            Side::Internal => "internal",
        }
    }
}

/// The kind of ending, a label with few values (the `end` field and label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Served to its end: the relay or the session closed, or sluice's own answer was sent.
    Closed,
    /// sluice refused it: unknown protocol, a route that refuses, a failed authentication.
    Refused,
    /// A deadline passed: a handshake, a slow client, the idle timeout.
    Timeout,
    /// An I/O or protocol error.
    Error,
    /// The daemon shut down.
    Shutdown,
}

impl Kind {
    /// The label value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Kind::Closed => "closed",
            Kind::Refused => "refused",
            Kind::Timeout => "timeout",
            Kind::Error => "error",
            Kind::Shutdown => "shutdown",
        }
    }
}

/// sluice's own short answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Answer {
    /// The plain-HTTP redirect to https.
    Redirect,
    /// The built-in status page.
    StatusPage,
}

/// How an SSH connection to the embedded server ended.
#[derive(Debug)]
pub enum SshEnd {
    /// The banner exchange failed.
    HandshakeFailed(String),
    /// No client banner before the authentication deadline.
    NoBanner,
    /// The session ended. `who` names the user and key (or says not authenticated).
    Ended {
        /// ` (user key ...)` or ` (not authenticated)`, for the log.
        who: String,
        /// The client tried to authenticate and was refused.
        refused: bool,
        /// russh's error, if the session ended on one.
        error: Option<String>,
    },
    /// Authentication did not finish in time; `stalled` says where it stopped.
    AuthTimeout {
        /// As in [`SshEnd::Ended`].
        who: String,
        /// Where the client stopped (key exchange, after N requests).
        stalled: String,
    },
    /// sluice shut down and said goodbye.
    Shutdown {
        /// As in [`SshEnd::Ended`].
        who: String,
    },
}

/// How a connection of HTTPS visitors to a tunnel ended.
#[derive(Debug)]
pub(crate) struct HttpEnd {
    /// Requests served on it.
    pub(crate) requests: u64,
    /// hyper's error, when the connection ended on one (a malformed request, a reset).
    pub(crate) error: Option<String>,
    /// The error was a deadline (a request head too slow).
    pub(crate) timeout: bool,
}

/// Every way a connection ends.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Both directions of the relay closed.
    Closed,
    /// sluice answered by itself and closed.
    Answered(Answer),
    /// sluice's own answer was not delivered: an error, or (`None`) the client was too slow.
    AnswerFailed(Answer, Option<io::Error>),
    /// Closed by a routing decision, with the reason; `side` is whose it was.
    Refused(Side, &'static str),
    /// A resumed session's client certificate no longer verifies (revoked, expired, new CA).
    CertRejected(String),
    /// The TLS handshake failed.
    TlsFailed(io::Error),
    /// The TLS handshake did not finish in time.
    TlsTimeout(Duration),
    /// An I/O error on one side.
    Io(Side, io::Error),
    /// No upstream address could be connected.
    UpstreamUnreachable(String),
    /// No bytes either way for the route's idle timeout.
    IdleTimeout,
    /// The daemon's shutdown ended it.
    Shutdown,
    /// An embedded SSH session.
    Ssh(SshEnd),
    /// HTTPS visitors of a tunnel, served by sluice.
    Http(HttpEnd),
}

impl Outcome {
    /// The kind, for the `end` label.
    pub(crate) fn kind(&self) -> Kind {
        match self {
            Outcome::Closed | Outcome::Answered(_) => Kind::Closed,
            Outcome::AnswerFailed(_, None) | Outcome::TlsTimeout(_) | Outcome::IdleTimeout => {
                Kind::Timeout
            }
            Outcome::AnswerFailed(_, Some(_))
            | Outcome::TlsFailed(_)
            | Outcome::Io(..)
            | Outcome::UpstreamUnreachable(_) => Kind::Error,
            Outcome::Refused(..) | Outcome::CertRejected(_) => Kind::Refused,
            Outcome::Shutdown => Kind::Shutdown,
            Outcome::Http(s) => match &s.error {
                None => Kind::Closed,
                Some(_) if s.timeout => Kind::Timeout,
                Some(_) => Kind::Error,
            },
            Outcome::Ssh(s) => match s {
                SshEnd::HandshakeFailed(_) => Kind::Error,
                SshEnd::NoBanner | SshEnd::AuthTimeout { .. } => Kind::Timeout,
                SshEnd::Ended { error: Some(_), .. } => Kind::Error,
                SshEnd::Ended { refused: true, .. } => Kind::Refused,
                SshEnd::Ended { .. } => Kind::Closed,
                SshEnd::Shutdown { .. } => Kind::Shutdown,
            },
        }
    }

    /// Which side ended the connection, for the `side` label.
    pub(crate) fn side(&self) -> Side {
        match self {
            Outcome::Refused(side, _) | Outcome::Io(side, _) => *side,
            Outcome::UpstreamUnreachable(_) => Side::Upstream,
            Outcome::IdleTimeout | Outcome::Shutdown | Outcome::Ssh(SshEnd::Shutdown { .. }) => {
                Side::Internal
            }
            // A relay that ran to its end, an answer, a handshake or a session: the client's.
            _ => Side::Client,
        }
    }
}

impl fmt::Display for Answer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Answer::Redirect => "redirect",
            Answer::StatusPage => "status page",
        })
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Closed => f.write_str("closed"),
            Outcome::Answered(Answer::Redirect) => f.write_str("redirected to https"),
            Outcome::Answered(Answer::StatusPage) => f.write_str("served status page"),
            Outcome::AnswerFailed(a, Some(e)) => write!(f, "{a} not served: {e}"),
            Outcome::AnswerFailed(a, None) => write!(f, "{a} not served: client too slow"),
            Outcome::Refused(_, why) => write!(f, "closed: {why}"),
            Outcome::CertRejected(e) => write!(
                f,
                "closed: the resumed session's client certificate no longer verifies: {e}"
            ),
            Outcome::TlsFailed(e) => write!(f, "TLS handshake failed: {e}"),
            Outcome::TlsTimeout(d) => write!(
                f,
                "TLS handshake timed out after {}",
                humantime::format_duration(*d)
            ),
            Outcome::Io(Side::Upstream, e) => write!(f, "upstream error: {e}"),
            Outcome::Io(_, e) => write!(f, "client error: {e}"),
            Outcome::UpstreamUnreachable(e) => write!(f, "upstream unreachable: {e}"),
            Outcome::IdleTimeout => f.write_str("idle timeout"),
            Outcome::Shutdown => f.write_str("closed at shutdown"),
            Outcome::Ssh(SshEnd::HandshakeFailed(e)) => write!(f, "ssh handshake failed: {e}"),
            Outcome::Ssh(SshEnd::NoBanner) => {
                f.write_str("ssh handshake timed out: no client banner")
            }
            Outcome::Ssh(SshEnd::Ended { who, error, .. }) => match error {
                None => write!(f, "ssh session ended{who}"),
                Some(e) => write!(f, "ssh session ended{who}: {e}"),
            },
            Outcome::Ssh(SshEnd::AuthTimeout { who, stalled }) => {
                write!(
                    f,
                    "ssh session ended{who}: authentication timed out {stalled}"
                )
            }
            Outcome::Ssh(SshEnd::Shutdown { who }) => {
                write!(f, "ssh session ended{who}: sluice is shutting down")
            }
            Outcome::Http(h) => match &h.error {
                None => write!(f, "closed after {} requests", h.requests),
                Some(e) => write!(f, "closed after {} requests: {e}", h.requests),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_and_sides() {
        let reset = || io::Error::from(io::ErrorKind::ConnectionReset);
        let cases = [
            (Outcome::Closed, "closed", "client", "closed"),
            (
                Outcome::Io(Side::Upstream, reset()),
                "error",
                "upstream",
                "upstream error: connection reset",
            ),
            (
                Outcome::Io(Side::Client, reset()),
                "error",
                "client",
                "client error: connection reset",
            ),
            (Outcome::IdleTimeout, "timeout", "internal", "idle timeout"),
            (
                Outcome::Refused(Side::Client, "unknown protocol"),
                "refused",
                "client",
                "closed: unknown protocol",
            ),
            (
                Outcome::Refused(Side::Internal, "no embedded SSH server"),
                "refused",
                "internal",
                "closed: no embedded SSH server",
            ),
            (
                Outcome::AnswerFailed(Answer::Redirect, None),
                "timeout",
                "client",
                "redirect not served: client too slow",
            ),
            (
                Outcome::TlsTimeout(Duration::from_secs(10)),
                "timeout",
                "client",
                "TLS handshake timed out after 10s",
            ),
            (
                Outcome::Ssh(SshEnd::Ended {
                    who: " (not authenticated)".into(),
                    refused: true,
                    error: None,
                }),
                "refused",
                "client",
                "ssh session ended (not authenticated)",
            ),
            (
                Outcome::Ssh(SshEnd::Shutdown {
                    who: " (not authenticated)".into(),
                }),
                "shutdown",
                "internal",
                "ssh session ended (not authenticated): sluice is shutting down",
            ),
        ];
        for (o, kind, side, text) in cases {
            assert_eq!(
                (o.kind().as_str(), o.side().as_str(), o.to_string().as_str()),
                (kind, side, text)
            );
        }
    }
}
