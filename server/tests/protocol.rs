//! The bazel-remote HTTP protocol: round trips, instances, errors, metrics.

mod common;

use common::{TestServer, blob, request, sha256_hex};

#[test]
fn cas_put_get_head_round_trip() {
    let server = TestServer::start(|_| {});
    let bytes = blob(1, 300_000);
    let url = format!("{}/cas/{}", server.url, sha256_hex(&bytes));

    let missing = request("HEAD", &url, None, None);
    assert_eq!(missing.status, 404);
    assert_eq!(request("GET", &url, None, None).status, 404);

    assert_eq!(request("PUT", &url, None, Some(&bytes)).status, 200);
    let head = request("HEAD", &url, None, None);
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), Some("300000"));
    let get = request("GET", &url, None, None);
    assert_eq!(get.status, 200);
    assert_eq!(get.body, bytes);

    // Stored where docs/cache-server.md says, and nothing left in tmp/.
    let hash = sha256_hex(&bytes);
    assert_eq!(
        std::fs::read(server.dir.join("cas").join(&hash[..2]).join(&hash)).unwrap(),
        bytes
    );
    assert!(server.temp_files().is_empty());

    // Empty blobs are blobs too.
    let empty = format!("{}/cas/{}", server.url, sha256_hex(b""));
    assert_eq!(request("PUT", &empty, None, Some(b"")).status, 200);
    let get = request("GET", &empty, None, None);
    assert_eq!((get.status, get.body.len()), (200, 0));
}

#[test]
fn action_cache_is_isolated_per_instance_and_cas_is_shared() {
    let server = TestServer::start(|_| {});
    let key = "ab".repeat(32);
    let team_a = format!("{}/team-a/ac/{key}", server.url);
    let team_b = format!("{}/team-b/ac/{key}", server.url);
    let no_instance = format!("{}/ac/{key}", server.url);

    assert_eq!(
        request("PUT", &team_a, None, Some(b"value of a")).status,
        200
    );
    assert_eq!(
        request("PUT", &no_instance, None, Some(b"value of default")).status,
        200
    );
    assert_eq!(request("GET", &team_a, None, None).body, b"value of a");
    assert_eq!(
        request("GET", &no_instance, None, None).body,
        b"value of default"
    );
    assert_eq!(request("GET", &team_b, None, None).status, 404);

    // The AC is not content-addressed: a value may be replaced.
    assert_eq!(
        request("PUT", &team_a, None, Some(b"newer value")).status,
        200
    );
    assert_eq!(request("GET", &team_a, None, None).body, b"newer value");

    // One CAS for everyone.
    let bytes = blob(2, 1000);
    let hash = sha256_hex(&bytes);
    assert_eq!(
        request(
            "PUT",
            &format!("{}/team-a/cas/{hash}", server.url),
            None,
            Some(&bytes)
        )
        .status,
        200
    );
    assert_eq!(
        request(
            "GET",
            &format!("{}/team-b/cas/{hash}", server.url),
            None,
            None
        )
        .body,
        bytes
    );
    assert_eq!(
        request("GET", &format!("{}/cas/{hash}", server.url), None, None).body,
        bytes
    );
    assert_eq!(server.metric(r#"graphbuild_cache_entries{kind="ac"}"#), 2);
    assert_eq!(server.metric(r#"graphbuild_cache_entries{kind="cas"}"#), 1);
}

#[test]
fn malformed_requests_are_refused() {
    let server = TestServer::start(|_| {});
    let hash = sha256_hex(b"x");
    assert_eq!(
        request(
            "GET",
            &format!("{}/cas/{}", server.url, hash.to_uppercase()),
            None,
            None
        )
        .status,
        400
    );
    assert_eq!(
        request("GET", &format!("{}/cas/abc", server.url), None, None).status,
        400
    );
    assert_eq!(
        request(
            "GET",
            &format!("{}/.hidden/ac/{hash}", server.url),
            None,
            None
        )
        .status,
        400
    );
    assert_eq!(
        request("GET", &format!("{}/blobs/{hash}", server.url), None, None).status,
        404
    );
    assert_eq!(
        request("GET", &format!("{}/a/b/cas/{hash}", server.url), None, None).status,
        404
    );
    let delete = request("DELETE", &format!("{}/cas/{hash}", server.url), None, None);
    assert_eq!(delete.status, 405);
    assert_eq!(delete.header("allow"), Some("GET, HEAD, PUT"));
    let oversized = vec![0u8; 1024 * 1024 + 1];
    // The server refuses an oversized action entry without reading it all: the client sees 413,
    // or a connection closed under its upload, depending on timing. Either way nothing is kept.
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    match agent
        .put(&format!("{}/ac/{hash}", server.url))
        .send(&oversized[..])
    {
        Ok(response) => assert_eq!(response.status().as_u16(), 413),
        Err(error) => {
            let text = error.to_string();
            assert!(
                text.contains("Broken pipe") || text.contains("reset"),
                "{text}"
            );
        }
    }
    assert_eq!(
        request("GET", &format!("{}/ac/{hash}", server.url), None, None).status,
        404
    );
    let health = request("GET", &format!("{}/healthz", server.url), None, None);
    assert_eq!((health.status, health.body.as_slice()), (200, &b"ok\n"[..]));
}

#[test]
fn metrics_count_hits_misses_and_bytes() {
    let server = TestServer::start(|config| config.max_size = Some(10_000_000));
    let bytes = blob(3, 5000);
    let url = format!("{}/cas/{}", server.url, sha256_hex(&bytes));
    assert_eq!(
        server.metric(r#"graphbuild_cache_misses_total{kind="cas"}"#),
        0
    );

    request("GET", &url, None, None);
    request("HEAD", &url, None, None);
    assert_eq!(
        server.metric(r#"graphbuild_cache_misses_total{kind="cas"}"#),
        2
    );

    request("PUT", &url, None, Some(&bytes));
    request("GET", &url, None, None);
    request("GET", &url, None, None);
    request("HEAD", &url, None, None);
    assert_eq!(
        server.metric(r#"graphbuild_cache_hits_total{kind="cas"}"#),
        3
    );
    assert_eq!(
        server.metric(r#"graphbuild_cache_uploads_total{kind="cas"}"#),
        1
    );
    assert_eq!(server.metric("graphbuild_cache_bytes_received_total"), 5000);
    assert_eq!(server.metric("graphbuild_cache_bytes_sent_total"), 10_000);
    assert_eq!(server.metric(r#"graphbuild_cache_entries{kind="cas"}"#), 1);
    assert_eq!(server.metric("graphbuild_cache_disk_used_bytes"), 5000);
    assert_eq!(server.metric("graphbuild_cache_max_size_bytes"), 10_000_000);

    let key = format!("{}/ac/{}", server.url, "cd".repeat(32));
    request("GET", &key, None, None);
    request("PUT", &key, None, Some(b"entry"));
    request("GET", &key, None, None);
    assert_eq!(
        server.metric(r#"graphbuild_cache_misses_total{kind="ac"}"#),
        1
    );
    assert_eq!(
        server.metric(r#"graphbuild_cache_hits_total{kind="ac"}"#),
        1
    );
    assert_eq!(server.metric("graphbuild_cache_disk_used_bytes"), 5005);

    request("PUT", &url, None, Some(b"wrong"));
    assert_eq!(
        server.metric(r#"graphbuild_cache_uploads_rejected_total{reason="digest_mismatch"}"#),
        1
    );
    assert_eq!(server.metric("graphbuild_cache_evictions_total"), 0);
}
