//! Giving up root after binding: user and group names to ids, then setgroups, setgid,
//! setuid in that order (each later step needs the privilege the earlier ones use), and
//! a check that the old identity cannot come back.

use std::io;

use nix::unistd::{self, Gid, Group, Uid, User};

use crate::{environ, exit, sys};

/// The identity to run as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ids {
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
}

/// A user's uid and primary gid, from the password database. Ok(None) when no such user.
pub fn user(name: &str) -> io::Result<Option<Ids>> {
    no_nul(name)?;
    let found = User::from_name(name)?;
    Ok(found.map(|u| Ids {
        uid: u.uid.as_raw(),
        gid: u.gid.as_raw(),
    }))
}

/// A group's gid, from the group database. Ok(None) when no such group.
pub fn group(name: &str) -> io::Result<Option<libc::gid_t>> {
    no_nul(name)?;
    Ok(Group::from_name(name)?.map(|g| g.gid.as_raw()))
}

/// A name with a NUL byte cannot be looked up: an error, where nix would say "no such
/// user".
fn no_nul(name: &str) -> io::Result<()> {
    match name.contains('\0') {
        true => Err(io::ErrorKind::InvalidInput.into()),
        false => Ok(()),
    }
}

/// The identity asked for on the command line: `user` (a name, or a uid that then needs
/// `group`), `group` (a name or a gid, overriding the user's primary group), or with
/// `from_env` the numbers in `$UID` and `$GID` (envuidgid's convention). Ok(None) when
/// nothing was asked; Err carries the exit code and the message.
pub fn identity(
    user: Option<&str>,
    group: Option<&str>,
    from_env: bool,
) -> Result<Option<Ids>, (i32, String)> {
    let usage = |msg: String| Err((exit::USAGE, msg));
    if from_env {
        if user.is_some() || group.is_some() {
            return usage("-U excludes -u and -g".into());
        }
        let var = |name: &str| {
            let v = environ::var(name).unwrap_or_default();
            v.parse::<libc::uid_t>()
                .map_err(|_| (exit::USAGE, format!("-U: ${name} is not a number: {v:?}")))
        };
        return Ok(Some(Ids {
            uid: var("UID")?,
            gid: var("GID")?,
        }));
    }
    let gid = match group {
        None => None,
        Some(g) => Some(match g.parse::<libc::gid_t>() {
            Ok(gid) => gid,
            Err(_) => match self::group(g) {
                Ok(Some(gid)) => gid,
                Ok(None) => return usage(format!("-g: no such group: {g}")),
                Err(e) => {
                    return Err((
                        exit::TEMP,
                        format!("unable to look up group {g}: {}", sys::strerror(&e)),
                    ))
                }
            },
        }),
    };
    let Some(u) = user else {
        return match gid {
            Some(_) => usage("-g needs -u".into()),
            None => Ok(None),
        };
    };
    let ids = match u.parse::<libc::uid_t>() {
        Ok(uid) => match gid {
            Some(gid) => Ids { uid, gid },
            None => return usage("-u with a numeric uid needs -g".into()),
        },
        Err(_) => match self::user(u) {
            Ok(Some(ids)) => ids,
            Ok(None) => return usage(format!("-u: no such user: {u}")),
            Err(e) => {
                return Err((
                    exit::TEMP,
                    format!("unable to look up user {u}: {}", sys::strerror(&e)),
                ))
            }
        },
    };
    Ok(Some(Ids {
        gid: gid.unwrap_or(ids.gid),
        ..ids
    }))
}

/// Becomes `ids` for good: supplementary groups reduced to the one gid, then gid, then
/// uid. Any failure is returned, and the caller must not go on with the old identity.
pub fn drop_to(ids: Ids) -> Result<(), (&'static str, io::Error)> {
    let (uid, gid) = (Uid::from_raw(ids.uid), Gid::from_raw(ids.gid));
    unistd::setgroups(&[gid]).map_err(|e| ("setgroups", e.into()))?;
    unistd::setgid(gid).map_err(|e| ("setgid", e.into()))?;
    unistd::setuid(uid).map_err(|e| ("setuid", e.into()))?;
    let now = (
        unistd::getuid(),
        unistd::geteuid(),
        unistd::getgid(),
        unistd::getegid(),
    );
    if now != (uid, uid, gid, gid) {
        return Err(("verify", io::Error::from_raw_os_error(libc::EPERM)));
    }
    // setuid as root sets all three uids; if root could be regained, the drop failed.
    // Succeeding here is the failure we look for.
    if ids.uid != 0 && unistd::setuid(Uid::from_raw(0)).is_ok() {
        return Err(("verify", io::Error::from_raw_os_error(libc::EPERM)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_from_options() {
        assert_eq!(identity(None, None, false), Ok(None));
        assert_eq!(
            identity(Some("65534"), Some("65533"), false),
            Ok(Some(Ids {
                uid: 65534,
                gid: 65533
            }))
        );
        // root is in every password and group database.
        assert_eq!(
            identity(Some("root"), None, false),
            Ok(Some(Ids { uid: 0, gid: 0 }))
        );
        assert_eq!(
            identity(Some("root"), Some("7"), false),
            Ok(Some(Ids { uid: 0, gid: 7 }))
        );
        assert_eq!(identity(Some("0"), None, false).map_err(|e| e.0), Err(100));
        assert_eq!(identity(None, Some("0"), false).map_err(|e| e.0), Err(100));
        assert_eq!(identity(Some("0"), None, true).map_err(|e| e.0), Err(100));
        assert_eq!(
            identity(Some("no-such-user-here"), None, false).map_err(|e| e.0),
            Err(100)
        );
        assert_eq!(
            identity(Some("0"), Some("no-such-group-here"), false).map_err(|e| e.0),
            Err(100)
        );
    }
}
