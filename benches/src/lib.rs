//! Shared helpers for the criterion benches live in `benches/benches/`; this library is empty by design.
