//! When to notify a virtio device of new available buffers (split virtqueue with
//! `VIRTIO_F_RING_EVENT_IDX`, virtio 1.2 §2.7.10), and how to get a device going again when a
//! notification was lost. Portable: the virtio-net driver reads the ring indices and writes the
//! notification register; this module only decides (tested on the host).
//!
//! The event-index protocol is a store-buffering handshake. The driver publishes the avail
//! index, then reads the device's `avail_event`; the device, when it runs out of buffers,
//! publishes `avail_event` (= the next entry it wants), then re-reads the avail index. With a
//! full barrier on both sides one of them sees the other's store. Without one on the driver's
//! side, both can read the old value: the driver sees an old `avail_event` and does not notify,
//! the device sees no new buffer and waits for a notification. From then on the device's
//! `avail_event` lies before every later batch, so the rule never asks for a notification
//! again: the queue is stuck for good. QEMU 7.2's TCG drops the guest's `dmb` when it runs a
//! single vCPU (`-smp 1`), while the device model runs in another host thread, so this happens
//! in QEMU under load: the receive queue was found with all 256 buffers published, the device
//! parked at `avail_event == used_idx == last_avail_idx`, and no notification ever sent
//! (`keelctl nvme bench`, two hosts × 8 queues × QD128).
//!
//! [`Notifier::rescue`] detects that state from the ring alone and notifies once: the device
//! returned every buffer before `avail_event` (`used_idx == avail_event`), buffers after it are
//! published, and the same was seen at the previous check too (a full poll pass without
//! progress), so a device that is merely between two frames is not notified on every pass.

/// `vring_need_event` (§2.7.10): with `VIRTIO_F_EVENT_IDX`, notify when the device's
/// `avail_event` is one of the entries added since the last notification, `[old, new)`.
pub const fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// Notification bookkeeping of one virtqueue.
#[derive(Clone, Copy, Debug, Default)]
pub struct Notifier {
    /// Buffers added (mirrors the avail ring's index: one entry per add).
    added: u16,
    /// `added` when the device was last notified (or the rule decided it need not be).
    announced: u16,
    /// `avail_event` of the device seen parked at the last [`Notifier::rescue`] check.
    parked_at: Option<u16>,
    /// `avail_event` the last rescue notified for (one notification per parking).
    rescued_at: Option<u16>,
}

impl Notifier {
    /// One more buffer is on the avail ring (its index is published).
    pub fn added(&mut self) {
        self.added = self.added.wrapping_add(1);
    }

    /// Buffers added since the last [`Notifier::kick`].
    pub fn unannounced(&self) -> u16 {
        self.added.wrapping_sub(self.announced)
    }

    /// Whether the buffers added since the last call must be announced, given the device's
    /// `avail_event` read after publishing them (the caller fences between the two). `None`
    /// when nothing was added since.
    pub fn kick(&mut self, avail_event: u16) -> Option<bool> {
        if self.added == self.announced {
            return None;
        }
        let notify = need_event(avail_event, self.added, self.announced);
        self.announced = self.added;
        Some(notify)
    }

    /// Whether the device waits for a notification it will not get (see the module docs),
    /// given its `avail_event` and `used_idx` read now. True at most once per parking, and
    /// only when the previous check saw the same parking.
    pub fn rescue(&mut self, avail_event: u16, used_idx: u16) -> bool {
        let published = self.added.wrapping_sub(avail_event);
        // Parked: everything before `avail_event` returned, something after it published
        // (and announced: unannounced buffers go through `kick`).
        let parked = used_idx == avail_event && published != 0 && self.added == self.announced;
        if !parked {
            self.parked_at = None;
            return false;
        }
        let again = self.parked_at == Some(avail_event);
        self.parked_at = Some(avail_event);
        if !again || self.rescued_at == Some(avail_event) {
            return false;
        }
        self.rescued_at = Some(avail_event);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A split virtqueue's device side as QEMU's virtio-net implements it with EVENT_IDX
    /// (hw/virtio/virtio.c `virtqueue_pop`, `virtio_queue_set_notification`; hw/net/virtio-net.c
    /// `virtio_net_has_buffers`): it consumes what it has seen of the avail index and, when
    /// it runs out, publishes `avail_event` and waits for a notification.
    #[derive(Default)]
    struct Device {
        /// The avail index as the device last read it.
        shadow_avail: u16,
        last_avail: u16,
        used: u16,
        avail_event: u16,
        /// Out of buffers, waiting for a notification.
        waiting: bool,
    }

    impl Device {
        /// Takes one buffer if it sees one (`avail` is the index visible to it now); else
        /// parks: publishes `avail_event`, and (after its barrier) re-reads `avail_again`.
        fn take(&mut self, avail: u16, avail_again: u16) -> bool {
            self.shadow_avail = avail;
            if self.shadow_avail == self.last_avail {
                self.avail_event = self.shadow_avail;
                self.shadow_avail = avail_again;
                if self.shadow_avail == self.last_avail {
                    self.waiting = true;
                    return false;
                }
            }
            self.last_avail = self.last_avail.wrapping_add(1);
            self.used = self.used.wrapping_add(1);
            self.avail_event = self.last_avail;
            true
        }

        fn notified(&mut self) {
            self.waiting = false;
        }
    }

    #[test]
    fn need_event_is_the_window_of_entries_added_since_the_last_notification() {
        // vring_need_event from include/uapi/linux/virtio_ring.h: (new - event - 1) < (new - old).
        assert!(need_event(5, 6, 5));
        assert!(need_event(5, 10, 3));
        assert!(!need_event(5, 5, 3));
        assert!(!need_event(2, 10, 3));
        assert!(need_event(0xffff, 2, 0xfffe));
        assert!(!need_event(0xfffd, 2, 0xfffe));
    }

    #[test]
    fn a_notification_lost_to_a_stale_avail_event_is_sent_on_the_second_quiet_check() {
        let mut n = Notifier::default();
        let mut dev = Device::default();
        // Four buffers posted and announced at start.
        for _ in 0..4 {
            n.added();
        }
        assert_eq!(n.kick(dev.avail_event), Some(true));
        // The device consumes all four.
        for _ in 0..4 {
            assert!(dev.take(4, 4));
        }
        // The race: the device finds no fifth buffer (index 4 visible), publishes
        // avail_event 4 and, re-reading, still sees 4; the driver published index 5 but read
        // avail_event before the device's store reached it (it still reads 0..=3).
        assert!(!dev.take(4, 4));
        assert!(dev.waiting);
        n.added();
        let stale = 3;
        assert_eq!(n.kick(stale), Some(false), "the event rule alone misses it");
        // More buffers come back and are re-posted: the rule never fires again, because the
        // device's avail_event (4) now lies before every later batch.
        for _ in 0..3 {
            n.added();
            assert_eq!(n.kick(dev.avail_event), Some(false));
        }
        assert_eq!(dev.used, 4);
        // The poll loop's per-pass check: parked at 4 with 4 buffers published after it.
        // First sighting: could be a device between two frames; no notification yet.
        assert!(!n.rescue(dev.avail_event, dev.used));
        // Still parked at the next pass: notify once.
        assert!(n.rescue(dev.avail_event, dev.used));
        dev.notified();
        // The device takes the buffers it had not seen.
        for _ in 0..4 {
            assert!(dev.take(8, 8));
        }
        assert_eq!(dev.used, 8);
        assert!(!dev.waiting);
    }

    #[test]
    fn a_device_that_keeps_up_is_never_rescued() {
        let mut n = Notifier::default();
        let mut dev = Device::default();
        let mut notified = 0;
        for _ in 0..8 {
            n.added();
        }
        assert_eq!(n.kick(dev.avail_event), Some(true));
        let mut avail = 8u16;
        for round in 0..1000u32 {
            // The device takes one buffer per round (a frame arrived); the driver re-posts it.
            assert!(dev.take(avail, avail));
            n.added();
            avail = avail.wrapping_add(1);
            if n.kick(dev.avail_event) == Some(true) {
                notified += 1;
            }
            // Between frames the device has taken everything before avail_event but is
            // still ahead of nothing: used == avail_event happens on every round.
            if n.rescue(dev.avail_event, dev.used) {
                panic!("rescued a device that made progress (round {round})");
            }
        }
        assert_eq!(notified, 0, "the device never ran out");
    }

    #[test]
    fn a_quiet_queue_is_notified_at_most_once_per_parking() {
        let mut n = Notifier::default();
        for _ in 0..4 {
            n.added();
        }
        assert_eq!(n.kick(0), Some(true));
        // Idle: the device took two frames and is waiting at 2 with two buffers left (a
        // device with buffers does not actually wait, but the driver cannot tell). Many
        // quiet passes cost one notification.
        let rescues = (0..100).filter(|_| n.rescue(2, 2)).count();
        assert_eq!(rescues, 1);
        // Nothing published after avail_event: not parked (the device just has no buffers).
        let mut m = Notifier::default();
        for _ in 0..2 {
            m.added();
        }
        assert_eq!(m.kick(0), Some(true));
        assert!((0..10).all(|_| !m.rescue(2, 2)));
        // Unannounced buffers: `kick` decides, not `rescue`.
        m.added();
        assert!((0..10).all(|_| !m.rescue(2, 2)));
        assert_eq!(m.unannounced(), 1);
    }
}
