//! The users file parser (`Users::parse`): `user:hash[:rules]` lines.
//!
//! Input: the file's text (invalid UTF-8 replaced, as `Users::load` refuses it).
//! Checked: no panic; an accepted file has one user per line that is neither blank nor
//! a comment, each name unique and 1 to 255 printable bytes without a colon, each hash
//! one that the hash target's checks accept (a strong scheme within its cost limits),
//! each rule one that `Rule::parse` takes; a refusal names a line of the file.

use std::collections::HashSet;

use tcpsplice::auth::password::StoredHash;
use tcpsplice::auth::users::Users;
use tcpsplice::rules::Rule;

use crate::{hash, user_name_ok};

fn is_entry(line: &str) -> bool {
    let t = line.trim();
    !t.is_empty() && !t.starts_with('#')
}

pub fn run(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let lines: Vec<&str> = text.lines().map(|l| l.trim_end_matches('\r')).collect();
    match Users::parse(&text) {
        Ok(users) => {
            let mut names = HashSet::new();
            for line in lines.iter().filter(|l| is_entry(l)) {
                let mut fields = line.splitn(3, ':');
                let name = fields.next().unwrap();
                assert!(user_name_ok(name.as_bytes()), "accepted user name {name:?}");
                assert!(names.insert(name), "accepted user {name:?} twice");
                let text = fields
                    .next()
                    .expect("accepted a line without a hash")
                    .trim();
                let h = StoredHash::parse(text).expect("accepted a hash its parser refuses");
                hash::check_accepted(text, &h);
                for r in fields
                    .next()
                    .unwrap_or("")
                    .split(|c: char| c == ',' || c.is_ascii_whitespace())
                    .filter(|r| !r.is_empty())
                {
                    assert!(Rule::parse(r).is_ok(), "accepted rule {r:?}");
                }
            }
            assert_eq!(users.len(), names.len());
        }
        Err((line, why)) => {
            assert!(
                (1..=lines.len()).contains(&line),
                "refusal names line {line} of {}: {why}",
                lines.len()
            );
            assert!(
                is_entry(lines[line - 1]),
                "refusal names a blank or comment line"
            );
        }
    }
}
