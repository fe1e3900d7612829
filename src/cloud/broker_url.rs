//! A cloud broker's address as the configuration gives it: `mqtts://host[:port]`, parsed
//! strictly (TLS is the only transport; the host is checked against the broker's certificate).

use thiserror::Error;

/// A broker address from the configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokerUrl {
    /// Host name (checked against the broker's certificate).
    pub host: String,
    /// TCP port.
    pub port: u16,
}

/// A broker URL that is not `mqtts://host[:port]`.
#[derive(Debug, Error)]
#[error("broker URL {0:?}: expected mqtts://host[:port] (TLS is required)")]
pub struct BadBrokerUrl(pub String);

impl BrokerUrl {
    /// Parses `mqtts://host[:port]` strictly.
    pub fn parse(url: &str) -> Result<Self, BadBrokerUrl> {
        let bad = || BadBrokerUrl(url.to_owned());
        let rest = url.strip_prefix("mqtts://").ok_or_else(bad)?;
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (h, p.parse::<u16>().map_err(|_| bad())?),
            _ => (rest, 8883),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let valid = !host.is_empty()
            && host.len() <= 253
            && host.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b':'));
        if !valid || port == 0 {
            return Err(bad());
        }
        Ok(BrokerUrl { host: host.to_owned(), port })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls_are_parsed_strictly() {
        assert_eq!(
            BrokerUrl::parse("mqtts://broker.example:8884").unwrap(),
            BrokerUrl { host: "broker.example".into(), port: 8884 }
        );
        assert_eq!(BrokerUrl::parse("mqtts://localhost").unwrap().port, 8883);
        for bad in ["mqtt://plain:1883", "mqtts://", "mqtts://host:0", "mqtts://host:99999", "mqtts://ho st", "tcp://x"]
        {
            assert!(BrokerUrl::parse(bad).is_err(), "{bad}");
        }
    }
}
