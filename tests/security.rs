//! Mutual TLS and roles: who is refused, with what reason, and that the node keeps
//! serving everyone else.

mod common;

use std::time::Duration;

use common::*;
use dirsync::certs::{self, Ca, CertRequest};
use dirsync::client::{Client, ClientError};
use dirsync::tls::{self, Credentials, Role};
use dirsync::wire::io::{read_message, write_message};
use dirsync::wire::Message;

/// A bare QUIC connection to `node` with `creds`, for speaking the protocol by hand.
async fn raw(
    addr: std::net::SocketAddr,
    creds: &Credentials,
) -> (quinn::Endpoint, quinn::Connection) {
    let mut ep = quinn::Endpoint::client(LOOPBACK.parse().unwrap()).unwrap();
    ep.set_default_client_config(tls::client_config(creds).unwrap());
    let conn = ep.connect(addr, "localhost").unwrap().await.unwrap();
    (ep, conn)
}

async fn ask(conn: &quinn::Connection, msg: &Message) -> Result<Option<Message>, String> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    write_message(&mut send, msg)
        .await
        .map_err(|e| e.to_string())?;
    let _ = send.finish();
    read_message(&mut recv).await.map_err(|e| e.to_string())
}

/// The node still answers a legitimate client.
async fn still_serving(env: &TestEnv, node: &dirsync::node::NodeHandle) {
    let listing = env
        .client(node)
        .await
        .list()
        .await
        .expect("node still serves");
    assert_eq!(listing.nodes, ["a"]);
}

#[tokio::test]
async fn client_from_a_foreign_ca_is_refused() {
    let env = TestEnv::new();
    let a = env.start("a", &[]).await;
    let foreign_dir = env.tmp.path().join("foreign");
    certs::generate(&CertRequest::defaults(&foreign_dir)).unwrap();

    // Entirely foreign: the client does not trust the node either.
    let err = Client::connect(&a.local_addr().to_string(), &foreign_dir, "cli").await;
    let err = match err {
        Ok(c) => c.list().await.unwrap_err(),
        Err(e) => e,
    };
    assert!(matches!(err, ClientError::Connect { .. }), "{err}");

    // A foreign certificate that trusts our CA: the node must refuse it. The
    // handshake "succeeds" for the client; the refusal shows on the first stream.
    let mut creds = Credentials::load(&foreign_dir, "cli").unwrap();
    creds.ca = Credentials::load(&env.certs, "cli").unwrap().ca;
    let client = Client::connect_with(&a.local_addr().to_string(), &creds)
        .await
        .unwrap();
    let err = client.list().await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains("refused our certificate"), "{text}");
    still_serving(&env, &a).await;
    a.shutdown().await;
}

#[tokio::test]
async fn expired_certificate_is_refused() {
    let env = TestEnv::new();
    let a = env.start("a", &[]).await;
    let ca = Ca::load(&env.certs).unwrap().unwrap();
    let now = time::OffsetDateTime::now_utc();
    let (cert, key) = ca
        .issue_with_validity(
            "old",
            Role::Client,
            &[],
            now - time::Duration::days(10),
            now - time::Duration::days(1),
        )
        .unwrap();
    let dir = env.tmp.path().join("expired");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(env.certs.join("ca.pem"), dir.join("ca.pem")).unwrap();
    std::fs::write(dir.join("old.pem"), cert).unwrap();
    std::fs::write(dir.join("old.key"), key).unwrap();
    let client = Client::connect(&a.local_addr().to_string(), &dir, "old")
        .await
        .unwrap();
    let text = client.list().await.unwrap_err().to_string();
    assert!(text.contains("expired"), "{text}");
    still_serving(&env, &a).await;
    a.shutdown().await;
}

#[tokio::test]
async fn a_client_certificate_cannot_act_as_a_node() {
    let env = TestEnv::new();
    let a = env.start("a", &[]).await;
    let cli = Credentials::load(&env.certs, "cli").unwrap();
    let (_ep, conn) = raw(a.local_addr(), &cli).await;
    let hello = Message::Hello {
        version: dirsync::wire::PROTOCOL_VERSION,
        name: "cli".into(),
    };
    match ask(&conn, &hello).await {
        Ok(Some(Message::Refused { reason })) => {
            assert!(reason.contains("role client"), "{reason}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    let closed = tokio::time::timeout(Duration::from_secs(5), conn.closed())
        .await
        .unwrap();
    assert!(
        closed.to_string().contains("only node certificates"),
        "{closed}"
    );
    assert!(a.connected_peers().is_empty());

    // Node-only requests are refused too, on a fresh connection.
    let (_ep2, conn) = raw(a.local_addr(), &cli).await;
    match ask(&conn, &Message::PeerListRequest).await {
        Ok(Some(Message::Refused { reason })) => {
            assert!(reason.contains("client certificate"), "{reason}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }

    // And a node cannot be started with a client certificate.
    let mut config = env.config("cli", &[]);
    config.dir = env.dir("cli");
    let err = dirsync::node::start(config).await.err().expect("refused");
    assert!(err.to_string().contains("client certificate"), "{err}");
    still_serving(&env, &a).await;
    a.shutdown().await;
}

#[tokio::test]
async fn protocol_version_mismatch_is_refused_with_a_reason() {
    let env = TestEnv::new();
    let a = env.start("a", &[]).await;
    let c = Credentials::load(&env.certs, "c").unwrap();
    let (_ep, conn) = raw(a.local_addr(), &c).await;
    match ask(
        &conn,
        &Message::Hello {
            version: 99,
            name: "c".into(),
        },
    )
    .await
    {
        Ok(Some(Message::Refused { reason })) => {
            assert!(reason.contains("version mismatch"), "{reason}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    let closed = tokio::time::timeout(Duration::from_secs(5), conn.closed())
        .await
        .unwrap();
    assert!(
        closed.to_string().contains("protocol version mismatch"),
        "{closed}"
    );

    // A hello whose name does not match the certificate is refused as well.
    let (_ep, conn) = raw(a.local_addr(), &c).await;
    let hello = Message::Hello {
        version: dirsync::wire::PROTOCOL_VERSION,
        name: "b".into(),
    };
    match ask(&conn, &hello).await {
        Ok(Some(Message::Refused { reason })) => {
            assert!(reason.contains("certificate"), "{reason}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(a.connected_peers().is_empty());
    still_serving(&env, &a).await;
    a.shutdown().await;
}

#[tokio::test]
async fn malformed_frames_close_only_that_connection() {
    let env = TestEnv::new();
    let a = env.start("a", &[]).await;
    let c = Credentials::load(&env.certs, "c").unwrap();
    for garbage in [
        &[0xffu8, 0xff, 0xff, 0xff][..],
        &[0, 0, 0, 3, 0x7f, 1, 2][..],
    ] {
        let (_ep, conn) = raw(a.local_addr(), &c).await;
        let (mut send, _recv) = conn.open_bi().await.unwrap();
        send.write_all(garbage).await.unwrap();
        let _ = send.finish();
        let closed = tokio::time::timeout(Duration::from_secs(5), conn.closed())
            .await
            .unwrap();
        let text = closed.to_string();
        assert!(
            text.contains("malformed") || text.contains("exceeds"),
            "{text}"
        );
    }
    still_serving(&env, &a).await;
    a.shutdown().await;
}
