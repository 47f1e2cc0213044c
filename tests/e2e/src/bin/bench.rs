//! Benchmarks (see cargo xtask bench).
fn main() {}
