//! The programs themselves: each `main` parses its command line, does its one step and
//! chain-loads the rest. `src/bin/*.rs` only call them; `chain` calls them too when the
//! next program is a sibling binary of the same installation (see `chain::exec`).

pub mod auth;
pub mod dial;
pub mod listen;
pub mod splice;
