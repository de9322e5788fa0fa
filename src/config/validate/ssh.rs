//! `[ssh]`: the embedded server's settings.

use super::super::error::ConfigError;
use super::super::file;
use super::super::types::*;
use std::time::Duration;

use super::Validator;

impl Validator<'_> {
    pub(super) fn ssh(&self, raw: &file::Ssh) -> Result<SshSettings, ConfigError> {
        let mut s = SshSettings {
            host_key: match &raw.host_key {
                Some(p) => Some(self.path(p)?.path),
                None => None,
            },
            ..SshSettings::default()
        };
        s.authorized_keys = raw
            .authorized_keys
            .iter()
            .map(|p| self.path(p))
            .collect::<Result<_, _>>()?;
        for p in &raw.permit_open {
            s.permit_open.push(
                crate::net::PermitOpen::parse(p.get_ref()).or_else(|m| self.err(p.span(), m))?,
            );
        }
        if let Some(a) = &raw.listen_address {
            s.listen_address = a.get_ref().parse().or_else(|_| {
                self.err(a.span(), format!("`{}` is not an IP address", a.get_ref()))
            })?;
        }
        if let Some(r) = &raw.listen_ports {
            s.listen_ports = crate::net::parse_port_range(r.get_ref()).map_or_else(
                || {
                    self.err(
                        r.span(),
                        format!("`{}` is not a port range like \"20000-25000\"", r.get_ref()),
                    )
                },
                Ok,
            )?;
        }
        s.socket_dir = match &raw.socket_dir {
            Some(p) => Some(self.path(p)?.path),
            None => None,
        };
        if let Some(t) = &raw.connect_timeout {
            s.connect_timeout = self.duration(t, MIN_TIMEOUT, 10 * MINUTE)?;
        }
        if let Some(t) = &raw.auth_timeout {
            s.auth_timeout = self.duration(t, Duration::from_secs(1), 10 * MINUTE)?;
        }
        if let Some(t) = &raw.keepalive_interval {
            s.keepalive_interval = self.duration(t, Duration::from_secs(1), 60 * MINUTE)?;
        }
        for c in &raw.penalty_exempt {
            s.penalty_exempt
                .push(crate::net::Cidr::parse(c.get_ref()).map_or_else(
                    || {
                        self.err(
                            c.span(),
                            format!("`{}` is not an address or CIDR", c.get_ref()),
                        )
                    },
                    Ok,
                )?);
        }
        if raw.max_auth_failures_per_ip.is_some() {
            tracing::warn!(
                "ssh.max_auth_failures_per_ip is deprecated and has no effect: failed logins no longer lock an address out, they slow its later failures down (a key that verifies always gets in); ssh.penalty_exempt lists addresses never slowed. Remove the setting."
            );
        }
        for (v, slot) in [
            (&raw.max_auth_attempts, &mut s.max_auth_attempts),
            (&raw.max_channels, &mut s.max_channels),
            (&raw.max_forwards, &mut s.max_forwards),
        ] {
            if let Some(v) = v {
                if *v.get_ref() == 0 {
                    return self.err(v.span(), "must be at least 1");
                }
                *slot = *v.get_ref();
            }
        }
        Ok(s)
    }
}
