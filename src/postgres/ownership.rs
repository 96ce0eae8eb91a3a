//! Ownership marks: which ServiceDatabase created a database or role on a (shared) server,
//! written as the object's comment and read back before the operator touches it (pure, no I/O).
//!
//! Format, version 1 (one line, ASCII, space separated):
//!
//! ```text
//! servicedb.io/owner=v1 ns=<namespace> name=<name> uid=<uid>
//! ```
//!
//! `COMMENT ON DATABASE|ROLE ... IS '<mark>'` carries it; `pg_catalog.shobj_description(oid,
//! 'pg_database'|'pg_authid')` reads it from any database on the server. A comment that does not
//! start with `servicedb.io/owner=` is "no mark" (a DBA's own comment counts as unmarked); a
//! comment with the prefix but an unknown version or a broken body is a mark we cannot read and
//! is treated like a foreign one (never ours).
//!
//! "Ours" means same namespace and name. The uid is informative: a ServiceDatabase deleted with
//! `Retain` and created again under the same name re-adopts its own objects, and the operator
//! then rewrites the mark with the new uid.

use std::fmt;

/// The prefix every mark starts with.
pub const MARK_PREFIX: &str = "servicedb.io/owner=";
/// The mark format version written today.
pub const MARK_VERSION: &str = "v1";

/// Why a mark cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MarkError {
    /// A part holds characters outside what Kubernetes allows in names and uids.
    #[error("{part} {value:?} cannot be written into an ownership mark")]
    InvalidPart {
        /// `namespace`, `name` or `uid`.
        part: &'static str,
        /// The value.
        value: String,
    },
}

/// The ServiceDatabase an object belongs to.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct OwnerMark {
    /// Namespace of the ServiceDatabase.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Its `metadata.uid`.
    pub uid: String,
}

/// Kubernetes names and uids: lowercase letters, digits, `-` and `.` (names), plus nothing
/// else; at most 253 bytes. Keeping the mark to this alphabet makes it safe as a SQL literal
/// and unambiguous to parse.
fn valid_part(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
}

impl OwnerMark {
    /// A mark for the ServiceDatabase `namespace/name` with `uid`.
    pub fn new(
        namespace: impl Into<String>,
        name: impl Into<String>,
        uid: impl Into<String>,
    ) -> Result<Self, MarkError> {
        let mark = OwnerMark {
            namespace: namespace.into(),
            name: name.into(),
            uid: uid.into(),
        };
        for (part, value) in [
            ("namespace", &mark.namespace),
            ("name", &mark.name),
            ("uid", &mark.uid),
        ] {
            if !valid_part(value) {
                return Err(MarkError::InvalidPart {
                    part,
                    value: value.clone(),
                });
            }
        }
        Ok(mark)
    }

    /// The comment text.
    pub fn format(&self) -> String {
        format!(
            "{MARK_PREFIX}{MARK_VERSION} ns={} name={} uid={}",
            self.namespace, self.name, self.uid
        )
    }

    /// Same ServiceDatabase (namespace and name); the uid may differ.
    pub fn same_owner(&self, other: &OwnerMark) -> bool {
        self.namespace == other.namespace && self.name == other.name
    }

    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

impl fmt::Display for OwnerMark {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{} (uid {})", self.namespace, self.name, self.uid)
    }
}

/// What an object's comment says about its owner.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Mark {
    /// No comment, or a comment that is not ours (a DBA's note).
    None,
    /// A readable mark.
    Owner(OwnerMark),
    /// Our prefix with a body we cannot read (a newer version, or edited by hand): never ours.
    Unreadable(String),
}

impl Mark {
    /// Parses an object's comment.
    pub fn parse(comment: Option<&str>) -> Mark {
        let Some(rest) = comment.and_then(|c| c.trim().strip_prefix(MARK_PREFIX)) else {
            return Mark::None;
        };
        let unreadable = || Mark::Unreadable(rest.to_owned());
        let mut words = rest.split(' ');
        if words.next() != Some(MARK_VERSION) {
            return unreadable();
        }
        let mut get = |key: &str| {
            words
                .next()
                .and_then(|w| w.strip_prefix(key))
                .and_then(|w| w.strip_prefix('='))
                .map(str::to_owned)
        };
        let (Some(ns), Some(name), Some(uid)) = (get("ns"), get("name"), get("uid")) else {
            return unreadable();
        };
        if words.next().is_some() {
            return unreadable();
        }
        match OwnerMark::new(ns, name, uid) {
            Ok(m) => Mark::Owner(m),
            Err(_) => unreadable(),
        }
    }
}

/// Whose an existing object is, from the point of view of `me`.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Holder {
    /// Marked as `me`'s (the uid may differ: `stale_uid` says whether to rewrite the mark).
    Ours {
        /// The mark carries another uid (a re-created ServiceDatabase).
        stale_uid: bool,
    },
    /// No mark at all: a pre-existing object, adopted only when asked.
    Unmarked,
    /// Another ServiceDatabase's (or a mark we cannot read: `None`).
    Other(Option<OwnerMark>),
}

impl Holder {
    /// Classifies an object's comment.
    pub fn of(comment: Option<&str>, me: &OwnerMark) -> Holder {
        match Mark::parse(comment) {
            Mark::None => Holder::Unmarked,
            Mark::Owner(m) if m.same_owner(me) => Holder::Ours {
                stale_uid: m.uid != me.uid,
            },
            Mark::Owner(m) => Holder::Other(Some(m)),
            Mark::Unreadable(_) => Holder::Other(None),
        }
    }
}

/// Database or role, for messages.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ObjectKind {
    /// A database.
    Database,
    /// A role.
    Role,
}

impl fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ObjectKind::Database => "database",
            ObjectKind::Role => "role",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> OwnerMark {
        OwnerMark::new("shop-dev", "orders", "0b7c9a3e-1111-4222-8333-944455556666").unwrap()
    }

    #[test]
    fn a_mark_formats_and_parses_back() {
        let text = me().format();
        assert_eq!(
            text,
            "servicedb.io/owner=v1 ns=shop-dev name=orders uid=0b7c9a3e-1111-4222-8333-944455556666"
        );
        assert_eq!(Mark::parse(Some(&text)), Mark::Owner(me()));
    }

    #[test]
    fn comments_without_the_prefix_are_no_mark_and_broken_marks_are_not_ours() {
        assert_eq!(Mark::parse(None), Mark::None);
        assert_eq!(Mark::parse(Some("owned by the billing team")), Mark::None);
        for broken in [
            "servicedb.io/owner=v2 ns=a name=b uid=c",
            "servicedb.io/owner=v1 ns=a name=b",
            "servicedb.io/owner=v1 ns=a name=b uid=c extra=1",
            "servicedb.io/owner=v1 ns=A name=b uid=c",
            "servicedb.io/owner=v1 name=b ns=a uid=c",
        ] {
            assert!(
                matches!(Mark::parse(Some(broken)), Mark::Unreadable(_)),
                "{broken}"
            );
            assert_eq!(Holder::of(Some(broken), &me()), Holder::Other(None));
        }
    }

    #[test]
    fn same_namespace_and_name_is_ours_whatever_the_uid() {
        let mut other_uid = me();
        other_uid.uid = "ffffffff-0000-4000-8000-000000000000".to_owned();
        assert_eq!(
            Holder::of(Some(&other_uid.format()), &me()),
            Holder::Ours { stale_uid: true }
        );
        assert_eq!(
            Holder::of(Some(&me().format()), &me()),
            Holder::Ours { stale_uid: false }
        );
        let staging = OwnerMark::new("shop-staging", "orders", "x").unwrap();
        assert_eq!(
            Holder::of(Some(&staging.format()), &me()),
            Holder::Other(Some(staging))
        );
        assert_eq!(Holder::of(None, &me()), Holder::Unmarked);
    }

    #[test]
    fn marks_refuse_characters_that_could_break_the_format_or_the_literal() {
        for bad in ["", "a b", "a'b", "A", "a/b", "a=b"] {
            assert!(OwnerMark::new(bad, "n", "u").is_err(), "{bad:?}");
        }
    }
}
