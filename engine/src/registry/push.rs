//! Pushing: blobs (HEAD then skip, cross-repository mount, monolithic or chunked upload) and
//! manifests.

use super::*;

impl RegistryClient {
    /// Whether `repository`'s repository has blob `digest` (`HEAD`).
    pub fn blob_exists(
        &self,
        repository: &Reference,
        digest: &Digest,
    ) -> Result<bool, RegistryError> {
        self.blob_exists_with(repository, digest, &Access::pull(&repository.repository))
    }

    pub(super) fn blob_exists_with(
        &self,
        repository: &Reference,
        digest: &Digest,
        access: &Access,
    ) -> Result<bool, RegistryError> {
        let registry = repository.registry.as_str();
        let endpoint = self.endpoint(repository)?;
        let path = format!("/v2/{}/blobs/{digest}", repository.repository);
        let call = Call {
            method: http::Method::HEAD,
            url: format!("{}{path}", endpoint.base_url),
            headers: Vec::new(),
            body: RequestBody::Empty,
        };
        let mut response = self.execute(registry, &endpoint, access, &call)?;
        match response.status().as_u16() {
            200 => Ok(true),
            404 => Ok(false),
            status => Err(unexpected_status(
                registry,
                "HEAD",
                &path,
                status,
                &mut response,
            )),
        }
    }

    /// Make blob `digest` (the file at `path`, `size` bytes) present in `repository`'s
    /// repository: skipped when `HEAD` finds it, mounted from `mount_from` (another repository
    /// of the same registry known to have it) when the registry agrees, else uploaded in one
    /// `PUT` up to [`ClientOptions::chunk_threshold`] and in `PATCH` chunks above. The
    /// registry checks the digest of what it receives.
    pub fn push_blob(
        &self,
        repository: &Reference,
        digest: &Digest,
        size: u64,
        path: &Path,
        mount_from: Option<&str>,
    ) -> Result<BlobPush, RegistryError> {
        let registry = repository.registry.as_str();
        let mount_from = mount_from.filter(|other| *other != repository.repository);
        let access = Access::push(&repository.repository, mount_from);
        if self.blob_exists_with(repository, digest, &access)? {
            return Ok(BlobPush::AlreadyPresent);
        }
        let actual_size = std::fs::metadata(path)
            .map_err(|source| RegistryError::Io {
                action: "read",
                path: path.to_path_buf(),
                source,
            })?
            .len();
        if actual_size != size {
            return Err(RegistryError::SizeMismatch {
                what: format!("the local file of blob {digest} ({})", path.display()),
                expected: size,
                actual: actual_size,
            });
        }
        let endpoint = self.endpoint(repository)?;
        let uploads = format!("/v2/{}/blobs/uploads/", repository.repository);
        let start_path = match mount_from {
            Some(other) => format!(
                "{uploads}?mount={}&from={}",
                percent_encode(&digest.to_string()),
                percent_encode(other)
            ),
            None => uploads.clone(),
        };
        let call = Call {
            method: http::Method::POST,
            url: format!("{}{start_path}", endpoint.base_url),
            headers: vec![("Content-Length", "0".into())],
            body: RequestBody::Empty,
        };
        let mut response = self.execute(registry, &endpoint, &access, &call)?;
        match response.status().as_u16() {
            201 if mount_from.is_some() => return Ok(BlobPush::Mounted),
            202 => {}
            status => {
                return Err(unexpected_status(
                    registry,
                    "POST",
                    &uploads,
                    status,
                    &mut response,
                ));
            }
        }
        let mut location = upload_location(registry, &endpoint, &response)?;

        let mut chunks = 0;
        if size > self.options.chunk_threshold {
            let chunk_size = self.options.chunk_size.max(1);
            let mut offset = 0;
            while offset < size {
                let length = chunk_size.min(size - offset);
                let call = Call {
                    method: http::Method::PATCH,
                    url: location.clone(),
                    headers: vec![
                        ("Content-Type", "application/octet-stream".into()),
                        ("Content-Range", format!("{offset}-{}", offset + length - 1)),
                        ("Content-Length", length.to_string()),
                    ],
                    body: RequestBody::FileRange {
                        path,
                        offset,
                        length,
                    },
                };
                let mut response = self.execute(registry, &endpoint, &access, &call)?;
                match response.status().as_u16() {
                    202 | 204 => {}
                    status => {
                        return Err(unexpected_status(
                            registry,
                            "PATCH",
                            &uploads,
                            status,
                            &mut response,
                        ));
                    }
                }
                location = upload_location(registry, &endpoint, &response)?;
                offset += length;
                chunks += 1;
            }
        }
        let separator = if location.contains('?') { '&' } else { '?' };
        let (body, length) = if chunks == 0 {
            (
                RequestBody::FileRange {
                    path,
                    offset: 0,
                    length: size,
                },
                size,
            )
        } else {
            (RequestBody::Empty, 0)
        };
        let call = Call {
            method: http::Method::PUT,
            url: format!(
                "{location}{separator}digest={}",
                percent_encode(&digest.to_string())
            ),
            headers: vec![
                ("Content-Type", "application/octet-stream".into()),
                ("Content-Length", length.to_string()),
            ],
            body,
        };
        let mut response = self.execute(registry, &endpoint, &access, &call)?;
        match response.status().as_u16() {
            201 | 204 => {}
            status => {
                return Err(unexpected_status(
                    registry,
                    "PUT",
                    &uploads,
                    status,
                    &mut response,
                ));
            }
        }
        if let Some(stored) =
            header(&response, "docker-content-digest").and_then(|text| text.parse::<Digest>().ok())
            && stored != *digest
        {
            return Err(RegistryError::DigestMismatch {
                what: format!("blob uploaded to {}", repository.name()),
                expected: *digest,
                actual: stored,
            });
        }
        Ok(if chunks == 0 {
            BlobPush::Uploaded
        } else {
            BlobPush::UploadedInChunks(chunks)
        })
    }

    /// Push `bytes`, exactly as given, as a manifest of `media_type` under `reference`'s digest
    /// when it has one (which must be the bytes' digest), else under its tag. Returns the
    /// digest of the bytes.
    pub fn push_manifest(
        &self,
        reference: &Reference,
        media_type: &str,
        bytes: &[u8],
    ) -> Result<Digest, RegistryError> {
        let registry = reference.registry.as_str();
        let digest = Digest::of(bytes);
        if let Some(expected) = reference.digest
            && expected != digest
        {
            return Err(RegistryError::DigestMismatch {
                what: format!("the manifest to push as `{reference}`"),
                expected,
                actual: digest,
            });
        }
        let endpoint = self.endpoint(reference)?;
        let path = format!(
            "/v2/{}/manifests/{}",
            reference.repository,
            reference.manifest_reference()
        );
        let call = Call {
            method: http::Method::PUT,
            url: format!("{}{path}", endpoint.base_url),
            headers: vec![
                ("Content-Type", media_type.to_string()),
                ("Content-Length", bytes.len().to_string()),
            ],
            body: RequestBody::Bytes(bytes),
        };
        let access = Access::push(&reference.repository, None);
        let mut response = self.execute(registry, &endpoint, &access, &call)?;
        match response.status().as_u16() {
            201 | 200 | 204 => {}
            404 => {
                // The registry names what is missing (MANIFEST_BLOB_UNKNOWN, NAME_UNKNOWN…).
                return Err(unexpected_status(
                    registry,
                    "PUT",
                    &path,
                    404,
                    &mut response,
                ));
            }
            status => {
                return Err(unexpected_status(
                    registry,
                    "PUT",
                    &path,
                    status,
                    &mut response,
                ));
            }
        }
        if let Some(stored) =
            header(&response, "docker-content-digest").and_then(|text| text.parse::<Digest>().ok())
            && stored != digest
        {
            return Err(RegistryError::DigestMismatch {
                what: format!("the manifest pushed as `{reference}`"),
                expected: digest,
                actual: stored,
            });
        }
        Ok(digest)
    }

    // -----------------------------------------------------------------------------------------
    // Connection, authentication, retries
    // -----------------------------------------------------------------------------------------
}

/// The `Location` of an upload session, made absolute.
pub(super) fn upload_location(
    registry: &str,
    endpoint: &Endpoint,
    response: &Response,
) -> Result<String, RegistryError> {
    let location = header(response, "location").ok_or_else(|| RegistryError::Protocol {
        registry: registry.to_string(),
        message: "an upload answer has no Location header".into(),
    })?;
    Ok(
        if location.starts_with("http://") || location.starts_with("https://") {
            location
        } else if location.starts_with('/') {
            format!("{}{location}", endpoint.base_url)
        } else {
            format!("{}/{location}", endpoint.base_url)
        },
    )
}
