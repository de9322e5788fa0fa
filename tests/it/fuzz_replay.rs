//! Replays the committed fuzz inputs through the fuzz targets' bodies, on stable: every file of
//! `fuzz/corpus/<target>/` and of `fuzz/regressions/<target>/` (if present). The fuzzers
//! themselves run with `scripts/fuzz` (nightly, cargo-fuzz); see `fuzz/README.md`.

#[path = "../../fuzz/src/targets.rs"]
mod targets;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// The files of `dir`, sorted; none if it does not exist.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .map(|e| e.expect("read the directory").path())
            .filter(|p| p.is_file())
            .collect(),
        Err(_) => Vec::new(),
    };
    out.sort();
    out
}

fn replay(name: &str, body: fn(&[u8])) {
    let corpus = files(&fuzz_dir().join("corpus").join(name));
    assert!(
        !corpus.is_empty(),
        "fuzz/corpus/{name} is missing or empty: the seeds are committed (fuzz/capture-seeds)"
    );
    let regressions = files(&fuzz_dir().join("regressions").join(name));
    run_all(name, body, corpus.iter().chain(&regressions));
}

fn run_all<'a>(name: &str, body: fn(&[u8]), inputs: impl Iterator<Item = &'a PathBuf>) {
    let inputs: Vec<&PathBuf> = inputs.collect();
    let mut failed = Vec::new();
    for f in &inputs {
        let data = std::fs::read(f).expect("read a corpus file");
        if catch_unwind(AssertUnwindSafe(|| body(&data))).is_err() {
            failed.push(
                f.strip_prefix(fuzz_dir())
                    .unwrap_or(f)
                    .display()
                    .to_string(),
            );
        }
    }
    assert!(
        failed.is_empty(),
        "{name}: {} of {} inputs failed (panic messages above); reproduce one with \
         `cargo +nightly fuzz run {name} fuzz/<file>` (with SLUICE_FUZZ_OPEN_BUGS=1 for open \
         bugs):\n  {}",
        failed.len(),
        inputs.len(),
        failed.join("\n  ")
    );
}

/// One test per target, named after it, and the list of them all.
macro_rules! replay_tests {
    ($($name:ident),* $(,)?) => {
        const TARGETS: &[(&str, fn(&[u8]))] = &[$((stringify!($name), targets::$name)),*];
        $(
            #[test]
            fn $name() {
                replay(stringify!($name), targets::$name);
            }
        )*
    };
}

replay_tests!(
    classify,
    proxy_header,
    http_head,
    authorized_keys,
    cert_options,
    policy,
    config,
    pin,
    proxy_url,
    connect_reply,
    tunnel_inputs,
    control_inputs,
    tunnel_client_inputs,
);

/// The regression inputs with the checks of still-open bugs on (`targets::check_open_bugs`):
/// fails until those are fixed. Once one is, drop the `open(...)` guard around its check in
/// `fuzz/src/targets.rs`, and the ordinary replay enforces it from then on.
#[test]
#[ignore = "bugs found by fuzzing, still open: run with --ignored"]
fn open_bugs() {
    targets::check_open_bugs(true);
    for (name, body) in TARGETS {
        let regressions = files(&fuzz_dir().join("regressions").join(name));
        run_all(name, *body, regressions.iter());
    }
}

/// Each fuzz target and corpus directory is replayed here, and nothing replayed is missing.
#[test]
fn every_target_is_replayed() {
    let names = |dir: &str, strip: &str| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(fuzz_dir().join(dir))
            .unwrap_or_else(|e| panic!("fuzz/{dir}: {e}"))
            .map(|e| e.expect("read the directory").file_name())
            .filter_map(|n| {
                n.to_str()
                    .and_then(|n| n.strip_suffix(strip))
                    .map(String::from)
            })
            .collect();
        v.sort();
        v
    };
    let mut listed: Vec<String> = TARGETS.iter().map(|(n, _)| n.to_string()).collect();
    listed.sort();
    assert_eq!(names("fuzz_targets", ".rs"), listed, "fuzz/fuzz_targets");
    assert_eq!(names("corpus", ""), listed, "fuzz/corpus");
}
