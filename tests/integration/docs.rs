//! The documentation as a reader uses it: every inetd line of the man pages, README and
//! examples/ under real openbsd-inetd, the shipped systemd units through
//! `systemd-analyze verify`, the man pages through `mandoc -Tlint`, and the README's
//! recipes run as written.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::auth::{self, Target};
use super::util;

const AUTH: &str = env!("CARGO_BIN_EXE_tcpsplice-auth");
const DIAL: &str = env!("CARGO_BIN_EXE_tcpsplice-dial");
const SPLICE: &str = env!("CARGO_BIN_EXE_tcpsplice");
const LISTEN: &str = env!("CARGO_BIN_EXE_tcpsplice-listen");
const PROXY: &str = env!("CARGO_BIN_EXE_tcpsplice-proxy");
const LIMIT: Duration = Duration::from_secs(30);

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

const MAN_PAGES: &[&str] = &[
    "man/tcpsplice.1",
    "man/tcpsplice-auth.1",
    "man/tcpsplice-dial.1",
    "man/tcpsplice-listen.1",
    "man/tcpsplice-proxy.1",
];

/// A roff source line as it reads on the page, for the few escapes an example uses.
fn unroff(line: &str) -> String {
    line.replace("\\-", "-")
        .replace("\\(aq", "'")
        .replace("\\e", "\\")
}

// ---------------------------------------------------------------- inetd

/// The openbsd-inetd binary, unpacked from its Debian package into target/debs (it
/// conflicts with xinetd, so it is never installed): scripts/install-deps does it, and
/// so does this when it has not been done.
fn openbsd_inetd() -> PathBuf {
    let bin = repo("target/debs/openbsd-inetd/usr/sbin/inetd");
    if !bin.exists() {
        let r = util::run(
            Command::new(repo("scripts/deps/unpack")).arg("openbsd-inetd"),
            Duration::from_secs(120),
        );
        assert!(
            bin.exists(),
            "no {} (run scripts/install-deps test){}",
            bin.display(),
            r.show()
        );
    }
    bin
}

/// Every inetd.conf line the documentation shows (`SERVICE stream tcp nowait ...`), as a
/// reader would paste it, with where it came from.
fn documented_inetd_lines() -> Vec<(String, String)> {
    let mut found = Vec::new();
    let mut sources = vec!["examples/inetd.conf", "README.md"];
    sources.extend_from_slice(MAN_PAGES);
    for src in sources {
        for line in read(src).lines() {
            let text = if src.starts_with("man/") {
                unroff(line)
            } else {
                line.trim().to_string()
            };
            let f: Vec<&str> = text.split_whitespace().collect();
            if f.len() > 6 && f[1..4] == ["stream", "tcp", "nowait"] {
                found.push((src.to_string(), text.clone()));
            }
        }
    }
    found
}

/// A documented inetd line made to run here, field by field; nothing else is changed:
/// the service (a port) becomes `127.0.0.1:PORT`, the user root (the test's programs
/// need not be readable by another user, and no `tcpsplice` user exists), each
/// `/usr/local/bin/PROGRAM` the built program, `/usr/local/bin/checkpassword` the
/// test's, a target host (`db.internal`, `backend`) and the port after it the test's
/// target, and the rule `*:443` the target's address and port (loopback is denied
/// otherwise).
fn runnable(line: &str, port: u16, t: &Target, checkpassword: &Path) -> String {
    let f: Vec<&str> = line.split_whitespace().collect();
    let service = format!("127.0.0.1:{port}");
    let target_port = t.port.to_string();
    let rule = format!("127.0.0.1:{}", t.port);
    let mut out: Vec<&str> = vec![&service, f[1], f[2], f[3], "root"];
    let mut after_host = false;
    for w in &f[5..] {
        let w = match *w {
            "/usr/local/bin/tcpsplice" => SPLICE,
            "/usr/local/bin/tcpsplice-dial" => DIAL,
            "/usr/local/bin/tcpsplice-auth" => AUTH,
            "/usr/local/bin/checkpassword" => checkpassword.to_str().expect("path"),
            "db.internal" | "backend" => {
                after_host = true;
                out.push("127.0.0.1");
                continue;
            }
            "*:443" => &rule,
            _ if after_host => &target_port,
            w => w,
        };
        after_host = false;
        out.push(w);
    }
    out.join(" ")
}

#[test]
fn every_documented_inetd_line_works_under_openbsd_inetd() {
    let lines = documented_inetd_lines();
    for src in ["examples/inetd.conf", "README.md", "man/tcpsplice.1"] {
        assert!(
            lines.iter().any(|(s, _)| s == src),
            "no inetd line found in {src}"
        );
    }
    for page in ["man/tcpsplice-dial.1", "man/tcpsplice-auth.1"] {
        assert!(lines.iter().any(|(s, _)| s == page), "none in {page}");
    }
    for (src, line) in &lines {
        // inetd passes quotes and backslashes to the program as they are, and reads no
        // continuation lines; it runs services with no PATH.
        assert!(
            !line.contains(['\'', '"', '\\']),
            "{src}: inetd does no shell quoting: {line}"
        );
        for prog in line
            .split_whitespace()
            .skip(5)
            .filter(|w| w.starts_with("tcpsplice"))
        {
            assert!(
                line.split_whitespace().nth(6) == Some(prog),
                "{src}: {prog} is not named by its full path (inetd sets no PATH): {line}"
            );
        }
    }
    let inetd = openbsd_inetd();
    let t = auth::target();
    let dir = auth::scratch("docs-inetd");
    let cp = auth::checkpassword_script(
        "docs-inetd-cp",
        &format!(
            "tr '\\000' '\\n' <&3 | {{ read -r u; read -r p; [ \"$u\" = alice ] && [ \"$p\" = '{}' ]; }} || exit 1\nexec \"$@\"",
            auth::PW
        ),
    );
    let mut conf = String::new();
    let mut services = Vec::new();
    for (src, line) in &lines {
        let port = util::listener().1.port();
        let run = runnable(line, port, &t, &cp);
        assert!(!run.contains("/usr/local"), "{src}: {run}");
        conf.push_str(&run);
        conf.push('\n');
        services.push((src, port, line.contains("tcpsplice-auth")));
    }
    let conf_path = dir.join("inetd.conf");
    std::fs::write(&conf_path, &conf).expect("write inetd.conf");
    let log = dir.join("log");
    // -d: in the foreground, messages on stderr; the environment is laundered as always.
    let mut sup = util::Supervisor(
        Command::new(&inetd)
            .arg("-d")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("spawn inetd"),
    );
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    for &(src, port, proxy) in &services {
        util::wait_listening(port, &mut sup.0, "inetd");
        let url = format!("http://127.0.0.1:{}/", t.port);
        let tries: Vec<(bool, String, String)> = if proxy {
            let pw = auth::PW.replace(' ', "%20").replace(':', "%3A");
            vec![
                (
                    false,
                    format!("socks5h://alice:{pw}@127.0.0.1:{port}"),
                    url.clone(),
                ),
                (true, format!("http://alice:{pw}@127.0.0.1:{port}"), url),
            ]
        } else {
            // A forwarder: the client talks to the target through it.
            vec![(false, String::new(), format!("http://127.0.0.1:{port}/"))]
        };
        for (tunnel, proxy, url) in tries {
            let r = if proxy.is_empty() {
                util::run(
                    Command::new("curl").args(["-sS", "--max-time", "20", &url]),
                    LIMIT,
                )
            } else {
                auth::curl(tunnel, &proxy, &url)
            };
            assert!(
                r.status.success() && util::hash_of(&r.stdout) == util::hash_of(&t.body),
                "{src}: the line under inetd did not serve{}--- conf:\n{conf}--- inetd log:\n{}",
                r.show(),
                read_log()
            );
        }
    }
    drop(sup);
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------- systemd units

/// The unit files the README shows: each code block line `# [/etc/systemd/system/]NAME`
/// for a .socket or .service starts one, which runs to the next such line or the end of
/// the block. Units shown in one block go together.
fn readme_units() -> Vec<Vec<(String, String)>> {
    let mut blocks = Vec::new();
    let mut units: Vec<(String, String)> = Vec::new();
    for line in read("README.md").lines() {
        let code = line.strip_prefix("    ");
        if code.is_none() && !line.trim().is_empty() {
            if !units.is_empty() {
                blocks.push(std::mem::take(&mut units));
            }
            continue;
        }
        let code = code.unwrap_or("");
        let name = code
            .strip_prefix("# ")
            .map(|n| n.trim_start_matches("/etc/systemd/system/"))
            .filter(|n| !n.contains(' ') && (n.ends_with(".socket") || n.ends_with(".service")));
        match (name, units.last_mut()) {
            (Some(n), _) => units.push((n.to_string(), String::new())),
            (None, Some((_, text))) => {
                text.push_str(code);
                text.push('\n');
            }
            (None, None) => {}
        }
    }
    blocks.extend((!units.is_empty()).then_some(units));
    blocks
}

/// `systemd-analyze verify` of `units` written to a folder of their own, with the
/// installed programs' paths put to the built ones (verify checks that ExecStart= names
/// an executable). Returns what it said.
fn verify_units(tag: &str, units: &[(String, String)]) -> util::Ran {
    let dir = auth::scratch(tag);
    let mut names = Vec::new();
    for (name, text) in units {
        let mut text = text.clone();
        for (from, to) in [
            ("/usr/local/bin/tcpsplice-auth", AUTH),
            ("/usr/local/bin/tcpsplice-dial", DIAL),
            ("/usr/local/bin/tcpsplice-listen", LISTEN),
            ("/usr/local/bin/tcpsplice ", &format!("{SPLICE} ")),
            ("/usr/local/bin/tcpsplice\n", &format!("{SPLICE}\n")),
        ] {
            text = text.replace(from, to);
        }
        assert!(!text.contains("/usr/local/bin"), "{name}: {text}");
        std::fs::write(dir.join(name), text).expect("write unit");
        names.push(dir.join(name));
    }
    let ran = util::run(
        Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .args(&names)
            .current_dir(&dir),
        LIMIT,
    );
    let _ = std::fs::remove_dir_all(&dir);
    ran
}

#[test]
fn every_shipped_systemd_unit_verifies_clean() {
    let mut sets = Vec::new();
    let mut examples = Vec::new();
    for e in std::fs::read_dir(repo("examples"))
        .expect("examples/")
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".socket") || name.ends_with(".service") {
            let text = std::fs::read_to_string(e.path()).expect("unit");
            examples.push((name, text));
        }
    }
    assert!(examples.len() >= 2, "examples/ has no units: {examples:?}");
    sets.push(("examples".to_string(), examples));
    let readme = readme_units();
    assert!(
        readme.iter().flatten().count() >= 4,
        "README's units not found: {readme:?}"
    );
    for (i, units) in readme.into_iter().enumerate() {
        sets.push((format!("README block {i}"), units));
    }
    for (i, (what, units)) in sets.iter().enumerate() {
        let ran = verify_units(&format!("units-{i}"), units);
        let names: Vec<&str> = units.iter().map(|(n, _)| n.as_str()).collect();
        assert!(
            ran.status.success() && ran.stderr.is_empty() && ran.stdout.is_empty(),
            "{what} {names:?}: systemd-analyze verify is not clean{}",
            ran.show()
        );
    }
}

// ---------------------------------------------------------------- README recipes

/// The README's code block that starts with the line `first`, as the lines to type.
fn readme_block(first: &str) -> Vec<String> {
    let text = read("README.md");
    let start = text
        .find(&format!("\n    {first}"))
        .unwrap_or_else(|| panic!("README has no block starting {first:?}"));
    text[start + 1..]
        .lines()
        .map_while(|l| l.strip_prefix("    "))
        .map(str::to_string)
        .collect()
}

/// Runs `script` with sh in a session of its own (no terminal: htpasswd then reads the
/// password from standard input), `input` on stdin.
fn sh(script: &str, input: &str) -> util::Ran {
    use std::io::Write;
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new("sh");
    cmd.args(["-euc", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: setsid is a system call, safe between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("sh");
    let _ = child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes());
    util::finish(child, script, LIMIT)
}

#[test]
fn readme_users_file_recipe_makes_a_0640_file_that_logs_in() {
    // The README's lines as typed, but for `adduser` (the test makes no user on the
    // machine), with /etc/tcpsplice in a scratch folder and the group tcpsplice the
    // test's own group.
    use std::os::unix::fs::MetadataExt;
    let block = readme_block("adduser --system --group --no-create-home tcpsplice");
    assert!(block.len() >= 4, "{block:?}");
    let dir = auth::scratch("docs-users-recipe");
    let etc = dir.join("etc-tcpsplice");
    // SAFETY: getgid cannot fail.
    let gid = unsafe { libc::getgid() };
    let script: Vec<String> = block[1..]
        .iter()
        .map(|l| {
            l.replace("/etc/tcpsplice", etc.to_str().expect("path"))
                .replace("-g tcpsplice", &format!("-g {gid}"))
        })
        .collect();
    let script = script.join("\n");
    let pw = "correct horse";
    let ran = sh(&script, &format!("{pw}\n{pw}\n"));
    ran.expect_code(0);
    let users = etc.join("users");
    let meta = std::fs::metadata(&users).expect("the users file");
    assert_eq!(meta.mode() & 0o7777, 0o640, "{}", ran.show());
    assert_eq!(meta.gid(), gid);
    let text = std::fs::read_to_string(&users).expect("users");
    assert!(text.starts_with("alice:$2y$12$"), "{text}");
    auth::login_http(&users, "alice", pw).expect_code(0);
    auth::login_http(&users, "alice", "wrong").expect_code(1);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn readme_install_line_installs_the_five_programs_and_nothing_else() {
    let line = readme_block("install -m 755 target/release/")
        .into_iter()
        .next()
        .expect("the install line");
    // A release directory of the test's own, with the .d files cargo leaves beside the
    // programs of `cargo build` (not of `cargo test`, so they are made here).
    let built = Path::new(SPLICE).parent().expect("bin dir");
    let release = auth::scratch("docs-release");
    for name in [
        "tcpsplice",
        "tcpsplice-auth",
        "tcpsplice-dial",
        "tcpsplice-listen",
        "tcpsplice-proxy",
    ] {
        std::fs::copy(built.join(name), release.join(name)).expect("copy a program");
        std::fs::write(release.join(format!("{name}.d")), "deps\n").expect("write a .d file");
    }
    let dir = auth::scratch("docs-install");
    let line = line
        .replace("target/release/", &format!("{}/", release.display()))
        .replace("/usr/local/bin/", &format!("{}/", dir.display()));
    sh(&line, "").expect_code(0);
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .expect("installed")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "tcpsplice",
            "tcpsplice-auth",
            "tcpsplice-dial",
            "tcpsplice-listen",
            "tcpsplice-proxy"
        ],
        "{line}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&release);
}

// ---------------------------------------------------------------- usage and man pages

#[test]
fn every_program_prints_its_usage_on_stdout_for_h_and_help() {
    for (name, bin) in [
        ("tcpsplice", SPLICE),
        ("tcpsplice-auth", AUTH),
        ("tcpsplice-dial", DIAL),
        ("tcpsplice-listen", LISTEN),
        ("tcpsplice-proxy", PROXY),
    ] {
        for flag in ["-h", "--help"] {
            let r = util::run(Command::new(bin).arg(flag).stdin(Stdio::null()), LIMIT);
            r.expect_code(0);
            let out = String::from_utf8_lossy(&r.stdout);
            assert!(
                out.starts_with(&format!("usage: {name} ")) && r.stderr.is_empty(),
                "{}",
                r.show()
            );
            if name == "tcpsplice-listen" {
                assert!(out.contains(" - - PROG"), "no systemd form: {out}");
            }
        }
    }
}

/// A page as `mandoc -Tascii` lays it out in 80 columns, without overstrikes and tabs.
fn rendered(page: &str) -> String {
    let r = util::run(
        Command::new("mandoc")
            .args(["-Tascii", "-Owidth=80"])
            .arg(repo(page)),
        LIMIT,
    );
    r.expect_code(0);
    let mut out = String::new();
    for line in String::from_utf8_lossy(&r.stdout).lines() {
        let mut col = String::new();
        for c in line.chars() {
            match c {
                '\u{8}' => {
                    col.pop();
                }
                '\t' => col.push_str(&" ".repeat(8 - col.chars().count() % 8)),
                c => col.push(c),
            }
        }
        out.push_str(&col);
        out.push('\n');
    }
    out
}

#[test]
fn man_pages_pass_mandoc_lint_and_their_examples_fit_80_columns() {
    for page in MAN_PAGES {
        let r = util::run(Command::new("mandoc").arg("-Tlint").arg(repo(page)), LIMIT);
        assert!(
            r.status.success() && r.stdout.is_empty() && r.stderr.is_empty(),
            "mandoc -Tlint {page} (package mandoc){}",
            r.show()
        );
        let text = rendered(page);
        for section in [
            "NAME",
            "SYNOPSIS",
            "DESCRIPTION",
            "OPTIONS",
            "ENVIRONMENT",
            "EXIT STATUS",
            "EXAMPLES",
            "SEE ALSO",
        ] {
            assert!(
                text.lines().any(|l| l == section),
                "{page} has no {section}"
            );
        }
        let examples = text
            .lines()
            .skip_while(|l| *l != "EXAMPLES")
            .skip(1)
            .take_while(|l| l.is_empty() || l.starts_with(' '));
        for line in examples {
            // An inetd.conf entry cannot be cut: inetd reads no continuation lines.
            let inetd = line.split_whitespace().nth(1) == Some("stream");
            assert!(
                line.chars().count() <= 80 || inetd,
                "{page}: an EXAMPLES line wider than 80 columns:\n{line}"
            );
        }
    }
}
