//! The Prometheus text parser a node runs on every pod's /metrics page.
fn main() {
    afl::fuzz!(|data: &[u8]| {
        if let Ok(page) = std::str::from_utf8(data) {
            let mut n = 0usize;
            let _ = infermesh_node::scrape::prom_text::parse(page, |s| {
                n += s.labels().count();
            });
        }
    });
}
