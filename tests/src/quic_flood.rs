//! A stranger on the LAN holding an agent's QUIC handshakes open, the cheap way: Initial packets
//! captured from a real QUIC client (ALPN `deckhand/1`, so the agent goes on with the handshake) and
//! replayed from fresh ports, none ever answered. Each one the agent takes in costs it a handshake slot
//! until the handshake times out.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// `n` distinct Initial datagrams (each opens a different connection), captured by pointing a real
/// client at a socket that never answers.
pub async fn capture_initials(n: usize) -> Vec<Vec<u8>> {
    let sink = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let sink_addr = sink.local_addr().unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    // Nothing is trusted: the handshake never gets as far as the server's certificate.
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    tls.alpn_protocols = vec![deckhand_protocol::wire::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let cfg = quinn::ClientConfig::new(Arc::new(crypto));
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let mut held = Vec::new();
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    let mut buf = vec![0u8; 4096];
    while out.len() < n {
        held.push(
            endpoint
                .connect_with(cfg.clone(), sink_addr, deckhand_protocol::wire::PEER_NAME)
                .unwrap(),
        );
        // The first datagram of a new connection id; retransmissions of earlier ones are skipped.
        loop {
            let (len, _) = tokio::time::timeout(Duration::from_secs(2), sink.recv_from(&mut buf))
                .await
                .expect("the client sends its Initial")
                .unwrap();
            let d = &buf[..len];
            let dcid = d
                .get(5)
                .and_then(|l| d.get(6..6 + usize::from(*l)))
                .map(<[u8]>::to_vec)
                .unwrap_or_default();
            if d.first().is_some_and(|b| b & 0x80 != 0) && seen.insert(dcid) {
                out.push(d.to_vec());
                break;
            }
        }
    }
    drop(held);
    endpoint.close(0u8.into(), b"");
    out
}

/// Replays `initials` at `target`, `per_burst` of them every `every`, each from a fresh port, cycling
/// through them, until the returned task is aborted (or dropped with the runtime).
pub fn stall_handshakes(
    target: SocketAddr,
    initials: Vec<Vec<u8>>,
    per_burst: usize,
    every: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut i = 0;
        loop {
            for _ in 0..per_burst {
                let packet = &initials[i % initials.len()];
                i += 1;
                if let Ok(s) = tokio::net::UdpSocket::bind("127.0.0.1:0").await {
                    let _ = s.send_to(packet, target).await;
                }
            }
            tokio::time::sleep(every).await;
        }
    })
}
