//! Logging set-up: `tracing-subscriber` with `RUST_LOG`-style filtering and optional JSON output (writes to stderr).

use tracing_subscriber::EnvFilter;

/// Initialises the global subscriber once. The filter comes from `RUST_LOG` (default `info`);
/// `SERVICEDB_LOG_FORMAT=json` switches to one JSON object per line. Calling it twice is harmless.
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("SERVICEDB_LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
