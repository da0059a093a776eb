//! Management challenges.
//!
//! A management challenge must never repeat, on this boot or any other, or a request signed
//! for one challenge could be replayed against another connection. Each challenge is
//! `SHA-256("keel/v1/challenge" ‖ boot secret ‖ challenge counter ‖ CNTPCT ‖ 4 × RNDR)`:
//! - RNDR (FEAT_RNG, ID_AA64ISAR0_EL1.RNDR ≥ 1; QEMU `-cpu max` has it) gives 256 fresh
//!   random bits per challenge: with it, repeats are as likely as a SHA-256 collision;
//! - the counter increases with every challenge handed out (every connection gets new ones),
//!   so two challenges of one boot always differ, whatever the RNG does;
//! - the boot secret (`SHA-256` of the device key, the counter at boot and RNDR output)
//!   separates devices and boots.
//!
//! Without RNDR (and without a persistent boot counter, which this firmware does not keep)
//! uniqueness across boots rests on the generic counter's value at boot and at each
//! challenge, which a deterministic boot can repeat: the firmware warns at boot when RNDR is
//! missing. Mixing through SHA-256 means a weak or failing source can only add, never remove,
//! unpredictability.

use crate::hw::Hw;
use crate::klog;
use core::marker::PhantomData;
use keel_provision::DeviceKey;
use sha2::{Digest, Sha256};

/// Source of management challenges (see the module documentation); `H` supplies the counter and the random number instruction.
pub struct Challenges<H: Hw> {
    boot_secret: [u8; 32],
    counter: u64,
    hw: PhantomData<H>,
}

impl<H: Hw> core::fmt::Debug for Challenges<H> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Challenges")
            .field("counter", &self.counter)
            .finish_non_exhaustive()
    }
}

fn mix_rndr<H: Hw>(h: &mut Sha256) -> bool {
    let mut all = true;
    for _ in 0..4 {
        match H::random() {
            Some(r) => h.update(r.to_le_bytes()),
            None => all = false,
        }
    }
    all
}

impl<H: Hw> Challenges<H> {
    /// Draws the boot secret.
    pub fn new(device_key: Option<&DeviceKey>) -> Self {
        let mut h = Sha256::new();
        h.update(b"keel/v1/boot-secret");
        if let Some(k) = device_key {
            h.update(k.expose_secret());
        }
        h.update(H::counter().to_le_bytes());
        if !mix_rndr::<H>(&mut h) {
            klog::warning!(
                "mgmt: no RNDR (FEAT_RNG): management challenges rely on the counter and the \
                 device key only and may repeat across boots"
            );
        }
        let mut boot_secret = [0u8; 32];
        boot_secret.copy_from_slice(&h.finalize());
        Self {
            boot_secret,
            counter: 0,
            hw: PhantomData,
        }
    }

    /// The next challenge.
    pub fn next(&mut self) -> [u8; 32] {
        self.draw(b"keel/v1/challenge")
    }

    /// 32 secret random bytes for `purpose` (a data key, an NGUID), drawn like a challenge
    /// under another label: challenges, which go out on the wire, say nothing about them.
    pub fn secret(&mut self, purpose: &[u8]) -> [u8; 32] {
        self.draw(purpose)
    }

    fn draw(&mut self, label: &[u8]) -> [u8; 32] {
        self.counter = self.counter.wrapping_add(1);
        let mut h = Sha256::new();
        h.update(label);
        h.update(self.boot_secret);
        h.update(self.counter.to_le_bytes());
        h.update(H::counter().to_le_bytes());
        mix_rndr::<H>(&mut h);
        let mut out = [0u8; 32];
        out.copy_from_slice(&h.finalize());
        out
    }
}
