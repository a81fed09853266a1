//! Bearer tokens: 401 without a valid token, 403 for the wrong scope, anonymous reads.

mod common;

use std::path::PathBuf;

use common::{TestServer, request, sha256_hex};

const TOKENS: &str = "\
# admins
admin-0123456789 rw
reader-0123456789 ro          # read-only everywhere
team-a-0123456789 rw team-a   # read-write, team-a only
";

fn tokens_file() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokens");
    std::fs::write(&path, TOKENS).unwrap();
    (dir, path)
}

#[test]
fn tokens_decide_access() {
    let (_dir, path) = tokens_file();
    let server = TestServer::start(|config| config.tokens_file = Some(path));
    let bytes = b"guarded blob";
    let hash = sha256_hex(bytes);
    let cas = format!("{}/cas/{hash}", server.url);
    let team_a_cas = format!("{}/team-a/cas/{hash}", server.url);
    let team_b_ac = format!("{}/team-b/ac/{hash}", server.url);

    let missing = request("GET", &cas, None, None);
    assert_eq!(missing.status, 401);
    assert_eq!(
        missing.header("www-authenticate"),
        Some("Bearer realm=\"graphbuild-cache\"")
    );
    assert_eq!(request("PUT", &cas, None, Some(bytes)).status, 401);
    let wrong = request("PUT", &cas, Some("not-a-token"), Some(bytes));
    assert_eq!(wrong.status, 401);
    assert!(!String::from_utf8_lossy(&wrong.body).contains("not-a-token"));

    assert_eq!(
        request("PUT", &cas, Some("reader-0123456789"), Some(bytes)).status,
        403
    );
    assert_eq!(
        request("HEAD", &cas, Some("reader-0123456789"), None).status,
        404
    );
    assert_eq!(
        request("PUT", &team_b_ac, Some("team-a-0123456789"), Some(b"x")).status,
        403
    );
    assert_eq!(
        request("GET", &team_b_ac, Some("team-a-0123456789"), None).status,
        403
    );
    assert_eq!(
        request("PUT", &cas, Some("team-a-0123456789"), Some(bytes)).status,
        403
    );

    assert_eq!(
        request("PUT", &team_a_cas, Some("team-a-0123456789"), Some(bytes)).status,
        200
    );
    assert_eq!(
        request("GET", &cas, Some("reader-0123456789"), None).body,
        bytes
    );
    assert_eq!(
        request("PUT", &team_b_ac, Some("admin-0123456789"), Some(b"x")).status,
        200
    );
    assert_eq!(
        request("GET", &team_b_ac, Some("admin-0123456789"), None).body,
        b"x"
    );

    // Health and metrics stay open for probes and scrapers.
    assert_eq!(
        request("GET", &format!("{}/healthz", server.url), None, None).status,
        200
    );
    assert_eq!(
        server.metric(r#"graphbuild_cache_auth_denied_total{status="401"}"#),
        3
    );
    assert_eq!(
        server.metric(r#"graphbuild_cache_auth_denied_total{status="403"}"#),
        4
    );
}

#[test]
fn anonymous_reads_when_allowed() {
    let (_dir, path) = tokens_file();
    let server = TestServer::start(|config| {
        config.tokens_file = Some(path);
        config.allow_anonymous_read = true;
    });
    let bytes = b"public blob";
    let url = format!("{}/cas/{}", server.url, sha256_hex(bytes));
    assert_eq!(request("HEAD", &url, None, None).status, 404);
    assert_eq!(request("PUT", &url, None, Some(bytes)).status, 401);
    assert_eq!(
        request("PUT", &url, Some("reader-0123456789"), Some(bytes)).status,
        403
    );
    assert_eq!(
        request("PUT", &url, Some("admin-0123456789"), Some(bytes)).status,
        200
    );
    assert_eq!(request("GET", &url, None, None).body, bytes);
}

#[test]
fn a_bad_tokens_file_stops_startup_without_echoing_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokens");
    std::fs::write(&path, "good-token rw\nsecret-token-value rwx\n").unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut config = graphbuild_cache_server::ServerConfig::new(dir.path().join("store"));
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.tokens_file = Some(path);
    let Err(error) = runtime.block_on(graphbuild_cache_server::bind(config)) else {
        panic!("a bad tokens file must be refused");
    };
    let message = error.to_string();
    assert!(
        message.ends_with("tokens:2: access must be `ro` or `rw`, found `rwx`"),
        "{message}"
    );
    assert!(!message.contains("secret-token-value"));
}
