//! PostgreSQL over TLS: the SDK's pool honours `sslmode`, `sslrootcert`,
//! `sslcert` and `sslkey`, always verifies the server, and a barrier runs
//! over it. A real server with a certificate made in the test.

use tandem_cli::certs::DevCa;
use tandem_sdk::postgres::{self, PgBarrier};
use tandem_tests::pg::PgServer;

/// Whether the pool's connection is encrypted, or the error getting one.
async fn ssl_in_use(url: &str) -> Result<bool, String> {
    let pool = postgres::pool(url, 1).map_err(|e| e.to_string())?;
    let conn = pool.get().await.map_err(|e| format!("{e:?}"))?;
    let row = conn
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok(row.get(0))
}

// Rule: sslmode decides whether TLS is used; every TLS connection verifies
// the server against sslrootcert; require refuses a server without TLS.
#[tokio::test]
async fn the_pool_speaks_tls_as_sslmode_says_and_verifies_the_server() {
    let pg = PgServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let base = pg.url("postgres");

    // A server without TLS: prefer falls back, require refuses.
    assert_eq!(ssl_in_use(&base).await, Ok(false));
    let refused = ssl_in_use(&format!("{base} sslmode=require")).await;
    assert!(refused.is_err(), "require accepted a plaintext server");

    let ca = DevCa::new("database CA").expect("ca");
    let server = ca.issue(&["localhost", "127.0.0.1"]).expect("issue");
    pg.enable_tls(&server.cert_pem, &server.key_pem);
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).expect("write");
    let ca_path = ca_file.to_str().expect("utf-8");
    let verified = format!("{base} sslmode=verify-full sslrootcert={ca_path}");
    tandem_tests::eventually_async("the server reloaded with TLS on", || {
        let url = verified.clone();
        async move { ssl_in_use(&url).await == Ok(true) }
    })
    .await;

    let url_form = format!(
        "postgres://postgres@127.0.0.1:{}/postgres?sslmode=require&sslrootcert={ca_path}",
        pg.port
    );
    assert_eq!(ssl_in_use(&url_form).await, Ok(true));
    let prefer = format!("{base} sslrootcert={ca_path}");
    assert_eq!(
        ssl_in_use(&prefer).await,
        Ok(true),
        "prefer did not use TLS"
    );
    assert_eq!(
        ssl_in_use(&format!("{base} sslmode=disable")).await,
        Ok(false)
    );

    // A server certificate from another CA is refused in every TLS mode,
    // prefer included: no fallback to an unverified connection.
    let other = DevCa::new("someone else").expect("ca");
    let other_file = dir.path().join("other.pem");
    std::fs::write(&other_file, other.pem()).expect("write");
    let other_path = other_file.to_str().expect("utf-8");
    for mode in ["prefer", "require", "verify-full"] {
        let got = ssl_in_use(&format!("{base} sslmode={mode} sslrootcert={other_path}")).await;
        assert!(
            got.is_err(),
            "sslmode={mode} accepted an unknown server: {got:?}"
        );
    }
    let missing = postgres::pool(
        &format!("{base} sslmode=require sslrootcert=/nonexistent"),
        1,
    );
    assert!(missing.is_err(), "a missing CA file was accepted");

    // The barrier's tables and calls work over the verified connection.
    let barrier = PgBarrier::open(postgres::pool(&verified, 2).expect("pool"))
        .await
        .expect("barrier over TLS");
    let conn = barrier.pool().get().await.expect("conn");
    let row = conn
        .query_one("SELECT count(*) FROM tandem_barrier", &[])
        .await
        .expect("query");
    assert_eq!(row.get::<_, i64>(0), 0);
}
