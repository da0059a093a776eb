//! The TOML device description (feature `std`): parsing into [`Device`] with errors that name
//! the line and the field.
//!
//! ```toml
//! [network]
//! dhcp = true                       # or: address = "10.0.2.15/24", gateway = "10.0.2.2"
//!
//! [[subsystem]]
//! nqn = "nqn.2026-11.dev.keel:vol0"
//! serial = "KEEL0001"               # optional, up to 20 ASCII characters
//! model = "Keel volume"             # optional, up to 40 ASCII characters
//! allowed_hosts = []                # empty: any host
//!
//! [[namespace]]
//! subsystem = "nqn.2026-11.dev.keel:vol0"
//! nsid = 1                          # optional: the lowest free NSID of the subsystem
//! backend = { drive = 0, nsid = 1, offset = "0", length = "all" }  # or { ram = "256MiB", block_size = 512 }
//! # or a namespace of a remote NVMe/TCP subsystem (optionally offset/length: a slice of it):
//! # backend = { remote = { nqn = "nqn.2026-11.dev.keel:pool", paths = ["10.0.2.2:4420"], nsid = 1 } }
//! encryption = "aes-256-xts"        # "none" (default), "aes-128-xts", "aes-256-xts"
//! function = 0                      # optional: the emulated PCIe function that also exports it
//!
//! qos = { iops = 2000, write_bps = "50MiB", weight = 2, group = "tenant-b" }  # optional
//!
//! [[qos.group]]                     # a tenant's pool: limits of its namespaces together
//! name = "tenant-b"
//! iops = { rate = 5000, burst = 500 }  # a rate alone: burst of a tenth of a second
//! weight = 4                        # optional: its namespaces' share of a saturated drive
//!
//! [[qos.host]]                      # limits of each controller of a host ("*": any other)
//! hostnqn = "nqn.2014-08.org.nvmexpress:uuid:f81d4fae-7dec-11d0-a765-00a0c91e6bf6"
//! bps = "200MiB"
//!
//! [[qos.function]]                  # limits of an emulated PCIe function's controller
//! function = 0
//! read_iops = 10000
//!
//! [management]
//! port = 7000                       # default 7000 (qemu/run --mgmt-port forwards to it)
//! authorized_key = "<64 hex digits: an Ed25519 public key, the content of KEY.pub>"
//! ```
//!
//! Sizes are byte counts or strings with a binary unit (`"4096"`, `"256MiB"`, `"1GiB"`).
//!
//! A remote backend's table: `nqn` and `paths` (`"a.b.c.d:port"`, 1 to 8) are required;
//! `nsid` (1), `hostnqn` (derived from the device's MAC), `queues` (4), `depth` (128),
//! `digests` (`"none"`, `"header"`, `"data"`, `"both"`), `kato` (5 s), `reconnect_delay`
//! (10 s), `ctrl_loss_tmo` (600 s; `-1` or `"forever"`), `fast_io_fail_tmo` (off; `-1` or
//! `"off"`) and `policy` (`"round-robin"`, `"queue-depth"`) are optional. Times are seconds
//! (`10`) or strings with a unit (`"500ms"`, `"10s"`, `"2min"`).
//!
//! QoS limits (`iops`, `read_iops`, `write_iops`, `bps`, `read_bps`, `write_bps`) are a rate
//! per second (bandwidths as sizes) or `{ rate, burst }`.

use crate::model::{
    self, Backend, Device, Encryption, Management, Namespace, Network, Remote, RemotePolicy,
    Subsystem,
};
use crate::qos::{FunctionQos, HostQos, NamespaceQos, Qos, QosGroup, QosLimits, QosRate};
use serde::Deserialize;
use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use toml::{Spanned, Value};

/// A description that does not parse or breaks a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    /// 1-based line (0 when the text gives no place, e.g. a rule about the whole file).
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// The field: `namespace[1].backend.offset`, `subsystem[0].nqn`, or a key name.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line > 0 {
            write!(f, "line {}: {}: {}", self.line, self.field, self.message)
        } else {
            write!(f, "{}: {}", self.field, self.message)
        }
    }
}

impl std::error::Error for Error {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDevice {
    network: Option<Spanned<RawNetwork>>,
    #[serde(default)]
    subsystem: Vec<Spanned<RawSubsystem>>,
    #[serde(default)]
    namespace: Vec<Spanned<RawNamespace>>,
    management: Option<Spanned<RawManagement>>,
    qos: Option<Spanned<RawQos>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQos {
    #[serde(default)]
    group: Vec<Spanned<toml::Table>>,
    #[serde(default)]
    host: Vec<Spanned<toml::Table>>,
    #[serde(default)]
    function: Vec<Spanned<toml::Table>>,
    drive_max_inflight: Option<Spanned<u32>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNetwork {
    dhcp: Option<Spanned<bool>>,
    address: Option<Spanned<String>>,
    gateway: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSubsystem {
    nqn: Spanned<String>,
    serial: Option<Spanned<String>>,
    model: Option<Spanned<String>>,
    #[serde(default)]
    allowed_hosts: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNamespace {
    subsystem: Spanned<String>,
    nsid: Option<Spanned<u32>>,
    backend: Spanned<RawBackend>,
    encryption: Option<Spanned<String>>,
    function: Option<Spanned<u16>>,
    qos: Option<Spanned<toml::Table>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    ram: Option<Spanned<Value>>,
    remote: Option<Spanned<RawRemote>>,
    block_size: Option<Spanned<u32>>,
    drive: Option<Spanned<u16>>,
    nsid: Option<Spanned<u32>>,
    offset: Option<Spanned<Value>>,
    length: Option<Spanned<Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRemote {
    nqn: Spanned<String>,
    paths: Spanned<Vec<Spanned<String>>>,
    nsid: Option<Spanned<u32>>,
    hostnqn: Option<Spanned<String>>,
    queues: Option<Spanned<u16>>,
    depth: Option<Spanned<u16>>,
    digests: Option<Spanned<String>>,
    kato: Option<Spanned<Value>>,
    reconnect_delay: Option<Spanned<Value>>,
    ctrl_loss_tmo: Option<Spanned<Value>>,
    fast_io_fail_tmo: Option<Spanned<Value>>,
    policy: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManagement {
    port: Option<Spanned<u16>>,
    authorized_key: Spanned<String>,
}

/// Turns byte offsets into lines and remembers where each field is.
struct Ctx<'a> {
    text: &'a str,
    spans: HashMap<String, Range<usize>>,
}

impl Ctx<'_> {
    fn at(
        &self,
        span: &Range<usize>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Error {
        let (line, column) = line_col(self.text, span.start);
        Error {
            line,
            column,
            field: field.into(),
            message: message.into(),
        }
    }

    fn note<T>(&mut self, path: &str, v: &Spanned<T>) {
        self.spans.insert(path.to_string(), v.span());
    }

    /// The error for a rule broken at `path` (or its nearest parent that has a place).
    fn rule(&self, path: &str, message: String) -> Error {
        let mut p = path;
        loop {
            if let Some(span) = self.spans.get(p) {
                return self.at(span, path, message);
            }
            match p.rfind(['.', '[']) {
                Some(i) => p = &p[..i],
                None => break,
            }
        }
        Error {
            line: 0,
            column: 0,
            field: path.to_string(),
            message,
        }
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, column)
}

/// Best guess at the field a TOML or type error is about: a key named in the message, the
/// key left of the error on its line, or the table header above it.
fn field_of(text: &str, offset: usize, message: &str) -> String {
    if let Some(start) = message.find('`')
        && let Some(len) = message[start + 1..].find('`')
        && message.contains("field")
    {
        return message[start + 1..start + 1 + len].to_string();
    }
    let offset = offset.min(text.len());
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let prefix = &text[line_start..offset];
    if let Some(eq) = prefix.rfind('=') {
        let key: String = prefix[..eq]
            .trim_end()
            .chars()
            .rev()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        if !key.is_empty() {
            return key;
        }
    }
    text[..line_start]
        .lines()
        .rev()
        .chain(text[line_start..].lines().take(1))
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(['[', ']']).to_string())
        .unwrap_or_else(|| "(document)".to_string())
}

fn size(
    ctx: &Ctx<'_>,
    v: &Spanned<Value>,
    field: &str,
    allow_all: bool,
) -> Result<Option<u64>, Error> {
    match v.get_ref() {
        Value::Integer(n) if *n >= 0 => Ok(Some(*n as u64)),
        Value::String(s) if allow_all && s == "all" => Ok(None),
        Value::String(s) => model::parse_size(s)
            .map(Some)
            .map_err(|m| ctx.at(&v.span(), field, m)),
        _ => Err(ctx.at(
            &v.span(),
            field,
            if allow_all {
                "expected a size (\"256MiB\", 4096) or \"all\""
            } else {
                "expected a size (\"256MiB\", 4096)"
            },
        )),
    }
}

fn ipv4(
    ctx: &Ctx<'_>,
    v: &Spanned<String>,
    field: &str,
    with_prefix: bool,
) -> Result<([u8; 4], u8), Error> {
    let s = v.get_ref().trim();
    let bad = || {
        ctx.at(
            &v.span(),
            field,
            if with_prefix {
                format!("`{s}` is not an IPv4 address with prefix length (10.0.2.15/24)")
            } else {
                format!("`{s}` is not an IPv4 address (10.0.2.2)")
            },
        )
    };
    let (addr, prefix) = match (with_prefix, s.split_once('/')) {
        (true, Some((a, p))) => (a, p.parse::<u8>().map_err(|_| bad())?),
        (false, None) => (s, 32),
        _ => return Err(bad()),
    };
    let a: std::net::Ipv4Addr = addr.parse().map_err(|_| bad())?;
    Ok((a.octets(), prefix))
}

fn hex32(s: &str) -> Option<[u8; 32]> {
    let s = s.trim();
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// A time in milliseconds: an integer number of seconds or a string with a unit (`"500ms"`,
/// `"10s"`, `"2min"`). `never`: the word (and `-1`) meaning "no limit", if the field has one.
fn duration(
    ctx: &Ctx<'_>,
    v: &Spanned<Value>,
    field: &str,
    never: Option<&str>,
) -> Result<Option<u64>, Error> {
    let bad = |m: String| Err(ctx.at(&v.span(), field, m));
    let hint = match never {
        Some(w) => format!("seconds (10), a time with a unit (\"500ms\", \"2min\") or {w:?} / -1"),
        None => String::from("seconds (10) or a time with a unit (\"500ms\", \"10s\", \"2min\")"),
    };
    match v.get_ref() {
        Value::Integer(-1) if never.is_some() => Ok(None),
        Value::Integer(n) if *n >= 0 => match (*n as u64).checked_mul(1000) {
            Some(ms) => Ok(Some(ms)),
            None => bad(format!("{n} seconds is too long")),
        },
        Value::String(s) if never == Some(s.as_str()) => Ok(None),
        Value::String(s) => {
            let t = s.trim();
            let digits = t.bytes().take_while(u8::is_ascii_digit).count();
            let n: u64 = match t[..digits].parse() {
                Ok(n) => n,
                Err(_) => return bad(format!("`{s}`: expected {hint}")),
            };
            let scale = match t[digits..].trim() {
                "ms" => 1,
                "" | "s" => 1000,
                "min" | "m" => 60_000,
                u => return bad(format!("`{s}`: unknown unit `{u}` (ms, s, min)")),
            };
            n.checked_mul(scale)
                .map(Some)
                .ok_or_else(|| ctx.at(&v.span(), field, format!("`{s}` is too long")))
        }
        _ => bad(format!("expected {hint}")),
    }
}

/// A drive or remote backend's `offset` and `length` (default: the whole namespace).
fn slice(ctx: &mut Ctx<'_>, b: &RawBackend, bp: &str) -> Result<(u64, Option<u64>), Error> {
    let offset = match &b.offset {
        Some(v) => {
            ctx.note(&format!("{bp}.offset"), v);
            size(ctx, v, &format!("{bp}.offset"), false)?.unwrap_or(0)
        }
        None => 0,
    };
    let length = match &b.length {
        Some(v) => {
            ctx.note(&format!("{bp}.length"), v);
            size(ctx, v, &format!("{bp}.length"), true)?
        }
        None => None,
    };
    Ok((offset, length))
}

fn remote(ctx: &mut Ctx<'_>, r: &Spanned<RawRemote>, rp: &str) -> Result<Remote, Error> {
    ctx.note(rp, r);
    let r = r.get_ref();
    let f = |name: &str| format!("{rp}.{name}");
    ctx.note(&f("nqn"), &r.nqn);
    ctx.note(&f("paths"), &r.paths);
    let mut paths = Vec::new();
    for (k, a) in r.paths.get_ref().iter().enumerate() {
        let pf = f(&format!("paths[{k}]"));
        ctx.note(&pf, a);
        let text = a.get_ref().trim();
        let parsed = text.rsplit_once(':').and_then(|(ip, port)| {
            let ip: std::net::Ipv4Addr = ip.parse().ok()?;
            let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
            Some((ip.octets(), port))
        });
        match parsed {
            Some(p) => paths.push(p),
            None => {
                return Err(ctx.at(
                    &a.span(),
                    pf,
                    format!("`{text}` is not an IPv4 address and port (\"10.0.2.2:4420\")"),
                ));
            }
        }
    }
    let mut out = Remote::new(r.nqn.get_ref().clone(), paths, 1);
    if let Some(v) = &r.nsid {
        ctx.note(&f("nsid"), v);
        out.nsid = *v.get_ref();
    }
    if let Some(v) = &r.hostnqn {
        ctx.note(&f("hostnqn"), v);
        out.hostnqn = Some(v.get_ref().clone());
    }
    if let Some(v) = &r.queues {
        ctx.note(&f("queues"), v);
        out.queues = *v.get_ref();
    }
    if let Some(v) = &r.depth {
        ctx.note(&f("depth"), v);
        out.depth = *v.get_ref();
    }
    if let Some(v) = &r.digests {
        ctx.note(&f("digests"), v);
        (out.header_digest, out.data_digest) = match v.get_ref().as_str() {
            "none" => (false, false),
            "header" => (true, false),
            "data" => (false, true),
            "both" => (true, true),
            other => {
                return Err(ctx.at(
                    &v.span(),
                    f("digests"),
                    format!("`{other}` is not \"none\", \"header\", \"data\" or \"both\""),
                ));
            }
        };
    }
    if let Some(v) = &r.kato {
        ctx.note(&f("kato"), v);
        let ms = duration(ctx, v, &f("kato"), None)?.unwrap_or(0);
        out.kato_ms =
            u32::try_from(ms).map_err(|_| ctx.at(&v.span(), f("kato"), "longer than 49 days"))?;
    }
    if let Some(v) = &r.reconnect_delay {
        ctx.note(&f("reconnect_delay"), v);
        out.reconnect_delay_ms = duration(ctx, v, &f("reconnect_delay"), None)?.unwrap_or(0);
    }
    if let Some(v) = &r.ctrl_loss_tmo {
        ctx.note(&f("ctrl_loss_tmo"), v);
        out.ctrl_loss_tmo_ms = duration(ctx, v, &f("ctrl_loss_tmo"), Some("forever"))?;
    }
    if let Some(v) = &r.fast_io_fail_tmo {
        ctx.note(&f("fast_io_fail_tmo"), v);
        out.fast_io_fail_tmo_ms = duration(ctx, v, &f("fast_io_fail_tmo"), Some("off"))?;
    }
    if let Some(v) = &r.policy {
        ctx.note(&f("policy"), v);
        out.policy = RemotePolicy::from_name(v.get_ref()).ok_or_else(|| {
            ctx.at(
                &v.span(),
                f("policy"),
                format!(
                    "`{}` is not \"round-robin\" or \"queue-depth\"",
                    v.get_ref()
                ),
            )
        })?;
    }
    Ok(out)
}

const LIMIT_KEYS: [&str; 6] = [
    "iops",
    "read_iops",
    "write_iops",
    "bps",
    "read_bps",
    "write_bps",
];

/// One QoS table (`qos = {...}` of a namespace, a `[[qos.*]]` entry): its limits, and the
/// other keys it may have (`extra`), anything else refused.
fn qos_table<'t>(
    ctx: &Ctx<'_>,
    t: &'t Spanned<toml::Table>,
    path: &str,
    extra: &[&str],
) -> Result<(QosLimits, HashMap<&'t str, &'t Value>), Error> {
    let at = |field: &str, m: String| ctx.at(&t.span(), format!("{path}.{field}"), m);
    let mut rates = [None; 6];
    let mut others = HashMap::new();
    for (k, v) in t.get_ref() {
        if let Some(i) = LIMIT_KEYS.iter().position(|l| l == k) {
            let bytes = k.ends_with("bps");
            let amount = |v: &Value, what: &str| -> Result<u64, Error> {
                match v {
                    Value::Integer(n) if *n >= 0 => Ok(*n as u64),
                    Value::String(s) if bytes => model::parse_size(s).map_err(|m| at(k, m)),
                    _ => Err(at(
                        k,
                        format!(
                            "{what}: expected {}",
                            if bytes {
                                "bytes per second (\"100MiB\", 1048576)"
                            } else {
                                "operations per second (a whole number)"
                            }
                        ),
                    )),
                }
            };
            rates[i] = Some(match v {
                Value::Table(rt) => {
                    if let Some(bad) = rt.keys().find(|x| *x != "rate" && *x != "burst") {
                        return Err(at(k, format!("unknown key `{bad}` (rate, burst)")));
                    }
                    QosRate {
                        per_sec: amount(
                            rt.get("rate")
                                .ok_or_else(|| at(k, "a rate is needed".into()))?,
                            "rate",
                        )?,
                        burst: rt.get("burst").map(|b| amount(b, "burst")).transpose()?,
                    }
                }
                v => QosRate {
                    per_sec: amount(v, "rate")?,
                    burst: None,
                },
            });
        } else if extra.contains(&k.as_str()) {
            others.insert(k.as_str(), v);
        } else {
            let mut known: Vec<&str> = LIMIT_KEYS.to_vec();
            known.extend_from_slice(extra);
            return Err(at(
                k,
                format!("unknown QoS key `{k}` (one of: {})", known.join(", ")),
            ));
        }
    }
    let [iops, read_iops, write_iops, bps, read_bps, write_bps] = rates;
    Ok((
        QosLimits {
            iops,
            read_iops,
            write_iops,
            bps,
            read_bps,
            write_bps,
        },
        others,
    ))
}

fn qos_int(ctx: &Ctx<'_>, t: &Spanned<toml::Table>, path: &str, v: &Value) -> Result<u64, Error> {
    match v {
        Value::Integer(n) if *n >= 0 => Ok(*n as u64),
        _ => Err(ctx.at(&t.span(), path, "expected a whole number")),
    }
}

fn qos_str<'v>(
    ctx: &Ctx<'_>,
    t: &Spanned<toml::Table>,
    path: &str,
    v: &'v Value,
) -> Result<&'v str, Error> {
    v.as_str()
        .ok_or_else(|| ctx.at(&t.span(), path, "expected a string"))
}

/// The `[[qos.group]]`, `[[qos.host]]` and `[[qos.function]]` tables.
fn qos_rules(ctx: &mut Ctx<'_>, raw: &Spanned<RawQos>, qos: &mut Qos) -> Result<(), Error> {
    ctx.note("qos", raw);
    let r = raw.get_ref();
    if let Some(n) = &r.drive_max_inflight {
        ctx.note("qos.drive_max_inflight", n);
        qos.drive_max_inflight = Some(*n.get_ref());
    }
    for (i, t) in r.group.iter().enumerate() {
        let p = format!("qos.group[{i}]");
        ctx.note(&p, t);
        let (limits, o) = qos_table(ctx, t, &p, &["name", "weight"])?;
        let name = o
            .get("name")
            .ok_or_else(|| ctx.at(&t.span(), format!("{p}.name"), "a group needs a name"))?;
        qos.groups.push(QosGroup {
            name: qos_str(ctx, t, &format!("{p}.name"), name)?.to_string(),
            limits,
            weight: match o.get("weight") {
                Some(w) => {
                    qos_int(ctx, t, &format!("{p}.weight"), w)?.min(u64::from(u32::MAX)) as u32
                }
                None => 0,
            },
        });
    }
    for (i, t) in r.host.iter().enumerate() {
        let p = format!("qos.host[{i}]");
        ctx.note(&p, t);
        let (limits, o) = qos_table(ctx, t, &p, &["hostnqn"])?;
        let h = o.get("hostnqn").ok_or_else(|| {
            ctx.at(
                &t.span(),
                format!("{p}.hostnqn"),
                "a host rule needs hostnqn (an NQN, or \"*\" for every other host)",
            )
        })?;
        qos.hosts.push(HostQos {
            hostnqn: qos_str(ctx, t, &format!("{p}.hostnqn"), h)?.to_string(),
            limits,
        });
    }
    for (i, t) in r.function.iter().enumerate() {
        let p = format!("qos.function[{i}]");
        ctx.note(&p, t);
        let (limits, o) = qos_table(ctx, t, &p, &["function"])?;
        let f = o.get("function").ok_or_else(|| {
            ctx.at(
                &t.span(),
                format!("{p}.function"),
                "a function rule needs function = N",
            )
        })?;
        qos.functions.push(FunctionQos {
            function: qos_int(ctx, t, &format!("{p}.function"), f)?.min(u64::from(u16::MAX)) as u16,
            limits,
        });
    }
    Ok(())
}

/// Parses a TOML device description and checks it with [`model::validate`].
pub fn parse_toml(text: &str) -> Result<Device, Error> {
    let raw: RawDevice = toml::from_str(text).map_err(|e| {
        let span = e.span().unwrap_or(0..0);
        let (line, column) = line_col(text, span.start);
        Error {
            line,
            column,
            field: field_of(text, span.start, e.message()),
            message: e.message().trim().to_string(),
        }
    })?;
    let mut ctx = Ctx {
        text,
        spans: HashMap::new(),
    };
    let network = match &raw.network {
        None => Network::Dhcp,
        Some(n) => {
            ctx.note("network", n);
            let n = n.get_ref();
            let dhcp = n.dhcp.as_ref().map(|d| *d.get_ref());
            match (dhcp, &n.address) {
                (Some(true), Some(a)) => {
                    return Err(ctx.at(
                        &a.span(),
                        "network.address",
                        "a static address with dhcp = true",
                    ));
                }
                (Some(true) | None, None) => {
                    if let Some(g) = &n.gateway {
                        return Err(ctx.at(
                            &g.span(),
                            "network.gateway",
                            "a gateway needs a static address",
                        ));
                    }
                    Network::Dhcp
                }
                (Some(false), None) => {
                    let d = n.dhcp.as_ref().map(Spanned::span).unwrap_or(0..0);
                    return Err(ctx.at(
                        &d,
                        "network.dhcp",
                        "dhcp = false needs address = \"A.B.C.D/N\"",
                    ));
                }
                (_, Some(a)) => {
                    ctx.note("network.address", a);
                    let (address, prefix_len) = ipv4(&ctx, a, "network.address", true)?;
                    let gateway = match &n.gateway {
                        Some(g) => {
                            ctx.note("network.gateway", g);
                            Some(ipv4(&ctx, g, "network.gateway", false)?.0)
                        }
                        None => None,
                    };
                    Network::Static {
                        address,
                        prefix_len,
                        gateway,
                    }
                }
            }
        }
    };
    let mut subsystems = Vec::new();
    for (i, s) in raw.subsystem.iter().enumerate() {
        let p = format!("subsystem[{i}]");
        ctx.note(&p, s);
        let s = s.get_ref();
        ctx.note(&format!("{p}.nqn"), &s.nqn);
        if let Some(v) = &s.serial {
            ctx.note(&format!("{p}.serial"), v);
        }
        if let Some(v) = &s.model {
            ctx.note(&format!("{p}.model"), v);
        }
        for (h, host) in s.allowed_hosts.iter().enumerate() {
            ctx.note(&format!("{p}.allowed_hosts[{h}]"), host);
        }
        subsystems.push(Subsystem {
            nqn: s.nqn.get_ref().clone(),
            serial: s.serial.as_ref().map(|v| v.get_ref().clone()),
            model: s.model.as_ref().map(|v| v.get_ref().clone()),
            allowed_hosts: s
                .allowed_hosts
                .iter()
                .map(|h| h.get_ref().clone())
                .collect(),
        });
    }
    // Explicit NSIDs first, so automatic ones take the lowest free numbers.
    let mut used: HashMap<&str, Vec<u32>> = HashMap::new();
    for n in &raw.namespace {
        let n = n.get_ref();
        if let Some(id) = &n.nsid {
            used.entry(n.subsystem.get_ref())
                .or_default()
                .push(*id.get_ref());
        }
    }
    let mut namespaces = Vec::new();
    let mut qos = Qos::default();
    for (i, n) in raw.namespace.iter().enumerate() {
        let p = format!("namespace[{i}]");
        ctx.note(&p, n);
        let n = n.get_ref();
        ctx.note(&format!("{p}.subsystem"), &n.subsystem);
        let nsid = match &n.nsid {
            Some(id) => {
                ctx.note(&format!("{p}.nsid"), id);
                *id.get_ref()
            }
            None => {
                ctx.note(&format!("{p}.nsid"), &n.backend);
                let taken = used.entry(n.subsystem.get_ref()).or_default();
                let id = (1..).find(|c| !taken.contains(c)).unwrap_or(1);
                taken.push(id);
                id
            }
        };
        let b = n.backend.get_ref();
        let bp = format!("{p}.backend");
        ctx.note(&bp, &n.backend);
        let backend = match (&b.ram, &b.drive, &b.remote) {
            (Some(ram), None, None) => {
                for (name, set) in [
                    ("nsid", b.nsid.is_some()),
                    ("offset", b.offset.is_some()),
                    ("length", b.length.is_some()),
                ] {
                    if set {
                        return Err(ctx.at(
                            &n.backend.span(),
                            format!("{bp}.{name}"),
                            "only a drive backend has this field",
                        ));
                    }
                }
                ctx.note(&format!("{bp}.ram"), ram);
                let size = size(&ctx, ram, &format!("{bp}.ram"), false)?.unwrap_or(0);
                let block_size = match &b.block_size {
                    Some(bs) => {
                        ctx.note(&format!("{p}.block_size"), bs);
                        *bs.get_ref()
                    }
                    None => 512,
                };
                Backend::Ram { size, block_size }
            }
            (None, Some(drive), None) => {
                if let Some(bs) = &b.block_size {
                    return Err(ctx.at(
                        &bs.span(),
                        format!("{bp}.block_size"),
                        "a drive backend has its drive's block size",
                    ));
                }
                ctx.note(&format!("{bp}.drive"), drive);
                let dnsid = match &b.nsid {
                    Some(v) => {
                        ctx.note(&format!("{bp}.nsid"), v);
                        *v.get_ref()
                    }
                    None => 1,
                };
                let (offset, length) = slice(&mut ctx, b, &bp)?;
                Backend::Drive {
                    drive: *drive.get_ref(),
                    nsid: dnsid,
                    offset,
                    length,
                }
            }
            (None, None, Some(r)) => {
                for (name, set) in [
                    ("nsid", b.nsid.is_some()),
                    ("block_size", b.block_size.is_some()),
                ] {
                    if set {
                        return Err(ctx.at(
                            &n.backend.span(),
                            format!("{bp}.{name}"),
                            if name == "nsid" {
                                "a remote backend names its namespace inside: remote = { nsid = N, ... }"
                            } else {
                                "a remote backend has the remote namespace's block size"
                            },
                        ));
                    }
                }
                let remote = remote(&mut ctx, r, &format!("{bp}.remote"))?;
                let (offset, length) = slice(&mut ctx, b, &bp)?;
                Backend::Remote {
                    remote,
                    offset,
                    length,
                }
            }
            _ => {
                return Err(ctx.at(
                    &n.backend.span(),
                    bp,
                    "a backend is one of { ram = SIZE }, { drive = N, nsid, offset, length } or \
                     { remote = { nqn, paths, nsid, ... }, offset, length }",
                ));
            }
        };
        let encryption = match &n.encryption {
            None => Encryption::None,
            Some(e) => {
                ctx.note(&format!("{p}.encryption"), e);
                Encryption::from_name(e.get_ref()).ok_or_else(|| {
                    ctx.at(
                        &e.span(),
                        format!("{p}.encryption"),
                        format!(
                            "`{}` is not \"none\", \"aes-128-xts\" or \"aes-256-xts\"",
                            e.get_ref()
                        ),
                    )
                })?
            }
        };
        if let Some(f) = &n.function {
            ctx.note(&format!("{p}.function"), f);
        }
        if let Some(t) = &n.qos {
            let qp = format!("{p}.qos");
            ctx.note(&qp, t);
            let (limits, o) = qos_table(&ctx, t, &qp, &["weight", "group"])?;
            qos.namespaces.push(NamespaceQos {
                subsystem: n.subsystem.get_ref().clone(),
                nsid,
                limits,
                weight: match o.get("weight") {
                    Some(w) => qos_int(&ctx, t, &format!("{qp}.weight"), w)?
                        .min(u64::from(u32::MAX)) as u32,
                    None => 1,
                },
                group: o
                    .get("group")
                    .map(|g| qos_str(&ctx, t, &format!("{qp}.group"), g).map(String::from))
                    .transpose()?,
            });
        }
        namespaces.push(Namespace {
            subsystem: n.subsystem.get_ref().clone(),
            nsid,
            backend,
            encryption,
            function: n.function.as_ref().map(|f| *f.get_ref()),
        });
    }
    let management = match &raw.management {
        None => None,
        Some(m) => {
            ctx.note("management", m);
            let m = m.get_ref();
            ctx.note("management.authorized_key", &m.authorized_key);
            if let Some(p) = &m.port {
                ctx.note("management.port", p);
            }
            let key = hex32(m.authorized_key.get_ref()).ok_or_else(|| {
                ctx.at(
                    &m.authorized_key.span(),
                    "management.authorized_key",
                    "expected 64 hex digits (a 32-byte Ed25519 public key, the content of KEY.pub)",
                )
            })?;
            Some(Management {
                port: m
                    .port
                    .as_ref()
                    .map_or(model::DEFAULT_MGMT_PORT, |p| *p.get_ref()),
                authorized_key: key,
            })
        }
    };
    if let Some(q) = &raw.qos {
        qos_rules(&mut ctx, q, &mut qos)?;
    }
    let device = Device {
        network,
        subsystems,
        namespaces,
        management,
        qos,
        nguids: Vec::new(),
    };
    model::validate(&device).map_err(|e| ctx.rule(&e.path, e.message))?;
    Ok(device)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[network]
address = "10.0.2.15/24"
gateway = "10.0.2.2"

[[subsystem]]
nqn = "nqn.2026-11.dev.keel:vol0"
serial = "KEEL0001"
allowed_hosts = ["nqn.2014-08.org.nvmexpress:uuid:f81d4fae-7dec-11d0-a765-00a0c91e6bf6"]

[[namespace]]
subsystem = "nqn.2026-11.dev.keel:vol0"
backend = { drive = 0, nsid = 1, offset = "0", length = "512MiB" }
encryption = "aes-256-xts"

[[namespace]]
subsystem = "nqn.2026-11.dev.keel:vol0"
backend = { drive = 0, offset = "512MiB", length = "all" }

[[namespace]]
subsystem = "nqn.2026-11.dev.keel:vol0"
nsid = 7
backend = { ram = "256MiB", block_size = 4096 }
function = 0
"#;

    #[test]
    fn parses_a_full_description() {
        let d = parse_toml(GOOD).unwrap();
        assert_eq!(
            d.network,
            Network::Static {
                address: [10, 0, 2, 15],
                prefix_len: 24,
                gateway: Some([10, 0, 2, 2])
            }
        );
        assert_eq!(
            d.namespaces.iter().map(|n| n.nsid).collect::<Vec<_>>(),
            [1, 2, 7]
        );
        assert_eq!(d.namespaces[0].encryption, Encryption::Aes256Xts);
        assert_eq!(
            d.namespaces[1].backend,
            Backend::Drive {
                drive: 0,
                nsid: 1,
                offset: 512 << 20,
                length: None
            }
        );
        assert_eq!(
            d.namespaces[2].backend,
            Backend::Ram {
                size: 256 << 20,
                block_size: 4096
            }
        );
    }

    fn err(text: &str) -> Error {
        parse_toml(text).expect_err("should be refused")
    }

    #[test]
    fn errors_name_line_and_field() {
        let e = err(&GOOD.replace("length = \"512MiB\"", "length = \"600MiB\""));
        assert_eq!(
            (e.line, e.field.as_str()),
            (18, "namespace[1].backend"),
            "{e}"
        );
        let e = err(&GOOD.replace("length = \"all\" }", "length = \"all\" }\nnsid = 7"));
        assert_eq!((e.line, e.field.as_str()), (23, "namespace[2].nsid"), "{e}");
        let e = err(&GOOD.replace("encryption = \"aes-256-xts\"", "encryption = \"rot13\""));
        assert_eq!(
            (e.line, e.field.as_str()),
            (14, "namespace[0].encryption"),
            "{e}"
        );
        let e = err(&GOOD.replace("serial = \"KEEL0001\"", "serail = \"KEEL0001\""));
        assert_eq!((e.line, e.field.as_str()), (8, "serail"), "{e}");
        let e = err(&GOOD.replace("nsid = 7", "nsid = \"seven\""));
        assert_eq!((e.line, e.field.as_str()), (22, "nsid"), "{e}");
        let e = err(&GOOD.replace(
            "subsystem = \"nqn.2026-11.dev.keel:vol0\"\nnsid",
            "subsystem = \"nqn.2026-11.dev.keel:vol1\"\nnsid",
        ));
        assert_eq!(
            (e.line, e.field.as_str()),
            (21, "namespace[2].subsystem"),
            "{e}"
        );
        let e = err(&GOOD.replace("gateway = \"10.0.2.2\"", "gateway = \"10.0.3.2\""));
        assert_eq!((e.line, e.field.as_str()), (4, "network.gateway"), "{e}");
        let e = err(&GOOD.replace("offset = \"512MiB\"", "offset = \"512MB\""));
        assert_eq!(
            (e.line, e.field.as_str()),
            (18, "namespace[1].backend.offset"),
            "{e}"
        );
        let e = err(
            "[[subsystem]]\nnqn = \"nqn.2026-11.dev.keel:a\"\n[[subsystem]]\nnqn = \"nqn.2026-11.dev.keel:a\"\n",
        );
        assert_eq!((e.line, e.field.as_str()), (4, "subsystem[1].nqn"), "{e}");
        let e = err("[[subsystem]]\nnqn = \"keel:a\"\n");
        assert_eq!((e.line, e.field.as_str()), (2, "subsystem[0].nqn"), "{e}");
        let e = err("[network]\ndhcp = true\n");
        assert_eq!(e.field, "subsystem", "{e}");
        assert!(e.to_string().contains("at least one"), "{e}");
        let e = err(
            "[[subsystem]]\nnqn = \"nqn.2026-11.dev.keel:a\"\n[management]\nauthorized_key = \"abcd\"\n",
        );
        assert_eq!(
            (e.line, e.field.as_str()),
            (4, "management.authorized_key"),
            "{e}"
        );
        let e = err("[[subsystem]\n");
        assert_eq!(e.line, 1, "{e}");
    }

    const REMOTE: &str = r#"
[[subsystem]]
nqn = "nqn.2026-11.dev.keel:gw"

[[namespace]]
subsystem = "nqn.2026-11.dev.keel:gw"
backend = { remote = { nqn = "nqn.2026-11.dev.keel:pool", paths = ["10.0.2.2:4420", "10.0.2.2:4421"], nsid = 3, queues = 2, depth = 64, digests = "both", hostnqn = "nqn.2026-11.dev.keel:dpu0", kato = 10, reconnect_delay = "500ms", ctrl_loss_tmo = "2min", fast_io_fail_tmo = 5, policy = "queue-depth" }, offset = "1GiB", length = "1GiB" }
encryption = "aes-256-xts"
function = 0

[[namespace]]
subsystem = "nqn.2026-11.dev.keel:gw"
backend = { remote = { nqn = "nqn.2026-11.dev.keel:other", paths = ["192.0.2.7:4420"] } }
"#;

    #[test]
    fn parses_remote_backends() {
        let d = parse_toml(REMOTE).unwrap();
        let Backend::Remote {
            remote,
            offset,
            length,
        } = &d.namespaces[0].backend
        else {
            panic!("{:?}", d.namespaces[0].backend)
        };
        assert_eq!((*offset, *length), (1 << 30, Some(1 << 30)));
        assert_eq!(
            remote,
            &Remote {
                nqn: "nqn.2026-11.dev.keel:pool".into(),
                paths: vec![([10, 0, 2, 2], 4420), ([10, 0, 2, 2], 4421)],
                nsid: 3,
                hostnqn: Some("nqn.2026-11.dev.keel:dpu0".into()),
                queues: 2,
                depth: 64,
                header_digest: true,
                data_digest: true,
                kato_ms: 10_000,
                reconnect_delay_ms: 500,
                ctrl_loss_tmo_ms: Some(120_000),
                fast_io_fail_tmo_ms: Some(5_000),
                policy: RemotePolicy::QueueDepth,
            }
        );
        assert_eq!(d.namespaces[0].encryption, Encryption::Aes256Xts);
        assert_eq!(d.namespaces[0].function, Some(0));
        // Every optional field left out: Linux's defaults, the whole namespace 1.
        assert_eq!(
            d.namespaces[1].backend,
            Backend::Remote {
                remote: Remote::new(
                    "nqn.2026-11.dev.keel:other",
                    vec![([192, 0, 2, 7], 4420)],
                    1
                ),
                offset: 0,
                length: None,
            }
        );
        let Backend::Remote { remote: r, .. } = &d.namespaces[1].backend else {
            unreachable!()
        };
        assert_eq!(
            (r.queues, r.depth, r.kato_ms, r.reconnect_delay_ms),
            (4, 128, 5_000, 10_000)
        );
        assert_eq!(
            (r.ctrl_loss_tmo_ms, r.fast_io_fail_tmo_ms),
            (Some(600_000), None)
        );
        let forever =
            parse_toml(&REMOTE.replace("ctrl_loss_tmo = \"2min\"", "ctrl_loss_tmo = -1")).unwrap();
        let Backend::Remote { remote: r, .. } = &forever.namespaces[0].backend else {
            unreachable!()
        };
        assert_eq!(r.ctrl_loss_tmo_ms, None);
    }

    #[test]
    fn remote_errors_name_line_and_field() {
        let cases: &[(&str, &str, &str, &str)] = &[
            (
                "\"10.0.2.2:4421\"",
                "\"10.0.2.2\"",
                "namespace[0].backend.remote.paths[1]",
                "not an IPv4 address and port",
            ),
            (
                "\"10.0.2.2:4421\"",
                "\"10.0.2.2:4420\"",
                "namespace[0].backend.remote.paths[1]",
                "twice",
            ),
            (
                "nsid = 3",
                "nsid = 0",
                "namespace[0].backend.remote.nsid",
                "reserved",
            ),
            (
                "queues = 2",
                "queues = 0",
                "namespace[0].backend.remote.queues",
                "1 to 64",
            ),
            (
                "depth = 64",
                "depth = 1",
                "namespace[0].backend.remote.depth",
                "2 to 1024",
            ),
            (
                "digests = \"both\"",
                "digests = \"all\"",
                "namespace[0].backend.remote.digests",
                "not \"none\"",
            ),
            (
                "kato = 10",
                "kato = 0",
                "namespace[0].backend.remote.kato",
                "mandatory",
            ),
            (
                "reconnect_delay = \"500ms\"",
                "reconnect_delay = \"500us\"",
                "namespace[0].backend.remote.reconnect_delay",
                "unknown unit",
            ),
            (
                "fast_io_fail_tmo = 5",
                "fast_io_fail_tmo = \"forever\"",
                "namespace[0].backend.remote.fast_io_fail_tmo",
                "\"off\" / -1",
            ),
            (
                "policy = \"queue-depth\"",
                "policy = \"numa\"",
                "namespace[0].backend.remote.policy",
                "round-robin",
            ),
            (
                "nqn = \"nqn.2026-11.dev.keel:pool\"",
                "nqn = \"pool\"",
                "namespace[0].backend.remote.nqn",
                "not an NQN",
            ),
            (
                "offset = \"1GiB\"",
                "offset = \"1000\"",
                "namespace[0].backend.offset",
                "multiple of 4 KiB",
            ),
            (
                "nsid = 3, queues",
                "nsid = 3, hostnqn2 = \"x\", queues",
                "hostnqn2",
                "unknown field",
            ),
        ];
        for (from, to, field, msg) in cases {
            assert!(REMOTE.contains(from), "{from}");
            let e = err(&REMOTE.replacen(from, to, 1));
            assert_eq!(
                (e.line, e.field.as_str()),
                (7, *field),
                "{from} -> {to}: {e}"
            );
            assert!(e.message.contains(msg), "{from} -> {to}: {e}");
        }
        // A backend that is two kinds at once, and a remote that names no paths.
        let e = err(&REMOTE.replace("offset = \"1GiB\"", "ram = \"1GiB\""));
        assert_eq!(
            (e.line, e.field.as_str()),
            (7, "namespace[0].backend"),
            "{e}"
        );
        let e = err(&REMOTE.replace("paths = [\"192.0.2.7:4420\"]", "paths = []"));
        assert_eq!(
            (e.line, e.field.as_str()),
            (13, "namespace[1].backend.remote.paths"),
            "{e}"
        );
        // Two namespaces on one remote namespace: same settings, slices that do not overlap.
        let second = |backend: &str| {
            format!(
                "{REMOTE}\n[[namespace]]\nsubsystem = \"nqn.2026-11.dev.keel:gw\"\nbackend = {backend}\n"
            )
        };
        let same = "{ remote = { nqn = \"nqn.2026-11.dev.keel:other\", paths = [\"192.0.2.7:4420\"] }, offset = \"4KiB\" }";
        let e = err(&second(same));
        assert_eq!(
            (e.line, e.field.as_str()),
            (17, "namespace[2].backend"),
            "{e}"
        );
        assert!(e.message.contains("overlaps namespace[1]"), "{e}");
        let other_depth = "{ remote = { nqn = \"nqn.2026-11.dev.keel:other\", paths = [\"192.0.2.7:4420\"], depth = 32 } }";
        let e = err(&second(other_depth));
        assert_eq!(e.field, "namespace[2].backend.remote", "{e}");
        assert!(e.message.contains("other settings"), "{e}");
    }

    const QOS: &str = r#"
[[subsystem]]
nqn = "nqn.2026-11.dev.keel:vol0"

[[namespace]]
subsystem = "nqn.2026-11.dev.keel:vol0"
backend = { drive = 0, length = "1GiB" }
function = 0

[[namespace]]
subsystem = "nqn.2026-11.dev.keel:vol0"
backend = { drive = 0, offset = "1GiB" }
qos = { write_iops = 800, bps = { rate = "64MiB", burst = "1MiB" }, weight = 2, group = "tenant-b" }

[[qos.group]]
name = "tenant-b"
iops = 5000
weight = 4

[[qos.host]]
hostnqn = "*"
read_iops = { rate = 100, burst = 1 }

[[qos.function]]
function = 0
write_bps = 1048576
"#;

    #[test]
    fn parses_qos() {
        let d = parse_toml(QOS).unwrap();
        let q = &d.qos;
        let r = |per_sec, burst| Some(QosRate { per_sec, burst });
        assert_eq!(
            q.namespaces,
            [NamespaceQos {
                subsystem: "nqn.2026-11.dev.keel:vol0".into(),
                nsid: 2,
                limits: QosLimits {
                    write_iops: r(800, None),
                    bps: r(64 << 20, Some(1 << 20)),
                    ..Default::default()
                },
                weight: 2,
                group: Some("tenant-b".into()),
            }]
        );
        assert_eq!(
            q.groups,
            [QosGroup {
                name: "tenant-b".into(),
                limits: QosLimits {
                    iops: r(5000, None),
                    ..Default::default()
                },
                weight: 4,
            }]
        );
        assert_eq!(q.hosts[0].hostnqn, "*");
        assert_eq!(q.hosts[0].limits.read_iops, r(100, Some(1)));
        assert_eq!(q.functions[0].function, 0);
        assert_eq!(q.functions[0].limits.write_bps, r(1 << 20, None));
        // Without any QoS: nothing.
        assert!(parse_toml(GOOD).unwrap().qos.is_empty());
        assert_eq!(q.drive_max_inflight, None);
    }

    #[test]
    fn drive_max_inflight_is_a_qos_setting() {
        let d = parse_toml(&format!("{GOOD}\n[qos]\ndrive_max_inflight = 16\n")).unwrap();
        assert_eq!(d.qos.drive_max_inflight, Some(16));
        assert!(!d.qos.is_empty());
        // Beside the rules, before or after them; 0 (no cap) is allowed.
        let d = parse_toml(&QOS.replace(
            "[[qos.group]]",
            "[qos]\ndrive_max_inflight = 0\n\n[[qos.group]]",
        ))
        .unwrap();
        assert_eq!(d.qos.drive_max_inflight, Some(0));
        assert_eq!(d.qos.groups.len(), 1);
        let e = err(&format!("{GOOD}\n[qos]\ndrive_max_inflight = 5000\n"));
        assert_eq!(e.field, "qos.drive_max_inflight", "{e}");
        assert!(e.message.contains("at most 4096"), "{e}");
        let e = err(&format!("{GOOD}\n[qos]\ndrive_max_inflight = -1\n"));
        assert!(e.to_string().contains("drive_max_inflight"), "{e}");
    }

    #[test]
    fn qos_errors_name_line_and_field() {
        let cases = [
            (
                "write_iops = 800",
                "write_iops = 0",
                13,
                "namespace[1].qos.write_iops",
                "rate of 0",
            ),
            (
                "write_iops = 800",
                "writ_iops = 800",
                13,
                "namespace[1].qos.writ_iops",
                "unknown QoS key",
            ),
            (
                "write_iops = 800",
                "write_iops = \"fast\"",
                13,
                "namespace[1].qos.write_iops",
                "operations per second",
            ),
            (
                "burst = \"1MiB\"",
                "burst = 0",
                13,
                "namespace[1].qos.bps.burst",
                "burst of 0",
            ),
            (
                "group = \"tenant-b\"",
                "group = \"tenant-c\"",
                13,
                "namespace[1].qos.group",
                "no [[qos.group]]",
            ),
            (
                "weight = 2",
                "weight = 0",
                13,
                "namespace[1].qos.weight",
                "weight 0",
            ),
            (
                "weight = 4",
                "weight = 1001",
                15,
                "qos.group[0].weight",
                "weight 1001",
            ),
            (
                "hostnqn = \"*\"",
                "hostnqn = \"host\"",
                20,
                "qos.host[0].hostnqn",
                "not an NQN",
            ),
            (
                "function = 0\nwrite_bps",
                "function = 3\nwrite_bps",
                24,
                "qos.function[0].function",
                "no namespace is exported",
            ),
            (
                "name = \"tenant-b\"",
                "name = \"tenant b\"",
                15,
                "qos.group[0].name",
                "not a group name",
            ),
        ];
        for (from, to, line, field, msg) in cases {
            let text = QOS.replace(from, to);
            assert_ne!(text, QOS, "{from}");
            let e = err(&text);
            assert_eq!((e.line, e.field.as_str()), (line, field), "{to}: {e}");
            assert!(e.message.contains(msg), "{to}: {e}");
        }
        let e = err(&QOS.replace(
            "[[qos.host]]",
            "[[qos.group]]\nname = \"tenant-b\"\n[[qos.host]]",
        ));
        assert_eq!(e.field, "qos.group[1].name", "{e}");
        let e = err(&QOS.replace("[[qos.host]]", "[[qos.hosts]]"));
        assert!(e.message.contains("unknown field"), "{e}");
    }
}
