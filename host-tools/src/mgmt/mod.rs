//! `keelctl status`, `keelctl reboot`, `keelctl metrics`, `keelctl provision push` and the
//! testing command `keelctl mgmt replay`: the client side of the management protocol
//! (`keel_mgmt`, shared with the firmware).
//!
//! Every network call has a timeout (`--timeout`, default 10 s): connect, each read and each
//! write.

pub mod client;
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
