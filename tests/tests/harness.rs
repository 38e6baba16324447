//! The harness itself, on real PostgreSQL: private clusters start side by side, speak TLS with
//! certificates from our CA, enforce SCRAM, survive a stop/start, and vanish when dropped.

use eastwall_e2e::{connect_plain, pg, port_refuses};
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
