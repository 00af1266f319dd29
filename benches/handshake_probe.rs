//! One `handshake_probe` probe ([`probe_once`]): connect, full mTLS
//! handshake (TLS 1.3, ECDSA P-256 SVIDs from the demo CA, both sides
//! verifying), the wait for the server's session tickets, close. Against an
//! in-process tokio-rustls server over loopback TCP and over a Unix socket.
//!
//! The time per iteration is the time per probe, client and server work
//! together on the same runtime.

use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use spire_healer::clock::{Clock, SystemClock};
use spire_healer::handshake::Reason;
use spire_healer::sensors::handshake_probe::{ProbeAddress, Target, probe_once};
use spire_healer::simulated::issuer::{Flavor, TestCa};
use spire_healer::spiffe_id::SpiffeId;
use spire_healer::spire_api::tls::{Authorize, StaticIdentity};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::runtime::Runtime;
use tokio_rustls::TlsAcceptor;

const SERVER_ID: &str = "spiffe://bench.test/server";
const CLIENT_ID: &str = "spiffe://bench.test/client";
const HOUR: Duration = Duration::from_secs(3600);

async fn answer<S: AsyncRead + AsyncWrite + Unpin>(acceptor: TlsAcceptor, s: S) {
    if let Ok(mut tls) = acceptor.accept(s).await {
        let mut buf = [0u8; 64];
        let _ = tls.read(&mut buf).await;
    }
}

fn probes(c: &mut Criterion) {
    let rt = Runtime::new().expect("tokio runtime");
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let now = clock.now();
    let ca = TestCa::new("bench.test", now - 24 * HOUR, now + 24 * HOUR).expect("CA");
    let (server_leaf, server_key, _) = ca
        .issue(SERVER_ID, now - HOUR, now + HOUR, Flavor::Valid)
        .expect("server SVID");
    let (client_leaf, client_key, _) = ca
        .issue(CLIENT_ID, now - HOUR, now + HOUR, Flavor::Valid)
        .expect("client SVID");
    let identity = StaticIdentity(Some((
        vec![client_leaf],
        client_key,
        vec![ca.der().to_vec()],
    )));

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from(ca.der().to_vec()))
        .expect("root");
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .expect("client verifier");
    let cfg = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![CertificateDer::from(server_leaf)],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key)),
        )
        .expect("server cert");
    let acceptor = TlsAcceptor::from(Arc::new(cfg));

    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("peer.sock");
    let (tcp, unix) = rt.block_on(async {
        let tcp = TcpListener::bind("127.0.0.1:0").await.expect("bind tcp");
        let addr = tcp.local_addr().expect("addr");
        let a = acceptor.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = tcp.accept().await {
                tokio::spawn(answer(a.clone(), s));
            }
        });
        let unix = UnixListener::bind(&socket).expect("bind unix");
        let a = acceptor.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = unix.accept().await {
                tokio::spawn(answer(a.clone(), s));
            }
        });
        (ProbeAddress::Tcp(addr), ProbeAddress::Unix(socket.clone()))
    });

    let authorize = Authorize::Exact(SpiffeId::parse(SERVER_ID).expect("id"));
    let mut group = c.benchmark_group("handshake_probe");
    for (name, address) in [("tcp", tcp), ("unix", unix)] {
        let target = Target {
            address,
            server_name: ServerName::try_from("localhost").expect("name"),
            authorize: authorize.clone(),
            settle: spire_healer::sensors::handshake_probe::SETTLE,
        };
        group.bench_function(name, |b| {
            b.iter(|| {
                let r = rt
                    .block_on(probe_once(
                        &target,
                        &identity,
                        &clock,
                        Duration::from_secs(5),
                    ))
                    .expect("probed");
                assert_eq!(r.reason, Reason::Ok, "{:?}", r.detail);
                r
            });
        });
    }
    group.finish();
}

criterion_group!(benches, probes);
criterion_main!(benches);
