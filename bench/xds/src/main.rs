//! ADS load client (work in progress).
fn main() {}
