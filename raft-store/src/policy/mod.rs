//! The policy model: kubectl-style objects, their parsing and validation, and the
//! sans-IO state machine they live in.

pub mod object;
pub mod parse;
pub mod state;

pub use object::*;
pub use parse::{
    EppConfigValidator, InvalidDocument, MAX_TARGET_PORTS, accept_any_epp_config, parse_documents,
    parse_value, validate_object,
};
pub use state::{
    ChangeAction, ObjectChange, PolicyOp, PolicyRequest, PolicyResponse, PolicyState, Rejection,
    StoredObject, TokenHash, Touched,
};

#[cfg(test)]
mod tests;
