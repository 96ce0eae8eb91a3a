//! Event sources: Poll (claim rows in `seq` order under an advisory lock) and Logical (pgoutput slot); both hand batches to the publisher (I/O in the submodules).

pub mod logical;
pub mod pgoutput;
pub mod poll;
pub mod replication;
