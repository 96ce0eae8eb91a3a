//! Every piece of SQL the operator runs: identifiers and quoting, connections, passwords, the
//! idempotent provisioning of a service's database, its teardown, replication slots and
//! read-back for status. Submodules say whether they do I/O; SQL text is built by pure
//! functions in [`sql`] so it can be unit-tested without a server.
//!
//! The controller's entry points:
//! - [`provision::provision`] with a [`plan::DatabasePlan`]: converge database, roles,
//!   grants, outbox and publications (idempotent; a second run changes nothing).
//! - [`provision::set_role_password`]: a credentials Secret was lost; set a new password.
//! - [`deprovision::deprovision`]: `deletionPolicy: Delete` (drops only objects marked ours).
//!
//! Every database and role the operator creates carries an ownership mark
//! ([`ownership::OwnerMark`], a `COMMENT ON`); nothing unmarked or marked as another
//! ServiceDatabase's is ever altered, granted to, or dropped.
//! - [`slots::drop_slot`]: a Logical relay went away.
//! - [`inspect::inspect`]: what exists, for status.

pub mod connect;
pub mod deprovision;
pub mod identifiers;
pub mod inspect;
pub mod ownership;
pub mod passwords;
pub mod plan;
pub mod provision;
pub mod slots;
pub mod sql;
pub mod summary;

use std::fmt;

pub use connect::{ConnectError, ConnectParams, SslMode, connect};
pub use identifiers::{Ident, IdentError, QualifiedName, RoleNames, quote_ident};
pub use ownership::{Holder, ObjectKind, OwnerMark};
pub use passwords::{Password, PersistedPassword};
pub use plan::{CdcPlan, DatabasePlan, RolePassword, RolePlan};
pub use provision::{ProvisionError, ProvisionReport};

/// A `tokio_postgres::Error` whose `Display` carries what the server said.
///
/// tokio-postgres displays a server error as just "db error"; status conditions and Events need
/// the message and SQLSTATE (`42501: permission denied to create role`).
#[derive(Debug)]
pub struct PgError(pub tokio_postgres::Error);

impl PgError {
    /// The SQLSTATE when the server answered with an error.
    pub fn sqlstate(&self) -> Option<&str> {
        self.0.code().map(|c| c.code())
    }
}

impl fmt::Display for PgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(db) = self.0.as_db_error() {
            write!(
                f,
                "{} {}: {}",
                db.severity(),
                db.code().code(),
                db.message()
            )?;
            if let Some(detail) = db.detail() {
                write!(f, " ({detail})")?;
            }
            return Ok(());
        }
        write!(f, "{}", self.0)?;
        let mut source = std::error::Error::source(&self.0);
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}

impl std::error::Error for PgError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

impl From<tokio_postgres::Error> for PgError {
    fn from(e: tokio_postgres::Error) -> Self {
        PgError(e)
    }
}
