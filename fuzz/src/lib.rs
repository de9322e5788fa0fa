//! sluice's fuzz targets. Each target's body is a plain function in [`targets`], so that
//! sluice's own test suite replays the committed corpus through the same code on stable
//! (`tests/it/fuzz_replay.rs`); `fuzz_targets/*.rs` only hand libFuzzer's input to them.

pub mod targets;
