//! The per-VM encryption policy and the negotiation decision (DESIGN.md §3).
//!
//! [`decide`] is a pure function of four inputs. The sender and the receiver each evaluate
//! it — the sender with the receiver's advertised capability from the `HelloAck`, the
//! receiver with its own — and the sender refuses unless both results are equal.
//!
//! | effective policy | destination can encrypt | result |
//! |---|---|---|
//! | disabled | any | plaintext (refused if the receiver requires encryption) |
//! | opportunistic | yes | encrypted |
//! | opportunistic | no | plaintext, with the reason (refused if the receiver requires encryption) |
//! | required | yes | encrypted |
//! | required | no | refused |
//!
//! "Can the destination encrypt" is the *authority's* answer (the key service's host
//! registry, or the orchestrator that handed the key in), never the wire's: if the
//! authority says yes and the handshake says no, that is a downgrade attack and the
//! migration is refused whatever the policy.

use std::fmt;

use crate::error::Refusal;

/// A VM's encryption policy, as written in its policy file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(u8)]
pub enum EncryptionPolicy {
    /// Always plaintext.
    Disabled = 1,
    /// Encrypted when the destination can encrypt, plaintext with a warning otherwise.
    /// The default, as in vSphere.
    #[default]
    Opportunistic = 2,
    /// Encrypted, or not at all.
    Required = 3,
}

impl EncryptionPolicy {
    /// Decodes a wire value (0 and unknown values are invalid).
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Disabled),
            2 => Some(Self::Opportunistic),
            3 => Some(Self::Required),
            _ => None,
        }
    }
}

/// The policy inputs of one VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VmPolicy {
    /// The `encryption` setting.
    pub encryption: EncryptionPolicy,
    /// The VM itself is encrypted (`encrypted = true`): its memory holds decrypted
    /// secrets, so it always migrates as [`EncryptionPolicy::Required`].
    pub vm_encrypted: bool,
}

impl VmPolicy {
    /// The policy negotiation uses: `encrypted = true` forces `Required`.
    pub fn effective(&self) -> EncryptionPolicy {
        if self.vm_encrypted {
            EncryptionPolicy::Required
        } else {
            self.encryption
        }
    }
}

/// What the trusted authority — the key service's host registry, or an orchestrator
/// that handed the key in — says about the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DestinationCapability {
    /// Registered, and it can encrypt.
    Encrypts = 1,
    /// Registered, and it cannot encrypt.
    DoesNotEncrypt = 2,
    /// Not registered (or the registration expired): treated as cannot encrypt.
    Unregistered = 3,
}

impl DestinationCapability {
    /// Decodes a wire value (0 and unknown values are invalid).
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Encrypts),
            2 => Some(Self::DoesNotEncrypt),
            3 => Some(Self::Unregistered),
            _ => None,
        }
    }
}

/// Why a migration goes in plaintext; carried into the migration report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PlaintextReason {
    /// The VM's policy disables encryption.
    PolicyDisabled = 1,
    /// Opportunistic policy, and the authority says the destination cannot encrypt.
    DestinationCannotEncrypt = 2,
    /// Opportunistic policy, and the destination is not registered with the authority.
    DestinationUnregistered = 3,
}

impl PlaintextReason {
    /// Decodes a wire value (0 and unknown values are invalid).
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::PolicyDisabled),
            2 => Some(Self::DestinationCannotEncrypt),
            3 => Some(Self::DestinationUnregistered),
            _ => None,
        }
    }

    /// Whether the operator should be warned (the policy asked for encryption if possible).
    pub fn is_downgrade(self) -> bool {
        !matches!(self, Self::PolicyDisabled)
    }
}

impl fmt::Display for PlaintextReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::PolicyDisabled => "the VM's policy disables encryption",
            Self::DestinationCannotEncrypt => {
                "the policy is opportunistic and the destination cannot encrypt"
            }
            Self::DestinationUnregistered => {
                "the policy is opportunistic and the destination is not registered with the key service"
            }
        })
    }
}

/// The inputs of [`decide`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecisionInputs {
    /// The VM's effective policy ([`VmPolicy::effective`]).
    pub policy: EncryptionPolicy,
    /// What the authority says about the destination.
    pub authority: DestinationCapability,
    /// What the destination says about itself in the handshake.
    pub wire_can_encrypt: bool,
    /// The receiving host requires encryption for everything it accepts.
    pub receiver_requires_encryption: bool,
}

/// The result of negotiation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Decision {
    /// Every frame after the handshake is sealed with AES-256-GCM.
    Encrypted,
    /// Frames carry a checksum only.
    Plaintext(PlaintextReason),
    /// The migration must not happen.
    Refused(Refusal),
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Encrypted => f.write_str("encrypted"),
            Self::Plaintext(r) => write!(f, "plaintext ({r})"),
            Self::Refused(r) => write!(f, "refused ({r})"),
        }
    }
}

/// The decision table of DESIGN.md §3, as a pure function.
pub fn decide(inputs: DecisionInputs) -> Decision {
    let DecisionInputs {
        policy,
        authority,
        wire_can_encrypt,
        receiver_requires_encryption,
    } = inputs;
    // The authority vouches for encryption and the wire denies it: someone is lying or
    // rewriting. Refuse whatever the policy, even `disabled`: the contradiction itself is
    // the alarm, and a stale registry entry deserves a loud failure too.
    if authority == DestinationCapability::Encrypts && !wire_can_encrypt {
        return Decision::Refused(Refusal::DowngradeDetected);
    }
    // The wire alone never upgrades the answer: without the authority's word there is no
    // key at the destination to encrypt with.
    let destination_encrypts = authority == DestinationCapability::Encrypts;
    let cannot = match authority {
        DestinationCapability::Unregistered => PlaintextReason::DestinationUnregistered,
        _ => PlaintextReason::DestinationCannotEncrypt,
    };
    let decision = match policy {
        EncryptionPolicy::Disabled => Decision::Plaintext(PlaintextReason::PolicyDisabled),
        EncryptionPolicy::Opportunistic if destination_encrypts => Decision::Encrypted,
        EncryptionPolicy::Opportunistic => Decision::Plaintext(cannot),
        EncryptionPolicy::Required if destination_encrypts => Decision::Encrypted,
        EncryptionPolicy::Required => Decision::Refused(Refusal::PolicyRequiresEncryption),
    };
    match decision {
        Decision::Plaintext(_) if receiver_requires_encryption => {
            Decision::Refused(Refusal::ReceiverRequiresEncryption)
        }
        d => d,
    }
}

/// The decision the sender can make before it connects: refuses a `Required` VM whose
/// destination the authority says cannot encrypt, so not a byte goes to the destination.
/// `None` means "connect and negotiate".
pub fn preflight(policy: EncryptionPolicy, authority: DestinationCapability) -> Option<Refusal> {
    (policy == EncryptionPolicy::Required && authority != DestinationCapability::Encrypts)
        .then_some(Refusal::PolicyRequiresEncryption)
}

#[cfg(test)]
mod tests {
    use super::*;
    use DestinationCapability::*;
    use EncryptionPolicy::*;

    /// Every combination of inputs, with the expected result written out by hand from
    /// DESIGN.md §3 (not computed by the function under test).
    #[test]
    fn decision_table_is_exhaustive() {
        use Decision::{Encrypted as E, Plaintext as P, Refused as R};
        use PlaintextReason::*;
        use Refusal::*;
        #[rustfmt::skip]
        let table: &[(EncryptionPolicy, DestinationCapability, bool, bool, Decision)] = &[
            // policy      authority       wire   rx-req  result
            (Disabled,      Encrypts,       true,  false, P(PolicyDisabled)),
            (Disabled,      Encrypts,       true,  true,  R(ReceiverRequiresEncryption)),
            (Disabled,      Encrypts,       false, false, R(DowngradeDetected)),
            (Disabled,      Encrypts,       false, true,  R(DowngradeDetected)),
            (Disabled,      DoesNotEncrypt, true,  false, P(PolicyDisabled)),
            (Disabled,      DoesNotEncrypt, true,  true,  R(ReceiverRequiresEncryption)),
            (Disabled,      DoesNotEncrypt, false, false, P(PolicyDisabled)),
            (Disabled,      DoesNotEncrypt, false, true,  R(ReceiverRequiresEncryption)),
            (Disabled,      Unregistered,   true,  false, P(PolicyDisabled)),
            (Disabled,      Unregistered,   true,  true,  R(ReceiverRequiresEncryption)),
            (Disabled,      Unregistered,   false, false, P(PolicyDisabled)),
            (Disabled,      Unregistered,   false, true,  R(ReceiverRequiresEncryption)),
            (Opportunistic, Encrypts,       true,  false, E),
            (Opportunistic, Encrypts,       true,  true,  E),
            (Opportunistic, Encrypts,       false, false, R(DowngradeDetected)),
            (Opportunistic, Encrypts,       false, true,  R(DowngradeDetected)),
            (Opportunistic, DoesNotEncrypt, true,  false, P(DestinationCannotEncrypt)),
            (Opportunistic, DoesNotEncrypt, true,  true,  R(ReceiverRequiresEncryption)),
            (Opportunistic, DoesNotEncrypt, false, false, P(DestinationCannotEncrypt)),
            (Opportunistic, DoesNotEncrypt, false, true,  R(ReceiverRequiresEncryption)),
            (Opportunistic, Unregistered,   true,  false, P(DestinationUnregistered)),
            (Opportunistic, Unregistered,   true,  true,  R(ReceiverRequiresEncryption)),
            (Opportunistic, Unregistered,   false, false, P(DestinationUnregistered)),
            (Opportunistic, Unregistered,   false, true,  R(ReceiverRequiresEncryption)),
            (Required,      Encrypts,       true,  false, E),
            (Required,      Encrypts,       true,  true,  E),
            (Required,      Encrypts,       false, false, R(DowngradeDetected)),
            (Required,      Encrypts,       false, true,  R(DowngradeDetected)),
            (Required,      DoesNotEncrypt, true,  false, R(PolicyRequiresEncryption)),
            (Required,      DoesNotEncrypt, true,  true,  R(PolicyRequiresEncryption)),
            (Required,      DoesNotEncrypt, false, false, R(PolicyRequiresEncryption)),
            (Required,      DoesNotEncrypt, false, true,  R(PolicyRequiresEncryption)),
            (Required,      Unregistered,   true,  false, R(PolicyRequiresEncryption)),
            (Required,      Unregistered,   true,  true,  R(PolicyRequiresEncryption)),
            (Required,      Unregistered,   false, false, R(PolicyRequiresEncryption)),
            (Required,      Unregistered,   false, true,  R(PolicyRequiresEncryption)),
        ];
        assert_eq!(table.len(), 3 * 3 * 2 * 2, "the table covers every input");
        for &(policy, authority, wire_can_encrypt, receiver_requires_encryption, expected) in table
        {
            let inputs = DecisionInputs {
                policy,
                authority,
                wire_can_encrypt,
                receiver_requires_encryption,
            };
            assert_eq!(decide(inputs), expected, "{inputs:?}");
        }
    }

    #[test]
    fn encrypted_vm_is_always_required() {
        for encryption in [Disabled, Opportunistic, Required] {
            let p = VmPolicy {
                encryption,
                vm_encrypted: true,
            };
            assert_eq!(p.effective(), Required);
            let p = VmPolicy {
                encryption,
                vm_encrypted: false,
            };
            assert_eq!(p.effective(), encryption);
        }
        assert_eq!(VmPolicy::default().effective(), Opportunistic);
    }

    #[test]
    fn preflight_refuses_required_without_an_encrypting_destination() {
        assert_eq!(
            preflight(Required, DoesNotEncrypt),
            Some(Refusal::PolicyRequiresEncryption)
        );
        assert_eq!(
            preflight(Required, Unregistered),
            Some(Refusal::PolicyRequiresEncryption)
        );
        assert_eq!(preflight(Required, Encrypts), None);
        assert_eq!(preflight(Opportunistic, Unregistered), None);
        assert_eq!(preflight(Disabled, DoesNotEncrypt), None);
    }
}
