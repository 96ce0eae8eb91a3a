//! Pure builders: validated spec in, desired Kubernetes objects out (no I/O).

pub mod bootstrap;
pub mod credentials;
pub mod instance;
pub mod labels;
pub mod pod;
pub mod relay;
pub mod tls;
