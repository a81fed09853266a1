//! Transport: endpoints (HTTPS, or plain HTTP for loopback and insecure registries), scopes,
//! credentials and tokens, and sending with deadlines, retries and backoff.

use super::*;

/// What a request needs permission for, as token scopes.
#[derive(Clone, Debug)]
pub(super) struct Access {
    pub(super) repository: String,
    pub(super) push: bool,
    pub(super) mount_from: Option<String>,
}

impl Access {
    pub(super) fn pull(repository: &str) -> Access {
        Access {
            repository: repository.to_string(),
            push: false,
            mount_from: None,
        }
    }

    pub(super) fn push(repository: &str, mount_from: Option<&str>) -> Access {
        Access {
            repository: repository.to_string(),
            push: true,
            mount_from: mount_from.map(str::to_string),
        }
    }

    pub(super) fn scopes(&self) -> Vec<String> {
        let actions = if self.push { "pull,push" } else { "pull" };
        let mut scopes = vec![format!("repository:{}:{actions}", self.repository)];
        if let Some(other) = &self.mount_from {
            scopes.push(format!("repository:{other}:pull"));
        }
        scopes
    }

    pub(super) fn action(&self) -> &'static str {
        if self.push { "push to" } else { "pull from" }
    }
}

/// A request other than a blob transfer must finish within this many
/// [`ClientOptions::timeout`]s.
pub(super) const SMALL_CALL_TIMEOUTS: u32 = 3;

/// What `/v2/` told about a registry.
#[derive(Debug)]
pub(super) struct Endpoint {
    /// `https://host:port` or `http://host:port`.
    pub(super) base_url: String,
    /// Whether HTTPS certificates go unverified (an insecure registry).
    pub(super) insecure_tls: bool,
    /// Whether credentials may go over plain HTTP to this registry's realm.
    pub(super) plain_http_allowed: bool,
    pub(super) challenge: Challenge,
    /// Looked up the first time the registry asks for credentials.
    pub(super) credential: Mutex<Option<Option<Credential>>>,
}

pub(super) struct CachedToken {
    pub(super) authorization: Secret,
    pub(super) expires: Instant,
}

/// A request body that can be sent again (retries, re-authentication).
#[derive(Clone, Copy)]
pub(super) enum RequestBody<'a> {
    Empty,
    Bytes(&'a [u8]),
    FileRange {
        path: &'a Path,
        offset: u64,
        length: u64,
    },
}

pub(super) struct Call<'a> {
    pub(super) method: http::Method,
    pub(super) url: String,
    pub(super) headers: Vec<(&'static str, String)>,
    pub(super) body: RequestBody<'a>,
}

pub(super) type Response = http::Response<ureq::Body>;

impl RegistryClient {
    pub(super) fn plain_http_allowed(&self, reference: &Reference) -> bool {
        let registry = reference.registry.as_str();
        let host = host_of(registry);
        let loopback = host.eq_ignore_ascii_case("localhost")
            || host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<IpAddr>()
                .is_ok_and(|address| address.is_loopback());
        loopback
            || self
                .options
                .insecure_registries
                .iter()
                .any(|insecure| insecure == registry || insecure == host)
    }

    /// The registry's endpoint: found by `GET /v2/` on first use, then cached.
    pub(super) fn endpoint(&self, reference: &Reference) -> Result<Arc<Endpoint>, RegistryError> {
        let registry = reference.registry.as_str();
        if let Some(endpoint) = self
            .endpoints
            .lock()
            .ok()
            .and_then(|endpoints| endpoints.get(registry).cloned())
        {
            return Ok(endpoint);
        }
        let host = reference.registry_host();
        let plain_http_allowed = self.plain_http_allowed(reference);
        let mut candidates = vec![(format!("https://{host}"), plain_http_allowed)];
        if plain_http_allowed {
            candidates.push((format!("http://{host}"), false));
        }
        let mut last_error = None;
        for (position, (base_url, insecure_tls)) in candidates.iter().enumerate() {
            let has_fallback = position + 1 < candidates.len();
            let call = Call {
                method: http::Method::GET,
                url: format!("{base_url}/v2/"),
                headers: Vec::new(),
                body: RequestBody::Empty,
            };
            let agent = if *insecure_tls {
                &self.insecure_agent
            } else {
                &self.agent
            };
            // When plain HTTP remains to be tried, one HTTPS attempt tells enough.
            let attempts = if has_fallback {
                1
            } else {
                self.options.retry.max_attempts
            };
            let mut response = match self.send_with_retries(registry, agent, &call, None, attempts)
            {
                Ok(response) => response,
                Err(error @ RegistryError::Unreachable { .. }) if has_fallback => {
                    last_error = Some(error);
                    continue;
                }
                Err(error) => return Err(error),
            };
            let challenge = match response.status().as_u16() {
                200 => Challenge::None,
                401 => header(&response, "www-authenticate")
                    .as_deref()
                    .and_then(auth::parse_challenge)
                    .unwrap_or(Challenge::Basic),
                status => {
                    return Err(unexpected_status(
                        registry,
                        "GET",
                        "/v2/",
                        status,
                        &mut response,
                    ));
                }
            };
            let endpoint = Arc::new(Endpoint {
                base_url: base_url.clone(),
                insecure_tls: *insecure_tls,
                plain_http_allowed,
                challenge,
                credential: Mutex::new(None),
            });
            if let Ok(mut endpoints) = self.endpoints.lock() {
                endpoints.insert(registry.to_string(), endpoint.clone());
            }
            return Ok(endpoint);
        }
        Err(last_error.unwrap_or_else(|| RegistryError::Unreachable {
            registry: registry.to_string(),
            reason: "no way to connect".into(),
            no_route: false,
        }))
    }

    pub(super) fn credential(
        &self,
        registry: &str,
        endpoint: &Endpoint,
    ) -> Result<Option<Credential>, RegistryError> {
        let mut slot = endpoint
            .credential
            .lock()
            .map_err(|_| RegistryError::Protocol {
                registry: registry.to_string(),
                message: "internal lock poisoned".into(),
            })?;
        if let Some(credential) = slot.as_ref() {
            return Ok(credential.clone());
        }
        let credential = match &self.config_dir {
            Some(dir) => auth::lookup_credentials(dir, registry)?,
            None => None,
        };
        *slot = Some(credential.clone());
        Ok(credential)
    }

    /// The `Authorization` header for `access` on this registry, fetching a token when the
    /// registry wants one (from the cache unless `refresh`).
    pub(super) fn authorization(
        &self,
        registry: &str,
        endpoint: &Endpoint,
        challenge: &Challenge,
        access: &Access,
        refresh: bool,
    ) -> Result<Option<Secret>, RegistryError> {
        match challenge {
            Challenge::None => Ok(None),
            Challenge::Basic => Ok(self
                .credential(registry, endpoint)?
                .and_then(|credential| credential.basic_authorization())),
            Challenge::Bearer {
                realm,
                service,
                scope,
            } => {
                let mut scopes = access.scopes();
                if let Some(extra) = scope {
                    for extra in extra.split(' ').filter(|extra| !extra.is_empty()) {
                        if !scopes.iter().any(|scope| scope == extra) {
                            scopes.push(extra.to_string());
                        }
                    }
                }
                let cache_key = format!("{registry} {}", scopes.join(" "));
                if !refresh
                    && let Some(token) = self.tokens.lock().ok().and_then(|tokens| {
                        tokens
                            .get(&cache_key)
                            .filter(|token| token.expires > Instant::now())
                            .map(|token| token.authorization.clone())
                    })
                {
                    return Ok(Some(token));
                }
                let (authorization, lifetime) = self.fetch_token(
                    registry,
                    endpoint,
                    access,
                    realm,
                    service.as_deref(),
                    &scopes,
                )?;
                if let Ok(mut tokens) = self.tokens.lock() {
                    tokens.insert(
                        cache_key,
                        CachedToken {
                            authorization: authorization.clone(),
                            expires: Instant::now() + lifetime,
                        },
                    );
                }
                Ok(Some(authorization))
            }
        }
    }

    /// The token flow: `GET realm?service=…&scope=…` (Basic auth with the user's credentials
    /// when there are some), or `POST realm` with a refresh token.
    pub(super) fn fetch_token(
        &self,
        registry: &str,
        endpoint: &Endpoint,
        access: &Access,
        realm: &str,
        service: Option<&str>,
        scopes: &[String],
    ) -> Result<(Secret, Duration), RegistryError> {
        // Credentials go to a realm over HTTPS, or over plain HTTP only to the registry's own
        // host when the registry itself may be reached over plain HTTP (loopback or
        // --insecure-registry): never in clear text to a third host.
        let realm_is_safe = realm.starts_with("https://")
            || (endpoint.plain_http_allowed
                && realm.starts_with("http://")
                && same_host(realm, &endpoint.base_url));
        let (credential, withheld) = if realm_is_safe {
            (self.credential(registry, endpoint)?, false)
        } else {
            (None, self.credential(registry, endpoint)?.is_some())
        };
        let mut query = Vec::new();
        if let Some(service) = service {
            query.push(format!("service={}", percent_encode(service)));
        }
        for scope in scopes {
            query.push(format!("scope={}", percent_encode(scope)));
        }
        let agent = if endpoint.insecure_tls {
            &self.insecure_agent
        } else {
            &self.agent
        };
        let form;
        let (call, authorization) = match &credential {
            Some(Credential::IdentityToken { token }) => {
                let mut fields = vec![
                    "grant_type=refresh_token".to_string(),
                    format!("client_id={}", percent_encode("graphbuild")),
                    format!("refresh_token={}", percent_encode(&token.0)),
                ];
                fields.extend(query.iter().cloned());
                form = fields.join("&");
                (
                    Call {
                        method: http::Method::POST,
                        url: realm.to_string(),
                        headers: vec![
                            ("Content-Type", "application/x-www-form-urlencoded".into()),
                            ("Content-Length", form.len().to_string()),
                        ],
                        body: RequestBody::Bytes(form.as_bytes()),
                    },
                    None,
                )
            }
            other => {
                let separator = if realm.contains('?') { '&' } else { '?' };
                let url = if query.is_empty() {
                    realm.to_string()
                } else {
                    format!("{realm}{separator}{}", query.join("&"))
                };
                (
                    Call {
                        method: http::Method::GET,
                        url,
                        headers: Vec::new(),
                        body: RequestBody::Empty,
                    },
                    other.as_ref().and_then(Credential::basic_authorization),
                )
            }
        };
        let mut response = self.send_with_retries(
            registry,
            agent,
            &call,
            authorization.as_ref(),
            self.options.retry.max_attempts,
        )?;
        match response.status().as_u16() {
            200 => {}
            status @ (401 | 403) if withheld => {
                return Err(RegistryError::InsecureRealm {
                    registry: registry.to_string(),
                    realm: realm.split('?').next().unwrap_or(realm).to_string(),
                    status,
                });
            }
            status @ (401 | 403) => {
                return Err(RegistryError::Unauthorized {
                    registry: registry.to_string(),
                    status,
                    action: access.action(),
                    detail: error_detail(&mut response),
                });
            }
            status => {
                return Err(RegistryError::UnexpectedStatus {
                    registry: registry.to_string(),
                    method: call.method.to_string(),
                    path: "the token realm".into(),
                    status,
                    detail: error_detail(&mut response),
                });
            }
        }
        #[derive(Deserialize)]
        struct TokenResponse {
            #[serde(default)]
            token: Option<String>,
            #[serde(default)]
            access_token: Option<String>,
            #[serde(default)]
            expires_in: Option<u64>,
        }
        let bytes = response
            .body_mut()
            .with_config()
            .limit(MAX_MANIFEST_SIZE)
            .read_to_vec()
            .map_err(|error| body_read_error(registry, "the token realm's answer", error))?;
        let parsed: TokenResponse =
            serde_json::from_slice(&bytes).map_err(|_| RegistryError::Protocol {
                registry: registry.to_string(),
                message: "the token realm's answer is not the expected JSON".into(),
            })?;
        let token = parsed
            .token
            .or(parsed.access_token)
            .filter(|token| !token.is_empty())
            .ok_or_else(|| RegistryError::Protocol {
                registry: registry.to_string(),
                message: "the token realm's answer has no token".into(),
            })?;
        // The spec's default lifetime is 60 s; renew a little early.
        let lifetime = Duration::from_secs(parsed.expires_in.unwrap_or(60).max(60) - 10);
        Ok((Secret(format!("Bearer {token}")), lifetime))
    }

    /// Send `call` with the registry's authentication, re-authenticating once on a 401 (an
    /// expired token, or a scope the registry asks for in its new challenge). A final 401 or
    /// 403 is [`RegistryError::Unauthorized`].
    pub(super) fn execute(
        &self,
        registry: &str,
        endpoint: &Endpoint,
        access: &Access,
        call: &Call<'_>,
    ) -> Result<Response, RegistryError> {
        let agent = if endpoint.insecure_tls {
            &self.insecure_agent
        } else {
            &self.agent
        };
        let attempts = self.options.retry.max_attempts;
        let same_host = call.url.starts_with(&endpoint.base_url);
        let authorization = if same_host {
            self.authorization(registry, endpoint, &endpoint.challenge, access, false)?
        } else {
            None
        };
        let mut response =
            self.send_with_retries(registry, agent, call, authorization.as_ref(), attempts)?;
        if response.status().as_u16() == 401 && same_host {
            let challenge = header(&response, "www-authenticate")
                .as_deref()
                .and_then(auth::parse_challenge)
                .unwrap_or_else(|| endpoint.challenge.clone());
            let renewed = self.authorization(registry, endpoint, &challenge, access, true)?;
            if renewed.is_some() {
                response =
                    self.send_with_retries(registry, agent, call, renewed.as_ref(), attempts)?;
            }
        }
        match response.status().as_u16() {
            status @ (401 | 403) => Err(RegistryError::Unauthorized {
                registry: registry.to_string(),
                status,
                action: access.action(),
                detail: error_detail(&mut response),
            }),
            _ => Ok(response),
        }
    }

    /// Send `call`, retrying connection failures, 429 and 5xx with backoff.
    pub(super) fn send_with_retries(
        &self,
        registry: &str,
        agent: &ureq::Agent,
        call: &Call<'_>,
        authorization: Option<&Secret>,
        attempts: u32,
    ) -> Result<Response, RegistryError> {
        let attempts = attempts.max(1);
        let mut attempt = 1;
        loop {
            match self.send_once(agent, call, authorization) {
                Ok(response) => {
                    let status = response.status().as_u16();
                    if status == 429 || (500..600).contains(&status) {
                        if attempt >= attempts {
                            return Err(RegistryError::Unavailable {
                                registry: registry.to_string(),
                                status,
                                attempts,
                            });
                        }
                        let retry_after = header(&response, "retry-after")
                            .and_then(|text| text.trim().parse::<u64>().ok())
                            .map(|seconds| Duration::from_secs(seconds).min(MAX_RETRY_AFTER));
                        drop(response);
                        std::thread::sleep(self.backoff(attempt, retry_after));
                        attempt += 1;
                        continue;
                    }
                    return Ok(response);
                }
                Err(SendError::Local(error)) => return Err(error),
                Err(SendError::Transport { error, retryable }) => {
                    if !retryable || attempt >= attempts {
                        return Err(RegistryError::Unreachable {
                            registry: registry.to_string(),
                            reason: describe_transport_error(&error),
                            no_route: no_route_to(&error),
                        });
                    }
                    std::thread::sleep(self.backoff(attempt, None));
                    attempt += 1;
                }
            }
        }
    }

    pub(super) fn backoff(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let policy = &self.options.retry;
        let exponential = policy
            .initial_delay
            .saturating_mul(1 << (attempt - 1).min(16))
            .min(policy.max_delay);
        retry_after.unwrap_or(exponential)
    }

    /// Small requests (the `/v2/` probe, tokens, manifests) get a whole-call deadline of
    /// [`SMALL_CALL_TIMEOUTS`] times [`ClientOptions::timeout`] on top of the per-read timeout,
    /// so a registry trickling a byte at a time cannot hold a build. Blob transfers, whose size
    /// makes a fixed deadline wrong, are bounded by the per-read timeout only.
    pub(super) fn with_deadline<S: ureq::AsSendBody>(
        &self,
        agent: &ureq::Agent,
        request: http::Request<S>,
        url: &str,
    ) -> http::Request<S> {
        if url.contains("/blobs/") {
            return request;
        }
        agent
            .configure_request(request)
            .timeout_per_call(Some(
                self.options.timeout.saturating_mul(SMALL_CALL_TIMEOUTS),
            ))
            .build()
    }

    pub(super) fn send_once(
        &self,
        agent: &ureq::Agent,
        call: &Call<'_>,
        authorization: Option<&Secret>,
    ) -> Result<Response, SendError> {
        let mut builder = http::Request::builder()
            .method(call.method.clone())
            .uri(call.url.as_str());
        for (name, value) in &call.headers {
            builder = builder.header(*name, value.as_str());
        }
        if let Some(authorization) = authorization {
            builder = builder.header("Authorization", authorization.0.as_str());
        }
        let invalid = |message: String| {
            SendError::Local(RegistryError::Protocol {
                registry: call.url.split('/').nth(2).unwrap_or("").to_string(),
                message,
            })
        };
        let result = match call.body {
            RequestBody::Empty => builder
                .body(())
                .map_err(|error| invalid(format!("cannot build a request: {error}")))
                .map(|request| agent.run(self.with_deadline(agent, request, &call.url)))?,
            RequestBody::Bytes(bytes) => builder
                .body(bytes)
                .map_err(|error| invalid(format!("cannot build a request: {error}")))
                .map(|request| agent.run(self.with_deadline(agent, request, &call.url)))?,
            RequestBody::FileRange {
                path,
                offset,
                length,
            } => {
                let io_error = |source| {
                    SendError::Local(RegistryError::Io {
                        action: "read",
                        path: path.to_path_buf(),
                        source,
                    })
                };
                let mut file = File::open(path).map_err(io_error)?;
                file.seek(SeekFrom::Start(offset)).map_err(io_error)?;
                let mut reader = file.take(length);
                let request = builder
                    .body(ureq::SendBody::from_reader(&mut reader))
                    .map_err(|error| invalid(format!("cannot build a request: {error}")))?;
                agent.run(request)
            }
        };
        result.map_err(|error| {
            let retryable = !no_route_to(&error)
                && matches!(
                    error,
                    ureq::Error::Io(_) | ureq::Error::Timeout(_) | ureq::Error::ConnectionFailed
                );
            SendError::Transport { error, retryable }
        })
    }
}

pub(super) enum SendError {
    /// Not the network's fault: a local file, a malformed request.
    Local(RegistryError),
    Transport {
        error: ureq::Error,
        retryable: bool,
    },
}

/// Whether the registry cannot be reached at all from here: its name does not resolve, the
/// connection is refused, or there is no route to it. Retrying would only delay the answer by
/// the backoff (~8 s per request), so these fail at once; a timeout, a reset or a broken
/// transfer may pass and keeps its retries.
pub(super) fn no_route_to(error: &ureq::Error) -> bool {
    match error {
        ureq::Error::HostNotFound => true,
        ureq::Error::Io(io_error) => {
            matches!(
                io_error.kind(),
                io::ErrorKind::ConnectionRefused
                    | io::ErrorKind::HostUnreachable
                    | io::ErrorKind::NetworkUnreachable
                    | io::ErrorKind::NetworkDown
                    | io::ErrorKind::AddrNotAvailable
            ) || is_name_resolution_failure(io_error)
        }
        _ => false,
    }
}

/// `getaddrinfo` failures: the standard library reports them as an uncategorized error whose
/// message starts with this text.
pub(super) fn is_name_resolution_failure(error: &io::Error) -> bool {
    error
        .to_string()
        .starts_with("failed to lookup address information")
}

pub(super) fn describe_transport_error(error: &ureq::Error) -> String {
    match error {
        ureq::Error::ConnectionFailed => "the connection failed".into(),
        ureq::Error::HostNotFound => "the host name does not resolve".into(),
        ureq::Error::Io(io_error) if is_name_resolution_failure(io_error) => {
            format!("the host name does not resolve ({io_error})")
        }
        ureq::Error::Io(io_error) => io_error.to_string(),
        other => other.to_string(),
    }
}

/// A response body that could not be read: too large is the registry's protocol error; a
/// stall or a reset is the environment (exit code 3), with its own help.
pub(super) fn body_read_error(registry: &str, what: &str, error: ureq::Error) -> RegistryError {
    match error {
        ureq::Error::BodyExceedsLimit(limit) => RegistryError::Protocol {
            registry: registry.to_string(),
            message: format!("{what} is larger than {limit} bytes"),
        },
        other => RegistryError::Stalled {
            registry: registry.to_string(),
            what: what.to_string(),
            reason: describe_transport_error(&other),
        },
    }
}

/// The host of an `http(s)://[user@]host[:port]/…` URL, lowercase, without the port.
pub(super) fn url_host(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split(['/', '?', '#']).next()?;
    let authority = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    Some(host_of(authority).to_ascii_lowercase())
}

/// Whether two URLs name the same host (any port).
pub(super) fn same_host(a: &str, b: &str) -> bool {
    matches!((url_host(a), url_host(b)), (Some(a), Some(b)) if !a.is_empty() && a == b)
}

/// `host:port` → `host`; `[::1]:5000` → `[::1]`.
pub(super) fn host_of(registry: &str) -> &str {
    if registry.starts_with('[') {
        return registry
            .split_once(']')
            .map_or(registry, |(host, _)| &registry[..host.len() + 1]);
    }
    registry.split(':').next().unwrap_or(registry)
}

pub(super) fn header(response: &Response, name: &str) -> Option<String> {
    response
        .headers()
        .get(name)
        .and_then(|value| value.to_str().ok())
        .map(str::to_string)
}

/// `: CODE: message` from a registry's JSON error body, or nothing.
pub(super) fn error_detail(response: &mut Response) -> String {
    #[derive(Deserialize)]
    struct ErrorBody {
        #[serde(default)]
        errors: Vec<ErrorEntry>,
    }
    #[derive(Deserialize)]
    struct ErrorEntry {
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
    }
    let Ok(bytes) = response
        .body_mut()
        .with_config()
        .limit(MAX_ERROR_BODY)
        .read_to_vec()
    else {
        return String::new();
    };
    let Ok(body) = serde_json::from_slice::<ErrorBody>(&bytes) else {
        return String::new();
    };
    let parts: Vec<String> = body
        .errors
        .iter()
        .map(
            |entry| match (entry.code.is_empty(), entry.message.is_empty()) {
                (false, false) => format!("{}: {}", entry.code, entry.message),
                (false, true) => entry.code.clone(),
                _ => entry.message.clone(),
            },
        )
        .filter(|part| !part.is_empty())
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!(": {}", parts.join("; "))
    }
}

pub(super) fn unexpected_status(
    registry: &str,
    method: &str,
    path: &str,
    status: u16,
    response: &mut Response,
) -> RegistryError {
    RegistryError::UnexpectedStatus {
        registry: registry.to_string(),
        method: method.to_string(),
        // Upload session paths carry opaque state; the stable part is enough.
        path: path.split('?').next().unwrap_or(path).to_string(),
        status,
        detail: error_detail(response),
    }
}
