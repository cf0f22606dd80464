//! The `--endpoints` file (an InferencePool with pods, objectives and rewrites).
fn main() {
    afl::fuzz!(|data: &[u8]| {
        if let Ok(text) = std::str::from_utf8(data) {
            let _ = infermesh_node::discovery::parse_pool(text);
        }
    });
}
