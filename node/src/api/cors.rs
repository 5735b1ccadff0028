//! Which web pages may call the API from a browser (`hearth serve --cors-origin`).
//!
//! Without a configured origin the API sends no CORS headers at all: a page served by
//! the node itself is same-origin and needs none, and a browser refuses every other
//! page's cross-origin reads, and its preflighted requests (JSON bodies, API keys),
//! outright. Each `--cors-origin` lets one more page in; `*` lets any in, and must be
//! asked for by name.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use axum::http::{header, HeaderValue, Method};
use tower_http::cors::{AllowOrigin, CorsLayer};

/// How long a browser may cache a preflight's answer.
const PREFLIGHT_MAX_AGE: Duration = Duration::from_secs(600);

/// An origin allowed to read the API's answers: `scheme://host[:port]`, as a browser
/// sends it in `Origin`, or `*` for any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CorsOrigin {
    Any,
    Exact(HeaderValue),
}

#[derive(Debug, thiserror::Error)]
pub enum CorsOriginError {
    #[error("a CORS origin is `*` or scheme://host[:port] (like https://chat.example.org), with no path")]
    Malformed,
}

impl FromStr for CorsOrigin {
    type Err = CorsOriginError;

    /// Only the form a browser sends: a scheme, a host, an optional port, no path; a
    /// trailing `/` would never match any `Origin` header, so it is refused, not ignored.
    fn from_str(origin: &str) -> Result<Self, Self::Err> {
        if origin == "*" {
            return Ok(Self::Any);
        }
        let (scheme, authority) = origin.split_once("://").ok_or(CorsOriginError::Malformed)?;
        let scheme_ok = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme.chars().all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
        let authority_ok = !authority.is_empty()
            && authority.chars().all(|c| c.is_ascii_alphanumeric() || "-.:[]".contains(c));
        if !scheme_ok || !authority_ok {
            return Err(CorsOriginError::Malformed);
        }
        HeaderValue::from_str(origin).map(Self::Exact).map_err(|_| CorsOriginError::Malformed)
    }
}

impl fmt::Display for CorsOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => f.write_str("*"),
            Self::Exact(origin) => f.write_str(origin.to_str().unwrap_or("<not text>")),
        }
    }
}

/// The layer that answers preflights and marks answers readable by `origins`; `None`
/// when no origin is configured, so that no CORS header is ever sent.
pub fn layer(origins: &[CorsOrigin]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let allow_origin = if origins.contains(&CorsOrigin::Any) {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|origin| match origin {
            CorsOrigin::Exact(origin) => Some(origin.clone()),
            CorsOrigin::Any => None,
        }))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow_origin)
            .allow_methods([Method::GET, Method::POST])
            .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
            .max_age(PREFLIGHT_MAX_AGE),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_parse_only_in_the_form_browsers_send() {
        assert_eq!("*".parse::<CorsOrigin>().unwrap(), CorsOrigin::Any);
        for good in ["https://chat.example.org", "http://localhost:3000", "http://[::1]:8080", "http://10.0.0.2"] {
            let origin: CorsOrigin = good.parse().unwrap();
            assert_eq!(origin.to_string(), good);
        }
        for bad in ["", "example.org", "https://", "https://example.org/", "https://example.org/chat", "**", "https://a b"] {
            assert!(bad.parse::<CorsOrigin>().is_err(), "{bad:?}");
        }
    }
}
