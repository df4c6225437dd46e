//! MQTT topic names and topic filters: validation and matching, in one place (MQTT 3.1.1 §4.7,
//! MQTT 5 §4.7). Routes, ACLs, config validation, ingest and subscriptions all use these.
//!
//! - A topic **name** (what a PUBLISH carries) is at least one byte, has no wildcard (`+`, `#`)
//!   and no NUL, and is within the configured length.
//! - A topic **filter** (a route, an ACL rule, a SUBSCRIBE) is at least one byte, has no NUL, and
//!   uses `+` only as a whole level and `#` only as a whole, last level.
//! - Matching: `+` matches exactly one level (possibly empty), `#` matches the parent level and
//!   any number of levels below it (`a/#` matches `a`). A filter that starts with a wildcard does
//!   not match a name that starts with `$` (`#` does not match `$SYS/x`): `$` topics are the
//!   server's, and a subscriber to everything must ask for them by name.

use std::fmt;

/// Why a topic name is not one a client may publish to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameError {
    /// Zero bytes long.
    Empty,
    /// Longer than the configured limit.
    TooLong { len: usize, max: usize },
    /// Contains `+` or `#`: wildcards belong in filters, not in names.
    Wildcard,
    /// Contains U+0000, which MQTT forbids in strings.
    Nul,
}

impl fmt::Display for NameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NameError::Empty => f.write_str("the topic is empty"),
            NameError::TooLong { len, max } => {
                write!(f, "the topic is {len} bytes long, more than {max}")
            }
            NameError::Wildcard => f.write_str("the topic contains a wildcard ('+' or '#')"),
            NameError::Nul => f.write_str("the topic contains a NUL character"),
        }
    }
}

/// Why a topic filter is not valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterError {
    /// Zero bytes long.
    Empty,
    /// `#` somewhere else than as the whole last level.
    MultiLevelNotLast,
    /// `+` or `#` inside a level with other characters (`a+/b`).
    WildcardInLevel,
    /// Contains U+0000.
    Nul,
}

impl fmt::Display for FilterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FilterError::Empty => "the filter is empty",
            FilterError::MultiLevelNotLast => "'#' may only be the whole last level",
            FilterError::WildcardInLevel => "'+' and '#' may only stand for a whole level",
            FilterError::Nul => "the filter contains a NUL character",
        })
    }
}

/// Checks a topic name that a client publishes to (at most `max` bytes).
pub fn check_name(topic: &str, max: usize) -> Result<(), NameError> {
    if topic.is_empty() {
        return Err(NameError::Empty);
    }
    if topic.len() > max {
        return Err(NameError::TooLong {
            len: topic.len(),
            max,
        });
    }
    if topic.contains(['+', '#']) {
        return Err(NameError::Wildcard);
    }
    if topic.contains('\0') {
        return Err(NameError::Nul);
    }
    Ok(())
}

/// Checks a topic filter.
pub fn check_filter(filter: &str) -> Result<(), FilterError> {
    if filter.is_empty() {
        return Err(FilterError::Empty);
    }
    if filter.contains('\0') {
        return Err(FilterError::Nul);
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        match level {
            "#" if levels.peek().is_some() => return Err(FilterError::MultiLevelNotLast),
            "#" | "+" => {}
            l if l.contains(['+', '#']) => return Err(FilterError::WildcardInLevel),
            _ => {}
        }
    }
    Ok(())
}

/// Whether the filter has a wildcard (so it can match more than one name).
pub fn has_wildcard(filter: &str) -> bool {
    filter.split('/').any(|l| l == "+" || l == "#")
}

/// Whether `filter` matches the topic name `topic`. The filter is assumed valid
/// ([`check_filter`]); an invalid one matches what its literal levels say.
pub fn matches(filter: &str, topic: &str) -> bool {
    matches_by(filter, topic, |f, t| f == t)
}

/// [`matches`] with the comparison of a literal filter level against a topic level left to
/// `level_eq(filter_level, topic_level)`: the ACL uses it to substitute `%c` and `%u`.
pub fn matches_by(filter: &str, topic: &str, mut level_eq: impl FnMut(&str, &str) -> bool) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut t = topic.split('/');
    for f in filter.split('/') {
        if f == "#" {
            return true;
        }
        match t.next() {
            Some(_) if f == "+" => {}
            Some(level) if level_eq(f, level) => {}
            _ => return false,
        }
    }
    t.next().is_none()
}

/// Whether every topic that `filter` matches is also matched by `outer` (both assumed valid), with
/// the comparison of a literal level of `outer` against a literal level of `filter` left to
/// `level_eq(outer_level, filter_level)`. The subscribe ACL uses it: a subscription is allowed when
/// an allowed filter covers it, so delivery needs no check per message.
pub fn covers_by(outer: &str, filter: &str, mut level_eq: impl FnMut(&str, &str) -> bool) -> bool {
    // `outer` starting with a wildcard does not match `$` topics, which a `$`-led `filter` does.
    if filter.starts_with('$') && (outer.starts_with('+') || outer.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    for o in outer.split('/') {
        if o == "#" {
            return true;
        }
        match f.next() {
            // `+` in `outer` covers any one level of `filter` but `#` (which spans several).
            Some(l) if o == "+" && l != "#" => {}
            Some(l) if l != "+" && l != "#" && level_eq(o, l) => {}
            _ => return false,
        }
    }
    f.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_for_length_wildcards_and_nul() {
        assert_eq!(check_name("devices/a/t", 64), Ok(()));
        assert_eq!(check_name("", 64), Err(NameError::Empty));
        assert_eq!(
            check_name("abcdef", 5),
            Err(NameError::TooLong { len: 6, max: 5 })
        );
        assert_eq!(check_name("a/+/b", 64), Err(NameError::Wildcard));
        assert_eq!(check_name("a/#", 64), Err(NameError::Wildcard));
        assert_eq!(check_name("a\0b", 64), Err(NameError::Nul));
        // Empty levels and `$` are allowed in names.
        assert_eq!(check_name("/a//b/", 64), Ok(()));
        assert_eq!(check_name("$SYS/x", 64), Ok(()));
    }

    #[test]
    fn filters_take_wildcards_only_as_whole_levels() {
        for ok in [
            "#", "+", "a/#", "a/+/b", "+/+", "/", "a//b", "$SYS/#", "+/#",
        ] {
            assert_eq!(check_filter(ok), Ok(()), "{ok}");
        }
        assert_eq!(check_filter(""), Err(FilterError::Empty));
        assert_eq!(check_filter("a/#/b"), Err(FilterError::MultiLevelNotLast));
        assert_eq!(check_filter("#/b"), Err(FilterError::MultiLevelNotLast));
        assert_eq!(check_filter("a/b#"), Err(FilterError::WildcardInLevel));
        assert_eq!(check_filter("a+/b"), Err(FilterError::WildcardInLevel));
        assert_eq!(check_filter("a/+b"), Err(FilterError::WildcardInLevel));
        assert_eq!(check_filter("a/\0"), Err(FilterError::Nul));
        assert!(has_wildcard("a/+/b"));
        assert!(has_wildcard("#"));
        assert!(!has_wildcard("a/b"));
    }

    #[test]
    fn filters_match_like_the_mqtt_spec() {
        // §4.7.1.2: `#` matches the parent level too.
        assert!(matches("sport/tennis/player1/#", "sport/tennis/player1"));
        assert!(matches(
            "sport/tennis/player1/#",
            "sport/tennis/player1/ranking"
        ));
        assert!(matches("sport/#", "sport"));
        assert!(matches("#", "a/b/c"));
        // §4.7.1.3: `+` is exactly one level, possibly empty.
        assert!(matches("sport/tennis/+", "sport/tennis/player1"));
        assert!(!matches("sport/tennis/+", "sport/tennis/player1/ranking"));
        assert!(!matches("sport/+", "sport"));
        assert!(matches("sport/+", "sport/"));
        assert!(matches("+/+", "/finance"));
        assert!(matches("/+", "/finance"));
        assert!(!matches("+", "/finance"));
        assert!(!matches("a/b", "a/b/c"));
        assert!(!matches("a/b/c", "a/b"));
        assert!(matches("a/b", "a/b"));
        // §4.7.2: wildcards at the first level do not match `$` topics.
        assert!(!matches("#", "$SYS/uptime"));
        assert!(!matches("+/uptime", "$SYS/uptime"));
        assert!(matches("$SYS/#", "$SYS/uptime"));
        assert!(matches("$SYS/+", "$SYS/uptime"));
    }

    #[test]
    fn a_filter_covers_what_it_matches_a_superset_of() {
        let covers = |o: &str, f: &str| covers_by(o, f, |a, b| a == b);
        assert!(covers("devices/d1/commands/#", "devices/d1/commands/#"));
        assert!(covers("devices/d1/commands/#", "devices/d1/commands/+/x"));
        assert!(covers("devices/d1/commands/#", "devices/d1/commands"));
        assert!(covers("devices/+/t", "devices/d1/t"));
        assert!(covers("devices/+/t", "devices/+/t"));
        assert!(covers("#", "a/#"));
        assert!(!covers("devices/d1/commands/#", "devices/#"));
        assert!(!covers("devices/d1/commands/#", "devices/+/commands/#"));
        assert!(!covers("devices/+/t", "devices/#"));
        assert!(!covers("devices/+", "devices/+/t"));
        assert!(!covers("a/b", "a/b/c"));
        assert!(
            !covers("#", "$SYS/#"),
            "a wildcard first level never reaches $ topics"
        );
        assert!(covers("$SYS/#", "$SYS/load"));
    }

    #[test]
    fn a_level_comparison_can_substitute() {
        let eq = |f: &str, t: &str| f.replace("%c", "dev-1") == t;
        assert!(matches_by("devices/%c/#", "devices/dev-1/t", eq));
        assert!(!matches_by("devices/%c/#", "devices/dev-2/t", eq));
        assert!(matches_by("devices/+/%c", "devices/x/dev-1", eq));
    }
}
