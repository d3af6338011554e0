//! The TLS listener and mutual TLS (PROTOCOL 5) against the real binary,
//! with a throwaway CA and certificates made by the openssl command for
//! each run, and rustls as the device's TLS client.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use serde_json::{json, Value};

/// A CA with a server certificate for 127.0.0.1 and device certificates.
struct Pki {
    dir: tempfile::TempDir,
}

fn openssl(args: &[&str], dir: &Path) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the openssl command (Debian package openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

const EC: [&str; 4] = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];

impl Pki {
    fn new() -> Pki {
        let pki = Pki {
            dir: tempfile::tempdir().unwrap(),
        };
        pki.ca("ca");
        pki.issue(
            "ca",
            "server",
            "/CN=edgegate-test",
            // As the README's recipe makes it: for servers only.
            "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth",
        );
        pki
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn ca(&self, name: &str) {
        let (key, pem) = (format!("{name}.key"), format!("{name}.pem"));
        let mut args = vec!["req", "-x509", "-nodes", "-days", "2", "-subj"];
        let subject = format!("/CN={name}");
        args.push(&subject);
        args.extend(EC);
        args.extend(["-keyout", &key, "-out", &pem]);
        openssl(&args, self.dir.path());
    }

    /// `name.pem` and `name.key`, signed by the CA `ca`.
    fn issue(&self, ca: &str, name: &str, subject: &str, extension: &str) {
        let (key, csr, pem, ext) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
            format!("{name}.ext"),
        );
        let mut args = vec!["req", "-nodes", "-subj", subject];
        args.extend(EC);
        args.extend(["-keyout", &key, "-out", &csr]);
        openssl(&args, self.dir.path());
        std::fs::write(self.path(&ext), format!("{extension}\n")).unwrap();
        let (ca_pem, ca_key) = (format!("{ca}.pem"), format!("{ca}.key"));
        openssl(
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &ca_pem,
                "-CAkey",
                &ca_key,
                "-CAcreateserial",
                "-days",
                "2",
                "-out",
                &pem,
                "-extfile",
                &ext,
            ],
            self.dir.path(),
        );
    }

    fn device(&self, ca: &str, name: &str, cn: &str) {
        self.issue(
            ca,
            name,
            &format!("/CN={cn}/O=edgegate test"),
            "extendedKeyUsage=clientAuth",
        );
    }

    fn gateway_options(&self, opts: GatewayOptions, tls_port: u16) -> GatewayOptions {
        opts.env("EDGEGATE_TLS_ADDRESS", format!("127.0.0.1:{tls_port}"))
            .env("EDGEGATE_TLS_CERT_FILE", self.path("server.pem").display())
            .env("EDGEGATE_TLS_KEY_FILE", self.path("server.key").display())
    }

    /// A client that trusts the CA `ca`, presenting `identity` if given.
    fn client(&self, ca: &str, identity: Option<&str>) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(self.path(&format!("{ca}.pem"))).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let config = match identity {
            None => builder.with_no_client_auth(),
            Some(name) => {
                let chain = CertificateDer::pem_file_iter(self.path(&format!("{name}.pem")))
                    .unwrap()
                    .collect::<Result<Vec<_>, _>>()
                    .unwrap();
                let key = PrivateKeyDer::from_pem_file(self.path(&format!("{name}.key"))).unwrap();
                builder.with_client_auth_cert(chain, key).unwrap()
            }
        };
        Arc::new(config)
    }
}

/// A device speaking the line protocol over TLS.
struct TlsDevice {
    reader: BufReader<StreamOwned<ClientConnection, TcpStream>>,
}

impl TlsDevice {
    /// Connects and completes the handshake (rustls finishes it lazily, so
    /// a refused client certificate shows up as the first read failing).
    fn connect(port: u16, config: Arc<ClientConfig>) -> std::io::Result<TlsDevice> {
        let tcp = TcpStream::connect(("127.0.0.1", port))?;
        tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
        let name = ServerName::try_from("127.0.0.1").unwrap().to_owned();
        let conn = ClientConnection::new(config, name).map_err(std::io::Error::other)?;
        let mut stream = StreamOwned::new(conn, tcp);
        while stream.conn.is_handshaking() {
            stream.conn.complete_io(&mut stream.sock)?;
        }
        Ok(TlsDevice {
            reader: BufReader::new(stream),
        })
    }

    fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let s = self.reader.get_mut();
        s.write_all(bytes)?;
        s.flush()
    }

    fn line(&mut self) -> std::io::Result<String> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(line.trim_end().to_owned())
    }

    fn json(&mut self) -> Value {
        serde_json::from_str(&self.line().expect("a reply")).unwrap()
    }

    fn request(&mut self, uid: &str, device: Option<&str>, data: Value) -> Value {
        let mut req = json!({"action":"telemetry","uid":uid,"data":data});
        if let Some(d) = device {
            req["deviceUid"] = Value::from(d);
        }
        self.send(format!("{req}\n").as_bytes()).unwrap();
        self.json()
    }

    /// True once the gateway ends the session (EOF, reset or TLS alert).
    fn closed(&mut self) -> bool {
        let mut buf = [0u8; 64];
        loop {
            match self.reader.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return false,
                Err(_) => return true,
            }
        }
    }
}

#[test]
fn tls_listener_speaks_the_protocol_with_a_verified_certificate() {
    let broker = shared_broker();
    let (up, down) = broker.fresh_topics(1, 1);
    let pki = Pki::new();
    let tls_port = free_port();
    let gw = Gateway::start(pki.gateway_options(
        GatewayOptions::new(broker.addr()).topics(&up, &down),
        tls_port,
    ));
    let mut d = TlsDevice::connect(tls_port, pki.client("ca", None)).expect("TLS handshake");
    d.send(b"Ping\n").unwrap();
    assert_eq!(d.line().unwrap(), "Pong");
    // Frames split across TLS records and several per record.
    let frame =
        json!({"action":"telemetry","uid":"t1","deviceUid":"dev-tls","data":{"x":1}}).to_string();
    let (a, b) = frame.split_at(10);
    d.send(a.as_bytes()).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    d.send(format!("{b}\n{}\n", frame.replace("t1", "t2")).as_bytes())
        .unwrap();
    let first = ack_id(&d.json());
    let second = ack_id(&d.json());
    d.send(b"{bad\n").unwrap();
    assert_eq!(d.json()["errorCode"], "bad_json");

    // The plain listener still works beside it.
    let mut plain = gw.device();
    ack_id(&plain.request("telemetry", "p1", None, json!({})));

    let records = read_topic(&broker.addr(), &up, 1, 3, WAIT);
    for id in [&first, &second] {
        let r = records
            .iter()
            .find(|r| r.payload["messageId"] == **id)
            .expect("acked over TLS, in Kafka");
        assert_eq!(r.payload["deviceRequest"]["deviceUid"], "dev-tls");
        assert_eq!(r.key, b"dev-tls", "key: the claimed deviceUid");
    }

    // A client that trusts another CA refuses the gateway's certificate.
    pki.ca("other");
    let refused = TlsDevice::connect(tls_port, pki.client("other", None));
    assert!(
        refused.is_err(),
        "a certificate from an unknown CA was accepted"
    );
}

#[test]
fn wrong_protocol_on_either_port_fails_cleanly_and_hurts_no_one() {
    let pki = Pki::new();
    let tls_port = free_port();
    let gw = Gateway::start(
        pki.gateway_options(GatewayOptions::offline(), tls_port)
            .env("EDGEGATE_AUTH_TIMEOUT_SECS", 2),
    );
    let mut good = TlsDevice::connect(tls_port, pki.client("ca", None)).unwrap();

    // Plain TCP on the TLS port: closed, counted, nothing echoed.
    let mut plain = Device::connect(tls_port);
    plain.send(r#"{"action":"telemetry","uid":"x"}"#);
    assert!(plain.closed_within(Duration::from_secs(5)));
    gw.wait_metric(
        "edgegate_tls_handshake_errors_total{reason=\"not_tls\"}",
        |v| v == 1.0,
    );

    // A TCP connection that never starts its handshake is closed in time.
    let mut silent = Device::connect(tls_port);
    assert!(silent.closed_within(Duration::from_secs(6)));
    gw.wait_metric(
        "edgegate_tls_handshake_errors_total{reason=\"timeout\"}",
        |v| v == 1.0,
    );

    // TLS on the plain port: the handshake fails on the client's side.
    let config = pki.client("ca", None);
    assert!(TlsDevice::connect(gw.port, config).is_err());

    // Meanwhile the good connection was served throughout.
    good.send(b"Ping\n").unwrap();
    assert_eq!(good.line().unwrap(), "Pong");
    let mut plain_ok = gw.device();
    plain_ok.send("Ping");
    assert_eq!(plain_ok.line().as_deref(), Some("Pong"));
    // Handshake failures do not damp the address.
    assert_eq!(gw.metric("edgegate_auth_damped_total"), 0.0);
}

fn mtls_gateway(pki: &Pki, opts: GatewayOptions, revoked: Option<&Path>) -> (Gateway, u16) {
    let tls_port = free_port();
    let mut opts = pki
        .gateway_options(opts, tls_port)
        .env("EDGEGATE_AUTH_MODE", "mtls")
        .env("EDGEGATE_TLS_CLIENT_CA_FILE", pki.path("ca.pem").display());
    if let Some(r) = revoked {
        opts = opts.env("EDGEGATE_AUTH_REVOKED_FILE", r.display());
    }
    (Gateway::start(opts), tls_port)
}

#[test]
fn mtls_binds_to_the_certificate_and_refuses_the_rest() {
    let broker = shared_broker();
    let (up, down) = broker.fresh_topics(1, 1);
    let pki = Pki::new();
    pki.device("ca", "dev1", "dev-m1");
    pki.ca("rogue");
    pki.device("rogue", "forged", "dev-m1");
    let (gw, tls_port) = mtls_gateway(
        &pki,
        GatewayOptions::new(broker.addr())
            .topics(&up, &down)
            .env("EDGEGATE_KAFKA_CONSUMER_GROUP_ID", unique("group")),
        None,
    );
    gw.wait_consumer();

    // The plain listener does not start in mtls mode.
    assert!(TcpStream::connect(("127.0.0.1", gw.port)).is_err());

    // No client certificate: refused.
    let no_cert = TlsDevice::connect(tls_port, pki.client("ca", None))
        .and_then(|mut d| d.send(b"Ping\n").and_then(|_| d.line()));
    assert!(no_cert.is_err(), "served without a client certificate");
    gw.wait_metric(
        "edgegate_tls_handshake_errors_total{reason=\"no_certificate\"}",
        |v| v == 1.0,
    );

    // A certificate for the same CN from another CA: refused.
    let forged = TlsDevice::connect(tls_port, pki.client("ca", Some("forged")))
        .and_then(|mut d| d.send(b"Ping\n").and_then(|_| d.line()));
    assert!(
        forged.is_err(),
        "a certificate from another CA was accepted"
    );
    gw.wait_metric(
        "edgegate_tls_handshake_errors_total{reason=\"bad_certificate\"}",
        |v| v == 1.0,
    );

    // A valid one binds to its CN at once.
    let mut d = TlsDevice::connect(tls_port, pki.client("ca", Some("dev1"))).unwrap();
    let id = ack_id(&d.request("m1", None, json!({"n":1})));
    let spoof = d.request("m2", Some("dev-other"), json!({}));
    assert_eq!(spoof["errorCode"], "unauthorized", "{spoof}");
    let records = read_topic(&broker.addr(), &up, 1, 1, WAIT);
    let r = records
        .iter()
        .find(|r| r.payload["messageId"] == id)
        .unwrap();
    assert_eq!(r.payload["deviceUid"], "dev-m1");
    assert_eq!(r.key, b"dev-m1");
    // Downlink by deviceUid, no connect.response needed.
    let p = producer(&broker.addr());
    let deadline = Instant::now() + WAIT;
    d.reader
        .get_ref()
        .sock
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    loop {
        produce(
            &p,
            &down,
            &[server_response(
                None,
                Some("dev-m1"),
                json!({"action":"notice","uid":"n1","status":"ok"}),
            )],
        );
        if let Ok(line) = d.line() {
            assert!(line.contains("\"n1\""), "{line}");
            break;
        }
        assert!(Instant::now() < deadline, "downlink by CN never arrived");
    }
    assert_eq!(gw.metric("edgegate_auth_ok_total"), 1.0);
}

#[test]
fn mtls_refuses_a_certificate_that_is_not_for_clients() {
    let pki = Pki::new();
    // The hub's own certificate, from the same CA, and a device certificate
    // whose extended key usage names servers only.
    pki.issue(
        "ca",
        "server-only",
        "/CN=dev-s1",
        "extendedKeyUsage=serverAuth",
    );
    let (gw, tls_port) = mtls_gateway(&pki, GatewayOptions::offline(), None);
    for identity in ["server", "server-only"] {
        let refused = TlsDevice::connect(tls_port, pki.client("ca", Some(identity)))
            .and_then(|mut d| d.send(b"Ping\n").and_then(|_| d.line()));
        assert!(refused.is_err(), "{identity} was accepted as a device");
    }
    gw.wait_metric(
        "edgegate_tls_handshake_errors_total{reason=\"bad_certificate\"}",
        |v| v == 2.0,
    );
    // A certificate for clients from the same CA still works.
    pki.device("ca", "dev1", "dev-s2");
    let mut d = TlsDevice::connect(tls_port, pki.client("ca", Some("dev1"))).unwrap();
    ack_id(&d.request("ok", None, json!({})));
}

#[test]
fn mtls_revoked_certificates_are_refused_and_cut_off() {
    let pki = Pki::new();
    pki.device("ca", "dev1", "dev-v1");
    pki.device("ca", "dev2", "dev-v2");
    let revoked = pki.path("revoked");
    std::fs::write(&revoked, "dev-v2\n").unwrap();
    let (gw, tls_port) = mtls_gateway(&pki, GatewayOptions::offline(), Some(&revoked));

    let mut refused = TlsDevice::connect(tls_port, pki.client("ca", Some("dev2"))).unwrap();
    let reply = refused.json();
    assert_eq!(reply["errorCode"], "unauthorized", "{reply}");
    assert!(refused.closed());

    let mut d = TlsDevice::connect(tls_port, pki.client("ca", Some("dev1"))).unwrap();
    d.send(b"Ping\n").unwrap();
    assert_eq!(d.line().unwrap(), "Pong");
    std::fs::write(&revoked, "dev-v2\ndev-v1\n").unwrap();
    let start = Instant::now();
    assert!(d.closed(), "a revoked device's connection stayed open");
    assert!(start.elapsed() < Duration::from_secs(5));
    assert_eq!(gw.metric("edgegate_auth_revoked_closed_total"), 1.0);
    assert_eq!(
        gw.metric("edgegate_auth_failures_total{reason=\"revoked\"}"),
        1.0
    );
}

#[test]
fn idle_tls_connections_hold_little_memory() {
    const CONNS: usize = 1_000;
    let pki = Pki::new();
    let tls_port = free_port();
    let gw = Gateway::start(pki.gateway_options(GatewayOptions::offline(), tls_port));
    let config = pki.client("ca", None);
    // Warm up: the first connections allocate the runtime's own tables.
    let mut warm: Vec<TlsDevice> = (0..50)
        .map(|_| TlsDevice::connect(tls_port, config.clone()).unwrap())
        .collect();
    for d in &mut warm {
        d.send(b"Ping\n").unwrap();
        assert_eq!(d.line().unwrap(), "Pong");
    }
    let before = rss_kib(gw.pid());
    // Each connection completes its handshake and one exchange, then idles.
    let mut idle = Vec::with_capacity(CONNS);
    for _ in 0..CONNS {
        let mut d = TlsDevice::connect(tls_port, config.clone()).unwrap();
        d.send(b"Ping\n").unwrap();
        assert_eq!(d.line().unwrap(), "Pong");
        idle.push(d);
    }
    std::thread::sleep(Duration::from_millis(500));
    let after = rss_kib(gw.pid());
    let per_conn = (after.saturating_sub(before)) * 1024 / CONNS as u64;
    eprintln!("{CONNS} idle TLS connections: gateway RSS {before} KiB -> {after} KiB, {per_conn} bytes each");
    assert!(
        per_conn < 12 * 1024,
        "{per_conn} bytes per idle TLS connection"
    );
    assert_eq!(gw.metric("edgegate_connections"), (CONNS + 50) as f64);
}

#[test]
fn sighup_replaces_the_certificate_for_new_handshakes_and_keeps_open_connections() {
    let pki = Pki::new();
    let tls_port = free_port();
    let gw = Gateway::start(pki.gateway_options(GatewayOptions::offline(), tls_port));
    let mut open = TlsDevice::connect(tls_port, pki.client("ca", None)).unwrap();
    open.send(b"Ping\n").unwrap();
    assert_eq!(open.line().unwrap(), "Pong");

    // The certificate is renewed in place, by another CA.
    pki.ca("renewed");
    pki.issue(
        "renewed",
        "server",
        "/CN=edgegate-test",
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth",
    );
    gw.signal("HUP");
    gw.wait_metric("edgegate_reloads_total", |v| v == 1.0);
    assert!(
        TlsDevice::connect(tls_port, pki.client("ca", None)).is_err(),
        "the old certificate is still served"
    );
    let mut renewed = TlsDevice::connect(tls_port, pki.client("renewed", None)).unwrap();
    renewed.send(b"Ping\n").unwrap();
    assert_eq!(renewed.line().unwrap(), "Pong");
    // The connection made before the reload is still there.
    open.send(b"Ping\n").unwrap();
    assert_eq!(open.line().unwrap(), "Pong");

    // A broken key file: the reload is refused and the running one kept.
    std::fs::write(pki.path("server.key"), "not a key\n").unwrap();
    gw.signal("HUP");
    gw.wait_metric("edgegate_reloads_failed_total", |v| v == 1.0);
    assert!(gw
        .log()
        .contains("reload refused, the running settings are kept"));
    assert!(TlsDevice::connect(tls_port, pki.client("renewed", None)).is_ok());
    open.send(b"Ping\n").unwrap();
    assert_eq!(open.line().unwrap(), "Pong");
}
