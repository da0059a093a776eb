//! `keelctl function list|create|remove`: emulated PCIe functions hot-plugged on a running
//! device's function slots (signed management requests, `keel_mgmt::function`).

use super::{SignedArgs, connect, refused, table};
use anyhow::{Context, Result, bail};
use keel_mgmt::wire::{Reply, Request};
use keel_mgmt::{
    FunctionBackend, FunctionCipher, FunctionNamespace, FunctionSlotInfo, FunctionSpec, QosLimit,
};
use std::io::Write;

/// `keelctl function`.
#[derive(Debug, clap::Subcommand)]
pub enum FunctionCmd {
    /// The device's function slots: free, live (what each serves) or removing.
    List {
        /// The device and the key.
        #[command(flatten)]
        signed: SignedArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Create a function on a free slot (hot plug): its own subsystem with its namespaces,
    /// and its controller's limits. The host sees it appear.
    Create {
        /// The device and the key.
        #[command(flatten)]
        signed: SignedArgs,
        /// The slot: 0 is the physical function, 1.. the virtual functions.
        #[arg(long)]
        slot: u16,
        /// The function's subsystem NQN (unused on the device).
        #[arg(long)]
        nqn: String,
        /// A namespace, NSID 1, 2, ... in order: `ram:SIZE[:BLOCK]` (e.g. `ram:64MiB`,
        /// `ram:1GiB:4096`), `drive:D:NSID[:OFFSET[:LENGTH]]` (a slice of a local drive's
        /// namespace, 4 KiB aligned; no LENGTH: to the end) or
        /// `remote:ADDR:PORT[+ADDR:PORT...]:NQN:NSID[:OFFSET+[LENGTH]]` (a namespace of a remote
        /// NVMe/TCP subsystem, whole or a slice). `,aes-256-xts` or `,aes-128-xts` after it:
        /// encrypted with a data key the device draws and keeps in RAM (removing the
        /// function erases it).
        #[arg(long = "ns", value_name = "SPEC", required = true)]
        namespaces: Vec<String>,
        /// A limit of the function's controller: `NAME=RATE[/BURST]` with NAME one of iops,
        /// read_iops, write_iops, bps, read_bps, write_bps (byte rates take units:
        /// `write_bps=200MiB/1MiB`). Repeatable.
        #[arg(long = "limit", value_name = "NAME=RATE[/BURST]")]
        limits: Vec<String>,
        /// Serial number (default: made by the device).
        #[arg(long, default_value = "")]
        serial: String,
        /// Model number (default: "Keel emulated NVMe").
        #[arg(long, default_value = "")]
        model: String,
    },
    /// Remove the function of a slot (hot unplug). A host still using it sees its controller
    /// fail (CSTS.CFS) and the window without a function: stop the host's use first.
    Remove {
        /// The device and the key.
        #[command(flatten)]
        signed: SignedArgs,
        /// The slot.
        #[arg(long)]
        slot: u16,
    },
}

fn size(s: &str) -> Result<u64> {
    keel_provision::model::parse_size(s).map_err(anyhow::Error::msg)
}

/// Parses a `--ns SPEC[,CIPHER]` into a backend and its encryption.
pub fn parse_namespace(arg: &str) -> Result<(FunctionBackend, FunctionCipher)> {
    let (spec, cipher) = match arg.rsplit_once(',') {
        Some((spec, c)) => (
            spec,
            FunctionCipher::from_name(c).with_context(|| {
                format!("--ns {arg}: `{c}`: the encryption is aes-256-xts or aes-128-xts")
            })?,
        ),
        None => (arg, FunctionCipher::None),
    };
    Ok((parse_backend(spec)?, cipher))
}

/// `ADDR:PORT[+ADDR:PORT...]:NQN:NSID[:OFFSET+[LENGTH]]` (the NQN starts with `nqn.`).
fn parse_remote(spec: &str, s: &str) -> Result<FunctionBackend> {
    let bad = || {
        anyhow::anyhow!(
            "--ns {spec}: expected remote:ADDR:PORT[+ADDR:PORT...]:NQN:NSID[:OFFSET+[LENGTH]]"
        )
    };
    let at = s.find(":nqn.").ok_or_else(bad)?;
    let paths = s[..at]
        .split('+')
        .map(|p| {
            let (ip, port) = p.rsplit_once(':').ok_or_else(bad)?;
            let ip: std::net::Ipv4Addr = ip
                .parse()
                .with_context(|| format!("--ns {spec}: `{ip}` is not an IPv4 address"))?;
            let port: u16 = port
                .parse()
                .with_context(|| format!("--ns {spec}: `{port}` is not a port"))?;
            Ok((ip.octets(), port))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut rest = &s[at + 1..];
    let (mut offset, mut length) = (0, 0);
    if let Some((head, last)) = rest.rsplit_once(':')
        && let Some((o, l)) = last.split_once('+')
    {
        offset = size(o).with_context(|| format!("--ns {spec}: offset"))?;
        length = if l.is_empty() {
            0
        } else {
            size(l).with_context(|| format!("--ns {spec}: length"))?
        };
        rest = head;
    }
    let (nqn, nsid) = rest.rsplit_once(':').ok_or_else(bad)?;
    Ok(FunctionBackend::Remote {
        nqn: nqn.to_string(),
        paths,
        nsid: nsid
            .parse()
            .with_context(|| format!("--ns {spec}: remote NSID `{nsid}` is not a number"))?,
        offset,
        length,
    })
}

/// Parses a `--ns` spec into a backend.
pub fn parse_backend(spec: &str) -> Result<FunctionBackend> {
    if let Some(rest) = spec.strip_prefix("remote:") {
        return parse_remote(spec, rest);
    }
    let parts: Vec<&str> = spec.split(':').collect();
    let num = |s: &str, what: &str| -> Result<u64> {
        s.parse()
            .with_context(|| format!("--ns {spec}: {what} `{s}` is not a number"))
    };
    match parts.as_slice() {
        ["ram", sz] => Ok(FunctionBackend::Ram {
            bytes: size(sz).with_context(|| format!("--ns {spec}"))?,
            block_size: 512,
        }),
        ["ram", sz, bs] => Ok(FunctionBackend::Ram {
            bytes: size(sz).with_context(|| format!("--ns {spec}"))?,
            block_size: num(bs, "block size")? as u32,
        }),
        ["drive", d, n, rest @ ..] if rest.len() <= 2 => Ok(FunctionBackend::Drive {
            drive: u16::try_from(num(d, "drive")?).context("drive index")?,
            nsid: u32::try_from(num(n, "NSID")?).context("drive NSID")?,
            offset: rest.first().map(|o| size(o)).transpose()?.unwrap_or(0),
            length: rest.get(1).map(|l| size(l)).transpose()?.unwrap_or(0),
        }),
        _ => bail!(
            "--ns {spec}: expected ram:SIZE[:BLOCK], drive:D:NSID[:OFFSET[:LENGTH]] or remote:..."
        ),
    }
}

/// Parses a `--limit NAME=RATE[/BURST]`.
pub fn parse_limit(s: &str) -> Result<QosLimit> {
    let (name, value) = s
        .split_once('=')
        .with_context(|| format!("--limit {s}: expected NAME=RATE[/BURST]"))?;
    let (rate, burst) = match value.split_once('/') {
        Some((r, b)) => (r, Some(b)),
        None => (value, None),
    };
    let bytes = name.ends_with("bps");
    let n = |v: &str| -> Result<u64> {
        if bytes {
            size(v).with_context(|| format!("--limit {s}"))
        } else {
            v.trim()
                .parse()
                .with_context(|| format!("--limit {s}: `{v}` is not a number"))
        }
    };
    Ok(QosLimit {
        name: name.trim().to_string(),
        per_sec: n(rate)?,
        burst: burst.map(n).transpose()?.unwrap_or(0),
    })
}

fn slot_line(verb: &str, f: &FunctionSlotInfo, out: &mut dyn Write) -> Result<()> {
    writeln!(
        out,
        "slot {} ({}): {verb}: subsystem {}, namespace(s) {}, limits {}; now {}",
        f.slot,
        f.kind,
        f.subsystem,
        f.nsids
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(","),
        table::limit_list(&f.limits),
        f.state.name()
    )?;
    Ok(())
}

/// Runs `keelctl function`.
pub fn function_cmd(cmd: &FunctionCmd, out: &mut dyn Write) -> Result<()> {
    let (signed, request) = match cmd {
        FunctionCmd::List { signed, .. } => (signed, Request::Status),
        FunctionCmd::Create {
            signed,
            slot,
            nqn,
            namespaces,
            limits,
            serial,
            model,
        } => {
            let spec = FunctionSpec {
                slot: *slot,
                nqn: nqn.clone(),
                serial: serial.clone(),
                model: model.clone(),
                namespaces: namespaces
                    .iter()
                    .enumerate()
                    .map(|(i, s)| {
                        let (backend, encryption) = parse_namespace(s)?;
                        Ok(FunctionNamespace {
                            nsid: i as u32 + 1,
                            backend,
                            encryption,
                        })
                    })
                    .collect::<Result<_>>()?,
                limits: limits
                    .iter()
                    .map(|l| parse_limit(l))
                    .collect::<Result<_>>()?,
            };
            // The device checks it too; checked here the operator gets the reason without a
            // round trip.
            spec.validate().map_err(anyhow::Error::msg)?;
            (signed, Request::CreateFunction(spec))
        }
        FunctionCmd::Remove { signed, slot } => (signed, Request::RemoveFunction(*slot)),
    };
    let key = crate::provision::keys::read_signing_key(&signed.key)?;
    let mut c = connect(&signed.device)?;
    let reply = c.request(&key, &request)?;
    if let Some(e) = refused(&reply) {
        bail!("{e}");
    }
    match reply {
        Reply::Status(s) => {
            if matches!(cmd, FunctionCmd::List { json: true, .. }) {
                serde_json::to_writer_pretty(&mut *out, &s.function_slots)?;
                writeln!(out)?;
            } else if s.function_slots.is_empty() {
                writeln!(out, "{}: no function slots", c.hello.device)?;
            } else {
                table::function_slots(&s.function_slots, out)?;
            }
            Ok(())
        }
        Reply::FunctionCreated(f) => slot_line("created", &f, out),
        Reply::FunctionRemoved(f) => slot_line("removed", &f, out),
        Reply::FunctionRefused(m) => bail!("the device refused: {m}"),
        other => bail!("unexpected reply: {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_and_limit_arguments() {
        assert_eq!(
            parse_backend("ram:64MiB").unwrap(),
            FunctionBackend::Ram {
                bytes: 64 << 20,
                block_size: 512
            }
        );
        assert_eq!(
            parse_backend("ram:1GiB:4096").unwrap(),
            FunctionBackend::Ram {
                bytes: 1 << 30,
                block_size: 4096
            }
        );
        assert_eq!(
            parse_backend("drive:0:1:1GiB:512MiB").unwrap(),
            FunctionBackend::Drive {
                drive: 0,
                nsid: 1,
                offset: 1 << 30,
                length: 512 << 20
            }
        );
        assert_eq!(
            parse_backend("drive:1:2").unwrap(),
            FunctionBackend::Drive {
                drive: 1,
                nsid: 2,
                offset: 0,
                length: 0
            }
        );
        for bad in [
            "ram",
            "ram:lots",
            "disk:1",
            "drive:x:1",
            "drive:0:1:0:0:0",
            "ram:64MB",
        ] {
            assert!(parse_backend(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_limit("write_bps=200MiB/1MiB").unwrap(),
            QosLimit {
                name: "write_bps".into(),
                per_sec: 200 << 20,
                burst: 1 << 20
            }
        );
        assert_eq!(
            parse_limit("iops=5000").unwrap(),
            QosLimit {
                name: "iops".into(),
                per_sec: 5000,
                burst: 0
            }
        );
        for bad in ["iops", "iops=fast", "read_iops=10/x"] {
            assert!(parse_limit(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn encrypted_and_remote_namespace_arguments() {
        assert_eq!(
            parse_namespace("ram:64MiB,aes-256-xts").unwrap(),
            (
                FunctionBackend::Ram {
                    bytes: 64 << 20,
                    block_size: 512
                },
                FunctionCipher::Aes256Xts
            )
        );
        assert_eq!(
            parse_namespace("drive:0:1,aes-128-xts").unwrap().1,
            FunctionCipher::Aes128Xts
        );
        assert_eq!(parse_namespace("ram:8MiB").unwrap().1, FunctionCipher::None);
        assert_eq!(
            parse_namespace(
                "remote:10.0.2.2:4420+10.0.9.1:4421:nqn.2026-11.dev.keel:pool:3:1GiB+,aes-256-xts"
            )
            .unwrap(),
            (
                FunctionBackend::Remote {
                    nqn: "nqn.2026-11.dev.keel:pool".into(),
                    paths: vec![([10, 0, 2, 2], 4420), ([10, 0, 9, 1], 4421)],
                    nsid: 3,
                    offset: 1 << 30,
                    length: 0,
                },
                FunctionCipher::Aes256Xts
            )
        );
        assert_eq!(
            parse_backend("remote:10.0.2.2:4420:nqn.2026-11.dev.keel:pool:1:0+64MiB").unwrap(),
            FunctionBackend::Remote {
                nqn: "nqn.2026-11.dev.keel:pool".into(),
                paths: vec![([10, 0, 2, 2], 4420)],
                nsid: 1,
                offset: 0,
                length: 64 << 20,
            }
        );
        for bad in [
            "ram:8MiB,xts",
            "ram:8MiB,aes-256-xts,aes-128-xts",
            "remote:10.0.2.2:4420",
            "remote:10.0.2:4420:nqn.a:1",
            "remote:10.0.2.2:x:nqn.a:1",
            "remote:10.0.2.2:4420:nqn.a:one",
        ] {
            assert!(parse_namespace(bad).is_err(), "{bad}");
        }
    }
}
