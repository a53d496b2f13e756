//! The checks an endpoint's fields pass through the API, each answering with the documented 422
//! (or the SSRF refusal) rather than storing what a delivery would later fail on.

use std::collections::BTreeMap;

use super::error::ApiError;
use super::ApiState;
use crate::config::{BreakerConfig, RetryConfig};
use crate::outbox::glob::{EventPattern, MAX_PATTERNS};

pub(super) fn check_url(state: &ApiState, url: &str) -> Result<(), ApiError> {
    let parsed = crate::endpoints::validate_endpoint_url(url)
        .map_err(|m| ApiError::invalid("invalid_url", format!("url: {m}")))?;
    // The connect-time guard is the authority; refusing the obvious cases here gives the caller
    // an answer now instead of a failed delivery later.
    let blocked = match parsed.host_str() {
        Some("localhost") => state
            .guard
            .check("127.0.0.1".parse().expect("literal"))
            .err(),
        _ => state.guard.check_url(&parsed).err(),
    };
    match blocked {
        Some(b) => Err(ApiError::invalid("url_not_allowed", format!("url: {b}"))),
        None => Ok(()),
    }
}

pub(super) fn check_events(events: &[String]) -> Result<(), ApiError> {
    if events.is_empty() {
        return Err(ApiError::invalid(
            "invalid_events",
            "events: must list at least one event type or pattern",
        ));
    }
    if events.len() > MAX_PATTERNS {
        return Err(ApiError::invalid(
            "invalid_events",
            format!("events: at most {MAX_PATTERNS} types or patterns"),
        ));
    }
    for (i, e) in events.iter().enumerate() {
        EventPattern::parse(e)
            .map_err(|m| ApiError::invalid("invalid_events", format!("events[{i}]: {m}")))?;
    }
    Ok(())
}

pub(super) fn check_tenant(tenant: Option<&str>) -> Result<(), ApiError> {
    match tenant {
        Some(t)
            if t != "*"
                && (t.is_empty()
                    || t.len() > 128
                    || !t
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "_-.:".contains(c))) =>
        {
            Err(ApiError::invalid(
                "invalid_tenant",
                "tenant: must be \"*\" or 1-128 characters of a-z, A-Z, 0-9, _ - . :",
            ))
        }
        _ => Ok(()),
    }
}

pub(super) fn check_headers(
    state: &ApiState,
    endpoint: &str,
    headers: &BTreeMap<String, String>,
) -> Result<serde_json::Value, ApiError> {
    let mut sealed = serde_json::Map::new();
    if let Some(name) = crate::endpoints::repeated_header(headers.keys()) {
        return Err(ApiError::invalid(
            "invalid_headers",
            format!("headers.{name}: the same header as another name (header names ignore case)"),
        ));
    }
    for (name, value) in headers {
        crate::endpoints::validate_custom_header(name)
            .map_err(|m| ApiError::invalid("invalid_headers", format!("headers.{name}: {m}")))?;
        if http::HeaderValue::from_str(value).is_err() {
            return Err(ApiError::invalid(
                "invalid_headers",
                format!("headers.{name}: not a valid header value"),
            ));
        }
        let name = name.to_ascii_lowercase();
        let field = crate::crypto::Field::Header {
            endpoint,
            name: &name,
        };
        let value = serde_json::Value::String(state.vault.seal(value, field));
        sealed.insert(name, value);
    }
    Ok(serde_json::Value::Object(sealed))
}

pub(super) fn check_breaker(breaker: Option<&BreakerConfig>) -> Result<(), ApiError> {
    let problems = breaker.map(|b| b.problems("breaker")).unwrap_or_default();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid("invalid_breaker", problems.join("; ")))
    }
}

pub(super) fn check_retry(
    retry: Option<&RetryConfig>,
) -> Result<Option<serde_json::Value>, ApiError> {
    let Some(r) = retry else { return Ok(None) };
    crate::delivery::retry::RetryPolicy::from_config(r).map_err(|errs| {
        ApiError::invalid(
            "invalid_retry",
            errs.iter()
                .map(|e| format!("retry.{e}"))
                .collect::<Vec<_>>()
                .join("; "),
        )
    })?;
    Ok(Some(
        serde_json::to_value(r).expect("retry config serializes"),
    ))
}
