//! Quality of service in a device description (issue 16): limits and weights per namespace,
//! per group of namespaces (a tenant's pool), per host and per emulated function.
//!
//! A bundle carries this as a trailing section after the body of earlier formats
//! ([`crate::bundle`]): bundles made before QoS existed have no such section and open with
//! [`Qos::default`] (no limit, every weight 1).

use crate::model::{Device, ValidationError, check_nqn};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use serde::{Deserialize, Serialize};

/// A rate limit: `per_sec` operations or bytes per second, with a burst allowance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QosRate {
    /// Sustained rate per second (at least 1).
    pub per_sec: u64,
    /// Largest amount saved up while idle; `None`: a tenth of a second's worth (at least 1).
    pub burst: Option<u64>,
}

/// The six limits of a namespace, group, host or function; `None`: not limited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct QosLimits {
    /// Operations per second, reads and writes together.
    pub iops: Option<QosRate>,
    /// Read operations per second.
    pub read_iops: Option<QosRate>,
    /// Write operations per second.
    pub write_iops: Option<QosRate>,
    /// Bytes per second, reads and writes together.
    pub bps: Option<QosRate>,
    /// Read bytes per second.
    pub read_bps: Option<QosRate>,
    /// Written bytes per second.
    pub write_bps: Option<QosRate>,
}

impl QosLimits {
    /// The limits with their TOML names.
    pub fn named(&self) -> [(&'static str, Option<QosRate>); 6] {
        [
            ("iops", self.iops),
            ("read_iops", self.read_iops),
            ("write_iops", self.write_iops),
            ("bps", self.bps),
            ("read_bps", self.read_bps),
            ("write_bps", self.write_bps),
        ]
    }

    /// Whether any limit is set.
    pub fn any(&self) -> bool {
        self.named().iter().any(|(_, r)| r.is_some())
    }
}

/// The QoS of one namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespaceQos {
    /// NQN of its subsystem.
    pub subsystem: String,
    /// Its NSID.
    pub nsid: u32,
    /// Its own limits (every host together).
    pub limits: QosLimits,
    /// Its share of a saturated drive against the other namespaces cut from it (1..=1000).
    pub weight: u32,
    /// The group whose limits it shares (and whose weight, if set, wins).
    pub group: Option<String>,
}

/// A group of namespaces: a tenant's pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QosGroup {
    /// Its name.
    pub name: String,
    /// Limits of all its namespaces together.
    pub limits: QosLimits,
    /// Weight of its namespaces (0: each namespace's own).
    pub weight: u32,
}

/// Limits of each controller of one host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostQos {
    /// Host NQN, or `*`: every host without a rule of its own.
    pub hostnqn: String,
    /// Limits of each of its controllers (all queues, all namespaces).
    pub limits: QosLimits,
}

/// Limits of the controller of one emulated PCIe function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionQos {
    /// The function (0..=31).
    pub function: u16,
    /// Its limits (all its queues, all namespaces).
    pub limits: QosLimits,
}

/// Everything QoS of a description.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Qos {
    /// Namespaces with limits, a weight or a group (the others: no limit, weight 1).
    pub namespaces: Vec<NamespaceQos>,
    /// Groups.
    pub groups: Vec<QosGroup>,
    /// Per-host rules.
    pub hosts: Vec<HostQos>,
    /// Per-function limits.
    pub functions: Vec<FunctionQos>,
}

impl Qos {
    /// Whether nothing is configured (a bundle then carries no QoS section).
    pub fn is_empty(&self) -> bool {
        self.namespaces.is_empty()
            && self.groups.is_empty()
            && self.hosts.is_empty()
            && self.functions.is_empty()
    }

    /// The QoS of namespace `nsid` of `subsystem`, if it has any.
    pub fn namespace(&self, subsystem: &str, nsid: u32) -> Option<&NamespaceQos> {
        self.namespaces
            .iter()
            .find(|n| n.subsystem == subsystem && n.nsid == nsid)
    }
}

/// Largest weight.
pub const MAX_WEIGHT: u32 = 1000;
/// At most this many groups, host rules or function rules each.
pub const MAX_QOS_RULES: usize = 256;
/// Longest group name.
pub const MAX_GROUP_NAME: usize = 64;

fn bad<T>(path: String, message: String) -> Result<T, ValidationError> {
    Err(ValidationError { path, message })
}

fn check_limits(path: &str, l: &QosLimits) -> Result<(), ValidationError> {
    for (name, r) in l.named() {
        if let Some(r) = r {
            if r.per_sec == 0 {
                return bad(
                    format!("{path}.{name}"),
                    "a rate of 0 would stop all I/O; remove the limit or give at least 1".into(),
                );
            }
            if r.burst == Some(0) {
                return bad(
                    format!("{path}.{name}.burst"),
                    "a burst of 0 admits nothing; give at least 1".into(),
                );
            }
        }
    }
    Ok(())
}

fn check_weight(path: String, w: u32, zero_ok: bool) -> Result<(), ValidationError> {
    if (w == 0 && !zero_ok) || w > MAX_WEIGHT {
        return bad(
            path,
            format!(
                "weight {w} is not {}..={MAX_WEIGHT}",
                if zero_ok { 0 } else { 1 }
            ),
        );
    }
    Ok(())
}

/// Checks the QoS rules of `d`: rates and bursts at least 1, weights in range, groups named
/// once and known, namespaces and functions that exist, host NQNs valid (or `*`), no rule
/// given twice.
pub fn validate_qos(d: &Device) -> Result<(), ValidationError> {
    let q = &d.qos;
    for (what, n) in [
        ("qos.namespace", q.namespaces.len()),
        ("qos.group", q.groups.len()),
        ("qos.host", q.hosts.len()),
        ("qos.function", q.functions.len()),
    ] {
        if n > MAX_QOS_RULES {
            return bad(what.into(), format!("at most {MAX_QOS_RULES} entries"));
        }
    }
    for (i, g) in q.groups.iter().enumerate() {
        let p = format!("qos.group[{i}]");
        if g.name.is_empty()
            || g.name.len() > MAX_GROUP_NAME
            || !g
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return bad(
                format!("{p}.name"),
                format!(
                    "`{}` is not a group name (1 to {MAX_GROUP_NAME} of A-Z a-z 0-9 - _ .)",
                    g.name
                ),
            );
        }
        if q.groups[..i].iter().any(|o| o.name == g.name) {
            return bad(
                format!("{p}.name"),
                format!("group `{}` is defined twice", g.name),
            );
        }
        check_limits(&p, &g.limits)?;
        check_weight(format!("{p}.weight"), g.weight, true)?;
    }
    for (i, n) in q.namespaces.iter().enumerate() {
        let Some(j) = d
            .namespaces
            .iter()
            .position(|o| o.subsystem == n.subsystem && o.nsid == n.nsid)
        else {
            return bad(
                format!("qos.namespace[{i}]"),
                format!("no namespace {} in `{}`", n.nsid, n.subsystem),
            );
        };
        let p = format!("namespace[{j}].qos");
        if q.namespaces[..i]
            .iter()
            .any(|o| o.subsystem == n.subsystem && o.nsid == n.nsid)
        {
            return bad(p, "QoS given twice for this namespace".into());
        }
        check_limits(&p, &n.limits)?;
        check_weight(format!("{p}.weight"), n.weight, false)?;
        if let Some(g) = &n.group
            && !q.groups.iter().any(|o| &o.name == g)
        {
            return bad(
                format!("{p}.group"),
                format!("no [[qos.group]] is named `{g}`"),
            );
        }
    }
    for (i, h) in q.hosts.iter().enumerate() {
        let p = format!("qos.host[{i}]");
        if h.hostnqn != "*" {
            check_nqn(&h.hostnqn).or_else(|m| bad(format!("{p}.hostnqn"), m))?;
        }
        if q.hosts[..i].iter().any(|o| o.hostnqn == h.hostnqn) {
            return bad(
                format!("{p}.hostnqn"),
                format!("a rule for `{}` is given twice", h.hostnqn),
            );
        }
        check_limits(&p, &h.limits)?;
    }
    for (i, f) in q.functions.iter().enumerate() {
        let p = format!("qos.function[{i}]");
        if !d.namespaces.iter().any(|n| n.function == Some(f.function)) {
            return bad(
                format!("{p}.function"),
                format!("no namespace is exported through function {}", f.function),
            );
        }
        if q.functions[..i].iter().any(|o| o.function == f.function) {
            return bad(
                format!("{p}.function"),
                format!("function {} is given twice", f.function),
            );
        }
        check_limits(&p, &f.limits)?;
    }
    Ok(())
}
