//! The harness itself, on real PostgreSQL: private clusters start side by side, speak TLS with
//! certificates from our CA, enforce SCRAM, survive a stop/start, and vanish when dropped.

use eastwall_ca::RevokeTarget;
use eastwall_e2e::{client_config, connect_plain, connect_tls, pg, port_refuses, TestPki};
use tokio_postgres::error::SqlState;

#[tokio::test]
async fn scram_role_connects_with_the_right_password_and_gets_28p01_with_a_wrong_one() {
    let cluster = pg()
        .hba("host all all 127.0.0.1/32 scram-sha-256")
        .start()
        .expect("start cluster");
    cluster
        .run_sql("CREATE ROLE app LOGIN PASSWORD 'correct horse';")
        .expect("create role");
    let stored = cluster
        .run_sql("SELECT rolpassword LIKE 'SCRAM-SHA-256$%' FROM pg_authid WHERE rolname = 'app';")
        .expect("read verifier");
    assert_eq!(
        stored.trim(),
        "t",
        "password must be stored as a SCRAM verifier"
    );

    let (host, port) = (cluster.host(), cluster.port());
    let client = connect_plain(host, port, "app", "postgres", Some("correct horse"))
        .await
        .expect("right password connects");
    let row = client
        .query_one("SELECT current_user::text", &[])
        .await
        .expect("query");
    assert_eq!(row.get::<_, String>(0), "app");

    let err = connect_plain(host, port, "app", "postgres", Some("wrong horse"))
        .await
        .expect_err("wrong password must be refused");
    assert_eq!(err.code(), Some(&SqlState::INVALID_PASSWORD), "{err}");

    // hba is scram for everyone on TCP, the superuser included: trust is local-socket only.
    let err = connect_plain(host, port, "postgres", "postgres", Some("guess"))
        .await
        .expect_err("superuser has no password, so TCP login must fail");
    assert_eq!(err.code(), Some(&SqlState::INVALID_PASSWORD), "{err}");
}

#[tokio::test]
async fn superuser_password_and_extra_settings_take_effect() {
    let cluster = pg()
        .hba("host all all 127.0.0.1/32 scram-sha-256")
        .superuser_password("s3cret pass")
        .setting("work_mem", "7MB")
        .setting("cluster_name", "it's quoted")
        .start()
        .expect("start cluster");
    let client = connect_plain(
        cluster.host(),
        cluster.port(),
        "postgres",
        "postgres",
        Some("s3cret pass"),
    )
    .await
    .expect("superuser logs in with its password over TCP");
    let row = client.query_one("SHOW work_mem", &[]).await.expect("show");
    assert_eq!(row.get::<_, String>(0), "7MB");
    let name = cluster
        .run_sql("SHOW cluster_name;")
        .expect("run_sql still works over the socket");
    assert_eq!(
        name.trim(),
        "it's quoted",
        "a quote in a value must survive"
    );
}

#[tokio::test]
async fn a_stopped_cluster_comes_back_on_the_same_port_with_its_data() {
    let mut cluster = pg().start().expect("start cluster");
    let port = cluster.port();
    cluster
        .run_sql("CREATE TABLE kept (v int); INSERT INTO kept VALUES (42);")
        .expect("seed");
    let client = connect_plain(cluster.host(), port, "postgres", "postgres", None)
        .await
        .expect("trust over loopback by default");

    cluster.stop().expect("stop");
    assert!(port_refuses(port), "port {port} still accepts after stop");
    assert!(
        client.simple_query("SELECT 1").await.is_err(),
        "a session must not survive the server stopping"
    );

    cluster.start_again().expect("start again");
    assert_eq!(cluster.port(), port);
    let client = connect_plain(cluster.host(), port, "postgres", "postgres", None)
        .await
        .expect("reconnect");
    let row = client
        .query_one("SELECT v FROM kept", &[])
        .await
        .expect("data survives a restart");
    assert_eq!(row.get::<_, i32>(0), 42);

    cluster.restart().expect("restart");
    assert_eq!(
        cluster.run_sql("SELECT v FROM kept;").expect("sql").trim(),
        "42"
    );
}

#[test]
fn a_bad_setting_fails_start_with_the_server_log_in_the_error() {
    let err = pg()
        .setting("no_such_setting_xyz", "1")
        .start()
        .expect_err("an unknown setting must stop the server from starting");
    let text = err.to_string();
    assert!(
        text.contains("no_such_setting_xyz"),
        "the error should quote the server log: {text}"
    );
}

const CERT_ONLY: &str = "hostssl all all 127.0.0.1/32 cert";

#[tokio::test]
async fn two_tls_clusters_at_once_admit_our_client_certs_and_are_gone_after_drop() {
    let pki = TestPki::new("corp.example").expect("test CA");
    let server = pki.server("pg-server", "db/postgres").expect("server cert");
    let a = pg()
        .tls(pki.server_tls(&server))
        .hba(CERT_ONLY)
        .start()
        .expect("cluster a");
    let b = pg()
        .tls(pki.server_tls(&server))
        .hba(CERT_ONLY)
        .start()
        .expect("cluster b");
    assert_ne!(a.port(), b.port());
    b.run_sql("CREATE ROLE billing LOGIN;")
        .expect("create role");

    // `cert` auth maps the certificate's CN to the role.
    let dba = pki
        .client("dba", "app/operators/dba", Some("postgres"))
        .expect("client cert");
    let billing = pki
        .client("billing", "app/billing", Some("billing"))
        .expect("client cert");
    for (cluster, who, role) in [(&a, &dba, "postgres"), (&b, &billing, "billing")] {
        let tls = client_config(&pki.ca_pem(), Some((&who.cert_pem, &who.key_pem)))
            .expect("client TLS config");
        let client = connect_tls("localhost", cluster.port(), role, "postgres", tls)
            .await
            .unwrap_or_else(|e| panic!("{role} over verify-full TLS: {e}"));
        let row = client
            .query_one(
                "SELECT current_user::text, s.ssl, s.client_dn \
                 FROM pg_stat_ssl s WHERE s.pid = pg_backend_pid()",
                &[],
            )
            .await
            .expect("query");
        assert_eq!(row.get::<_, String>(0), role);
        assert!(row.get::<_, bool>(1), "session must be TLS");
        let dn: Option<String> = row.get(2);
        assert!(
            dn.as_deref()
                .is_some_and(|dn| dn.contains(&format!("CN={role}"))),
            "server saw client DN {dn:?}"
        );

        // hostssl only: a plaintext login finds no pg_hba entry.
        let err = connect_plain(cluster.host(), cluster.port(), role, "postgres", None)
            .await
            .expect_err("plaintext must be refused");
        assert_eq!(
            err.code(),
            Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION),
            "{err}"
        );
    }

    let gone = [
        (a.data_dir().to_owned(), a.port()),
        (b.data_dir().to_owned(), b.port()),
    ];
    drop(a);
    drop(b);
    for (dir, port) in gone {
        assert!(!dir.exists(), "{} survived drop", dir.display());
        assert!(port_refuses(port), "port {port} still accepts after drop");
    }
}

#[tokio::test]
async fn postgres_refuses_a_client_cert_from_another_ca() {
    let ours = TestPki::new("corp.example").expect("our CA");
    // Same trust domain, same CN, different key: an impostor CA.
    let theirs = TestPki::new("corp.example").expect("their CA");
    let server = ours
        .server("pg-server", "db/postgres")
        .expect("server cert");
    let cluster = pg()
        .tls(ours.server_tls(&server))
        .hba(CERT_ONLY)
        .start()
        .expect("cluster");
    let port = cluster.port();

    let impostor = theirs
        .client("impostor", "app/operators/dba", Some("postgres"))
        .expect("impostor cert");
    let tls = client_config(
        &ours.ca_pem(),
        Some((&impostor.cert_pem, &impostor.key_pem)),
    )
    .expect("client TLS config");
    let err = connect_tls("localhost", port, "postgres", "postgres", tls)
        .await
        .expect_err("a cert from another CA must be refused");
    let text = format!("{err:?}");
    assert!(
        err.code().is_none() && text.contains("UnknownCA"),
        "expected a TLS unknown-CA alert before any login, got: {text}"
    );

    // No client certificate at all: TLS is fine, `cert` auth is not.
    let tls = client_config(&ours.ca_pem(), None).expect("client TLS config");
    let err = connect_tls("localhost", port, "postgres", "postgres", tls)
        .await
        .expect_err("no client cert must be refused");
    assert_eq!(
        err.code(),
        Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION),
        "{err}"
    );

    // The client side verifies too: trusting only their CA, our server is refused.
    let tls = client_config(
        &theirs.ca_pem(),
        Some((&impostor.cert_pem, &impostor.key_pem)),
    )
    .expect("client TLS config");
    let err = connect_tls("localhost", port, "postgres", "postgres", tls)
        .await
        .expect_err("a server cert from another CA must be refused by the client");
    assert!(err.code().is_none(), "{err}");

    // Control: the same CN from our CA is admitted, so the CA is what made the difference.
    let dba = ours
        .client("dba", "app/operators/dba", Some("postgres"))
        .expect("client cert");
    let tls = client_config(&ours.ca_pem(), Some((&dba.cert_pem, &dba.key_pem)))
        .expect("client TLS config");
    let client = connect_tls("localhost", port, "postgres", "postgres", tls)
        .await
        .expect("our cert is admitted");
    client.simple_query("SELECT 1").await.expect("query");
}

#[tokio::test]
async fn postgres_checks_client_certs_against_our_crl() {
    let pki = TestPki::new("corp.example").expect("test CA");
    let server = pki.server("pg-server", "db/postgres").expect("server cert");
    let revoked = pki
        .client("revoked", "app/operators/mallory", Some("postgres"))
        .expect("client cert");
    let kept = pki
        .client("kept", "app/operators/dba", Some("postgres"))
        .expect("client cert");
    let id = pki.spiffe_id("app/operators/mallory").expect("id");
    pki.ca()
        .revoke(&RevokeTarget::Id(id))
        .expect("revoke mallory");

    let mut tls = pki.server_tls(&server);
    tls.crl_pem = Some(pki.crl_pem().expect("crl"));
    let cluster = pg().tls(tls).hba(CERT_ONLY).start().expect("cluster");

    let config = client_config(&pki.ca_pem(), Some((&revoked.cert_pem, &revoked.key_pem)))
        .expect("client TLS config");
    let err = connect_tls("localhost", cluster.port(), "postgres", "postgres", config)
        .await
        .expect_err("a revoked cert must be refused");
    let text = format!("{err:?}");
    assert!(
        err.code().is_none() && text.contains("CertificateRevoked"),
        "expected a TLS certificate-revoked alert, got: {text}"
    );

    let config = client_config(&pki.ca_pem(), Some((&kept.cert_pem, &kept.key_pem)))
        .expect("client TLS config");
    let client = connect_tls("localhost", cluster.port(), "postgres", "postgres", config)
        .await
        .expect("an unrevoked cert from the same CA is admitted");
    client.simple_query("SELECT 1").await.expect("query");
}
