//! Harness for the in-QEMU integration tests: builds the firmware images (in their own target
//! directory, so it works inside `cargo test`), boots them through `qemu/run`, reads the
//! console and kills its own QEMU by PID when a test ends or times out.
#![warn(missing_docs)]

pub mod crash;
pub mod provision;
pub mod proxy;

use keel_host_tools::console::{FrameDecoder, Piece, Splitter};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Which firmware build.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Build {
    /// What users run.
    Release,
    /// With `keel.test=` hooks and QEMU exit codes.
    Test,
}

fn build_elf(build: Build) -> PathBuf {
    static RELEASE: OnceLock<PathBuf> = OnceLock::new();
    static TEST: OnceLock<PathBuf> = OnceLock::new();
    let cell = if build == Build::Release {
        &RELEASE
    } else {
        &TEST
    };
    cell.get_or_init(|| {
        let target_dir = root().join("target/qemu-tests");
        let (profile, features): (&str, &[&str]) = match build {
            Build::Release => ("release", &[]),
            Build::Test => ("fw-test", &["--features", "test-build"]),
        };
        let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(root())
            .args(["build", "-q", "--profile", profile, "-p", "keel-firmware"])
            .args(["--target", "aarch64-unknown-none", "--target-dir"])
            .arg(&target_dir)
            .args(features)
            .status()
            .expect("running cargo to build the firmware");
        assert!(status.success(), "building the firmware ({build:?}) failed");
        target_dir
            .join("aarch64-unknown-none")
            .join(profile)
            .join("keel-firmware")
    })
    .clone()
}

/// Builds (once per test process) and returns the ELF of a build (its `.defmt` table decodes
/// the log frames of its console).
pub fn elf(build: Build) -> PathBuf {
    build_elf(build)
}

/// Builds (once per test process) and returns an image of a build: the raw arm64 Image, or a
/// 64 MiB pflash image.
fn artifact(build: Build, flash: bool) -> PathBuf {
    static CELLS: [OnceLock<PathBuf>; 4] = [const { OnceLock::new() }; 4];
    CELLS[(build == Build::Test) as usize * 2 + flash as usize]
        .get_or_init(|| {
            let elf = build_elf(build);
            let raw = keel_host_tools::image::raw_from_elf_file(&elf).expect("converting the ELF");
            let bytes = if flash {
                keel_host_tools::image::flash_image(&raw, keel_host_tools::image::VIRT_FLASH_SIZE)
                    .expect("making the flash image")
            } else {
                raw.bytes
            };
            // Written under a private name, then renamed: test processes may run side by side.
            let ext = if flash { "flash" } else { "img" };
            let out = elf.with_extension(ext);
            let tmp = elf.with_extension(format!("{ext}.{}", std::process::id()));
            std::fs::write(&tmp, bytes).expect("writing the image");
            std::fs::rename(&tmp, &out).expect("renaming the image");
            out
        })
        .clone()
}

/// Builds (once per test process) and returns the raw image of a build.
pub fn image(build: Build) -> PathBuf {
    artifact(build, false)
}

/// Builds and returns a 64 MiB pflash image of a build.
pub fn flash_image(build: Build) -> PathBuf {
    artifact(build, true)
}

/// Builds `keelctl` (debug: its debug assertions on) once per test process (a `cargo test`
/// of this crate does not build other crates' binaries), in the workspace's target directory:
/// most of its dependencies are there already, built by the `cargo test` that runs this (a
/// target directory of its own cost CI a second debug build of them, about 75 s).
pub fn keelctl() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(root())
            .args(["build", "-q", "-p", "keel-host-tools", "--bin", "keelctl"])
            .status()
            .expect("running cargo to build keelctl");
        assert!(status.success(), "building keelctl failed");
        std::env::var_os("CARGO_TARGET_DIR")
            .map_or_else(|| root().join("target"), PathBuf::from)
            .join("debug/keelctl")
    })
    .clone()
}

/// Bound on one `keelctl` run (TCG on a loaded 2-core machine).
pub const RUN_TIMEOUT: Duration = Duration::from_secs(120);

/// What one bounded command run did.
pub struct Run {
    /// Its exit code (-1: killed by a signal).
    pub code: i32,
    /// Raw standard output (for commands that write binary data there).
    pub out: Vec<u8>,
    /// Standard output, as text.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = |s: &str| s.chars().take(4000).collect::<String>();
        write!(
            f,
            "exit {}\nstdout:\n{}\nstderr:\n{}",
            self.code,
            shown(&self.stdout),
            shown(&self.stderr)
        )
    }
}

/// Runs `cmd` to its end with no input, stopping it after `timeout` (SIGTERM, then SIGKILL 5 s
/// later); echoes the command and its output to the test log.
pub fn run_bounded(cmd: &mut Command, timeout: Duration) -> Run {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {what}: {e}"));
    let readers: Vec<_> = [
        Box::new(child.stdout.take().expect("stdout")) as Box<dyn Read + Send>,
        Box::new(child.stderr.take().expect("stderr")),
    ]
    .into_iter()
    .map(|mut r| {
        std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = r.read_to_end(&mut s);
            s
        })
    })
    .collect();
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait().expect("waiting for a child") {
            break st;
        }
        if Instant::now() > deadline {
            // TERM first: a script's EXIT trap stops the QEMUs it started (by PID); then KILL.
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let grace = Instant::now() + Duration::from_secs(5);
            while Instant::now() < grace && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut out = readers.into_iter().map(|h| h.join().unwrap_or_default());
    let stdout = out.next().unwrap_or_default();
    let stderr = out.next().unwrap_or_default();
    let r = Run {
        code: status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
        out: stdout,
    };
    eprintln!("$ {what}\n{r:?}");
    r
}

/// Runs `cmd` while the function is held (`hold(true)`) until `n` more commands than at the
/// start sit in its submission queues at once (`submitted()`: the sum of their tail
/// doorbells), for at most `timeout`, then releases it and waits for the client. Panics unless
/// the client succeeded and `n` commands were seen at once; returns the client's stdout. This
/// shows a client's concurrency without timing.
pub fn with_n_in_flight(
    hold: impl Fn(bool),
    submitted: impl Fn() -> u32,
    n: u32,
    timeout: Duration,
    cmd: &mut Command,
) -> String {
    hold(true);
    let base = submitted();
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let t0 = Instant::now();
    let mut seen = 0;
    while t0.elapsed() < timeout {
        seen = submitted().wrapping_sub(base);
        if seen >= n || child.try_wait().ok().flatten().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    hold(false);
    let o = child.wait_with_output().expect("wait");
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        o.status.success(),
        "{cmd:?} failed: {}\n{out}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        seen >= n,
        "{cmd:?}: only {seen} of {n} commands reached the function at once"
    );
    out
}

/// Runs `keelctl ARGS` (in `dir` when given), killing it after [`RUN_TIMEOUT`].
pub fn run_keelctl(dir: Option<&Path>, args: &[&str]) -> Run {
    let mut cmd = Command::new(keelctl());
    cmd.args(args);
    if let Some(d) = dir {
        cmd.current_dir(d);
    }
    run_bounded(&mut cmd, RUN_TIMEOUT)
}

/// Runs `keelctl host --window WINDOW ARGS` (the emulated function's host on this machine),
/// killing it after [`RUN_TIMEOUT`].
pub fn keelctl_host(window: &Path, args: &[&str]) -> Run {
    run_bounded(
        Command::new(keelctl())
            .arg("host")
            .arg("--window")
            .arg(window)
            .args(args),
        RUN_TIMEOUT,
    )
}

/// Runs `keelctl ARGS`, which must succeed; returns its standard output.
pub fn keelctl_ok(args: &[&str]) -> String {
    let r = run_keelctl(None, args);
    assert_eq!(r.code, 0, "keelctl {args:?} failed: {r:?}");
    r.stdout
}

/// Starts `keelctl ARGS` on a thread, bounded by `timeout`: a workload to disturb (kill a
/// peer, take a path down) while it runs; join the handle for its result.
pub fn keelctl_in_background(args: &[&str], timeout: Duration) -> std::thread::JoinHandle<Run> {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    std::thread::spawn(move || run_bounded(Command::new(keelctl()).args(&args), timeout))
}

/// `keelctl provision build DESCRIPTION --key KEY --device-key KEY.device --generation G -o OUT`
/// (a bundle of the description, signed with `key`, wrapped for the device key beside it).
pub fn build_bundle(description: &Path, key: &str, generation: u64, out: &str) {
    keelctl_ok(&[
        "provision",
        "build",
        &description.display().to_string(),
        "--key",
        key,
        "--device-key",
        &format!("{key}.device"),
        "--generation",
        &generation.to_string(),
        "-o",
        out,
    ]);
}

/// Builds the release `keelctl` that `qemu/run --config/--bundle` packs and flashes with,
/// so that a boot's timeout does not include the build.
pub fn build_release_keelctl() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(root())
            .args(["build", "-q", "--release", "-p", "keel-host-tools"])
            .status()
            .expect("running cargo");
        assert!(status.success(), "building the release keelctl failed");
    });
}

/// The decoder of the defmt log frames of a build's image (its ELF's `.defmt` table), loaded
/// once per test process.
fn frame_decoder(build: Build) -> Option<Arc<FrameDecoder>> {
    static CELLS: [OnceLock<Option<Arc<FrameDecoder>>>; 2] = [const { OnceLock::new() }; 2];
    CELLS[(build == Build::Test) as usize]
        .get_or_init(|| match FrameDecoder::from_elf_file(&build_elf(build)) {
            Ok(d) => Some(Arc::new(d)),
            Err(e) => {
                eprintln!("keel-tests: log frames of the {build:?} build stay undecoded: {e:#}");
                None
            }
        })
        .clone()
}

/// A console stream as lines of text, the firmware's defmt log frames decoded into lines
/// (`[    0.051733] INFO  message`). Frames are decoded with the table of the build the
/// banner names (`Keel 0.1.0 (git ...) release build` / `test build`, printed before the
/// first log record): the harness boots images of those two builds, from `-kernel` or
/// packed into flash. Frames seen before the banner wait for it.
#[derive(Default)]
struct ConsoleLines {
    splitter: Splitter,
    text: Vec<u8>,
    frames: Option<Arc<FrameDecoder>>,
    waiting: Vec<Vec<u8>>,
}

impl ConsoleLines {
    fn feed(&mut self, bytes: &[u8]) -> Vec<String> {
        // (text, or a frame)
        let mut pieces: Vec<Result<Vec<u8>, Vec<u8>>> = Vec::new();
        self.splitter.feed(bytes, &mut |p| {
            pieces.push(match p {
                Piece::Text(t) => Ok(t.to_vec()),
                Piece::Frame(f) => Err(f),
            })
        });
        let mut lines = Vec::new();
        for p in pieces {
            match p {
                Ok(t) => {
                    for &b in &t {
                        if b == b'\n' {
                            let line = String::from_utf8_lossy(&self.text);
                            let line = line.trim_end_matches('\r').to_string();
                            self.text.clear();
                            if self.frames.is_none() {
                                let build = if line.contains(") release build") {
                                    Some(Build::Release)
                                } else if line.contains(") test build") {
                                    Some(Build::Test)
                                } else {
                                    None
                                };
                                self.frames = build.and_then(frame_decoder);
                                lines.push(line);
                                if let Some(d) = self.frames.clone() {
                                    for f in self.waiting.drain(..) {
                                        lines.push(d.line(&f).trim_end().to_string());
                                    }
                                }
                            } else {
                                lines.push(line);
                            }
                        } else {
                            self.text.push(b);
                        }
                    }
                }
                Err(f) => match &self.frames {
                    Some(d) => lines.push(d.line(&f).trim_end().to_string()),
                    None => self.waiting.push(f),
                },
            }
        }
        lines
    }
}

/// A running QEMU with the firmware (or another guest, see [`Qemu::linux_target`]).
pub struct Qemu {
    child: Child,
    stdin: Option<std::process::ChildStdin>,
    lines: Receiver<String>,
    console: Arc<Mutex<String>>,
    started: Instant,
    exit: Option<i32>,
}

impl std::fmt::Debug for Qemu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qemu")
            .field("pid", &self.child.id())
            .finish()
    }
}

/// The cores a suite's firmware boots with: `KEEL_TEST_SMP=N` (default 1) runs every test
/// that does not choose its own cores or network at `--smp N`, on a multi-queue tap
/// (`--net tap`, a /24 of its own, the forwarded ports relayed to the tap) so the NIC spreads
/// the test's connections over the cores; flash boots (no boot arguments, so no static tap
/// address) get the cores on user networking. Needs root for the tap, as `tests/run` has.
fn smp_args(args: &[&std::ffi::OsStr]) -> Vec<String> {
    let smp = std::env::var("KEEL_TEST_SMP")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .filter(|&n| n > 1);
    let Some(smp) = smp else {
        return Vec::new();
    };
    let has = |o: &str| args.iter().any(|a| *a == o);
    if has("--smp") || has("--net") || has("--net-socket") || has("--dry-run") {
        return Vec::new();
    }
    let mut more = vec!["--smp".to_string(), smp.to_string()];
    if !(has("--flash") || has("--config") || has("--bundle")) {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let net = format!("10.78.{}", (std::process::id() * 7 + n) % 250 + 1);
        more.extend(["--net".into(), "tap".into(), "--tap-net".into(), net]);
    }
    more
}

/// The start of the firmware's own address as its discovery log shows it when no forwarded
/// NVMe/TCP port is advertised: QEMU's user network gives it 10.0.2.15; the taps of
/// `KEEL_TEST_SMP` runs are 10.78.X.0/24 with the firmware at .2.
pub fn guest_address_prefix() -> &'static str {
    let smp = std::env::var("KEEL_TEST_SMP")
        .ok()
        .and_then(|v| v.parse::<u32>().ok());
    if smp.is_some_and(|n| n > 1) {
        "10.78."
    } else {
        "10.0.2.15"
    }
}

impl Qemu {
    /// Starts `qemu/run` with these arguments (an image option must be among them).
    pub fn start<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Qemu {
        let mut cmd = Command::new(root().join("qemu/run"));
        // Tests run side by side: forward only the ports a test asks for.
        cmd.env("KEEL_QEMU_DEFAULT_PORTS", "0");
        let args: Vec<&std::ffi::OsStr> = args.iter().map(AsRef::as_ref).collect();
        // `qemu/run` options go before a `--` (what follows it is QEMU's).
        let split = args.iter().position(|a| *a == "--").unwrap_or(args.len());
        let smp = smp_args(&args[..split]);
        cmd.args(&args[..split]).args(smp).args(&args[split..]);
        Qemu::spawn(cmd, false)
    }

    /// Starts `cmd` (a QEMU, or a script that execs one) and reads its console; `stdin`: keep
    /// its standard input (the guest's serial console) for [`Qemu::send`].
    pub fn spawn(mut cmd: Command, stdin: bool) -> Qemu {
        let what = format!("{cmd:?}");
        let mut child = cmd
            .stdin(if stdin { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {what}: {e}"));
        let (tx, rx) = channel();
        let console = Arc::new(Mutex::new(String::new()));
        for stream in [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let tx = tx.clone();
            let console = console.clone();
            std::thread::spawn(move || {
                let mut lines = ConsoleLines::default();
                let mut buf = [0u8; 4096];
                let mut reader = stream;
                loop {
                    let n = match reader.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    for line in lines.feed(&buf[..n]) {
                        if let Ok(mut c) = console.lock() {
                            c.push_str(&line);
                            c.push('\n');
                        }
                        let _ = tx.send(line);
                    }
                }
            });
        }
        Qemu {
            stdin: child.stdin.take(),
            child,
            lines: rx,
            console,
            started: Instant::now(),
            exit: None,
        }
    }

    /// Boots an image with `-kernel`, plus extra `qemu/run` arguments.
    pub fn boot(build: Build, extra: &[&str]) -> Qemu {
        let img = image(build);
        let mut args: Vec<String> = vec!["--image".into(), img.display().to_string()];
        args.extend(extra.iter().map(|s| s.to_string()));
        Qemu::start(&args)
    }

    /// The PID of QEMU (`qemu/run` execs it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Types a line on the guest's serial console (a QEMU started with `stdin`).
    pub fn send(&mut self, line: &str) {
        use std::io::Write;
        let stdin = self.stdin.as_mut().expect("QEMU started without stdin");
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|()| stdin.flush())
            .expect("writing to the guest's console");
    }

    /// Debian's arm64 kernel serving nvmet-tcp (`qemu/linux-target`: namespace 1 of
    /// `nqn.2026-11.dev.keel:default`, a RAM disk) on the machine Keel runs on (`virt`, `-cpu
    /// max`, 1 core, 1 GiB, virtio-net on user networking), with `append` added to its kernel
    /// command line (`keel.port2=4421 keel.ana2=non-optimized ...`) and 127.0.0.1:HOST
    /// forwarded to guest port GUEST for each of `forwards`. Its console takes commands
    /// ([`Qemu::send`]: `port N down|up`, `ana N STATE`). Wait for `LINUX-NVMET: ready`.
    /// Builds the kernel and initramfs first (`qemu/linux-target/prepare`; the Debian mirror
    /// on first use).
    pub fn linux_target(append: &str, forwards: &[(u16, u16)]) -> Qemu {
        let r = run_bounded(
            &mut Command::new(root().join("qemu/linux-target/prepare")),
            Duration::from_secs(900),
        );
        assert_eq!(r.code, 0, "qemu/linux-target/prepare failed: {r:?}");
        let get = |k: &str| {
            r.stdout
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .map(PathBuf::from)
                .unwrap_or_else(|| panic!("qemu/linux-target/prepare printed no {k}"))
        };
        let (kernel, initrd) = (get("kernel="), get("initrd="));
        let fwd: String = forwards
            .iter()
            .map(|(h, g)| format!(",hostfwd=tcp:127.0.0.1:{h}-:{g}"))
            .collect();
        let mut cmd = Command::new("qemu-system-aarch64");
        cmd.args(["-M", "virt", "-cpu", "max", "-smp", "1", "-m", "1G"])
            .args(["-nographic", "-no-reboot", "-kernel"])
            .arg(kernel)
            .arg("-initrd")
            .arg(initrd)
            .args([
                "-append",
                &format!("console=ttyAMA0 quiet loglevel=4 panic=-1 {append}"),
            ])
            .args(["-netdev", &format!("user,id=net0{fwd}")])
            .args(["-device", "virtio-net-pci,netdev=net0,disable-legacy=on"]);
        Qemu::spawn(cmd, true)
    }

    /// Everything printed so far.
    pub fn console(&self) -> String {
        self.console.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// Waits for a console line containing `needle`; returns it and the time since start.
    pub fn wait_for(
        &mut self,
        needle: &str,
        timeout: Duration,
    ) -> Result<(String, Duration), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return Ok((line, self.started.elapsed())),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => {
                    return Err(format!(
                        "no line with {needle:?} within {timeout:?}; console:\n{}",
                        self.console()
                    ));
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(format!(
                        "QEMU ended before printing {needle:?}; console:\n{}",
                        self.console()
                    ));
                }
            }
        }
    }

    /// Waits for QEMU to exit by itself; kills it and fails after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<i32, String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().map_err(|e| e.to_string())? {
                let code = status.code().unwrap_or(-1);
                self.exit = Some(code);
                // Let the reader threads drain the pipes.
                std::thread::sleep(Duration::from_millis(50));
                return Ok(code);
            }
            if Instant::now() > deadline {
                self.kill();
                return Err(format!(
                    "QEMU did not exit within {timeout:?}; console:\n{}",
                    self.console()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills QEMU.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        if self.exit.is_none() {
            self.kill();
        }
    }
}

/// Boots the release firmware with its NVMe/TCP port forwarded (plus these `qemu/run`
/// arguments) and waits for `keel: ready`; returns QEMU and the forwarded port.
pub fn boot_nvmf(args: &[&str]) -> (Qemu, u16) {
    let port = free_port();
    let p = port.to_string();
    let mut all = vec!["--nvmf-port", p.as_str()];
    all.extend_from_slice(args);
    let mut q = Qemu::boot(Build::Release, &all);
    q.wait_for("keel: ready", BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    (q, port)
}

/// Runs one command on a QEMU human monitor listening on the unix socket `socket`
/// (`-monitor unix:SOCK,server=on,wait=off`): waits for the prompt, sends the command, waits
/// for the next prompt; returns what QEMU printed in between (the echo and its answer).
pub fn monitor_command(socket: &Path, command: &str) -> String {
    use std::io::Write;
    let mut m = std::os::unix::net::UnixStream::connect(socket)
        .unwrap_or_else(|e| panic!("monitor {}: {e}", socket.display()));
    m.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let prompt = |m: &mut std::os::unix::net::UnixStream| {
        let mut seen = Vec::new();
        let mut b = [0u8; 512];
        while !String::from_utf8_lossy(&seen).ends_with("(qemu) ") {
            let n = m.read(&mut b).expect("monitor reply");
            assert!(n > 0, "monitor closed");
            seen.extend_from_slice(&b[..n]);
        }
        String::from_utf8_lossy(&seen).into_owned()
    };
    prompt(&mut m);
    m.write_all(format!("{command}\n").as_bytes())
        .expect("monitor command");
    // The command's echo, QEMU's answer, the next prompt.
    prompt(&mut m).trim_end_matches("(qemu) ").to_string()
}

/// A free TCP port on 127.0.0.1 (bound and released; QEMU binds it right after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A scratch file of `size` bytes under the target directory, removed on drop.
#[derive(Debug)]
pub struct ScratchFile(pub PathBuf);

impl ScratchFile {
    /// Creates it, filled with zeros.
    pub fn new(name: &str, size: u64) -> Self {
        let dir = root().join("target/qemu-tests/scratch");
        std::fs::create_dir_all(&dir).expect("scratch dir");
        // Unique per call: tests of one process run in parallel and may use the same name.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = dir.join(format!("{}-{n}-{name}", std::process::id()));
        let f = std::fs::File::create(&path).expect("scratch file");
        f.set_len(size).expect("sizing scratch file");
        ScratchFile(path)
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Time budget for one boot under TCG on a loaded 2-core machine.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(60);

/// Waits until the emulated function of `window` has published CAP (after its first poll).
pub fn wait_for_function_cap(window: &Path) {
    let w = keel_host_tools::host::Window::open(window).expect("mapping the window");
    let t0 = Instant::now();
    while w.load64(0) & 0xFFFF == 0 {
        assert!(
            t0.elapsed() < BOOT_TIMEOUT,
            "CAP never set on {}",
            window.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `keelctl host --window WINDOW ivshmem-server --socket SOCK`, running once its socket
/// exists; killed by PID when dropped, however the test ends.
#[derive(Debug)]
pub struct IvshmemServer(Child);

impl IvshmemServer {
    /// Starts the server and waits (bounded) for its socket.
    pub fn start(window: &Path, sock: &Path) -> Self {
        let server = IvshmemServer(
            Command::new(keelctl())
                .arg("host")
                .arg("--window")
                .arg(window)
                .args(["ivshmem-server", "--socket"])
                .arg(sock)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("starting keelctl host ivshmem-server"),
        );
        let t0 = Instant::now();
        while !sock.exists() {
            assert!(t0.elapsed() < Duration::from_secs(10), "no server socket");
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }
}

impl Drop for IvshmemServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The release firmware booted with its window on the ivshmem server at `sock`
/// (`qemu/run --window-server`), ready and with the function's CAP published in `window`.
pub fn boot_on_window_server(window: &Path, sock: &Path) -> Qemu {
    let s = sock.to_str().expect("socket path");
    let mut fw = Qemu::boot(Build::Release, &["--window-server", s]);
    fw.wait_for("keel: ready", BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    wait_for_function_cap(window);
    fw
}

/// Asserts that the host VM's console (`qemu/hostvm/run`'s output `r`) reports each check
/// as passed (`KEEL-HOSTVM: CHECK PASS`).
pub fn assert_hostvm_passed(r: &Run, checks: &[&str]) {
    for check in checks {
        assert!(
            r.stdout.contains(&format!("KEEL-HOSTVM: {check} PASS")),
            "{check}: no PASS\n{r:?}"
        );
    }
}

/// Deterministic bytes that are not a simple pattern (xorshift64 of `seed`), for data written
/// through a path and compared after.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// The device's status over the management port at `addr` ("127.0.0.1:PORT"), signed with the
/// development provisioning key (what an unprovisioned test image trusts).
pub fn mgmt_status(addr: &str) -> keel_mgmt::Snapshot {
    try_mgmt_status(addr).unwrap_or_else(|e| panic!("status from {addr}: {e:#}"))
}

/// [`mgmt_status`], or why it failed.
pub fn try_mgmt_status(addr: &str) -> Result<keel_mgmt::Snapshot, String> {
    use keel_mgmt::wire::{Reply, Request};
    let key = keel_host_tools::provision::keys::read_signing_key(
        &root().join("qemu/dev-keys/provision.key"),
    )
    .map_err(|e| format!("{e:#}"))?;
    let mut c = keel_host_tools::mgmt::client::Client::connect(addr, Duration::from_secs(20))
        .map_err(|e| format!("{e:#}"))?;
    match c.request(&key, &Request::Status) {
        Ok(Reply::Status(s)) => Ok(*s),
        Ok(other) => Err(format!("unexpected reply {other:?}")),
        Err(e) => Err(format!("{e:#}")),
    }
}

/// Waits until the device's pools and slots are back to what `idle` shows (see
/// [`keel_mgmt::Snapshot::differences_from`]); fails with what is still different after
/// `timeout`. Returns the snapshot at rest.
pub fn wait_idle(addr: &str, idle: &keel_mgmt::Snapshot, timeout: Duration) -> keel_mgmt::Snapshot {
    let deadline = Instant::now() + timeout;
    loop {
        let now = mgmt_status(addr);
        let d = now.differences_from(idle);
        if d.is_empty() {
            return now;
        }
        if Instant::now() > deadline {
            panic!(
                "the device is not back at rest after {timeout:?}: {d:?}\nnow: {:?}\nidle: {:?}",
                now.resources, idle.resources
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Boots the release image serving one RAM namespace of `mib` MiB over NVMe/TCP, with the
/// management endpoint: QEMU, the forwarded NVMe/TCP port and the management address.
pub fn boot_ram_device(mib: u32) -> (Qemu, u16, String) {
    let port = free_port();
    let mport = free_port();
    let mut q = Qemu::boot(
        Build::Release,
        &[
            "--nvmf-port",
            &port.to_string(),
            "--mgmt-port",
            &mport.to_string(),
            "--append",
            &format!("keel.ram={mib}"),
        ],
    );
    q.wait_for("keel: ready", BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    (q, port, format!("127.0.0.1:{mport}"))
}

/// `qemu/run ARGS --dry-run` (`--dry-run` goes before a `--` in `args`: what follows it is
/// QEMU's): asserts that it succeeded and returns the QEMU command line it printed.
pub fn qemu_run_dry(args: &[&str]) -> String {
    let out = qemu_run_dry_output(args);
    assert!(
        out.status.success(),
        "qemu/run {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Asserts that `qemu/run ARGS --dry-run` refuses its arguments (exit code 2) and says
/// `message` on stderr.
pub fn assert_qemu_run_refuses(args: &[&str], message: &str) {
    let out = qemu_run_dry_output(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "qemu/run {args:?}: {err}");
    assert!(err.contains(message), "qemu/run {args:?}: {err}");
}

fn qemu_run_dry_output(args: &[&str]) -> std::process::Output {
    let split = args.iter().position(|a| *a == "--").unwrap_or(args.len());
    Command::new(root().join("qemu/run"))
        .args(&args[..split])
        .arg("--dry-run")
        .args(&args[split..])
        .output()
        .unwrap_or_else(|e| panic!("qemu/run: {e}"))
}

/// Waits until the device is back at rest ([`wait_idle`], 30 s), prints its resources before
/// and after, and checks that its console shows no panic or CPU exception. Returns the
/// snapshot at rest.
pub fn assert_back_at_rest(
    q: &Qemu,
    mgmt: &str,
    idle: &keel_mgmt::Snapshot,
) -> keel_mgmt::Snapshot {
    let after = wait_idle(mgmt, idle, Duration::from_secs(30));
    eprintln!(
        "idle before: {:?}\nidle after: {:?}",
        idle.resources, after.resources
    );
    let c = q.console();
    assert!(!c.contains("panic") && !c.contains("CPU exception"), "{c}");
    after
}

/// The device's status once it has been at rest (as in `rest`, from [`assert_back_at_rest`])
/// for two more seconds of its own uptime: its QoS rate sample, retaken once a second
/// (`device::QosRates` in the firmware), then no longer lists the controllers that were gone
/// by `rest`, so it holds on the heap what it held at idle. Fails after 60 s.
pub fn settled_status(mgmt: &str, rest: &keel_mgmt::Snapshot) -> keel_mgmt::Snapshot {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = mgmt_status(mgmt);
        if s.uptime_ns >= rest.uptime_ns.saturating_add(2_000_000_000) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "the device's uptime stays at {} ns",
            s.uptime_ns
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Asserts that the heap the device used from `before` to `after` (two snapshots at rest) is
/// exactly what its TCP socket pool took for the sockets it created in between (their
/// buffers, `Snapshot::socket_buffer_bytes`, kept for reuse): nothing else a workload
/// allocates stays allocated once it has ended.
pub fn assert_heap_kept_only_socket_buffers(
    before: &keel_mgmt::Snapshot,
    after: &keel_mgmt::Snapshot,
    what: &str,
) {
    let used = i128::from(before.resources.heap_free) - i128::from(after.resources.heap_free);
    let sockets = i128::from(after.socket_buffer_bytes) - i128::from(before.socket_buffer_bytes);
    eprintln!(
        "{what}: heap free {} -> {} bytes ({used} used), socket buffers {} -> {} bytes \
         ({} -> {} sockets created)",
        before.resources.heap_free,
        after.resources.heap_free,
        before.socket_buffer_bytes,
        after.socket_buffer_bytes,
        before.resources.sockets_created,
        after.resources.sockets_created
    );
    assert_eq!(
        used,
        sockets,
        "{what}: the heap kept {} bytes beyond the {sockets} bytes of new socket buffers",
        used - sockets
    );
}

/// Namespaces listed in a `keelctl status --json` report.
pub fn namespaces_in_status(json: &str) -> usize {
    status_nsids(json).len()
}

/// The NSIDs of the namespaces a `keelctl status --json` report lists, in its order.
pub fn status_nsids(json: &str) -> Vec<u64> {
    let v: serde_json::Value = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {json}"));
    v["namespaces"].as_array().map_or(Vec::new(), |a| {
        a.iter().filter_map(|n| n["nsid"].as_u64()).collect()
    })
}

/// QEMU arguments (after `qemu/run ... --`) for an NVMe drive `id` (also its serial) on
/// `file` behind QEMU's `blkdebug` driver with the rules in `rules` (QEMU
/// docs/devel/blkdebug.txt); `opts` adds `-drive` options (",cache=writeback").
pub fn blkdebug_nvme_args(id: &str, rules: &Path, file: &Path, opts: &str) -> [String; 4] {
    [
        "-drive".into(),
        format!(
            "if=none,id={id},format=raw{opts},file=blkdebug:{}:{}",
            rules.display(),
            file.display()
        ),
        "-device".into(),
        format!("nvme,serial={id},drive={id}"),
    ]
}

/// The Error Information log (LID 01h, 64 bytes per entry, ELPE + 1 entries) of `ctrl`: the
/// entries in use, newest first.
pub fn error_log(ctrl: &keel_host_tools::nvme::Controller) -> Vec<keel_nvme::log::ErrorLogEntry> {
    let entries = usize::from(ctrl.id.elpe) + 1;
    let page = ctrl
        .get_log_page(0x01, 0xFFFF_FFFF, 0, (entries * 64) as u32)
        .expect("Error Information log");
    page.chunks_exact(64)
        .map(|e| keel_nvme::log::ErrorLogEntry::decode(e.try_into().expect("64 bytes")))
        .filter(|e| e.error_count != 0)
        .collect()
}

/// Whether an Error Information log entry holds status `st`: Status Field bits 15:1 (phase
/// in bit 0), SC in bits 8:1, SCT in bits 11:9.
pub fn logged_status(e: &keel_nvme::log::ErrorLogEntry, st: keel_nvme::Status) -> bool {
    (e.status >> 1) as u8 == st.sc && ((e.status >> 9) & 7) as u8 == st.sct
}

/// Fails the test, saying why, unless this process can create a tap (root and
/// /dev/net/tun).
pub fn require_tap() {
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    let tun = std::path::Path::new("/dev/net/tun").exists();
    assert!(
        root && tun,
        "--net tap needs root and /dev/net/tun (root: {root}, /dev/net/tun: {tun}); \
         run the multi-core tests as root (CI does)"
    );
}
