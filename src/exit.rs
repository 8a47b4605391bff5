//! The exit codes of the whole suite (DESIGN.md). Every program documents this table in
//! its man page; nothing else decides an exit status.

/// Done: both streams ended cleanly, or the program exec'd the next one.
pub const OK: i32 = 0;
/// Refused or ended by policy: bad credentials, target not allowed, idle timeout,
/// peer reset, terminated by a signal.
pub const POLICY: i32 = 1;
/// Bad usage or configuration: trying again will not help.
pub const USAGE: i32 = 100;
/// Temporary or system failure: connect refused, DNS failure, out of fds.
pub const TEMP: i32 = 111;
/// The next program exists but could not be exec'd.
pub const NOEXEC: i32 = 126;
/// The next program was not found.
pub const NOTFOUND: i32 = 127;
