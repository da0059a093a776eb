//! `keelctl nvme ...`: the subcommands, their arguments and their output.
//!
//! Everything prints to the `out` writer it is given (stdout in `keelctl`), diagnostics to
//! stderr; [`run`] returns the process exit code (0 success, 1 verify mismatch) or an error.

use super::ctrl::{Controller, Params};
use super::device::TcpTarget;
use super::pattern::human_bytes;
use super::{DEFAULT_SUBNQN, default_host_identity, format_uuid, hostid_for, parse_uuid};
use crate::blockdev::cli::{self as blockcli, IoCmd};
use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use keel_nvme::DISCOVERY_NQN;
use keel_nvme::identify::{IdentifyController, IdentifyNamespace, NsIdentifiers, cntrltype};
use keel_nvme::log::discovery::{self as disc, Entry, Header};
use keel_nvmf_tcp::Digests;
use serde_json::{Value, json};
use std::io::Write;
use std::time::Duration;

/// Digests to negotiate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DigestArg {
    /// No digests.
    None,
    /// Header digest only.
    Header,
    /// Data digest only.
    Data,
    /// Header and data digests.
    Both,
}

impl DigestArg {
    /// As the transport's flags.
    pub fn digests(self) -> Digests {
        Digests {
            header: matches!(self, Self::Header | Self::Both),
            data: matches!(self, Self::Data | Self::Both),
        }
    }
}

/// Where the controller is and who we are (options of `keelctl nvme`, accepted before or
/// after the subcommand).
#[derive(Debug, Clone, Args)]
pub struct TargetArgs {
    /// Controller address, HOST:PORT [default: 127.0.0.1:4420; discover: 127.0.0.1:8009].
    #[arg(long, global = true)]
    pub addr: Option<String>,
    /// Subsystem NQN [default: the Keel default subsystem; discover: the discovery NQN].
    #[arg(long, global = true)]
    pub nqn: Option<String>,
    /// Host NQN [default: a stable NQN derived from this machine's id].
    #[arg(long, global = true)]
    pub hostnqn: Option<String>,
    /// Host ID (UUID) [default: from the host NQN].
    #[arg(long, global = true)]
    pub hostid: Option<String>,
    /// Digests to negotiate.
    #[arg(long, global = true, value_enum, default_value_t = DigestArg::None)]
    pub digests: DigestArg,
    /// Keep Alive Timeout to request, seconds (0: none).
    #[arg(long, global = true, default_value_t = 10)]
    pub kato: u32,
    /// Bound on every wait (connect, each command), seconds.
    #[arg(long, global = true, default_value_t = 30.0)]
    pub timeout: f64,
    /// Disable SQ flow control at Connect (CATTR bit 2, as `nvme connect --disable-sqflow`):
    /// the controller may then complete a read with its last C2HData PDU (SUCCESS flag), with
    /// no response capsule.
    #[arg(long, global = true)]
    pub disable_sqflow: bool,
    /// I/O queues per controller for `bench --connections C`: C / N controllers (associations)
    /// of N I/O queues each, e.g. `--connections 16 --queues-per-controller 4` is 4
    /// controllers x 4 queues [default: as many as the first controller grants].
    #[arg(long, global = true, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub queues_per_controller: Option<u16>,
}

impl TargetArgs {
    /// Connection parameters, with the defaults for a discovery or an I/O controller.
    pub fn params(&self, discovery: bool) -> Result<Params> {
        let (def_addr, def_nqn) = if discovery {
            ("127.0.0.1:8009", DISCOVERY_NQN)
        } else {
            ("127.0.0.1:4420", DEFAULT_SUBNQN)
        };
        let (hostnqn, mut hostid) = match &self.hostnqn {
            Some(n) => (n.clone(), hostid_for(n)),
            None => default_host_identity(),
        };
        if let Some(h) = &self.hostid {
            hostid = parse_uuid(h).with_context(|| format!("--hostid {h:?} is not a UUID"))?;
        }
        if hostnqn.is_empty() || hostnqn.len() > keel_nvme::NQN_MAX_LEN {
            bail!("--hostnqn must be 1 to 223 bytes");
        }
        if !(self.timeout > 0.0 && self.timeout < 1e6) {
            bail!("--timeout must be positive");
        }
        Ok(Params {
            addr: self.addr.clone().unwrap_or_else(|| def_addr.into()),
            subnqn: self.nqn.clone().unwrap_or_else(|| def_nqn.into()),
            hostnqn,
            hostid,
            digests: self.digests.digests(),
            kato: Duration::from_secs(self.kato as u64),
            timeout: Duration::from_secs_f64(self.timeout),
            disable_sqflow: self.disable_sqflow,
        })
    }
}

/// `keelctl nvme` subcommands.
#[derive(Debug, Subcommand)]
pub enum NvmeCmd {
    /// Read the discovery log page of a discovery controller.
    Discover {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Identify the controller and its namespaces.
    Identify {
        /// Only this namespace.
        #[arg(long)]
        nsid: Option<u32>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Wait for an Asynchronous Event (namespaces added or removed...): enables namespace
    /// notices, sends an Asynchronous Event Request, waits up to --timeout seconds, then
    /// prints the event, the Changed Namespace List (log 04h) and Identify of the namespaces
    /// in it. Exit 0 with an event, 2 without one in time.
    Watch {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// read, write, verify, bench.
    #[command(flatten)]
    Io(IoCmd),
}

/// Runs a subcommand against the controller `target` names; returns the exit code.
pub fn run(target: &TargetArgs, cmd: NvmeCmd, out: &mut dyn Write) -> Result<i32> {
    match cmd {
        NvmeCmd::Discover { json } => discover(target, json, out),
        NvmeCmd::Identify { nsid, json } => identify(target, nsid, json, out),
        NvmeCmd::Watch { json } => watch(target, json, out),
        NvmeCmd::Io(cmd) => {
            let t = TcpTarget::new(connect(target, false)?)
                .per_controller(target.queues_per_controller);
            let r = blockcli::run(&t, cmd, out);
            if let Err(e) = t.close() {
                eprintln!("keelctl: warning: {e:#}");
            }
            r
        }
    }
}

fn connect(target: &TargetArgs, discovery: bool) -> Result<Controller> {
    let p = target.params(discovery)?;
    let what = format!("connecting to {} at {}", p.subnqn, p.addr);
    Controller::connect(p).context(what)
}

fn trim(b: &[u8]) -> String {
    String::from_utf8_lossy(b)
        .trim_end_matches(['\0', ' '])
        .to_string()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn trtype_name(t: u8) -> String {
    match t {
        disc::TRTYPE_RDMA => "rdma".into(),
        disc::TRTYPE_FC => "fc".into(),
        disc::TRTYPE_TCP => "tcp".into(),
        disc::TRTYPE_LOOP => "loop".into(),
        x => format!("unknown ({x})"),
    }
}

fn adrfam_name(a: u8) -> String {
    match a {
        disc::ADRFAM_IPV4 => "ipv4".into(),
        disc::ADRFAM_IPV6 => "ipv6".into(),
        x => format!("unknown ({x})"),
    }
}

fn subtype_name(s: u8) -> String {
    match s {
        disc::SUBTYPE_DISCOVERY_REFERRAL => "discovery subsystem referral".into(),
        disc::SUBTYPE_NVM => "nvme subsystem".into(),
        disc::SUBTYPE_CURRENT_DISCOVERY => "current discovery subsystem".into(),
        x => format!("unknown ({x})"),
    }
}

fn treq_name(t: u8) -> String {
    let base = match t & 3 {
        disc::TREQ_NOT_SPECIFIED => "not specified",
        disc::TREQ_REQUIRED => "required",
        disc::TREQ_NOT_REQUIRED => "not required",
        _ => "reserved",
    };
    if t & disc::TREQ_DISABLE_SQFLOW != 0 {
        format!("{base}, sq flow control disable supported")
    } else {
        base.into()
    }
}

fn sectype_name(tsas: &[u8; 256]) -> String {
    match tsas[0] {
        0 => "none".into(),
        1 => "tls 1.2".into(),
        2 => "tls 1.3".into(),
        x => format!("unknown ({x})"),
    }
}

/// JSON of one discovery log entry.
pub fn entry_json(e: &Entry) -> Value {
    json!({
        "trtype": trtype_name(e.trtype),
        "adrfam": adrfam_name(e.adrfam),
        "subtype": subtype_name(e.subtype),
        "treq": treq_name(e.treq),
        "portid": e.portid,
        "trsvcid": trim(&e.trsvcid),
        "traddr": trim(&e.traddr),
        "subnqn": trim(&e.subnqn),
        "cntlid": e.cntlid,
        "asqsz": e.asqsz,
        "sectype": sectype_name(&e.tsas),
    })
}

/// Human form of the discovery log.
pub fn format_discovery(h: &Header, entries: &[Entry]) -> String {
    let mut s = format!(
        "Discovery Log: {} record(s), generation {}\n",
        h.numrec, h.genctr
    );
    for (i, e) in entries.iter().enumerate() {
        s += &format!("===== Discovery Log Entry {i} =====\n");
        s += &format!("trtype:  {}\n", trtype_name(e.trtype));
        s += &format!("adrfam:  {}\n", adrfam_name(e.adrfam));
        s += &format!("subtype: {}\n", subtype_name(e.subtype));
        s += &format!("treq:    {}\n", treq_name(e.treq));
        s += &format!("portid:  {}\n", e.portid);
        s += &format!("trsvcid: {}\n", trim(&e.trsvcid));
        s += &format!("subnqn:  {}\n", trim(&e.subnqn));
        s += &format!("traddr:  {}\n", trim(&e.traddr));
        s += &format!("cntlid:  {:#06x}\n", e.cntlid);
        s += &format!("asqsz:   {}\n", e.asqsz);
        s += &format!("sectype: {}\n", sectype_name(&e.tsas));
    }
    s
}

fn discover(target: &TargetArgs, json: bool, out: &mut dyn Write) -> Result<i32> {
    let c = connect(target, true)?;
    let (h, entries) = c
        .discovery_log()
        .context("reading the discovery log page")?;
    if let Err(e) = c.close() {
        eprintln!("keelctl: warning: closing the discovery controller: {e}");
    }
    if json {
        let v = json!({
            "genctr": h.genctr,
            "numrec": h.numrec,
            "recfmt": h.recfmt,
            "records": entries.iter().map(entry_json).collect::<Vec<_>>(),
        });
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
    } else {
        out.write_all(format_discovery(&h, &entries).as_bytes())?;
    }
    Ok(0)
}

fn version(v: u32) -> String {
    format!("{}.{}.{}", v >> 16, (v >> 8) & 0xFF, v & 0xFF)
}

fn cntrltype_name(t: u8) -> &'static str {
    match t {
        cntrltype::IO => "io",
        cntrltype::DISCOVERY => "discovery",
        cntrltype::ADMIN => "admin",
        _ => "not reported",
    }
}

/// What `identify` reports about one namespace.
#[derive(Debug, Clone)]
pub struct NsReport {
    /// NSID.
    pub nsid: u32,
    /// Identify Namespace.
    pub id: IdentifyNamespace,
    /// Descriptor list (when the controller has one).
    pub ids: Option<NsIdentifiers>,
}

/// JSON of Identify Controller.
pub fn controller_json(id: &IdentifyController, max_transfer: u32) -> Value {
    json!({
        "vid": id.vid,
        "ssvid": id.ssvid,
        "sn": trim(&id.sn),
        "mn": trim(&id.mn),
        "fr": trim(&id.fr),
        "ver": version(id.ver),
        "cntlid": id.cntlid,
        "cntrltype": cntrltype_name(id.cntrltype),
        "mdts": id.mdts,
        "max_transfer_bytes": max_transfer,
        "maxcmd": id.maxcmd,
        "kas": id.kas,
        "nn": id.nn,
        "oncs": id.oncs.bits(),
        "vwc": id.vwc.bits(),
        "sgls": id.sgls,
        "subnqn": trim(&id.subnqn),
        "ioccsz": id.ioccsz,
        "iorcsz": id.iorcsz,
        "icdoff": id.icdoff,
        "fcatt": id.fcatt,
        "msdbd": id.msdbd,
    })
}

/// JSON of one namespace.
pub fn namespace_json(n: &NsReport) -> Value {
    let bs = n.id.block_size();
    let opt = |b: &[u8]| {
        if b.iter().all(|&x| x == 0) {
            Value::Null
        } else {
            Value::String(hex(b))
        }
    };
    let ids = n.ids.unwrap_or_default();
    let nguid = if n.id.nguid != [0; 16] {
        n.id.nguid
    } else {
        ids.nguid
    };
    let eui64 = if n.id.eui64 != [0; 8] {
        n.id.eui64
    } else {
        ids.eui64
    };
    json!({
        "nsid": n.nsid,
        "nsze": n.id.nsze,
        "ncap": n.id.ncap,
        "nuse": n.id.nuse,
        "block_size": bs,
        "size_bytes": n.id.nsze.saturating_mul(bs as u64),
        "flbas": n.id.flbas,
        "nguid": opt(&nguid),
        "eui64": opt(&eui64),
        "uuid": if ids.uuid == [0; 16] { Value::Null } else { Value::String(format_uuid(&ids.uuid)) },
    })
}

/// Human form of Identify Controller and namespaces.
pub fn format_identify(
    id: &IdentifyController,
    max_transfer: u32,
    vs: u32,
    nss: &[NsReport],
) -> String {
    let mut s = String::new();
    let mut kv = |k: &str, v: String| s += &format!("  {k:<9} {v}\n");
    kv("vid", format!("{:#06x}", id.vid));
    kv("ssvid", format!("{:#06x}", id.ssvid));
    kv("sn", trim(&id.sn));
    kv("mn", trim(&id.mn));
    kv("fr", trim(&id.fr));
    kv("ver", format!("{} (VS {})", version(id.ver), version(vs)));
    kv("cntlid", format!("{:#06x}", id.cntlid));
    kv("cntrltype", cntrltype_name(id.cntrltype).into());
    kv(
        "mdts",
        format!(
            "{} ({} per command)",
            id.mdts,
            human_bytes(max_transfer as u64)
        ),
    );
    kv("maxcmd", id.maxcmd.to_string());
    kv("kas", format!("{} ({} ms)", id.kas, id.kas as u32 * 100));
    kv("nn", id.nn.to_string());
    kv("oncs", format!("{:#06x}", id.oncs.bits()));
    kv("vwc", format!("{:#04x}", id.vwc.bits()));
    kv("sgls", format!("{:#010x}", id.sgls));
    kv("subnqn", trim(&id.subnqn));
    kv(
        "ioccsz",
        format!(
            "{} ({} bytes in-capsule data)",
            id.ioccsz,
            (id.ioccsz * 16).saturating_sub(64)
        ),
    );
    kv("iorcsz", id.iorcsz.to_string());
    kv("icdoff", id.icdoff.to_string());
    kv("fcatt", format!("{:#04x}", id.fcatt));
    kv("msdbd", id.msdbd.to_string());
    let mut text = format!("Controller {} ({})\n", id.cntlid, trim(&id.subnqn)) + &s;
    for n in nss {
        let v = namespace_json(n);
        let bs = n.id.block_size();
        let size = n.id.nsze.saturating_mul(bs as u64);
        text += &format!("Namespace {}\n", n.nsid);
        let mut line = |k: &str, v: String| text += &format!("  {k:<10} {v}\n");
        line(
            "nsze",
            format!("{} blocks ({})", n.id.nsze, human_bytes(size)),
        );
        line("ncap", n.id.ncap.to_string());
        line("nuse", n.id.nuse.to_string());
        line(
            "block size",
            format!("{bs} (LBA format {})", n.id.flbas & 0xF),
        );
        for k in ["nguid", "eui64", "uuid"] {
            line(k, v[k].as_str().unwrap_or("-").to_string());
        }
    }
    text
}

/// Identify Namespace (and its descriptor list, when the controller has one) of `only`, or
/// of every namespace `active` lists.
pub fn namespace_reports(
    only: Option<u32>,
    active: impl FnOnce() -> Result<Vec<u32>>,
    mut identify: impl FnMut(u32) -> Result<(IdentifyNamespace, Option<NsIdentifiers>)>,
) -> Result<Vec<NsReport>> {
    let nsids = match only {
        Some(n) => vec![n],
        None => active().context("listing active namespaces")?,
    };
    nsids
        .into_iter()
        .map(|nsid| {
            let (id, ids) = identify(nsid).with_context(|| format!("Identify Namespace {nsid}"))?;
            Ok(NsReport { nsid, id, ids })
        })
        .collect()
}

/// Prints Identify Controller and the namespaces, as text or JSON.
pub fn print_identify(
    out: &mut dyn Write,
    json: bool,
    id: &IdentifyController,
    max_transfer: u32,
    vs: u32,
    nss: &[NsReport],
) -> Result<i32> {
    if json {
        let v = json!({
            "controller": controller_json(id, max_transfer),
            "namespaces": nss.iter().map(namespace_json).collect::<Vec<_>>(),
        });
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
    } else {
        out.write_all(format_identify(id, max_transfer, vs, nss).as_bytes())?;
    }
    Ok(0)
}

fn identify(
    target: &TargetArgs,
    only: Option<u32>,
    json: bool,
    out: &mut dyn Write,
) -> Result<i32> {
    let c = connect(target, false)?;
    let nss = namespace_reports(
        only,
        || Ok(c.active_namespaces()?),
        |nsid| Ok((c.identify_namespace(nsid)?, c.namespace_ids(nsid).ok())),
    );
    let (id, vs, mt) = (c.id, c.vs, c.max_transfer());
    if let Err(e) = c.close() {
        eprintln!("keelctl: warning: closing the controller: {e}");
    }
    print_identify(out, json, &id, mt, vs, &nss?)
}

/// Names of an Asynchronous Event Request completion's DW0 (NVMe base 2.0 Figures 146-151).
pub fn async_event_names(dw0: u32) -> (&'static str, String) {
    let ty = (dw0 & 7) as u8;
    let info = ((dw0 >> 8) & 0xff) as u8;
    match ty {
        0 => ("error", format!("error status {info:#04x}")),
        1 => ("smart/health", format!("health status {info:#04x}")),
        2 => (
            "notice",
            match info {
                0x00 => "namespace attribute changed".into(),
                0x01 => "firmware activation starting".into(),
                0x02 => "telemetry log changed".into(),
                0x03 => "asymmetric namespace access change".into(),
                0xF0 => "discovery log page change".into(),
                x => format!("notice {x:#04x}"),
            },
        ),
        6 => ("i/o command set specific", format!("{info:#04x}")),
        7 => ("vendor specific", format!("{info:#04x}")),
        _ => ("reserved", format!("{info:#04x}")),
    }
}

/// Decodes a Changed Namespace List (log 04h): the NSIDs, or `None` when the list overflowed
/// (first entry FFFFFFFFh: more than 1024 changed).
pub fn changed_namespaces(log: &[u8]) -> Option<Vec<u32>> {
    let ids: Vec<u32> = keel_nvme::identify::nsid_list(log).collect();
    if ids.first() == Some(&u32::MAX) {
        None
    } else {
        Some(ids)
    }
}

fn watch(target: &TargetArgs, json: bool, out: &mut dyn Write) -> Result<i32> {
    use keel_nvme::opcode::async_event::AEC_NS_ATTRIBUTE;
    let wait = Duration::from_secs_f64(target.timeout);
    let c = connect(target, false)?;
    c.set_async_event_config(AEC_NS_ATTRIBUTE)?;
    let cid = c
        .submit_async_event_request()
        .context("Asynchronous Event Request")?;
    eprintln!(
        "keelctl: controller {} of {}: waiting up to {:?} for an asynchronous event",
        c.cntlid,
        c.params().subnqn,
        wait
    );
    let Some(done) = c.wait_admin(cid, wait, "Asynchronous Event Request")? else {
        if let Err(e) = c.close() {
            eprintln!("keelctl: warning: closing the controller: {e}");
        }
        eprintln!("keelctl: no asynchronous event within {wait:?}");
        return Ok(2);
    };
    let dw0 = done.cqe.dw0;
    let (ty, info) = async_event_names(dw0);
    let log_page = ((dw0 >> 16) & 0xff) as u8;
    let mut changed = None;
    let mut nss = Vec::new();
    if log_page == keel_nvme::LogPageId::ChangedNamespaceList as u8 {
        let log = c
            .get_log_page(log_page, 0, 0, 4096)
            .context("Get Log Page (Changed Namespace List)")?;
        changed = Some(changed_namespaces(&log));
        let active = c.active_namespaces().context("listing active namespaces")?;
        for &nsid in changed.iter().flatten().flatten() {
            if !active.contains(&nsid) {
                continue;
            }
            let id = c
                .identify_namespace(nsid)
                .with_context(|| format!("Identify Namespace {nsid}"))?;
            let ids = c.namespace_ids(nsid).ok();
            nss.push(NsReport { nsid, id, ids });
        }
    }
    if let Err(e) = c.close() {
        eprintln!("keelctl: warning: closing the controller: {e}");
    }
    let changed_ids: Option<Vec<u32>> = changed.clone().flatten();
    if json {
        let v = json!({
            "event": {
                "dw0": dw0,
                "type": ty,
                "info": info,
                "log_page": log_page,
            },
            "changed_namespaces": match &changed {
                Some(Some(ids)) => json!(ids),
                Some(None) => json!("overflow"),
                None => Value::Null,
            },
            "namespaces": nss.iter().map(namespace_json).collect::<Vec<_>>(),
        });
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
    } else {
        writeln!(
            out,
            "event: {ty}: {info} (dw0 {dw0:#010x}, log page {log_page:#04x})"
        )?;
        match &changed {
            Some(Some(_)) => {
                let list: Vec<String> = changed_ids
                    .iter()
                    .flatten()
                    .map(|n| n.to_string())
                    .collect();
                writeln!(out, "changed namespaces: {}", list.join(", "))?;
            }
            Some(None) => writeln!(out, "changed namespaces: more than 1024 (list overflowed)")?,
            None => {}
        }
        for n in &nss {
            let bs = n.id.block_size();
            writeln!(
                out,
                "namespace {}: {} ({} blocks of {bs} bytes)",
                n.nsid,
                human_bytes(n.id.nsze.saturating_mul(u64::from(bs))),
                n.id.nsze
            )?;
        }
        for nsid in changed_ids.iter().flatten() {
            if !nss.iter().any(|n| n.nsid == *nsid) {
                writeln!(out, "namespace {nsid}: not active (removed)")?;
            }
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct T {
        #[command(flatten)]
        target: TargetArgs,
        #[command(subcommand)]
        cmd: NvmeCmd,
    }

    fn parse(args: &[&str]) -> Result<(TargetArgs, NvmeCmd), clap::Error> {
        T::try_parse_from(std::iter::once("nvme").chain(args.iter().copied()))
            .map(|t| (t.target, t.cmd))
    }

    #[test]
    fn target_options_before_or_after_the_subcommand() {
        let args = [
            "bench",
            "--addr",
            "h:1",
            "--bs",
            "8k",
            "--connections",
            "2",
            "--digests",
            "both",
        ];
        let (target, cmd) = parse(&args).unwrap();
        let NvmeCmd::Io(IoCmd::Bench(b)) = cmd else {
            panic!("not bench")
        };
        assert_eq!((b.bs, b.connections), (8192, 2));
        let p = target.params(false).unwrap();
        assert_eq!(p.addr, "h:1");
        assert_eq!(p.subnqn, DEFAULT_SUBNQN);
        assert_eq!(
            p.digests,
            Digests {
                header: true,
                data: true
            }
        );
        let (target, _) = parse(&["--addr", "h:2", "identify"]).unwrap();
        assert_eq!(target.params(false).unwrap().addr, "h:2");
    }

    #[test]
    fn defaults_per_command() {
        let (target, cmd) = parse(&["discover", "--json"]).unwrap();
        let NvmeCmd::Discover { json } = cmd else {
            panic!()
        };
        assert!(json);
        let p = target.params(true).unwrap();
        assert_eq!(p.addr, "127.0.0.1:8009");
        assert_eq!(p.subnqn, DISCOVERY_NQN);
        assert_eq!(p.digests, Digests::default());
        assert_eq!(p.kato, Duration::from_secs(10));
        let (nqn, id) = default_host_identity();
        assert_eq!((p.hostnqn, p.hostid), (nqn, id));
        let (target, cmd) = parse(&[
            "read",
            "--lba",
            "0",
            "--count",
            "8",
            "-o",
            "x",
            "--hostnqn",
            "nqn.h",
        ])
        .unwrap();
        let NvmeCmd::Io(IoCmd::Read(r)) = cmd else {
            panic!()
        };
        assert_eq!(r.blocks.nsid, 1);
        let p = target.params(false).unwrap();
        assert_eq!(p.addr, "127.0.0.1:4420");
        assert_eq!(p.hostnqn, "nqn.h");
        assert_eq!(p.hostid, hostid_for("nqn.h"));
        let (target, _) = parse(&["identify", "--hostid", "not-a-uuid"]).unwrap();
        assert!(target.params(false).is_err());
    }

    #[test]
    fn discovery_format() {
        // A Discovery Log Page Entry as a Linux target writes it (struct
        // nvmf_disc_rsp_page_entry, NVMe-oF 1.1 §5.3): TCP, IPv4, NVM subsystem, PORTID 1,
        // CNTLID FFFFh, ASQSZ 32, TRSVCID at byte 32, SUBNQN at 256, TRADDR at 512.
        let mut raw = [0u8; disc::RECORD_LEN];
        raw[..10].copy_from_slice(&[3, 1, 2, 0, 1, 0, 0xFF, 0xFF, 32, 0]);
        raw[32..36].copy_from_slice(b"4420");
        raw[256..256 + DEFAULT_SUBNQN.len()].copy_from_slice(DEFAULT_SUBNQN.as_bytes());
        raw[512..521].copy_from_slice(b"10.0.2.15");
        let e = Entry::decode(&raw);
        let h = Header {
            genctr: 3,
            numrec: 1,
            recfmt: 0,
        };
        let s = format_discovery(&h, &[e]);
        assert!(s.contains("trtype:  tcp\n"), "{s}");
        assert!(s.contains("traddr:  10.0.2.15\n"), "{s}");
        assert!(s.contains("trsvcid: 4420\n"), "{s}");
        assert!(s.contains(&format!("subnqn:  {DEFAULT_SUBNQN}\n")), "{s}");
        let j = entry_json(&e);
        assert_eq!(j["traddr"], "10.0.2.15");
        assert_eq!(j["subnqn"], DEFAULT_SUBNQN);
        assert_eq!(j["trsvcid"], "4420");
        assert_eq!(
            (j["portid"].as_u64(), j["cntlid"].as_u64()),
            (Some(1), Some(0xFFFF))
        );
        assert_eq!(j["subtype"], "nvme subsystem");
    }

    #[test]
    fn async_events_and_changed_lists() {
        let (ty, info) = async_event_names(0x0004_0002);
        assert_eq!(
            (ty, info.as_str()),
            ("notice", "namespace attribute changed")
        );
        let mut log = vec![0u8; 4096];
        log[..4].copy_from_slice(&3u32.to_le_bytes());
        log[4..8].copy_from_slice(&7u32.to_le_bytes());
        assert_eq!(changed_namespaces(&log), Some(vec![3, 7]));
        log[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(changed_namespaces(&log), None);
        assert_eq!(changed_namespaces(&[0; 4096]), Some(vec![]));
    }

    #[test]
    fn identify_format() {
        let mut id = IdentifyController {
            mdts: 5,
            cntlid: 1,
            nn: 1024,
            ioccsz: 516,
            ..Default::default()
        };
        id.subnqn[..4].copy_from_slice(b"nqn.");
        let mut ns = IdentifyNamespace::decode(&[0; 4096]);
        ns.nsze = 524288;
        ns.lbaf[0].lbads = 9;
        let r = NsReport {
            nsid: 1,
            id: ns,
            ids: None,
        };
        let s = format_identify(&id, 128 << 10, 0x10400, std::slice::from_ref(&r));
        assert!(s.contains("nsze       524288 blocks (256 MiB)"), "{s}");
        assert!(s.contains("mdts      5 (128 KiB per command)"), "{s}");
        assert!(
            s.contains("ioccsz    516 (8192 bytes in-capsule data)"),
            "{s}"
        );
        let j = namespace_json(&r);
        assert_eq!(j["size_bytes"], 256u64 << 20);
        assert_eq!(j["block_size"], 512);
        assert_eq!(j["nguid"], Value::Null);
    }
}
