//! One gateway for a fleet: a web root beside the WebSocket, token targets (websockify's
//! TokenFile), authentication (JWT, Basic, forward auth), line framing. Real clients, real
//! upstreams on port 0, files made by the test.

mod support;

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use futures_util::SinkExt;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

/// A TCP upstream that greets each connection with `name`, then echoes.
async fn greeter(name: &'static str) -> std::net::SocketAddr {
    tcp_upstream(move |mut stream| async move {
        let _ = stream.write_all(name.as_bytes()).await;
        let (mut r, mut w) = stream.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
    })
    .await
}

async fn first_message(url: &str) -> Message {
    let mut ws = connect(url).await;
    let message = next_data(&mut ws).await;
    let _ = ws.close(None).await;
    message
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

// ---------------------------------------------------------------------------------------
// Web root

/// A browser may reuse a keep-alive connection that fetched a page for its WebSocket: the
/// upgrade as a later request of the connection (served by hyper, not the first-request path).
#[tokio::test]
async fn an_upgrade_after_a_file_on_the_same_connection_is_relayed() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("index.html"), "page").unwrap();
    let echo = tcp_echo().await;
    let gw = start_gateway(&format!(
        "[[listener]]\nbind = \"127.0.0.1:0\"\n\n[[route]]\npath = \"/\"\nweb_root = \"{}\"\nupstream = \"tcp://{echo}\"\n",
        dir.path().display()
    ))
    .await;
    let mut stream = tokio::net::TcpStream::connect(gw.addr()).await.unwrap();
    stream
        .write_all(b"GET /index.html HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let page = read_response(&mut stream).await;
    assert_eq!((page.status, page.body.as_str()), (200, "page"));
    stream
        .write_all(upgrade_request("/", "").as_bytes())
        .await
        .unwrap();
    assert_eq!(read_response(&mut stream).await.status, 101);
    stream
        .write_all(&client_frame(true, 2, b"again"))
        .await
        .unwrap();
    let mut echoed = Vec::new();
    while echoed.len() < 5 {
        echoed.extend(read_raw_frame(&mut stream).await.2);
    }
    assert_eq!(echoed, b"again");
    gw.stop().await;
}

#[tokio::test]
async fn web_root_serves_files_and_the_websocket_on_one_path() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("www");
    std::fs::create_dir_all(root.join("app")).unwrap();
    std::fs::write(root.join("index.html"), "<!doctype html><p>noVNC</p>").unwrap();
    std::fs::write(root.join("app/ui.js"), "console.log(1)").unwrap();
    let big: Vec<u8> = (0..(1 << 20) + 7).map(|i| (i % 251) as u8).collect();
    std::fs::write(root.join("big.bin"), &big).unwrap();
    std::fs::write(dir.path().join("secret.txt"), "outside").unwrap();
    std::os::unix::fs::symlink(dir.path().join("secret.txt"), root.join("escape.txt")).unwrap();
    let echo = tcp_echo().await;
    let gw = start_gateway(&format!(
        "[[listener]]\nbind = \"127.0.0.1:0\"\n\n[[route]]\npath = \"/\"\nweb_root = \"{}\"\nupstream = \"tcp://{echo}\"\nallowed_origins = [\"https://app.example\"]\n",
        root.display()
    ))
    .await;
    let get = |target: &str, extra: &str| {
        format!("GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{extra}\r\n")
    };

    let index = raw_request(
        gw.addr(),
        &get("/", "Origin: https://elsewhere.example\r\n"),
    )
    .await;
    assert_eq!(
        index.status, 200,
        "Origin checks do not apply to files: {index:?}"
    );
    assert_eq!(index.body, "<!doctype html><p>noVNC</p>");
    assert_eq!(index.header("content-type"), Some("text/html"));
    let etag = index.header("etag").expect("ETag").to_string();
    let modified = index
        .header("last-modified")
        .expect("Last-Modified")
        .to_string();

    let js = raw_request(gw.addr(), &get("/app/ui.js", "")).await;
    assert_eq!((js.status, js.body.as_str()), (200, "console.log(1)"));
    assert!(
        js.header("content-type").unwrap().contains("javascript"),
        "{js:?}"
    );

    let again = raw_request(gw.addr(), &get("/", &format!("If-None-Match: {etag}\r\n"))).await;
    assert_eq!(again.status, 304);
    let since = raw_request(
        gw.addr(),
        &get("/", &format!("If-Modified-Since: {modified}\r\n")),
    )
    .await;
    assert_eq!(since.status, 304);

    // HEAD: the headers a GET would have, no body.
    let mut stream = tokio::net::TcpStream::connect(gw.addr()).await.unwrap();
    stream
        .write_all(b"HEAD /big.bin HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut head = Vec::new();
    within("HEAD", stream.read_to_end(&mut head)).await.unwrap();
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.contains(&format!("content-length: {}", big.len())),
        "{head}"
    );
    assert!(head.ends_with("\r\n\r\n"), "no body after a HEAD: {head}");

    // A large file arrives whole and exact (streamed in pieces by the gateway).
    let mut stream = tokio::net::TcpStream::connect(gw.addr()).await.unwrap();
    stream
        .write_all(get("/big.bin", "").as_bytes())
        .await
        .unwrap();
    let mut all = Vec::new();
    within("the big file", stream.read_to_end(&mut all))
        .await
        .unwrap();
    let body_at = all.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert!(all[..body_at].starts_with(b"HTTP/1.1 200"));
    assert_eq!(&all[body_at..], &big[..]);

    // Nothing outside the root: dot segments (400 before routing), encoded dots and
    // slashes, a symlink that leads out, no listings.
    // 400 where the path normalisation refuses it, 404 where the web root does.
    for (target, statuses) in [
        ("/../secret.txt", &[400][..]),
        ("/%2e%2e/secret.txt", &[400]),
        ("/app/%2E%2e/%2e%2e/secret.txt", &[400]),
        ("/..%2fsecret.txt", &[400, 404]),
        ("/%2fetc%2fpasswd", &[404]),
        ("/app%2f..%2f..%2fsecret.txt", &[400, 404]),
        ("/%5c..%5csecret.txt", &[400, 404]),
        ("/app%5cui.js", &[404]),
        ("/escape.txt", &[404]),
        ("/missing.html", &[404]),
    ] {
        let response = raw_request(gw.addr(), &get(target, "")).await;
        assert!(
            statuses.contains(&response.status),
            "{target}: {response:?}"
        );
        assert!(!response.body.contains("outside"), "{target}: {response:?}");
    }
    let post = raw_request(
        gw.addr(),
        "POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(post.status, 405);

    // The WebSocket on the same path goes to the upstream (and the Origin check applies).
    let mut ws = connect_with(&gw.ws_url("/"), &[("Origin", "https://app.example")])
        .await
        .expect("upgrade")
        .0;
    ws.send(Message::binary(b"vnc".to_vec())).await.unwrap();
    assert_eq!(next_data(&mut ws).await, Message::binary(b"vnc".to_vec()));
    drop(ws);
    assert_eq!(
        gw.upgrade().await.status,
        101,
        "no Origin: a non-browser client"
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_route_may_serve_files_only() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "index.html", "hi");
    let gw = start_gateway(&format!(
        "[[listener]]\nbind = \"127.0.0.1:0\"\n\n[[route]]\npath = \"/ui\"\nweb_root = \"{}\"\n",
        dir.path().display()
    ))
    .await;
    let page = raw_request(
        gw.addr(),
        "GET /ui HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!((page.status, page.body.as_str()), (200, "hi"));
    let upgrade = raw_request(gw.addr(), &upgrade_request("/ui", "")).await;
    assert_eq!(upgrade.status, 404, "{upgrade:?}");
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------
// Token targets

#[tokio::test]
async fn token_targets_pick_the_upstream_and_follow_the_file() {
    let (a, b, c) = (greeter("A").await, greeter("B").await, greeter("C").await);
    let dir = tempfile::tempdir().unwrap();
    let tokens = write(
        dir.path(),
        "tokens.cfg",
        &format!(
            "# the fleet\nvm-a: {a}\n\nthis line is broken\nvm-b: 127.0.0.1:{}\n",
            b.port()
        ),
    );
    let gw = start_gateway(&format!(
        "[gateway]\ncertificate_check_interval = \"50ms\"\n\n[[listener]]\nbind = \"127.0.0.1:0\"\n\n\
         [[route]]\npath = \"/vnc\"\ntargets = {{ file = \"{tokens}\" }}\nallowed_targets = [\"127.0.0.1/32\"]\n\n\
         [[route]]\npath = \"/by-path\"\ntargets = {{ file = \"{tokens}\" }}\ntoken_from = \"path\"\n"
    ))
    .await;
    assert_eq!(
        first_message(&gw.ws_url("/vnc?token=vm-a")).await,
        Message::binary(b"A".to_vec())
    );
    assert_eq!(
        first_message(&gw.ws_url("/vnc?token=vm-b")).await,
        Message::binary(b"B".to_vec())
    );
    assert_eq!(
        first_message(&gw.ws_url("/by-path/vm-b")).await,
        Message::binary(b"B".to_vec())
    );

    for target in ["/vnc?token=nope", "/vnc", "/vnc?token=this"] {
        let response = raw_request(gw.addr(), &upgrade_request(target, "")).await;
        assert_eq!(response.status, 404, "{target}: {response:?}");
        assert!(!response.body.contains("nope"), "{response:?}");
    }

    // A token added to the file works once the file is read again; the rest stays.
    std::fs::write(
        &tokens,
        format!(
            "vm-a: {a}\nvm-b: 127.0.0.1:{}\nvm-c: {c}\noutside: 127.0.0.2:{}\n",
            b.port(),
            c.port()
        ),
    )
    .unwrap();
    let addr = gw.addr();
    let mut found = false;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !found && tokio::time::Instant::now() < deadline {
        found = raw_request(addr, &upgrade_request("/vnc?token=vm-c", ""))
            .await
            .status
            == 101;
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(found, "the new token was not picked up");
    assert_eq!(
        first_message(&gw.ws_url("/vnc?token=vm-c")).await,
        Message::binary(b"C".to_vec())
    );

    // A target outside allowed_targets is refused, never dialled.
    let refused = raw_request(gw.addr(), &upgrade_request("/vnc?token=outside", "")).await;
    assert_eq!(refused.status, 403, "{refused:?}");
    assert!(!refused.body.contains("127.0.0.2"), "{refused:?}");
    gw.stop().await;
}

#[tokio::test]
async fn token_folders_are_read_file_by_file() {
    let (a, b) = (greeter("A").await, greeter("B").await);
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "one", &format!("vm-a: {a}\n"));
    write(dir.path(), "two", &format!("vm-b: {b}\n"));
    let gw = start_gateway(&format!(
        "[[listener]]\nbind = \"127.0.0.1:0\"\n\n[[route]]\npath = \"/\"\ntargets = {{ dir = \"{}\" }}\n",
        dir.path().display()
    ))
    .await;
    assert_eq!(
        first_message(&gw.ws_url("/?token=vm-a")).await,
        Message::binary(b"A".to_vec())
    );
    assert_eq!(
        first_message(&gw.ws_url("/?token=vm-b")).await,
        Message::binary(b"B".to_vec())
    );
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------
// JWT

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn hs256(secret: &[u8], claims: serde_json::Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )
    .unwrap()
}

#[tokio::test]
async fn jwt_from_query_cookie_header_and_subprotocol() {
    let upstream = ws_echo().await;
    let dir = tempfile::tempdir().unwrap();
    let secret = write(dir.path(), "hs.key", "sixteen-byte-key-and-more\n");
    let gw = start_gateway(&format!(
        "[[listener]]\nbind = \"127.0.0.1:0\"\n\n[[route]]\npath = \"/\"\nupstream = \"ws://{}\"\nidentity_header = \"x-user\"\n\
         auth = {{ jwt = {{ secret_file = \"{secret}\", issuer = \"fleet\", audience = \"vnc\", from = [\"header:authorization\", \"cookie:session\", \"query:access_token\", \"subprotocol\"] }} }}\n",
        upstream.addr
    ))
    .await;
    let key = b"sixteen-byte-key-and-more";
    let good = hs256(
        key,
        serde_json::json!({"sub": "alice", "iss": "fleet", "aud": "vnc", "exp": now() + 600}),
    );

    let url = gw.ws_url("/");
    let (ws, _) = connect_with(&format!("{url}?access_token={good}"), &[])
        .await
        .expect("query");
    drop(ws);
    let (ws, _) = connect_with(&url, &[("Cookie", &format!("theme=dark; session={good}"))])
        .await
        .expect("cookie");
    drop(ws);
    let (ws, _) = connect_with(&url, &[("Authorization", &format!("Bearer {good}"))])
        .await
        .expect("header");
    drop(ws);
    // The subprotocol that carries the token is the gateway's: not sent upstream, not echoed.
    let (ws, response) = connect_with(
        &url,
        &[
            ("Sec-WebSocket-Protocol", &format!("bearer.{good}, chat")),
            ("X-User", "mallory"),
        ],
    )
    .await
    .expect("subprotocol");
    assert_eq!(
        response
            .headers()
            .get("sec-websocket-protocol")
            .map(|v| v.to_str().unwrap()),
        Some("chat")
    );
    drop(ws);
    wait_until("four handshakes upstream", || {
        upstream.seen.lock().unwrap().paths.len() == 4
    })
    .await;
    {
        let seen = upstream.seen.lock().unwrap();
        assert_eq!(seen.protocols[3].as_deref(), Some("chat"));
        for n in 0..4 {
            assert_eq!(
                seen.header(n, "x-user"),
                vec!["alice".to_string()],
                "handshake {n}"
            );
        }
    }

    // Refused: missing, expired, not yet valid, wrong issuer, wrong audience, bad signature.
    let early = hs256(
        key,
        serde_json::json!({"sub": "a", "iss": "fleet", "aud": "vnc", "nbf": now() + 3600, "exp": now() + 7200}),
    );
    let expired = hs256(
        key,
        serde_json::json!({"sub": "a", "iss": "fleet", "aud": "vnc", "exp": now() - 3600}),
    );
    let issuer = hs256(
        key,
        serde_json::json!({"sub": "a", "iss": "other", "aud": "vnc", "exp": now() + 600}),
    );
    let audience = hs256(
        key,
        serde_json::json!({"sub": "a", "iss": "fleet", "aud": "ssh", "exp": now() + 600}),
    );
    let forged = hs256(
        b"another-key-entirely",
        serde_json::json!({"sub": "a", "iss": "fleet", "aud": "vnc", "exp": now() + 600}),
    );
    for query in [
        "".to_string(),
        expired,
        early,
        issuer,
        audience,
        forged,
        "not.a.jwt".into(),
    ] {
        let target = format!("/?access_token={query}");
        let response = raw_request(gw.addr(), &upgrade_request(&target, "")).await;
        assert_eq!(response.status, 401, "{query}: {response:?}");
        assert_eq!(
            response.header("www-authenticate"),
            Some("Bearer error=\"invalid_token\"")
        );
    }
    let metrics = gw.metrics().encode();
    assert_eq!(
        metric(
            &metrics,
            "wsgate_auth_failures_total{route=\"/\",reason=\"missing\"}"
        ),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        metric(
            &metrics,
            "wsgate_auth_failures_total{route=\"/\",reason=\"invalid\"}"
        ),
        6.0
    );
    gw.stop().await;
}

#[tokio::test]
async fn jwt_from_a_jwks_and_a_claim_that_picks_the_target() {
    use base64::Engine as _;
    use rcgen::PublicKeyData as _;
    let (a, b) = (greeter("A").await, greeter("B").await);
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap(); // P-256
    let point = key.subject_public_key_info();
    // The last 64 bytes of a P-256 SubjectPublicKeyInfo are the point's x and y.
    let (x, y) = point[point.len() - 64..].split_at(32);
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let jwks = write(
        dir.path(),
        "keys.json",
        &serde_json::json!({"keys": [{"kty": "EC", "crv": "P-256", "x": b64(x), "y": b64(y), "kid": "k1", "alg": "ES256", "use": "sig"}]}).to_string(),
    );
    let tokens = write(dir.path(), "tokens.cfg", &format!("vm-a: {a}\nvm-b: {b}\n"));
    let gw = start_gateway(&format!(
        "[[listener]]\nbind = \"127.0.0.1:0\"\n\n[[route]]\npath = \"/\"\ntargets = {{ file = \"{tokens}\" }}\n\
         auth = {{ jwt = {{ jwks = \"{jwks}\", target_claim = \"vnc\" }} }}\n"
    ))
    .await;
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some("k1".into());
    let signing = jsonwebtoken::EncodingKey::from_ec_der(&key.serialize_der());
    let token = |vm: &str| {
        jsonwebtoken::encode(
            &header,
            &serde_json::json!({"sub": "bob", "vnc": vm, "exp": now() + 600}),
            &signing,
        )
        .unwrap()
    };
    // The claim picks the target; a token in the query cannot override it.
    let url = gw.ws_url(&format!("/?token=vm-a&access_token={}", token("vm-b")));
    assert_eq!(first_message(&url).await, Message::binary(b"B".to_vec()));
    let url = gw.ws_url(&format!("/?access_token={}", token("vm-a")));
    assert_eq!(first_message(&url).await, Message::binary(b"A".to_vec()));
    let unknown = raw_request(
        gw.addr(),
        &upgrade_request(&format!("/?access_token={}", token("vm-z")), ""),
    )
    .await;
    assert_eq!(unknown.status, 404);
    // A valid token without the claim does not let the query pick the target.
    let unclaimed = jsonwebtoken::encode(
        &header,
        &serde_json::json!({"sub": "bob", "exp": now() + 600}),
        &signing,
    )
    .unwrap();
    let refused = raw_request(
        gw.addr(),
        &upgrade_request(&format!("/?token=vm-a&access_token={unclaimed}"), ""),
    )
    .await;
    assert_eq!(refused.status, 401, "{refused:?}");
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------
// Basic and forward auth

#[tokio::test]
async fn basic_auth_against_htpasswd() {
    use base64::Engine as _;
    let upstream = ws_echo().await;
    let dir = tempfile::tempdir().unwrap();
    let hash = bcrypt::hash("opensesame", 4).unwrap();
    let users = write(
        dir.path(),
        "users",
        &format!("# htpasswd -B\nalice:{hash}\nbob:plain-text-is-skipped\n"),
    );
    let gw = start_gateway(&format!(
        "[[listener]]\nbind = \"127.0.0.1:0\"\n\n[[route]]\npath = \"/\"\nupstream = \"ws://{}\"\nidentity_header = \"x-user\"\nauth = {{ basic = {{ htpasswd = \"{users}\", realm = \"fleet\" }} }}\n",
        upstream.addr
    ))
    .await;
    let basic = |user: &str, password: &str| {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        )
    };
    let (ws, _) = connect_with(
        &gw.ws_url("/"),
        &[("Authorization", &basic("alice", "opensesame"))],
    )
    .await
    .expect("alice");
    drop(ws);
    wait_until("the handshake upstream", || {
        upstream.seen.lock().unwrap().paths.len() == 1
    })
    .await;
    assert_eq!(
        upstream.seen.lock().unwrap().header(0, "x-user"),
        vec!["alice".to_string()]
    );
    for credentials in [
        String::new(),
        basic("alice", "wrong"),
        basic("bob", "plain-text-is-skipped"),
        basic("carol", "x"),
    ] {
        let extra = if credentials.is_empty() {
            String::new()
        } else {
            format!("Authorization: {credentials}\r\n")
        };
        let response = raw_request(gw.addr(), &upgrade_request("/", &extra)).await;
        assert_eq!(response.status, 401, "{credentials}");
        assert_eq!(
            response.header("www-authenticate"),
            Some("Basic realm=\"fleet\", charset=\"UTF-8\"")
        );
    }
    gw.stop().await;
}

/// `web_auth` (websockify's `--web-auth`): the files need the credentials the WebSocket needs;
/// without it the same files are public.
#[tokio::test]
async fn web_auth_guards_the_web_root_with_the_route_auth() {
    use base64::Engine as _;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("index.html"), "page").unwrap();
    let hash = bcrypt::hash("opensesame", 4).unwrap();
    let users = write(dir.path(), "users", &format!("alice:{hash}\n"));
    let echo = tcp_echo().await;
    let route = |path: &str, web_auth: bool| {
        format!(
            "[[route]]\npath = \"{path}\"\nweb_root = \"{}\"\nweb_auth = {web_auth}\nupstream = \"tcp://{echo}\"\nauth = {{ basic = {{ htpasswd = \"{users}\", realm = \"fleet\" }} }}\n",
            dir.path().display()
        )
    };
    let gw = start_gateway(&format!(
        "[[listener]]\nbind = \"127.0.0.1:0\"\n\n{}\n{}",
        route("/guarded", true),
        route("/open", false)
    ))
    .await;
    let authorization = |password: &str| {
        format!(
            "Authorization: Basic {}\r\n",
            base64::engine::general_purpose::STANDARD.encode(format!("alice:{password}"))
        )
    };
    let get = |path: &str, extra: &str| {
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{extra}Connection: close\r\n\r\n")
    };
    for extra in [String::new(), authorization("wrong")] {
        let refused = raw_request(gw.addr(), &get("/guarded/index.html", &extra)).await;
        assert_eq!(refused.status, 401, "{extra}");
        assert_eq!(
            refused.header("www-authenticate"),
            Some("Basic realm=\"fleet\", charset=\"UTF-8\"")
        );
        assert!(!refused.body.contains("page"), "{}", refused.body);
    }
    // HEAD: the answer has a length and no body, so only its head is read.
    let mut stream = tokio::net::TcpStream::connect(gw.addr()).await.unwrap();
    stream
        .write_all(
            get("/guarded/index.html", "")
                .replacen("GET", "HEAD", 1)
                .as_bytes(),
        )
        .await
        .unwrap();
    let mut head = Vec::new();
    within("the HEAD answer", stream.read_to_end(&mut head))
        .await
        .unwrap();
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    let served = raw_request(
        gw.addr(),
        &get("/guarded/index.html", &authorization("opensesame")),
    )
    .await;
    assert_eq!((served.status, served.body.as_str()), (200, "page"));
    let public = raw_request(gw.addr(), &get("/open/index.html", "")).await;
    assert_eq!((public.status, public.body.as_str()), (200, "page"));
    gw.stop().await;
}

/// An auth service: `Authorization: Bearer good` → 200 with `X-User: alice`, `forbidden` →
/// 403, `hang` → no answer at all, anything else → 401.
async fn auth_service() -> std::net::SocketAddr {
    tcp_upstream(|mut stream| async move {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if stream.read(&mut byte).await.unwrap_or(0) == 0 {
                return;
            }
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
        let answer = if head.contains("authorization: bearer good") && head.contains("x-forwarded-uri: /desk?x=1") {
            "HTTP/1.1 200 OK\r\nX-User: alice\r\nContent-Length: 0\r\n\r\n"
        } else if head.contains("authorization: bearer forbidden") {
            "HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n"
        } else if head.contains("authorization: bearer hang") {
            std::future::pending::<()>().await;
            unreachable!()
        } else {
            "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer realm=\"sso\"\r\nContent-Length: 0\r\n\r\n"
        };
        let _ = stream.write_all(answer.as_bytes()).await;
    })
    .await
}

#[tokio::test]
async fn forward_auth_asks_a_service() {
    let upstream = ws_echo().await;
    let service = auth_service().await;
    let gw = start_gateway(&format!(
        "[[listener]]\nbind = \"127.0.0.1:0\"\n\n[[route]]\npath = \"/desk\"\nupstream = \"ws://{}\"\n\
         auth = {{ forward = {{ url = \"http://{service}/check\", timeout = \"300ms\", copy_response_headers = [\"x-user\"] }} }}\n",
        upstream.addr
    ))
    .await;
    let (ws, _) = connect_with(
        &gw.ws_url("/desk?x=1"),
        &[("Authorization", "Bearer good"), ("X-User", "mallory")],
    )
    .await
    .expect("allowed");
    drop(ws);
    wait_until("the handshake upstream", || {
        upstream.seen.lock().unwrap().paths.len() == 1
    })
    .await;
    assert_eq!(
        upstream.seen.lock().unwrap().header(0, "x-user"),
        vec!["alice".to_string()]
    );

    let ask =
        |token: &str| upgrade_request("/desk?x=1", &format!("Authorization: Bearer {token}\r\n"));
    let denied = raw_request(gw.addr(), &ask("bad")).await;
    assert_eq!(denied.status, 401);
    assert_eq!(
        denied.header("www-authenticate"),
        Some("Bearer realm=\"sso\"")
    );
    assert_eq!(raw_request(gw.addr(), &ask("forbidden")).await.status, 403);
    let slow = raw_request(gw.addr(), &ask("hang")).await;
    assert_eq!(slow.status, 503, "{slow:?}");
    let metrics = gw.metrics().encode();
    assert_eq!(
        metric(
            &metrics,
            "wsgate_auth_failures_total{route=\"/desk\",reason=\"unavailable\"}"
        ),
        1.0
    );
    gw.stop().await;
}

/// The auth service hears who the client is from the gateway alone: forwarded headers the
/// client wrote (it is no trusted proxy) are not passed on as if they were the gateway's.
#[tokio::test]
async fn forward_auth_does_not_pass_on_forwarded_headers_the_client_wrote() {
    let (service, mut asked) = recording_upstream().await;
    let gw = start_gateway(&format!(
        "[[listener]]\nbind = \"127.0.0.1:0\"\n\n[[route]]\npath = \"/desk\"\nupstream = \"ws://127.0.0.1:9\"\n\
         auth = {{ forward = {{ url = \"http://{service}/check\", timeout = \"300ms\" }} }}\n"
    ))
    .await;
    let forged = "X-Forwarded-For: 6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\nForwarded: for=6.6.6.6\r\n\
                  X-Forwarded-Proto: https\r\nX-Forwarded-Host: evil.example\r\nX-Forwarded-Port: 443\r\n";
    let answer = raw_request(gw.addr(), &upgrade_request("/desk", forged)).await;
    assert_eq!(answer.status, 503, "the service never answers: {answer:?}");
    let head = within("the auth request", asked.recv()).await.unwrap();
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(
        !head.contains("6.6.6.6") && !head.contains("evil"),
        "{head}"
    );
    assert!(
        !head.contains("x-forwarded-port") && !head.contains("\r\nforwarded:"),
        "{head}"
    );
    assert!(head.contains("x-forwarded-for: 127.0.0.1\r\n"), "{head}");
    assert!(head.contains("x-forwarded-proto: http\r\n"), "{head}");
    assert!(head.contains("x-forwarded-host: localhost\r\n"), "{head}");
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------
// Line framing

/// Both directions of a lines route flow at once: an upstream that echoes every line back
/// (as `cat` does) and a client that sends megabytes while it reads. Neither direction may
/// wait for the other (the adapter once stopped reading the upstream while it wrote to it,
/// and both stalled for good).
#[tokio::test]
async fn a_lines_route_relays_both_ways_at_once() {
    let upstream = tcp_upstream(|stream| async move {
        let (mut read, mut write) = tokio::io::split(stream);
        let _ = tokio::io::copy(&mut read, &mut write).await;
    })
    .await;
    let gw = start_gateway(&simple_config(
        &format!("tcp://{upstream}"),
        "framing = \"lines\"",
    ))
    .await;
    let (mut sink, mut stream) = futures_util::StreamExt::split(connect(&gw.ws_url("/")).await);
    const LINES: usize = 16384;
    let line = "x".repeat(4000);
    let sent = line.clone();
    let writer = tokio::spawn(async move {
        for _ in 0..LINES {
            sink.send(Message::text(sent.clone())).await.unwrap();
        }
        sink
    });
    let mut echoed = 0;
    within("16 MB echoed through the lines route", async {
        while echoed < LINES {
            match futures_util::StreamExt::next(&mut stream).await {
                Some(Ok(Message::Text(text))) => {
                    assert_eq!(text.as_str(), line);
                    echoed += 1;
                }
                other => panic!("after {echoed} lines: {other:?}"),
            }
        }
    })
    .await;
    drop(writer.await.unwrap());
    gw.stop().await;
}

/// SPEC §4: an upstream that fails (here: a reset) is Close 1011 on a lines route too,
/// after the lines it wrote before.
#[tokio::test]
async fn a_lines_upstream_that_resets_is_1011() {
    let upstream = tcp_upstream(|mut stream| async move {
        stream.write_all(b"last words\n").await.unwrap();
        // Wait for the client's message, so that the line went out before the reset.
        let mut buf = [0u8; 16];
        let _ = stream.read(&mut buf).await;
        socket2::SockRef::from(&stream)
            .set_linger(Some(std::time::Duration::ZERO))
            .unwrap();
        drop(stream);
    })
    .await;
    let gw = start_gateway(&simple_config(
        &format!("tcp://{upstream}"),
        "framing = \"lines\"",
    ))
    .await;
    let mut ws = connect(&gw.ws_url("/")).await;
    assert_eq!(next_data(&mut ws).await, Message::text("last words"));
    ws.send(Message::text("bye")).await.unwrap();
    let (data, close) = read_until_close(&mut ws).await;
    assert!(data.is_empty(), "{data:?}");
    assert_eq!(close.map(|c| c.0), Some(1011));
    gw.stop().await;
}

#[tokio::test]
async fn lines_become_text_messages_and_messages_become_lines() {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let upstream = tcp_upstream(move |mut stream| {
        let tx = tx.clone();
        async move {
            stream
                .write_all(b"hello\nw\xc3\xb6rld\r\n\xff\xfe\nrest")
                .await
                .unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 64];
            while !got.ends_with(b"two\n") {
                let n = stream.read(&mut buf).await.unwrap();
                assert!(n > 0);
                got.extend_from_slice(&buf[..n]);
            }
            let _ = tx.send(got);
            // The upstream ends: the rest of its last line goes out, then Close 1000.
        }
    })
    .await;
    let gw = start_gateway(&simple_config(
        &format!("tcp://{upstream}"),
        "framing = \"lines\"",
    ))
    .await;
    let mut ws = connect(&gw.ws_url("/")).await;
    assert_eq!(next_data(&mut ws).await, Message::text("hello"));
    assert_eq!(next_data(&mut ws).await, Message::text("wörld"));
    assert_eq!(next_data(&mut ws).await, Message::binary(vec![0xff, 0xfe]));
    ws.send(Message::text("one")).await.unwrap();
    ws.send(Message::binary(b"two".to_vec())).await.unwrap();
    assert_eq!(
        within("the lines upstream", rx.recv()).await.unwrap(),
        b"one\ntwo\n"
    );
    let (data, close) = read_until_close(&mut ws).await;
    assert_eq!(data, vec![Message::text("rest")]);
    assert_eq!(close.map(|c| c.0), Some(1000));
    gw.wait_idle().await;
    gw.stop().await;
}

#[tokio::test]
async fn a_line_over_max_message_size_closes_with_1009() {
    let upstream = tcp_upstream(|mut stream| async move {
        let _ = stream.write_all(&[b'x'; 300]).await;
        let mut sink = Vec::new();
        let _ = stream.read_to_end(&mut sink).await;
    })
    .await;
    let gw = start_gateway(&simple_config(
        &format!("tcp://{upstream}"),
        "framing = \"lines\"\nmax_message_size = 100",
    ))
    .await;
    let mut ws = connect(&gw.ws_url("/")).await;
    let (_, close) = read_until_close(&mut ws).await;
    assert_eq!(close.map(|c| c.0), Some(1009));
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------
// Configuration

#[test]
fn fleet_configuration_errors_name_the_key() {
    let cases = [
        (
            "targets = { file = \"t\" }\nupstream = \"tcp://127.0.0.1:1\"",
            "route[0].targets: replaces upstream",
        ),
        (
            "upstream = \"tcp://127.0.0.1:1\"\ntoken_from = \"path\"",
            "route[0].token_from: applies to routes with targets only",
        ),
        (
            "targets = { file = \"t\" }\nallowed_targets = [\"10.0.0.0/8:99-1\"]",
            "route[0].allowed_targets",
        ),
        (
            "web_root = \"/no/such/folder\"",
            "route[0].web_root: /no/such/folder: not a folder",
        ),
        (
            "upstream = \"ws://127.0.0.1:1\"\nframing = \"lines\"",
            "route[0].framing: applies to tcp and unix upstreams",
        ),
        (
            "upstream = \"tcp://127.0.0.1:1\"\nweb_auth = true\nauth = { basic = { htpasswd = \"u\" } }",
            "route[0].web_auth: needs web_root",
        ),
        (
            "web_root = \"/\"\nweb_auth = true",
            "route[0].web_auth: needs auth",
        ),
        (
            "upstream = \"tcp://127.0.0.1:1\"\nidentity_header = \"x-user\"",
            "route[0].identity_header: needs auth",
        ),
        (
            "upstream = \"tcp://127.0.0.1:1\"\nauth = { jwt = { secret_file = \"k\", algorithms = [\"RS256\"] } }",
            "does not go with the key",
        ),
        (
            "upstream = \"tcp://127.0.0.1:1\"\nauth = { jwt = { jwks = \"k\", from = [\"body:x\"] } }",
            "route[0].auth.jwt.from",
        ),
        (
            "upstream = \"tcp://127.0.0.1:1\"\nauth = { forward = { url = \"https://auth/check\" } }",
            "route[0].auth.forward.url",
        ),
        (
            "upstream = \"tcp://127.0.0.1:1\"\nauth = { }",
            "set one of jwt",
        ),
    ];
    for (route, expected) in cases {
        let text =
            format!("[[listener]]\nbind = \"127.0.0.1:0\"\n\n[[route]]\npath = \"/\"\n{route}\n");
        let error = wsgate::config::Config::parse(&text, "t.toml")
            .expect_err(route)
            .to_string();
        assert!(error.contains(expected), "{route}:\n{error}");
    }
}

#[tokio::test]
async fn jwt_keys_are_read_again_when_they_change() {
    let upstream = ws_echo().await;
    let dir = tempfile::tempdir().unwrap();
    let secret = write(dir.path(), "hs.key", "the-first-secret");
    let gw = start_gateway(&format!(
        "[gateway]\ncertificate_check_interval = \"50ms\"\n\n[[listener]]\nbind = \"127.0.0.1:0\"\n\n[[route]]\npath = \"/\"\nupstream = \"ws://{}\"\nauth = {{ jwt = {{ secret_file = \"{secret}\" }} }}\n",
        upstream.addr
    ))
    .await;
    let claims = serde_json::json!({"sub": "a", "exp": now() + 600});
    let (old, new) = (
        hs256(b"the-first-secret", claims.clone()),
        hs256(b"the-second-secret", claims),
    );
    let status = |token: String| {
        let addr = gw.addr();
        async move {
            raw_request(
                addr,
                &upgrade_request(&format!("/?access_token={token}"), ""),
            )
            .await
            .status
        }
    };
    assert_eq!(status(old.clone()).await, 101);
    assert_eq!(status(new.clone()).await, 401);
    std::fs::write(&secret, "the-second-secret").unwrap();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while status(new.clone()).await != 101 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new secret was not picked up"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(status(old).await, 401, "the old secret no longer signs");
    gw.stop().await;
}

/// SPEC §3: an upstream that refuses is 502, also when a token chose it.
#[tokio::test]
async fn a_token_target_that_refuses_is_502() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let dir = tempfile::tempdir().unwrap();
    let tokens = write(
        dir.path(),
        "tokens.cfg",
        &format!("gone: 127.0.0.1:{port}\n"),
    );
    let gw = start_gateway(&format!(
        "[[listener]]\nbind = \"127.0.0.1:0\"\n\n[[route]]\npath = \"/\"\ntargets = {{ file = \"{tokens}\" }}\n"
    ))
    .await;
    let response = raw_request(gw.addr(), &upgrade_request("/?token=gone", "")).await;
    assert_eq!(response.status, 502, "{response:?}");
    gw.stop().await;
}
