//! Prometheus text exposition format 0.0.4 of a [`Snapshot`].
//!
//! Every family has `# HELP` and `# TYPE` and its samples together; counters end in `_total`;
//! times are in seconds and sizes in bytes (base units, as `promtool check metrics` wants);
//! label values are escaped (`\\`, `\"`, `\n`).

use crate::{
    CoreInfo, DriveInfo, DriveQueueInfo, Latency, NsCounters, QosDomainInfo, QosInfo, RemoteInfo,
    RemotePathInfo, RemoteQueueInfo, Snapshot,
};
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
    let core_families: [CoreFamily; 10] = [
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
        (
            "keel_core_nvmf_connections_total",
            "NVMe/TCP connections the core accepted.",
            |c| c.nvmf_connections,
        ),
        (
            "keel_core_nvmf_commands_total",
            "NVMe/TCP commands the core took from its connections.",
            |c| c.nvmf_commands,
        ),
        (
            "keel_core_doorbells_to_core0_total",
            "Doorbells the core rang to wake core 0 after giving it messages.",
            |c| c.doorbells_to_core0,
        ),
        (
            "keel_core_wakeup_rescues_total",
            "Sleeps of core 0 its bounded timer ended with messages waiting and no doorbell.",
            |c| c.wakeup_rescues,
        ),
        (
            "keel_core_function_commands_total",
            "Commands of emulated functions' queues the core fetched.",
            |c| c.function_commands,
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
    let r = &s.resources;
    for (name, help, value) in [
        (
            "keel_heap_free_bytes",
            "Bytes free on the firmware's heap.",
            r.heap_free,
        ),
        (
            "keel_nvmf_buffers_free",
            "NVMe/TCP data buffers free.",
            r.nvmf_buffers_free.into(),
        ),
        (
            "keel_nvmf_buffers",
            "NVMe/TCP data buffers in all.",
            r.nvmf_buffers_total.into(),
        ),
        (
            "keel_sockets_listening",
            "TCP sockets armed as listeners.",
            r.sockets_listening.into(),
        ),
        (
            "keel_controllers",
            "Controllers in use.",
            r.controllers.into(),
        ),
        (
            "keel_queues",
            "Controller queue slots in use.",
            r.queues.into(),
        ),
    ] {
        family(&mut o, name, "gauge", help);
        sample(&mut o, name, &[], &int(value));
    }
    for (name, help, value) in [
        (
            "keel_connections_refused_total",
            "Connections refused: no socket or queue slot for them.",
            r.refused,
        ),
        (
            "keel_connections_evicted_total",
            "Connections that never sent an ICReq, closed to make room for a new one.",
            r.evicted,
        ),
        (
            "keel_icreq_timeouts_total",
            "Connections closed because their ICReq did not come in time.",
            r.icreq_timeouts,
        ),
        (
            "keel_nic_tx_tso_frames_total",
            "Frames the NIC was given to cut into TCP segments (TCP segmentation offload).",
            s.nic.tx_tso_frames,
        ),
        (
            "keel_nic_tx_dropped_total",
            "Frames the network stack built that the NIC driver could not send.",
            s.nic.tx_dropped,
        ),
    ] {
        family(&mut o, name, "counter", help);
        sample(&mut o, name, &[], &int(value));
    }
    remotes(&mut o, &s.remotes);
    remote_queues(&mut o, &s.remote_queues);
    drives(&mut o, &s.drives);
    qos(&mut o, s);
    o
}

/// States a drive reports (`DriveInfo::state`).
const DRIVE_STATES: [&str; 4] = ["online", "resetting", "dead", "shut down"];
/// States a core's queue pairs on a drive report (`DriveQueueInfo::state`).
const DRIVE_QUEUE_STATES: [&str; 3] = ["up", "down", "dead"];
/// States a remote volume's I/O queue reports (`RemoteQueueInfo::state`).
const REMOTE_QUEUE_STATES: [&str; 3] = ["live", "connecting", "down"];

/// Name, help and getter of a per-core drive queue counter family.
type DriveQueueFamily = (&'static str, &'static str, fn(&DriveQueueInfo) -> u64);

/// The QIDs of a core's queue pairs as a label value (`5`, `1-4`).
fn qids(first: u16, n: u16) -> String {
    if n <= 1 {
        int(u64::from(first))
    } else {
        alloc::format!("{first}-{}", u64::from(first) + u64::from(n) - 1)
    }
}

/// Local drives: labels `drive` (PCI address) and, per core's queue pairs, `core` and `qid`
/// (`1-4` for several).
fn drives(o: &mut String, ds: &[DriveInfo]) {
    family(
        o,
        "keel_drive_state",
        "gauge",
        "State of a local NVMe drive: 1 for the current one.",
    );
    for d in ds {
        for st in DRIVE_STATES {
            sample(
                o,
                "keel_drive_state",
                &[("drive", &d.bdf), ("state", st)],
                if d.state == st { "1" } else { "0" },
            );
        }
    }
    for (name, help, get) in [
        (
            "keel_drive_controller_resets_total",
            "Controller resets of the drive started since it came up.",
            (|d| d.resets) as fn(&DriveInfo) -> u64,
        ),
        (
            "keel_drive_aborts_total",
            "Abort commands sent to the drive.",
            |d| d.aborts,
        ),
    ] {
        family(o, name, "counter", help);
        for d in ds {
            sample(o, name, &[("drive", &d.bdf)], &int(get(d)));
        }
    }
    let rows: Vec<(&DriveQueueInfo, [(&str, String); 3])> = ds
        .iter()
        .flat_map(|d| {
            d.queues.iter().map(move |q| {
                (
                    q,
                    [
                        ("drive", d.bdf.clone()),
                        ("core", int(u64::from(q.core))),
                        ("qid", qids(q.first_qid, q.queues)),
                    ],
                )
            })
        })
        .collect();
    family(
        o,
        "keel_drive_queue_state",
        "gauge",
        "State of a core's I/O queue pairs on a drive: 1 for the current one.",
    );
    for (q, l) in &rows {
        let [a, b, c] = l.each_ref().map(|(k, v)| (*k, v.as_str()));
        for st in DRIVE_QUEUE_STATES {
            sample(
                o,
                "keel_drive_queue_state",
                &[a, b, c, ("state", st)],
                if q.state == st { "1" } else { "0" },
            );
        }
    }
    let families: [DriveQueueFamily; 9] = [
        (
            "keel_drive_queue_commands_total",
            "Commands the core submitted to its I/O queue pairs on the drive.",
            |q| q.commands,
        ),
        (
            "keel_drive_queue_completions_total",
            "Requests completed on the core's I/O queue pairs (successfully or not).",
            |q| q.completed,
        ),
        (
            "keel_drive_queue_command_errors_total",
            "Commands on the core's I/O queue pairs that completed with an error status.",
            |q| q.errors,
        ),
        (
            "keel_drive_queue_timeouts_total",
            "Commands on the core's I/O queue pairs that timed out.",
            |q| q.timeouts,
        ),
        (
            "keel_drive_queue_resets_total",
            "Resets the core's I/O queue pairs went through.",
            |q| q.resets,
        ),
        (
            "keel_drive_queue_failed_by_reset_total",
            "Requests failed back because the drive reset or was given up on.",
            |q| q.failed_by_reset,
        ),
        (
            "keel_drive_queue_sq_doorbells_total",
            "SQ tail doorbell writes of the core's I/O queue pairs.",
            |q| q.sq_doorbells,
        ),
        (
            "keel_drive_queue_cq_doorbells_total",
            "CQ head doorbell writes of the core's I/O queue pairs.",
            |q| q.cq_doorbells,
        ),
        (
            "keel_drive_queue_full_total",
            "Requests refused as busy because the core's I/O queue pairs had no room.",
            |q| q.queue_full,
        ),
    ];
    for (name, help, get) in families {
        family(o, name, "counter", help);
        for (q, l) in &rows {
            let l = l.each_ref().map(|(k, v)| (*k, v.as_str()));
            sample(o, name, &l, &int(get(q)));
        }
    }
}

/// Every core's I/O queues of remote volumes: labels `remote`, `remote_namespace`, `path`,
/// `core` and `qid`.
fn remote_queues(o: &mut String, qs: &[RemoteQueueInfo]) {
    let rows: Vec<[(&str, String); 5]> = qs
        .iter()
        .map(|q| {
            [
                ("remote", q.subnqn.clone()),
                ("remote_namespace", int(u64::from(q.nsid))),
                ("path", q.path.clone()),
                ("core", int(u64::from(q.core))),
                ("qid", int(u64::from(q.qid))),
            ]
        })
        .collect();
    family(
        o,
        "keel_remote_queue_state",
        "gauge",
        "State of an I/O queue of a remote volume on its core: 1 for the current one.",
    );
    for (q, l) in qs.iter().zip(&rows) {
        let [a, b, c, d, e] = l.each_ref().map(|(k, v)| (*k, v.as_str()));
        for st in REMOTE_QUEUE_STATES {
            sample(
                o,
                "keel_remote_queue_state",
                &[a, b, c, d, e, ("state", st)],
                if q.state == st { "1" } else { "0" },
            );
        }
    }
    family(
        o,
        "keel_remote_queue_commands_total",
        "counter",
        "I/O commands the core sent on its queue of a remote volume's association.",
    );
    for (q, l) in qs.iter().zip(&rows) {
        let l = l.each_ref().map(|(k, v)| (*k, v.as_str()));
        sample(o, "keel_remote_queue_commands_total", &l, &int(q.commands));
    }
    family(
        o,
        "keel_remote_queue_in_flight_commands",
        "gauge",
        "I/O commands in flight on the core's queue of a remote volume's association.",
    );
    for (q, l) in qs.iter().zip(&rows) {
        let l = l.each_ref().map(|(k, v)| (*k, v.as_str()));
        sample(
            o,
            "keel_remote_queue_in_flight_commands",
            &l,
            &int(u64::from(q.in_flight)),
        );
    }
}

/// States a remote volume reports (`RemoteInfo::state`).
const VOLUME_STATES: [&str; 5] = ["connecting", "online", "degraded", "no path", "failed"];
/// States a path reports (`RemotePathInfo::state`).
const PATH_STATES: [&str; 4] = ["connecting", "live", "reconnecting", "failed"];
/// ANA states (`RemotePathInfo::ana`).
const ANA_STATES: [&str; 5] = [
    "optimized",
    "non-optimized",
    "inaccessible",
    "persistent-loss",
    "change",
];

/// Name, type, help and getter of a per-volume family.
type VolumeFamily = (
    &'static str,
    &'static str,
    &'static str,
    fn(&RemoteInfo) -> u64,
);
/// Name, type, help and getter of a per-path family.
type PathFamily = (
    &'static str,
    &'static str,
    &'static str,
    fn(&RemotePathInfo) -> u64,
);

/// Remote volumes and their paths: labels `remote` (the remote subsystem's NQN),
/// `remote_namespace` and, per path, `path` (`a.b.c.d:port`). States are one series per
/// possible state, 1 for the current one.
fn remotes(o: &mut String, rs: &[RemoteInfo]) {
    let vl: Vec<[(&str, String); 2]> = rs
        .iter()
        .map(|r| {
            [
                ("remote", r.subnqn.clone()),
                ("remote_namespace", int(u64::from(r.nsid))),
            ]
        })
        .collect();
    family(
        o,
        "keel_remote_state",
        "gauge",
        "State of a remote volume: 1 for the current one.",
    );
    for (r, l) in rs.iter().zip(&vl) {
        let [a, b] = l.each_ref().map(|(k, v)| (*k, v.as_str()));
        for st in VOLUME_STATES {
            sample(
                o,
                "keel_remote_state",
                &[a, b, ("state", st)],
                if r.state == st { "1" } else { "0" },
            );
        }
    }
    let vol_families: [VolumeFamily; 8] = [
        (
            "keel_remote_size_bytes",
            "gauge",
            "Capacity of the remote namespace (0 until identified).",
            |r| r.size_bytes,
        ),
        (
            "keel_remote_requests_total",
            "counter",
            "Requests accepted by the remote volume.",
            |r| r.submitted,
        ),
        (
            "keel_remote_requests_failed_total",
            "counter",
            "Requests completed with an error.",
            |r| r.failed,
        ),
        (
            "keel_remote_requests_no_path_total",
            "counter",
            "Requests failed for want of a usable path within the loss timeouts.",
            |r| r.path_errors,
        ),
        (
            "keel_remote_retries_total",
            "counter",
            "Commands sent again after a retryable status.",
            |r| r.retries,
        ),
        (
            "keel_remote_failovers_total",
            "counter",
            "Commands sent again after their path failed.",
            |r| r.failovers,
        ),
        (
            "keel_remote_queued_requests",
            "gauge",
            "Requests waiting for a path or a queue slot.",
            |r| u64::from(r.queued),
        ),
        (
            "keel_remote_in_flight_requests",
            "gauge",
            "Requests with a command in flight.",
            |r| u64::from(r.in_flight),
        ),
    ];
    for (name, kind, help, get) in vol_families {
        family(o, name, kind, help);
        for (r, l) in rs.iter().zip(&vl) {
            let l = l.each_ref().map(|(k, v)| (*k, v.as_str()));
            sample(o, name, &l, &int(get(r)));
        }
    }
    let paths: Vec<(&RemotePathInfo, [(&str, String); 3])> = rs
        .iter()
        .zip(&vl)
        .flat_map(|(r, [a, b])| {
            r.paths
                .iter()
                .map(move |p| (p, [a.clone(), b.clone(), ("path", p.addr.clone())]))
        })
        .collect();
    family(
        o,
        "keel_remote_path_state",
        "gauge",
        "State of a path of a remote volume: 1 for the current one.",
    );
    for (p, l) in &paths {
        let [a, b, c] = l.each_ref().map(|(k, v)| (*k, v.as_str()));
        for st in PATH_STATES {
            sample(
                o,
                "keel_remote_path_state",
                &[a, b, c, ("state", st)],
                if p.state == st { "1" } else { "0" },
            );
        }
    }
    family(
        o,
        "keel_remote_path_ana_state",
        "gauge",
        "ANA state of the namespace through a path: 1 for the current one (no series when the remote does not report ANA).",
    );
    for (p, l) in paths.iter().filter(|(p, _)| !p.ana.is_empty()) {
        let [a, b, c] = l.each_ref().map(|(k, v)| (*k, v.as_str()));
        for st in ANA_STATES {
            sample(
                o,
                "keel_remote_path_ana_state",
                &[a, b, c, ("ana", st)],
                if p.ana == st { "1" } else { "0" },
            );
        }
    }
    let path_families: [PathFamily; 9] = [
        (
            "keel_remote_path_io_queues",
            "gauge",
            "I/O queues of the path's current association.",
            |p| u64::from(p.io_queues),
        ),
        (
            "keel_remote_path_in_flight_commands",
            "gauge",
            "I/O commands in flight on the path.",
            |p| u64::from(p.in_flight),
        ),
        (
            "keel_remote_path_attempts_total",
            "counter",
            "Association attempts started.",
            |p| p.attempts,
        ),
        (
            "keel_remote_path_connects_total",
            "counter",
            "Associations that came up.",
            |p| p.connects,
        ),
        (
            "keel_remote_path_losses_total",
            "counter",
            "Associations or attempts that ended.",
            |p| p.losses,
        ),
        (
            "keel_remote_path_commands_total",
            "counter",
            "I/O commands sent on the path.",
            |p| p.commands,
        ),
        (
            "keel_remote_path_command_errors_total",
            "counter",
            "I/O commands that completed with an error status.",
            |p| p.errors,
        ),
        (
            "keel_remote_path_aborted_commands_total",
            "counter",
            "I/O commands in flight when their association ended (retried).",
            |p| p.aborted,
        ),
        (
            "keel_remote_path_keep_alives_total",
            "counter",
            "Keep Alive commands sent.",
            |p| p.keep_alives,
        ),
    ];
    for (name, kind, help, get) in path_families {
        family(o, name, kind, help);
        for (p, l) in &paths {
            let l = l.each_ref().map(|(k, v)| (*k, v.as_str()));
            sample(o, name, &l, &int(get(p)));
        }
    }
}

/// Name, type, help and getter of a per-tenant QoS family.
type QosFamily = (
    &'static str,
    &'static str,
    &'static str,
    fn(&QosInfo) -> String,
);

/// Per tenant (label `scope`: `namespace`, `controller` or `group`; label `tenant`: the
/// namespace as `SUBNQN/NSID`, the controller as `HOSTNQN/CNTLID`, the group's name): the
/// limits, the current rate, time throttled and commands queued.
fn qos(o: &mut String, s: &Snapshot) {
    let tenants: Vec<(&str, String, &QosInfo)> = s
        .qos_namespaces
        .iter()
        .map(|n| {
            (
                "namespace",
                alloc::format!("{}/{}", n.subsystem, n.nsid),
                &n.qos,
            )
        })
        .chain(s.qos_controllers.iter().map(|c| {
            (
                "controller",
                alloc::format!("{}/{}", c.hostnqn, c.cntlid),
                &c.qos,
            )
        }))
        .chain(
            s.qos_groups
                .iter()
                .map(|g| ("group", g.name.clone(), &g.qos)),
        )
        .collect();
    family(
        o,
        "keel_qos_limit",
        "gauge",
        "Limits in force per second (label limit: iops, read_iops, write_iops, bps, read_bps, write_bps).",
    );
    for (scope, t, q) in &tenants {
        for l in &q.limits {
            sample(
                o,
                "keel_qos_limit",
                &[("scope", scope), ("tenant", t), ("limit", &l.name)],
                &int(l.per_sec),
            );
        }
    }
    let families: [QosFamily; 6] = [
        (
            "keel_qos_admitted_commands_total",
            "counter",
            "Commands started (counted when they pass their limits).",
            |q| int(q.admitted_ops),
        ),
        (
            "keel_qos_admitted_bytes_total",
            "counter",
            "Bytes of the commands started.",
            |q| int(q.admitted_bytes),
        ),
        (
            "keel_qos_commands_per_second",
            "gauge",
            "Commands started per second over the last whole second.",
            |q| int(q.ops_per_sec),
        ),
        (
            "keel_qos_bytes_per_second",
            "gauge",
            "Bytes started per second over the last whole second.",
            |q| int(q.bytes_per_sec),
        ),
        (
            "keel_qos_throttled_seconds_total",
            "counter",
            "Time commands were held back by the limits.",
            |q| seconds(q.throttled_ns),
        ),
        (
            "keel_qos_queued_commands",
            "gauge",
            "Commands waiting now.",
            |q| int(u64::from(q.queued)),
        ),
    ];
    for (name, kind, help, get) in families {
        family(o, name, kind, help);
        for (scope, t, q) in &tenants {
            sample(o, name, &[("scope", scope), ("tenant", t)], &get(q));
        }
    }
    qos_domains(o, s);
}

type DomainFamily = (&'static str, &'static str, fn(&QosDomainInfo) -> u32);

/// Per scheduling domain (label `namespaces`: its namespaces as `SUBNQN/NSID`, separated by
/// spaces): the cap on commands at the backend, those there now and those waiting.
fn qos_domains(o: &mut String, s: &Snapshot) {
    let families: [DomainFamily; 3] = [
        (
            "keel_qos_domain_max_inflight",
            "Cap on the commands at the domain's backend at once (0: none).",
            |d| d.max_inflight,
        ),
        (
            "keel_qos_domain_inflight_commands",
            "Commands at the domain's backend now.",
            |d| d.inflight,
        ),
        (
            "keel_qos_domain_queued_commands",
            "Commands of the domain waiting in the scheduler now.",
            |d| d.queued,
        ),
    ];
    for (name, help, get) in families {
        family(o, name, "gauge", help);
        for d in &s.qos_domains {
            let label = d.namespaces.join(" ");
            sample(o, name, &[("namespaces", &label)], &int(u64::from(get(d))));
        }
    }
}
