//! servicedb-operator: database-per-service for Kubernetes (the library behind the `servicedb` binary).

pub mod api;
pub mod postgres;
