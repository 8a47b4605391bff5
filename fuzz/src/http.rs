//! Plain-HTTP forwarding's parsers (`tcpsplice::http`): the request head rewritten for
//! the origin (`rewrite_request`), the chunked framing (`scan_chunked`, built on the
//! line parsers the relay uses), the response head rewritten for the client
//! (`rewrite_response`).
//!
//! Input: a mode byte (0 request, 1 chunked body, 2 response), then the bytes.
//!
//! Checked, with a reading of the input written here:
//! - request: an accepted head came from an `http://` absolute-form request without
//!   userinfo, NUL, bare CR or LF; it never had both `Content-Length` and
//!   `Transfer-Encoding`, nor two different lengths, nor a coding other than exactly
//!   `chunked`, nor an empty line before its request line; the head made re-parses whole with `httparse`, in origin form (or `*`),
//!   with one `Host`, at most one framing header that agrees with the body framing
//!   reported, no hop-by-hop or proxy header, and `Connection: close` last; its target
//!   is one tcpsplice-dial takes;
//! - chunked: the end found is within the input, found again at the same place in the
//!   input cut there, and not found in any shorter cut (nothing past the last chunk is
//!   needed, nothing before it is enough); a body that is refused stays refused
//!   whatever follows; one that needs more still needs more cut in half;
//! - response: an interim head is a 1xx other than 101; a final head re-parses whole,
//!   keeps the origin's framing headers as they were, has no hop-by-hop header and one
//!   `Connection: close`.

use tcpsplice::http::{self, Body, Response};

pub fn run(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => request(rest),
        1 => chunked(rest),
        _ => response(rest),
    }
}

/// The header lines of a head, split here at CRLF: (lowercased name, value trimmed).
fn fields(head: &[u8]) -> Vec<(String, String)> {
    let text = String::from_utf8_lossy(head);
    text.split("\r\n")
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| {
            (
                n.to_ascii_lowercase(),
                v.trim_matches([' ', '\t']).to_string(),
            )
        })
        .collect()
}

/// A head made for the other side: none of `hop` headers, one `Connection`, and that
/// one `Connection: close` at its end.
fn closes_alone(made: &[(String, String)], head: &[u8], hop: &[&str]) {
    let count = |name: &str| made.iter().filter(|(n, _)| n == name).count();
    for name in hop {
        assert_eq!(count(name), 0, "made a {name} header");
    }
    assert_eq!(count("connection"), 1);
    assert!(head.ends_with(b"\r\nConnection: close\r\n\r\n"));
}

fn request(data: &[u8]) {
    let Ok(f) = http::rewrite_request(data) else {
        return;
    };
    // What was accepted.
    assert!(!data.contains(&0), "accepted a NUL");
    for (i, &b) in data.iter().enumerate() {
        match b {
            b'\n' => assert!(i > 0 && data[i - 1] == b'\r', "accepted a bare LF"),
            b'\r' => assert_eq!(data.get(i + 1), Some(&b'\n'), "accepted a bare CR"),
            _ => {}
        }
    }
    let line =
        String::from_utf8_lossy(data.split(|&b| b == b'\r').next().unwrap_or(&[])).to_string();
    let uri = line.split(' ').nth(1).unwrap_or("").to_string();
    assert!(
        uri.as_bytes()
            .get(..7)
            .is_some_and(|s| s.eq_ignore_ascii_case(b"http://")),
        "accepted {uri:?}"
    );
    let authority = uri[7..].split(['/', '?']).next().unwrap_or("");
    assert!(!authority.contains('@'), "accepted userinfo in {uri:?}");
    let input = fields(data);
    let lengths: Vec<&str> = input
        .iter()
        .filter(|(n, _)| n == "content-length")
        .flat_map(|(_, v)| v.split(',').map(|e| e.trim_matches([' ', '\t'])))
        .collect();
    let codings: Vec<String> = input
        .iter()
        .filter(|(n, _)| n == "transfer-encoding")
        .flat_map(|(_, v)| {
            v.split(',')
                .map(|e| e.trim_matches([' ', '\t']).to_ascii_lowercase())
        })
        .collect();
    let has_te = input.iter().any(|(n, _)| n == "transfer-encoding");
    assert!(!has_te || lengths.is_empty(), "accepted CL and TE");
    if has_te {
        assert_eq!(codings, ["chunked"], "accepted codings {codings:?}");
        assert_eq!(f.body, Body::Chunked);
    } else if let Some(first) = lengths.first() {
        let n: u64 = first
            .parse()
            .expect("accepted a length that is not a number");
        assert!(
            lengths.iter().all(|l| l.parse::<u64>() == Ok(n)),
            "accepted lengths {lengths:?}"
        );
        assert_eq!(f.body, Body::Length(n));
    } else {
        assert_eq!(f.body, Body::None);
    }
    // What was made.
    let mut h = vec![httparse::EMPTY_HEADER; 1024];
    let mut r = httparse::Request::new(&mut h);
    assert_eq!(
        r.parse(&f.head),
        Ok(httparse::Status::Complete(f.head.len())),
        "made {:?}",
        String::from_utf8_lossy(&f.head)
    );
    let path = r.path.unwrap_or("");
    assert!(path.starts_with('/') || path == "*", "made target {path:?}");
    let made = fields(&f.head);
    let count = |name: &str| made.iter().filter(|(n, _)| n == name).count();
    assert_eq!(count("host"), 1);
    assert!(count("content-length") + count("transfer-encoding") <= 1);
    match f.body {
        Body::None => assert_eq!(count("content-length") + count("transfer-encoding"), 0),
        Body::Length(n) => assert!(made.contains(&("content-length".into(), n.to_string()))),
        Body::Chunked => assert!(made.contains(&("transfer-encoding".into(), "chunked".into()))),
    }
    closes_alone(
        &made,
        &f.head,
        &[
            "proxy-authorization",
            "proxy-connection",
            "keep-alive",
            "te",
            "trailer",
            "upgrade",
        ],
    );
    assert!(
        tcpsplice::dial::dialer::split_target(&f.target).is_ok(),
        "made target {:?}",
        f.target
    );
}

fn chunked(data: &[u8]) {
    let Ok(found) = http::scan_chunked(data) else {
        let mut more = data.to_vec();
        more.extend_from_slice(b"0\r\n\r\n");
        assert!(
            http::scan_chunked(&more).is_err(),
            "a refused body recovered"
        );
        return;
    };
    match found {
        Some(n) => {
            assert!(n <= data.len());
            assert_eq!(http::scan_chunked(&data[..n]), Ok(Some(n)));
            for cut in [n - 1, n / 2, n.saturating_sub(2)] {
                if cut < n {
                    assert_eq!(
                        http::scan_chunked(&data[..cut]),
                        Ok(None),
                        "ends before {n} when cut at {cut}"
                    );
                }
            }
        }
        None => assert_eq!(http::scan_chunked(&data[..data.len() / 2]), Ok(None)),
    }
}

fn response(data: &[u8]) {
    match http::rewrite_response(data) {
        Err(_) | Ok(Response::Partial) => {}
        Ok(Response::Interim { len }) => {
            assert!(len <= data.len());
            let mut h = vec![httparse::EMPTY_HEADER; 1024];
            let mut r = httparse::Response::new(&mut h);
            assert_eq!(r.parse(data), Ok(httparse::Status::Complete(len)));
            let code = r.code.unwrap_or(0);
            assert!((100..200).contains(&code) && code != 101, "interim {code}");
        }
        Ok(Response::Final { len, head }) => {
            assert!(len <= data.len());
            let mut h = vec![httparse::EMPTY_HEADER; 1024];
            let mut r = httparse::Response::new(&mut h);
            assert_eq!(
                r.parse(&head),
                Ok(httparse::Status::Complete(head.len())),
                "made {:?}",
                String::from_utf8_lossy(&head)
            );
            let framing = |fs: Vec<(String, String)>| -> Vec<(String, String)> {
                fs.into_iter()
                    .filter(|(n, _)| n == "content-length" || n == "transfer-encoding")
                    .collect()
            };
            let mut origin = vec![httparse::EMPTY_HEADER; 1024];
            let mut o = httparse::Response::new(&mut origin);
            assert_eq!(o.parse(data), Ok(httparse::Status::Complete(len)));
            let theirs: Vec<(String, String)> = o
                .headers
                .iter()
                .map(|h| {
                    (
                        h.name.to_ascii_lowercase(),
                        String::from_utf8_lossy(h.value)
                            .trim_matches([' ', '\t'])
                            .to_string(),
                    )
                })
                .collect();
            let ours = fields(&head);
            assert_eq!(framing(ours.clone()), framing(theirs), "framing changed");
            closes_alone(
                &ours,
                &head,
                &[
                    "keep-alive",
                    "proxy-connection",
                    "proxy-authenticate",
                    "upgrade",
                ],
            );
        }
    }
}
