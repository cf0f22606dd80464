//! Process exit codes shared by the `infermesh` subcommands.

/// Exit code for a configuration error (sysexits EX_USAGE).
pub const EXIT_CONFIG: u8 = 64;
