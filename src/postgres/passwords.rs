//! Role passwords: generation with a CSPRNG and client-side SCRAM-SHA-256 hashing (pure, no I/O).
//!
//! The server only ever receives the SCRAM verifier (`SCRAM-SHA-256$4096:salt$stored:server`),
//! never the plaintext: `CREATE/ALTER ROLE ... PASSWORD` is a utility statement that cannot take
//! bind parameters, so whatever we send lands in the statement text, and from there possibly in
//! `log_statement` output, `pg_stat_activity` and `pg_stat_statements`. A verifier there is as
//! harmless as it is in `pg_authid`; a plaintext password would not be.

use std::fmt;

use rand::Rng;
use rand::distr::Alphanumeric;

/// Length of generated passwords: 32 alphanumerics, about 190 bits of entropy, and no character
/// that needs escaping in a URI, a `.pgpass` line, a JDBC URL or a shell.
pub const PASSWORD_LEN: usize = 32;

/// A plaintext password. `Debug` is redacted so it cannot leak through `tracing` or an error.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(String);

impl Password {
    /// Generates a new random password from the thread-local CSPRNG (ChaCha, seeded and
    /// periodically reseeded from the operating system).
    pub fn generate() -> Password {
        let s: String = rand::rng()
            .sample_iter(&Alphanumeric)
            .take(PASSWORD_LEN)
            .map(char::from)
            .collect();
        Password(s)
    }

    /// Wraps an existing password (read back from a Secret).
    pub fn from_plaintext(s: impl Into<String>) -> Password {
        Password(s.into())
    }

    /// The plaintext, for writing into a Secret or authenticating. Named so that every use is
    /// easy to find in review.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The SCRAM-SHA-256 verifier of this password with a fresh random salt (4096 iterations,
    /// Postgres' default).
    pub fn scram_verifier(&self) -> ScramVerifier {
        ScramVerifier(postgres_protocol::password::scram_sha_256(
            self.0.as_bytes(),
        ))
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

/// A password known to be stored durably (in its credentials Secret) before it reaches SQL.
///
/// Role plans carry only this type, so a password cannot be set on a role unless whoever built
/// the plan vouched for it being persisted: a role holding a password nobody stored is an
/// outage waiting for the next restart. The operator builds it only from a Secret read back
/// from the apiserver or right after writing that Secret; [`Self::assume_persisted`] is the
/// one constructor, named so every call site states the invariant.
#[derive(Clone, PartialEq, Eq)]
pub struct PersistedPassword(Password);

impl PersistedPassword {
    /// The caller asserts `password` is stored where it will be found again (a Secret written
    /// or read back, a test's own variable).
    pub fn assume_persisted(password: Password) -> Self {
        PersistedPassword(password)
    }

    /// The SCRAM verifier to send.
    pub fn scram_verifier(&self) -> ScramVerifier {
        self.0.scram_verifier()
    }

    /// The password itself.
    pub fn password(&self) -> &Password {
        &self.0
    }
}

impl fmt::Debug for PersistedPassword {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PersistedPassword(<redacted>)")
    }
}

/// A SCRAM-SHA-256 verifier as stored in `pg_authid.rolpassword`.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct ScramVerifier(String);

impl ScramVerifier {
    /// The verifier text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_passwords_are_32_alphanumerics_and_differ() {
        let a = Password::generate();
        let b = Password::generate();
        assert_eq!(a.expose().len(), PASSWORD_LEN);
        assert!(a.expose().chars().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(a, b);
    }

    #[test]
    fn debug_output_never_shows_the_password() {
        let p = Password::from_plaintext("hunter2hunter2");
        assert!(!format!("{p:?}").contains("hunter2"));
    }

    #[test]
    fn verifiers_are_salted_scram_sha_256_without_the_plaintext() {
        let p = Password::from_plaintext("correct horse battery staple");
        let (v1, v2) = (p.scram_verifier(), p.scram_verifier());
        assert!(
            v1.as_str().starts_with("SCRAM-SHA-256$4096:"),
            "{}",
            v1.as_str()
        );
        assert_ne!(v1, v2, "each verifier has its own salt");
        assert!(!v1.as_str().contains("horse"));
        // Base64, digits and separators only: nothing a literal needs to escape.
        assert!(
            v1.as_str()
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+/=$:-".contains(c)),
            "{}",
            v1.as_str()
        );
    }
}
