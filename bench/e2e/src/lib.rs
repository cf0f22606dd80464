//! The demo and the end-to-end benchmark programs of infermesh.
//!
//! The demo runs its nodes as processes of its own executable: a binary that calls
//! [`demo::run`] must first hand `node …` command lines to [`demo::tier::node_process`].
//!
//! Contract: everything here runs real infermesh nodes (`infermesh-node`) against simulated
//! pods (`infermesh-sim`) on loopback and measures them with `infermesh-bench`, so the node
//! itself links neither the simulator nor the load generator. The library holds the demo
//! ([`demo`]); the binaries are `infermesh-demo` and the benchmark programs that
//! `bench/dataplane/run.sh`, `bench/policy/run.sh` and `bench/mesh-e2e/run.sh` build
//! (`dataplane`, `extproc-null`, `policy`, `mesh-e2e`), and `pd` (bench/pd/pd.rs).

pub mod demo;
