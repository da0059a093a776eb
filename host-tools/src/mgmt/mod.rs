//! `keelctl status`, `keelctl reboot`, `keelctl metrics`, `keelctl provision push` and the
//! testing command `keelctl mgmt replay`: the client side of the management protocol
//! (`keel_mgmt`, shared with the firmware).
//!
//! Every network call has a timeout (`--timeout`, default 10 s): connect, each read and each
//! write.

pub mod client;
pub mod function;
pub mod table;

use anyhow::{Context, Result, bail};
use client::Client;
use keel_mgmt::wire::{Bytes, ErrorCode, Reply, Request};
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

pub use keel_mgmt;

/// Where the device is and how long to wait for it.
#[derive(Debug, Clone, clap::Args)]
pub struct DeviceArgs {
    /// The device's management endpoint.
    #[arg(long, default_value = "127.0.0.1:7000", value_name = "HOST:PORT")]
    pub device: String,
    /// Seconds to wait for a connection and for each read and write.
    #[arg(long, default_value_t = 10.0, value_name = "SECONDS")]
    pub timeout: f64,
}

impl DeviceArgs {
    fn timeout(&self) -> Result<Duration> {
        Duration::try_from_secs_f64(self.timeout)
            .ok()
            .filter(|d| !d.is_zero())
            .context("--timeout must be a positive number of seconds")
    }
}

/// Options of a signed request.
#[derive(Debug, Clone, clap::Args)]
pub struct SignedArgs {
    /// The device.
    #[command(flatten)]
    pub device: DeviceArgs,
    /// The provisioning signing key (keelctl keygen) the device trusts.
    #[arg(long, value_name = "KEY")]
    pub key: PathBuf,
}

/// `keelctl status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The device and the key.
    #[command(flatten)]
    pub signed: SignedArgs,
    /// Print the snapshot as JSON.
    #[arg(long)]
    pub json: bool,
    /// Also write the signed request frame sent to FILE (to show that a captured request is
    /// refused when replayed: keelctl mgmt replay FILE).
    #[arg(long, value_name = "FILE", hide = true)]
    pub save_request: Option<PathBuf>,
}

/// `keelctl metrics`.
#[derive(Debug, clap::Args)]
pub struct MetricsArgs {
    /// The device.
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// `keelctl provision push`.
#[derive(Debug, Clone, clap::Args)]
pub struct PushArgs {
    /// The signed bundle (keelctl provision build).
    pub bundle: PathBuf,
    /// The device and the key.
    #[command(flatten)]
    pub signed: SignedArgs,
}

/// `keelctl mgmt` (testing).
#[derive(Debug, clap::Subcommand)]
pub enum MgmtCmd {
    /// Send a previously captured request frame (keelctl status --save-request FILE) as it
    /// is, on a new connection: the device must refuse it (exit 1 when refused).
    Replay {
        /// The captured frame.
        file: PathBuf,
        /// The device.
        #[command(flatten)]
        device: DeviceArgs,
    },
}

fn connect(d: &DeviceArgs) -> Result<Client> {
    Client::connect(&d.device, d.timeout()?)
}

fn refused(reply: &Reply) -> Option<String> {
    match reply {
        Reply::Error { code, message, .. } => Some(format!(
            "device refused the request ({}): {message}",
            match code {
                ErrorCode::BadSignature => "bad signature",
                ErrorCode::Malformed => "malformed",
                ErrorCode::TooLarge => "too large",
            }
        )),
        _ => None,
    }
}

/// Runs `keelctl status`.
pub fn status_cmd(a: &StatusArgs, out: &mut dyn Write) -> Result<()> {
    let key = crate::provision::keys::read_signing_key(&a.signed.key)?;
    let mut c = connect(&a.signed.device)?;
    let frame = c.signed_frame(&key, &Request::Status);
    if let Some(path) = &a.save_request {
        std::fs::write(path, &frame).with_context(|| format!("writing {}", path.display()))?;
    }
    let reply = c.exchange(&frame)?;
    if let Some(e) = refused(&reply) {
        bail!("{e}");
    }
    let Reply::Status(s) = reply else {
        bail!("unexpected reply to a status request: {reply:?}");
    };
    if a.json {
        serde_json::to_writer_pretty(&mut *out, &s)?;
        writeln!(out)?;
    } else {
        table::status(&c.hello.device, &s, out)?;
    }
    Ok(())
}

/// Runs `keelctl provision push`.
pub fn push_cmd(a: &PushArgs, out: &mut dyn Write) -> Result<()> {
    let bundle =
        std::fs::read(&a.bundle).with_context(|| format!("reading {}", a.bundle.display()))?;
    if bundle.len() > keel_mgmt::wire::MAX_BUNDLE {
        bail!(
            "{}: {} bytes, above the {} bytes a push carries",
            a.bundle.display(),
            bundle.len(),
            keel_mgmt::wire::MAX_BUNDLE
        );
    }
    let key = crate::provision::keys::read_signing_key(&a.signed.key)?;
    let mut c = connect(&a.signed.device)?;
    let frame = c.signed_frame(&key, &Request::Push(Bytes(bundle)));
    let reply = c.exchange(&frame)?;
    if let Some(e) = refused(&reply) {
        bail!("{e}");
    }
    match reply {
        Reply::Pushed(r) => {
            table::push_report(&r, out)?;
            Ok(())
        }
        Reply::PushRefused(msg) => bail!("the device refused the bundle: {msg}"),
        other => bail!("unexpected reply to a push: {other:?}"),
    }
}

/// Runs `keelctl reboot`.
pub fn reboot_cmd(a: &SignedArgs, out: &mut dyn Write) -> Result<()> {
    let key = crate::provision::keys::read_signing_key(&a.key)?;
    let mut c = connect(&a.device)?;
    let frame = c.signed_frame(&key, &Request::Reboot);
    let reply = c.exchange(&frame)?;
    if let Some(e) = refused(&reply) {
        bail!("{e}");
    }
    match reply {
        Reply::Rebooting => {
            writeln!(out, "{}: rebooting", c.hello.device)?;
            Ok(())
        }
        other => bail!("unexpected reply to a reboot: {other:?}"),
    }
}

/// Runs `keelctl metrics`.
pub fn metrics_cmd(a: &MetricsArgs, out: &mut dyn Write) -> Result<()> {
    let body = client::fetch_metrics(&a.device.device, a.device.timeout()?)?;
    out.write_all(body.as_bytes())?;
    Ok(())
}

/// Runs `keelctl mgmt`; returns the exit code.
pub fn mgmt_cmd(cmd: &MgmtCmd, out: &mut dyn Write) -> Result<i32> {
    match cmd {
        MgmtCmd::Replay { file, device } => {
            let frame =
                std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
            let mut c = connect(device)?;
            let reply = c.exchange(&frame)?;
            match refused(&reply) {
                Some(e) => {
                    writeln!(out, "{e}")?;
                    Ok(1)
                }
                None => {
                    writeln!(out, "the device ACCEPTED the replayed request: {reply:?}")?;
                    Ok(0)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! keelctl's commands against a `keel_mgmt::Session` served over real TCP by a fake
    //! device: the client and the device side of the protocol meet.

    use super::*;
    use keel_mgmt::{Device, PushReport, Session, Snapshot};
    use std::io::Read;
    use std::net::TcpListener;
    use std::sync::{Arc, Mutex};

    #[derive(Default)]
    struct Fake {
        key: [u8; 32],
        n: u64,
        pushed: Vec<usize>,
        reboots: u32,
    }

    impl Device for Fake {
        fn snapshot(&self) -> Snapshot {
            Snapshot {
                version: "0.1.0".into(),
                board: "fake-board".into(),
                generation: 7,
                config_source: "flash copy B".into(),
                ..Default::default()
            }
        }
        fn push(&mut self, bundle: &[u8]) -> Result<PushReport, String> {
            if bundle == b"old" {
                return Err("generation 3 is not above 7 (rollback refused)".into());
            }
            self.pushed.push(bundle.len());
            Ok(PushReport {
                generation: 8,
                added: vec![("nqn.x".into(), 2)],
                removed: vec![],
                needs_reboot: vec!["network: static address".into()],
                persisted: true,
            })
        }
        fn reboot(&mut self) {
            self.reboots += 1;
        }
        fn authorized_key(&self) -> [u8; 32] {
            self.key
        }
        fn fresh_challenge(&mut self) -> [u8; 32] {
            self.n += 1;
            let mut c = [0x11; 32];
            c[..8].copy_from_slice(&self.n.to_le_bytes());
            c
        }
    }

    /// Serves sessions one connection at a time, forever (the thread dies with the test).
    fn serve(dev: Arc<Mutex<Fake>>) -> String {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                let mut sess = Session::new();
                let mut buf = vec![0u8; 64 * 1024];
                let mut pending: Vec<u8> = Vec::new();
                loop {
                    let mut d = dev.lock().unwrap();
                    while !pending.is_empty() {
                        let n = sess.feed(&pending, &mut *d);
                        pending.drain(..n);
                        let out = sess.output().to_vec();
                        if out.is_empty() && n == 0 {
                            break;
                        }
                        s.write_all(&out).unwrap();
                        sess.advance_output(out.len());
                        sess.transport_drained(&mut *d);
                    }
                    drop(d);
                    if sess.wants_close() {
                        break;
                    }
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => pending.extend_from_slice(&buf[..n]),
                    }
                }
            }
        });
        addr
    }

    fn key_file(dir: &std::path::Path, seed: u8) -> (PathBuf, [u8; 32]) {
        let p = dir.join(format!("k{seed}"));
        std::fs::write(
            &p,
            format!(
                "keel-signing-key {}\n",
                crate::provision::keys::hex(&[seed; 32])
            ),
        )
        .unwrap();
        let sk = keel_mgmt::ed25519_dalek::SigningKey::from_bytes(&[seed; 32]);
        (p, sk.verifying_key().to_bytes())
    }

    fn signed(addr: &str, key: &std::path::Path) -> SignedArgs {
        SignedArgs {
            device: DeviceArgs {
                device: addr.into(),
                timeout: 5.0,
            },
            key: key.into(),
        }
    }

    #[test]
    fn commands_against_a_served_session() {
        let dir = std::env::temp_dir().join(format!("keelctl-mgmt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (key, public) = key_file(&dir, 5);
        let (other, _) = key_file(&dir, 6);
        let dev = Arc::new(Mutex::new(Fake {
            key: public,
            ..Default::default()
        }));
        let addr = serve(dev.clone());

        // Status, text and JSON; the request is saved.
        let saved = dir.join("req");
        let mut out = Vec::new();
        status_cmd(
            &StatusArgs {
                signed: signed(&addr, &key),
                json: false,
                save_request: Some(saved.clone()),
            },
            &mut out,
        )
        .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("board:       fake-board"), "{text}");
        assert!(text.contains("generation 7 from flash copy B"), "{text}");
        let mut out = Vec::new();
        status_cmd(
            &StatusArgs {
                signed: signed(&addr, &key),
                json: true,
                save_request: None,
            },
            &mut out,
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["generation"], 7);

        // Functions: a device without function slots refuses a create with its reason (exit
        // 1), and the list says it has none; a bad spec never leaves keelctl.
        use function::{FunctionCmd, function_cmd};
        let create = |slot: u16, ns: &str| FunctionCmd::Create {
            signed: signed(&addr, &key),
            slot,
            nqn: "nqn.2026-12.test:vf1".into(),
            namespaces: vec![ns.into()],
            limits: vec!["write_iops=800".into()],
            serial: String::new(),
            model: String::new(),
        };
        let e = function_cmd(&create(1, "ram:16MiB"), &mut Vec::new()).unwrap_err();
        assert!(
            format!("{e:#}").contains("refused: slot 1: this device cannot create functions"),
            "{e:#}"
        );
        let e = function_cmd(&create(1, "ram:1000"), &mut Vec::new()).unwrap_err();
        assert!(format!("{e:#}").contains("multiple of 512"), "{e:#}");
        let mut out = Vec::new();
        function_cmd(
            &FunctionCmd::List {
                signed: signed(&addr, &key),
                json: false,
            },
            &mut out,
        )
        .unwrap();
        assert!(
            String::from_utf8(out)
                .unwrap()
                .contains("no function slots")
        );

        // The saved request replayed: refused, exit code 1.
        let mut out = Vec::new();
        let code = mgmt_cmd(
            &MgmtCmd::Replay {
                file: saved,
                device: signed(&addr, &key).device,
            },
            &mut out,
        )
        .unwrap();
        assert_eq!(code, 1);
        assert!(String::from_utf8(out).unwrap().contains("bad signature"));

        // Another key: an error naming the refusal.
        let e = status_cmd(
            &StatusArgs {
                signed: signed(&addr, &other),
                json: false,
                save_request: None,
            },
            &mut Vec::new(),
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("device refused the request (bad signature)"),
            "{e}"
        );

        // Push: the report; a refused bundle is an error with the device's message.
        let bundle = dir.join("b");
        std::fs::write(&bundle, vec![1u8; 300_000]).unwrap();
        let mut out = Vec::new();
        push_cmd(
            &PushArgs {
                bundle: bundle.clone(),
                signed: signed(&addr, &key),
            },
            &mut out,
        )
        .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("applied: generation 8"), "{text}");
        assert!(text.contains("added: nqn.x namespace 2"), "{text}");
        assert!(
            text.contains("at next boot: network: static address"),
            "{text}"
        );
        std::fs::write(&bundle, b"old").unwrap();
        let e = push_cmd(
            &PushArgs {
                bundle,
                signed: signed(&addr, &key),
            },
            &mut Vec::new(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("rollback refused"), "{e}");
        assert_eq!(dev.lock().unwrap().pushed, vec![300_000]);

        // Metrics over HTTP.
        let body = client::fetch_metrics(&addr, Duration::from_secs(5)).unwrap();
        assert!(body.contains("keel_config_generation{source=\"flash copy B\"} 7"));

        // Reboot: answered, then the device's reboot runs.
        let mut out = Vec::new();
        reboot_cmd(&signed(&addr, &key), &mut out).unwrap();
        assert!(String::from_utf8(out).unwrap().contains("rebooting"));
        for _ in 0..100 {
            if dev.lock().unwrap().reboots == 1 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(dev.lock().unwrap().reboots, 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn timeouts_and_errors_are_clear() {
        // A listener that accepts and never answers: the hello times out.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let e = Client::connect(&addr, Duration::from_millis(300)).unwrap_err();
        assert!(
            e.to_string()
                .contains("timed out waiting for the device's hello"),
            "{e}"
        );
        drop(l);
        let e = Client::connect(&addr, Duration::from_millis(300)).unwrap_err();
        assert!(format!("{e:#}").contains("connecting to"), "{e:#}");
        let e = DeviceArgs {
            device: addr,
            timeout: 0.0,
        }
        .timeout()
        .unwrap_err();
        assert!(e.to_string().contains("--timeout"));
    }
}
