//! What a new device description changes against the one in force, and which of it can be
//! applied to a running device.
//!
//! Live: namespaces added to or removed from subsystems that exist in both descriptions
//! (hosts learn of them through the Namespace Attribute Changed event and the Changed
//! Namespace List), and subsystems that emulated functions export, added or removed with their
//! functions (a hot plug: [`ConfigDiff::subsystems_added`], [`ConfigDiff::subsystems_removed`];
//! which function exports which subsystem is the firmware's to compare, slot by slot).
//! Everything else (network, management, other subsystems added, removed or with other
//! attributes, a namespace whose backend or encryption changes) takes effect at the next boot
//! and is listed in [`ConfigDiff::needs_reboot`].

use crate::model::{Device, Namespace};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

/// The difference between two descriptions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigDiff {
    /// Indices (into the new description's namespaces) of namespaces to add live.
    pub added: Vec<usize>,
    /// Namespaces to remove live, as (subsystem NQN, NSID).
    pub removed: Vec<(String, u32)>,
    /// Indices (into the new description's namespaces) of namespaces present in both with
    /// the same backend, encryption and function: kept as they run.
    pub kept: Vec<usize>,
    /// Changes that take effect at the next boot, for the operator.
    pub needs_reboot: Vec<String>,
    /// Subsystems new in the description that an emulated function exports (with all their
    /// namespaces): created live with their function.
    pub subsystems_added: Vec<String>,
    /// Subsystems gone from the description that an emulated function exported: removed live
    /// with their function.
    pub subsystems_removed: Vec<String>,
}

/// The same namespace, as far as its data goes: which function exports its subsystem is a
/// change of the function, not of the namespace.
fn same_namespace(a: &Namespace, b: &Namespace) -> bool {
    a.backend == b.backend && a.encryption == b.encryption
}

/// Compares the description in force (`old`) with a new one.
pub fn diff(old: &Device, new: &Device) -> ConfigDiff {
    let mut d = ConfigDiff::default();
    if old.network != new.network {
        d.needs_reboot
            .push(String::from("network settings changed"));
    }
    if old.management != new.management {
        d.needs_reboot
            .push(String::from("management port or key changed"));
    }
    for s in &new.subsystems {
        match old.subsystems.iter().find(|o| o.nqn == s.nqn) {
            None if new.has_function(&s.nqn) => d.subsystems_added.push(s.nqn.clone()),
            None => d
                .needs_reboot
                .push(format!("subsystem {} added (with its namespaces)", s.nqn)),
            Some(o) if o != s => d.needs_reboot.push(format!(
                "subsystem {}: serial, model or allowed hosts changed",
                s.nqn
            )),
            Some(_) => {}
        }
    }
    for o in &old.subsystems {
        if new.subsystems.iter().any(|s| s.nqn == o.nqn) {
            continue;
        }
        if old.has_function(&o.nqn) {
            d.subsystems_removed.push(o.nqn.clone());
        } else {
            d.needs_reboot
                .push(format!("subsystem {} removed (with its namespaces)", o.nqn));
        }
    }
    let live = |nqn: &str| {
        old.subsystems.iter().any(|s| s.nqn == nqn) && new.subsystems.iter().any(|s| s.nqn == nqn)
    };
    for (i, n) in new.namespaces.iter().enumerate() {
        let before = old
            .namespaces
            .iter()
            .find(|o| o.subsystem == n.subsystem && o.nsid == n.nsid);
        match before {
            Some(o) if same_namespace(o, n) => d.kept.push(i),
            Some(_) => d.needs_reboot.push(format!(
                "namespace {} of {}: backend or encryption changed",
                n.nsid, n.subsystem
            )),
            None if live(&n.subsystem) => d.added.push(i),
            None => {}
        }
    }
    for o in &old.namespaces {
        let still = new
            .namespaces
            .iter()
            .any(|n| n.subsystem == o.subsystem && n.nsid == o.nsid);
        if !still && live(&o.subsystem) {
            d.removed.push((o.subsystem.clone(), o.nsid));
        }
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Backend, Encryption, Management, Network, Subsystem};
    use alloc::vec;

    fn sub(nqn: &str) -> Subsystem {
        Subsystem {
            nqn: nqn.into(),
            serial: None,
            model: None,
            allowed_hosts: vec![],
        }
    }

    fn ram(nqn: &str, nsid: u32, mib: u64) -> Namespace {
        Namespace {
            subsystem: nqn.into(),
            nsid,
            backend: Backend::Ram {
                size: mib << 20,
                block_size: 512,
            },
            encryption: Encryption::None,
            function: None,
        }
    }

    const A: &str = "nqn.2026-11.dev.keel:a";
    const B: &str = "nqn.2026-11.dev.keel:b";

    fn base() -> Device {
        Device {
            network: Network::Dhcp,
            subsystems: vec![sub(A)],
            namespaces: vec![ram(A, 1, 8), ram(A, 2, 8)],
            management: None,
            qos: Default::default(),
            nguids: Vec::new(),
        }
    }

    #[test]
    fn identical_descriptions_change_nothing() {
        let d = diff(&base(), &base());
        assert_eq!(d.kept, vec![0, 1]);
        assert!(d.added.is_empty() && d.removed.is_empty() && d.needs_reboot.is_empty());
    }

    #[test]
    fn namespaces_added_and_removed_live() {
        let mut new = base();
        new.namespaces.remove(0);
        new.namespaces.push(ram(A, 3, 16));
        let d = diff(&base(), &new);
        assert_eq!(d.added, vec![1]);
        assert_eq!(d.removed, vec![(String::from(A), 1)]);
        assert_eq!(d.kept, vec![0]);
        assert!(d.needs_reboot.is_empty(), "{:?}", d.needs_reboot);
    }

    #[test]
    fn what_cannot_change_live_needs_a_reboot() {
        let mut new = base();
        new.network = Network::Static {
            address: [10, 0, 2, 15],
            prefix_len: 24,
            gateway: None,
        };
        new.management = Some(Management {
            port: 7000,
            authorized_key: [1; 32],
        });
        new.subsystems.push(sub(B));
        new.namespaces.push(ram(B, 1, 8));
        new.namespaces[0].encryption = Encryption::Aes256Xts;
        new.namespaces[1].backend = Backend::Ram {
            size: 16 << 20,
            block_size: 512,
        };
        new.subsystems[0].allowed_hosts = vec!["nqn.2026-11.dev.keel:host".into()];
        let d = diff(&base(), &new);
        assert!(
            d.added.is_empty() && d.removed.is_empty() && d.kept.is_empty(),
            "{d:?}"
        );
        let text = d.needs_reboot.join("\n");
        for want in [
            "network",
            "management",
            "subsystem nqn.2026-11.dev.keel:b added",
            "subsystem nqn.2026-11.dev.keel:a: serial",
            "namespace 1 of nqn.2026-11.dev.keel:a: backend",
            "namespace 2 of nqn.2026-11.dev.keel:a: backend",
        ] {
            assert!(text.contains(want), "{want} missing in {text}");
        }
    }

    #[test]
    fn subsystems_of_functions_come_and_go_live() {
        let mut fns = base();
        fns.subsystems.push(sub(B));
        fns.namespaces.push(Namespace {
            function: Some(1),
            ..ram(B, 1, 8)
        });
        fns.namespaces.push(ram(B, 2, 8));
        let d = diff(&base(), &fns);
        assert_eq!(d.subsystems_added, vec![String::from(B)]);
        assert!(d.added.is_empty() && d.needs_reboot.is_empty(), "{d:?}");
        let d = diff(&fns, &base());
        assert_eq!(d.subsystems_removed, vec![String::from(B)]);
        assert!(d.removed.is_empty() && d.needs_reboot.is_empty(), "{d:?}");
        // Moving the export to another slot keeps the namespaces: the firmware compares the
        // slots.
        let mut moved = fns.clone();
        moved.namespaces[2].function = Some(2);
        let d = diff(&fns, &moved);
        assert_eq!(d.kept, vec![0, 1, 2, 3]);
        assert!(d.needs_reboot.is_empty(), "{d:?}");
    }

    #[test]
    fn a_removed_subsystem_takes_its_namespaces_at_the_next_boot() {
        let mut old = base();
        old.subsystems.push(sub(B));
        old.namespaces.push(ram(B, 1, 8));
        let d = diff(&old, &base());
        assert!(d.removed.is_empty());
        assert!(
            d.needs_reboot
                .iter()
                .any(|m| m.contains("subsystem nqn.2026-11.dev.keel:b removed"))
        );
    }

    #[test]
    fn remote_namespaces_are_added_live_and_their_settings_need_a_reboot() {
        use crate::model::Remote;
        let remote = |depth: u16| Namespace {
            backend: Backend::Remote {
                remote: Remote {
                    depth,
                    ..Remote::new("nqn.2026-11.dev.keel:pool", vec![([10, 0, 2, 2], 4420)], 1)
                },
                offset: 0,
                length: None,
            },
            ..ram(A, 3, 8)
        };
        let mut new = base();
        new.namespaces.push(remote(128));
        let d = diff(&base(), &new);
        assert_eq!(d.added, vec![2]);
        assert!(d.needs_reboot.is_empty());
        let mut newer = new.clone();
        newer.namespaces[2] = remote(64);
        let d = diff(&new, &newer);
        assert!(d.added.is_empty() && d.kept == vec![0, 1], "{d:?}");
        assert!(d.needs_reboot[0].contains("namespace 3 of nqn.2026-11.dev.keel:a: backend"));
    }
}
