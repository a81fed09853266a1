//! Pulling: resolving references to manifests and platforms, fetching verified blobs.

use super::*;

impl RegistryClient {
    /// Fetch the manifest or index `reference` names (by digest when it has one, else by
    /// tag), accepting OCI and Docker schema 2 types, and check its digest: against the
    /// reference's digest when it has one, else against `Docker-Content-Digest` when the
    /// registry sends it.
    pub fn resolve(&self, reference: &Reference) -> Result<Manifest, RegistryError> {
        let registry = reference.registry.as_str();
        let endpoint = self.endpoint(reference)?;
        let path = format!(
            "/v2/{}/manifests/{}",
            reference.repository,
            reference.manifest_reference()
        );
        let call = Call {
            method: http::Method::GET,
            url: format!("{}{path}", endpoint.base_url),
            headers: vec![("Accept", ACCEPTED_MANIFEST_TYPES.join(", "))],
            body: RequestBody::Empty,
        };
        let mut response = self.execute(
            registry,
            &endpoint,
            &Access::pull(&reference.repository),
            &call,
        )?;
        match response.status().as_u16() {
            200 => {}
            404 => {
                return Err(RegistryError::ManifestUnknown {
                    reference: reference.to_string(),
                    repository: reference.name(),
                    detail: error_detail(&mut response),
                });
            }
            status => {
                return Err(unexpected_status(
                    registry,
                    "GET",
                    &path,
                    status,
                    &mut response,
                ));
            }
        }
        let header_digest = header(&response, "docker-content-digest");
        let content_type = header(&response, "content-type");
        let bytes = response
            .body_mut()
            .with_config()
            .limit(MAX_MANIFEST_SIZE)
            .read_to_vec()
            .map_err(|error| {
                body_read_error(registry, &format!("the manifest of `{reference}`"), error)
            })?;
        let digest = Digest::of(&bytes);
        if let Some(expected) = reference.digest {
            if expected != digest {
                return Err(RegistryError::DigestMismatch {
                    what: format!("the manifest of `{reference}`"),
                    expected,
                    actual: digest,
                });
            }
        } else if let Some(expected) = header_digest.and_then(|text| text.parse::<Digest>().ok())
            && expected != digest
        {
            return Err(RegistryError::DigestMismatch {
                what: format!("the manifest of `{reference}` (Docker-Content-Digest)"),
                expected,
                actual: digest,
            });
        }
        let media_type = manifest_media_type(content_type.as_deref(), &bytes).ok_or_else(|| {
            RegistryError::UnsupportedMediaType {
                reference: reference.to_string(),
                media_type: content_type
                    .clone()
                    .unwrap_or_else(|| "manifest of unknown type".into()),
            }
        })?;
        Ok(Manifest {
            digest,
            media_type,
            bytes,
        })
    }

    /// Resolve `reference` for `platform`: when it names an index, choose the platform's
    /// manifest with [`select_platform`] and fetch it by digest.
    pub fn resolve_platform(
        &self,
        reference: &Reference,
        platform: &Platform,
    ) -> Result<PlatformManifest, RegistryError> {
        let top = self.resolve(reference)?;
        if !top.is_index() {
            let descriptor = top.descriptor();
            return Ok(PlatformManifest {
                index: None,
                manifest: top,
                descriptor,
            });
        }
        let descriptor = select_platform(&top.bytes, platform).map_err(|error| match error {
            RegistryError::PlatformMissing {
                platform,
                available,
                ..
            } => RegistryError::PlatformMissing {
                image: format!("`{reference}`"),
                platform,
                available,
            },
            other => other,
        })?;
        let manifest = self.resolve(&reference.with_digest(descriptor.digest))?;
        if manifest.bytes.len() as u64 != descriptor.size {
            return Err(RegistryError::SizeMismatch {
                what: format!("the {platform} manifest of `{reference}`"),
                expected: descriptor.size,
                actual: manifest.bytes.len() as u64,
            });
        }
        if !media::is_manifest(&manifest.media_type) {
            return Err(RegistryError::UnsupportedMediaType {
                reference: format!("{reference} ({platform})"),
                media_type: manifest.media_type,
            });
        }
        Ok(PlatformManifest {
            index: Some(top),
            manifest,
            descriptor,
        })
    }

    /// Download blob `digest` of `reference`'s repository to `dest`, streaming through a
    /// temporary file beside it that is checked for `size` and `digest` before it is renamed
    /// into place. On any mismatch nothing is kept.
    pub fn fetch_blob(
        &self,
        reference: &Reference,
        digest: &Digest,
        size: u64,
        dest: &Path,
    ) -> Result<(), RegistryError> {
        let registry = reference.registry.as_str();
        let endpoint = self.endpoint(reference)?;
        let path = format!("/v2/{}/blobs/{digest}", reference.repository);
        let call = Call {
            method: http::Method::GET,
            url: format!("{}{path}", endpoint.base_url),
            headers: Vec::new(),
            body: RequestBody::Empty,
        };
        let what = format!("blob {digest} of `{}`", reference.name());
        let dir = dest
            .parent()
            .filter(|dir| !dir.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let mut attempt = 1;
        loop {
            let mut response = self.execute(
                registry,
                &endpoint,
                &Access::pull(&reference.repository),
                &call,
            )?;
            match response.status().as_u16() {
                200 => {}
                404 => {
                    return Err(RegistryError::BlobUnknown {
                        repository: reference.name(),
                        digest: *digest,
                    });
                }
                status => {
                    return Err(unexpected_status(
                        registry,
                        "GET",
                        &path,
                        status,
                        &mut response,
                    ));
                }
            }
            let mut temp = tempfile::Builder::new()
                .prefix(".download-")
                .tempfile_in(dir)
                .map_err(|source| RegistryError::Io {
                    action: "create a temporary file in",
                    path: dir.to_path_buf(),
                    source,
                })?;
            let mut hasher = DigestWriter::new();
            let mut received: u64 = 0;
            let mut buffer = vec![0u8; 256 * 1024];
            let mut reader = response.body_mut().as_reader();
            let outcome: Result<(), io::Error> = loop {
                let count = match reader.read(&mut buffer) {
                    Ok(0) => break Ok(()),
                    Ok(count) => count,
                    Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                    Err(error) => break Err(error),
                };
                received += count as u64;
                if received > size {
                    break Ok(());
                }
                hasher.update(&buffer[..count]);
                if let Err(source) = temp.write_all(&buffer[..count]) {
                    return Err(RegistryError::Io {
                        action: "write",
                        path: temp.path().to_path_buf(),
                        source,
                    });
                }
            };
            if let Err(error) = outcome {
                // The connection broke mid-body: start over while attempts remain.
                if attempt < self.options.retry.max_attempts {
                    std::thread::sleep(self.backoff(attempt, None));
                    attempt += 1;
                    continue;
                }
                return Err(RegistryError::Unreachable {
                    registry: registry.to_string(),
                    reason: format!("the download of {what} broke off: {error}"),
                    no_route: false,
                });
            }
            if received != size {
                return Err(RegistryError::SizeMismatch {
                    what,
                    expected: size,
                    actual: received,
                });
            }
            let actual = hasher.finish();
            if actual != *digest {
                return Err(RegistryError::DigestMismatch {
                    what,
                    expected: *digest,
                    actual,
                });
            }
            temp.as_file()
                .sync_all()
                .map_err(|source| RegistryError::Io {
                    action: "write",
                    path: temp.path().to_path_buf(),
                    source,
                })?;
            temp.persist(dest).map_err(|error| RegistryError::Io {
                action: "move the downloaded blob to",
                path: dest.to_path_buf(),
                source: error.error,
            })?;
            return Ok(());
        }
    }

    /// [`RegistryClient::fetch_blob`] for many blobs, [`ClientOptions::max_concurrent_fetches`]
    /// at a time. Stops starting new downloads after the first error, which it returns.
    pub fn fetch_blobs(
        &self,
        reference: &Reference,
        blobs: &[BlobFetch],
    ) -> Result<(), RegistryError> {
        // Connect and authenticate once before the workers start.
        self.endpoint(reference)?;
        let next = AtomicUsize::new(0);
        let first_error: Mutex<Option<RegistryError>> = Mutex::new(None);
        let workers = self
            .options
            .max_concurrent_fetches
            .clamp(1, blobs.len().max(1));
        std::thread::scope(|scope| {
            for _ in 0..workers {
                scope.spawn(|| {
                    loop {
                        if first_error
                            .lock()
                            .map(|error| error.is_some())
                            .unwrap_or(true)
                        {
                            return;
                        }
                        let index = next.fetch_add(1, Ordering::SeqCst);
                        let Some(blob) = blobs.get(index) else { return };
                        if let Err(error) =
                            self.fetch_blob(reference, &blob.digest, blob.size, &blob.dest)
                            && let Ok(mut slot) = first_error.lock()
                        {
                            slot.get_or_insert(error);
                        }
                    }
                });
            }
        });
        let first_error = first_error
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match first_error {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    // -----------------------------------------------------------------------------------------
    // Push
    // -----------------------------------------------------------------------------------------
}

/// The media type of a served manifest: the `Content-Type` when it is one of the accepted
/// types, else the document's own `mediaType`, else what its shape says.
pub(super) fn manifest_media_type(content_type: Option<&str>, bytes: &[u8]) -> Option<String> {
    let known = |media_type: &str| ACCEPTED_MANIFEST_TYPES.contains(&media_type);
    if let Some(content_type) = content_type {
        let bare = content_type.split(';').next().unwrap_or("").trim();
        if known(bare) {
            return Some(bare.to_string());
        }
    }
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Shape {
        #[serde(default)]
        schema_version: Option<u32>,
        #[serde(default)]
        media_type: Option<String>,
        #[serde(default)]
        manifests: Option<serde_json::Value>,
        #[serde(default)]
        config: Option<serde_json::Value>,
    }
    let shape: Shape = serde_json::from_slice(bytes).ok()?;
    if let Some(media_type) = shape.media_type {
        return known(&media_type).then_some(media_type);
    }
    if shape.schema_version != Some(2) {
        return None;
    }
    if shape.manifests.is_some() {
        Some(media::OCI_INDEX.to_string())
    } else if shape.config.is_some() {
        Some(media::OCI_MANIFEST.to_string())
    } else {
        None
    }
}
