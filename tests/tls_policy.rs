//! Issue 4: SNI, certificate reload, mTLS both ways, upstream TLS options, TLS policy.

mod support;

use futures_util::SinkExt;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

fn pair(pki: &TestPki) -> String {
    format!(
        "{{ cert = \"{}\", key = \"{}\" }}",
        pki.cert.display(),
        pki.key.display()
    )
}

fn presented(stream: &tokio_rustls::client::TlsStream<TcpStream>) -> Vec<u8> {
    stream
        .get_ref()
        .1
        .peer_certificates()
        .expect("server certificate")[0]
        .to_vec()
}

#[tokio::test]
async fn sni_picks_exact_wildcard_and_default_certificates() {
    let default = make_pki(&["a.test"]);
    let wildcard = make_pki(&["*.b.test"]);
    let exact = make_pki(&["c.test"]);
    let upstream = tcp_echo().await;
    let config = format!(
        "[[listener]]\nbind = \"127.0.0.1:0\"\ntls = {{ certs = [{}, {}, {}] }}\n[[route]]\npath = \"/\"\nupstream = \"tcp://{upstream}\"\n",
        pair(&default),
        pair(&wildcard),
        pair(&exact)
    );
    let gw = start_gateway(&config).await;
    let any = accept_any_connector();
    for (name, expected, what) in [
        ("a.test", &default, "exact default"),
        ("x.b.test", &wildcard, "wildcard"),
        ("deep.x.b.test", &default, "wildcards cover one label"),
        ("c.test", &exact, "exact"),
        ("unknown.test", &default, "unknown name"),
        (
            "127.0.0.1",
            &default,
            "no SNI (an IP address is never sent as SNI)",
        ),
    ] {
        let tls = tls_connect(&any, gw.addr(), name).await.expect("handshake");
        assert_eq!(
            presented(&tls),
            expected.cert_der.to_vec(),
            "{what}: {name}"
        );
    }
    // A client that verifies gets a certificate it can verify.
    let tls = tls_connect(&wildcard.connector(), gw.addr(), "x.b.test").await;
    assert!(tls.is_ok(), "{tls:?}");
    gw.stop().await;
}

/// Certificates change on disk by a symlink swap (certbot, Kubernetes secrets): new
/// connections get the new certificate, the open one goes on; a broken pair is refused.
#[tokio::test]
async fn certificates_reload_on_file_change() {
    let first = make_pki(&["localhost"]);
    let second = make_pki(&["localhost"]);
    let dir = tempfile::tempdir().unwrap();
    let link = |name: &str| dir.path().join("current").join(name);
    let install = |version: &str, pki: &TestPki, key_from: &TestPki| {
        let folder = dir.path().join(version);
        std::fs::create_dir_all(&folder).unwrap();
        std::fs::copy(&pki.cert, folder.join("server.crt")).unwrap();
        std::fs::copy(&key_from.key, folder.join("server.key")).unwrap();
        let tmp = dir.path().join("current.tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&folder, &tmp).unwrap();
        std::fs::rename(&tmp, dir.path().join("current")).unwrap();
    };
    install("v1", &first, &first);
    let upstream = tcp_echo().await;
    let config = format!(
        "[gateway]\ncertificate_check_interval = \"50ms\"\nclose_timeout = \"1s\"\n[[listener]]\nbind = \"127.0.0.1:0\"\ntls = {{ cert = \"{}\", key = \"{}\" }}\n[[route]]\npath = \"/\"\nupstream = \"tcp://{upstream}\"\n",
        link("server.crt").display(),
        link("server.key").display()
    );
    let gw = start_gateway(&config).await;
    let any = accept_any_connector();
    let url = format!("wss://localhost:{}/", gw.addr().port());
    let mut open = connect_tls(&first.connector(), gw.addr(), &url).await;
    open.send(Message::binary(b"v1".to_vec())).await.unwrap();
    next_data(&mut open).await;

    // A broken pair (second certificate, first key) is refused: v1 keeps serving.
    install("broken", &second, &first);
    let metrics = gw.metrics().clone();
    wait_until("refusal counted", move || {
        metrics
            .encode()
            .contains("wsgate_config_reloads_total{result=\"failed\"} 1")
    })
    .await;
    let tls = tls_connect(&any, gw.addr(), "localhost").await.unwrap();
    assert_eq!(
        presented(&tls),
        first.cert_der.to_vec(),
        "still the first certificate"
    );

    install("v2", &second, &second);
    within("new certificate served", async {
        loop {
            let tls = tls_connect(&any, gw.addr(), "localhost").await.unwrap();
            if presented(&tls) == second.cert_der.to_vec() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    // The connection made with the first certificate is untouched.
    open.send(Message::binary(b"still v1".to_vec()))
        .await
        .unwrap();
    assert_eq!(
        next_data(&mut open).await.into_data(),
        b"still v1".as_slice()
    );
    gw.stop().await;
}

fn mtls_config(server: &TestPki, client_ca: &TestPki, mode: &str, upstream: &str) -> String {
    format!(
        "[[listener]]\nbind = \"127.0.0.1:0\"\ntls = {{ cert = \"{}\", key = \"{}\", client_ca = \"{}\", client_auth = \"{mode}\", identity_header = \"X-Client-Identity\" }}\n[[route]]\npath = \"/\"\nupstream = \"{upstream}\"\n",
        server.cert.display(),
        server.key.display(),
        client_ca.ca_cert.display()
    )
}

async fn wss_echo_through(
    connector: &tokio_rustls::TlsConnector,
    addr: std::net::SocketAddr,
    headers: &[(&str, &str)],
) -> Result<(), String> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let tls = tls_connect(connector, addr, "localhost")
        .await
        .map_err(|e| e.to_string())?;
    let mut request = format!("wss://localhost:{}/", addr.port())
        .into_client_request()
        .unwrap();
    for (n, v) in headers {
        let name =
            tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(n.as_bytes()).unwrap();
        request.headers_mut().insert(name, v.parse().unwrap());
    }
    let (mut ws, _) = tokio_tungstenite::client_async(request, tls)
        .await
        .map_err(|e| e.to_string())?;
    ws.send(Message::text("hello"))
        .await
        .map_err(|e| e.to_string())?;
    next_data(&mut ws).await;
    Ok(())
}

#[tokio::test]
async fn mtls_required_accepts_good_and_refuses_missing_or_foreign_certificates() {
    let server = make_pki(&["localhost"]);
    let clients = make_pki(&["alice.example"]);
    let stranger = make_pki(&["mallory.example"]);
    let upstream = ws_echo().await;
    let gw = start_gateway(&mtls_config(
        &server,
        &clients,
        "required",
        &format!("ws://{}/", upstream.addr),
    ))
    .await;

    // Accepted, and the upstream learns who it is (a forged header is replaced).
    wss_echo_through(
        &clients.client_connector(&server),
        gw.addr(),
        &[("x-client-identity", "CN=admin")],
    )
    .await
    .expect("good client certificate");
    let seen = upstream.seen.lock().unwrap().identities.clone();
    assert_eq!(seen.len(), 1);
    let identity = seen[0].clone().expect("identity header");
    assert!(identity.contains("DNS:alice.example"), "{identity}");
    assert!(!identity.contains("CN=admin"), "{identity}");

    // Refused at the TLS layer: no certificate, or one from another CA.
    assert!(
        wss_echo_through(&server.connector(), gw.addr(), &[])
            .await
            .is_err(),
        "no client certificate"
    );
    assert!(
        wss_echo_through(&stranger.client_connector(&server), gw.addr(), &[])
            .await
            .is_err(),
        "certificate from an unknown CA"
    );
    assert_eq!(
        upstream.seen.lock().unwrap().paths.len(),
        1,
        "refused clients never reached the upstream"
    );
    gw.stop().await;
}

#[tokio::test]
async fn mtls_optional_lets_anonymous_clients_in_without_an_identity() {
    let server = make_pki(&["localhost"]);
    let clients = make_pki(&["bob.example"]);
    let upstream = ws_echo().await;
    let gw = start_gateway(&mtls_config(
        &server,
        &clients,
        "optional",
        &format!("ws://{}/", upstream.addr),
    ))
    .await;
    wss_echo_through(
        &server.connector(),
        gw.addr(),
        &[("x-client-identity", "forged")],
    )
    .await
    .expect("anonymous");
    wss_echo_through(&clients.client_connector(&server), gw.addr(), &[])
        .await
        .expect("with certificate");
    let seen = upstream.seen.lock().unwrap().identities.clone();
    assert_eq!(seen[0], None, "anonymous: the forged header is dropped");
    assert!(seen[1].as_deref().unwrap_or("").contains("bob.example"));
    gw.stop().await;
}

fn wss_route(upstream: std::net::SocketAddr, host: &str, extra: &str) -> String {
    simple_config(&format!("wss://{host}:{}/", upstream.port()), extra)
}

#[tokio::test]
async fn upstream_client_certificate_server_name_and_insecure_mode() {
    let upstream_pki = make_pki(&["backend.internal"]);
    let gateway_identity = make_pki(&["gateway.internal"]);
    let upstream = ws_echo_with_tls(Some(
        upstream_pki.acceptor_requiring_clients(&gateway_identity),
    ))
    .await;
    let ca = format!("ca = \"{}\"", upstream_pki.ca_cert.display());
    let name = "tls_server_name = \"backend.internal\"";
    let client = format!(
        "client_cert = \"{}\"\nclient_key = \"{}\"",
        gateway_identity.cert.display(),
        gateway_identity.key.display()
    );
    // All three: connects by IP, verifies the name, presents the client certificate.
    let gw = start_gateway(&wss_route(
        upstream.addr,
        "127.0.0.1",
        &format!("{ca}\n{name}\n{client}"),
    ))
    .await;
    let mut ws = connect(&gw.ws_url("/")).await;
    ws.send(Message::text("mutual")).await.unwrap();
    assert_eq!(next_data(&mut ws).await, Message::text("mutual"));
    gw.stop().await;
    let status_with = async |route_extra: String| {
        let gw = start_gateway(&wss_route(upstream.addr, "127.0.0.1", &route_extra)).await;
        let status = gw.upgrade().await.status;
        gw.stop().await;
        status
    };
    // Without the client certificate the upstream refuses: 502.
    assert_eq!(status_with(format!("{ca}\n{name}")).await, 502);
    // Without the name override, 127.0.0.1 is not in the certificate: 502.
    assert_eq!(status_with(format!("{ca}\n{client}")).await, 502);
    // insecure_skip_verify: no CA, wrong name, still connects (tests only).
    let gw = start_gateway(&wss_route(
        upstream.addr,
        "127.0.0.1",
        &format!("insecure_skip_verify = true\n{client}"),
    ))
    .await;
    let mut ws = connect(&gw.ws_url("/")).await;
    ws.send(Message::text("insecure")).await.unwrap();
    assert_eq!(next_data(&mut ws).await, Message::text("insecure"));
    gw.stop().await;
}

/// A TLS 1.1 ClientHello (no supported_versions extension) is answered with an alert.
#[tokio::test]
async fn tls_1_1_is_refused() {
    let pki = make_pki(&["localhost"]);
    let upstream = tcp_echo().await;
    let gw = start_gateway(&format!(
        "[[listener]]\nbind = \"127.0.0.1:0\"\ntls = {}\n[[route]]\npath = \"/\"\nupstream = \"tcp://{upstream}\"\n",
        pair(&pki)
    ))
    .await;
    let mut body = vec![0x03, 0x02]; // client_version TLS 1.1
    body.extend_from_slice(&[7u8; 32]); // random
    body.push(0); // session id
    body.extend_from_slice(&[0x00, 0x04, 0xc0, 0x13, 0x00, 0x2f]); // two TLS 1.1 suites
    body.extend_from_slice(&[0x01, 0x00]); // null compression
    let mut handshake = vec![0x01, 0x00, (body.len() >> 8) as u8, body.len() as u8];
    handshake.extend_from_slice(&body);
    let mut record = vec![
        0x16,
        0x03,
        0x02,
        (handshake.len() >> 8) as u8,
        handshake.len() as u8,
    ];
    record.extend_from_slice(&handshake);
    let mut stream = TcpStream::connect(gw.addr()).await.unwrap();
    stream.write_all(&record).await.unwrap();
    let mut reply = vec![0u8; 7];
    let n = within("server answer", stream.read(&mut reply))
        .await
        .unwrap_or(0);
    assert!(
        n == 0 || reply[0] == 0x15,
        "expected an alert or a close, got {:?}",
        &reply[..n]
    );
    assert_ne!(
        reply[0], 0x16,
        "the server must not answer with a ServerHello"
    );
    gw.stop().await;
}

#[tokio::test]
async fn sessions_resume() {
    let pki = make_pki(&["localhost"]);
    let upstream = tcp_echo().await;
    let gw = start_gateway(&format!(
        "[gateway]\nclose_timeout = \"1s\"\n[[listener]]\nbind = \"127.0.0.1:0\"\ntls = {}\n[[route]]\npath = \"/\"\nupstream = \"tcp://{upstream}\"\n",
        pair(&pki)
    ))
    .await;
    let connector = pki.connector(); // one client config: one session cache
    let url = format!("wss://localhost:{}/", gw.addr().port());
    let mut first = connect_tls(&connector, gw.addr(), &url).await;
    first.send(Message::binary(b"1".to_vec())).await.unwrap();
    next_data(&mut first).await; // reading also takes in the session tickets
    assert_eq!(
        first.get_ref().get_ref().1.handshake_kind(),
        Some(rustls::HandshakeKind::Full)
    );
    let second = connect_tls(&connector, gw.addr(), &url).await;
    assert_eq!(
        second.get_ref().get_ref().1.handshake_kind(),
        Some(rustls::HandshakeKind::Resumed)
    );
    drop((first, second));
    gw.stop().await;
}

#[test]
fn check_reports_a_missing_client_ca() {
    let server = make_pki(&["localhost"]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mtls.toml");
    std::fs::write(
        &path,
        mtls_config(&server, &server, "required", "tcp://127.0.0.1:1")
            .replace(&server.ca_cert.display().to_string(), "/missing/ca.crt"),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .args(["check", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/missing/ca.crt"), "{stderr}");
}

/// Server keys of every supported type: ECDSA P-256 and P-384, Ed25519 (RSA is covered by
/// the openssl key-format test in tls.rs).
#[tokio::test]
async fn ecdsa_p384_and_ed25519_keys() {
    let upstream = tcp_echo().await;
    for (what, algorithm) in [
        ("P-256", &rcgen::PKCS_ECDSA_P256_SHA256),
        ("P-384", &rcgen::PKCS_ECDSA_P384_SHA384),
        ("Ed25519", &rcgen::PKCS_ED25519),
    ] {
        let pki = make_pki_with(&["localhost"], algorithm);
        let gw = start_gateway(&format!(
            "[gateway]\nclose_timeout = \"1s\"\n[[listener]]\nbind = \"127.0.0.1:0\"\ntls = {}\n[[route]]\npath = \"/\"\nupstream = \"tcp://{upstream}\"\n",
            pair(&pki)
        ))
        .await;
        let url = format!("wss://localhost:{}/", gw.addr().port());
        let mut ws = connect_tls(&pki.connector(), gw.addr(), &url).await;
        ws.send(Message::binary(what.as_bytes().to_vec()))
            .await
            .unwrap();
        assert_eq!(
            next_data(&mut ws).await.into_data(),
            what.as_bytes(),
            "{what}"
        );
        drop(ws);
        gw.stop().await;
    }
}
