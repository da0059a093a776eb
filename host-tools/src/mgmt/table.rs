//! Human-readable `keelctl status` and push reports.

use keel_mgmt::{Latency, PushReport, Snapshot};
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
    if !s.functions.is_empty() {
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
                "CORE", "MPIDR", "PASSES", "BUSY", "SLEEPS", "MESSAGES", "ALLOCS", "SERVES",
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
                c.role.clone(),
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
    }
}
