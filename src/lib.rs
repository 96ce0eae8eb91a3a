//! servicedb-operator: database-per-service for Kubernetes (library side of the `servicedb` binary).
