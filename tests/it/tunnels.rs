use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use crate::ssh::{keygen, port_range, Fixture};

/// `[tunnels]` for the fixtures: names under `t.localhost`.
const TUNNELS: &str = "\n[tunnels]\ndomain = \"t.localhost\"\n";

/// The short id a key publishes under (`NAME-<id>`): SHA-256 of its fingerprint, 8 hex digits.
fn own_id(public: &str) -> String {
    use sha2::Digest;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("k.pub");
    std::fs::write(&p, public).unwrap();
    let out = std::process::Command::new("ssh-keygen")
        .args(["-l", "-E", "sha256", "-f"])
        .arg(&p)
        .output()
        .unwrap();
    let line = String::from_utf8(out.stdout).unwrap();
    let fp = line.split_whitespace().nth(1).unwrap().to_string();
    let d = sha2::Sha256::digest(fp.as_bytes());
    d[..4].iter().map(|b| format!("{b:02x}")).collect()
}

/// A tunnel counter now (process-wide: other tests add to it, so compare with `>=`).
fn counted(visits: bool, result: &'static str) -> u64 {
    let m = sluice::metrics::get();
    let f = if visits {
        &m.tunnel_visits
    } else {
        &m.tunnel_publish
    };
    f.get_or_create(&sluice::metrics::ResultLabels { result })
        .get()
}

/// Keeps `ssh -N -R spec` up with `key` through sluice on `port`; killed on drop.
fn publish(port: u16, key: &Path, spec: &str) -> tokio::process::Child {
    crate::ssh::ssh_via(
        port,
        key,
        &[
            "-N",
            "-o",
            "ExitOnForwardFailure=yes",
            "-R",
            spec,
            "tunnel@localhost",
        ],
    )
    .stderr(Stdio::null())
    .spawn()
    .unwrap()
}

/// Tries `ssh -W target` through sluice on `port` until it echoes, within 30 s.
async fn until_reached(port: u16, key: &Path, target: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (ok, out, err) = crate::ssh::w_via(port, key, target, b"ping through the tunnel").await;
        if ok && out == b"ping through the tunnel" {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{target} never answered through the tunnel: {err}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_name_published_with_dash_r_is_reached_by_name_and_owned() {
    let dir = tempfile::tempdir().unwrap();
    let owner = keygen(dir.path(), "owner");
    let other = keygen(dir.path(), "other");
    let authorized = format!(
        "permitlisten=\"mydevice:22\" {}\n{}\n",
        owner.public.trim(),
        other.public.trim()
    );
    let (_, range) = port_range(4);
    // Ports other than 22 and names nobody owns are allowed here, so that what refuses them
    // below is the registry, not permit_open.
    let permit = ["mydevice:*".to_string(), "*.t.localhost:22".to_string()];
    let f = Fixture::with(&authorized, &permit, &range, TUNNELS).await;

    let (opened, denied, no_tunnel) = (
        counted(true, "opened"),
        counted(false, "denied"),
        counted(true, "no_tunnel"),
    );
    // The device publishes its "sshd" (the echo server here) as mydevice:22; no port is bound.
    let mut device = publish(
        f.d.addr.port(),
        &owner.private,
        &format!("mydevice:22:{}", f.echo),
    );
    until_reached(f.d.addr.port(), &other.private, "mydevice:22").await;
    until_reached(f.d.addr.port(), &other.private, "mydevice.t.localhost:22").await;

    // Another key cannot take the name, even while its owner is connected.
    let out = f
        .forward_output(&other.private, &format!("mydevice:22:{}", f.echo))
        .await;
    assert!(
        !out.status.success(),
        "a key without permitlisten took mydevice"
    );
    // A port the device did not publish, and a name nobody owns under the domain: refused,
    // never looked up in DNS.
    // ssh reports the channel refusal: "connect failed" is the registry's (no live tunnel),
    // "administratively prohibited" would be permit_open's.
    let (ok, _, err) = f.w(&other.private, "mydevice:23", b"x").await;
    assert!(!ok, "mydevice:23 is not published");
    assert!(err.contains("open failed: connect failed"), "{err}");
    let (ok, _, err) = f.w(&other.private, "nobody.t.localhost:22", b"x").await;
    assert!(!ok);
    assert!(err.contains("open failed: connect failed"), "{err}");
    assert!(counted(true, "opened") >= opened + 2, "visits counted");
    assert!(
        counted(true, "no_tunnel") >= no_tunnel + 2,
        "refused visits counted"
    );
    assert!(counted(false, "denied") > denied, "the refused -R counted");

    // The publisher goes: visitors are refused, and the name stays its owner's.
    device.kill().await.unwrap();
    device.wait().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (ok, _, _) = f.w(&other.private, "mydevice:22", b"x").await;
        if !ok {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the tunnel outlived its publisher"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let out = f
        .forward_output(&other.private, &format!("mydevice:22:{}", f.echo))
        .await;
    assert!(
        !out.status.success(),
        "another key took an owned name while its owner was away"
    );
    // The owner comes back and gets it again.
    let _device = publish(
        f.d.addr.port(),
        &owner.private,
        &format!("mydevice:22:{}", f.echo),
    );
    until_reached(f.d.addr.port(), &other.private, "mydevice:22").await;
    f.d.stop().await;
}

#[tokio::test]
async fn without_permitlisten_a_key_publishes_under_its_own_id() {
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path(), "key");
    let own = own_id(&key.public);
    let name = format!("myapp-{own}");
    let (_, range) = port_range(4);
    let f = Fixture::with(&key.public, &[format!("{name}:80")], &range, TUNNELS).await;
    let denied = counted(false, "denied");
    let out = f
        .forward_output(&key.private, &format!("myapp:80:{}", f.echo))
        .await;
    assert!(
        counted(false, "denied") > denied,
        "refused by the naming rule"
    );
    assert!(
        !out.status.success(),
        "a bare name without permitlisten was published"
    );
    let _tunnel = publish(
        f.d.addr.port(),
        &key.private,
        &format!("{name}:80:{}", f.echo),
    );
    until_reached(f.d.addr.port(), &key.private, &format!("{name}:80")).await;
    // Not in ssh.permit_open (only NAME:80 is): the name alone does not open other ports.
    let (ok, _, err) = f.w(&key.private, &format!("{name}:81"), b"x").await;
    assert!(!ok);
    assert!(err.contains("administratively prohibited"), "{err}");
    f.d.stop().await;
}

#[tokio::test]
async fn ssh_dash_j_reaches_a_real_sshd_behind_a_name_and_scp_moves_32_mib() {
    use tokio::process::Command;
    let dir = tempfile::tempdir().unwrap();
    let device_key = keygen(dir.path(), "device");
    let admin = keygen(dir.path(), "admin");
    let mut sshd = crate::ssh::start_sshd(&admin).await;
    let authorized = format!(
        "permitlisten=\"mydevice:22\" {}\n{}\n",
        device_key.public.trim(),
        admin.public.trim()
    );
    let f = Fixture::with(
        &authorized,
        &["mydevice:22".into()],
        &port_range(4).1,
        TUNNELS,
    )
    .await;
    // The device behind NAT: its sshd is published by name, nothing listens on the server.
    let _device = publish(
        f.d.addr.port(),
        &device_key.private,
        &format!("mydevice:22:127.0.0.1:{}", sshd.port),
    );
    let user = crate::ssh::login_user();
    let cfg = crate::ssh::jump_config(dir.path(), f.d.addr.port(), &admin.private);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let out = Command::new("ssh")
            .arg("-F")
            .arg(&cfg)
            .args([
                "-J",
                "sluice",
                &format!("{user}@mydevice"),
                "echo via-name-$((6*7))",
            ])
            .output()
            .await
            .unwrap();
        if out.status.success() {
            assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "via-name-42");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "ssh -J sluice mydevice: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // 32 MiB there with scp (its own protocol, -O: the test sshd has no sftp subsystem).
    let data = crate::support::pattern(7, 32 << 20);
    let src = dir.path().join("payload");
    std::fs::write(&src, &data).unwrap();
    let dst = dir.path().join("copied");
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        Command::new("scp")
            .arg("-F")
            .arg(&cfg)
            .args(["-O", "-q", "-J", "sluice"])
            .arg(&src)
            .arg(format!("{user}@mydevice:{}", dst.display()))
            .output(),
    )
    .await
    .expect("scp hung")
    .unwrap();
    assert!(
        out.status.success(),
        "scp: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let copied = std::fs::read(&dst).unwrap();
    assert_eq!(
        crate::support::sha256(&copied),
        crate::support::sha256(&data),
        "32 MiB through the tunnel, changed"
    );
    sshd.child.kill().await.unwrap();
    f.d.stop().await;
}

#[tokio::test]
async fn a_restart_keeps_names_with_their_owners() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let owner = keygen(dir.path(), "owner");
    let other = keygen(dir.path(), "other");
    let authorized = format!(
        "permitlisten=\"mydevice:22\" {}\npermitlisten=\"mydevice:22\" {}\n",
        owner.public.trim(),
        other.public.trim()
    );
    std::fs::write(dir.path().join("authorized_keys"), authorized).unwrap();
    let echo = crate::support::echo_upstream().await;
    let cert = crate::support::TestCert::localhost();
    let extra = format!(
        "{}{TUNNELS}",
        crate::ssh::ssh_section(
            dir.path(),
            &state.join("hostkey"),
            &["mydevice:22".to_string()],
            &port_range(4).1,
            ""
        )
    );
    let spec = format!("mydevice:22:{echo}");
    let d = crate::support::Daemon::start_in(&state, &cert, &extra).await;
    let mut first = publish(d.addr.port(), &owner.private, &spec);
    until_reached(d.addr.port(), &other.private, "mydevice:22").await;
    first.kill().await.unwrap();
    first.wait().await.unwrap();
    d.stop().await;
    assert!(
        state.join("sluice.db").exists(),
        "no store in the state directory"
    );

    // Restarted: the other key, though permitlisten grants it the name too, cannot take it.
    let d = crate::support::Daemon::start_in(&state, &cert, &extra).await;
    let owned = counted(false, "owned");
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        publish(d.addr.port(), &other.private, &spec).wait(),
    )
    .await
    .expect("ssh -R with a refused name hung");
    assert!(
        !out.unwrap().success(),
        "a restart handed the name to another key"
    );
    assert!(
        counted(false, "owned") > owned,
        "refused as another key's name"
    );
    let _back = publish(d.addr.port(), &owner.private, &spec);
    until_reached(d.addr.port(), &other.private, "mydevice:22").await;
    d.stop().await;
}
