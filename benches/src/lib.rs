//! Benchmarks live in `benches/benches/`; results and the commands that reproduce them are
//! in `docs/performance.md`.
