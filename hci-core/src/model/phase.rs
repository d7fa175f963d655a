//! Lifecycle phases of VMs and volumes as explicit state machines.
//!
//! Controllers move a resource's `status.phase` only through
//! [`VmPhase::transition`] / [`VolumePhase::transition`], which refuse moves
//! the lifecycle does not allow (a deleted VM cannot start, an attached volume
//! cannot be deleted). Staying in the same phase is always allowed, so
//! reconcilers can be idempotent.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A refused phase change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} cannot go from {from} to {to}")]
pub struct InvalidTransition {
    /// `VirtualMachine` or `Volume`.
    pub kind: &'static str,
    /// Current phase.
    pub from: String,
    /// Requested phase.
    pub to: String,
}

macro_rules! phases {
    (
        $(#[$meta:meta])* $name:ident, $kind:literal, default $default:ident;
        $( $(#[$vmeta:meta])* $variant:ident => [$($to:ident),*] ),* $(,)?
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )*
        }

        impl $name {
            /// Every phase.
            pub const ALL: &'static [$name] = &[$($name::$variant),*];

            /// The phases reachable in one step from `self` (not counting `self`).
            pub fn successors(self) -> &'static [$name] {
                match self {
                    $( $name::$variant => &[$($name::$to),*], )*
                }
            }

            /// True if moving from `self` to `to` is allowed.
            pub fn can_transition_to(self, to: $name) -> bool {
                self == to || self.successors().contains(&to)
            }

            /// Moves to `to`, or explains why the lifecycle forbids it.
            pub fn transition(self, to: $name) -> Result<$name, InvalidTransition> {
                if self.can_transition_to(to) {
                    Ok(to)
                } else {
                    Err(InvalidTransition { kind: $kind, from: self.to_string(), to: to.to_string() })
                }
            }
        }

        impl Default for $name {
            fn default() -> Self { $name::$default }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(self, f)
            }
        }
    };
}

phases! {
    /// Where a virtual machine is in its life.
    VmPhase, "VirtualMachine", default Pending;
    /// Accepted, waiting to be scheduled (or to be started, for Manual/Halted).
    Pending => [Scheduling, Stopped, Failed, Deleting],
    /// Looking for a node with room.
    Scheduling => [Pending, Starting, Failed, Deleting],
    /// Placed on a node; the VMM is starting.
    Starting => [Running, Stopping, Failed, Deleting],
    /// The guest runs.
    Running => [Paused, Migrating, Stopping, Stopped, Failed, Deleting],
    /// vCPUs are paused; memory is kept.
    Paused => [Running, Stopping, Failed, Deleting],
    /// Moving to another node while running.
    Migrating => [Running, Failed, Deleting],
    /// Shutting down.
    Stopping => [Stopped, Failed, Deleting],
    /// Not running (by request or after a guest shutdown).
    Stopped => [Pending, Deleting],
    /// Crashed or could not start; a run strategy may restart it.
    Failed => [Pending, Stopped, Deleting],
    /// Being deleted: a final phase.
    Deleting => [],
}

phases! {
    /// Where a volume is in its life.
    VolumePhase, "Volume", default Pending;
    /// Accepted, not yet created.
    Pending => [Creating, Failed, Deleting],
    /// Replicas are being created or filled from a source.
    Creating => [Detached, Failed, Deleting],
    /// Healthy and not in use by a VM.
    Detached => [Attached, Expanding, Degraded, Failed, Deleting],
    /// In use by a VM.
    Attached => [Detached, Expanding, Degraded, Failed],
    /// Fewer healthy replicas than requested; still serving I/O.
    Degraded => [Rebuilding, Attached, Detached, Failed, Deleting],
    /// A replica is being rebuilt while I/O continues.
    Rebuilding => [Attached, Detached, Degraded, Failed],
    /// Growing.
    Expanding => [Attached, Detached, Failed],
    /// No healthy replica: data unavailable until one recovers.
    Failed => [Rebuilding, Detached, Deleting],
    /// Being deleted: a final phase.
    Deleting => [],
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every (from, to) pair is checked against a table written out by hand, so a
    /// change to the lifecycle has to be made in two places on purpose.
    #[test]
    fn vm_transitions_exhaustively() {
        use VmPhase::*;
        let allowed: &[(VmPhase, &[VmPhase])] = &[
            (Pending, &[Scheduling, Stopped, Failed, Deleting]),
            (Scheduling, &[Pending, Starting, Failed, Deleting]),
            (Starting, &[Running, Stopping, Failed, Deleting]),
            (
                Running,
                &[Paused, Migrating, Stopping, Stopped, Failed, Deleting],
            ),
            (Paused, &[Running, Stopping, Failed, Deleting]),
            (Migrating, &[Running, Failed, Deleting]),
            (Stopping, &[Stopped, Failed, Deleting]),
            (Stopped, &[Pending, Deleting]),
            (Failed, &[Pending, Stopped, Deleting]),
            (Deleting, &[]),
        ];
        assert_eq!(allowed.len(), VmPhase::ALL.len());
        let mut checked = 0;
        for &(from, tos) in allowed {
            for &to in VmPhase::ALL {
                let want = from == to || tos.contains(&to);
                assert_eq!(from.can_transition_to(to), want, "{from} -> {to}");
                assert_eq!(from.transition(to).is_ok(), want, "{from} -> {to}");
                checked += 1;
            }
        }
        assert_eq!(checked, 100);
        let e = Deleting.transition(Running).expect_err("deleting is final");
        assert_eq!(
            e.to_string(),
            "VirtualMachine cannot go from Deleting to Running"
        );
    }

    #[test]
    fn volume_transitions_exhaustively() {
        use VolumePhase::*;
        let allowed: &[(VolumePhase, &[VolumePhase])] = &[
            (Pending, &[Creating, Failed, Deleting]),
            (Creating, &[Detached, Failed, Deleting]),
            (Detached, &[Attached, Expanding, Degraded, Failed, Deleting]),
            (Attached, &[Detached, Expanding, Degraded, Failed]),
            (
                Degraded,
                &[Rebuilding, Attached, Detached, Failed, Deleting],
            ),
            (Rebuilding, &[Attached, Detached, Degraded, Failed]),
            (Expanding, &[Attached, Detached, Failed]),
            (Failed, &[Rebuilding, Detached, Deleting]),
            (Deleting, &[]),
        ];
        assert_eq!(allowed.len(), VolumePhase::ALL.len());
        for &(from, tos) in allowed {
            for &to in VolumePhase::ALL {
                let want = from == to || tos.contains(&to);
                assert_eq!(from.transition(to).is_ok(), want, "{from} -> {to}");
            }
        }
        assert!(
            Attached.transition(Deleting).is_err(),
            "an attached volume must detach first"
        );
    }

    /// Phases reachable from `from` in any number of steps (including `from`).
    fn reachable<P: Copy + Eq + std::hash::Hash>(from: P, next: impl Fn(P) -> Vec<P>) -> Vec<P> {
        let mut seen = vec![from];
        let mut i = 0;
        while i < seen.len() {
            for p in next(seen[i]) {
                if !seen.contains(&p) {
                    seen.push(p);
                }
            }
            i += 1;
        }
        seen
    }

    /// The lifecycles have no dead ends: every phase can be reached from the
    /// initial one, every phase can reach `Deleting`, and `Deleting` is final.
    #[test]
    fn lifecycles_are_connected_and_end_in_deleting() {
        let vm = |p: VmPhase| p.successors().to_vec();
        assert_eq!(reachable(VmPhase::default(), vm).len(), VmPhase::ALL.len());
        for &p in VmPhase::ALL {
            assert!(reachable(p, vm).contains(&VmPhase::Deleting), "{p}");
            assert!(!p.successors().contains(&p), "{p} lists itself");
        }
        assert_eq!(reachable(VmPhase::Deleting, vm), [VmPhase::Deleting]);

        let vol = |p: VolumePhase| p.successors().to_vec();
        assert_eq!(
            reachable(VolumePhase::default(), vol).len(),
            VolumePhase::ALL.len()
        );
        for &p in VolumePhase::ALL {
            assert!(reachable(p, vol).contains(&VolumePhase::Deleting), "{p}");
            assert!(!p.successors().contains(&p), "{p} lists itself");
        }
        assert_eq!(
            reachable(VolumePhase::Deleting, vol),
            [VolumePhase::Deleting]
        );
    }

    #[test]
    fn phases_serialize_as_words() {
        assert_eq!(
            serde_json::to_string(&VmPhase::Running).expect("ser"),
            "\"Running\""
        );
        assert_eq!(VmPhase::default(), VmPhase::Pending);
        for &p in VolumePhase::ALL {
            let json = serde_json::to_string(&p).expect("ser");
            assert_eq!(json, format!("\"{p}\""));
            assert_eq!(serde_json::from_str::<VolumePhase>(&json).expect("de"), p);
        }
        assert!(serde_json::from_str::<VmPhase>("\"running\"").is_err());
    }
}
