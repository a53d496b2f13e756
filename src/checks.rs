//! Validation of a parsed config as a whole: `config` checks what needs no other module, and each
//! module checks its own section here (retry tables by the retry policy, endpoints by the endpoint
//! rules, event patterns by the matcher, secrets by their signing scheme, `[inbound]` by the proxy,
//! TLS files by `db::tls`, keys by `crypto`). Invariant: a `Config` these functions return is valid
//! throughout; every problem is reported, each naming its key.

use std::path::Path;

use crate::config::{Config, ConfigError};
use crate::delivery::retry::RetryPolicy;
use crate::outbox::glob::EventPattern;

/// Loads defaults, then `file` (if any), then `POSTERN__*` variables, and validates everything.
pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
    let config = Config::parse(file)?;
    validate(&config)?;
    Ok(config)
}

/// Parses a TOML document (plus the environment layer) and validates everything, as `load` does.
pub fn from_toml_str(toml: &str) -> Result<Config, ConfigError> {
    let config = Config::parse_toml_str(toml)?;
    validate(&config)?;
    Ok(config)
}

/// Everything wrong with a parsed config: config's own checks, then each module's.
pub fn validate(config: &Config) -> Result<(), ConfigError> {
    let mut p = match config.validate() {
        Ok(()) => Vec::new(),
        Err(e) => e.problems,
    };
    if let Err(errs) = RetryPolicy::from_config(&config.outbound.retry) {
        p.extend(errs.into_iter().map(|e| format!("outbound.retry.{e}")));
    }
    p.extend(config.outbound.breaker.problems("outbound.breaker"));
    for (i, e) in config.endpoints.iter().enumerate() {
        let key = format!("endpoints[{i}]");
        if let Some(b) = &e.breaker {
            p.extend(b.problems(&format!("{key}.breaker")));
        }
        if let Err(msg) = crate::endpoints::validate_endpoint_url(&e.url) {
            p.push(format!("{key}.url: {msg}"));
        }
        if e.events.len() > crate::outbox::glob::MAX_PATTERNS {
            p.push(format!(
                "{key}.events: at most {} types or patterns",
                crate::outbox::glob::MAX_PATTERNS
            ));
        }
        for (j, pattern) in e.events.iter().enumerate() {
            if let Err(msg) = EventPattern::parse(pattern) {
                p.push(format!("{key}.events[{j}]: {msg}"));
            }
        }
        if let Err(msg) = crate::signing::validate_secret(e.signature, e.secret.expose()) {
            p.push(format!("{key}.secret: {msg}"));
        }
        if let Some(name) = crate::endpoints::repeated_header(e.headers.keys()) {
            p.push(format!(
                "{key}.headers.{name}: the same header as another name in this table (header names ignore case)"
            ));
        }
        for (name, value) in &e.headers {
            if let Err(msg) = crate::endpoints::validate_custom_header(name) {
                p.push(format!("{key}.headers.{name}: {msg}"));
            }
            // Else every attempt would be deferred for it, for good (the value is not shown).
            if http::HeaderValue::from_str(value.expose()).is_err() {
                p.push(format!(
                    "{key}.headers.{name}: not a valid header value (control characters or a line ending?)"
                ));
            }
        }
        if let Some(retry) = &e.retry {
            if let Err(errs) = RetryPolicy::from_config(retry) {
                p.extend(errs.into_iter().map(|m| format!("{key}.retry.{m}")));
            }
        }
    }
    if let Some(inbound) = &config.inbound {
        p.extend(crate::inbound::validate(inbound));
    }
    if let Some(path) = &config.database.ca_file {
        if let Err(e) = crate::db::tls::verified(Some(path)) {
            p.push(format!("{e:#}"));
        }
    }
    if let Some(key) = &config.database.encryption_key {
        if let Err(e) = crate::crypto::SecretBox::from_base64(key.expose()) {
            p.push(format!("database.encryption_key: {e}"));
        }
    }
    for (i, key) in config.database.encryption_keys.iter().enumerate() {
        if let Err(e) = crate::crypto::SecretBox::from_base64(key.expose()) {
            p.push(format!("database.encryption_keys[{i}]: {e}"));
        }
    }
    if p.is_empty() {
        Ok(())
    } else {
        Err(ConfigError { problems: p })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [database]
        url = "postgres://postgres@127.0.0.1/postgres"
    "#;

    #[test]
    fn the_default_retry_table_is_the_documented_schedule() {
        let c = from_toml_str(MINIMAL).unwrap();
        let policy = RetryPolicy::from_config(&c.outbound.retry).unwrap();
        assert_eq!(policy.max_attempts(), 8);
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let toml = format!(
            r#"{MINIMAL}
            [outbound]
            per_endpoint_concurrency = 0
            [outbound.retry]
            schedule = ["1s"]
            max_attempts = 3
            [[endpoints]]
            id = "ok"
            url = "https://example.com/a"
            events = ["a.b"]
            secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
            [[endpoints]]
            id = "bad"
            url = "ftp://example.com"
            events = ["a..b"]
            secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
            "#
        );
        let err = from_toml_str(&toml).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("outbound.per_endpoint_concurrency:"),
            "{text}"
        );
        assert!(text.contains("outbound.retry.schedule: excludes"), "{text}");
        assert!(
            text.contains("endpoints[1].url: scheme must be http or https"),
            "{text}"
        );
        assert!(text.contains("endpoints[1].events[0]:"), "{text}");
        assert!(!text.contains("endpoints[0]"), "{text}");
        let many: Vec<String> = (0..1001).map(|i| format!("\"t{i}\"")).collect();
        let toml = format!(
            r#"{MINIMAL}
            [[endpoints]]
            id = "wide"
            url = "https://example.com/a"
            events = [{}]
            secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
            "#,
            many.join(", ")
        );
        let text = from_toml_str(&toml).unwrap_err().to_string();
        assert!(text.contains("endpoints[0].events: at most 1000"), "{text}");
    }

    #[test]
    fn header_values_and_tokens_that_cannot_be_sent_are_refused_naming_their_key() {
        // Kubernetes secrets made with `echo` end in a newline: one is dropped, as from a file.
        std::env::set_var("POSTERN_TEST_CHECKS_TOKEN", "0123456789abcdef-token\n");
        std::env::set_var("POSTERN_TEST_CHECKS_HEADER", "Bearer abc\n");
        let toml = format!(
            r#"{MINIMAL}
            [api]
            listen = "127.0.0.1:0"
            tokens = ["env:POSTERN_TEST_CHECKS_TOKEN"]
            [[endpoints]]
            id = "ok"
            url = "https://example.com/a"
            events = ["a.b"]
            secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
            headers = {{ authorization = "env:POSTERN_TEST_CHECKS_HEADER" }}
            "#
        );
        let c = from_toml_str(&toml).unwrap();
        assert_eq!(c.api.unwrap().tokens[0].expose(), "0123456789abcdef-token");
        assert_eq!(
            c.endpoints[0].headers["authorization"].expose(),
            "Bearer abc"
        );

        let toml = format!(
            r#"{MINIMAL}
            [api]
            listen = "127.0.0.1:0"
            tokens = ["0123456789abcdef token ", "0123456789abcdef\u0001", "0123456789abcdef token"]
            [[endpoints]]
            id = "bad"
            url = "https://example.com/a"
            events = ["a.b"]
            secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
            headers = {{ authorization = "Bearer abc\r\n", "x-ok" = "fine" }}
            "#
        );
        let text = from_toml_str(&toml).unwrap_err().to_string();
        assert!(
            text.contains("endpoints[0].headers.authorization: not a valid header value"),
            "{text}"
        );
        assert!(!text.contains("x-ok"), "{text}");
        assert!(
            !text.contains("Bearer abc"),
            "the value is never shown: {text}"
        );
        assert!(text.contains("api.tokens[0]: "), "{text}");
        assert!(text.contains("api.tokens[1]: "), "{text}");
        // A space inside is sent as it is.
        assert!(!text.contains("api.tokens[2]"), "{text}");
    }
}
