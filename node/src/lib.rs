//! infermesh node.
