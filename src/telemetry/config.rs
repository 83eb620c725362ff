//! The `[tracing]` configuration section and its resolution against `OTEL_*` variables.
//!
//! Separate from the exporter ([`export`](super::export), feature `otel`) so that a config file
//! with a `[tracing]` section parses in every build: a build without `otel` rejects it in
//! [`TracingConfig::validate`] with a message naming the feature, instead of failing on an
//! unknown field or silently exporting nothing.
//!
//! Precedence, field by field: the config file, then the standard OpenTelemetry environment
//! variables (the signal-specific `OTEL_EXPORTER_OTLP_TRACES_*` before the generic
//! `OTEL_EXPORTER_OTLP_*`), then the defaults. The file wins because it is the explicit,
//! reviewed configuration, as the OpenTelemetry SDKs let code win over the environment; a
//! deployment that injects `OTEL_*` variables (the Kubernetes operator does) fills whatever the
//! file leaves unset. `OTEL_SDK_DISABLED=true` and `OTEL_TRACES_EXPORTER=none` turn export off
//! whatever the file says, as those variables are meant to.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::ConfigError;

/// The OTLP transport. Only HTTP with protobuf bodies is built in (the OpenTelemetry default,
/// served by every Collector and vendor endpoint on port 4318); gRPC would bring tonic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[non_exhaustive]
pub enum Protocol {
    /// `http/protobuf`: OTLP over HTTP, protobuf bodies, `POST {endpoint}/v1/traces`.
    #[default]
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
    /// `grpc`: recognised so that a file or `OTEL_EXPORTER_OTLP_PROTOCOL` naming it is
    /// rejected with a clear message, not supported.
    #[serde(rename = "grpc")]
    Grpc,
    /// `http/json`: recognised and rejected like [`Protocol::Grpc`].
    #[serde(rename = "http/json")]
    HttpJson,
}

impl Protocol {
    fn parse(s: &str) -> Option<Self> {
        match s.trim() {
            "http/protobuf" => Some(Protocol::HttpProtobuf),
            "grpc" => Some(Protocol::Grpc),
            "http/json" => Some(Protocol::HttpJson),
            _ => None,
        }
    }
}

/// How a `process` span relates to the context in the record's `traceparent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum ProcessParent {
    /// The conventions' default: each `process` span starts its own trace and **links** to the
    /// producer's span. Retries and redeliveries stay separate traces that all point back.
    #[default]
    Link,
    /// The `process` span is a **child** of the producer's span (and links to it too), so the
    /// producer, every attempt and every hand-off are one trace, as the OpenTelemetry Java agent
    /// does without receive telemetry. Traces grow with every retry.
    Child,
}

/// `[tracing]`: export spans over OTLP (feature `otel`).
///
/// ```toml
/// [tracing]
/// endpoint = "http://otel-collector:4318"   # POST {endpoint}/v1/traces
/// service_name = "billing"
/// sampling_ratio = 0.1                       # of new traces; a sampled caller is followed
/// resource = { "deployment.environment.name" = "prod" }
/// ```
///
/// Every field may be left out; see the module docs for the environment variables that fill
/// them. The section's presence turns export on (in a build with `otel`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TracingConfig {
    /// `false` turns export off while keeping the section. Default `true`.
    pub enabled: Option<bool>,
    /// Base URL of the OTLP/HTTP receiver; `/v1/traces` is appended, as for
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`. Default `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (used as
    /// is), then `OTEL_EXPORTER_OTLP_ENDPOINT`, then `http://localhost:4318`.
    pub endpoint: Option<String>,
    /// The OTLP transport; only `http/protobuf` is built in.
    pub protocol: Option<Protocol>,
    /// `service.name` of every span. Default `OTEL_SERVICE_NAME`, then a `service.name` in
    /// `resource` or `OTEL_RESOURCE_ATTRIBUTES`, then the consumer group (the proxy: `sidetrack`).
    pub service_name: Option<String>,
    /// Fraction of new traces recorded, 0.0 to 1.0; a span whose caller's context is sampled
    /// (or not) follows the caller. Default from `OTEL_TRACES_SAMPLER`/`OTEL_TRACES_SAMPLER_ARG`,
    /// else 1.0.
    pub sampling_ratio: Option<f64>,
    /// Resource attributes added to every span (over `OTEL_RESOURCE_ATTRIBUTES`, key by key).
    pub resource: BTreeMap<String, String>,
    /// Extra HTTP headers on every export request (e.g. an API key). Default
    /// `OTEL_EXPORTER_OTLP_TRACES_HEADERS`, then `OTEL_EXPORTER_OTLP_HEADERS`.
    pub headers: BTreeMap<String, String>,
    /// Time limit of one export request. Default `OTEL_EXPORTER_OTLP_TRACES_TIMEOUT`, then
    /// `OTEL_EXPORTER_OTLP_TIMEOUT` (milliseconds), then 10 s.
    #[serde(with = "humantime_serde")]
    pub timeout: Option<Duration>,
    /// How a `process` span relates to the record's context: `"link"` (default) or `"child"`.
    pub process_parent: ProcessParent,
    /// Record `messaging.kafka.message.key` (when the key is UTF-8). Off by default: keys are
    /// often customer identifiers, and the conventions make the attribute opt-in.
    pub record_key: bool,
}

/// How new traces are sampled, after resolution.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// Fraction of traces recorded, 0.0 to 1.0.
    pub ratio: f64,
    /// Follow the caller's sampled flag when there is a caller (the `parentbased_*` samplers).
    pub parent_based: bool,
}

/// The `[tracing]` section with every default and environment variable applied.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedTracing {
    /// False when the file or `OTEL_SDK_DISABLED`/`OTEL_TRACES_EXPORTER` turned export off.
    pub enabled: bool,
    /// Full URL spans are posted to (`…/v1/traces`).
    pub traces_url: String,
    /// `service.name`.
    pub service_name: String,
    /// The sampler.
    pub sampling: Sampling,
    /// Resource attributes other than `service.name`, sorted by key.
    pub resource: BTreeMap<String, String>,
    /// Export request headers.
    pub headers: BTreeMap<String, String>,
    /// Export request time limit.
    pub timeout: Duration,
    /// See [`TracingConfig::process_parent`].
    pub process_parent: ProcessParent,
    /// See [`TracingConfig::record_key`].
    pub record_key: bool,
}

/// Reads `k=v,k=v` lists (`OTEL_RESOURCE_ATTRIBUTES`, `OTEL_EXPORTER_OTLP_HEADERS`); values are
/// percent-decoded as the spec says. Members without `=` are skipped.
fn parse_pairs(s: &str) -> BTreeMap<String, String> {
    s.split(',')
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            let k = k.trim();
            (!k.is_empty()).then(|| (k.to_owned(), percent_decode(v.trim())))
        })
        .collect()
}

/// `%XX` decoding; a malformed escape is kept as written.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl TracingConfig {
    /// The `[tracing]` section of a TOML file, ignoring every other section (the proxy's and
    /// the runtime's); `None` when the file has none. Not validated yet.
    ///
    /// # Errors
    /// [`ConfigError::Parse`] when the text is not TOML or the section has an unknown field.
    pub fn from_toml_str(text: &str) -> Result<Option<Self>, ConfigError> {
        #[derive(Deserialize)]
        struct File {
            tracing: Option<TracingConfig>,
        }
        let file: File = toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        Ok(file.tracing)
    }

    /// Checks the file's own values (environment variables are checked by
    /// [`TracingConfig::resolve`]).
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the field: a ratio outside 0..=1, an endpoint that is not
    /// an `http://` or `https://` URL, a protocol other than `http/protobuf`, a zero timeout, an
    /// empty service name, or any `[tracing]` in a build without the `otel` feature.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.enabled != Some(false) && !cfg!(feature = "otel") {
            return Err(ConfigError::invalid(
                "tracing",
                "this build has no OpenTelemetry export; enable the `otel` feature (or set tracing.enabled = false)",
            ));
        }
        if let Some(ratio) = self.sampling_ratio {
            if !(0.0..=1.0).contains(&ratio) {
                return Err(ConfigError::invalid(
                    "tracing.sampling_ratio",
                    format!("{ratio} is not between 0.0 and 1.0"),
                ));
            }
        }
        if let Some(endpoint) = &self.endpoint {
            check_url("tracing.endpoint", endpoint)?;
        }
        if let Some(protocol) = self.protocol {
            check_protocol("tracing.protocol", protocol)?;
        }
        if self.timeout == Some(Duration::ZERO) {
            return Err(ConfigError::invalid(
                "tracing.timeout",
                "must be more than zero",
            ));
        }
        if self
            .service_name
            .as_deref()
            .is_some_and(|s| s.trim().is_empty())
        {
            return Err(ConfigError::invalid(
                "tracing.service_name",
                "must not be empty",
            ));
        }
        Ok(())
    }

    /// Applies the process environment and the defaults. `default_service` names the service
    /// when nothing else does (the consumer group, or `sidetrack` for the proxy).
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the variable when an `OTEL_*` value cannot work.
    pub fn resolve(&self, default_service: &str) -> Result<ResolvedTracing, ConfigError> {
        self.resolve_with(default_service, |k| std::env::var(k).ok())
    }

    /// [`TracingConfig::resolve`] reading variables through `env` (tests pass a map).
    ///
    /// # Errors
    /// As [`TracingConfig::resolve`].
    pub fn resolve_with(
        &self,
        default_service: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<ResolvedTracing, ConfigError> {
        self.validate()?;
        let env = |k: &str| env(k).filter(|v| !v.trim().is_empty());
        let disabled_by_env = env("OTEL_SDK_DISABLED")
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
            || env("OTEL_TRACES_EXPORTER").is_some_and(|v| v.trim() == "none");

        let traces_url = match &self.endpoint {
            Some(base) => traces_url_of(base),
            None => match env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
                Some(url) => {
                    check_url("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", &url)?;
                    url.trim().to_owned()
                }
                None => match env("OTEL_EXPORTER_OTLP_ENDPOINT") {
                    Some(base) => {
                        check_url("OTEL_EXPORTER_OTLP_ENDPOINT", &base)?;
                        traces_url_of(&base)
                    }
                    None => traces_url_of("http://localhost:4318"),
                },
            },
        };

        if self.protocol.is_none() {
            for var in [
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
                "OTEL_EXPORTER_OTLP_PROTOCOL",
            ] {
                if let Some(v) = env(var) {
                    let p = Protocol::parse(&v).ok_or_else(|| {
                        ConfigError::invalid(var, format!("unknown OTLP protocol {v:?}"))
                    })?;
                    check_protocol(var, p)?;
                    break;
                }
            }
        }

        let mut resource = env("OTEL_RESOURCE_ATTRIBUTES")
            .map(|s| parse_pairs(&s))
            .unwrap_or_default();
        resource.extend(self.resource.clone());
        let resource_name = resource.remove("service.name");
        let service_name = self
            .service_name
            .clone()
            .or_else(|| env("OTEL_SERVICE_NAME"))
            .or(resource_name)
            .unwrap_or_else(|| default_service.to_owned());

        let sampling = match self.sampling_ratio {
            Some(ratio) => Sampling {
                ratio,
                parent_based: true,
            },
            None => sampling_from_env(&env)?,
        };

        let headers = if self.headers.is_empty() {
            env("OTEL_EXPORTER_OTLP_TRACES_HEADERS")
                .or_else(|| env("OTEL_EXPORTER_OTLP_HEADERS"))
                .map(|s| parse_pairs(&s))
                .unwrap_or_default()
        } else {
            self.headers.clone()
        };

        let timeout = match self.timeout {
            Some(t) => t,
            None => {
                let mut t = Duration::from_secs(10);
                for var in [
                    "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
                    "OTEL_EXPORTER_OTLP_TIMEOUT",
                ] {
                    if let Some(v) = env(var) {
                        let ms: u64 = v.trim().parse().map_err(|_| {
                            ConfigError::invalid(
                                var,
                                format!("{v:?} is not a number of milliseconds"),
                            )
                        })?;
                        t = Duration::from_millis(ms.max(1));
                        break;
                    }
                }
                t
            }
        };

        Ok(ResolvedTracing {
            enabled: self.enabled != Some(false) && !disabled_by_env,
            traces_url,
            service_name,
            sampling,
            resource,
            headers,
            timeout,
            process_parent: self.process_parent,
            record_key: self.record_key,
        })
    }
}

/// `{base}/v1/traces`, without doubling a trailing slash.
fn traces_url_of(base: &str) -> String {
    format!("{}/v1/traces", base.trim().trim_end_matches('/'))
}

/// An `http://` or `https://` URL with a host, or an error naming `field`.
fn check_url(field: &str, url: &str) -> Result<(), ConfigError> {
    let url = url.trim();
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| {
            ConfigError::invalid(field, format!("{url:?} is not an http:// or https:// URL"))
        })?;
    if rest.is_empty() || rest.starts_with('/') {
        return Err(ConfigError::invalid(field, format!("{url:?} has no host")));
    }
    Ok(())
}

/// Only `http/protobuf` is built in; the others are refused with what to do instead.
fn check_protocol(field: &str, protocol: Protocol) -> Result<(), ConfigError> {
    match protocol {
        Protocol::HttpProtobuf => Ok(()),
        Protocol::Grpc | Protocol::HttpJson => Err(ConfigError::invalid(
            field,
            "only http/protobuf is supported (OTLP over HTTP, port 4318); point the endpoint at a Collector's HTTP receiver",
        )),
    }
}

/// The standard sampler variables: `always_on`, `always_off`, `traceidratio` and their
/// `parentbased_` forms, the ratio in `OTEL_TRACES_SAMPLER_ARG` (default 1.0).
fn sampling_from_env(env: &impl Fn(&str) -> Option<String>) -> Result<Sampling, ConfigError> {
    let arg = || -> Result<f64, ConfigError> {
        match env("OTEL_TRACES_SAMPLER_ARG") {
            None => Ok(1.0),
            Some(v) => v
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|r| (0.0..=1.0).contains(r))
                .ok_or_else(|| {
                    ConfigError::invalid(
                        "OTEL_TRACES_SAMPLER_ARG",
                        format!("{v:?} is not a ratio between 0 and 1"),
                    )
                }),
        }
    };
    let Some(name) = env("OTEL_TRACES_SAMPLER") else {
        return Ok(Sampling {
            ratio: 1.0,
            parent_based: true,
        });
    };
    let (ratio, parent_based) = match name.trim() {
        "always_on" => (1.0, false),
        "always_off" => (0.0, false),
        "traceidratio" => (arg()?, false),
        "parentbased_always_on" => (1.0, true),
        "parentbased_always_off" => (0.0, true),
        "parentbased_traceidratio" => (arg()?, true),
        other => {
            return Err(ConfigError::invalid(
                "OTEL_TRACES_SAMPLER",
                format!("unsupported sampler {other:?}"),
            ))
        }
    };
    Ok(Sampling {
        ratio,
        parent_based,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    fn parse(toml_text: &str) -> TracingConfig {
        #[derive(Deserialize)]
        struct File {
            tracing: TracingConfig,
        }
        toml::from_str::<File>(toml_text).unwrap().tracing
    }

    /// An empty `[tracing]` resolves to the documented defaults (or, without `otel`, is refused).
    #[test]
    fn defaults_with_an_empty_section() {
        let r = parse("[tracing]").resolve_with("billing", env(&[]));
        if !cfg!(feature = "otel") {
            assert!(r.unwrap_err().to_string().contains("`otel` feature"));
            return;
        }
        let r = r.unwrap();
        assert!(r.enabled);
        assert_eq!(r.traces_url, "http://localhost:4318/v1/traces");
        assert_eq!(r.service_name, "billing");
        assert_eq!(
            r.sampling,
            Sampling {
                ratio: 1.0,
                parent_based: true
            }
        );
        assert_eq!(r.timeout, Duration::from_secs(10));
        assert_eq!(r.process_parent, ProcessParent::Link);
        assert!(!r.record_key);
    }

    /// Every field set in the file beats its `OTEL_*` variable; resource attributes merge key by
    /// key and are percent-decoded.
    #[test]
    fn the_file_wins_over_the_environment() {
        if !cfg!(feature = "otel") {
            return;
        }
        let cfg = parse(
            r#"
            [tracing]
            endpoint = "http://collector:4318/"
            service_name = "orders"
            sampling_ratio = 0.25
            resource = { "deployment.environment.name" = "prod" }
            timeout = "3s"
            process_parent = "child"
            record_key = true
            "#,
        );
        let r = cfg
            .resolve_with(
                "g",
                env(&[
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://elsewhere:4318"),
                    ("OTEL_SERVICE_NAME", "other"),
                    ("OTEL_TRACES_SAMPLER", "always_off"),
                    (
                        "OTEL_RESOURCE_ATTRIBUTES",
                        "deployment.environment.name=dev,team=pay%20ments",
                    ),
                    ("OTEL_EXPORTER_OTLP_TIMEOUT", "500"),
                ]),
            )
            .unwrap();
        assert_eq!(r.traces_url, "http://collector:4318/v1/traces");
        assert_eq!(r.service_name, "orders");
        assert_eq!(
            r.sampling,
            Sampling {
                ratio: 0.25,
                parent_based: true
            }
        );
        assert_eq!(
            r.resource.get("deployment.environment.name").unwrap(),
            "prod"
        );
        assert_eq!(r.resource.get("team").unwrap(), "pay ments");
        assert_eq!(r.timeout, Duration::from_secs(3));
        assert_eq!(r.process_parent, ProcessParent::Child);
        assert!(r.record_key);
    }

    /// Signal-specific variables beat generic ones; `OTEL_SDK_DISABLED` and
    /// `OTEL_TRACES_EXPORTER=none` turn export off.
    #[test]
    fn the_environment_fills_what_the_file_leaves_out() {
        if !cfg!(feature = "otel") {
            return;
        }
        let cfg = parse("[tracing]");
        let r = cfg
            .resolve_with(
                "g",
                env(&[
                    (
                        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                        "https://vendor.example/otlp/v1/traces",
                    ),
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://ignored:4318"),
                    (
                        "OTEL_RESOURCE_ATTRIBUTES",
                        "service.name=from-resource,k8s.pod.name=p-1",
                    ),
                    ("OTEL_TRACES_SAMPLER", "traceidratio"),
                    ("OTEL_TRACES_SAMPLER_ARG", "0.01"),
                    ("OTEL_EXPORTER_OTLP_HEADERS", "api-key=s%3Dcret,x=1"),
                    ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "2500"),
                ]),
            )
            .unwrap();
        assert_eq!(r.traces_url, "https://vendor.example/otlp/v1/traces");
        assert_eq!(r.service_name, "from-resource");
        assert!(!r.resource.contains_key("service.name"));
        assert_eq!(
            r.sampling,
            Sampling {
                ratio: 0.01,
                parent_based: false
            }
        );
        assert_eq!(r.headers.get("api-key").unwrap(), "s=cret");
        assert_eq!(r.timeout, Duration::from_millis(2500));
        let r = cfg
            .resolve_with("g", env(&[("OTEL_SDK_DISABLED", "true")]))
            .unwrap();
        assert!(!r.enabled);
        let r = cfg
            .resolve_with("g", env(&[("OTEL_TRACES_EXPORTER", "none")]))
            .unwrap();
        assert!(!r.enabled);
    }

    /// Each invalid value is rejected with the field or variable that holds it.
    #[test]
    fn bad_values_are_named() {
        let field =
            |cfg: &TracingConfig, vars: &[(&str, &str)]| match cfg.resolve_with("g", env(vars)) {
                Err(ConfigError::Invalid { field, .. }) => field,
                other => panic!("{other:?}"),
            };
        if !cfg!(feature = "otel") {
            assert_eq!(field(&parse("[tracing]"), &[]), "tracing");
            assert!(parse("[tracing]\nenabled = false").validate().is_ok());
            return;
        }
        assert_eq!(
            field(&parse("[tracing]\nsampling_ratio = 1.5"), &[]),
            "tracing.sampling_ratio"
        );
        assert_eq!(
            field(&parse("[tracing]\nendpoint = \"collector:4318\""), &[]),
            "tracing.endpoint"
        );
        assert_eq!(
            field(&parse("[tracing]\nprotocol = \"grpc\""), &[]),
            "tracing.protocol"
        );
        assert_eq!(
            field(&parse("[tracing]\ntimeout = \"0s\""), &[]),
            "tracing.timeout"
        );
        assert_eq!(
            field(&parse("[tracing]\nservice_name = \" \""), &[]),
            "tracing.service_name"
        );
        let empty = parse("[tracing]");
        assert_eq!(
            field(&empty, &[("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")]),
            "OTEL_EXPORTER_OTLP_PROTOCOL"
        );
        assert_eq!(
            field(&empty, &[("OTEL_TRACES_SAMPLER", "jaeger_remote")]),
            "OTEL_TRACES_SAMPLER"
        );
        assert_eq!(
            field(
                &empty,
                &[
                    ("OTEL_TRACES_SAMPLER", "traceidratio"),
                    ("OTEL_TRACES_SAMPLER_ARG", "2")
                ]
            ),
            "OTEL_TRACES_SAMPLER_ARG"
        );
        assert_eq!(
            field(&empty, &[("OTEL_EXPORTER_OTLP_TIMEOUT", "10s")]),
            "OTEL_EXPORTER_OTLP_TIMEOUT"
        );
        assert_eq!(
            field(&empty, &[("OTEL_EXPORTER_OTLP_ENDPOINT", "nope")]),
            "OTEL_EXPORTER_OTLP_ENDPOINT"
        );
    }

    /// A misspelt field is an error, not silently ignored.
    #[test]
    fn unknown_fields_are_rejected() {
        #[derive(Deserialize, Debug)]
        #[allow(dead_code)]
        struct File {
            tracing: TracingConfig,
        }
        assert!(toml::from_str::<File>("[tracing]\nendpont = \"http://x\"").is_err());
    }
}
