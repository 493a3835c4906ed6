//! Workspace-level integration tests live in `tests/tests/`; this crate has no library
//! code of its own. Tests that span crates, implementations or processes go here; tests
//! of one crate stay in that crate.
