//! A real browser (headless Chromium through chromedriver) opens wss:// connections through
//! the gateway: text and binary, byte-exact, to a TCP and a WebSocket upstream; a page from a
//! disallowed Origin is refused. The test CA is trusted only for the gateway's key
//! (`--ignore-certificate-errors-spki-list`), not by ignoring certificate errors wholesale.
//!
//! Needs `chromium` and `chromedriver` (Debian packages, installed by .ci/run). Outside CI a
//! machine without them skips this test with a message; in CI (CI=true) it fails instead.

mod support;

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// Whether chromium and chromedriver are installed; in CI (CI set) their absence fails.
fn browser_available() -> bool {
    let there =
        std::path::Path::new(CHROMEDRIVER).exists() && std::path::Path::new(CHROMIUM).exists();
    if !there {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must install chromium and chromium-driver (.ci/run does)"
        );
        eprintln!(
            "SKIPPED: chromium / chromedriver not installed (apt-get install chromium chromium-driver)"
        );
    }
    there
}

/// Serves one small HTML page on every GET: the Origin the browser's script runs in.
async fn page_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let _ = stream.read(&mut buf).await;
                let body = "<!doctype html><title>wsgate browser test</title><p>test page</p>";
                let response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
            });
        }
    });
    addr
}

/// A minimal WebDriver client: JSON over HTTP/1.1 to chromedriver.
struct WebDriver {
    port: u16,
    session: String,
    process: Child,
    _profile: tempfile::TempDir,
}

async fn http_json(
    port: u16,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Result<Value, String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    // chromedriver may keep the connection open: read the head, then Content-Length bytes.
    let response = read_response(&mut stream).await;
    serde_json::from_str(&response.body).map_err(|e| format!("{e}: {}", response.body))
}

impl WebDriver {
    async fn start(spki: &str) -> WebDriver {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        // Its own process group, so that dropping the driver also ends the browser it started.
        let process = Command::new(CHROMEDRIVER)
            .process_group(0)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let mut driver = WebDriver {
            port,
            session: String::new(),
            process,
            _profile: tempfile::tempdir().unwrap(),
        };
        within("chromedriver ready", async {
            while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        let capabilities = json!({
            "capabilities": { "alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {
                    "binary": CHROMIUM,
                    "args": [
                        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                        "--disable-quic", "--no-first-run", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync",
                        format!("--user-data-dir={}", driver._profile.path().display()),
                        format!("--ignore-certificate-errors-spki-list={spki}"),
                    ]
                }
            }}
        });
        let created = within(
            "browser session",
            http_json(port, "POST", "/session", Some(capabilities)),
        )
        .await
        .expect("new session");
        driver.session = created["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {created}"))
            .to_string();
        driver
            .command("timeouts", json!({ "script": 20_000 }))
            .await;
        driver
    }

    async fn command(&self, name: &str, body: Value) -> Value {
        let path = format!("/session/{}/{name}", self.session);
        let reply = within(name, http_json(self.port, "POST", &path, Some(body)))
            .await
            .expect(name);
        if reply["value"]["error"].is_string() {
            panic!("webdriver {name}: {reply}");
        }
        reply["value"].clone()
    }

    async fn goto(&self, url: &str) {
        self.command("url", json!({ "url": url })).await;
    }

    /// Runs `script` as an async function body; it ends by calling `done(result)`.
    async fn run(&self, script: &str) -> Value {
        let wrapped = format!("const done = arguments[arguments.length - 1]; {script}");
        self.command("execute/async", json!({ "script": wrapped, "args": [] }))
            .await
    }
}

impl WebDriver {
    /// Ends the session: chromedriver closes the browser.
    async fn quit(&self) {
        let path = format!("/session/{}", self.session);
        let _ = within("quit", http_json(self.port, "DELETE", &path, None)).await;
    }
}

impl Drop for WebDriver {
    fn drop(&mut self) {
        // The whole group: chromedriver and any browser left behind by a failed test.
        if let Ok(pid) = i32::try_from(self.process.id()) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.process.wait();
    }
}

/// Opens `url`, sends a text and a binary message, and reports what came back.
const EXCHANGE: &str = r#"
const url = "URL";
const ws = new WebSocket(url);
ws.binaryType = "arraybuffer";
const got = [];
const binary = new Uint8Array(256 * 4); for (let i = 0; i < binary.length; i++) binary[i] = i % 256;
let expected = 2;
ws.onopen = () => { ws.send("héllo ✓ from the browser"); ws.send(binary); };
ws.onmessage = (e) => {
  if (typeof e.data === "string") got.push({ kind: "text", data: e.data });
  else got.push({ kind: "binary", data: Array.from(new Uint8Array(e.data)) });
  if (MODE === "ws" && got.length === expected) { ws.close(1000, "done"); }
  if (MODE === "tcp") {
    const total = got.reduce((n, m) => n + (m.kind === "binary" ? m.data.length : m.data.length), 0);
    if (total >= EXPECTED_BYTES) ws.close(1000, "done");
  }
};
ws.onclose = (e) => done({ opened: true, code: e.code, got });
ws.onerror = () => {};
setTimeout(() => done({ timeout: true, got }), 15000);
"#;

const REFUSED: &str = r#"
const ws = new WebSocket("URL");
let opened = false;
ws.onopen = () => { opened = true; ws.close(); };
ws.onclose = (e) => done({ opened, code: e.code });
setTimeout(() => done({ timeout: true }), 15000);
"#;

#[tokio::test]
async fn chromium_exchanges_messages_through_wss_and_is_refused_from_another_origin() {
    if !browser_available() {
        return;
    }
    let pki = make_pki(&["localhost", "127.0.0.1"]);
    let page = page_server().await;
    let other_page = page_server().await;
    let tcp = tcp_echo().await;
    let ws_up = ws_echo().await;
    let config = format!(
        "[gateway]\nclose_timeout = \"1s\"\n[[listener]]\nbind = \"127.0.0.1:0\"\ntls = {{ cert = \"{}\", key = \"{}\" }}\n\
         [[route]]\npath = \"/tcp\"\nupstream = \"tcp://{tcp}\"\nallowed_origins = [\"http://127.0.0.1:{}\"]\n\
         [[route]]\npath = \"/ws\"\nupstream = \"ws://{}/\"\nallowed_origins = [\"http://127.0.0.1:{}\"]\n",
        pki.cert.display(),
        pki.key.display(),
        page.port(),
        ws_up.addr,
        page.port()
    );
    let gw = start_gateway(&config).await;
    let port = gw.addr().port();
    let browser = WebDriver::start(&pki.spki_sha256).await;
    browser
        .goto(&format!("http://127.0.0.1:{}/", page.port()))
        .await;

    let text = "héllo ✓ from the browser";
    let binary: Vec<u64> = (0..1024u64).map(|i| i % 256).collect();

    // Through the WebSocket upstream: two messages, types and bytes intact.
    let script = EXCHANGE
        .replace("URL", &format!("wss://localhost:{port}/ws"))
        .replace("MODE", "\"ws\"")
        .replace("EXPECTED_BYTES", "0");
    let result = browser.run(&script).await;
    assert_eq!(result["timeout"], Value::Null, "{result}");
    assert_eq!(result["code"], 1000, "{result}");
    assert_eq!(result["got"][0]["kind"], "text");
    assert_eq!(result["got"][0]["data"], text);
    assert_eq!(result["got"][1]["kind"], "binary");
    assert_eq!(result["got"][1]["data"], json!(binary));

    // Through the TCP upstream: the bytes of both messages come back, in order, as binary.
    let expected_bytes = text.len() + binary.len();
    let script = EXCHANGE
        .replace("URL", &format!("wss://localhost:{port}/tcp"))
        .replace("MODE", "\"tcp\"")
        .replace("EXPECTED_BYTES", &expected_bytes.to_string());
    let result = browser.run(&script).await;
    assert_eq!(result["timeout"], Value::Null, "{result}");
    let mut bytes: Vec<u64> = Vec::new();
    for message in result["got"].as_array().unwrap() {
        assert_eq!(
            message["kind"], "binary",
            "tcp upstream data arrives as binary: {result}"
        );
        bytes.extend(
            message["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b.as_u64().unwrap()),
        );
    }
    let mut expected: Vec<u64> = text.bytes().map(u64::from).collect();
    expected.extend(&binary);
    assert_eq!(bytes, expected);

    // From a page of another origin: refused (403 at the gateway, 1006 in the browser).
    browser
        .goto(&format!("http://127.0.0.1:{}/", other_page.port()))
        .await;
    let result = browser
        .run(&REFUSED.replace("URL", &format!("wss://localhost:{port}/ws")))
        .await;
    assert_eq!(result["opened"], false, "{result}");
    assert_eq!(result["code"], 1006, "{result}");
    let metrics = gw.metrics().encode();
    assert!(
        metrics.contains("wsgate_handshake_rejections_total{status=\"403\"} 1"),
        "the refusal was the Origin check: {metrics}"
    );
    browser.quit().await;
    drop(browser);
    gw.stop().await;
}

/// Opens `URL` (after setting `COOKIE` as a cookie, when not empty), sends one message and
/// reports the echo, or how the connection ended.
const TOKEN_EXCHANGE: &str = r#"
if ("COOKIE") document.cookie = "COOKIE; path=/";
const ws = new WebSocket("URL");
let got = null;
ws.onopen = () => ws.send("from the page");
ws.onmessage = (e) => { got = e.data; ws.close(1000); };
ws.onclose = (e) => done({ code: e.code, got });
setTimeout(() => done({ timeout: true }), 15000);
"#;

#[tokio::test]
async fn chromium_loads_the_web_root_and_authenticates_by_query_and_cookie() {
    if !browser_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("www");
    std::fs::create_dir(&root).unwrap();
    std::fs::write(
        root.join("index.html"),
        "<!doctype html><title>fleet</title><p id=p>served by the web root</p>",
    )
    .unwrap();
    let secret = dir.path().join("hs.key");
    std::fs::write(&secret, "browser-test-secret").unwrap();
    let upstream = ws_echo().await;
    let gw = start_gateway(&format!(
        "[[listener]]\nbind = \"127.0.0.1:0\"\n\n[[route]]\npath = \"/\"\nweb_root = \"{}\"\n\n\
         [[route]]\npath = \"/ws\"\nupstream = \"ws://{}\"\nidentity_header = \"x-user\"\n\
         auth = {{ jwt = {{ secret_file = \"{}\" }} }}\n",
        root.display(),
        upstream.addr,
        secret.display()
    ))
    .await;
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({ "sub": "browser-user", "exp": exp }),
        &jsonwebtoken::EncodingKey::from_secret(b"browser-test-secret"),
    )
    .unwrap();
    let base = format!("127.0.0.1:{}", gw.addr().port());
    let browser = WebDriver::start("unused").await;
    browser.goto(&format!("http://{base}/")).await;
    let text = browser
        .run("done(document.getElementById('p').textContent)")
        .await;
    assert_eq!(text, "served by the web root");

    let run = |url: String, cookie: &str| {
        TOKEN_EXCHANGE
            .replace("URL", &url)
            .replace("COOKIE", cookie)
    };
    // Without a token: refused (401 at the gateway, 1006 in the browser).
    let refused = browser.run(&run(format!("ws://{base}/ws"), "")).await;
    assert_eq!(refused["code"], 1006, "{refused}");
    // The token in the query, then in a cookie the page set.
    let by_query = browser
        .run(&run(format!("ws://{base}/ws?access_token={token}"), ""))
        .await;
    assert_eq!(by_query["got"], "from the page", "{by_query}");
    let by_cookie = browser
        .run(&run(
            format!("ws://{base}/ws"),
            &format!("access_token={token}"),
        ))
        .await;
    assert_eq!(by_cookie["got"], "from the page", "{by_cookie}");
    wait_until("two handshakes upstream", || {
        upstream.seen.lock().unwrap().paths.len() == 2
    })
    .await;
    let user = upstream.seen.lock().unwrap().header(1, "x-user");
    assert_eq!(user, vec!["browser-user".to_string()]);
    browser.quit().await;
    drop(browser);
    gw.stop().await;
}

/// Chromium opens a WebSocket over HTTP/2 (RFC 8441) when it already has an h2 connection
/// to the origin: the page comes from the gateway's web root over https://, then the page
/// opens wss:// to the same origin.
#[tokio::test]
async fn chromium_uses_http2_websockets_on_the_pages_connection() {
    if !browser_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("index.html"),
        "<!doctype html><title>h2</title><p>over h2</p>",
    )
    .unwrap();
    let upstream = ws_echo().await;
    let gw = wsgate::testing::TestGateway::builder()
        .self_signed()
        .route_with(
            "/",
            &format!("ws://{}", upstream.addr),
            &format!("web_root = \"{}\"", dir.path().display()),
        )
        .start()
        .await
        .expect("start");
    let spki = gw.ready().listeners[0].spki_sha256.clone().unwrap();
    let origin = gw.url("").replace("wss://", "https://");
    let browser = WebDriver::start(&spki).await;
    browser.goto(&format!("{origin}/")).await;
    let script = EXCHANGE
        .replace("URL", &format!("{}/socket", gw.url("")))
        .replace("MODE", "\"ws\"")
        .replace("EXPECTED_BYTES", "0");
    let result = browser.run(&script).await;
    assert_eq!(result["timeout"], Value::Null, "{result}");
    assert_eq!(result["code"], 1000, "{result}");
    assert_eq!(result["got"][0]["data"], "héllo ✓ from the browser");
    let binary: Vec<u64> = (0..1024u64).map(|i| i % 256).collect();
    assert_eq!(result["got"][1]["data"], json!(binary));
    let metrics = gw.metrics().encode();
    assert_eq!(
        metric(&metrics, "wsgate_upgrades_total{http=\"2\"}"),
        1.0,
        "the WebSocket came over HTTP/2: {metrics}"
    );
    browser.quit().await;
    drop(browser);
    gw.stop().await;
}

/// Chromium always offers permessage-deflate: through a ws route to an upstream that
/// compresses, the agreement is the upstream's; through a tcp route with `compression`, the
/// gateway's. Every echo is exact.
#[tokio::test]
async fn chromium_negotiates_permessage_deflate() {
    if !browser_available() {
        return;
    }
    let python = Command::new("python3")
        .args(["-c", "import websockets"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !python {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must install Python websockets"
        );
        eprintln!("SKIPPED: python3 -m pip install websockets");
        return;
    }
    let mut upstream = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/peers/deflate_echo.py"
        ))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(upstream.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let port: u16 = line.trim().parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("index.html"),
        "<!doctype html><p>deflate</p>",
    )
    .unwrap();
    let echo = tcp_echo().await;
    let gw = wsgate::testing::TestGateway::builder()
        .self_signed()
        .route("/ws", &format!("ws://127.0.0.1:{port}"))
        .route_with("/tcp", &format!("tcp://{echo}"), "compression = true")
        .route_with(
            "/",
            &format!("tcp://{echo}"),
            &format!("web_root = \"{}\"", dir.path().display()),
        )
        .start()
        .await
        .expect("start");
    let spki = gw.ready().listeners[0].spki_sha256.clone().unwrap();
    let browser = WebDriver::start(&spki).await;
    browser
        .goto(&format!("{}/", gw.url("").replace("wss://", "https://")))
        .await;
    const DEFLATE: &str = r#"
const ws = new WebSocket("URL");
ws.binaryType = "arraybuffer";
const text = "compress me ".repeat(500) + "✓";
let got = "";
ws.onopen = () => ws.send(text);
ws.onmessage = (e) => {
  got += typeof e.data === "string" ? e.data : new TextDecoder().decode(e.data);
  if (got.length >= text.length) ws.close(1000);
};
ws.onclose = (e) => done({ code: e.code, extensions: ws.extensions, exact: got === text });
setTimeout(() => done({ timeout: true }), 15000);
"#;
    for path in ["/ws", "/tcp"] {
        let result = browser.run(&DEFLATE.replace("URL", &gw.url(path))).await;
        assert_eq!(result["timeout"], Value::Null, "{path}: {result}");
        assert!(
            result["extensions"]
                .as_str()
                .unwrap_or_default()
                .starts_with("permessage-deflate"),
            "{path}: {result}"
        );
        assert_eq!(result["exact"], true, "{path}: {result}");
    }
    browser.quit().await;
    drop(browser);
    gw.stop().await;
    let _ = upstream.kill();
    let _ = upstream.wait();
}
