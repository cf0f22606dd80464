//! The policy model: kubectl-style objects, their parsing and validation, and the
//! sans-IO state machine they live in.

pub mod object;
pub mod parse;
pub mod state;

pub use object::*;
pub use parse::{
    EppConfigValidator, InvalidDocument, InvalidTargetPorts, MAX_TARGET_PORTS,
    accept_any_epp_config, parse_document_values, parse_documents, parse_value, read_documents,
    validate_object, validate_target_ports,
};
pub use state::{
    ChangeAction, ObjectChange, PolicyOp, PolicyRequest, PolicyResponse, PolicyState, Rejection,
    StoredObject, TokenChange, TokenHash, TokenRole, Touched,
};

#[cfg(test)]
mod tests;
