//! The engine's HTTP team-cache client (`engine/src/remote/`) against this server, end to end.
//!
//! The client's source files are compiled into this test directly (the engine crate cannot
//! be a dependency of the server, and the server is not a dependency of the engine), so the
//! two halves of the protocol are tested together without a dependency edge.

#[path = "../../engine/src/digest.rs"]
#[allow(
    dead_code,
    unreachable_pub,
    reason = "the engine's own file: its items are the engine's public API, and cache keys are \
              not used here (`expect` would be unfulfilled when `Key` gets used)"
)]
mod digest;
#[path = "../../engine/src/remote/mod.rs"]
#[allow(
    unreachable_pub,
    dead_code,
    reason = "the engine's own files: their items are the engine's public API, some used only \
              by the engine's REAPI client (its error variants, `put_step_record`)"
)]
mod remote;

mod common;

use common::{TestServer, blob, sha256_hex};
use digest::Digest;
use remote::{ActionResult, HttpCache, RemoteCache, RemoteError};

#[test]
fn blobs_and_actions_round_trip_through_the_server() {
    let server = TestServer::start(|_| {});
    let cache = HttpCache::new(&format!("{}/team-a", server.url), None).unwrap();
    let work = tempfile::tempdir().unwrap();

    // A layer-sized file, streamed up and down.
    let layer = blob(42, 6 * 1024 * 1024 + 5);
    let layer_path = work.path().join("layer");
    std::fs::write(&layer_path, &layer).unwrap();
    let layer_digest = Digest::of(&layer);
    assert!(!cache.has_blob(&layer_digest).unwrap());
    cache.put_blob_from(&layer_digest, &layer_path).unwrap();
    assert!(cache.has_blob(&layer_digest).unwrap());
    // Second upload is skipped after HEAD: the upload counter does not move.
    cache.put_blob_from(&layer_digest, &layer_path).unwrap();
    assert_eq!(
        server.metric(r#"graphbuild_cache_uploads_total{kind="cas"}"#),
        1
    );

    let fetched = work.path().join("fetched");
    assert!(
        cache
            .get_blob_to(&layer_digest, layer.len() as u64, &fetched)
            .unwrap()
    );
    assert_eq!(std::fs::read(&fetched).unwrap(), layer);
    assert!(
        !cache
            .get_blob_to(&Digest::of(b"absent"), 6, &work.path().join("absent"))
            .unwrap()
    );

    // The step record and its action entry.
    let record = br#"{"layers":[]}"#;
    let record_digest = cache.put_blob_bytes(record).unwrap();
    assert_eq!(record_digest, Digest::of(record));
    let key = "5e".repeat(32);
    assert_eq!(cache.get_action(&key).unwrap(), None);
    let entry = ActionResult::for_step_record(record_digest, record.len() as u64);
    cache.put_action(&key, &entry).unwrap();
    let read_back = cache.get_action(&key).unwrap().unwrap();
    assert_eq!(read_back, entry);
    assert_eq!(
        read_back.step_record(),
        Some((record_digest, record.len() as u64))
    );
    let records = tempfile::tempdir().unwrap();
    assert_eq!(
        cache.get_step_record(&key, records.path()).unwrap(),
        Some(record.to_vec())
    );

    // Another instance does not see team-a's action entry, but shares the blobs.
    let other = HttpCache::new(&format!("{}/team-b/", server.url), None).unwrap();
    assert_eq!(other.get_action(&key).unwrap(), None);
    assert!(other.has_blob(&record_digest).unwrap());
}

#[test]
fn a_corrupted_server_copy_is_detected_and_discarded() {
    let server = TestServer::start(|_| {});
    let cache = HttpCache::new(&server.url, None).unwrap();
    let bytes = blob(43, 100_000);
    let digest = cache.put_blob_bytes(&bytes).unwrap();
    let hex = sha256_hex(&bytes);
    std::fs::write(
        server.dir.join("cas").join(&hex[..2]).join(&hex),
        b"bit rot",
    )
    .unwrap();

    let work = tempfile::tempdir().unwrap();
    let error = cache
        .get_blob_to(&digest, bytes.len() as u64, &work.path().join("blob"))
        .unwrap_err();
    assert!(matches!(error, RemoteError::SizeMismatch { .. }), "{error}");
    assert!(error.is_bad_entry());
    assert_eq!(std::fs::read_dir(work.path()).unwrap().count(), 0);

    // Rot of the same size: the digest catches it.
    let mut rotten = bytes.clone();
    rotten[500] ^= 1;
    std::fs::write(server.dir.join("cas").join(&hex[..2]).join(&hex), &rotten).unwrap();
    let error = cache
        .get_blob_to(&digest, bytes.len() as u64, &work.path().join("blob"))
        .unwrap_err();
    assert!(
        matches!(error, RemoteError::DigestMismatch { .. }),
        "{error}"
    );
    assert_eq!(std::fs::read_dir(work.path()).unwrap().count(), 0);
}

#[test]
fn token_errors_are_typed_and_never_show_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "writer-secret-1 rw team-a\nreader-secret-2 ro\n").unwrap();
    let server = TestServer::start(|config| config.tokens_file = Some(tokens));
    let url = format!("{}/team-a", server.url);

    let anonymous = HttpCache::new(&url, None).unwrap();
    let error = anonymous.put_blob_bytes(b"x").unwrap_err();
    assert!(
        matches!(error, RemoteError::Unauthorized { status: 401, .. }),
        "{error}"
    );

    let wrong = HttpCache::new(&url, Some("guessed-secret".into())).unwrap();
    let error = wrong.get_action(&"00".repeat(32)).unwrap_err();
    assert!(matches!(error, RemoteError::Unauthorized { .. }), "{error}");
    assert!(!format!("{error} {error:?}").contains("guessed-secret"));

    let reader = HttpCache::new(&url, Some("reader-secret-2".into())).unwrap();
    let error = reader.put_blob_bytes(b"x").unwrap_err();
    assert!(
        matches!(error, RemoteError::Forbidden { status: 403, .. }),
        "{error}"
    );
    assert!(!format!("{error} {error:?}").contains("reader-secret-2"));

    let writer = HttpCache::new(&url, Some("writer-secret-1".into())).unwrap();
    let digest = writer.put_blob_bytes(b"x").unwrap();
    assert!(reader.has_blob(&digest).unwrap());
    let elsewhere = HttpCache::new(
        &format!("{}/team-b", server.url),
        Some("writer-secret-1".into()),
    )
    .unwrap();
    assert!(matches!(
        elsewhere.has_blob(&digest),
        Err(RemoteError::Forbidden { .. })
    ));
}
