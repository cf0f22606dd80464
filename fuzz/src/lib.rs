//! Shared helpers of the fuzz targets in `src/bin/`: each target is one `afl::fuzz!` loop
//! over one kind of untrusted input (`scripts/fuzz.sh` builds, seeds and runs them).

/// Splits `data` into length-prefixed chunks (one byte of length, then that many bytes), so
/// one input can carry a sequence of protocol messages.
pub fn chunks(mut data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while let Some((&n, rest)) = data.split_first() {
        let n = usize::from(n).min(rest.len());
        out.push(&rest[..n]);
        data = &rest[n..];
    }
    out
}
