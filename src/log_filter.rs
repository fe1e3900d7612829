//! Which log directive a program runs with: `LOCKHUB_LOG`, else `RUST_LOG` (the variable every
//! Rust operator tries first), else the program's default.
//!
//! A directive that does not parse is not dropped in silence: the program runs with its
//! default and says once which variable it could not use, so an operator who typed
//! `LOCKHUB_LOG=debgu` learns why nothing changed.

use tracing_subscriber::EnvFilter;

/// The variables read, the first one set winning.
pub const VARIABLES: [&str; 2] = ["LOCKHUB_LOG", "RUST_LOG"];

/// The filter to install, and a sentence to print once it is installed when a variable was
/// set but could not be used.
#[derive(Debug)]
pub struct Choice {
    /// The filter.
    pub filter: EnvFilter,
    /// Why the default was used although a variable was set.
    pub warning: Option<String>,
}

/// Chooses from the process environment (see [`choose_from`]).
pub fn choose(default: &str) -> Choice {
    choose_from(default, |name| std::env::var(name).ok())
}

/// Chooses from `lookup`: the first of [`VARIABLES`] that is set and not empty, when it parses
/// as an `EnvFilter` directive; otherwise `default`.
pub fn choose_from(default: &str, lookup: impl Fn(&str) -> Option<String>) -> Choice {
    let fallback = || EnvFilter::try_new(default).unwrap_or_else(|_| EnvFilter::new("info"));
    let Some((name, value)) =
        VARIABLES.iter().find_map(|&name| lookup(name).filter(|v| !v.is_empty()).map(|v| (name, v)))
    else {
        return Choice { filter: fallback(), warning: None };
    };
    match EnvFilter::try_new(&value) {
        Ok(filter) => Choice { filter, warning: None },
        // The parser's message may quote the variable: escaped and bounded like any text from
        // outside.
        Err(e) => Choice {
            filter: fallback(),
            warning: Some(format!(
                "{name} is not a log directive ({}); logging at {default:?}",
                crate::outside_text::Outside::bounded(&e.to_string(), 120)
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(vars: &[(&str, &str)]) -> Choice {
        let vars: Vec<(String, String)> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        choose_from("info", move |name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()))
    }

    #[test]
    fn lockhub_log_wins_then_rust_log_then_the_default() {
        assert_eq!(with(&[]).filter.to_string(), "info");
        assert_eq!(with(&[("RUST_LOG", "debug")]).filter.to_string(), "debug");
        assert_eq!(with(&[("RUST_LOG", "debug"), ("LOCKHUB_LOG", "warn")]).filter.to_string(), "warn");
        assert_eq!(with(&[("RUST_LOG", "debug"), ("LOCKHUB_LOG", "")]).filter.to_string(), "debug");
        assert!(with(&[("RUST_LOG", "lockhub::timing=debug")]).warning.is_none());
    }

    #[test]
    fn a_directive_that_does_not_parse_is_said_and_the_default_used() {
        let c = with(&[("LOCKHUB_LOG", "lockhub=loud")]);
        assert_eq!(c.filter.to_string(), "info");
        let warning = c.warning.expect("a warning");
        assert!(warning.starts_with("LOCKHUB_LOG is not a log directive"), "{warning}");
        assert!(with(&[("RUST_LOG", "=[")]).warning.is_some_and(|w| w.starts_with("RUST_LOG")));
    }
}
