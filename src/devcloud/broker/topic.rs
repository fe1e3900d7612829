//! MQTT topic names and filters (MQTT 3.1.1 §4.7): validation, and matching a name against a
//! filter. Pure functions, shared by the router (delivery) and the ACL (confinement).

use thiserror::Error;

/// Longest topic name or filter accepted, in bytes. Lockhub's own topics are under 100 bytes;
/// the cap bounds the work of matching and the memory of subscriptions.
pub const MAX_TOPIC_LEN: usize = 512;

/// Most levels in a name or filter.
pub const MAX_LEVELS: usize = 16;

/// Why a topic name or filter was refused.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum TopicError {
    /// Empty.
    #[error("empty topic")]
    Empty,
    /// Longer than [`MAX_TOPIC_LEN`] bytes or [`MAX_LEVELS`] levels.
    #[error("topic too long")]
    TooLong,
    /// A wildcard in a topic name (only filters may have them).
    #[error("wildcard in a topic name")]
    WildcardInName,
    /// `#` not alone in the last level, or `+` not alone in its level.
    #[error("misplaced wildcard in a filter")]
    MisplacedWildcard,
    /// A NUL character (forbidden by MQTT).
    #[error("NUL character in a topic")]
    Nul,
}

fn common(topic: &str) -> Result<(), TopicError> {
    if topic.is_empty() {
        return Err(TopicError::Empty);
    }
    if topic.len() > MAX_TOPIC_LEN || topic.split('/').count() > MAX_LEVELS {
        return Err(TopicError::TooLong);
    }
    if topic.contains('\0') {
        return Err(TopicError::Nul);
    }
    Ok(())
}

/// Checks a topic name (what is published to).
pub fn validate_name(name: &str) -> Result<(), TopicError> {
    common(name)?;
    if name.contains(['+', '#']) {
        return Err(TopicError::WildcardInName);
    }
    Ok(())
}

/// Checks a topic filter (what is subscribed to).
pub fn validate_filter(filter: &str) -> Result<(), TopicError> {
    common(filter)?;
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        let last = i + 1 == levels.len();
        let ok = match *level {
            "#" => last,
            "+" => true,
            other => !other.contains(['+', '#']),
        };
        if !ok {
            return Err(TopicError::MisplacedWildcard);
        }
    }
    Ok(())
}

/// Whether the (valid) `name` matches the (valid) `filter`. Names starting with `$` are not
/// matched by a wildcard in the first level, as the specification requires.
pub fn matches(filter: &str, name: &str) -> bool {
    if name.starts_with('$') && filter.starts_with(['+', '#']) {
        return false;
    }
    let mut f = filter.split('/');
    let mut n = name.split('/');
    loop {
        match (f.next(), n.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_match_as_the_specification_says() {
        assert!(matches("a/b", "a/b"));
        assert!(!matches("a/b", "a/b/c"));
        assert!(matches("a/#", "a"), "# also matches the parent level");
        assert!(matches("a/#", "a/b/c"));
        assert!(matches("a/+/c", "a/b/c"));
        assert!(!matches("a/+", "a/b/c"));
        assert!(matches("+/+", "/x"), "empty levels are levels");
        assert!(matches("#", "a/b"));
        assert!(!matches("#", "$SYS/x"));
        assert!(!matches("+/x", "$SYS/x"));
        assert!(matches("$SYS/#", "$SYS/x"));
    }

    #[test]
    fn names_and_filters_are_validated() {
        assert_eq!(validate_name("a/+"), Err(TopicError::WildcardInName));
        assert_eq!(validate_name(""), Err(TopicError::Empty));
        assert_eq!(validate_name(&"a".repeat(MAX_TOPIC_LEN + 1)), Err(TopicError::TooLong));
        assert_eq!(validate_name(&"a/".repeat(MAX_LEVELS)), Err(TopicError::TooLong));
        assert_eq!(validate_name("a\0b"), Err(TopicError::Nul));
        assert!(validate_filter("a/+/#").is_ok());
        assert_eq!(validate_filter("a/#/b"), Err(TopicError::MisplacedWildcard));
        assert_eq!(validate_filter("a/b#"), Err(TopicError::MisplacedWildcard));
        assert_eq!(validate_filter("a+/b"), Err(TopicError::MisplacedWildcard));
    }
}
