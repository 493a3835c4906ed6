//! Fuzzing harness for `vmotion-proto` (a cargo-fuzz project; see `docs/fuzzing.md`).
//!
//! The two fuzz targets in `fuzz_targets/` are thin wrappers around [`frames::run`] and
//! [`handshake::run`], which live here so that the seed generator
//! (`examples/gen_seeds.rs`) can run every seed it writes through the very same code and
//! check how deep it gets.
//!
//! Nothing here may make the code under test look better than it is: every input is fed
//! as a peer would send it, any `Err` from `vmotion-proto` is an accepted outcome, and a
//! panic (in `vmotion-proto` or in one of the assertions) is a finding.

pub mod frames;
pub mod handshake;
pub mod script;
