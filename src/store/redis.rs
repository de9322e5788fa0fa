//! The store in Redis (`[store] redis`): what several replicas will share. Every change that
//! reads before it writes (a grant's port allotment, a name's claim, ending a grant) is one Lua
//! script, so Redis runs it atomically: two issues never get one port.
//!
//! Keys, under the prefix (default `sluice:`): `grant:ID` (a hash of the grant's fields),
//! `all` (sorted set of every grant id by creation), `live` (live grant ids by expiry),
//! `port` and `device` (hashes to the live grant id), `names` (tunnel name to owner),
//! `keys` (fingerprints of keys a grant was issued for), `counts` (ended grants by reason),
//! `locks` (lock id to the lock as JSON).
//!
//! One synchronous connection behind a mutex, with connect, read and write timeouts: a call
//! blocks its thread (callers queue behind the mutex), a broken connection is made again on
//! the next call, and for a second after a failed connect calls fail at once rather than each
//! waiting out the timeout. Redis must not evict these keys (`maxmemory-policy noeviction`);
//! Redis Cluster is not supported (the scripts name their keys in ARGV).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use super::{Allot, Claim, GrantCounts, GrantRow, LockRow, StoreError};

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
  table.insert(ended, cjson.encode(redis.call('HGETALL', k)))
end
local function sweep(now)
  for _, gid in ipairs(redis.call('ZRANGEBYSCORE', p .. 'live', '-inf', now)) do
    finish(gid, redis.call('HGET', p .. 'grant:' .. gid, 'expires'), 'expired')
  end
end
"#;

/// ARGV: prefix, now, id, device, want (0: any), low, high, owner, replace (1/0), name ('':
/// none), key, expires, then the new grant's field/value pairs.
/// Returns {'ok', port, ended...}, {'device'|'port'|'name', who, ended...} or {'full', '',
/// ended...}: what the sweep (and a replace) ended, each grant's hash as JSON, is kept even
/// when the issue is refused, so it is reported either way.
const ISSUE: &str = r#"
local now = tonumber(ARGV[2])
local id, device, want = ARGV[3], ARGV[4], tonumber(ARGV[5])
local lo, hi, owner, replace = tonumber(ARGV[6]), tonumber(ARGV[7]), ARGV[8], ARGV[9] == '1'
local name, key, expires = ARGV[10], ARGV[11], tonumber(ARGV[12])
sweep(now)
local function refuse(why, who)
  local out = {why, who}
  for _, e in ipairs(ended) do table.insert(out, e) end
  return out
end
local old = redis.call('HGET', p .. 'device', device)
if old and not replace then return refuse('device', old) end
if name ~= '' then
  local o = redis.call('HGET', p .. 'names', name)
  if o and o ~= owner then return refuse('name', o) end
end
local port = nil
if want > 0 then
  local h = redis.call('HGET', p .. 'port', tostring(want))
  if h and h ~= old then return refuse('port', h) end
  port = want
else
  for q = lo, hi do
    local h = redis.call('HGET', p .. 'port', tostring(q))
    if (not h) or h == old then port = q break end
  end
  if not port then return refuse('full', '') end
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
local out = {'ok', tostring(port)}
for _, e in ipairs(ended) do table.insert(out, e) end
return out
"#;

/// ARGV: prefix, now. Returns the grants it ended (JSON).
const SWEEP: &str = r#"
sweep(tonumber(ARGV[2]))
return ended
"#;

/// ARGV: prefix, now, id, reason. Returns the grant as ended (JSON), if it was live and
/// unexpired; else nothing.
const END: &str = r#"
local now, id, reason = tonumber(ARGV[2]), ARGV[3], ARGV[4]
local k = p .. 'grant:' .. id
local g = redis.call('HMGET', k, 'ended', 'expires')
if g[1] or not g[2] or tonumber(g[2]) <= now then return {} end
finish(id, now, reason)
return ended
"#;

/// ARGV: prefix, name, owner. {'new'}, {'ours'} or {'other', owner}, in one step.
const CLAIM: &str = r#"
local o = redis.call('HGET', p .. 'names', ARGV[2])
if not o then
  redis.call('HSET', p .. 'names', ARGV[2], ARGV[3])
  return {'new'}
end
if o == ARGV[3] then return {'ours'} end
return {'other', o}
"#;

/// ARGV: prefix, now. Live grants' ports (expired ones not swept yet left out).
const ALLOTTED: &str = r#"
local out = {}
for _, gid in ipairs(redis.call('ZRANGEBYSCORE', p .. 'live', '(' .. ARGV[2], '+inf')) do
  local port = redis.call('HGET', p .. 'grant:' .. gid, 'port')
  if port then table.insert(out, port) end
end
return out
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
    claim: redis::Script,
    allotted: redis::Script,
    /// For errors: the URL without its password.
    shown: String,
    /// Grants a refused issue's sweep ended: reported by the next `sweep`.
    unreported: Mutex<Vec<GrantRow>>,
    /// After a failed connect, calls fail at once until then instead of each waiting out the
    /// timeout in turn.
    down_until: Mutex<Option<tokio::time::Instant>>,
}

/// How long calls fail fast after a failed connect.
const BACKOFF: Duration = Duration::from_secs(1);

fn script(body: &str) -> redis::Script {
    redis::Script::new(&format!("{FINISH}\n{body}"))
}

/// `redis://user:secret@host/` as `redis://user:***@host/`, and `?pass=secret` as
/// `?pass=***` (unix sockets).
fn without_password(url: &str) -> String {
    let url = match url.find("pass=") {
        Some(i) => {
            let end = url[i..].find('&').map_or(url.len(), |e| i + e);
            format!("{}pass=***{}", &url[..i], &url[end..])
        }
        None => url.to_string(),
    };
    without_userinfo_password(&url)
}

fn without_userinfo_password(url: &str) -> String {
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
            claim: script(CLAIM),
            allotted: script(ALLOTTED),
            shown,
            unreported: Mutex::new(Vec::new()),
            down_until: Mutex::new(None),
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
            let now = tokio::time::Instant::now();
            {
                let down = self.down_until.lock().unwrap_or_else(|p| p.into_inner());
                if down.is_some_and(|t| now < t) {
                    return Err(StoreError::Redis {
                        url: self.shown.clone(),
                        message: "unreachable a moment ago; not retried yet".into(),
                    });
                }
            }
            let c = match self.client.get_connection_with_timeout(self.timeout) {
                Ok(c) => c,
                Err(e) => {
                    *self.down_until.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(tokio::time::Instant::now() + BACKOFF);
                    return Err(self.err(&e));
                }
            };
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
        let out: Vec<String> =
            self.with(|c| self.claim.arg(&self.prefix).arg(name).arg(owner).invoke(c))?;
        Ok(match out.first().map(String::as_str) {
            Some("new") => Claim::New,
            Some("ours") => Claim::Ours,
            _ => Claim::Other(out.get(1).cloned().unwrap_or_default()),
        })
    }

    pub(crate) fn add_lock(&self, l: &LockRow) -> Result<(), StoreError> {
        let json = serde_json::to_string(l).unwrap_or_default();
        let locks = self.key("locks");
        self.with(|c| {
            redis::cmd("HSET")
                .arg(&locks)
                .arg(&l.id)
                .arg(&json)
                .query::<i64>(c)
        })?;
        Ok(())
    }

    pub(crate) fn lift_lock(&self, id: &str) -> Result<Option<LockRow>, StoreError> {
        let locks = self.key("locks");
        // HGET then HDEL in one transaction: two lifts never both report the lock.
        let (json, deleted): (Option<String>, i64) = self.with(|c| {
            redis::pipe()
                .atomic()
                .cmd("HGET")
                .arg(&locks)
                .arg(id)
                .cmd("HDEL")
                .arg(&locks)
                .arg(id)
                .query(c)
        })?;
        Ok(json
            .filter(|_| deleted == 1)
            .and_then(|j| serde_json::from_str(&j).ok()))
    }

    pub(crate) fn locks(&self) -> Result<Vec<LockRow>, StoreError> {
        let locks = self.key("locks");
        let m: HashMap<String, String> =
            self.with(|c| redis::cmd("HGETALL").arg(&locks).query(c))?;
        let mut v: Vec<LockRow> = m
            .values()
            .filter_map(|j| serde_json::from_str(j).ok())
            .collect();
        v.sort_by(|a, b| (a.created, &a.id).cmp(&(b.created, &b.id)));
        Ok(v)
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
        let out: Vec<String> = self.with(|c| inv.invoke(c))?;
        let text = |i: usize| out.get(i).cloned().unwrap_or_default();
        let ended = rows_of(out.iter().skip(2));
        let refused = |a: Allot| {
            self.unreported
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(ended.iter().cloned());
            Ok(a)
        };
        match out.first().map(String::as_str) {
            Some("ok") => Ok(Allot::Granted {
                row: Box::new(GrantRow {
                    port: text(1).parse().unwrap_or(0),
                    ..new.clone()
                }),
                ended,
            }),
            Some("device") => refused(Allot::DeviceHasGrant(text(1))),
            Some("port") => refused(Allot::PortTaken(text(1))),
            Some("name") => refused(Allot::NameOwned(text(1))),
            Some("full") => refused(Allot::NoFreePort),
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
        let out: Vec<String> = self.with(|c| {
            self.end
                .arg(&self.prefix)
                .arg(now)
                .arg(id)
                .arg(reason)
                .invoke(c)
        })?;
        Ok(rows_of(out.iter()).into_iter().next())
    }

    pub(crate) fn allotted_ports(
        &self,
        now: u64,
    ) -> Result<std::collections::HashSet<u16>, StoreError> {
        let ports: Vec<String> =
            self.with(|c| self.allotted.arg(&self.prefix).arg(now).invoke(c))?;
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
        let out: Vec<String> = self.with(|c| self.sweep.arg(&self.prefix).arg(now).invoke(c))?;
        let mut rows =
            std::mem::take(&mut *self.unreported.lock().unwrap_or_else(|p| p.into_inner()));
        rows.extend(rows_of(out.iter()));
        Ok(rows)
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

/// Grants the scripts return: each one's hash as the JSON of HGETALL's flat list.
fn rows_of<'a>(items: impl Iterator<Item = &'a String>) -> Vec<GrantRow> {
    items
        .filter_map(|j| serde_json::from_str::<Vec<String>>(j).ok())
        .filter_map(|flat| {
            let m: HashMap<String, String> = flat
                .chunks(2)
                .filter_map(|kv| Some((kv.first()?.clone(), kv.get(1)?.clone())))
                .collect();
            parse(&m)
        })
        .collect()
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
        assert_eq!(
            without_password("redis+unix:///run/redis.sock?db=1&pass=s3cret&x=1"),
            "redis+unix:///run/redis.sock?db=1&pass=***&x=1"
        );
    }
}
