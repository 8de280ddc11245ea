//! Logging setup, metrics, and the limiter that keeps floods out of the logs.

pub mod metrics;
pub mod ratelimit;

pub use metrics::Metrics;

use std::fmt;
use std::io::IsTerminal;

use tracing::field::{Field, Visit};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::fmt::format::Writer;

/// Installs the log subscriber: `RUST_LOG` filters (default `info`), lines go to stderr.
/// `json` switches to one JSON object per line.
pub fn init_logging(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    let result = if json {
        builder.json().try_init()
    } else {
        builder.fmt_fields(PlainFields).try_init()
    };
    // A subscriber already set (tests start several gateways) keeps its place.
    drop(result);
}

/// Fields as `name=value`, separated by spaces, the message first: the layout of
/// tracing-subscriber's default, without its per-field styling. Every connection logs a line
/// of fifteen fields, and styling them (even with colours off) was a tenth of a handshake's
/// instructions.
struct PlainFields;

impl<'w> FormatFields<'w> for PlainFields {
    fn format_fields<R: RecordFields>(&self, mut writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut visitor = PlainVisitor {
            writer: &mut writer,
            empty: true,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct PlainVisitor<'a, 'w> {
    writer: &'a mut Writer<'w>,
    empty: bool,
    result: fmt::Result,
}

impl Visit for PlainVisitor<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.record_debug(field, &value)
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.result.is_err() {
            return;
        }
        let pad = if std::mem::take(&mut self.empty) {
            ""
        } else {
            " "
        };
        self.result = match field.name() {
            "message" => write!(self.writer, "{pad}{value:?}"),
            // Fields the `log` crate's records bring along; the line says the same already.
            name if name.starts_with("log.") => Ok(()),
            name => {
                let name = name.strip_prefix("r#").unwrap_or(name);
                write!(self.writer, "{pad}{name}={value:?}")
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The line keeps the default layout that operators' parsers (and the tests) read.
    #[test]
    fn fields_are_written_as_the_default_formatter_writes_them() {
        let captured = Captured::default();
        let sink = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || sink.clone())
            .with_ansi(false)
            .with_target(false)
            .without_time()
            .with_level(false)
            .fmt_fields(PlainFields)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let addr: std::net::SocketAddr = "127.0.0.1:9".parse().unwrap();
            tracing::info!(client = %addr, bytes = 42u64, tls = false, detail = "a b", r#type = "x", "connection closed");
        });
        let line = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        assert_eq!(
            line.trim(),
            r#"connection closed client=127.0.0.1:9 bytes=42 tls=false detail="a b" type="x""#
        );
    }
}
