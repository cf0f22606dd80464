//! Policy documents as `infermesh policy apply` and the admin API take them, validated as
//! the Raft leader validates them (EndpointPickerConfigs through the scheduler's loader).
use std::sync::Arc;

fn main() {
    let validator: infermesh_raft_store::policy::EppConfigValidator = Arc::new(|yaml: &str| {
        let cfg = infermesh_scheduler::load_config(yaml)?;
        infermesh_scheduler::Scheduler::new(&cfg)?;
        Ok(())
    });
    let validator = std::panic::AssertUnwindSafe(validator);
    afl::fuzz!(|data: &[u8]| {
        // Bound whole, so the closure captures the unwind-safe wrapper, not its field.
        let wrapped: &std::panic::AssertUnwindSafe<_> = &validator;
        if let Ok(text) = std::str::from_utf8(data) {
            let _ = infermesh_raft_store::policy::parse_documents(text, &wrapped.0);
        }
    });
}
