//! wss:// termination with certificates made by rcgen in the test, and wss:// upstreams
//! verified against a private CA.

mod support;

use futures_util::SinkExt;
use rustls_pki_types::pem::PemObject;
use support::*;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

fn tls_listener_config(pki: &TestPki, routes: &str) -> String {
    format!(
        "[gateway]\nclose_timeout = \"1s\"\n\n[[listener]]\nname = \"tls\"\nbind = \"127.0.0.1:0\"\ntls = {{ cert = \"{}\", key = \"{}\" }}\n\n[[listener]]\nname = \"plain\"\nbind = \"127.0.0.1:0\"\n\n{routes}",
        pki.cert.display(),
        pki.key.display()
    )
}

#[tokio::test]
async fn wss_listener_relays_to_tcp_and_ws_upstreams() {
    let pki = make_pki(&["localhost", "127.0.0.1"]);
    let tcp = tcp_echo().await;
    let ws_up = ws_echo().await;
    let routes = format!(
        "[[route]]\npath = \"/tcp\"\nupstream = \"tcp://{tcp}\"\n\n[[route]]\npath = \"/ws\"\nupstream = \"ws://{}\"\n",
        ws_up.addr
    );
    let gw = start_gateway(&tls_listener_config(&pki, &routes)).await;
    let connector = pki.connector();
    let tls_addr = gw.addrs()[0];

    let mut ws = connect_tls(
        &connector,
        tls_addr,
        &format!("wss://localhost:{}/tcp", tls_addr.port()),
    )
    .await;
    for len in [0usize, 100, 70_000, 1 << 20] {
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        ws.send(Message::binary(data.clone())).await.unwrap();
        let mut got = Vec::new();
        while got.len() < len {
            got.extend_from_slice(&next_data(&mut ws).await.into_data());
        }
        assert_eq!(got, data, "tcp over TLS, {len} bytes");
    }
    ws.close(None).await.unwrap();

    let mut ws = connect_tls(
        &connector,
        tls_addr,
        &format!("wss://localhost:{}/ws", tls_addr.port()),
    )
    .await;
    for len in [0usize, 100, 70_000, 1 << 20] {
        let text = "x".repeat(len);
        ws.send(Message::text(text.clone())).await.unwrap();
        assert_eq!(
            next_data(&mut ws).await,
            Message::text(text),
            "ws over TLS, {len} bytes"
        );
    }
    ws.close(None).await.unwrap();

    // The plain listener beside it serves the same routes.
    let mut plain = connect(&format!("ws://{}/ws", gw.addrs()[1])).await;
    plain.send(Message::text("plain")).await.unwrap();
    assert_eq!(next_data(&mut plain).await, Message::text("plain"));
    gw.stop().await;
}

#[tokio::test]
async fn tls_listener_offers_h2_alpn_and_refuses_untrusted_clients_cleanly() {
    let pki = make_pki(&["localhost"]);
    let gw = start_gateway(&tls_listener_config(
        &pki,
        &format!(
            "[[route]]\npath = \"/\"\nupstream = \"tcp://{}\"\n",
            tcp_echo().await
        ),
    ))
    .await;
    // A client that trusts another CA fails the handshake; the gateway keeps serving.
    let other = make_pki(&["localhost"]);
    let stream = TcpStream::connect(gw.addrs()[0]).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    assert!(
        other
            .connector()
            .connect(name.clone(), stream)
            .await
            .is_err()
    );
    // ALPN: a client offering h2 and http/1.1 gets h2 (RFC 8441 WebSockets; tests/http2.rs).
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca_der.clone()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let stream = TcpStream::connect(gw.addrs()[0]).await.unwrap();
    let tls = connector.connect(name, stream).await.expect("handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    gw.stop().await;
}

#[tokio::test]
async fn wss_upstream_with_private_ca() {
    let upstream_pki = make_pki(&["localhost", "127.0.0.1"]);
    let upstream = ws_echo_with_tls(Some(upstream_pki.acceptor())).await;
    let config = simple_config(
        &format!("wss://localhost:{}/secure", upstream.addr.port()),
        &format!("ca = \"{}\"", upstream_pki.ca_cert.display()),
    );
    let gw = start_gateway(&config).await;
    let mut ws = connect(&gw.ws_url("/x")).await;
    ws.send(Message::binary(vec![1u8; 100_000])).await.unwrap();
    assert_eq!(
        next_data(&mut ws).await,
        Message::binary(vec![1u8; 100_000])
    );
    assert_eq!(
        upstream.seen.lock().unwrap().paths,
        vec!["/secure/x".to_string()]
    );
    gw.stop().await;
}

#[tokio::test]
async fn wss_upstream_with_untrusted_certificate_is_502() {
    let upstream_pki = make_pki(&["localhost"]);
    let unrelated_ca = make_pki(&["localhost"]);
    let upstream = ws_echo_with_tls(Some(upstream_pki.acceptor())).await;
    // Trusting another CA, and (second gateway) the built-in web roots: both must refuse.
    let with_wrong_ca = simple_config(
        &format!("wss://localhost:{}/", upstream.addr.port()),
        &format!("ca = \"{}\"", unrelated_ca.ca_cert.display()),
    );
    let with_web_roots = simple_config(&format!("wss://localhost:{}/", upstream.addr.port()), "");
    for config in [with_wrong_ca, with_web_roots] {
        let gw = start_gateway(&config).await;
        let r = gw.upgrade().await;
        assert_eq!(r.status, 502);
        gw.stop().await;
    }
    // Trusting the right CA but naming a host the certificate does not cover.
    let wrong_name = simple_config(
        &format!("wss://127.0.0.1:{}/", upstream.addr.port()),
        &format!("ca = \"{}\"", upstream_pki.ca_cert.display()),
    );
    let gw = start_gateway(&wrong_name).await;
    let r = gw.upgrade().await;
    assert_eq!(
        r.status, 502,
        "certificate for localhost, connected as 127.0.0.1"
    );
    gw.stop().await;
}

#[tokio::test]
async fn slow_tls_handshake_is_cut_by_handshake_timeout() {
    let pki = make_pki(&["localhost"]);
    let config = tls_listener_config(
        &pki,
        &format!(
            "[[route]]\npath = \"/\"\nupstream = \"tcp://{}\"\n",
            tcp_echo().await
        ),
    )
    .replace(
        "close_timeout = \"1s\"",
        "close_timeout = \"1s\"\nhandshake_timeout = \"200ms\"",
    );
    let gw = start_gateway(&config).await;
    // Connect and send nothing: the gateway must hang up on its own.
    let mut stream = TcpStream::connect(gw.addrs()[0]).await.unwrap();
    let mut buf = [0u8; 16];
    let n = within(
        "gateway closes the idle TLS connection",
        tokio::io::AsyncReadExt::read(&mut stream, &mut buf),
    )
    .await
    .unwrap_or(0);
    assert_eq!(n, 0, "expected EOF");
    gw.stop().await;
}

fn openssl(args: &[&str]) {
    let status = std::process::Command::new("openssl")
        .args(args)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("the openssl command (installed by .ci/run)");
    assert!(status.success(), "openssl {args:?}");
}

/// `wsgate cert`'s output works as is (PKCS#8 key, full chain), and so do PKCS#1 RSA and
/// SEC1 EC keys from openssl, each signed by its CA.
#[tokio::test]
async fn dev_certificates_and_key_formats() {
    let dir = tempfile::tempdir().unwrap();
    let d = |name: &str| dir.path().join(name).display().to_string();
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .args([
            "cert",
            "--out",
            dir.path().to_str().unwrap(),
            "--name",
            "localhost",
        ])
        .stdout(std::process::Stdio::null())
        .status()
        .expect("run wsgate cert");
    assert!(status.success());
    std::fs::write(
        d("ext"),
        "subjectAltName=DNS:localhost\nbasicConstraints=critical,CA:FALSE\n",
    )
    .unwrap();
    openssl(&["genrsa", "-traditional", "-out", &d("rsa.key"), "2048"]);
    openssl(&[
        "ecparam",
        "-name",
        "prime256v1",
        "-genkey",
        "-noout",
        "-out",
        &d("sec1.key"),
    ]);
    for key in ["rsa", "sec1"] {
        openssl(&[
            "req",
            "-new",
            "-key",
            &d(&format!("{key}.key")),
            "-subj",
            "/CN=localhost",
            "-out",
            &d(&format!("{key}.csr")),
        ]);
        openssl(&[
            "x509",
            "-req",
            "-in",
            &d(&format!("{key}.csr")),
            "-CA",
            &d("ca.crt"),
            "-CAkey",
            &d("ca.key"),
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            &d("ext"),
            "-out",
            &d(&format!("{key}.crt")),
        ]);
    }
    assert!(
        std::fs::read_to_string(d("rsa.key"))
            .unwrap()
            .starts_with("-----BEGIN RSA PRIVATE KEY-----")
    );
    assert!(
        std::fs::read_to_string(d("sec1.key"))
            .unwrap()
            .starts_with("-----BEGIN EC PRIVATE KEY-----")
    );
    assert!(
        std::fs::read_to_string(d("localhost.key"))
            .unwrap()
            .starts_with("-----BEGIN PRIVATE KEY-----")
    );

    let ca = rustls_pki_types::CertificateDer::from_pem_file(d("ca.crt")).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).unwrap();
    let client_config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(client_config));
    let upstream = tcp_echo().await;
    for (cert, key) in [
        ("localhost.crt", "localhost.key"),
        ("rsa.crt", "rsa.key"),
        ("sec1.crt", "sec1.key"),
    ] {
        let config = format!(
            "[[listener]]\nbind = \"127.0.0.1:0\"\ntls = {{ cert = \"{}\", key = \"{}\" }}\n[[route]]\npath = \"/\"\nupstream = \"tcp://{upstream}\"\n",
            d(cert),
            d(key)
        );
        let gw = start_gateway(&config).await;
        let mut ws = connect_tls(
            &connector,
            gw.addr(),
            &format!("wss://localhost:{}/", gw.addr().port()),
        )
        .await;
        ws.send(Message::binary(key.as_bytes().to_vec()))
            .await
            .unwrap();
        assert_eq!(
            next_data(&mut ws).await.into_data(),
            key.as_bytes(),
            "{key}"
        );
        ws.close(None).await.unwrap();
        gw.stop().await;
    }
}
