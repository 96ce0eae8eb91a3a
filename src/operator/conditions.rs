//! Standard `metav1.Condition` bookkeeping: set by type, transition time only on a flip (pure).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

/// A condition the controller wants, before times are resolved against the current status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Desired {
    /// Condition type (`Ready`, `DatabaseReady`, ...).
    pub type_: &'static str,
    /// `True` (`Some(true)`), `False` (`Some(false)`) or `Unknown` (`None`).
    pub status: Option<bool>,
    /// CamelCase reason.
    pub reason: String,
    /// Human readable message.
    pub message: String,
}

impl Desired {
    /// A condition with status `True`.
    pub fn ok(type_: &'static str, reason: impl Into<String>, message: impl Into<String>) -> Self {
        Desired {
            type_,
            status: Some(true),
            reason: reason.into(),
            message: message.into(),
        }
    }
    /// A condition with status `False`.
    pub fn fail(
        type_: &'static str,
        reason: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Desired {
            type_,
            status: Some(false),
            reason: reason.into(),
            message: message.into(),
        }
    }
}

impl Desired {
    /// A condition with status `Unknown` (the controller cannot tell, e.g. a peer is down).
    pub fn unknown(
        type_: &'static str,
        reason: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Desired {
            type_,
            status: None,
            reason: reason.into(),
            message: message.into(),
        }
    }
}

/// Merge `desired` into `current`: a condition whose status did not change keeps its
/// `lastTransitionTime`, so a no-op reconcile produces an identical status and writes nothing.
/// Conditions not in `desired` are dropped; the result is ordered as `desired`.
pub fn merge(
    current: &[Condition],
    desired: &[Desired],
    generation: Option<i64>,
    now: Timestamp,
) -> Vec<Condition> {
    desired
        .iter()
        .map(|d| {
            let status = match d.status {
                Some(true) => "True",
                Some(false) => "False",
                None => "Unknown",
            }
            .to_owned();
            let previous = current.iter().find(|c| c.type_ == d.type_);
            let last_transition_time = match previous {
                Some(p) if p.status == status => p.last_transition_time.clone(),
                _ => Time(now),
            };
            Condition {
                type_: d.type_.to_owned(),
                status,
                reason: d.reason.clone(),
                message: d.message.clone(),
                observed_generation: generation,
                last_transition_time,
            }
        })
        .collect()
}

/// Whether the condition `type_` is `True` in `conditions`.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    conditions
        .iter()
        .any(|c| c.type_ == type_ && c.status == "True")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unchanged_status_keeps_the_transition_time_and_a_flip_moves_it() {
        let t0 = Timestamp::from_second(1_000).expect("ts");
        let t1 = Timestamp::from_second(2_000).expect("ts");
        let first = merge(
            &[],
            &[Desired::ok("Ready", "Provisioned", "ok")],
            Some(1),
            t0,
        );
        let again = merge(
            &first,
            &[Desired::ok("Ready", "Provisioned", "ok")],
            Some(1),
            t1,
        );
        assert_eq!(first, again);
        let flipped = merge(
            &again,
            &[Desired::fail("Ready", "Unreachable", "down")],
            Some(1),
            t1,
        );
        assert_eq!(flipped[0].last_transition_time, Time(t1));
        assert_eq!(flipped[0].status, "False");
    }
}
