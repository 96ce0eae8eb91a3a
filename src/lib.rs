//! servicedb-operator: database-per-service for Kubernetes (the library behind the `servicedb` binary).

pub mod api;
pub mod cdc;
pub mod http;
pub mod metrics;
pub mod operator;
pub mod postgres;
pub mod relay;
pub mod specs;
pub mod telemetry;
