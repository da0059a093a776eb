//! Prometheus text exposition format 0.0.4 of a [`Snapshot`].
//!
//! Every family has `# HELP` and `# TYPE` and its samples together; counters end in `_total`;
//! times are in seconds and sizes in bytes (base units, as `promtool check metrics` wants);
//! label values are escaped (`\\`, `\"`, `\n`).

use crate::{CoreInfo, Latency, NsCounters, Snapshot};
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write;

/// `Content-Type` of the rendering.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Appends `v` escaped for a label value.
fn escape_label(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

fn labels(out: &mut String, l: &[(&str, &str)]) {
    if l.is_empty() {
        return;
    }
    out.push('{');
    for (i, (k, v)) in l.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(k);
        out.push_str("=\"");
        escape_label(out, v);
        out.push('"');
    }
    out.push('}');
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn sample(out: &mut String, name: &str, l: &[(&str, &str)], value: &str) {
    out.push_str(name);
    labels(out, l);
    out.push(' ');
    out.push_str(value);
    out.push('\n');
}

fn int(v: u64) -> String {
    alloc::format!("{v}")
}

/// Nanoseconds as decimal seconds (exact, no floating point).
fn seconds(ns: u64) -> String {
    alloc::format!("{}.{:09}", ns / 1_000_000_000, ns % 1_000_000_000)
}

/// Name, type, help and getter of a per-namespace counter family.
type CounterFamily = (
    &'static str,
    &'static str,
    &'static str,
    fn(&NsCounters) -> u64,
);
/// Name, help and getter of a per-namespace latency summary.
type LatencyFamily = (&'static str, &'static str, fn(&NsCounters) -> &Latency);

/// Name, help and getter of a per-core counter family.
type CoreFamily = (&'static str, &'static str, fn(&CoreInfo) -> u64);

/// Renders the snapshot.
pub fn render(s: &Snapshot) -> String {
    let mut o = String::with_capacity(4096 + s.namespaces.len() * 2048);
    family(&mut o, "keel_up", "gauge", "1 while the device answers.");
    sample(&mut o, "keel_up", &[], "1");
    family(
        &mut o,
        "keel_info",
        "gauge",
        "Firmware version, build and board (value always 1).",
    );
    sample(
        &mut o,
        "keel_info",
        &[
            ("version", &s.version),
            ("build", &s.build_id),
            ("board", &s.board),
        ],
        "1",
    );
    family(
        &mut o,
        "keel_uptime_seconds",
        "gauge",
        "Time since the firmware started.",
    );
    sample(&mut o, "keel_uptime_seconds", &[], &seconds(s.uptime_ns));
    family(
        &mut o,
        "keel_config_generation",
        "gauge",
        "Generation of the configuration in force (0: boot arguments), by source.",
    );
    sample(
        &mut o,
        "keel_config_generation",
        &[("source", &s.config_source)],
        &int(s.generation),
    );

    // Per-namespace families.
    let ns_labels: Vec<[(&str, String); 3]> = s
        .namespaces
        .iter()
        .map(|n| {
            [
                ("subsystem", n.subsystem.clone()),
                ("namespace", int(u64::from(n.nsid))),
                (
                    "transport",
                    if n.exports.is_empty() {
                        String::from("none")
                    } else {
                        n.exports.join(",")
                    },
                ),
            ]
        })
        .collect();
    let ns_families: [CounterFamily; 6] = [
        (
            "keel_namespace_reads_total",
            "counter",
            "Completed read commands.",
            |c| c.reads,
        ),
        (
            "keel_namespace_writes_total",
            "counter",
            "Completed write commands.",
            |c| c.writes,
        ),
        (
            "keel_namespace_other_commands_total",
            "counter",
            "Completed other I/O commands (flush, write zeroes, deallocate, compare).",
            |c| c.others,
        ),
        (
            "keel_namespace_read_bytes_total",
            "counter",
            "Bytes read.",
            |c| c.read_bytes,
        ),
        (
            "keel_namespace_written_bytes_total",
            "counter",
            "Bytes written.",
            |c| c.write_bytes,
        ),
        (
            "keel_namespace_errors_total",
            "counter",
            "Failed I/O commands.",
            |c| c.errors,
        ),
    ];
    family(
        &mut o,
        "keel_namespace_size_bytes",
        "gauge",
        "Namespace capacity.",
    );
    for (n, l) in s.namespaces.iter().zip(&ns_labels) {
        let l = l.each_ref().map(|(k, v)| (*k, v.as_str()));
        sample(&mut o, "keel_namespace_size_bytes", &l, &int(n.size_bytes));
    }
    for (name, kind, help, get) in ns_families {
        family(&mut o, name, kind, help);
        for (n, l) in s.namespaces.iter().zip(&ns_labels) {
            let l = l.each_ref().map(|(k, v)| (*k, v.as_str()));
            sample(&mut o, name, &l, &int(get(&n.stats)));
        }
    }
    let lat: [LatencyFamily; 2] = [
        (
            "keel_namespace_read_latency_seconds",
            "Read latency, submission to completion (quantiles are bucket upper bounds).",
            |c| &c.read_latency,
        ),
        (
            "keel_namespace_write_latency_seconds",
            "Write latency, submission to completion (quantiles are bucket upper bounds).",
            |c| &c.write_latency,
        ),
    ];
    for (name, help, get) in lat {
        family(&mut o, name, "summary", help);
        for (n, l) in s.namespaces.iter().zip(&ns_labels) {
            let [a, b, c] = l.each_ref().map(|(k, v)| (*k, v.as_str()));
            let q = get(&n.stats);
            for (quantile, v) in [("0.5", q.p50_ns), ("0.99", q.p99_ns), ("0.999", q.p999_ns)] {
                sample(
                    &mut o,
                    name,
                    &[a, b, c, ("quantile", quantile)],
                    &seconds(v),
                );
            }
            sample(
                &mut o,
                &alloc::format!("{name}_sum"),
                &[a, b, c],
                &seconds(q.sum_ns),
            );
            sample(
                &mut o,
                &alloc::format!("{name}_count"),
                &[a, b, c],
                &int(q.count),
            );
        }
    }

    family(
        &mut o,
        "keel_subsystem_controllers",
        "gauge",
        "Live controllers per subsystem.",
    );
    for sub in &s.subsystems {
        let n = s
            .controllers
            .iter()
            .filter(|c| c.subsystem == sub.nqn)
            .count();
        sample(
            &mut o,
            "keel_subsystem_controllers",
            &[("subsystem", &sub.nqn)],
            &int(n as u64),
        );
    }
    family(
        &mut o,
        "keel_controller_io_queues",
        "gauge",
        "I/O queues of each live controller.",
    );
    for c in &s.controllers {
        sample(
            &mut o,
            "keel_controller_io_queues",
            &[
                ("controller", &int(u64::from(c.cntlid))),
                ("subsystem", &c.subsystem),
                ("transport", &c.transport),
                ("host", &c.hostnqn),
            ],
            &int(u64::from(c.io_queues)),
        );
    }
    family(
        &mut o,
        "keel_tcp_connections",
        "gauge",
        "Open NVMe/TCP connections.",
    );
    sample(
        &mut o,
        "keel_tcp_connections",
        &[("transport", "tcp")],
        &int(u64::from(s.tcp_connections)),
    );
    family(
        &mut o,
        "keel_pcie_function_enabled",
        "gauge",
        "1 when the host has enabled the emulated PCIe function (CC.EN).",
    );
    for f in &s.functions {
        sample(
            &mut o,
            "keel_pcie_function_enabled",
            &[
                ("function", &int(u64::from(f.index))),
                ("subsystem", &f.subsystem),
                ("transport", "pcie"),
            ],
            if f.enabled { "1" } else { "0" },
        );
    }
    let core_families: [CoreFamily; 5] = [
        (
            "keel_core_loop_passes_total",
            "Passes of the core's poll loop.",
            |c| c.passes,
        ),
        (
            "keel_core_loop_busy_passes_total",
            "Passes of the core's poll loop that found work.",
            |c| c.busy_passes,
        ),
        (
            "keel_core_sleeps_total",
            "Times the core slept (WFI) for lack of work.",
            |c| c.sleeps,
        ),
        (
            "keel_core_messages_total",
            "Messages the core took from other cores' rings.",
            |c| c.messages,
        ),
        (
            "keel_core_allocator_calls_total",
            "Allocator calls (allocations, frees, reallocations) the core made.",
            |c| c.allocator_calls,
        ),
    ];
    let core_labels: Vec<[String; 2]> = s
        .cores
        .iter()
        .map(|c| [int(u64::from(c.index)), c.role.clone()])
        .collect();
    for (name, help, get) in core_families {
        family(&mut o, name, "counter", help);
        for (c, [index, role]) in s.cores.iter().zip(&core_labels) {
            sample(
                &mut o,
                name,
                &[("core", index), ("role", role)],
                &int(get(c)),
            );
        }
    }
    o
}
