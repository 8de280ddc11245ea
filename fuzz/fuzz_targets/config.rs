//! The configuration file: `config::Config::parse` on any UTF-8 text.
//!
//! Checks that no text panics the parser or its validation, that every rejection says
//! something (a non-empty message), and that an accepted configuration can be turned into
//! a router and routed on without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wsgate::config::Config;
use wsgate::routing::Router;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse(text, "fuzz.toml") {
        Ok(config) => {
            let router = Router::new(&config);
            for listener in 0..config.listeners.len() {
                for route in &config.routes {
                    let _ = router.find(listener, route.host.as_deref(), &route.path);
                }
            }
        }
        Err(e) => assert!(!e.to_string().is_empty(), "an error with no message: {e:?}"),
    }
});
