//! Human-readable `keelctl status` and push reports.

use keel_mgmt::{Latency, PushReport, QosInfo, Snapshot};
use std::io::{Result, Write};

/// `1h02m03s`, `4.123s`.
pub fn uptime(ns: u64) -> String {
    let s = ns / 1_000_000_000;
    match s {
        0..60 => format!("{}.{:03}s", s, (ns / 1_000_000) % 1000),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m{:02}s", s / 3600, (s / 60) % 60, s % 60),
        _ => format!("{}d{:02}h{:02}m", s / 86400, (s / 3600) % 24, (s / 60) % 60),
    }
}

/// `512B`, `64KiB`, `256MiB`, `1.5GiB`.
pub fn size(b: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if v.fract() == 0.0 {
        format!("{v}{}", U[i])
    } else {
        format!("{v:.1}{}", U[i])
    }
}

/// `850ns`, `12.3us`, `4.1ms`, `-` without samples.
pub fn latency(ns: u64, count: u64) -> String {
    if count == 0 {
        return "-".into();
    }
    match ns {
        0..1_000 => format!("{ns}ns"),
        1_000..1_000_000 => format!("{:.1}us", ns as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1}ms", ns as f64 / 1e6),
        _ => format!("{:.2}s", ns as f64 / 1e9),
    }
}

fn quantiles(l: &Latency) -> String {
    format!(
        "{}/{}/{}",
        latency(l.p50_ns, l.count),
        latency(l.p99_ns, l.count),
        latency(l.p999_ns, l.count)
    )
}

/// `write_iops 500/s (burst 50)`, `bps 100MiB/s (burst 1MiB)`, joined; `-` without limits.
fn qos_limits(q: &QosInfo) -> String {
    limit_list(&q.limits)
}

/// [`qos_limits`] of a list of limits.
pub fn limit_list(limits: &[keel_mgmt::QosLimit]) -> String {
    if limits.is_empty() {
        return "-".into();
    }
    limits
        .iter()
        .map(|l| {
            if l.name.ends_with("bps") {
                format!("{} {}/s (burst {})", l.name, size(l.per_sec), size(l.burst))
            } else {
                format!("{} {}/s (burst {})", l.name, l.per_sec, l.burst)
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The endpoint's function slots: `keelctl function list` and the status.
pub fn function_slots(slots: &[keel_mgmt::FunctionSlotInfo], out: &mut dyn Write) -> Result<()> {
    let mut rows = vec![
        [
            "SLOT",
            "KIND",
            "STATE",
            "SUBSYSTEM",
            "NSIDS",
            "HOST",
            "ORIGIN",
            "LIMITS",
        ]
        .map(String::from)
        .to_vec(),
    ];
    let dash = |s: &str| {
        if s.is_empty() {
            "-".to_string()
        } else {
            s.to_string()
        }
    };
    for f in slots {
        rows.push(vec![
            f.slot.to_string(),
            f.kind.clone(),
            f.state.name().to_string(),
            dash(&f.subsystem),
            if f.nsids.is_empty() {
                "-".into()
            } else {
                f.nsids
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            },
            dash(&f.host),
            dash(&f.origin),
            limit_list(&f.limits),
        ]);
    }
    columns(out, &rows)
}

/// The QoS table: every namespace, controller and group with a limit, a group, a weight
/// other than 1, time throttled or commands queued.
fn qos_table(s: &Snapshot, out: &mut dyn Write) -> Result<()> {
    let mut rows = vec![
        [
            "SCOPE",
            "TENANT",
            "GROUP",
            "WEIGHT",
            "LIMITS",
            "RATE",
            "THROTTLED",
            "QUEUED",
        ]
        .map(String::from)
        .to_vec(),
    ];
    let mut row = |scope: &str, tenant: String, group: &str, weight: String, q: &QosInfo| {
        rows.push(vec![
            scope.into(),
            tenant,
            group.into(),
            weight,
            qos_limits(q),
            format!("{} IOPS, {}/s", q.ops_per_sec, size(q.bytes_per_sec)),
            uptime(q.throttled_ns),
            q.queued.to_string(),
        ]);
    };
    let busy = |q: &QosInfo| !q.limits.is_empty() || q.throttled_ns > 0 || q.queued > 0;
    for n in &s.qos_namespaces {
        if busy(&n.qos) || n.group.is_some() || n.weight != 1 {
            row(
                "namespace",
                format!("{}/{}", n.subsystem, n.nsid),
                n.group.as_deref().unwrap_or("-"),
                n.weight.to_string(),
                &n.qos,
            );
        }
    }
    for c in &s.qos_controllers {
        if busy(&c.qos) {
            let host = if c.hostnqn.is_empty() {
                c.transport.clone()
            } else {
                c.hostnqn.clone()
            };
            row(
                "controller",
                format!("{host} (cntlid {})", c.cntlid),
                "-",
                "-".into(),
                &c.qos,
            );
        }
    }
    for g in &s.qos_groups {
        let w = if g.weight == 0 {
            "-".into()
        } else {
            g.weight.to_string()
        };
        row("group", g.name.clone(), &g.name, w, &g.qos);
    }
    if rows.len() > 1 {
        writeln!(out, "\nqos ({} tenant(s)):", rows.len() - 1)?;
        columns(out, &rows)?;
    }
    // Scheduling domains with a cap (a drive's `[qos] drive_max_inflight`) or commands
    // waiting: RAM namespaces, each a domain of its own without a cap, are left out.
    let mut rows = vec![
        ["NAMESPACES", "MAX-INFLIGHT", "INFLIGHT", "QUEUED"]
            .map(String::from)
            .to_vec(),
    ];
    for d in &s.qos_domains {
        if d.max_inflight > 0 || d.queued > 0 {
            let cap = match d.max_inflight {
                0 => "-".into(),
                n => n.to_string(),
            };
            rows.push(vec![
                d.namespaces.join(" "),
                cap,
                d.inflight.to_string(),
                d.queued.to_string(),
            ]);
        }
    }
    if rows.len() > 1 {
        writeln!(out, "\nqos domains ({}):", rows.len() - 1)?;
        columns(out, &rows)?;
    }
    Ok(())
}

/// Prints rows as left-aligned columns.
fn columns(out: &mut dyn Write, rows: &[Vec<String>]) -> Result<()> {
    let n = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..n)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for r in rows {
        let mut line = String::from(" ");
        for (i, c) in r.iter().enumerate() {
            line.push(' ');
            line.push_str(c);
            if i + 1 < r.len() {
                line.extend(std::iter::repeat_n(' ', widths[i] - c.chars().count() + 1));
            }
        }
        writeln!(out, "{}", line.trim_end())?;
    }
    Ok(())
}

/// The status table.
pub fn status(device: &str, s: &Snapshot, out: &mut dyn Write) -> Result<()> {
    writeln!(out, "device:      {device}")?;
    writeln!(
        out,
        "version:     {}{}",
        s.version,
        if s.build_id.is_empty() {
            String::new()
        } else {
            format!(" ({})", s.build_id)
        }
    )?;
    writeln!(out, "board:       {}", s.board)?;
    writeln!(out, "uptime:      {}", uptime(s.uptime_ns))?;
    writeln!(
        out,
        "config:      generation {} from {}",
        s.generation, s.config_source
    )?;
    writeln!(
        out,
        "connections: {} NVMe/TCP, {} controller(s)",
        s.tcp_connections,
        s.controllers.len()
    )?;
    let r = &s.resources;
    writeln!(
        out,
        "resources:   heap {} free; NVMe/TCP buffers {}/{} free; sockets {} of {} created, \
         {} listening, {} free, {} closing; controllers {}/{}; queues {}/{}",
        size(r.heap_free),
        r.nvmf_buffers_free,
        r.nvmf_buffers_total,
        r.sockets_created,
        r.sockets_max,
        r.sockets_listening,
        r.sockets_free,
        r.sockets_draining,
        r.controllers,
        r.controllers_max,
        r.queues,
        r.queues_max
    )?;
    if r.function_buffers_total > 0 {
        writeln!(
            out,
            "             emulated-function buffers {}/{} free",
            r.function_buffers_free, r.function_buffers_total
        )?;
    }
    writeln!(
        out,
        "nic:         {} TSO frame(s) sent, {} frame(s) dropped",
        s.nic.tx_tso_frames, s.nic.tx_dropped
    )?;
    writeln!(
        out,
        "refused:     {} connection(s) refused, {} evicted before their ICReq, {} ICReq timeout(s)",
        r.refused, r.evicted, r.icreq_timeouts
    )?;
    writeln!(out, "\nsubsystems ({}):", s.subsystems.len())?;
    for sub in &s.subsystems {
        let hosts = if sub.allowed_hosts.is_empty() {
            "any host".to_string()
        } else {
            sub.allowed_hosts.join(", ")
        };
        writeln!(out, "  {}  (allowed: {hosts})", sub.nqn)?;
    }
    writeln!(out, "\nnamespaces ({}):", s.namespaces.len())?;
    let mut rows = vec![
        [
            "SUBSYSTEM",
            "NSID",
            "SIZE",
            "BLOCK",
            "BACKEND",
            "CIPHER",
            "EXPORT",
            "READS",
            "WRITES",
            "READ",
            "WRITTEN",
            "ERRORS",
            "READ p50/p99/p99.9",
            "WRITE p50/p99/p99.9",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for n in &s.namespaces {
        let c = &n.stats;
        rows.push(vec![
            n.subsystem.clone(),
            n.nsid.to_string(),
            size(n.size_bytes),
            n.block_size.to_string(),
            n.backend.clone(),
            n.encryption.clone(),
            n.exports.join(","),
            c.reads.to_string(),
            c.writes.to_string(),
            size(c.read_bytes),
            size(c.write_bytes),
            c.errors.to_string(),
            quantiles(&c.read_latency),
            quantiles(&c.write_latency),
        ]);
    }
    columns(out, &rows)?;
    writeln!(out, "\ncontrollers ({}):", s.controllers.len())?;
    if !s.controllers.is_empty() {
        let mut rows = vec![
            ["CNTLID", "TRANSPORT", "IO-QUEUES", "SUBSYSTEM", "HOST"]
                .map(String::from)
                .to_vec(),
        ];
        for c in &s.controllers {
            rows.push(vec![
                c.cntlid.to_string(),
                c.transport.clone(),
                c.io_queues.to_string(),
                c.subsystem.clone(),
                c.hostnqn.clone(),
            ]);
        }
        columns(out, &rows)?;
    }
    drives(s, out)?;
    remotes(s, out)?;
    qos_table(s, out)?;
    if !s.function_slots.is_empty() {
        writeln!(out, "\nfunction slots ({}):", s.function_slots.len())?;
        function_slots(&s.function_slots, out)?;
    } else if !s.functions.is_empty() {
        writeln!(out, "\nemulated functions ({}):", s.functions.len())?;
        for f in &s.functions {
            writeln!(
                out,
                "  fn{}  {}  {}",
                f.index,
                f.subsystem,
                if f.enabled {
                    "enabled by the host"
                } else {
                    "disabled"
                }
            )?;
        }
    }
    if !s.cores.is_empty() {
        writeln!(out, "\ncores ({}):", s.cores.len())?;
        let mut rows = vec![
            [
                "CORE",
                "MPIDR",
                "PASSES",
                "BUSY",
                "SLEEPS",
                "MESSAGES",
                "ALLOCS",
                "NVMF-CONNS",
                "NVMF-CMDS",
                "FN-CMDS",
                "SERVES",
            ]
            .map(String::from)
            .to_vec(),
        ];
        for c in &s.cores {
            rows.push(vec![
                c.index.to_string(),
                format!("{:#x}", c.mpidr),
                c.passes.to_string(),
                c.busy_passes.to_string(),
                c.sleeps.to_string(),
                c.messages.to_string(),
                c.allocator_calls.to_string(),
                c.nvmf_connections.to_string(),
                c.nvmf_commands.to_string(),
                c.function_commands.to_string(),
                c.role.clone(),
            ]);
        }
        columns(out, &rows)?;
    }
    Ok(())
}

/// Remote volumes with one row per path.
fn remotes(s: &Snapshot, out: &mut dyn Write) -> Result<()> {
    if s.remotes.is_empty() {
        return Ok(());
    }
    writeln!(out, "\nremote volumes ({}):", s.remotes.len())?;
    for r in &s.remotes {
        let serves: Vec<String> = r
            .exports
            .iter()
            .map(|(nqn, nsid)| format!("{nqn} ns {nsid}"))
            .collect();
        writeln!(
            out,
            "  {} namespace {}: {}, {}, {}, as {}; serves {}",
            r.subnqn,
            r.nsid,
            r.state,
            if r.size_bytes == 0 {
                "size not known yet".to_string()
            } else {
                format!("{} ({}-byte blocks)", size(r.size_bytes), r.block_size)
            },
            r.policy,
            r.hostnqn,
            if serves.is_empty() {
                "nothing yet".to_string()
            } else {
                serves.join(", ")
            }
        )?;
        writeln!(
            out,
            "  requests {} ({} completed, {} failed, {} without a path), {} in flight, {} queued, \
             {} retries, {} failovers",
            r.submitted,
            r.completed,
            r.failed,
            r.path_errors,
            r.in_flight,
            r.queued,
            r.retries,
            r.failovers
        )?;
        let mut rows = vec![
            [
                "PATH",
                "STATE",
                "ANA",
                "CNTLID",
                "QUEUES",
                "IN-FLIGHT",
                "COMMANDS",
                "ERRORS",
                "CONNECTS",
                "LOSSES",
                "LAST LOSS",
            ]
            .map(String::from)
            .to_vec(),
        ];
        for p in &r.paths {
            rows.push(vec![
                p.addr.clone(),
                p.state.clone(),
                if p.ana.is_empty() {
                    "-".into()
                } else {
                    p.ana.clone()
                },
                p.cntlid.to_string(),
                format!("{}x{}", p.io_queues, p.queue_depth),
                p.in_flight.to_string(),
                p.commands.to_string(),
                p.errors.to_string(),
                p.connects.to_string(),
                p.losses.to_string(),
                if p.last_loss.is_empty() {
                    "-".into()
                } else {
                    p.last_loss.clone()
                },
            ]);
        }
        columns(out, &rows)?;
        let queues: Vec<&keel_mgmt::RemoteQueueInfo> = s
            .remote_queues
            .iter()
            .filter(|q| q.subnqn == r.subnqn && q.nsid == r.nsid)
            .collect();
        if !queues.is_empty() {
            writeln!(out, "  I/O queues, every core's:")?;
            let mut rows = vec![
                ["PATH", "CORE", "QID", "STATE", "IN-FLIGHT", "COMMANDS"]
                    .map(String::from)
                    .to_vec(),
            ];
            for q in queues {
                rows.push(vec![
                    q.path.clone(),
                    q.core.to_string(),
                    q.qid.to_string(),
                    q.state.clone(),
                    q.in_flight.to_string(),
                    q.commands.to_string(),
                ]);
            }
            columns(out, &rows)?;
        }
    }
    Ok(())
}

/// Local drives with one row per core's I/O queue pairs.
fn drives(s: &Snapshot, out: &mut dyn Write) -> Result<()> {
    if s.drives.is_empty() {
        return Ok(());
    }
    writeln!(
        out,
        "
drives ({}):",
        s.drives.len()
    )?;
    for d in &s.drives {
        writeln!(
            out,
            "  {} {}: {}, {} controller reset(s), {} abort(s)",
            d.bdf, d.model, d.state, d.resets, d.aborts
        )?;
        let mut rows = vec![
            [
                "CORE",
                "QID",
                "STATE",
                "COMMANDS",
                "COMPLETED",
                "ERRORS",
                "TIMEOUTS",
                "RESETS",
                "FAILED-BY-RESET",
                "SQ-DOORBELLS",
                "CQ-DOORBELLS",
                "QUEUE-FULL",
            ]
            .map(String::from)
            .to_vec(),
        ];
        for q in &d.queues {
            rows.push(vec![
                q.core.to_string(),
                if q.queues > 1 {
                    format!(
                        "{}-{}",
                        q.first_qid,
                        u32::from(q.first_qid) + u32::from(q.queues) - 1
                    )
                } else {
                    q.first_qid.to_string()
                },
                q.state.clone(),
                q.commands.to_string(),
                q.completed.to_string(),
                q.errors.to_string(),
                q.timeouts.to_string(),
                q.resets.to_string(),
                q.failed_by_reset.to_string(),
                q.sq_doorbells.to_string(),
                q.cq_doorbells.to_string(),
                q.queue_full.to_string(),
            ]);
        }
        columns(out, &rows)?;
    }
    Ok(())
}

/// What a push did.
pub fn push_report(r: &PushReport, out: &mut dyn Write) -> Result<()> {
    writeln!(out, "applied: generation {} now in force", r.generation)?;
    writeln!(
        out,
        "persisted: {}",
        if r.persisted {
            "yes (flash configuration area)"
        } else {
            "no (no writable flash: lasts until the next boot)"
        }
    )?;
    for (nqn, nsid) in &r.added {
        writeln!(out, "added: {nqn} namespace {nsid}")?;
    }
    for (nqn, nsid) in &r.removed {
        writeln!(out, "removed: {nqn} namespace {nsid}")?;
    }
    for n in &r.needs_reboot {
        writeln!(out, "at next boot: {n}")?;
    }
    if r.added.is_empty() && r.removed.is_empty() && r.needs_reboot.is_empty() {
        writeln!(out, "no namespace changes")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        assert_eq!(uptime(4_123_000_000), "4.123s");
        assert_eq!(uptime(3_723_000_000_000), "1h02m03s");
        assert_eq!(size(256 << 20), "256MiB");
        assert_eq!(size(1536 << 20), "1.5GiB");
        assert_eq!(latency(65_536, 1), "65.5us");
        assert_eq!(latency(65_536, 0), "-");
    }

    #[test]
    fn table_lists_every_namespace() {
        let mut s = Snapshot {
            version: "0.1.0".into(),
            board: "qemu-virt".into(),
            ..Default::default()
        };
        s.namespaces.push(keel_mgmt::NamespaceInfo {
            subsystem: "nqn.x".into(),
            nsid: 7,
            backend: "ram".into(),
            size_bytes: 1 << 20,
            block_size: 512,
            encryption: "none".into(),
            exports: vec!["tcp".into()],
            stats: keel_mgmt::NsCounters {
                writes: 42,
                ..Default::default()
            },
        });
        s.cores = (0..2)
            .map(|i| keel_mgmt::CoreInfo {
                index: i,
                mpidr: u64::from(i),
                role: if i == 0 { "all" } else { "ring" }.into(),
                passes: 1000 + u64::from(i),
                ..Default::default()
            })
            .collect();
        s.qos_namespaces.push(keel_mgmt::NamespaceQosInfo {
            subsystem: "nqn.x".into(),
            nsid: 7,
            weight: 3,
            group: Some("tenant-b".into()),
            qos: QosInfo {
                limits: vec![keel_mgmt::QosLimit {
                    name: "write_bps".into(),
                    per_sec: 50 << 20,
                    burst: 5 << 20,
                }],
                ops_per_sec: 480,
                bytes_per_sec: 48 << 20,
                throttled_ns: 2_500_000_000,
                queued: 12,
                ..Default::default()
            },
        });
        let mut out = Vec::new();
        status("Keel", &s, &mut out).unwrap();
        let t = String::from_utf8(out).unwrap();
        assert!(t.contains("cores (2):"), "{t}");
        for (i, role) in [(0, "all"), (1, "ring")] {
            let row = t
                .lines()
                .find(|l| l.trim_start().starts_with(&format!("{i} ")) && l.contains(role))
                .unwrap_or_else(|| panic!("core {i} row in\n{t}"));
            assert!(row.contains(&format!(" 100{i} ")), "{row}");
        }
        let row = t.lines().find(|l| l.contains("nqn.x")).unwrap();
        assert!(
            row.contains(" 7 ") && row.contains(" 42 ") && row.contains("1MiB"),
            "{t}"
        );
        let q = t.lines().find(|l| l.contains("nqn.x/7")).unwrap();
        for want in [
            "nqn.x/7",
            "tenant-b",
            " 3 ",
            "write_bps 50MiB/s (burst 5MiB)",
            "480 IOPS, 48MiB/s",
            "2.500s",
            " 12",
        ] {
            assert!(q.contains(want), "{want} missing in {q}");
        }
        assert!(!t.contains("remote volumes"), "{t}");
        // No domain has a cap or a queue: no domain table.
        assert!(!t.contains("qos domains"), "{t}");
        s.qos_domains = vec![
            keel_mgmt::QosDomainInfo {
                namespaces: vec!["nqn.x/7".into(), "nqn.x/8".into()],
                max_inflight: 64,
                inflight: 64,
                queued: 12,
            },
            keel_mgmt::QosDomainInfo {
                namespaces: vec!["nqn.x/9".into()],
                ..Default::default()
            },
        ];
        let mut out = Vec::new();
        status("Keel", &s, &mut out).unwrap();
        let t = String::from_utf8(out).unwrap();
        assert!(t.contains("qos domains (1):"), "{t}");
        let d = t.lines().find(|l| l.contains("nqn.x/7 nqn.x/8")).unwrap();
        assert_eq!(
            d.split_whitespace().collect::<Vec<_>>(),
            ["nqn.x/7", "nqn.x/8", "64", "64", "12"],
            "{t}"
        );
        assert!(!t.contains("nqn.x/9"), "{t}");
        assert!(
            t.contains("nic:         0 TSO frame(s) sent, 0 frame(s) dropped"),
            "{t}"
        );
        s.nic = keel_mgmt::NicCounters {
            tx_tso_frames: 31,
            tx_dropped: 1,
        };
        let mut out = Vec::new();
        status("Keel", &s, &mut out).unwrap();
        let t = String::from_utf8(out).unwrap();
        assert!(
            t.contains("nic:         31 TSO frame(s) sent, 1 frame(s) dropped"),
            "{t}"
        );
    }

    #[test]
    fn table_lists_remote_volumes_with_their_paths() {
        let path = |addr: &str, state: &str, ana: &str, loss: &str| keel_mgmt::RemotePathInfo {
            addr: addr.into(),
            state: state.into(),
            ana: ana.into(),
            io_queues: 4,
            queue_depth: 128,
            commands: 9,
            last_loss: loss.into(),
            ..Default::default()
        };
        let s = Snapshot {
            remotes: vec![keel_mgmt::RemoteInfo {
                subnqn: "nqn.2026-11.dev.keel:pool".into(),
                nsid: 3,
                hostnqn: "nqn.2014-08.org.nvmexpress:uuid:1".into(),
                state: "degraded".into(),
                size_bytes: 1 << 30,
                block_size: 512,
                policy: "queue-depth".into(),
                exports: vec![("nqn.2026-11.dev.keel:fn0".into(), 1)],
                submitted: 18,
                paths: vec![
                    path("10.0.2.2:4420", "live", "optimized", ""),
                    path("10.0.2.2:4421", "reconnecting", "", "TCP connection closed"),
                ],
                ..Default::default()
            }],
            remote_queues: vec![
                keel_mgmt::RemoteQueueInfo {
                    subnqn: "nqn.2026-11.dev.keel:pool".into(),
                    nsid: 3,
                    path: "10.0.2.2:4420".into(),
                    core: 0,
                    qid: 1,
                    state: "live".into(),
                    commands: 9,
                    in_flight: 0,
                },
                keel_mgmt::RemoteQueueInfo {
                    subnqn: "nqn.2026-11.dev.keel:pool".into(),
                    nsid: 3,
                    path: "10.0.2.2:4420".into(),
                    core: 1,
                    qid: 5,
                    state: "live".into(),
                    commands: 1170,
                    in_flight: 2,
                },
                keel_mgmt::RemoteQueueInfo {
                    subnqn: "nqn.2026-11.dev.keel:other".into(),
                    nsid: 1,
                    path: "10.0.2.9:4420".into(),
                    core: 1,
                    qid: 5,
                    state: "live".into(),
                    commands: 1,
                    in_flight: 0,
                },
            ],
            ..Default::default()
        };
        let mut out = Vec::new();
        status("Keel", &s, &mut out).unwrap();
        let t = String::from_utf8(out).unwrap();
        assert!(t.contains("remote volumes (1):"), "{t}");
        assert!(
            t.contains("nqn.2026-11.dev.keel:pool namespace 3: degraded, 1GiB (512-byte blocks), queue-depth"),
            "{t}"
        );
        assert!(t.contains("serves nqn.2026-11.dev.keel:fn0 ns 1"), "{t}");
        let live = t.lines().find(|l| l.contains("10.0.2.2:4420")).unwrap();
        assert!(
            live.contains(" live ") && live.contains(" optimized ") && live.contains("4x128"),
            "{t}"
        );
        let down = t.lines().find(|l| l.contains("10.0.2.2:4421")).unwrap();
        assert!(
            down.contains(" reconnecting ") && down.ends_with("TCP connection closed"),
            "{t}"
        );
        // Every core's queues of this volume, and only this volume's.
        assert!(t.contains("I/O queues, every core's:"), "{t}");
        let lane = t
            .lines()
            .find(|l| l.contains("10.0.2.2:4420") && l.ends_with(" 1170"))
            .unwrap_or_else(|| panic!("core 1's queue:\n{t}"));
        let cols: Vec<&str> = lane.split_whitespace().collect();
        assert_eq!(
            cols,
            ["10.0.2.2:4420", "1", "5", "live", "2", "1170"],
            "{t}"
        );
        assert!(!t.contains("10.0.2.9"), "another volume's queue:\n{t}");
    }

    #[test]
    fn table_lists_every_core_s_drive_queue_pairs() {
        let q = |core: u16, first_qid: u16, queues: u16, commands: u64| keel_mgmt::DriveQueueInfo {
            core,
            first_qid,
            queues,
            state: "up".into(),
            commands,
            completed: commands,
            sq_doorbells: commands / 2,
            cq_doorbells: commands / 3,
            ..Default::default()
        };
        let s = Snapshot {
            drives: vec![keel_mgmt::DriveInfo {
                bdf: "00:02.0".into(),
                model: "QEMU NVMe Ctrl".into(),
                state: "online".into(),
                resets: 1,
                aborts: 0,
                queues: vec![q(0, 1, 4, 30), q(1, 5, 1, 1200)],
            }],
            ..Default::default()
        };
        let mut out = Vec::new();
        status("Keel", &s, &mut out).unwrap();
        let t = String::from_utf8(out).unwrap();
        assert!(t.contains("drives (1):"), "{t}");
        assert!(
            t.contains("00:02.0 QEMU NVMe Ctrl: online, 1 controller reset(s), 0 abort(s)"),
            "{t}"
        );
        let rows: Vec<Vec<&str>> = t
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .filter(|c| c.len() == 12 && c[2] == "up")
            .collect();
        assert_eq!(
            rows,
            [
                [
                    "0", "1-4", "up", "30", "30", "0", "0", "0", "0", "15", "10", "0"
                ],
                [
                    "1", "5", "up", "1200", "1200", "0", "0", "0", "0", "600", "400", "0"
                ],
            ],
            "{t}"
        );
    }
}
