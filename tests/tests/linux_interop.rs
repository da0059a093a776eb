//! Linux interop: Linux's NVMe/TCP host, driven by nvme-cli and fio as a user would drive them,
//! judges the release firmware. A Debian x86_64 kernel with Debian's nvme-cli and fio (booted
//! in a second QEMU, see `qemu/linux/`) shares an Ethernet segment with a firmware provisioned
//! from `qemu/linux/interop.toml` (two subsystems, one with an encrypted namespace, a static
//! address). In one guest boot it runs `nvme discover` and `connect-all` against the discovery
//! port, the Identify, log, feature and I/O commands of nvme-cli, writes and reads back with
//! digests off and on and with SQ flow control disabled (reads ended by C2HData with SUCCESS),
//! fio with CRC32C verification on 4 I/O queues, and a keep-alive expiry: the test freezes
//! the guest's QEMU (SIGSTOP) for longer than its KATO and resumes it. The
//! guest prints nvme-cli's JSON and exit codes on its console (`KEEL-OUT:`/`KEEL-RC:` records,
//! see qemu/linux/init); this test parses them and checks them against the description file
//! and the NVMe specifications. The firmware's traffic, captured by QEMU (`filter-dump`), must
//! decode in tshark as NVMe/TCP without malformed PDUs or NVMe/TCP-level warnings, digests
//! verified; afterwards the firmware must still run with a clean console.
//!
//! Needs, on first run, the Debian mirror (qemu/linux/prepare downloads the kernel, busybox,
//! nvme-cli, fio and their libraries once into `target/linux-cache`, or `$KEEL_LINUX_CACHE`)
//! and `qemu-system-x86` and `tshark` (installed through `qemu/deps` as root). When any of that
//! is impossible the test fails and says why; it never passes without having run the guest.
//!
//! Every check is made and reported before the test fails, so one run shows everything that is
//! wrong. Phases are timed and printed (run with `--nocapture` to see them and the console).

use keel_host_tools::provision::keel_provision::{self as kp, Backend, Device, Encryption};
use keel_tests::{BOOT_TIMEOUT, Build, Qemu, build_release_keelctl, free_port, root};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The device description the firmware is provisioned from (and the test's expectations).
const DESCRIPTION: &str = "qemu/linux/interop.toml";
/// Upper bound for the guest run: TCG boot, every phase, on a loaded 2-core machine.
const GUEST_TIMEOUT: Duration = Duration::from_secs(900);
/// The guest kernel's admin command timeout (nvme_core.admin_timeout). Linux's default is 60 s;
/// a target that never answers the shutdown of a disconnect costs that much per run.
const ADMIN_TIMEOUT_S: &str = "10";
/// The keep-alive timeout the guest connects with (`nvme connect --keep-alive-tmo=5`), and
/// how long the test freezes it: well past KATO and the target's grace.
const KATO: Duration = Duration::from_secs(5);
const FREEZE: Duration = Duration::from_secs(15);
const NVME_TCP_PORT: &str = "4420";

fn say(msg: impl AsRef<str>) {
    eprintln!("linux_interop: {}", msg.as_ref());
}

/// `qemu/deps` installs the Debian packages behind these commands when they are missing (as
/// root), or stops and names them.
fn ensure_tools() {
    let out = Command::new(root().join("qemu/deps"))
        .args(["qemu-system-x86_64=qemu-system-x86", "tshark=tshark"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .output()
        .expect("running qemu/deps");
    assert!(
        out.status.success(),
        "qemu/deps could not provide qemu-system-x86_64 and tshark (needed by the Linux interop \
         test):\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Downloads (once) and builds the guest kernel and initramfs.
fn prepare() -> Duration {
    let t = Instant::now();
    let out = Command::new(root().join("qemu/linux/prepare"))
        .stdin(Stdio::null())
        .output()
        .expect("running qemu/linux/prepare");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "qemu/linux/prepare failed: the Linux initiator (Debian kernel, busybox, nvme-cli, fio \
         from the Debian mirror) is not available on this machine, so the interop test cannot \
         run:\n{stderr}"
    );
    if !stderr.trim().is_empty() {
        eprint!("{stderr}");
    }
    t.elapsed()
}

// ---------------------------------------------------------------------------------------------
// What the description promises.

struct Ns {
    nsid: u32,
    bytes: u64,
    block_size: u64,
    encrypted: bool,
}

struct Subsys {
    nqn: String,
    /// The guest's record label: the NQN after its last colon (qemu/linux/init `label_of`).
    label: String,
    serial: String,
    model: String,
    namespaces: Vec<Ns>,
}

struct Expected {
    addr: String,
    subsystems: Vec<Subsys>,
}

fn expected(d: &Device) -> Expected {
    let addr = match d.network {
        kp::Network::Static { address: a, .. } => format!("{}.{}.{}.{}", a[0], a[1], a[2], a[3]),
        kp::Network::Dhcp => panic!("{DESCRIPTION}: the interop device needs a static address"),
    };
    let subsystems = d
        .subsystems
        .iter()
        .map(|s| Subsys {
            nqn: s.nqn.clone(),
            label: s.nqn.rsplit(':').next().unwrap_or(&s.nqn).to_string(),
            serial: s
                .serial
                .clone()
                .expect("the interop description names serials"),
            model: s
                .model
                .clone()
                .expect("the interop description names models"),
            namespaces: d
                .namespaces
                .iter()
                .filter(|n| n.subsystem == s.nqn)
                .map(|n| match n.backend {
                    Backend::Ram { size, block_size } => Ns {
                        nsid: n.nsid,
                        bytes: size,
                        block_size: u64::from(block_size),
                        encrypted: n.encryption != Encryption::None,
                    },
                    _ => panic!("{DESCRIPTION}: RAM namespaces only"),
                })
                .collect(),
        })
        .collect();
    Expected { addr, subsystems }
}

// ---------------------------------------------------------------------------------------------
// The guest's console records.

#[derive(Default, Debug)]
struct Record {
    out: Vec<String>,
    err: Vec<String>,
    rc: Option<i32>,
}

impl Record {
    fn stdout(&self) -> String {
        self.out.join("\n")
    }
    fn stderr(&self) -> String {
        self.err.join("\n")
    }
    /// Standard output as JSON (from its first line that opens an object or array: fio prints
    /// warnings before its JSON).
    fn json(&self) -> Result<Value, String> {
        let start = self
            .out
            .iter()
            .position(|l| l.starts_with('{') || l.starts_with('['))
            .ok_or_else(|| format!("no JSON in the output:\n{}", self.stdout()))?;
        serde_json::from_str(&self.out[start..].join("\n"))
            .map_err(|e| format!("output is not JSON ({e}):\n{}", self.stdout()))
    }
}

#[derive(Default)]
struct Guest {
    records: BTreeMap<String, Record>,
    /// `KEEL-INTEROP: <check> PASS|FAIL...` lines: check name -> the line.
    checks: BTreeMap<String, String>,
    console: String,
}

impl Guest {
    fn parse(console: &str) -> Guest {
        let mut g = Guest {
            console: console.to_string(),
            ..Guest::default()
        };
        for line in console.lines() {
            let mut it = line.splitn(3, ':');
            match (it.next(), it.next(), it.next()) {
                (Some("KEEL-OUT"), Some(n), Some(v)) => {
                    g.records.entry(n.into()).or_default().out.push(v.into())
                }
                (Some("KEEL-ERR"), Some(n), Some(v)) => {
                    g.records.entry(n.into()).or_default().err.push(v.into())
                }
                (Some("KEEL-RC"), Some(n), Some(v)) => {
                    g.records.entry(n.into()).or_default().rc = v.trim().parse().ok()
                }
                _ => {}
            }
            if let Some(rest) = line.strip_prefix("KEEL-INTEROP: ") {
                for verdict in [" PASS", " FAIL"] {
                    if let Some(i) = rest.find(verdict) {
                        g.checks.insert(rest[..i].to_string(), line.to_string());
                    }
                }
            }
        }
        g
    }

    fn rec(&self, name: &str) -> Result<&Record, String> {
        self.records
            .get(name)
            .ok_or_else(|| format!("the guest printed no record {name:?}"))
    }

    fn json(&self, name: &str) -> Result<Value, String> {
        self.rec(name)?.json()
    }

    /// Guest kernel log lines and its own notes: the evidence a failure message carries.
    fn evidence(&self) -> String {
        self.console
            .lines()
            .filter(|l| l.starts_with("keel-interop:") || l.starts_with("KEEL-INTEROP:"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

// ---------------------------------------------------------------------------------------------
// Checks: every one is made and reported; the test fails at the end with the list.

#[derive(Default)]
struct Checks {
    passed: Vec<String>,
    failed: Vec<String>,
}

impl Checks {
    fn check(&mut self, what: impl Into<String>, r: Result<(), String>) {
        match r {
            Ok(()) => self.passed.push(what.into()),
            Err(e) => self.failed.push(format!("{}: {e}", what.into())),
        }
    }
    fn that(&mut self, what: impl Into<String>, ok: bool, detail: impl FnOnce() -> String) {
        self.check(what, if ok { Ok(()) } else { Err(detail()) });
    }
}

fn ensure(ok: bool, detail: impl FnOnce() -> String) -> Result<(), String> {
    if ok { Ok(()) } else { Err(detail()) }
}

fn field<'a>(v: &'a Value, key: &str) -> Result<&'a Value, String> {
    v.get(key).ok_or_else(|| format!("no {key:?} in {v}"))
}
fn num(v: &Value, key: &str) -> Result<u64, String> {
    let f = field(v, key)?;
    f.as_u64()
        .or_else(|| f.as_str().and_then(|s| s.trim().parse().ok()))
        .ok_or_else(|| format!("{key:?} is not a number: {f}"))
}
fn text<'a>(v: &'a Value, key: &str) -> Result<&'a str, String> {
    let f = field(v, key)?;
    f.as_str()
        .map(str::trim)
        .ok_or_else(|| format!("{key:?} is not a string: {f}"))
}

/// An nvme-cli command that must have succeeded.
fn succeeded<'a>(g: &'a Guest, name: &str) -> Result<&'a Record, String> {
    let r = g.rec(name)?;
    ensure(r.rc == Some(0), || {
        format!(
            "exit code {:?}; stderr: {}; stdout: {}",
            r.rc,
            r.stderr(),
            r.stdout()
        )
    })?;
    Ok(r)
}

/// The NVMe status nvme-cli reports for a failed command: `NVMe status: <name>: <text>(0xSSSS)`;
/// returns SCT and SC (bits 10:0, without More and Do Not Retry).
fn nvme_status(r: &Record) -> Option<u16> {
    let all = format!("{}\n{}", r.stderr(), r.stdout());
    let line = all.lines().find(|l| l.contains("NVMe status:"))?;
    let hex = line.rsplit("(0x").next()?.trim_end_matches(')');
    u16::from_str_radix(hex, 16).ok().map(|s| s & 0x7ff)
}

/// An nvme-cli command that must have failed with NVMe status `want` (SCT << 8 | SC).
fn failed_with(g: &Guest, name: &str, want: u16) -> Result<(), String> {
    let r = g.rec(name)?;
    ensure(
        r.rc.is_some_and(|c| c != 0) && nvme_status(r) == Some(want),
        || {
            format!(
                "want a failure with status {want:#x}; exit code {:?}, output: {} {}",
                r.rc,
                r.stderr(),
                r.stdout()
            )
        },
    )
}

// ---------------------------------------------------------------------------------------------
// The checks of each phase.

/// `nvme discover -o json`: one record per subsystem, each naming the subsystem, the address
/// and port the target serves it on, TCP, IPv4, an NVM subsystem (NVMe-oF 1.1 Figure 26 fields
/// as nvme-cli decodes them).
fn check_discover(c: &mut Checks, g: &Guest, want: &Expected) {
    let r = (|| {
        succeeded(g, "discover")?;
        let log = g.json("discover")?;
        let recs = field(&log, "records")?
            .as_array()
            .ok_or("records is not an array")?;
        let mut nqns = BTreeSet::new();
        for e in recs {
            ensure(text(e, "trtype")? == "tcp", || format!("trtype: {e}"))?;
            ensure(text(e, "adrfam")? == "ipv4", || format!("adrfam: {e}"))?;
            ensure(text(e, "subtype")? == "nvme subsystem", || {
                format!("subtype: {e}")
            })?;
            ensure(text(e, "traddr")? == want.addr, || {
                format!("traddr, want {}: {e}", want.addr)
            })?;
            ensure(text(e, "trsvcid")? == NVME_TCP_PORT, || {
                format!("trsvcid, want {NVME_TCP_PORT}: {e}")
            })?;
            ensure(nqns.insert(text(e, "subnqn")?.to_string()), || {
                format!("subsystem listed twice: {e}")
            })?;
        }
        let want_nqns: BTreeSet<String> = want.subsystems.iter().map(|s| s.nqn.clone()).collect();
        ensure(nqns == want_nqns, || {
            format!("subnqn of the entries {nqns:?}, want {want_nqns:?}")
        })
    })();
    c.check(
        "nvme discover: every entry's subnqn, traddr, trsvcid, trtype, adrfam, subtype",
        r,
    );
}

/// `nvme connect-all` connected every subsystem (a live controller at the advertised address),
/// `nvme list-subsys` and `nvme list` show them and their namespaces.
fn check_connect_all(c: &mut Checks, g: &Guest, want: &Expected) {
    c.check("nvme connect-all", succeeded(g, "connect-all").map(|_| ()));
    for s in &want.subsystems {
        let r = (|| {
            let line = g.rec(&format!("subsystem.{}", s.label))?.stdout();
            let f: Vec<&str> = line.split_whitespace().collect();
            ensure(f.len() >= 4 && f[0] == s.nqn && f[2] == "live", || {
                format!("controller: {line}")
            })?;
            ensure(
                f[3].contains(&format!("traddr={},trsvcid={NVME_TCP_PORT}", want.addr)),
                || format!("controller address: {line}"),
            )
        })();
        c.check(format!("connect-all connected {}", s.nqn), r);
    }
    let r = (|| {
        succeeded(g, "list-subsys")?;
        let v = g.json("list-subsys")?;
        let text = v.to_string();
        for s in &want.subsystems {
            ensure(text.contains(&format!("\"{}\"", s.nqn)), || {
                format!("{} missing: {v}", s.nqn)
            })?;
        }
        ensure(
            text.contains("\"tcp\"") && text.contains("\"live\""),
            || format!("no live tcp path: {v}"),
        )
    })();
    c.check("nvme list-subsys shows both subsystems, live over tcp", r);

    let r = (|| {
        succeeded(g, "list")?;
        let v = g.json("list")?;
        let devs = field(&v, "Devices")?
            .as_array()
            .ok_or("Devices is not an array")?;
        let total: usize = want.subsystems.iter().map(|s| s.namespaces.len()).sum();
        ensure(devs.len() == total, || {
            format!("{} devices, want {total}: {v}", devs.len())
        })?;
        for s in &want.subsystems {
            for n in &s.namespaces {
                let d = devs
                    .iter()
                    .find(|d| {
                        text(d, "SerialNumber").ok() == Some(s.serial.as_str())
                            && num(d, "NameSpace").ok() == Some(u64::from(n.nsid))
                    })
                    .ok_or_else(|| format!("no device for {} namespace {}", s.serial, n.nsid))?;
                ensure(text(d, "ModelNumber")? == s.model, || format!("model: {d}"))?;
                ensure(num(d, "PhysicalSize")? == n.bytes, || {
                    format!("size, want {}: {d}", n.bytes)
                })?;
                ensure(num(d, "SectorSize")? == n.block_size, || {
                    format!("sector size, want {}: {d}", n.block_size)
                })?;
                ensure(num(d, "MaximumLBA")? == n.bytes / n.block_size, || {
                    format!("LBA count: {d}")
                })?;
            }
        }
        Ok(())
    })();
    c.check(
        "nvme list: every namespace with its size, sector size, model and serial",
        r,
    );
}

/// Identify Controller, Namespace, active namespace list, namespace identification
/// descriptors, firmware slot log and features of each subsystem's controller.
fn check_identify(c: &mut Checks, g: &Guest, want: &Expected) {
    let mut unique_ids = BTreeMap::new();
    for s in &want.subsystems {
        let l = &s.label;
        let id = g.json(&format!("id-ctrl.{l}"));
        let r = (|| {
            succeeded(g, &format!("id-ctrl.{l}"))?;
            let id = id.clone()?;
            ensure(text(&id, "sn")? == s.serial, || format!("sn: {id}"))?;
            ensure(text(&id, "mn")? == s.model, || format!("mn: {id}"))?;
            ensure(text(&id, "subnqn")? == s.nqn, || format!("subnqn: {id}"))?;
            // An I/O controller (CNTRLTYPE 1) with 64-byte SQEs and 16-byte CQEs (SQES/CQES
            // 6h and 4h in both nibbles, NVMe base 2.0 Figure 275).
            ensure(num(&id, "cntrltype")? == 1, || format!("cntrltype: {id}"))?;
            ensure(
                num(&id, "sqes")? == 0x66 && num(&id, "cqes")? == 0x44,
                || format!("sqes/cqes: {id}"),
            )?;
            ensure(num(&id, "kas")? > 0, || format!("kas: {id}"))?;
            ensure(num(&id, "nn")? >= s.namespaces.len() as u64, || {
                format!("nn: {id}")
            })
        })();
        c.check(
            format!("nvme id-ctrl {l}: sn, mn, subnqn, controller type"),
            r,
        );
        // ONCS (NVMe base 2.0 Figure 275): Compare bit 0, Dataset Management bit 2, Write
        // Zeroes bit 3, Verify bit 7, Copy bit 8: the commands below use each.
        let r = (|| {
            let oncs = num(&id.clone()?, "oncs")?;
            let missing: Vec<&str> = [
                (0, "Compare"),
                (2, "Dataset Management"),
                (3, "Write Zeroes"),
                (7, "Verify"),
                (8, "Copy"),
            ]
            .iter()
            .filter(|(b, _)| oncs & (1 << b) == 0)
            .map(|(_, n)| *n)
            .collect();
            ensure(missing.is_empty(), || {
                format!("ONCS {oncs:#x} does not advertise {missing:?}")
            })
        })();
        c.check(
            format!("nvme id-ctrl {l}: ONCS advertises the commands served"),
            r,
        );

        let r = (|| {
            succeeded(g, &format!("list-ns.{l}"))?;
            let v = g.json(&format!("list-ns.{l}"))?;
            let got: Vec<u64> = field(&v, "nsid_list")?
                .as_array()
                .ok_or("nsid_list is not an array")?
                .iter()
                .map(|e| num(e, "nsid"))
                .collect::<Result<_, _>>()?;
            let want: Vec<u64> = s.namespaces.iter().map(|n| u64::from(n.nsid)).collect();
            ensure(got == want, || format!("{got:?}, want {want:?}"))
        })();
        c.check(format!("nvme list-ns {l}"), r);

        let r = (|| {
            succeeded(g, &format!("fw-log.{l}"))?;
            let v = g.json(&format!("fw-log.{l}"))?;
            let slots = v
                .as_object()
                .and_then(|o| o.values().next())
                .ok_or_else(|| format!("no device object: {v}"))?;
            let afi = num(slots, "Active Firmware Slot (afi)")?;
            let slot = afi & 0x7;
            ensure((1..=7).contains(&slot), || format!("afi {afi:#x}"))?;
            // nvme-cli prints a slot's 8 revision bytes as a little-endian number and text.
            let frs = text(slots, &format!("Firmware Rev Slot {slot}"))?;
            let bytes = frs
                .split_whitespace()
                .next()
                .and_then(|n| n.parse::<u64>().ok())
                .ok_or_else(|| format!("slot {slot}: {frs:?}"))?
                .to_le_bytes();
            let rev = String::from_utf8_lossy(&bytes);
            let rev = rev.trim_end_matches([' ', '\0']);
            let id = id.clone()?;
            let fr = text(&id, "fr")?;
            ensure(rev == fr, || {
                format!("active slot {slot} revision {rev:?}, Identify Controller FR {fr:?}")
            })
        })();
        c.check(
            format!("nvme fw-log {l}: the active slot holds the running revision"),
            r,
        );

        check_features(c, g, l);

        for n in &s.namespaces {
            let name = format!("id-ns.{l}.{}", n.nsid);
            let r = (|| {
                succeeded(g, &name)?;
                let v = g.json(&name)?;
                let blocks = n.bytes / n.block_size;
                ensure(
                    num(&v, "nsze")? == blocks && num(&v, "ncap")? == blocks,
                    || format!("nsze/ncap, want {blocks}: {v}"),
                )?;
                let flbas = num(&v, "flbas")? & 0xf;
                let lbaf = field(&v, "lbafs")?
                    .get(flbas as usize)
                    .ok_or_else(|| format!("no LBA format {flbas}: {v}"))?;
                ensure(1u64 << num(lbaf, "ds")? == n.block_size, || {
                    format!("LBA format {flbas} {lbaf}, want {} bytes", n.block_size)
                })
            })();
            c.check(format!("nvme id-ns {l} {}: size and block size", n.nsid), r);

            let name = format!("ns-descs.{l}.{}", n.nsid);
            let r = (|| {
                succeeded(g, &name)?;
                let v = g.json(&name)?;
                let descs = field(&v, "ns-descs")?
                    .as_array()
                    .ok_or_else(|| format!("ns-descs is not an array: {v}"))?;
                // NVMe base 2.0 §5.17.2.3 (Figure 276): a namespace globally unique identifier
                // (EUI64 1h, NGUID 2h or UUID 3h) the host can tell it by, and the Command Set
                // Identifier (4h): the NVM command set (0).
                let mut ids = Vec::new();
                let mut csi = None;
                for d in descs {
                    let t = text(d, "type")?;
                    let val = text(d, t)?.to_string();
                    match t {
                        "csi" => csi = Some(val),
                        _ if val.chars().any(|ch| ch.is_ascii_hexdigit() && ch != '0') => {
                            ids.push(val)
                        }
                        _ => {}
                    }
                }
                ensure(!ids.is_empty(), || {
                    format!("no EUI64, NGUID or UUID descriptor: {v}")
                })?;
                ensure(csi.as_deref() == Some("0"), || {
                    format!("no Command Set Identifier descriptor for the NVM set: {v}")
                })?;
                for i in ids {
                    if let Some(other) = unique_ids.insert(i.clone(), name.clone()) {
                        return Err(format!("identifier {i} also names {other}"));
                    }
                }
                Ok(())
            })();
            c.check(
                format!(
                    "nvme ns-descs {l} {}: a unique identifier, the command set",
                    n.nsid
                ),
                r,
            );
        }
    }
}

/// `nvme get-feature -f FID` for every FID of NVMe base 2.0 Figure 317 up to 20h and Host
/// Identifier (81h). nvme-cli 2.3 has no JSON for features: a line `get-feature:0x07 (Number
/// of Queues), Current value:0x00070007`. The features the firmware supports (README) answer
/// with their values; every other FID is refused with Invalid Field in Command, nothing else.
fn check_features(c: &mut Checks, g: &Guest, l: &str) {
    let mut got = BTreeMap::new();
    let mut other = Vec::new();
    for fid in (1..=0x20u32).chain([0x81]) {
        let Ok(r) = g.rec(&format!("get-feature.{l}.{fid:02x}")) else {
            other.push(format!("{fid:#04x}: no record"));
            continue;
        };
        let value = r
            .out
            .iter()
            .find_map(|line| line.strip_prefix("get-feature:"))
            .and_then(|rest| rest.rsplit("value:").next())
            .and_then(|v| u32::from_str_radix(v.trim().trim_start_matches("0x"), 16).ok());
        match (r.rc, value) {
            (Some(0), Some(v)) => {
                got.insert(fid, v);
            }
            _ if nvme_status(r) == Some(0x002) => {}
            _ => other.push(format!(
                "{fid:#04x}: {:?} {} {}",
                r.rc,
                r.stderr(),
                r.stdout()
            )),
        }
    }
    say(format!("get-feature {l}: {got:x?}"));
    c.that(
        format!("nvme get-feature {l}: each FID answered or refused with Invalid Field"),
        other.is_empty(),
        || other.join("; "),
    );
    let r = (|| {
        // Number of Queues (07h): NSQA and NCQA, both 0's based (NVMe base 2.0 §5.27.1.7).
        let nq = *got.get(&0x07).ok_or("no Number of Queues (07h)")?;
        ensure(nq & 0xffff == nq >> 16, || {
            format!("Number of Queues {nq:#010x}")
        })?;
        // Keep Alive Timer (0Fh): the KATO the host connected with, in ms (connect-all's
        // default, 5 s; NVMe-oF 1.1 §3.3 Connect KATO).
        let kato = *got.get(&0x0f).ok_or("no Keep Alive Timer (0Fh)")?;
        ensure(u64::from(kato) == KATO.as_millis() as u64, || {
            format!("Keep Alive Timer {kato} ms, want {} ms", KATO.as_millis())
        })?;
        // Asynchronous Event Configuration (0Bh): Linux enables Namespace Attribute Notices
        // (bit 8) as OAES advertises them.
        let aec = *got
            .get(&0x0b)
            .ok_or("no Asynchronous Event Configuration (0Bh)")?;
        ensure(aec & (1 << 8) != 0, || format!("AEC {aec:#x}"))?;
        ensure(got.contains_key(&0x01), || "no Arbitration (01h)".into())?;
        // The features NVMe base 2.0 Figure 317 makes mandatory for an I/O controller:
        // Power Management, Temperature Threshold, Error Recovery, Write Atomicity Normal.
        for (fid, name) in [
            (0x02, "Power Management (02h)"),
            (0x04, "Temperature Threshold (04h)"),
            (0x05, "Error Recovery (05h)"),
            (0x0a, "Write Atomicity Normal (0Ah)"),
        ] {
            ensure(got.contains_key(&fid), || format!("no {name}"))?;
        }
        Ok(())
    })();
    c.check(
        format!(
            "nvme get-feature {l}: Number of Queues, KATO, AEC, Arbitration, the mandatory ones"
        ),
        r,
    );
}

/// Write Zeroes, Deallocate (`nvme dsm --ad`) and `blkdiscard` on every namespace: the guest
/// wrote a pattern, zeroed or deallocated 8 blocks in its middle and read it back.
fn check_zeroes_and_deallocate(c: &mut Checks, g: &Guest, want: &Expected) {
    for s in &want.subsystems {
        for n in &s.namespaces {
            let l = format!("{}.{}", s.label, n.nsid);
            let what = if n.encrypted { " (AES-XTS)" } else { "" };
            c.check(
                format!("nvme write-zeroes {l}{what}"),
                succeeded(g, &format!("write-zeroes.{l}")).map(|_| ()),
            );
            c.check(
                format!(
                    "nvme write-zeroes {l}{what}: the range reads back zeroes, the rest unchanged"
                ),
                guest_passed(g, &format!("write-zeroes.{l} readback")),
            );
            // DLFEAT bits 2:0 (NVMe base 2.0 Figure 278 / NVM command set Figure 97): 001b =
            // deallocated blocks read as zeroes; 000b = not reported (anything may read back).
            let dlfeat = g
                .json(&format!("id-ns.{l}"))
                .and_then(|v| num(&v, "dlfeat"))
                .unwrap_or(0);
            for (cmd, rec) in [("nvme dsm --ad", "dsm"), ("blkdiscard", "blkdiscard")] {
                let r = (|| {
                    succeeded(g, &format!("{rec}.{l}"))?;
                    let got = g.rec(&format!("{rec}-readback.{l}"))?.stdout();
                    ensure(got.starts_with("outside=same "), || {
                        format!("the blocks around the range changed ({got})")
                    })?;
                    ensure(dlfeat & 7 != 1 || got.ends_with(" inside=zero"), || {
                        format!("DLFEAT {dlfeat:#x} says zeroes; the range reads back {got}")
                    })
                })();
                c.check(format!("{cmd} {l}{what}: reads back as DLFEAT says"), r);
            }
        }
    }
}

fn guest_passed(g: &Guest, check: &str) -> Result<(), String> {
    match g.checks.get(check) {
        Some(l) if l.contains(&format!("{check} PASS")) => Ok(()),
        Some(l) => Err(l.clone()),
        None => Err(format!("the guest printed no result for {check:?}")),
    }
}

/// The commands phase on the first subsystem's namespace 1: flush, compare, verify, copy, failing
/// commands and the error log, SMART, the changed namespace list, reset, disconnect.
fn check_commands(c: &mut Checks, g: &Guest, all: &Expected) {
    c.check("nvme flush", succeeded(g, "flush").map(|_| ()));
    c.check(
        "nvme compare of matching data succeeds",
        succeeded(g, "compare.same").map(|_| ()),
    );
    // Compare Failure: SCT 2h, SC 85h (NVMe NVM command set 1.0 Figure 33).
    c.check(
        "nvme compare of different data fails with Compare Failure",
        failed_with(g, "compare.diff", 0x285),
    );
    c.check("nvme verify", succeeded(g, "verify").map(|_| ()));
    // LBA Out of Range: SCT 0h, SC 80h.
    c.check(
        "nvme verify past the end: LBA Out of Range",
        failed_with(g, "verify.past-end", 0x080),
    );
    c.check(
        "nvme read past the end: LBA Out of Range",
        failed_with(g, "read.past-end", 0x080),
    );
    let r = (|| {
        succeeded(g, "copy")?;
        let got = g.rec("copy-readback")?.stdout();
        ensure(got == "same", || {
            format!("the destination reads back {got}")
        })
    })();
    c.check(
        "nvme copy (format 0, one range): the destination holds the source",
        r,
    );

    check_error_log(c, g);
    check_smart(c, g);

    let r = (|| {
        succeeded(g, "get-log-04")?;
        let hex = g.rec("get-log-04")?.stdout();
        ensure(hex.len() == 8192, || {
            format!("{} bytes, want 4096", hex.len() / 2)
        })?;
        // Changed Namespace List (NVMe base 2.0 Figure 209): no namespace changed since the
        // host connected, so no NSID (all zero).
        ensure(hex.bytes().all(|b| b == b'0'), || {
            format!("log 04h lists namespaces: {}", &hex[..64])
        })
    })();
    c.check("nvme get-log --log-id=4 (changed namespace list)", r);

    c.check("nvme reset", succeeded(g, "reset").map(|_| ()));
    let r = g
        .rec("reset.state")
        .and_then(|r| ensure(r.stdout() == "live", || format!("state {}", r.stdout())));
    c.check("the controller is live again after nvme reset", r);
    c.check(
        "data written before nvme reset reads back",
        guest_passed(g, "reset readback"),
    );
    for t in &all.subsystems {
        let r = (|| {
            let r = succeeded(g, &format!("disconnect.{}", t.label))?;
            let want = format!("NQN:{} disconnected 1 controller(s)", t.nqn);
            ensure(r.stdout().contains(&want), || {
                format!("output {:?}, want {want:?}", r.stdout())
            })?;
            guest_passed(g, &format!("disconnect.{}", t.label))
        })();
        c.check(format!("nvme disconnect -n {}", t.nqn), r);
    }
}

/// Error Information log (NVMe base 2.0 §5.16.1.2, Figure 206): after the commands phase, the
/// entries logged since the first read are newest first, one error count each, and those of I/O
/// queues are the three I/O commands that failed, with their status, namespace and LBA.
fn check_error_log(c: &mut Checks, g: &Guest) {
    let r = (|| {
        succeeded(g, "error-log.before")?;
        succeeded(g, "error-log.after")?;
        let entries = |name: &str| -> Result<Vec<Value>, String> {
            let v = g.json(name)?;
            Ok(field(&v, "errors")?
                .as_array()
                .ok_or("errors is not an array")?
                .iter()
                .filter(|e| num(e, "error_count").unwrap_or(0) != 0)
                .cloned()
                .collect())
        };
        let before = entries("error-log.before")?;
        let after = entries("error-log.after")?;
        let count = |e: &[Value]| e.first().map_or(Ok(0), |e| num(e, "error_count"));
        let (b, a) = (count(&before)?, count(&after)?);
        // Newest first, one count each: the entries logged since "before".
        let new: Vec<&Value> = after
            .iter()
            .take_while(|e| num(e, "error_count").is_ok_and(|n| n > b))
            .collect();
        for (i, e) in new.iter().enumerate() {
            ensure(num(e, "error_count")? == a - i as u64, || {
                format!("entries not newest first, one count each: {new:?}")
            })?;
        }
        ensure(new.len() as u64 == a - b, || {
            format!("count went {b} -> {a}, {} new entries: {new:?}", new.len())
        })?;
        // The I/O commands that failed, newest first: read past the end, verify past the end,
        // compare (status field >> 1 as nvme-cli prints it: SCT in bits 10:8, SC in 7:0).
        // (nvme-cli's own Identify probes may log admin entries in between: SQ 0.)
        let io: Vec<&&Value> = new
            .iter()
            .filter(|e| num(e, "sqid").is_ok_and(|q| q != 0))
            .collect();
        let status = |e: &Value| num(e, "status_field").map(|s| s & 0x7ff);
        let got: Vec<u64> = io.iter().map(|e| status(e)).collect::<Result<_, _>>()?;
        ensure(got == [0x080, 0x080, 0x285], || {
            format!("I/O entries' statuses {got:x?}, want [80, 80, 285]: {io:?}")
        })?;
        for e in &io {
            ensure(num(e, "nsid")? == 1, || format!("nsid: {e}"))?;
        }
        let lba = num(io[2], "lba")?;
        ensure((256..264).contains(&lba), || {
            format!("compare failure at LBA {lba}, want within the compared 256..263")
        })
    })();
    c.check(
        "nvme error-log: an entry per failed command, newest first, with SQ, status, NSID, LBA",
        r,
    );
}

/// SMART / Health log (NVMe base 2.0 §5.16.1.3, Figure 207) against what Linux itself counted
/// on the namespace's block device (`/sys/block/*/stat`: read I/Os, merges, sectors, ticks,
/// write I/Os, merges, sectors...): the device saw at least those commands and data units
/// (thousands of 512-byte units, rounded up).
fn check_smart(c: &mut Checks, g: &Guest) {
    let r = (|| {
        succeeded(g, "smart-log")?;
        let v = g.json("smart-log")?;
        let stat: Vec<u64> = g
            .rec("block-stat")?
            .stdout()
            .split_whitespace()
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        ensure(stat.len() >= 7, || format!("block stat: {stat:?}"))?;
        let (rd_ios, rd_sect, wr_ios, wr_sect) = (stat[0], stat[2], stat[4], stat[6]);
        let units = |sectors: u64| sectors.div_ceil(1000);
        let mut why = Vec::new();
        for (key, min) in [
            ("data_units_read", units(rd_sect)),
            ("data_units_written", units(wr_sect)),
            ("host_read_commands", rd_ios),
            ("host_write_commands", wr_ios),
            ("num_err_log_entries", 3),
            ("power_cycles", 1),
        ] {
            let got = num(&v, key)?;
            if got < min.max(1) {
                why.push(format!("{key} {got}, want at least {}", min.max(1)));
            }
        }
        for key in ["critical_warning", "media_errors"] {
            if num(&v, key)? != 0 {
                why.push(format!("{key} {}", num(&v, key)?));
            }
        }
        ensure(why.is_empty(), || format!("{}: {v}", why.join("; ")))
    })();
    c.check(
        "nvme smart-log: data units and commands at least what Linux counted",
        r,
    );
}

fn check_digest_runs(c: &mut Checks, g: &Guest) {
    c.check(
        "nvme connect again after nvme disconnect: the data is still there",
        guest_passed(g, "reconnect readback"),
    );
    // `sqflow`: --data-digest --disable-sqflow, reads completed by C2HData with SUCCESS.
    for s in ["none", "data", "both", "sqflow"] {
        let r = g
            .json(&format!("connect.{s}"))
            .and_then(|v| text(&v, "device").map(|_| ()));
        c.check(
            format!("nvme connect (digests {s}) -o json names the device"),
            r,
        );
        c.check(
            format!("digests={s}: write, read back 4 ways, kernel log clean"),
            guest_passed(g, &format!("digests={s}")),
        );
        c.check(
            format!("digests={s}: nvme disconnect, orderly"),
            guest_passed(g, &format!("digests={s} disconnect")),
        );
    }
}

/// fio: 4 jobs of QD32 on 4 I/O queues, with header and data digests, CRC32C-verified.
fn check_fio(c: &mut Checks, g: &Guest) {
    let r = (|| {
        let q = g.rec("fio.queues")?.stdout();
        ensure(q == "4", || {
            format!("Linux created {q:?} I/O queues, want 4")
        })?;
        let rec = succeeded(g, "fio")?;
        let v = rec.json()?;
        let jobs = field(&v, "jobs")?.as_array().ok_or("jobs")?;
        ensure(jobs.len() == 4, || format!("{} jobs", jobs.len()))?;
        for j in jobs {
            ensure(num(j, "error")? == 0, || format!("job error: {j}"))?;
            let written = num(field(j, "write")?, "io_bytes")?;
            let verified = num(field(j, "read")?, "io_bytes")?;
            ensure(written == 8 << 20 && verified == 8 << 20, || {
                format!("job wrote {written} and read back {verified} bytes, want 8 MiB each")
            })?;
        }
        guest_passed(g, "fio kernel log")
    })();
    c.check(
        "fio randwrite QD32 x 4 jobs, 4 I/O queues, digests, verify=crc32c",
        r,
    );
}

// ---------------------------------------------------------------------------------------------
// The two QEMUs.

/// The firmware provisioned from the description, on a socket network segment (listening on
/// a loopback port), its traffic captured.
struct Firmware {
    qemu: Qemu,
    segment: u16,
    pcap: PathBuf,
}

fn boot_firmware() -> (Firmware, Duration) {
    build_release_keelctl();
    let elf = keel_tests::image(Build::Release).with_extension("");
    let dir = root().join("target/linux-interop");
    std::fs::create_dir_all(&dir).expect("creating target/linux-interop");
    let pcap = dir.join(format!("interop-{}.pcap", std::process::id()));
    let _ = std::fs::remove_file(&pcap);
    let segment = free_port();
    let t = Instant::now();
    let mut qemu = Qemu::start(&[
        "--elf".to_string(),
        elf.display().to_string(),
        "--config".to_string(),
        root().join(DESCRIPTION).display().to_string(),
        "--net-socket".to_string(),
        format!("listen=127.0.0.1:{segment}"),
        "--".to_string(),
        "-object".to_string(),
        format!("filter-dump,id=f0,netdev=net0,file={}", pcap.display()),
    ]);
    qemu.wait_for("keel: ready", BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("firmware did not get ready: {e}"));
    (
        Firmware {
            qemu,
            segment,
            pcap,
        },
        t.elapsed(),
    )
}

/// When the guest was frozen and resumed (wall clock, seconds since the epoch).
struct Freeze {
    stopped: f64,
    resumed: f64,
}

fn epoch() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn signal(sig: &str, pid: &str) {
    let st = Command::new("kill")
        .args([sig, pid])
        .status()
        .expect("running kill");
    assert!(st.success(), "kill {sig} {pid} failed");
}

/// Runs qemu/linux/run-initiator in its own process group (killed whole if the test ends
/// first), streams its console, freezes the guest's QEMU when it asks. Returns the console and
/// the freeze times.
fn run_guest(fw: &Firmware, nqn: &str) -> (String, Option<Freeze>, Duration) {
    let pidfile = root().join(format!(
        "target/linux-interop/guest-{}.pid",
        std::process::id()
    ));
    let _ = std::fs::remove_file(&pidfile);
    let mut child = Command::new(root().join("qemu/linux/run-initiator"))
        .args(["--net-socket", &format!("connect=127.0.0.1:{}", fw.segment)])
        .args(["--nqn", nqn, "--admin-timeout", ADMIN_TIMEOUT_S])
        .args(["--timeout", &GUEST_TIMEOUT.as_secs().to_string()])
        .arg("--pidfile")
        .arg(&pidfile)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("starting qemu/linux/run-initiator");
    let group = child.id();
    let (tx, rx) = channel::<String>();
    for stream in [
        Box::new(child.stdout.take().expect("stdout")) as Box<dyn Read + Send>,
        Box::new(child.stderr.take().expect("stderr")),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
    }
    drop(tx);
    let t = Instant::now();
    let kill_group = || {
        // Our own process group only (process_group(0) above): run-initiator, timeout, QEMU.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{group}")])
            .status();
    };
    let mut console = String::new();
    let mut freeze = None;
    let deadline = Instant::now() + GUEST_TIMEOUT + Duration::from_secs(60);
    loop {
        match recv(&rx, deadline) {
            Ok(line) => {
                eprintln!("[guest {:6.1}] {line}", t.elapsed().as_secs_f64());
                if line.starts_with("KEEL-INTEROP: FREEZE") && freeze.is_none() {
                    let pid = std::fs::read_to_string(&pidfile)
                        .unwrap_or_else(|e| panic!("guest pid file: {e}"));
                    let pid = pid.trim();
                    let stopped = epoch();
                    signal("-STOP", pid);
                    say(format!(
                        "guest QEMU {pid} stopped for {FREEZE:?} (KATO {KATO:?})"
                    ));
                    std::thread::sleep(FREEZE);
                    let resumed = epoch();
                    signal("-CONT", pid);
                    say("guest resumed");
                    freeze = Some(Freeze { stopped, resumed });
                }
                console.push_str(&line);
                console.push('\n');
            }
            Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {
                kill_group();
                panic!("the guest run did not end within its bound; console:\n{console}");
            }
        }
    }
    let _ = child.wait();
    kill_group();
    let _ = std::fs::remove_file(&pidfile);
    (console, freeze, t.elapsed())
}

fn recv(rx: &Receiver<String>, deadline: Instant) -> Result<String, RecvTimeoutError> {
    rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
}

// ---------------------------------------------------------------------------------------------
// The capture.

/// QEMU still running (not exited, not a zombie).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').map(|(_, r)| r.trim_start().to_string()))
        .is_some_and(|r| !r.starts_with('Z') && !r.starts_with('X'))
}

fn tshark(pcap: &Path, extra: &[&str]) -> Output {
    let out = Command::new("tshark")
        .arg("-r")
        .arg(pcap)
        .args([
            "-d",
            "tcp.port==4420,nvme-tcp",
            "-d",
            "tcp.port==8009,nvme-tcp",
        ])
        .args([
            "-o",
            "nvme-tcp.check_hdgst:TRUE",
            "-o",
            "nvme-tcp.check_ddgst:TRUE",
            // The IPv4 header and TCP checksums too: the socket netdev offers no checksum
            // offload, so every frame must carry complete, right checksums.
            "-o",
            "ip.check_checksum:TRUE",
            "-o",
            "tcp.check_checksum:TRUE",
        ])
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .expect("running tshark");
    assert!(
        out.status.success(),
        "tshark {extra:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// What one pass of tshark over the capture shows.
#[derive(Default, Debug)]
struct Capture {
    frames: usize,
    malformed: Vec<String>,
    /// Malformed frames that are known defects of Wireshark 4.0's NVMe decoder, not of the
    /// bytes: a one-entry (64-byte) Error Information log page (the decoder reads a 24-byte
    /// reserved field at byte 42 of the entry, which ends at byte 63 in NVMe base 2.0 Figure
    /// 206: two bytes past the page, an exception), and the completion of Get Features
    /// Arbitration (the decoder adds a field it never registered: "Unregistered hf").
    decoder_defects: usize,
    pdu_types: BTreeMap<u32, usize>,
    hdgst: (usize, Vec<String>),
    ddgst: (usize, Vec<String>),
    /// TCP and IPv4 header checksums verified good, and the frames whose checksum is not.
    checksums: (usize, Vec<String>),
    /// TCP checksums of the Linux peer's frames written as 0xFFFF where the sum is 0x0000:
    /// the other one's-complement zero, which Linux writes on purpose (`CSUM_MANGLED_0` in
    /// `skb_checksum_help`) and every receiver accepts; Wireshark flags it (RFC 1624). About
    /// one frame in 65536. Counted as verified; Keel's own frames get no such allowance.
    peer_minus_zero: usize,
    /// Frames carrying TCP.
    tcp_frames: usize,
    /// Times (epoch seconds) at which the target ended an NVMe/TCP connection (FIN or RST
    /// from port 4420).
    target_closes: Vec<f64>,
    /// Expert warnings and errors: (protocol, "count x summary").
    expert: Vec<(String, String)>,
}

/// One tshark pass: per frame its time, malformed marker, PDU types, digest statuses, TCP
/// flags and checksums (`target_ip`: Keel's address, whose frames get no 0xFFFF allowance), then the expert summary (`-z expert,warn`).
fn read_capture(pcap: &Path, target_ip: &str) -> Capture {
    assert!(pcap.exists(), "no capture at {}", pcap.display());
    let fields = [
        "frame.time_epoch",
        "_ws.malformed",
        "nvme-tcp.type",
        "nvme-tcp.hdgst.status",
        "nvme-tcp.ddgst.status",
        "tcp.srcport",
        "tcp.flags.fin",
        "tcp.flags.reset",
        "nvme.cmd.get_logpage.errinf.errcnt",
        "nvme-tcp.data.length",
        "nvme.cqe.dword0.get_features.arb.ab",
        "tcp.checksum.status",
        "ip.checksum.status",
        "ip.src",
        "tcp.checksum",
        "tcp.checksum_calculated",
    ];
    let mut args = vec!["-T", "fields", "-E", "separator=/t", "-z", "expert,warn"];
    for f in fields {
        args.extend(["-e", f]);
    }
    let out = String::from_utf8_lossy(&tshark(pcap, &args).stdout).into_owned();
    let mut cap = Capture::default();
    let (frames, expert) = match out.find("\n=====") {
        Some(i) => out.split_at(i),
        None => (out.as_str(), ""),
    };
    let digest = |v: &str, acc: &mut (usize, Vec<String>)| {
        for s in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            if s == "1" {
                acc.0 += 1;
            } else {
                acc.1.push(s.to_string());
            }
        }
    };
    for line in frames.lines() {
        let f: Vec<&str> = line.split('\t').collect();
        if f.len() < fields.len() {
            continue;
        }
        cap.frames += 1;
        if !f[1].is_empty() {
            if (!f[8].is_empty() && f[9] == "64") || !f[10].is_empty() {
                cap.decoder_defects += 1;
            } else {
                cap.malformed.push(line.to_string());
            }
        }
        for t in f[2].split(',').filter_map(|t| t.trim().parse().ok()) {
            *cap.pdu_types.entry(t).or_default() += 1;
        }
        digest(f[3], &mut cap.hdgst);
        digest(f[4], &mut cap.ddgst);
        if !f[5].is_empty() {
            cap.tcp_frames += 1;
        }
        // Checksum status: 1 good, 0 bad, 2 unverified (tshark 4.0).
        let minus_zero = f[13] != target_ip && f[14] == "0xffff" && f[15] == "0x0000";
        if f[11] == "0" && minus_zero {
            cap.peer_minus_zero += 1;
            cap.checksums.0 += 1;
        }
        let tcp_status = if minus_zero { "" } else { f[11] };
        for v in [tcp_status, f[12]] {
            for s in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                if s == "1" {
                    cap.checksums.0 += 1;
                } else {
                    cap.checksums.1.push(line.to_string());
                }
            }
        }
        let flag = |s: &str| s == "1" || s == "True";
        if f[5] == NVME_TCP_PORT && (flag(f[6]) || flag(f[7])) {
            cap.target_closes.push(f[0].parse().unwrap_or(0.0));
        }
    }
    // Expert rows: frequency, group, protocol, summary in columns separated by 2+ spaces.
    for row in expert.lines() {
        let cols: Vec<&str> = row
            .split("  ")
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .collect();
        if cols.len() >= 4 && cols[0].parse::<u64>().is_ok() {
            cap.expert.push((
                cols[2].to_string(),
                format!("{} x {}", cols[0], cols[3..].join(" ")),
            ));
        }
    }
    cap
}

/// The capture decodes as NVMe/TCP: PDUs present, none malformed, no NVMe/TCP-level expert
/// warning, header and data digests verified by tshark. TCP-level warnings (connection resets,
/// window full) are reported, not failed on: they are not NVMe/TCP framing.
fn check_capture(c: &mut Checks, cap: &Capture) {
    c.that(
        "capture: no malformed frame",
        cap.malformed.is_empty(),
        || cap.malformed.join("\n"),
    );
    // The expert rows of the decoder's defects (above) count exactly those frames.
    let defect = |w: &str| {
        w.ends_with("Malformed Packet (Exception occurred)") || w.ends_with("(Unregistered hf!)")
    };
    let defect_rows: usize = cap
        .expert
        .iter()
        .filter(|(p, w)| p == "NVMe/TCP" && defect(w))
        .filter_map(|(_, w)| w.split(" x ").next()?.parse::<usize>().ok())
        .sum();
    let not_tcp: Vec<_> = cap
        .expert
        .iter()
        .filter(|(p, w)| p != "TCP" && !(p == "NVMe/TCP" && defect(w)))
        .collect();
    c.that(
        "capture: the only NVMe/TCP decoder exceptions are Wireshark 4.0's known defects",
        defect_rows == cap.decoder_defects,
        || {
            format!(
                "{defect_rows} exception rows, {} known-defect frames",
                cap.decoder_defects
            )
        },
    );
    c.that(
        "capture: no NVMe/TCP-level expert warning",
        not_tcp.is_empty(),
        || format!("{not_tcp:?}"),
    );
    // ICReq 0, ICResp 1, CapsuleCmd 4, CapsuleResp 5, H2CData 6, C2HData 7, R2T 9.
    for (t, name) in [
        (0, "ICReq"),
        (1, "ICResp"),
        (4, "CapsuleCmd"),
        (5, "CapsuleResp"),
        (7, "C2HData"),
    ] {
        c.that(
            format!("capture: {name} PDUs"),
            cap.pdu_types.get(&t).copied().unwrap_or(0) > 0,
            || format!("types seen: {:?}", cap.pdu_types),
        );
    }
    c.that(
        "capture: header digests verified, none bad",
        cap.hdgst.0 > 0 && cap.hdgst.1.is_empty(),
        || format!("{:?}", cap.hdgst),
    );
    c.that(
        "capture: data digests verified, none bad",
        cap.ddgst.0 > 0 && cap.ddgst.1.is_empty(),
        || format!("{:?}", cap.ddgst),
    );
    c.that(
        "capture: TCP and IPv4 header checksums verified on every frame, none bad",
        cap.tcp_frames > 0 && cap.checksums.0 >= 2 * cap.tcp_frames && cap.checksums.1.is_empty(),
        || {
            format!(
                "{} good (of which {} the peer's 0xFFFF zero) over {} TCP frames; not good: {:?}",
                cap.checksums.0,
                cap.peer_minus_zero,
                cap.tcp_frames,
                &cap.checksums.1[..cap.checksums.1.len().min(10)]
            )
        },
    );
}

fn firmware_console_clean(c: &mut Checks, fw: &Firmware) {
    let console = fw.qemu.console();
    let after_ready = console.split("keel: ready").nth(1).unwrap_or("");
    for bad in ["panic", "exception", "ERROR", "ESR", "fatal"] {
        c.that(
            format!("firmware console shows no {bad:?} after ready"),
            !after_ready.contains(bad),
            || console.clone(),
        );
    }
    let warns: Vec<&str> = after_ready.lines().filter(|l| l.contains("WARN")).collect();
    if !warns.is_empty() {
        say(format!("firmware warnings:\n{}", warns.join("\n")));
    }
}

#[test]
fn linux_nvme_cli_and_fio_against_a_provisioned_two_subsystem_device() {
    let t0 = Instant::now();
    ensure_tools();
    let prep = prepare();
    say(format!("prepare: {:.1} s", prep.as_secs_f64()));
    let desc = keel_host_tools::provision::load_description(&root().join(DESCRIPTION))
        .unwrap_or_else(|e| panic!("{e}"));
    let want = expected(&desc);
    let io = &want.subsystems[0];
    assert!(
        want.subsystems.len() >= 2 && io.namespaces[0].block_size == 512,
        "{DESCRIPTION}: two subsystems, the first with a 512-byte-block namespace 1"
    );

    let (fw, boot) = boot_firmware();
    say(format!(
        "firmware ready in {:.1} s (segment 127.0.0.1:{}, capture {})",
        boot.as_secs_f64(),
        fw.segment,
        fw.pcap.display()
    ));
    let (console, freeze, took) = run_guest(&fw, &io.nqn);
    say(format!("guest run: {:.1} s", took.as_secs_f64()));
    let g = Guest::parse(&console);

    let mut c = Checks::default();
    check_discover(&mut c, &g, &want);
    check_connect_all(&mut c, &g, &want);
    check_identify(&mut c, &g, &want);
    check_zeroes_and_deallocate(&mut c, &g, &want);
    check_commands(&mut c, &g, &want);
    check_digest_runs(&mut c, &g);
    check_fio(&mut c, &g);

    // Keep-alive: the guest was frozen past KATO; the target ended the association while it
    // was (it closed the connections: FIN or RST from port 4420 between the stop and the
    // resume); Linux reconnected by itself and the data written before reads back.
    c.check(
        "keep-alive: Linux reconnects by itself, data written before the freeze reads back",
        guest_passed(&g, "keepalive"),
    );
    let t = Instant::now();
    let cap = read_capture(&fw.pcap, &want.addr);
    say(format!(
        "capture: {} frames, PDUs by type {:?}, header digests verified {}, data digests \
         verified {}, TCP/IPv4 checksums good {} (bad {}), expert rows {:?} (tshark {:.1} s)",
        cap.frames,
        cap.pdu_types,
        cap.hdgst.0,
        cap.ddgst.0,
        cap.checksums.0,
        cap.checksums.1.len(),
        cap.expert,
        t.elapsed().as_secs_f64()
    ));
    match &freeze {
        None => c.check(
            "keep-alive: the guest asked to be frozen",
            Err("it never did".into()),
        ),
        Some(f) => c.that(
            "keep-alive: the target closed the host's connections while the host was frozen",
            cap.target_closes
                .iter()
                .any(|&t| t > f.stopped + KATO.as_secs_f64() && t < f.resumed),
            || {
                format!(
                    "frozen {:.1}..{:.1}, target closes at {:?}",
                    f.stopped, f.resumed, cap.target_closes
                )
            },
        ),
    }
    check_capture(&mut c, &cap);

    c.that("firmware QEMU still runs", alive(fw.qemu.pid()), || {
        fw.qemu.console()
    });
    firmware_console_clean(&mut c, &fw);
    c.that(
        "the guest finished every phase",
        console.contains("KEEL-INTEROP: DONE"),
        || "no DONE line".into(),
    );
    let unexpected: Vec<&String> = g.checks.values().filter(|l| l.contains(" FAIL")).collect();
    c.that(
        "no check in the guest failed",
        unexpected.is_empty(),
        || format!("{unexpected:?}"),
    );

    say(format!(
        "{} checks passed, {} failed; whole test {:.1} s",
        c.passed.len(),
        c.failed.len(),
        t0.elapsed().as_secs_f64()
    ));
    if c.failed.is_empty() {
        let _ = std::fs::remove_file(&fw.pcap);
    }
    assert!(
        c.failed.is_empty(),
        "{} of {} checks failed:\n  {}\n\nguest evidence:\n{}\n\nfirmware console:\n{}\ncapture kept: {}",
        c.failed.len(),
        c.failed.len() + c.passed.len(),
        c.failed.join("\n  "),
        g.evidence(),
        fw.qemu.console(),
        fw.pcap.display()
    );
}
