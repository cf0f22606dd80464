//! The EndpointPickerConfig loader, and building a scheduler from what it accepts.
fn main() {
    afl::fuzz!(|data: &[u8]| {
        if let Ok(text) = std::str::from_utf8(data)
            && let Ok(cfg) = infermesh_scheduler::load_config(text)
        {
            let _ = infermesh_scheduler::Scheduler::new(&cfg);
        }
    });
}
