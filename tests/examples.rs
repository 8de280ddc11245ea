//! The examples of the README's "Testing through wsgate" run as they are: the Playwright
//! suite (Node, Debian's Chromium) and the pytest suite (Python `websockets`), each starting
//! this build of wsgate as its fixture. `.ci/run` installs what they need (pinned); outside
//! CI a machine without it skips them with a message, in CI (CI=true) they fail instead.

use std::path::Path;
use std::process::Command;

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Runs `command`; panics with its output when it fails.
fn run(what: &str, mut command: Command) {
    let output = command
        .env("WSGATE_BIN", env!("CARGO_BIN_EXE_wsgate"))
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
    assert!(
        output.status.success(),
        "{what} failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Whether the example's tools are there; skips (or, in CI, fails) when they are not.
fn available(what: &str, ready: bool, install: &str) -> bool {
    if ready {
        return true;
    }
    assert!(
        !in_ci(),
        "{what}: not installed in CI; .ci/run should have run: {install}"
    );
    eprintln!("skipping {what}: not installed; run `{install}`");
    false
}

#[test]
fn playwright_example() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/playwright");
    let ready = dir.join("node_modules/@playwright/test").exists()
        && Path::new("/usr/bin/chromium").exists();
    if !available(
        "the Playwright example",
        ready,
        "npm ci --prefix examples/playwright (and apt-get install chromium)",
    ) {
        return;
    }
    let mut command = Command::new("npx");
    command.args(["playwright", "test"]).current_dir(&dir);
    run("npx playwright test (examples/playwright)", command);
}

#[test]
fn pytest_example() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/pytest");
    let ready = Command::new("python3")
        .args(["-c", "import pytest, websockets"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !available(
        "the pytest example",
        ready,
        "python3 -m pip install -r examples/pytest/requirements.txt",
    ) {
        return;
    }
    let mut command = Command::new("python3");
    command
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .current_dir(&dir);
    run("pytest (examples/pytest)", command);
}
