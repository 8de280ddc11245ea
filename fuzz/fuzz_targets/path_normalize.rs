//! `routing::normalize_path`, the path every route decision is made on.
//!
//! Checks that no string panics, and of every normalised path: it starts with `/`, has no
//! empty segment inside (`//`), no `.` or `..` segment, and every `%` begins an escape of
//! two upper-case hex digits that does not encode an unreserved character (those are
//! decoded). For ASCII input (hyper admits only visible ASCII in a request target) the
//! result is also a fixed point: normalising it again gives it back.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wsgate::routing::normalize_path;

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(p) = normalize_path(path) else {
        return;
    };
    assert!(p.starts_with('/'), "{p:?}");
    assert!(!p.contains("//"), "{p:?}");
    assert!(
        !p.split('/').any(|s| s == "." || s == ".."),
        "dot segment in {p:?}"
    );
    let bytes = p.as_bytes();
    for (i, _) in p.match_indices('%') {
        let hex = bytes.get(i + 1..i + 3);
        let hex = hex.filter(|h| h.iter().all(|b| matches!(b, b'0'..=b'9' | b'A'..=b'F')));
        let Some(hex) = hex else {
            panic!("bad escape at {i} in {p:?}");
        };
        let value = u8::from_str_radix(std::str::from_utf8(hex).unwrap(), 16).unwrap();
        assert!(
            !is_unreserved(value),
            "escaped unreserved byte at {i} in {p:?}"
        );
    }
    if path.is_ascii() {
        assert_eq!(
            normalize_path(&p).as_deref(),
            Ok(p.as_str()),
            "not idempotent"
        );
    }
});
