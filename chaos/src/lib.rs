//! infermesh's chaos suite: a tier of infermesh nodes, simulated vLLM pods and Envoy,
//! each on its own host (a loopback address, or a network namespace), under faults —
//! SIGKILL, SIGSTOP, partitions, blackholes, packet loss, delay, a full Raft disk, dead,
//! hung and slow pods, Envoy restarts, rolling restarts, leader kills — while bounded
//! client traffic and concurrent policy writes flow. Every run is seeded and reports, per
//! fault, the requests that failed (and whether any failed after the detection window),
//! failover and convergence times, acknowledged writes lost, and a timeline.
//!
//! The driver is [`run::run`]; [`net`] places processes, [`tier`] starts them,
//! [`traffic`] and [`writes`] load the tier, [`report`] judges and renders.

pub mod net;
pub mod relay;
pub mod report;
pub mod run;
pub mod scenario;
pub mod tier;
pub mod traffic;
pub mod writes;
