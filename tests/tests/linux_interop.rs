//! Linux interop: the Linux kernel's own NVMe/TCP initiator (a Debian x86_64 kernel booted in a
//! second QEMU, see `qemu/linux/`) connects to the release firmware, writes data, reads it back
//! and checks it, with digests off and on; the firmware's traffic, captured by QEMU
//! (`filter-dump` on its netdev), must decode in tshark as NVMe/TCP without malformed PDUs or
//! NVMe/TCP-level warnings, digests included; afterwards the firmware must still serve.
//!
//! Needs, on first run, the Debian mirror (qemu/linux/prepare downloads the kernel and busybox
//! packages once into `target/linux-cache`, or `$KEEL_LINUX_CACHE`) and `qemu-system-x86`
//! and `tshark` (installed through `qemu/deps` as root). When any of that is impossible the
//! test fails and says why; it never passes without having run the guest.
//!
//! Phases are timed and printed (run with `--nocapture` to see them and the guest console).

use keel_tests::{BOOT_TIMEOUT, Build, Qemu, free_port, root};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Upper bound for one guest run: TCG boot (~15-30 s), three connect/write/read rounds.
const GUEST_TIMEOUT: Duration = Duration::from_secs(300);
/// The guest kernel's admin command timeout (nvme_core.admin_timeout). Linux's default is 60 s;
/// a target that never answers the shutdown of a disconnect costs that much per run.
const ADMIN_TIMEOUT_S: &str = "10";
const SUBSYSTEM: &str = "nqn.2026-11.dev.keel:default";

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
        "qemu/linux/prepare failed: the Linux initiator (Debian kernel + busybox from the Debian \
         mirror) is not available on this machine, so the interop test cannot run:\n{stderr}"
    );
    if !stderr.trim().is_empty() {
        eprint!("{stderr}");
    }
    t.elapsed()
}

/// A child process in its own process group, its output streamed to stderr and collected;
/// killed (the whole group: run-initiator, `timeout` and its QEMU) when dropped unfinished.
struct Group {
    child: std::process::Child,
    out: Arc<Mutex<String>>,
    done: bool,
}

impl Group {
    fn spawn(cmd: &mut Command, prefix: &'static str) -> Group {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .expect("spawning");
        let out = Arc::new(Mutex::new(String::new()));
        for stream in [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let out = out.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    eprintln!("{prefix}{line}");
                    if let Ok(mut o) = out.lock() {
                        o.push_str(&line);
                        o.push('\n');
                    }
                }
            });
        }
        Group {
            child,
            out,
            done: false,
        }
    }

    /// Waits for the exit code; `Err` (after killing the group) past the timeout.
    fn wait(&mut self, timeout: Duration) -> Result<i32, String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().map_err(|e| e.to_string())? {
                self.done = true;
                std::thread::sleep(Duration::from_millis(200)); // let the readers drain
                return Ok(st.code().unwrap_or(-1));
            }
            if Instant::now() > deadline {
                self.kill();
                return Err(format!("still running after {timeout:?}; killed"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn output(&self) -> String {
        self.out.lock().map(|o| o.clone()).unwrap_or_default()
    }

    fn kill(&mut self) {
        if self.done {
            return;
        }
        // Our own process group only (created by process_group(0) above).
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.done = true;
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The firmware with its NVMe/TCP and discovery ports forwarded and its traffic captured.
struct Firmware {
    qemu: Qemu,
    port: u16,
    discovery_port: u16,
    pcap: PathBuf,
}

fn boot_firmware(name: &str) -> (Firmware, Duration) {
    let dir = root().join("target/linux-interop");
    std::fs::create_dir_all(&dir).expect("creating target/linux-interop");
    let pcap = dir.join(format!("{name}-{}.pcap", std::process::id()));
    let _ = std::fs::remove_file(&pcap);
    let (p, d) = (free_port(), free_port());
    let dump = format!("filter-dump,id=f0,netdev=net0,file={}", pcap.display());
    let t = Instant::now();
    let mut qemu = Qemu::boot(
        Build::Release,
        &[
            "--nvmf-port",
            &p.to_string(),
            "--discovery-port",
            &d.to_string(),
            "--",
            "-object",
            &dump,
        ],
    );
    qemu.wait_for("keel: ready", BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("firmware did not get ready: {e}"));
    let fw = Firmware {
        qemu,
        port: p,
        discovery_port: d,
        pcap,
    };
    (fw, t.elapsed())
}

/// Runs qemu/linux/run-initiator against the firmware; returns its exit code and output.
fn run_initiator(fw: &Firmware, runs: &str, discovery: bool) -> (i32, String, Duration) {
    let mut cmd = Command::new(root().join("qemu/linux/run-initiator"));
    cmd.args(["--port", &fw.port.to_string(), "--runs", runs])
        .args(["--admin-timeout", ADMIN_TIMEOUT_S])
        .args(["--timeout", &GUEST_TIMEOUT.as_secs().to_string()])
        .args(["--nqn", SUBSYSTEM]);
    if discovery {
        cmd.args(["--discovery-port", &fw.discovery_port.to_string()]);
    }
    let t = Instant::now();
    let mut g = Group::spawn(&mut cmd, "[guest] ");
    let rc = g
        .wait(GUEST_TIMEOUT + Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("run-initiator {e}; output:\n{}", g.output()));
    (rc, g.output(), t.elapsed())
}

/// The result line for `what`, e.g. `digests=none` or `digests=none disconnect`.
fn marker<'a>(out: &'a str, what: &str) -> Option<&'a str> {
    let pass = format!("KEEL-INTEROP: {what} PASS");
    let fail = format!("KEEL-INTEROP: {what} FAIL");
    out.lines()
        .find(|l| l.starts_with(&pass) || l.starts_with(&fail))
}

fn passed(out: &str, what: &str) -> bool {
    marker(out, what).is_some_and(|l| l.starts_with(&format!("KEEL-INTEROP: {what} PASS")))
}

/// Guest kernel log lines (the init script prefixes them) and its own notes: the evidence a
/// failure message should carry.
fn guest_evidence(out: &str) -> String {
    out.lines()
        .filter(|l| {
            l.contains("keel-interop:") || l.contains("KEEL-INTEROP:") || l.contains("nvme")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A fresh NVMe/TCP connection gets an ICResp to its ICReq: the target still serves.
fn icreq_answered(port: u16) -> Result<(), String> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .map_err(|e| e.to_string())?;
    let mut icreq = [0u8; 128];
    icreq[0] = 0x00; // PDU type ICReq
    icreq[2] = 128; // HLEN
    icreq[4..8].copy_from_slice(&128u32.to_le_bytes()); // PLEN
    // PFV 0, HPDA 0, digests off, MAXR2T 0.
    s.write_all(&icreq)
        .map_err(|e| format!("send ICReq: {e}"))?;
    let mut resp = [0u8; 128];
    s.read_exact(&mut resp)
        .map_err(|e| format!("reading ICResp: {e}"))?;
    let plen = u32::from_le_bytes([resp[4], resp[5], resp[6], resp[7]]);
    let maxh2c = u32::from_le_bytes([resp[12], resp[13], resp[14], resp[15]]);
    if resp[0] != 0x01 || resp[2] != 128 || plen != 128 {
        return Err(format!("not an ICResp: {:02x?}", &resp[..16]));
    }
    if maxh2c < 4096 || maxh2c % 4 != 0 {
        return Err(format!("ICResp MAXH2CDATA {maxh2c}"));
    }
    Ok(())
}

/// QEMU still running (not exited, not a zombie).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').map(|(_, r)| r.trim_start().to_string()))
        .is_some_and(|r| !r.starts_with('Z') && !r.starts_with('X'))
}

fn tshark(pcap: &Path, filter: &str, fields: &[&str]) -> Output {
    let mut cmd = Command::new("tshark");
    cmd.arg("-r")
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
        ])
        .args(["-Y", filter]);
    if !fields.is_empty() {
        cmd.args(["-T", "fields"]);
        for f in fields {
            cmd.args(["-e", f]);
        }
    }
    let out = cmd.stdin(Stdio::null()).output().expect("running tshark");
    assert!(
        out.status.success(),
        "tshark -Y {filter:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The capture decodes as NVMe/TCP: PDUs present, none malformed, no NVMe/TCP-level expert
/// warning (header and data digests verified by tshark). TCP-level warnings (connection
/// resets, window full) are counted and reported, not failed on: they are not NVMe/TCP framing.
fn check_capture(pcap: &Path, expect_hdgst: bool, expect_ddgst: bool) -> String {
    assert!(pcap.exists(), "no capture at {}", pcap.display());
    let malformed = stdout(&tshark(pcap, "_ws.malformed", &[]));
    assert!(
        malformed.trim().is_empty(),
        "tshark finds malformed frames in {}:\n{malformed}",
        pcap.display()
    );
    // Expert warnings and errors by protocol (`-z expert,warn`: frequency, group, protocol,
    // summary in columns separated by two or more spaces).
    let expert = Command::new("tshark")
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
        ])
        .args(["-q", "-z", "expert,warn"])
        .stdin(Stdio::null())
        .output()
        .expect("running tshark");
    assert!(expert.status.success(), "tshark -z expert failed");
    let expert = stdout(&expert);
    let mut tcp_level = Vec::new();
    for row in expert.lines() {
        let cols: Vec<&str> = row
            .split("  ")
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .collect();
        if cols.len() < 4 || cols[0].parse::<u64>().is_err() {
            continue;
        }
        assert!(
            cols[2] == "TCP",
            "tshark warns about {} in {}:\n{expert}",
            cols[2],
            pcap.display()
        );
        tcp_level.push(format!("{} x {}", cols[0], cols[3..].join(" ")));
    }
    let types = stdout(&tshark(pcap, "nvme-tcp", &["nvme-tcp.type"]));
    let mut counts = std::collections::BTreeMap::<u32, usize>::new();
    for t in types.lines().flat_map(|l| l.split(',')) {
        if let Ok(t) = t.trim().parse::<u32>() {
            *counts.entry(t).or_default() += 1;
        }
    }
    // ICReq 0, ICResp 1, CapsuleCmd 4, CapsuleResp 5, H2CData 6, C2HData 7, R2T 9.
    for (t, name) in [
        (0, "ICReq"),
        (1, "ICResp"),
        (4, "CapsuleCmd"),
        (5, "CapsuleResp"),
        (7, "C2HData"),
    ] {
        assert!(
            counts.get(&t).copied().unwrap_or(0) > 0,
            "no {name} PDU decoded in {} (types seen: {counts:?})",
            pcap.display()
        );
    }
    let status_counts = |field: &str| {
        let s = stdout(&tshark(pcap, field, &[&format!("{field}.status")]));
        let mut good = 0usize;
        let mut other = Vec::new();
        for v in s
            .lines()
            .flat_map(|l| l.split(','))
            .map(str::trim)
            .filter(|v| !v.is_empty())
        {
            if v == "1" {
                good += 1;
            } else {
                other.push(v.to_string());
            }
        }
        (good, other)
    };
    let (hd_good, hd_bad) = status_counts("nvme-tcp.hdgst");
    let (dd_good, dd_bad) = status_counts("nvme-tcp.ddgst");
    assert!(
        hd_bad.is_empty(),
        "header digests tshark does not verify: {hd_bad:?}"
    );
    assert!(
        dd_bad.is_empty(),
        "data digests tshark does not verify: {dd_bad:?}"
    );
    if expect_hdgst {
        assert!(hd_good > 0, "no header digest seen in {}", pcap.display());
    }
    if expect_ddgst {
        assert!(dd_good > 0, "no data digest seen in {}", pcap.display());
    }
    format!(
        "PDUs by type {counts:?}; header digests verified {hd_good}, data digests verified \
         {dd_good}; TCP-level warnings: {}",
        if tcp_level.is_empty() {
            "none".to_string()
        } else {
            tcp_level.join(", ")
        }
    )
}

fn firmware_console_clean(fw: &Firmware) {
    let c = fw.qemu.console();
    let after_ready = c.split("keel: ready").nth(1).unwrap_or("");
    for bad in ["panic", "exception", "ERROR", "ESR", "fatal"] {
        assert!(
            !after_ready.contains(bad),
            "firmware console shows {bad:?} after ready:\n{c}"
        );
    }
    let warns: Vec<&str> = after_ready.lines().filter(|l| l.contains("WARN")).collect();
    if !warns.is_empty() {
        say(format!("firmware warnings:\n{}", warns.join("\n")));
    }
}

#[test]
fn linux_initiator_writes_and_reads_back_with_digests_off_and_on() {
    let t0 = Instant::now();
    ensure_tools();
    let prep = prepare();
    say(format!("prepare: {:.1} s", prep.as_secs_f64()));
    let (fw, boot) = boot_firmware("interop");
    say(format!(
        "firmware ready in {:.1} s (NVMe/TCP on 127.0.0.1:{}, capture {})",
        boot.as_secs_f64(),
        fw.port,
        fw.pcap.display()
    ));

    let (rc, out, took) = run_initiator(&fw, "none,data,both", true);
    say(format!(
        "guest run: {:.1} s, run-initiator exit {rc}",
        took.as_secs_f64()
    ));
    let evidence = guest_evidence(&out);
    for what in ["discovery", "digests=none", "digests=data", "digests=both"] {
        assert!(
            passed(&out, what),
            "{what}: {}\nguest evidence:\n{evidence}\nfirmware console:\n{}\ncapture kept: {}",
            marker(&out, what).unwrap_or("no result line (guest hung or crashed?)"),
            fw.qemu.console(),
            fw.pcap.display()
        );
    }
    // Linux deletes each controller by closing its I/O queue connections, then shutting it
    // down over the admin queue (Property Set CC.SHN, Property Get CSTS): the orderly close of
    // an I/O queue must not end the association, or the shutdown is never answered and Linux
    // waits out its admin timeout and logs "Property Set error".
    for what in [
        "digests=none disconnect",
        "digests=data disconnect",
        "digests=both disconnect",
    ] {
        assert!(
            passed(&out, what),
            "{what}: {}\nguest evidence:\n{}",
            marker(&out, what).unwrap_or("no disconnect result line"),
            guest_evidence(&out)
        );
    }

    // The firmware survived and still serves a new connection.
    assert!(
        alive(fw.qemu.pid()),
        "firmware QEMU exited:\n{}",
        fw.qemu.console()
    );
    firmware_console_clean(&fw);
    icreq_answered(fw.port).unwrap_or_else(|e| {
        panic!(
            "firmware no longer answers an ICReq after the Linux runs: {e}\nconsole:\n{}",
            fw.qemu.console()
        )
    });
    assert!(
        alive(fw.qemu.pid()),
        "firmware QEMU exited:\n{}",
        fw.qemu.console()
    );

    let t = Instant::now();
    let summary = check_capture(&fw.pcap, true, true);
    say(format!(
        "capture: {summary} (tshark {:.1} s)",
        t.elapsed().as_secs_f64()
    ));
    let _ = std::fs::remove_file(&fw.pcap);
    say(format!("whole test: {:.1} s", t0.elapsed().as_secs_f64()));
}
