//! Live sessions, kill and locks (issue 14) with real OpenSSH clients: `sluice sessions` lists
//! every session with its identity, channels, listeners and tunnels while bytes move;
//! `sluice sessions kill` ends one with its message; `sluice lock` by key, grant, device and
//! source ends the matching sessions and refuses them until lifted while others keep working;
//! locks survive a restart (SQLite and Redis); the audit trail has every event, chained.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

use crate::grants::{exits_within, save_credentials, store_for, Backend, Server, DEVICE, NAME};
use crate::ssh::{keygen, ssh_via, Key};
use crate::support::bin;

/// A TCP echo server on loopback; its port.
async fn echo() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    port
}

/// `sluice ARGS` against `s`'s control socket: (exit code, stdout, stderr).
async fn sluice(s: &Server, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin())
        .args(args)
        .arg("--config")
        .arg(s.dir.join("sluice.toml"))
        .arg("--state-dir")
        .arg(s.dir.join("state"))
        .output()
        .await
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `sluice sessions --json`.
async fn sessions(s: &Server) -> serde_json::Value {
    let (code, out, err) = sluice(s, &["sessions", "--json"]).await;
    assert_eq!(code, 0, "sluice sessions: {err}");
    serde_json::from_str(&out).unwrap()
}

/// Waits up to 20 s for a live session that `pick` accepts; that session.
async fn session_where(
    s: &Server,
    what: &str,
    pick: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = sessions(s).await;
        if let Some(x) = v["sessions"].as_array().unwrap().iter().find(|x| pick(x)) {
            return x.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no session {what} within 20 s: {v:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits up to 20 s until no live session `pick` accepts.
async fn no_session_where(s: &Server, what: &str, pick: impl Fn(&serde_json::Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = sessions(s).await;
        if !v["sessions"].as_array().unwrap().iter().any(&pick) {
            return;
        }
        assert!(Instant::now() < deadline, "still a session {what}: {v:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn fingerprint(key: &Key) -> String {
    let out = std::process::Command::new("ssh-keygen")
        .arg("-lf")
        .arg(format!("{}.pub", key.private.display()))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_string()
}

/// The device publishing its port and name with the grant's certificate.
fn device(s: &Server, key: &Path, port: u16, echo: u16) -> Child {
    s.device_ssh(
        key,
        DEVICE,
        &[
            "-N",
            "-R",
            &format!("{port}:127.0.0.1:{echo}"),
            "-R",
            &format!("{NAME}:22:127.0.0.1:{echo}"),
        ],
    )
    .stderr(Stdio::piped())
    .spawn()
    .unwrap()
}

/// A round trip through `ssh -W 127.0.0.1:ECHO` with `key`: sessions that no lock matches
/// keep working.
async fn w_works(s: &Server, key: &Key, echo: u16, what: &str) {
    let mut c = ssh_via(
        s.port(),
        &key.private,
        &["-W", &format!("127.0.0.1:{echo}"), "tunnel@localhost"],
    );
    let mut c = c
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = c.stdin.take().unwrap();
    stdin.write_all(b"still-here\n").await.unwrap();
    let mut got = vec![0u8; 11];
    let read = c.stdout.as_mut().unwrap().read_exact(&mut got);
    tokio::time::timeout(Duration::from_secs(20), read)
        .await
        .unwrap_or_else(|_| panic!("{what}: ssh -W did not echo within 20 s"))
        .unwrap();
    assert_eq!(&got, b"still-here\n", "{what}");
    drop(stdin);
    let _ = tokio::time::timeout(Duration::from_secs(10), c.wait()).await;
}

/// `sluice lock ARGS`; the lock id it printed.
async fn lock(s: &Server, args: &[&str]) -> String {
    let mut all = vec!["lock"];
    all.extend_from_slice(args);
    let (code, out, err) = sluice(s, &all).await;
    assert_eq!(code, 0, "sluice lock {args:?}: {err}");
    out.split_whitespace()
        .find(|w| w.starts_with("l-"))
        .map(|w| w.trim_end_matches(';').to_string())
        .unwrap_or_else(|| panic!("no lock id in {out}"))
}

async fn lift(s: &Server, id: &str) {
    let (code, _, err) = sluice(s, &["lock", "lift", id]).await;
    assert_eq!(code, 0, "sluice lock lift {id}: {err}");
}

/// The device's connection is refused while `lock` holds, the reason logged.
async fn device_refused(s: &mut Server, key: &Path, port: u16, echo: u16, lock: &str) {
    let out = s
        .run_refused(key, &["-N", "-R", &format!("{port}:127.0.0.1:{echo}")])
        .await;
    assert!(!out.status.success());
    s.line_with(&["authentication refused: locked", lock]);
}

#[tokio::test]
async fn sessions_are_listed_killed_and_locked_out_with_every_event_in_the_trail() {
    let dir = tempfile::tempdir().unwrap();
    let admin = keygen(dir.path(), "admin");
    let other = keygen(dir.path(), "other");
    let stranger = keygen(dir.path(), "stranger");
    let echo = echo().await;
    let range = crate::ssh::port_range(4);
    let mut s = Server::start_keys(dir.path(), admin, &[&other.public], range, "");
    let other_fp = fingerprint(&other);
    let reverse = s.first_port + 3;

    // A session with -L and -R: listed with its identity, listener and, while they are open,
    // its channels with byte counts that move.
    let local = crate::support::reserve_ports(1);
    let mut o = ssh_via(
        s.port(),
        &other.private,
        &[
            "-N",
            "-o",
            "ExitOnForwardFailure=yes",
            "-L",
            &format!("{local}:127.0.0.1:{echo}"),
            "-R",
            &format!("{reverse}:127.0.0.1:{echo}"),
            "tunnel@localhost",
        ],
    )
    .stderr(Stdio::piped())
    .kill_on_drop(true)
    .spawn()
    .unwrap();
    let listen = format!("127.0.0.1:{reverse}");
    let sess = session_where(&s, "of the other key with its -R", |x| {
        x["key"] == other_fp.as_str() && x["listeners"][0] == listen.as_str()
    })
    .await;
    let oid = sess["id"].as_u64().unwrap();
    assert_eq!(sess["user"], "tunnel", "{sess:#}");
    assert!(sess["source"].as_str().unwrap().starts_with("127.0.0.1:"));
    let data = crate::support::pattern(3, 256 << 10);
    let mut l = None;
    let deadline = Instant::now() + Duration::from_secs(20);
    while l.is_none() {
        l = tokio::net::TcpStream::connect(("127.0.0.1", local))
            .await
            .ok();
        assert!(Instant::now() < deadline, "-L never listened");
        if l.is_none() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let mut l = l.unwrap();
    let mut r = tokio::net::TcpStream::connect(("127.0.0.1", reverse))
        .await
        .unwrap();
    for c in [&mut l, &mut r] {
        c.write_all(&data).await.unwrap();
        let mut back = vec![0u8; data.len()];
        c.read_exact(&mut back).await.unwrap();
        assert_eq!(back, data);
    }
    let n = data.len() as u64;
    let sess = session_where(&s, "with both channels counted", |x| {
        let ch = x["channels"].as_array().cloned().unwrap_or_default();
        let counted = |kind: &str| {
            ch.iter().any(|c| {
                c["kind"] == kind
                    && c["bytes_up"].as_u64() >= Some(n)
                    && c["bytes_down"].as_u64() >= Some(n)
            })
        };
        x["id"] == oid && counted("direct") && counted("reverse")
    })
    .await;
    let direct = sess["channels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["kind"] == "direct")
        .unwrap();
    assert!(
        direct["target"]
            .as_str()
            .unwrap()
            .starts_with(&format!("127.0.0.1:{echo}")),
        "{sess:#}"
    );
    // -L bytes go up from the client; the echo comes down.
    drop((l, r));
    session_where(&s, "with its channels closed", |x| {
        x["id"] == oid && x["channels"].as_array().is_some_and(Vec::is_empty)
    })
    .await;

    // A device with a grant: its certificate, grant, device and the tunnels it holds.
    let issued = s.issue(&["--device", DEVICE, "--ttl", "10m"]).await;
    let gid = issued["grant"]["id"].as_str().unwrap().to_string();
    let port = issued["grant"]["port"].as_u64().unwrap() as u16;
    let dkey = save_credentials(dir.path(), &issued);
    let dfp = issued["grant"]["key"].as_str().unwrap().to_string();
    let mut d = device(&s, &dkey, port, echo);
    let is_device = |x: &serde_json::Value| x["device"] == DEVICE;
    let dsess = session_where(&s, "of the device with its tunnel", |x| {
        is_device(x) && x["tunnels"].as_array().is_some_and(|t| !t.is_empty())
    })
    .await;
    assert_eq!(dsess["grant"], gid.as_str(), "{dsess:#}");
    assert_eq!(dsess["key"], dfp.as_str(), "{dsess:#}");
    assert_eq!(dsess["certificate"]["key_id"], gid.as_str(), "{dsess:#}");
    assert_eq!(dsess["tunnels"][0]["name"], NAME, "{dsess:#}");
    // A visit by name: a tunnel channel in the visitor's session (the admin key's -W).
    let mut w = ssh_via(
        s.port(),
        &s.admin.private,
        &["-W", &format!("{NAME}:22"), "tunnel@localhost"],
    )
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .kill_on_drop(true)
    .spawn()
    .unwrap();
    w.stdin
        .as_mut()
        .unwrap()
        .write_all(b"by-name\n")
        .await
        .unwrap();
    let mut got = [0u8; 8];
    tokio::time::timeout(
        Duration::from_secs(20),
        w.stdout.as_mut().unwrap().read_exact(&mut got),
    )
    .await
    .expect("no echo by name")
    .unwrap();
    assert_eq!(&got, b"by-name\n");
    session_where(&s, "visiting the tunnel by name", |x| {
        x["channels"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c["kind"] == "tunnel"))
    })
    .await;
    drop(w.stdin.take());
    let _ = tokio::time::timeout(Duration::from_secs(10), w.wait()).await;

    // A failed key, for the trail.
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        ssh_via(s.port(), &stranger.private, &["-N", "tunnel@localhost"]).output(),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(!out.status.success());

    // Kill: the real client ends with the message.
    let (code, out, err) = sluice(&s, &["sessions", "kill", &oid.to_string()]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&format!("ended session {oid}")), "{out}");
    let said = exits_within(&mut o, Duration::from_secs(5), "after the kill").await;
    assert!(said.contains("closed by an administrator"), "{said}");
    no_session_where(&s, "killed", |x| x["id"] == oid).await;
    let (code, _, err) = sluice(&s, &["sessions", "kill", &oid.to_string()]).await;
    assert_ne!(code, 0);
    assert!(err.contains(&format!("no live session {oid}")), "{err}");

    // Locks: by key, by grant, by device. Each ends the device at once and refuses it while
    // the admin key keeps working; lifted, the device comes back.
    for (kind, value) in [
        ("--key", dfp.as_str()),
        ("--grant", &gid),
        ("--device", DEVICE),
    ] {
        let id = lock(&s, &[kind, value, "--reason", "stolen laptop"]).await;
        let said = exits_within(
            &mut d,
            Duration::from_secs(3),
            &format!("after lock {kind}"),
        )
        .await;
        assert!(
            said.contains("locked by an administrator: stolen laptop"),
            "lock {kind}: {said}"
        );
        device_refused(&mut s, &dkey, port, echo, &id).await;
        w_works(&s, &s.admin, echo, &format!("while locked {kind}")).await;
        lift(&s, &id).await;
        d = device(&s, &dkey, port, echo);
        session_where(
            &s,
            &format!("of the device after lifting {kind}"),
            is_device,
        )
        .await;
    }

    // By source: a session from 127.0.0.2 (plain SSH, bound there) ends; the device, from
    // 127.0.0.1, stays.
    let mut p = Command::new("ssh")
        .args([
            "-F",
            "none",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
        ])
        .args([
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
        ])
        .args(["-b", "127.0.0.2", "-p", &s.port().to_string(), "-i"])
        .arg(&other.private)
        .args(["-N", "tunnel@127.0.0.1"])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    session_where(&s, "from 127.0.0.2", |x| {
        x["source"]
            .as_str()
            .is_some_and(|a| a.starts_with("127.0.0.2:"))
    })
    .await;
    let id = lock(&s, &["--source", "127.0.0.2/32"]).await;
    let said = exits_within(&mut p, Duration::from_secs(3), "after the source lock").await;
    assert!(said.contains("locked by an administrator"), "{said}");
    assert!(
        sessions(&s).await["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .any(is_device),
        "the source lock ended the device too"
    );
    w_works(&s, &s.admin, echo, "while 127.0.0.2 is locked").await;
    lift(&s, &id).await;

    // A lock survives a restart; `sluice lock list` shows it.
    let id = lock(&s, &["--device", DEVICE, "--ttl", "1h"]).await;
    exits_within(&mut d, Duration::from_secs(3), "after the device lock").await;
    s.stop();
    s.spawn();
    device_refused(&mut s, &dkey, port, echo, &id).await;
    let (code, out, _) = sluice(&s, &["lock", "list"]).await;
    assert_eq!(code, 0);
    assert!(out.contains(&id) && out.contains(DEVICE), "{out}");
    lift(&s, &id).await;
    let (_, out, _) = sluice(&s, &["lock", "list"]).await;
    assert!(out.contains("no locks"), "{out}");
    let mut d = device(&s, &dkey, port, echo);
    session_where(&s, "of the device after the restart", is_device).await;

    // Bad requests name the field.
    let (code, _, err) = sluice(&s, &["lock", "--key", "SHA256:nope"]).await;
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("key: must be a key fingerprint"), "{err}");
    let (code, _, err) = sluice(&s, &["lock", "--source", "10.0.0.0/99"]).await;
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("source:"), "{err}");

    // A reload, for the trail.
    crate::cli::sighup(&s.d.as_ref().unwrap().child);
    s.line_with(&["SIGHUP"]);

    // The trail has every event, and its chain holds.
    let trail = dir.path().join("state/audit/audit.log");
    let needles = [
        "\"event\":\"connection_closed\"",
        "\"event\":\"ssh_auth_accepted\"",
        "\"event\":\"ssh_auth_refused\"",
        "\"event\":\"forward_opened\"",
        "\"kind\":\"direct\"",
        "\"kind\":\"reverse\"",
        "\"kind\":\"tunnel\"",
        "\"event\":\"forward_closed\"",
        "\"event\":\"reverse_forward_opened\"",
        "\"event\":\"tunnel_published\"",
        "\"event\":\"tunnel_ended\"",
        "\"how\":\"session_ended\"",
        "\"event\":\"grant_issued\"",
        "\"event\":\"grant_used\"",
        "\"event\":\"session_killed\"",
        "\"by\":\"the control socket\",\"why\":\"closed by an administrator\"",
        "\"event\":\"lock_added\"",
        "\"kind\":\"source\"",
        "\"event\":\"lock_lifted\"",
        "\"event\":\"reloaded\"",
        "\"reason\":\"locked (l-",
    ];
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let t = std::fs::read_to_string(&trail).unwrap_or_default();
        let missing: Vec<&&str> = needles.iter().filter(|n| !t.contains(**n)).collect();
        if missing.is_empty() {
            break t;
        }
        assert!(
            Instant::now() < deadline,
            "not in the trail: {missing:?}\n{t}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        text.lines()
            .any(|l| l.contains("\"event\":\"forward_closed\"")
                && l.contains(&format!("\"bytes_up\":{n}"))),
        "no forward_closed with the bytes moved"
    );
    let (code, out, err) = sluice(&s, &["audit", "verify"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("ok: "), "{out}");
    // Every line holds to the committed schema (which holds to src/audit.rs).
    schema_holds(&trail);
    // Search: by identity and event, by device and time.
    let (code, out, err) = sluice(
        &s,
        &[
            "audit",
            "search",
            "--identity",
            &other_fp,
            "--event",
            "session_killed",
            "--session",
            &oid.to_string(),
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(out.contains(&format!("\"session\":{oid}")), "{out}");
    let (code, out, _) = sluice(
        &s,
        &["audit", "search", "--since", "1h", "--device", DEVICE],
    )
    .await;
    assert_eq!(code, 0);
    for e in [
        "grant_used",
        "lock_added",
        "ssh_auth_refused",
        "tunnel_published",
    ] {
        assert!(
            out.contains(&format!("\"event\":\"{e}\"")),
            "no {e} for the device:\n{out}"
        );
    }
    assert!(
        !out.contains(&other_fp),
        "another key's events in the device's:\n{out}"
    );
    let (code, out, _) = sluice(&s, &["audit", "search", "--until", "1h"]).await;
    assert_eq!(
        (code, out.as_str()),
        (1, ""),
        "events from over an hour ago"
    );
    // A deleted line and a swapped pair are named where they break the chain.
    let lines: Vec<&str> = text.lines().collect();
    let broken = |name: &str, lines: Vec<&str>| {
        let p = dir.path().join(name);
        std::fs::write(&p, lines.join("\n") + "\n").unwrap();
        let out = std::process::Command::new(bin())
            .args(["audit", "verify"])
            .arg(&p)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let mut deleted = lines.clone();
    deleted.remove(4);
    let err = broken("deleted.log", deleted);
    assert!(
        err.contains("deleted.log:5: sequence 6 where 5 was due"),
        "{err}"
    );
    let mut swapped = lines.clone();
    swapped.swap(6, 7);
    let err = broken("swapped.log", swapped);
    assert!(
        err.contains("swapped.log:7: sequence 8 where 7 was due"),
        "{err}"
    );
    let _ = d.kill().await;
    s.stop();
}

/// Every line of `trail` validates against docs/audit.schema.json (python3-jsonschema, which
/// schemathesis brings), and the schema is the one scripts/audit-schema.py makes.
fn schema_holds(trail: &Path) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let st = std::process::Command::new("python3")
        .arg(root.join("scripts/audit-schema.py"))
        .arg("--check")
        .status()
        .unwrap();
    assert!(st.success(), "docs/audit.schema.json is stale");
    let check = "import json, sys, jsonschema\n\
        schema = json.load(open(sys.argv[1]))\n\
        v = jsonschema.Draft202012Validator(schema)\n\
        n = 0\n\
        for i, line in enumerate(open(sys.argv[2]), 1):\n\
        \x20   errs = list(v.iter_errors(json.loads(line)))\n\
        \x20   if errs: sys.exit(f'line {i}: {errs[0].message}: {line}')\n\
        \x20   n += 1\n\
        print(n)\n";
    let out = std::process::Command::new("python3")
        .args(["-c", check])
        .arg(root.join("docs/audit.schema.json"))
        .arg(trail)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the trail does not hold to docs/audit.schema.json (needs python3 jsonschema: pip install jsonschema): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let n: usize = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert!(n > 20, "only {n} lines checked");
}

/// sluice with `[audit] on_failure = ON_FAILURE` whose trail file is /dev/full: every write
/// fails with ENOSPC.
fn full_trail(
    dir: &Path,
    admin: &Key,
    on_failure: &str,
) -> (crate::cli::Child2, crate::support::TestCert) {
    let audit = dir.join("state/audit");
    std::fs::create_dir_all(&audit).unwrap();
    std::os::unix::fs::symlink("/dev/full", audit.join("audit.log")).unwrap();
    std::fs::write(dir.join("authorized_keys"), format!("{}\n", admin.public)).unwrap();
    let cert = crate::support::TestCert::new(&["localhost"]);
    let text = format!(
        "listen = [\"127.0.0.1:0\"]\nshutdown_grace = \"1s\"\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n\
         [routes.ssh]\n[ssh]\nauthorized_keys = [\"{}\"]\npermit_open = [\"127.0.0.1:*\"]\n\
         [audit]\non_failure = \"{on_failure}\"\n",
        cert.cert.display(),
        cert.key.display(),
        dir.join("authorized_keys").display(),
    );
    (crate::cli::serve_config(dir, &text), cert)
}

/// `ssh -W` to the echo server through `d` with `key`: whether it echoed.
async fn w_echoes(port: u16, key: &Key, echo: u16) -> bool {
    let mut c = ssh_via(
        port,
        &key.private,
        &["-W", &format!("127.0.0.1:{echo}"), "tunnel@localhost"],
    )
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .kill_on_drop(true)
    .spawn()
    .unwrap();
    let mut stdin = c.stdin.take().unwrap();
    let _ = stdin.write_all(b"ping\n").await;
    let mut got = [0u8; 5];
    let read = c.stdout.as_mut().unwrap().read_exact(&mut got);
    let ok = matches!(
        tokio::time::timeout(Duration::from_secs(20), read).await,
        Ok(Ok(_))
    );
    drop(stdin);
    let _ = c.kill().await;
    ok && &got == b"ping\n"
}

#[tokio::test]
async fn a_trail_that_cannot_be_written_refuses_new_sessions_only_when_told_to() {
    let echo = echo().await;
    // refuse: new sessions are refused while the trail fails; a trail that works again (the
    // file replaced) lets them in.
    let dir = tempfile::tempdir().unwrap();
    let admin = keygen(dir.path(), "admin");
    // The first write (audit_started) fails before sluice says it listens.
    let (mut d, _cert) = full_trail(dir.path(), &admin, "refuse");
    assert!(
        !w_echoes(d.addr.port(), &admin, echo).await,
        "a session got in without a trail"
    );
    crate::cli::wait_for_line(
        &d.log,
        "the audit trail cannot be written",
        Duration::from_secs(20),
    );
    let current = dir.path().join("state/audit/audit.log");
    std::fs::remove_file(&current).unwrap();
    std::fs::write(&current, b"").unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !w_echoes(d.addr.port(), &admin, echo).await {
        assert!(
            Instant::now() < deadline,
            "sessions still refused once the trail works"
        );
    }
    crate::cli::wait_for_line(
        &d.log,
        "audit trail: written again",
        Duration::from_secs(20),
    );
    let _ = d.child.kill();
    let _ = d.child.wait();
    // continue (the default): sessions go on, the failures logged.
    let dir = tempfile::tempdir().unwrap();
    let admin = keygen(dir.path(), "admin");
    let (mut d, _cert) = full_trail(dir.path(), &admin, "continue");
    assert!(
        w_echoes(d.addr.port(), &admin, echo).await,
        "on_failure = continue refused a session"
    );
    crate::cli::wait_for_line(
        &d.log,
        "audit trail: an event was not written",
        Duration::from_secs(20),
    );
    let _ = d.child.kill();
    let _ = d.child.wait();
}

#[tokio::test]
async fn with_redis_a_lock_ends_the_session_refuses_it_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let admin = keygen(dir.path(), "admin");
    let echo = echo().await;
    let (_redis, store) = store_for(Backend::Redis);
    let mut s = Server::start(dir.path(), admin, 4, &store);
    let issued = s.issue(&["--device", DEVICE, "--ttl", "10m"]).await;
    let port = issued["grant"]["port"].as_u64().unwrap() as u16;
    let dkey = save_credentials(dir.path(), &issued);
    let mut d = device(&s, &dkey, port, echo);
    session_where(&s, "of the device", |x| x["device"] == DEVICE).await;
    let id = lock(&s, &["--device", DEVICE, "--reason", "rma"]).await;
    let said = exits_within(&mut d, Duration::from_secs(3), "after the lock").await;
    assert!(said.contains("locked by an administrator: rma"), "{said}");
    s.stop();
    s.spawn();
    device_refused(&mut s, &dkey, port, echo, &id).await;
    w_works(
        &s,
        &s.admin,
        echo,
        "the admin key, while the device is locked",
    )
    .await;
    lift(&s, &id).await;
    let mut d = device(&s, &dkey, port, echo);
    session_where(&s, "of the device after the lift", |x| {
        x["device"] == DEVICE
    })
    .await;
    let _ = d.kill().await;
    s.stop();
}

#[tokio::test]
async fn the_admin_page_in_a_real_browser_shows_a_live_ssh_r_and_ends_it() {
    use std::os::unix::fs::PermissionsExt;
    use tokio::io::AsyncBufReadExt;
    crate::support::need("chromium", "chromium");
    crate::support::need("chromedriver", "chromium-driver");
    let dir = tempfile::tempdir().unwrap();
    let admin = keygen(dir.path(), "admin");
    let echo = echo().await;
    let tokens = dir.path().join("control.tokens");
    let token = "p".repeat(40);
    std::fs::write(&tokens, format!("ops {token}\n")).unwrap();
    std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut s = Server::start(
        dir.path(),
        admin,
        4,
        &format!(
            "[control]\nlisten = \"127.0.0.1:0\"\ntokens = \"{}\"\n",
            tokens.display()
        ),
    );
    let line = s.line_with(&["control API listening on TCP"]);
    let addr = line
        .split("listen=")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let port = addr.rsplit(':').next().unwrap();
    // SLUICE_SCREENSHOT=docs/admin-page.png keeps the page as the browser showed it.
    let shot = std::env::var("SLUICE_SCREENSHOT").unwrap_or_else(|_| "-".into());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/admin_page.py");
    let mut b = Command::new("python3")
        .arg(&script)
        .arg(format!("https://localhost:{port}"))
        .arg(&token)
        .arg(&shot)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut to = b.stdin.take().unwrap();
    let mut from = tokio::io::BufReader::new(b.stdout.take().unwrap()).lines();
    let mut errors = b.stderr.take().unwrap();
    let mut step = async |expect: &str| -> String {
        match tokio::time::timeout(Duration::from_secs(60), from.next_line()).await {
            Ok(Ok(Some(l))) if l.starts_with(expect) => l,
            other => {
                let mut e = String::new();
                let _ = errors.read_to_string(&mut e).await;
                panic!("the browser did not say {expect}: {other:?}\n{e} (needs python3 selenium: pip install selenium)")
            }
        }
    };
    step("LOGGED_IN").await;
    // Logged in first: the session appears on a page already open (it refreshes itself).
    let reverse = s.first_port + 2;
    let mut r = ssh_via(
        s.port(),
        &s.admin.private,
        &[
            "-N",
            "-o",
            "ExitOnForwardFailure=yes",
            "-R",
            &format!("{reverse}:127.0.0.1:{echo}"),
            "tunnel@localhost",
        ],
    )
    .stderr(Stdio::piped())
    .kill_on_drop(true)
    .spawn()
    .unwrap();
    to.write_all(format!("WAIT listens 127.0.0.1:{reverse}\n").as_bytes())
        .await
        .unwrap();
    let seen = step("SEEN").await;
    // Bytes through the -R port: the row's counts move without a reload.
    let mut c = tokio::net::TcpStream::connect(("127.0.0.1", reverse))
        .await
        .unwrap();
    c.write_all(b"through the tunnel\n").await.unwrap();
    let mut back = [0u8; 19];
    c.read_exact(&mut back).await.unwrap();
    drop(c);
    to.write_all(b"MOVED\n").await.unwrap();
    step("COUNTED").await;
    to.write_all(b"KILL\n").await.unwrap();
    let killed = step("KILLED").await;
    let id = seen.trim_start_matches("SEEN ").trim();
    assert!(killed.contains(&format!("Ended session {id}")), "{killed}");
    let said = exits_within(&mut r, Duration::from_secs(5), "after End session").await;
    assert!(said.contains("closed by an administrator"), "{said}");
    s.line_with(&["session ended", "admin page"]);
    let _ = b.wait().await;
    // Without the cookie: the login page, and a POST is refused.
    let out = Command::new("curl")
        .args(["-sk", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST"])
        .args(["-d", &format!("session={id}")])
        .arg(format!("https://localhost:{port}/ui/kill"))
        .output()
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "401");
    s.stop();
}
