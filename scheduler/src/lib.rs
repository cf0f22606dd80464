//! IO-free Endpoint Picker core (see README).
