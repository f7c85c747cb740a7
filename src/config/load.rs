//! Loading a config file: parse, resolve paths against its directory, and
//! validate every section, naming the file and the key path on error.

use super::*;

impl Config {
    /// Reads, parses and validates a config file. Paths inside it become
    /// absolute, resolved against the file's directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text, path)
    }

    /// Parses and validates TOML text that came from `path`.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let mut cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            file: path.to_owned(),
            message: e.to_string().trim_end().replace('\n', " | "),
        })?;
        cfg.source = path.to_owned();
        let base = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        cfg.resolve_paths(&base);
        cfg.validate()?;
        Ok(cfg)
    }

    pub(super) fn resolve_paths(&mut self, base: &Path) {
        let abs = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        for c in &mut self.tls.certificates {
            abs(&mut c.cert);
            abs(&mut c.key);
        }
        self.tls.client_ca.iter_mut().for_each(abs);
        for s in &mut self.tls.spiffe {
            abs(&mut s.bundle);
        }
        for i in &mut self.issuers {
            if let Some(p) = i.jwks_file.as_mut() {
                abs(p);
            }
            if let Some(p) = i.fetch_ca.as_mut() {
                abs(p);
            }
        }
        if let Some(p) = self.upstream.ca.as_mut() {
            abs(p);
        }
        abs(&mut self.store.path);
        if let Some(b) = self.browser.as_mut() {
            for p in [
                &mut b.client_secret_file,
                &mut b.client_key_file,
                &mut b.cookie_key_file,
            ]
            .into_iter()
            .flatten()
            {
                abs(p);
            }
        }
        self.resolve_assertion_paths(base);
        self.resolve_transmitter_paths(base);
        if let Some(p) = self.feeds.ssf.as_mut().and_then(|s| s.jwks_file.as_mut()) {
            abs(p);
        }
        if let Some(p) = self.feeds.intune.as_mut().and_then(|s| s.ca.as_mut()) {
            abs(p);
        }
        if let Some(p) = self
            .feeds
            .jamf
            .as_mut()
            .and_then(|j| j.api.as_mut())
            .and_then(|a| a.ca.as_mut())
        {
            abs(p);
        }
        if let Some(p) = self.policy.as_mut() {
            abs(&mut p.dir);
            if let Some(d) = p.shadow_dir.as_mut() {
                abs(d);
            }
            if let Some(a) = p.audit.as_mut()
                && a.path.as_os_str() != "-"
            {
                abs(&mut a.path);
            }
        }
    }

    pub(super) fn validate_tracing(&self) -> Result<(), ConfigError> {
        let Some(t) = &self.tracing else {
            return Ok(());
        };
        let uri: Option<http::Uri> = t.otlp_endpoint.parse().ok();
        if !uri
            .is_some_and(|u| matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some())
        {
            return Err(self.invalid(
                "tracing.otlp_endpoint",
                format!("`{}` is not an http(s) URL", t.otlp_endpoint),
            ));
        }
        if !(0.0..=1.0).contains(&t.sample_ratio) {
            return Err(self.invalid("tracing.sample_ratio", "must be between 0.0 and 1.0"));
        }
        if t.export_interval_ms == 0 || t.export_timeout_ms == 0 {
            return Err(self.invalid(
                "tracing.export_interval_ms",
                "export_interval_ms and export_timeout_ms must be at least 1",
            ));
        }
        Ok(())
    }

    pub(super) fn invalid(
        &self,
        key: impl Into<String>,
        message: impl Into<String>,
    ) -> ConfigError {
        ConfigError::Invalid {
            file: self.source.clone(),
            key: key.into(),
            message: message.into(),
        }
    }

    pub(super) fn validate_browser(&self) -> Result<(), ConfigError> {
        let uses = self.routes.iter().position(|r| r.auth == AuthMode::Browser);
        let Some(b) = &self.browser else {
            return match uses {
                Some(i) => Err(self.invalid(
                    format!("routes[{i}].auth"),
                    "browser routes need a [browser] table",
                )),
                None => Ok(()),
            };
        };
        if !self.issuers.iter().any(|x| x.name == b.issuer) {
            return Err(self.invalid("browser.issuer", format!("no issuer named `{}`", b.issuer)));
        }
        if b.client_id.is_empty() {
            return Err(self.invalid("browser.client_id", "must not be empty"));
        }
        match (&b.client_secret_file, &b.client_key_file) {
            (Some(_), Some(_)) => {
                return Err(self.invalid(
                    "browser.client_key_file",
                    "set either client_secret_file or client_key_file, not both",
                ));
            }
            (None, None) => {
                return Err(self.invalid(
                    "browser.client_secret_file",
                    "set client_secret_file (client_secret_basic) or client_key_file (private_key_jwt)",
                ));
            }
            _ => {}
        }
        if !SUPPORTED_ALGORITHMS.contains(&b.client_key_alg.as_str()) || b.client_key_alg == "EdDSA"
        {
            return Err(self.invalid(
                "browser.client_key_alg",
                format!("`{}` is not an accepted algorithm", b.client_key_alg),
            ));
        }
        if let Some(u) = &b.discovery_url {
            check_http_url(u).map_err(|m| self.invalid("browser.discovery_url", m))?;
        }
        if !b.scopes.iter().any(|s| s == "openid") {
            return Err(self.invalid("browser.scopes", "must include `openid`"));
        }
        if b.scopes
            .iter()
            .any(|s| s.is_empty() || s.chars().any(|c| c.is_whitespace() || c.is_control()))
        {
            return Err(self.invalid("browser.scopes", "scopes are non-empty words"));
        }
        if b.device_claim.as_deref() == Some("") {
            return Err(self.invalid("browser.device_claim", "must not be empty"));
        }
        for (k, v) in [
            ("session_idle_s", b.session_idle_s),
            ("session_max_s", b.session_max_s),
            ("login_timeout_s", b.login_timeout_s),
            ("dbsc_cookie_ttl_s", b.dbsc_cookie_ttl_s),
            ("dbsc_challenge_ttl_s", b.dbsc_challenge_ttl_s),
        ] {
            if v == 0 {
                return Err(self.invalid(format!("browser.{k}"), "must be at least 1"));
            }
        }
        if b.dbsc_challenge_ttl_s < b.dbsc_cookie_ttl_s {
            return Err(self.invalid(
                "browser.dbsc_challenge_ttl_s",
                "must be at least `dbsc_cookie_ttl_s` (a cached challenge serves the next refresh)",
            ));
        }
        Ok(())
    }

    /// Checks everything a parse cannot: references, ranges, URL shapes.
    /// Files (certificates, keys, JWKS) are checked where they are loaded.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.tls.certificates.is_empty() {
            return Err(self.invalid("tls.certificates", "at least one certificate is required"));
        }
        if self.proxy.max_connections == 0 {
            return Err(self.invalid("proxy.max_connections", "must be at least 1"));
        }
        self.validate_tracing()?;
        if self.proxy.max_header_bytes < 8192 {
            return Err(self.invalid("proxy.max_header_bytes", "must be at least 8192"));
        }
        if self.proxy.max_headers == 0 {
            return Err(self.invalid("proxy.max_headers", "must be at least 1"));
        }
        if self.proxy.live_redecide_interval_s == 0 {
            return Err(self.invalid("proxy.live_redecide_interval_s", "must be at least 1"));
        }
        for (i, h) in self.proxy.strip_headers.iter().enumerate() {
            if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                return Err(self.invalid(
                    format!("proxy.strip_headers[{i}]"),
                    format!("`{h}` is not a header name"),
                ));
            }
        }
        if (self.admin.listen == self.proxy.listen
            || Some(self.admin.listen) == self.proxy.plain_http_listen)
            && self.admin.listen.port() != 0
        {
            return Err(self.invalid("admin.listen", "must differ from the proxy listeners"));
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .map_err(|e| self.invalid("log.level", format!("`{}`: {e}", self.log.level)))?;

        self.validate_client_auth()?;
        self.validate_binding()?;
        self.validate_store()?;

        let mut names = HashSet::new();
        for (i, iss) in self.issuers.iter().enumerate() {
            let key = |k: &str| format!("issuers[{i}].{k}");
            if !names.insert(iss.name.as_str()) {
                return Err(self.invalid(key("name"), format!("duplicate issuer `{}`", iss.name)));
            }
            if iss.issuer.is_empty() {
                return Err(self.invalid(key("issuer"), "must not be empty"));
            }
            if iss.audiences.is_empty() || iss.audiences.iter().any(String::is_empty) {
                return Err(self.invalid(key("audiences"), "at least one non-empty audience"));
            }
            if iss.algorithms.is_empty() {
                return Err(self.invalid(key("algorithms"), "at least one algorithm"));
            }
            self.check_key_source(
                &format!("issuers[{i}]"),
                &iss.algorithms,
                [&iss.jwks_url, &iss.discovery_url],
                iss.jwks_file.is_some(),
            )?;
            if iss.leeway_s > MAX_LEEWAY_S {
                return Err(self.invalid(
                    key("leeway_s"),
                    format!("{} exceeds the ceiling of {MAX_LEEWAY_S} s", iss.leeway_s),
                ));
            }
            if iss.refresh_interval_s == 0 {
                return Err(self.invalid(key("refresh_interval_s"), "must be at least 1"));
            }
            if iss.device_claim.is_empty() {
                return Err(self.invalid(key("device_claim"), "must not be empty"));
            }
        }

        self.validate_feeds()?;
        self.validate_browser()?;
        self.validate_assertion()?;
        self.validate_access()?;
        self.validate_transmitter()?;

        let mut route_names = HashSet::new();
        let mut matchers = HashSet::new();
        for (i, r) in self.routes.iter().enumerate() {
            let key = |k: &str| format!("routes[{i}].{k}");
            if !route_names.insert(r.name.as_str()) {
                return Err(self.invalid(key("name"), format!("duplicate route `{}`", r.name)));
            }
            if !r.path_prefix.starts_with('/') {
                return Err(self.invalid(key("path_prefix"), "must start with `/`"));
            }
            if r.host.is_empty() {
                return Err(self.invalid(key("host"), "must not be empty (use `*` for any)"));
            }
            if !matchers.insert((r.host.to_ascii_lowercase(), r.path_prefix.clone())) {
                return Err(self.invalid(
                    key("path_prefix"),
                    format!(
                        "another route already matches `{}{}`",
                        r.host, r.path_prefix
                    ),
                ));
            }
            check_http_url(&r.upstream).map_err(|m| self.invalid(key("upstream"), m))?;
            for (j, name) in r.issuers.iter().enumerate() {
                if !self.issuers.iter().any(|x| &x.name == name) {
                    return Err(self.invalid(
                        format!("routes[{i}].issuers[{j}]"),
                        format!("no issuer named `{name}`"),
                    ));
                }
            }
            if r.auth == AuthMode::Bearer && self.issuers.is_empty() {
                return Err(self.invalid(key("auth"), "bearer routes need at least one issuer"));
            }
            if r.timeout_ms == Some(0) {
                return Err(self.invalid(key("timeout_ms"), "must be at least 1"));
            }
            self.validate_route_binding(i, r)?;
            for (j, w) in r.workloads.iter().enumerate() {
                if w.is_empty() {
                    return Err(
                        self.invalid(format!("routes[{i}].workloads[{j}]"), "must not be empty")
                    );
                }
            }
        }
        self.validate_policy()
    }

    pub(super) fn validate_store(&self) -> Result<(), ConfigError> {
        match (self.store.kind, &self.store.nats) {
            (StoreKind::Nats, None) => {
                Err(self.invalid("store.nats", "is required when store.kind = \"nats\""))
            }
            (StoreKind::Sqlite, Some(_)) => {
                Err(self.invalid("store.nats", "is only read when store.kind = \"nats\""))
            }
            (StoreKind::Nats, Some(n)) => {
                let token = |s: &str| {
                    !s.is_empty()
                        && s.chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                };
                if n.url.trim().is_empty() {
                    return Err(self.invalid("store.nats.url", "must not be empty"));
                }
                if !token(&n.replica) {
                    return Err(self.invalid(
                        "store.nats.replica",
                        format!("`{}`: use letters, digits, `-` and `_`", n.replica),
                    ));
                }
                if !token(&n.stream) {
                    return Err(self.invalid(
                        "store.nats.stream",
                        format!("`{}`: use letters, digits, `-` and `_`", n.stream),
                    ));
                }
                if n.subject_prefix.is_empty() || n.subject_prefix.split('.').any(|t| !token(t)) {
                    return Err(self.invalid(
                        "store.nats.subject_prefix",
                        format!("`{}`: dot-separated tokens, no wildcards", n.subject_prefix),
                    ));
                }
                if n.ack_timeout_ms == 0 || n.duplicate_window_s == 0 || n.cache_capacity == 0 {
                    return Err(self.invalid(
                        "store.nats",
                        "ack_timeout_ms, duplicate_window_s and cache_capacity must be at least 1",
                    ));
                }
                Ok(())
            }
            (StoreKind::Sqlite, None) => Ok(()),
        }
    }

    pub(super) fn validate_policy(&self) -> Result<(), ConfigError> {
        let mut zone_names = HashSet::new();
        for (i, z) in self.network.zones.iter().enumerate() {
            if z.name.is_empty() || z.name == parsed::OTHER_ZONE {
                return Err(self.invalid(
                    format!("network.zones[{i}].name"),
                    format!("must be non-empty and not `{}`", parsed::OTHER_ZONE),
                ));
            }
            if !zone_names.insert(z.name.as_str()) {
                return Err(self.invalid(
                    format!("network.zones[{i}].name"),
                    format!("duplicate zone `{}`", z.name),
                ));
            }
            if z.cidrs.is_empty() {
                return Err(self.invalid(
                    format!("network.zones[{i}].cidrs"),
                    "at least one CIDR block",
                ));
            }
            for (j, c) in z.cidrs.iter().enumerate() {
                if parsed::parse_cidr(c).is_none() {
                    return Err(self.invalid(
                        format!("network.zones[{i}].cidrs[{j}]"),
                        format!("`{c}` is not an address or CIDR block"),
                    ));
                }
            }
        }
        let Some(p) = &self.policy else {
            return Ok(());
        };
        if p.posture_max_age_s == 0 {
            return Err(self.invalid("policy.posture_max_age_s", "must be at least 1"));
        }
        if p.workload_max_credential_age_s == 0 {
            return Err(self.invalid("policy.workload_max_credential_age_s", "must be at least 1"));
        }
        if p.decision_cache_ttl_ms > 60_000 {
            return Err(self.invalid(
                "policy.decision_cache_ttl_ms",
                "at most 60000: cached decisions must follow the clock",
            ));
        }
        if let Some(a) = &p.audit {
            if !(0.0..=1.0).contains(&a.sample_allow) {
                return Err(self.invalid(
                    "policy.audit.sample_allow",
                    format!("{} is not between 0.0 and 1.0", a.sample_allow),
                ));
            }
            if a.path.as_os_str().is_empty() {
                return Err(self.invalid("policy.audit.path", "a file path, or `-` for stdout"));
            }
        }
        for (i, r) in p.shadow_routes.iter().enumerate() {
            if !self.routes.iter().any(|x| &x.name == r) {
                return Err(self.invalid(
                    format!("policy.shadow_routes[{i}]"),
                    format!("no route named `{r}`"),
                ));
            }
        }
        if !p.shadow_routes.is_empty() && p.shadow_dir.is_none() {
            return Err(self.invalid("policy.shadow_routes", "needs policy.shadow_dir"));
        }
        Ok(())
    }

    /// `[tls]` client certificates: which names ask, and what they trust.
    pub(super) fn validate_client_auth(&self) -> Result<(), ConfigError> {
        let tls = &self.tls;
        let has_trust = !tls.client_ca.is_empty() || !tls.spiffe.is_empty();
        if has_trust && tls.client_auth_hosts.is_empty() {
            return Err(self.invalid(
                "tls.client_auth_hosts",
                "client certificates are requested only on the names listed here; \
                 list them (`[\"*\"]` for every name)",
            ));
        }
        if !has_trust && !tls.client_auth_hosts.is_empty() {
            return Err(self.invalid(
                "tls.client_auth_hosts",
                "set tls.client_ca or tls.spiffe: there is nothing to verify client certificates against",
            ));
        }
        for (i, h) in tls.client_auth_hosts.iter().enumerate() {
            parsed::HostSet::check_pattern(h)
                .map_err(|m| self.invalid(format!("tls.client_auth_hosts[{i}]"), m))?;
        }
        let mut domains = HashSet::new();
        for (i, s) in tls.spiffe.iter().enumerate() {
            parsed::SpiffeId::check_trust_domain(&s.trust_domain)
                .map_err(|m| self.invalid(format!("tls.spiffe[{i}].trust_domain"), m))?;
            if !domains.insert(s.trust_domain.as_str()) {
                return Err(self.invalid(
                    format!("tls.spiffe[{i}].trust_domain"),
                    format!("duplicate trust domain `{}`", s.trust_domain),
                ));
            }
        }
        Ok(())
    }

    /// `[binding]`: the device rule, the thumbprint map, DPoP limits.
    pub(super) fn validate_binding(&self) -> Result<(), ConfigError> {
        let b = &self.binding;
        if let Some(rule) = &b.device_id_rule {
            parsed::DeviceIdRule::parse(rule)
                .map_err(|m| self.invalid("binding.device_id_rule", m))?;
        }
        for (k, v) in &b.device_thumbprints {
            let key = format!("binding.device_thumbprints.{k}");
            if parsed::decode_x5t(k).is_none() {
                return Err(self.invalid(
                    key,
                    "must be a base64url SHA-256 certificate thumbprint (43 characters)",
                ));
            }
            if v.is_empty() || v.len() > parsed::MAX_DEVICE_ID_LEN {
                return Err(self.invalid(key, "device id must be 1 to 256 bytes"));
            }
        }
        for (j, a) in b.dpop_algorithms.iter().enumerate() {
            if !SUPPORTED_ALGORITHMS.contains(&a.as_str()) {
                return Err(self.invalid(
                    format!("binding.dpop_algorithms[{j}]"),
                    format!(
                        "`{a}` is not accepted; use asymmetric algorithms from {}",
                        SUPPORTED_ALGORITHMS.join(", ")
                    ),
                ));
            }
        }
        if b.dpop_max_age_s == 0 || b.dpop_max_age_s > MAX_DPOP_MAX_AGE_S {
            return Err(self.invalid(
                "binding.dpop_max_age_s",
                format!("must be 1 to {MAX_DPOP_MAX_AGE_S} s"),
            ));
        }
        if b.dpop_future_skew_s > MAX_DPOP_FUTURE_SKEW_S {
            return Err(self.invalid(
                "binding.dpop_future_skew_s",
                format!("must be at most {MAX_DPOP_FUTURE_SKEW_S} s"),
            ));
        }
        if b.dpop_nonce_lifetime_s == 0 || b.dpop_nonce_lifetime_s > 3600 {
            return Err(self.invalid("binding.dpop_nonce_lifetime_s", "must be 1 to 3600 s"));
        }
        if !(512..=65536).contains(&b.dpop_max_proof_bytes) {
            return Err(self.invalid("binding.dpop_max_proof_bytes", "must be 512 to 65536 bytes"));
        }
        if b.dpop_replay_capacity < 1000 {
            return Err(self.invalid("binding.dpop_replay_capacity", "must be at least 1000"));
        }
        Ok(())
    }

    /// A route's `binding` and `spiffe_ids` fit its `auth` mode.
    pub(super) fn validate_route_binding(
        &self,
        i: usize,
        r: &RouteConfig,
    ) -> Result<(), ConfigError> {
        let key = |k: &str| format!("routes[{i}].{k}");
        if r.binding == BindingMode::Required && r.auth != AuthMode::Bearer {
            return Err(self.invalid(key("binding"), "applies to `auth = \"bearer\"` routes only"));
        }
        if r.auth != AuthMode::Mtls {
            if !r.spiffe_ids.is_empty() {
                return Err(self.invalid(
                    key("spiffe_ids"),
                    "applies to `auth = \"mtls\"` routes only",
                ));
            }
            return Ok(());
        }
        if r.spiffe_ids.is_empty() {
            return Err(self.invalid(
                key("spiffe_ids"),
                "an `auth = \"mtls\"` route needs at least one SPIFFE id",
            ));
        }
        for (j, id) in r.spiffe_ids.iter().enumerate() {
            let k = format!("routes[{i}].spiffe_ids[{j}]");
            let exact = id.strip_suffix("/*").unwrap_or(id);
            let parsed = parsed::SpiffeId::parse(exact)
                .map_err(|m| self.invalid(k.clone(), format!("`{id}`: {m}")))?;
            if !self
                .tls
                .spiffe
                .iter()
                .any(|s| s.trust_domain == parsed.trust_domain)
            {
                return Err(self.invalid(
                    k,
                    format!(
                        "trust domain `{}` is not in tls.spiffe",
                        parsed.trust_domain
                    ),
                ));
            }
        }
        let hosts = parsed::HostSet::new(&self.tls.client_auth_hosts);
        if r.host != "*" && !hosts.contains(&r.host) {
            return Err(self.invalid(
                key("host"),
                format!(
                    "`{}` is not in tls.client_auth_hosts, so no client certificate would be requested",
                    r.host
                ),
            ));
        }
        Ok(())
    }

    /// Where a signer's keys come from (token issuers and the SSF
    /// transmitter alike): accepted algorithms, and exactly one of
    /// `jwks_url` / `discovery_url` / `jwks_file`, URLs well-formed.
    pub(super) fn check_key_source(
        &self,
        prefix: &str,
        algorithms: &[String],
        [jwks_url, discovery_url]: [&Option<String>; 2],
        has_file: bool,
    ) -> Result<(), ConfigError> {
        for (j, a) in algorithms.iter().enumerate() {
            if !SUPPORTED_ALGORITHMS.contains(&a.as_str()) {
                return Err(self.invalid(
                    format!("{prefix}.algorithms[{j}]"),
                    format!(
                        "`{a}` is not accepted; use one of {}",
                        SUPPORTED_ALGORITHMS.join(", ")
                    ),
                ));
            }
        }
        if [jwks_url.is_some(), discovery_url.is_some(), has_file]
            .iter()
            .filter(|b| **b)
            .count()
            != 1
        {
            return Err(self.invalid(
                format!("{prefix}.jwks_url"),
                "set exactly one of jwks_url, discovery_url, jwks_file",
            ));
        }
        for (k, url) in [("jwks_url", jwks_url), ("discovery_url", discovery_url)] {
            if let Some(u) = url {
                check_http_url(u).map_err(|m| self.invalid(format!("{prefix}.{k}"), m))?;
            }
        }
        Ok(())
    }

    pub(super) fn validate_feeds(&self) -> Result<(), ConfigError> {
        let secret = |key: &str, v: &str| -> Result<(), ConfigError> {
            if v.len() < 16 {
                return Err(self.invalid(key, "secrets must be at least 16 characters"));
            }
            Ok(())
        };
        if let Some(t) = &self.admin.api_token {
            secret("admin.api_token", t)?;
        }
        if let Some(t) = &self.admin.metrics_token {
            secret("admin.metrics_token", t)?;
        }
        if self.feeds.max_body_bytes == 0 {
            return Err(self.invalid("feeds.max_body_bytes", "must be at least 1"));
        }
        if self.feeds.max_future_skew_s > 24 * 3600 {
            return Err(self.invalid("feeds.max_future_skew_s", "must be at most 86400 (one day)"));
        }
        if let Some(ssf) = &self.feeds.ssf {
            if let Some(t) = &ssf.push_token {
                secret("feeds.ssf.push_token", t)?;
            }
            if ssf.audiences.is_empty() {
                return Err(self.invalid("feeds.ssf.audiences", "at least one audience"));
            }
            self.check_key_source(
                "feeds.ssf",
                &ssf.algorithms,
                [&ssf.jwks_url, &ssf.discovery_url],
                ssf.jwks_file.is_some(),
            )?;
            if let Some(u) = &ssf.poll_url {
                check_http_url(u).map_err(|m| self.invalid("feeds.ssf.poll_url", m))?;
            }
            if ssf.push_token.is_none() && ssf.poll_url.is_none() {
                return Err(self.invalid(
                    "feeds.ssf",
                    "set push_token (push) or poll_url (poll), or both",
                ));
            }
        }
        if let Some(scim) = &self.feeds.scim {
            secret("feeds.scim.token", &scim.token)?;
            if !["userName", "externalId", "id"].contains(&scim.subject_attribute.as_str()) {
                return Err(self.invalid(
                    "feeds.scim.subject_attribute",
                    "one of userName, externalId, id",
                ));
            }
            if let Some(u) = &scim.base_url {
                check_http_url(u).map_err(|m| self.invalid("feeds.scim.base_url", m))?;
            }
        }
        if let Some(j) = &self.feeds.jamf {
            secret("feeds.jamf.authorization", &j.authorization)?;
            if !["udid", "serialNumber", "jssID"].contains(&j.device_id_field.as_str()) {
                return Err(self.invalid(
                    "feeds.jamf.device_id_field",
                    "one of udid, serialNumber, jssID",
                ));
            }
            if http::HeaderValue::from_str(&j.authorization).is_err() {
                return Err(self.invalid(
                    "feeds.jamf.authorization",
                    "must be a valid header value (visible ASCII)",
                ));
            }
            for (k, ids) in [
                ("noncompliant_groups", &j.noncompliant_groups),
                ("patch_groups", &j.patch_groups),
                ("compromised_groups", &j.compromised_groups),
                ("lost_groups", &j.lost_groups),
            ] {
                let mut seen = HashSet::new();
                for (n, id) in ids.iter().enumerate() {
                    if *id == 0 || !seen.insert(*id) {
                        return Err(self.invalid(
                            format!("feeds.jamf.{k}[{n}]"),
                            format!("`{id}` is zero or listed twice"),
                        ));
                    }
                }
            }
            if let Some(a) = &j.api {
                check_http_url(&a.url).map_err(|m| self.invalid("feeds.jamf.api.url", m))?;
                for (k, v) in [
                    ("client_id", &a.client_id),
                    ("client_secret", &a.client_secret),
                ] {
                    if v.trim().is_empty() {
                        return Err(
                            self.invalid(format!("feeds.jamf.api.{k}"), "must not be empty")
                        );
                    }
                }
                if a.timeout_s == 0 {
                    return Err(self.invalid("feeds.jamf.api.timeout_s", "must be at least 1"));
                }
            }
        }
        if let Some(i) = &self.feeds.intune {
            check_http_url(&i.graph_url).map_err(|m| self.invalid("feeds.intune.graph_url", m))?;
            check_http_url(&i.token_url).map_err(|m| self.invalid("feeds.intune.token_url", m))?;
            if i.interval_s == 0 {
                return Err(self.invalid("feeds.intune.interval_s", "must be at least 1"));
            }
            for (k, v) in [
                ("client_id", &i.client_id),
                ("client_secret", &i.client_secret),
                ("scope", &i.scope),
            ] {
                if v.trim().is_empty() {
                    return Err(self.invalid(format!("feeds.intune.{k}"), "must not be empty"));
                }
            }
            if i.full_sync_interval_s != 0 && i.full_sync_interval_s < i.interval_s {
                return Err(self.invalid(
                    "feeds.intune.full_sync_interval_s",
                    "must be 0 (off) or at least interval_s",
                ));
            }
            if !["azureADDeviceId", "id"].contains(&i.device_id_field.as_str()) {
                return Err(
                    self.invalid("feeds.intune.device_id_field", "one of azureADDeviceId, id")
                );
            }
        }
        let mut names = HashSet::new();
        for (i, m) in self.feeds.mdm.iter().enumerate() {
            if m.name.is_empty()
                || !m
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(self.invalid(
                    format!("feeds.mdm[{i}].name"),
                    "letters, digits, `-` and `_` only",
                ));
            }
            if !names.insert(m.name.as_str()) {
                return Err(self.invalid(
                    format!("feeds.mdm[{i}].name"),
                    format!("duplicate source `{}`", m.name),
                ));
            }
            secret(&format!("feeds.mdm[{i}].secret"), &m.secret)?;
        }
        Ok(())
    }

    /// The header names stripped from client requests: the ones the proxy
    /// sets itself always, the defaults unless replaced, the configured ones.
    pub fn stripped_headers(&self) -> Vec<http::HeaderName> {
        let mut out: Vec<http::HeaderName> = Vec::new();
        let defaults = if self.proxy.strip_headers_replace_defaults {
            &[][..]
        } else {
            DEFAULT_STRIPPED_HEADERS
        };
        for h in PROXY_SET_HEADERS.iter().chain(defaults) {
            let n = http::HeaderName::from_static(h);
            if !out.contains(&n) {
                out.push(n);
            }
        }
        let route_headers = self
            .routes
            .iter()
            .flat_map(|r| r.identity_headers.named().map(|(_, n)| n));
        for h in self
            .proxy
            .strip_headers
            .iter()
            .map(String::as_str)
            .chain(route_headers)
        {
            if let Ok(n) = http::HeaderName::from_bytes(h.as_bytes())
                && !out.contains(&n)
            {
                out.push(n);
            }
        }
        out
    }

    /// Header-read timeout as a duration.
    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_millis(self.proxy.header_read_timeout_ms)
    }
}

pub(super) fn check_http_url(u: &str) -> Result<(), String> {
    let uri: http::Uri = u.parse().map_err(|e| format!("`{u}` is not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err(format!("`{u}` must be an http or https URL")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("`{u}` has no host"));
    }
    Ok(())
}
