//! `routing::normalize_path`, the path every route decision is made on.
//!
//! Checks that no string panics, and of every normalised path: it starts with `/`, has no
//! empty segment inside (`//`), no `.` or `..` segment, and every `%` begins an escape of
//! two upper-case hex digits that does not encode an unreserved character (those are
//! decoded); it is ASCII (UTF-8 bytes are percent-encoded), has no dot segment even read
//! the way backends that decode `%2F` or `\` read it, and is a fixed point: normalising it
//! again gives it back.
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
    assert!(p.is_ascii(), "{p:?}");
    let as_backends_read = p.replace("%2F", "/").replace("%5C", "/").replace('\\', "/");
    assert!(
        !as_backends_read.split('/').any(|s| s == "." || s == ".."),
        "hidden dot segment in {p:?}"
    );
    assert_eq!(
        normalize_path(&p).as_deref(),
        Ok(p.as_str()),
        "not idempotent"
    );
});
