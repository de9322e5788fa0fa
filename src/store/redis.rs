//! The store in Redis (`[store] redis`): what several replicas will share. Every change that
//! reads before it writes (a grant's port allotment, a name's claim, ending a grant) is one Lua
//! script, so Redis runs it atomically: two issues never get one port.
//!
//! Keys, under the prefix (default `sluice:`): `grant:ID` (a hash of the grant's fields),
//! `all` (sorted set of every grant id by creation), `live` (live grant ids by expiry),
//! `port` and `device` (hashes to the live grant id), `names` (tunnel name to owner),
//! `keys` (fingerprints of keys a grant was issued for), `counts` (ended grants by reason).
//!
//! One synchronous connection behind a mutex, with connect, read and write timeouts: a call
//! blocks its caller for at most the timeout, and a broken connection is made again on the
//! next call.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use super::{Allot, Claim, GrantCounts, GrantRow, StoreError};

/// Ends one grant (`finish`), shared by the scripts below.
const FINISH: &str = r#"
local p = ARGV[1]
local ended = {}
local function finish(gid, at, reason)
  local k = p .. 'grant:' .. gid
  local g = redis.call('HMGET', k, 'port', 'device', 'name')
  redis.call('HSET', k, 'ended', at, 'end_reason', reason)
  redis.call('ZREM', p .. 'live', gid)
  if g[1] and redis.call('HGET', p .. 'port', g[1]) == gid then redis.call('HDEL', p .. 'port', g[1]) end
  if g[2] and redis.call('HGET', p .. 'device', g[2]) == gid then redis.call('HDEL', p .. 'device', g[2]) end
  if g[3] and g[3] ~= '' and g[2] and redis.call('HGET', p .. 'names', g[3]) == 'device ' .. g[2] then
    redis.call('HDEL', p .. 'names', g[3])
  end
  redis.call('HINCRBY', p .. 'counts', reason, 1)
  table.insert(ended, gid)
end
local function sweep(now)
  for _, gid in ipairs(redis.call('ZRANGEBYSCORE', p .. 'live', '-inf', now)) do
    finish(gid, redis.call('HGET', p .. 'grant:' .. gid, 'expires'), 'expired')
  end
end
"#;

/// ARGV: prefix, now, id, device, want (0: any), low, high, owner, replace (1/0), name ('':
/// none), key, expires, then the new grant's field/value pairs.
/// Returns {'ok', port, ended ids...} or {'device'|'port'|'name', who} or {'full'}.
const ISSUE: &str = r#"
local now = tonumber(ARGV[2])
local id, device, want = ARGV[3], ARGV[4], tonumber(ARGV[5])
local lo, hi, owner, replace = tonumber(ARGV[6]), tonumber(ARGV[7]), ARGV[8], ARGV[9] == '1'
local name, key, expires = ARGV[10], ARGV[11], tonumber(ARGV[12])
sweep(now)
local old = redis.call('HGET', p .. 'device', device)
if old and not replace then return {'device', old} end
if name ~= '' then
  local o = redis.call('HGET', p .. 'names', name)
  if o and o ~= owner then return {'name', o} end
end
local port = nil
if want > 0 then
  local h = redis.call('HGET', p .. 'port', tostring(want))
  if h and h ~= old then return {'port', h} end
  port = want
else
  for q = lo, hi do
    local h = redis.call('HGET', p .. 'port', tostring(q))
    if (not h) or h == old then port = q break end
  end
  if not port then return {'full'} end
end
if old then finish(old, now, 'replaced') end
if name ~= '' then redis.call('HSET', p .. 'names', name, owner) end
local k = p .. 'grant:' .. id
for i = 13, #ARGV, 2 do redis.call('HSET', k, ARGV[i], ARGV[i + 1]) end
redis.call('HSET', k, 'port', port)
redis.call('ZADD', p .. 'live', expires, id)
redis.call('ZADD', p .. 'all', now, id)
redis.call('HSET', p .. 'port', tostring(port), id)
redis.call('HSET', p .. 'device', device, id)
redis.call('SADD', p .. 'keys', key)
local out = {'ok', port}
for _, e in ipairs(ended) do table.insert(out, e) end
return out
"#;

/// ARGV: prefix, now. Returns the ids it ended.
const SWEEP: &str = r#"
sweep(tonumber(ARGV[2]))
return ended
"#;

/// ARGV: prefix, now, id, reason. Returns 1 if it ended a live, unexpired grant.
const END: &str = r#"
local now, id, reason = tonumber(ARGV[2]), ARGV[3], ARGV[4]
local k = p .. 'grant:' .. id
local g = redis.call('HMGET', k, 'ended', 'expires')
if g[1] or not g[2] or tonumber(g[2]) <= now then return 0 end
finish(id, now, reason)
return 1
"#;

/// ARGV: prefix, id, now. 1 if this was the grant's first use.
const MARK_USED: &str = r#"
local k = p .. 'grant:' .. ARGV[2]
if redis.call('EXISTS', k) == 0 then return 0 end
return redis.call('HSETNX', k, 'first_used', ARGV[3])
"#;

/// The store in Redis.
pub(crate) struct RedisStore {
    client: redis::Client,
    conn: Mutex<Option<redis::Connection>>,
    prefix: String,
    timeout: Duration,
    issue: redis::Script,
    sweep: redis::Script,
    end: redis::Script,
    mark_used: redis::Script,
    /// For errors: the URL without its password.
    shown: String,
}

fn script(body: &str) -> redis::Script {
    redis::Script::new(&format!("{FINISH}\n{body}"))
}

/// `redis://user:secret@host/` as `redis://user:***@host/`.
fn without_password(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

impl RedisStore {
    /// Connects (and checks the server answers) within `timeout`.
    pub(crate) fn open(
        url: &str,
        prefix: &str,
        timeout: Duration,
    ) -> Result<RedisStore, StoreError> {
        let shown = without_password(url);
        let client = redis::Client::open(url).map_err(|e| StoreError::Redis {
            url: shown.clone(),
            message: e.to_string(),
        })?;
        let s = RedisStore {
            client,
            conn: Mutex::new(None),
            prefix: prefix.to_string(),
            timeout,
            issue: script(ISSUE),
            sweep: script(SWEEP),
            end: script(END),
            mark_used: script(MARK_USED),
            shown,
        };
        s.with(|c| redis::cmd("PING").query::<String>(c))?;
        Ok(s)
    }

    fn err(&self, e: &redis::RedisError) -> StoreError {
        StoreError::Redis {
            url: self.shown.clone(),
            message: e.to_string(),
        }
    }

    /// Runs `f` on the connection, connecting first if there is none; a failed call drops
    /// the connection so that the next one starts afresh.
    fn with<T>(
        &self,
        f: impl FnOnce(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> Result<T, StoreError> {
        let mut guard = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            let c = self
                .client
                .get_connection_with_timeout(self.timeout)
                .map_err(|e| self.err(&e))?;
            c.set_read_timeout(Some(self.timeout))
                .and_then(|()| c.set_write_timeout(Some(self.timeout)))
                .map_err(|e| self.err(&e))?;
            *guard = Some(c);
        }
        let Some(c) = guard.as_mut() else {
            return Err(StoreError::Redis {
                url: self.shown.clone(),
                message: "no connection".into(),
            });
        };
        match f(c) {
            Ok(v) => Ok(v),
            Err(e) => {
                *guard = None;
                Err(self.err(&e))
            }
        }
    }

    fn key(&self, k: &str) -> String {
        format!("{}{k}", self.prefix)
    }

    pub(crate) fn claim_name(&self, name: &str, owner: &str) -> Result<Claim, StoreError> {
        let names = self.key("names");
        self.with(|c| {
            let set: bool = redis::cmd("HSETNX")
                .arg(&names)
                .arg(name)
                .arg(owner)
                .query(c)?;
            if set {
                return Ok(Claim::New);
            }
            let o: Option<String> = redis::cmd("HGET").arg(&names).arg(name).query(c)?;
            Ok(match o {
                Some(o) if o == owner => Claim::Ours,
                Some(o) => Claim::Other(o),
                // Freed between the two calls: ask again next time.
                None => Claim::Other(String::new()),
            })
        })
    }

    pub(crate) fn names(&self) -> Result<Vec<(String, String)>, StoreError> {
        let names = self.key("names");
        let m: HashMap<String, String> =
            self.with(|c| redis::cmd("HGETALL").arg(&names).query(c))?;
        Ok(m.into_iter().collect())
    }

    pub(crate) fn issue_grant(
        &self,
        new: &GrantRow,
        want: Option<u16>,
        ports: std::ops::RangeInclusive<u16>,
        owner: &str,
        replace: bool,
    ) -> Result<Allot, StoreError> {
        let mut inv = self.issue.prepare_invoke();
        inv.arg(&self.prefix)
            .arg(new.created)
            .arg(&new.id)
            .arg(&new.device)
            .arg(want.unwrap_or(0))
            .arg(*ports.start())
            .arg(*ports.end())
            .arg(owner)
            .arg(if replace { "1" } else { "0" })
            .arg(new.name.as_deref().unwrap_or(""))
            .arg(&new.key)
            .arg(new.expires);
        for (k, v) in fields(new) {
            inv.arg(k).arg(v);
        }
        let out: Vec<redis::Value> = self.with(|c| inv.invoke(c))?;
        let text = |i: usize| -> Option<String> {
            out.get(i)
                .and_then(|v| redis::from_redis_value::<String>(v.clone()).ok())
        };
        match text(0).as_deref() {
            Some("ok") => {
                let port: u16 = out
                    .get(1)
                    .and_then(|v| redis::from_redis_value::<u16>(v.clone()).ok())
                    .unwrap_or(0);
                let mut ended = Vec::new();
                for i in 2..out.len() {
                    if let Some(id) = text(i) {
                        if let Some(r) = self.grant(&id)? {
                            ended.push(r);
                        }
                    }
                }
                Ok(Allot::Granted {
                    row: Box::new(GrantRow {
                        port,
                        ..new.clone()
                    }),
                    ended,
                })
            }
            Some("device") => Ok(Allot::DeviceHasGrant(text(1).unwrap_or_default())),
            Some("port") => Ok(Allot::PortTaken(text(1).unwrap_or_default())),
            Some("name") => Ok(Allot::NameOwned(text(1).unwrap_or_default())),
            Some("full") => Ok(Allot::NoFreePort),
            other => Err(StoreError::Redis {
                url: self.shown.clone(),
                message: format!("unexpected answer from the issue script: {other:?}"),
            }),
        }
    }

    pub(crate) fn grant(&self, id: &str) -> Result<Option<GrantRow>, StoreError> {
        let k = self.key(&format!("grant:{id}"));
        let m: HashMap<String, String> = self.with(|c| redis::cmd("HGETALL").arg(&k).query(c))?;
        Ok(parse(&m))
    }

    fn rows(&self, ids: &[String]) -> Result<Vec<GrantRow>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let maps: Vec<HashMap<String, String>> = self.with(|c| {
            let mut pipe = redis::pipe();
            for id in ids {
                pipe.cmd("HGETALL").arg(self.key(&format!("grant:{id}")));
            }
            pipe.query(c)
        })?;
        Ok(maps.iter().filter_map(parse).collect())
    }

    pub(crate) fn grants(&self, all: bool) -> Result<Vec<GrantRow>, StoreError> {
        let set = self.key(if all { "all" } else { "live" });
        let ids: Vec<String> =
            self.with(|c| redis::cmd("ZRANGE").arg(&set).arg(0).arg(-1).query(c))?;
        let mut rows = self.rows(&ids)?;
        rows.sort_by(|a, b| (a.created, &a.id).cmp(&(b.created, &b.id)));
        Ok(rows)
    }

    pub(crate) fn end_grant(
        &self,
        id: &str,
        reason: &str,
        now: u64,
    ) -> Result<Option<GrantRow>, StoreError> {
        let n: i64 = self.with(|c| {
            self.end
                .arg(&self.prefix)
                .arg(now)
                .arg(id)
                .arg(reason)
                .invoke(c)
        })?;
        if n == 0 {
            return Ok(None);
        }
        self.grant(id)
    }

    pub(crate) fn allotted_ports(
        &self,
        now: u64,
    ) -> Result<std::collections::HashSet<u16>, StoreError> {
        let _ = now;
        let k = self.key("port");
        let ports: Vec<String> = self.with(|c| redis::cmd("HKEYS").arg(&k).query(c))?;
        Ok(ports.iter().filter_map(|p| p.parse().ok()).collect())
    }

    pub(crate) fn key_has_grant(&self, key: &str) -> Result<bool, StoreError> {
        let k = self.key("keys");
        self.with(|c| redis::cmd("SISMEMBER").arg(&k).arg(key).query(c))
    }

    pub(crate) fn mark_used(&self, id: &str, now: u64) -> Result<bool, StoreError> {
        let n: i64 = self.with(|c| self.mark_used.arg(&self.prefix).arg(id).arg(now).invoke(c))?;
        Ok(n == 1)
    }

    pub(crate) fn sweep(&self, now: u64) -> Result<Vec<GrantRow>, StoreError> {
        let ids: Vec<String> = self.with(|c| self.sweep.arg(&self.prefix).arg(now).invoke(c))?;
        self.rows(&ids)
    }

    pub(crate) fn next_expiry(&self) -> Result<Option<u64>, StoreError> {
        let k = self.key("live");
        let first: Vec<(String, f64)> = self.with(|c| {
            redis::cmd("ZRANGE")
                .arg(&k)
                .arg(0)
                .arg(0)
                .arg("WITHSCORES")
                .query(c)
        })?;
        Ok(first.first().map(|(_, t)| t.max(0.0) as u64))
    }

    pub(crate) fn grant_counts(&self, now: u64) -> Result<GrantCounts, StoreError> {
        let (live, counts) = (self.key("live"), self.key("counts"));
        let (live_n, expired_live, ended): (u64, u64, HashMap<String, u64>) = self.with(|c| {
            redis::pipe()
                .cmd("ZCOUNT")
                .arg(&live)
                .arg(format!("({now}"))
                .arg("+inf")
                .cmd("ZCOUNT")
                .arg(&live)
                .arg("-inf")
                .arg(now)
                .cmd("HGETALL")
                .arg(&counts)
                .query(c)
        })?;
        let n = |k: &str| ended.get(k).copied().unwrap_or(0);
        Ok(GrantCounts {
            live: live_n,
            revoked: n("revoked"),
            expired: n("expired") + expired_live,
            replaced: n("replaced"),
        })
    }
}

/// A grant's fields as stored in its hash (absent: none).
fn fields(g: &GrantRow) -> Vec<(&'static str, String)> {
    let mut f = vec![
        ("id", g.id.clone()),
        ("device", g.device.clone()),
        ("key", g.key.clone()),
        (
            "permit_open",
            serde_json::to_string(&g.permit_open).unwrap_or_else(|_| "[]".into()),
        ),
        ("created", g.created.to_string()),
        ("expires", g.expires.to_string()),
    ];
    if let Some(n) = &g.name {
        f.push(("name", n.clone()));
    }
    if let Some(s) = &g.source_address {
        f.push(("source_address", s.clone()));
    }
    f
}

/// A grant from its hash; `None` for an empty (missing) or unreadable one.
fn parse(m: &HashMap<String, String>) -> Option<GrantRow> {
    let num = |k: &str| m.get(k).and_then(|v| v.parse::<u64>().ok());
    Some(GrantRow {
        id: m.get("id")?.clone(),
        device: m.get("device")?.clone(),
        port: m.get("port")?.parse().ok()?,
        name: m.get("name").cloned(),
        key: m.get("key")?.clone(),
        permit_open: m
            .get("permit_open")
            .and_then(|v| serde_json::from_str(v).ok())
            .unwrap_or_default(),
        source_address: m.get("source_address").cloned(),
        created: num("created")?,
        expires: num("expires")?,
        first_used: num("first_used"),
        ended: num("ended"),
        end_reason: m.get("end_reason").cloned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_never_shows() {
        assert_eq!(
            without_password("redis://default:s3cret@10.0.0.5:6379/0"),
            "redis://default:***@10.0.0.5:6379/0"
        );
        assert_eq!(without_password("redis://10.0.0.5/"), "redis://10.0.0.5/");
        assert_eq!(without_password("redis://user@h/"), "redis://user@h/");
    }
}
