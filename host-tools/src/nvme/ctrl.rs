//! A controller association: the admin queue (Connect, property handshake, Identify, log
//! pages, Keep Alive from a background thread) and I/O queues, each on its own TCP connection
//! (NVMe-oF 1.1 §3.3, §3.6; NVMe base 2.0 §3.5.2 initialization, §3.6 shutdown, §3.9 keep
//! alive).

use super::conn::{Connection, Done, resolve};
use super::error::NvmeError;
use keel_nvme::fabrics::{
    CATTR_DISABLE_SQ_FLOW_CONTROL, CNTLID_DYNAMIC, ConnectCommand, ConnectData, PropertyCommand,
    PropertySize, disconnect_sqe,
};
use keel_nvme::identify::{
    IDENTIFY_LEN, IdentifyCommand, IdentifyController, IdentifyNamespace, NsIdentifiers, cns,
    nsid_list,
};
use keel_nvme::io::{FeaturesCommand, RwCommand, number_of_queues};
use keel_nvme::log::GetLogPageCommand;
use keel_nvme::log::discovery::{Entry, Header, RECORD_LEN};
use keel_nvme::regs::{Cap, Cc, Csts, offset};
use keel_nvme::{AdminOpcode, FeatureId, IoOpcode, Sqe};
use keel_nvmf_tcp::{Digests, HostConfig};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{RecvTimeoutError, Sender, channel};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Admin queue size we ask for (0's based SQSIZE 31: 32 entries).
const ADMIN_SQSIZE: u16 = 31;
/// Admin commands in flight at once (one user command plus a Keep Alive).
const ADMIN_SLOTS: u16 = 4;
/// Largest transfer when the controller reports no MDTS limit.
const NO_MDTS_CAP: u32 = 1 << 20;

/// How to reach and identify ourselves to a controller.
#[derive(Debug, Clone)]
pub struct Params {
    /// "host:port".
    pub addr: String,
    /// Subsystem NQN.
    pub subnqn: String,
    /// Host NQN.
    pub hostnqn: String,
    /// Host identifier.
    pub hostid: [u8; 16],
    /// Digests to ask for.
    pub digests: Digests,
    /// Keep Alive Timeout to request (zero: none).
    pub kato: Duration,
    /// Bound of every wait (connect, each command).
    pub timeout: Duration,
    /// Disable SQ flow control in every queue's Connect (CATTR bit 2, Linux `nvme connect
    /// --disable-sqflow`): the controller need not report SQ head pointers and may end reads
    /// with a C2HData PDU carrying SUCCESS instead of a response capsule.
    pub disable_sqflow: bool,
}

impl Params {
    /// Parameters for `hostnqn` reaching subsystem `subnqn` at `addr` ("host:port"): the
    /// host ID derived from the host NQN ([`super::hostid_for`]), no digests, a 30 s Keep
    /// Alive Timeout and 60 s waits. Adjust fields with struct update syntax.
    pub fn new(addr: impl Into<String>, subnqn: impl Into<String>, hostnqn: &str) -> Self {
        Self {
            addr: addr.into(),
            subnqn: subnqn.into(),
            hostnqn: hostnqn.into(),
            hostid: super::hostid_for(hostnqn),
            digests: Digests::default(),
            kato: Duration::from_secs(30),
            timeout: Duration::from_secs(60),
            disable_sqflow: false,
        }
    }

    fn host_config(&self, slots: u16, in_capsule_limit: u32) -> HostConfig {
        HostConfig {
            digests: self.digests,
            slots,
            in_capsule_limit,
            sq_flow_control_disabled: self.disable_sqflow,
            ..HostConfig::default()
        }
    }
}

fn check(done: Done, what: &str) -> Result<Done, NvmeError> {
    if done.cqe.status.is_success() {
        Ok(done)
    } else {
        Err(NvmeError::Status {
            command: what.to_string(),
            status: done.cqe.status,
            dw0: done.cqe.dw0,
        })
    }
}

/// A Disconnect refused as an opcode the target does not implement: the queue ends with its
/// connection, which the caller closes next.
fn disconnect_unsupported_is_fine(e: NvmeError) -> Result<(), NvmeError> {
    match e {
        NvmeError::Status { status, .. } if status.sct == 0 && status.sc == 0x01 => Ok(()),
        e => Err(e),
    }
}

/// Sends a Connect on a fresh connection and returns the CNTLID.
fn connect_queue(
    conn: &mut Connection,
    p: &Params,
    qid: u16,
    sqsize: u16,
    cntlid: u16,
    kato_ms: u32,
) -> Result<u16, NvmeError> {
    let cmd = ConnectCommand {
        recfmt: 0,
        qid,
        sqsize,
        cattr: if p.disable_sqflow {
            CATTR_DISABLE_SQ_FLOW_CONTROL
        } else {
            0
        },
        kato: kato_ms,
    };
    let mut data = vec![0u8; ConnectData::SIZE];
    ConnectData::new(p.hostid, cntlid, &p.subnqn, &p.hostnqn).write(&mut data);
    let what = if qid == 0 {
        format!("Connect (admin queue, {})", p.subnqn)
    } else {
        format!("Connect (I/O queue {qid})")
    };
    let cid = conn.submit(cmd.to_sqe(0), Some((data, ConnectData::SIZE as u32)))?;
    let done = check(conn.wait(cid, p.timeout, &what)?, &what)?;
    Ok(done.cqe.dw0 as u16)
}

struct Admin {
    conn: Connection,
    last: Instant,
}

struct KeepAlive {
    stop: Sender<()>,
    thread: JoinHandle<()>,
}

/// A live controller association (admin queue connected, CC.EN = 1, CSTS.RDY = 1).
pub struct Controller {
    params: Params,
    peer: SocketAddr,
    admin: Arc<Mutex<Admin>>,
    ka: Option<KeepAlive>,
    ka_failed: Arc<AtomicBool>,
    /// Controller ID.
    pub cntlid: u16,
    /// CAP.
    pub cap: Cap,
    /// VS.
    pub vs: u32,
    /// Identify Controller.
    pub id: IdentifyController,
    /// KATO granted (what we asked for; the discovery controller may pick its own for 0).
    pub kato: Duration,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("addr", &self.params.addr)
            .field("subnqn", &self.params.subnqn)
            .field("cntlid", &self.cntlid)
            .finish_non_exhaustive()
    }
}

impl Controller {
    /// Connects the admin queue, enables the controller and reads Identify Controller.
    pub fn connect(params: Params) -> Result<Self, NvmeError> {
        let peer = resolve(&params.addr)?;
        let mut conn = Connection::open(
            peer,
            params.host_config(ADMIN_SLOTS, keel_nvmf_tcp::target::MIN_IN_CAPSULE),
            params.timeout,
        )?;
        let kato_ms = params.kato.as_millis().min(u32::MAX as u128) as u32;
        let cntlid = connect_queue(&mut conn, &params, 0, ADMIN_SQSIZE, CNTLID_DYNAMIC, kato_ms)?;
        let mut c = Self {
            peer,
            admin: Arc::new(Mutex::new(Admin {
                conn,
                last: Instant::now(),
            })),
            ka: None,
            ka_failed: Arc::new(AtomicBool::new(false)),
            cntlid,
            cap: Cap(0),
            vs: 0,
            id: IdentifyController::default(),
            kato: params.kato,
            params,
        };
        c.cap = Cap(c.property_get(offset::CAP, PropertySize::Eight)?);
        c.vs = c.property_get(offset::VS, PropertySize::Four)? as u32;
        c.enable()?;
        c.start_keep_alive();
        let mut buf = c.identify(cns::CONTROLLER, 0)?;
        c.id = IdentifyController::decode(&buf);
        buf.fill(0);
        Ok(c)
    }

    /// The connection parameters.
    pub fn params(&self) -> &Params {
        &self.params
    }

    /// The admin queue's peer address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Largest transfer per command in bytes (MDTS × CAP.MPSMIN; 1 MiB when MDTS is 0).
    pub fn max_transfer(&self) -> u32 {
        let page = 4096u64 << ((self.cap.0 >> 48) & 0xF);
        if self.id.mdts == 0 {
            NO_MDTS_CAP
        } else {
            (page << self.id.mdts).min(u32::MAX as u64 / 2) as u32
        }
    }

    /// In-capsule data bytes the controller takes on I/O queues.
    pub fn in_capsule_limit(&self) -> u32 {
        (self.id.ioccsz.saturating_mul(16)).saturating_sub(64)
    }

    fn lock(&self) -> MutexGuard<'_, Admin> {
        self.admin.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs one admin command to completion; non-success statuses are errors.
    pub fn admin_command(
        &self,
        sqe: Sqe,
        data: Option<(Vec<u8>, u32)>,
        what: &str,
    ) -> Result<Done, NvmeError> {
        if self.ka_failed.load(Ordering::Relaxed) {
            return Err(NvmeError::Closed {
                reason: "keep alive failed on the admin queue".into(),
            });
        }
        let mut a = self.lock();
        let cid = a.conn.submit(sqe, data)?;
        let done = a.conn.wait(cid, self.params.timeout, what)?;
        a.last = Instant::now();
        check(done, what)
    }

    /// Property Get.
    pub fn property_get(&self, off: u32, size: PropertySize) -> Result<u64, NvmeError> {
        let d = self.admin_command(
            PropertyCommand::get_sqe(0, off, size),
            None,
            &format!("Property Get {off:#x}"),
        )?;
        Ok(d.cqe.dw0 as u64 | ((d.cqe.dw1 as u64) << 32))
    }

    /// Property Set (4 bytes).
    pub fn property_set(&self, off: u32, value: u32) -> Result<(), NvmeError> {
        self.admin_command(
            PropertyCommand::set_sqe(0, off, PropertySize::Four, value as u64),
            None,
            &format!("Property Set {off:#x}"),
        )
        .map(|_| ())
    }

    fn csts(&self) -> Result<Csts, NvmeError> {
        Ok(Csts(
            self.property_get(offset::CSTS, PropertySize::Four)? as u32
        ))
    }

    /// CAP.TO (500 ms units), bounded by our own timeout.
    fn ready_timeout(&self) -> Duration {
        let to = Duration::from_millis(500 * ((self.cap.0 >> 24) & 0xFF).max(1));
        to.min(self.params.timeout).max(Duration::from_secs(1))
    }

    fn enable(&self) -> Result<(), NvmeError> {
        let cc = Cc::new(true, 0, 0, 0, Cc::SHN_NONE, 6, 4);
        self.property_set(offset::CC, cc.0)?;
        let limit = self.ready_timeout();
        let deadline = Instant::now() + limit;
        loop {
            let csts = self.csts()?;
            if csts.cfs() {
                return Err(NvmeError::Protocol(format!(
                    "controller fatal status after CC.EN = 1 (CC {:#x}, CSTS {:#x})",
                    cc.0, csts.0
                )));
            }
            if csts.rdy() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(NvmeError::Timeout {
                    what: "CSTS.RDY = 1".into(),
                    after: limit,
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn start_keep_alive(&mut self) {
        if self.params.kato.is_zero() {
            return;
        }
        // Twice per KATO, as Linux does; a command on the admin queue in between defers it.
        let every = (self.params.kato / 2).max(Duration::from_millis(100));
        let (stop, rx) = channel::<()>();
        let admin = self.admin.clone();
        let failed = self.ka_failed.clone();
        let timeout = self.params.timeout;
        let thread = std::thread::spawn(move || {
            loop {
                match rx.recv_timeout(every / 4) {
                    Err(RecvTimeoutError::Timeout) => {}
                    _ => return,
                }
                let mut a = admin.lock().unwrap_or_else(|e| e.into_inner());
                if a.last.elapsed() < every {
                    continue;
                }
                let sqe = Sqe::new(AdminOpcode::KeepAlive as u8, 0);
                let ok = a
                    .conn
                    .submit(sqe, None)
                    .and_then(|cid| a.conn.wait(cid, timeout, "Keep Alive"))
                    .map(|d| d.cqe.status.is_success())
                    .unwrap_or(false);
                a.last = Instant::now();
                if !ok {
                    failed.store(true, Ordering::Relaxed);
                    return;
                }
            }
        });
        self.ka = Some(KeepAlive { stop, thread });
    }

    fn stop_keep_alive(&mut self) {
        if let Some(ka) = self.ka.take() {
            let _ = ka.stop.send(());
            let _ = ka.thread.join();
        }
    }

    /// Identify with the given CNS; returns the 4096-byte structure.
    pub fn identify(&self, cns: u8, nsid: u32) -> Result<Box<[u8; IDENTIFY_LEN]>, NvmeError> {
        let sqe = IdentifyCommand {
            cns,
            cntid: 0,
            csi: 0,
            nsid,
        }
        .to_sqe(0);
        let d = self.admin_command(
            sqe,
            Some((vec![0; IDENTIFY_LEN], IDENTIFY_LEN as u32)),
            &format!("Identify (CNS {cns:#04x}, NSID {nsid})"),
        )?;
        let buf = d
            .buf
            .ok_or_else(|| NvmeError::Protocol("Identify returned no buffer".into()))?;
        let arr: Box<[u8; IDENTIFY_LEN]> = buf
            .into_boxed_slice()
            .try_into()
            .map_err(|_| NvmeError::Protocol("Identify data is not 4096 bytes".into()))?;
        Ok(arr)
    }

    /// Active namespace IDs (Identify CNS 02h, all pages).
    pub fn active_namespaces(&self) -> Result<Vec<u32>, NvmeError> {
        let mut out = Vec::new();
        let mut after = 0u32;
        loop {
            let b = self.identify(cns::ACTIVE_NS_LIST, after)?;
            let before = out.len();
            out.extend(nsid_list(&b[..]));
            if out.len() - before < IDENTIFY_LEN / 4 {
                return Ok(out);
            }
            after = *out.last().unwrap_or(&0);
        }
    }

    /// Identify Namespace.
    pub fn identify_namespace(&self, nsid: u32) -> Result<IdentifyNamespace, NvmeError> {
        Ok(IdentifyNamespace::decode(
            &*self.identify(cns::NAMESPACE, nsid)?,
        ))
    }

    /// Namespace Identification Descriptor list.
    pub fn namespace_ids(&self, nsid: u32) -> Result<NsIdentifiers, NvmeError> {
        Ok(NsIdentifiers::decode(
            &*self.identify(cns::NS_DESCRIPTOR_LIST, nsid)?,
        ))
    }

    /// Get Log Page: `len` bytes at `offset` (dword multiples).
    pub fn get_log_page(
        &self,
        lid: u8,
        nsid: u32,
        offset: u64,
        len: u32,
    ) -> Result<Vec<u8>, NvmeError> {
        if len == 0 || !len.is_multiple_of(4) {
            return Err(NvmeError::InvalidArgument(format!(
                "log page length {len} is not a positive multiple of 4"
            )));
        }
        let sqe = GetLogPageCommand::to_sqe(0, nsid, lid, false, offset, len);
        let d = self.admin_command(
            sqe,
            Some((vec![0; len as usize], len)),
            &format!("Get Log Page {lid:#04x} ({len} bytes at {offset})"),
        )?;
        d.buf
            .ok_or_else(|| NvmeError::Protocol("Get Log Page returned no buffer".into()))
    }

    /// The discovery log page (70h): header and entries, consistent (same GENCTR before and
    /// after reading the entries).
    pub fn discovery_log(&self) -> Result<(Header, Vec<Entry>), NvmeError> {
        const MAX_RECORDS: u64 = 1024;
        for _ in 0..4 {
            let h = self.get_log_page(0x70, 0, 0, RECORD_LEN as u32)?;
            let header = Header::decode(record(&h, 0)?);
            if header.numrec > MAX_RECORDS {
                return Err(NvmeError::Protocol(format!(
                    "discovery log reports {} records (we read at most {MAX_RECORDS})",
                    header.numrec
                )));
            }
            let mut entries = Vec::with_capacity(header.numrec as usize);
            if header.numrec > 0 {
                let len = header.numrec as u32 * RECORD_LEN as u32;
                let b = self.get_log_page(0x70, 0, RECORD_LEN as u64, len)?;
                for i in 0..header.numrec as usize {
                    entries.push(Entry::decode(record(&b, i)?));
                }
            }
            let again = self.get_log_page(0x70, 0, 0, RECORD_LEN as u32)?;
            if Header::decode(record(&again, 0)?).genctr == header.genctr {
                return Ok((header, entries));
            }
        }
        Err(NvmeError::Protocol(
            "discovery log kept changing while being read".into(),
        ))
    }

    /// Set Features Number of Queues; returns the number of I/O queues granted.
    pub fn set_io_queues(&self, n: u16) -> Result<u16, NvmeError> {
        let n = n.max(1);
        let sqe = FeaturesCommand::set_sqe(
            0,
            FeatureId::NumberOfQueues as u8,
            number_of_queues(n - 1, n - 1),
        );
        let d = self.admin_command(sqe, None, "Set Features (Number of Queues)")?;
        let nsqa = (d.cqe.dw0 & 0xFFFF) as u16 + 1;
        let ncqa = (d.cqe.dw0 >> 16) as u16 + 1;
        Ok(nsqa.min(ncqa))
    }

    /// Set Features Asynchronous Event Configuration (FID 0Bh): which notices the controller
    /// reports through Asynchronous Event Requests (`keel_nvme::opcode::async_event::AEC_*`).
    pub fn set_async_event_config(&self, aec: u32) -> Result<(), NvmeError> {
        let sqe = FeaturesCommand::set_sqe(0, FeatureId::AsyncEventConfig as u8, aec);
        self.admin_command(sqe, None, "Set Features (Asynchronous Event Configuration)")?;
        Ok(())
    }

    /// Submits an Asynchronous Event Request (NVMe base 2.0 §5.2) without waiting for it: it
    /// completes when the controller has an event. Returns its CID for [`Self::wait_admin`].
    pub fn submit_async_event_request(&self) -> Result<u16, NvmeError> {
        self.submit_admin(Sqe::new(AdminOpcode::AsyncEventRequest as u8, 0), None)
    }

    /// Submits an admin command without waiting for it (an Abort that waits for the command
    /// it aborts, say). Returns its CID for [`Self::wait_admin`].
    pub fn submit_admin(&self, sqe: Sqe, data: Option<(Vec<u8>, u32)>) -> Result<u16, NvmeError> {
        if self.ka_failed.load(Ordering::Relaxed) {
            return Err(NvmeError::Closed {
                reason: "keep alive failed on the admin queue".into(),
            });
        }
        let mut a = self.lock();
        let cid = a.conn.submit(sqe, data)?;
        a.last = Instant::now();
        Ok(cid)
    }

    /// Waits up to `timeout` for admin command `cid` (submitted without waiting) to
    /// complete; `Ok(None)` when it has not. The admin queue is released every 100 ms so
    /// Keep Alive goes on meanwhile. A non-success status is an error.
    pub fn wait_admin(
        &self,
        cid: u16,
        timeout: Duration,
        what: &str,
    ) -> Result<Option<Done>, NvmeError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            if self.ka_failed.load(Ordering::Relaxed) {
                return Err(NvmeError::Closed {
                    reason: format!(
                        "keep alive failed on the admin queue (while waiting for {what})"
                    ),
                });
            }
            let slice = left.min(Duration::from_millis(100));
            let r = self.lock().conn.wait(cid, slice, what);
            match r {
                Ok(done) => return check(done, what).map(Some),
                Err(NvmeError::Timeout { .. }) => std::thread::sleep(Duration::from_millis(1)),
                Err(e) => return Err(e),
            }
        }
    }

    /// Opens I/O queue `qid` with `depth` commands in flight at most.
    pub fn io_queue(&self, qid: u16, depth: u16) -> Result<IoQueue, NvmeError> {
        IoQueue::connect(self, qid, depth)
    }

    /// Orderly end: CC.SHN = normal shutdown, wait for CSTS.SHST = complete, Disconnect,
    /// close. Disconnect the I/O queues first.
    pub fn close(mut self) -> Result<(), NvmeError> {
        self.stop_keep_alive();
        let cc = Cc::new(true, 0, 0, 0, Cc::SHN_NORMAL, 6, 4);
        let result = self.property_set(offset::CC, cc.0).and_then(|_| {
            let limit = self.ready_timeout();
            let deadline = Instant::now() + limit;
            loop {
                if self.csts()?.shst() == Csts::SHST_COMPLETE {
                    break Ok(());
                }
                if Instant::now() >= deadline {
                    break Err(NvmeError::Timeout {
                        what: "CSTS.SHST = shutdown complete".into(),
                        after: limit,
                    });
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        let result = result.and_then(|_| {
            // Linux's nvmet implements no Disconnect (Invalid Command Opcode): the
            // association ends with the connection all the same.
            self.admin_command(disconnect_sqe(0), None, "Disconnect (admin queue)")
                .map(|_| ())
                .or_else(disconnect_unsupported_is_fine)
        });
        self.shutdown_socket();
        result
    }

    fn shutdown_socket(&mut self) {
        self.lock().conn.shutdown(Duration::from_secs(1));
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.stop_keep_alive();
    }
}

fn record(b: &[u8], i: usize) -> Result<&[u8; RECORD_LEN], NvmeError> {
    b.get(i * RECORD_LEN..(i + 1) * RECORD_LEN)
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| NvmeError::Protocol("discovery log shorter than announced".into()))
}

/// Which I/O command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoKind {
    /// Read.
    Read,
    /// Write.
    Write,
}

/// An I/O queue: its own TCP connection, `depth` commands in flight at most.
#[derive(Debug)]
pub struct IoQueue {
    conn: Connection,
    qid: u16,
    depth: u16,
    max_transfer: u32,
    timeout: Duration,
    inflight: usize,
}

impl IoQueue {
    /// Connects I/O queue `qid` of `ctrl` (SQSIZE = `depth`, so `depth` commands fit even with
    /// SQ flow control; clamped to CAP.MQES).
    pub fn connect(ctrl: &Controller, qid: u16, depth: u16) -> Result<Self, NvmeError> {
        if qid == 0 {
            return Err(NvmeError::InvalidArgument("I/O queue id 0".into()));
        }
        let mqes = ctrl.cap.mqes().max(1);
        let sqsize = depth.clamp(1, mqes);
        let depth = depth.clamp(1, sqsize);
        let p = &ctrl.params;
        let mut conn = Connection::open(
            ctrl.peer,
            p.host_config(depth, ctrl.in_capsule_limit()),
            p.timeout,
        )?;
        connect_queue(&mut conn, p, qid, sqsize, ctrl.cntlid, 0)?;
        Ok(Self {
            conn,
            qid,
            depth,
            max_transfer: ctrl.max_transfer(),
            timeout: p.timeout,
            inflight: 0,
        })
    }

    /// Queue id.
    pub fn qid(&self) -> u16 {
        self.qid
    }

    /// Commands in flight at most.
    pub fn depth(&self) -> u16 {
        self.depth
    }

    /// Commands in flight now.
    pub fn inflight(&self) -> usize {
        self.inflight
    }

    /// Largest transfer per command.
    pub fn max_transfer(&self) -> u32 {
        self.max_transfer
    }

    /// The underlying connection (digests, MAXH2CDATA).
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Submits a read or write of `blocks` blocks at `slba`; `buf` holds `len` bytes (the
    /// data for a write, room for a read). Returns the CID.
    pub fn submit(
        &mut self,
        kind: IoKind,
        nsid: u32,
        slba: u64,
        blocks: u32,
        buf: Vec<u8>,
        len: u32,
    ) -> Result<u16, NvmeError> {
        if blocks == 0 || blocks > 65536 {
            return Err(NvmeError::InvalidArgument(format!(
                "{blocks} blocks in one command (1..=65536)"
            )));
        }
        let op = match kind {
            IoKind::Read => IoOpcode::Read,
            IoKind::Write => IoOpcode::Write,
        } as u8;
        let sqe = RwCommand::simple(slba, blocks).to_sqe(op, 0, nsid);
        let cid = self.conn.submit(sqe, Some((buf, len)))?;
        self.inflight += 1;
        Ok(cid)
    }

    /// Submits any I/O command (Verify, Copy, Write Zeroes, Dataset Management...): `sqe`
    /// as built by the caller (its CID is replaced), `data` the buffer and transfer length
    /// (the range list of Copy / Dataset Management, room for data a command returns; the
    /// opcode says which way it goes). Returns the CID; the completion comes from
    /// [`IoQueue::next_completion`].
    pub fn submit_command(
        &mut self,
        sqe: Sqe,
        data: Option<(Vec<u8>, u32)>,
    ) -> Result<u16, NvmeError> {
        let cid = self.conn.submit(sqe, data)?;
        self.inflight += 1;
        Ok(cid)
    }

    /// The next completion (any CID), as it comes; the status is not checked.
    pub fn next_completion(&mut self) -> Result<(u16, Done), NvmeError> {
        let r = self.conn.next_completion(
            self.timeout,
            &format!("an I/O completion on queue {}", self.qid),
        );
        if r.is_ok() {
            self.inflight = self.inflight.saturating_sub(1);
        }
        r
    }

    /// Reads `blocks` blocks of `block_size` bytes at `slba`, split at MDTS, pipelined.
    pub fn read(
        &mut self,
        nsid: u32,
        slba: u64,
        blocks: u64,
        block_size: u32,
    ) -> Result<Vec<u8>, NvmeError> {
        let total = blocks
            .checked_mul(block_size as u64)
            .filter(|&t| t <= isize::MAX as u64)
            .ok_or_else(|| NvmeError::InvalidArgument("transfer too large".into()))?;
        let mut out = vec![0u8; total as usize];
        self.transfer(IoKind::Read, nsid, slba, &mut out, block_size)?;
        Ok(out)
    }

    /// Writes `data` (a multiple of `block_size`) at `slba`, split at MDTS, pipelined.
    pub fn write(
        &mut self,
        nsid: u32,
        slba: u64,
        data: &[u8],
        block_size: u32,
    ) -> Result<(), NvmeError> {
        let mut tmp = data.to_vec();
        self.transfer(IoKind::Write, nsid, slba, &mut tmp, block_size)
    }

    fn transfer(
        &mut self,
        kind: IoKind,
        nsid: u32,
        slba: u64,
        data: &mut [u8],
        block_size: u32,
    ) -> Result<(), NvmeError> {
        let bs = block_size as usize;
        if bs == 0 || !data.len().is_multiple_of(bs) {
            return Err(NvmeError::InvalidArgument(format!(
                "{} bytes is not a multiple of the block size {block_size}",
                data.len()
            )));
        }
        let per_cmd = ((self.max_transfer as usize / bs).clamp(1, 65536)) * bs;
        let chunks: Vec<(usize, usize)> = (0..data.len())
            .step_by(per_cmd)
            .map(|o| (o, per_cmd.min(data.len() - o)))
            .collect();
        let mut next = 0;
        let mut pending: std::collections::HashMap<u16, usize> = Default::default();
        let name = match kind {
            IoKind::Read => "Read",
            IoKind::Write => "Write",
        };
        while next < chunks.len() || !pending.is_empty() {
            while next < chunks.len() && pending.len() < self.depth as usize {
                let (off, len) = chunks[next];
                let buf = match kind {
                    IoKind::Write => data[off..off + len].to_vec(),
                    IoKind::Read => vec![0u8; len],
                };
                let lba = slba + (off / bs) as u64;
                let cid = self.submit(kind, nsid, lba, (len / bs) as u32, buf, len as u32)?;
                pending.insert(cid, next);
                next += 1;
            }
            let (cid, done) = self.next_completion()?;
            let Some(i) = pending.remove(&cid) else {
                continue;
            };
            let (off, len) = chunks[i];
            let what = format!(
                "{name} (NSID {nsid}, LBA {}, {} block(s))",
                slba + (off / bs) as u64,
                len / bs
            );
            let done = check(done, &what)?;
            if kind == IoKind::Read {
                match done.buf {
                    Some(b) if b.len() >= len => data[off..off + len].copy_from_slice(&b[..len]),
                    _ => return Err(NvmeError::Protocol(format!("{what}: no data"))),
                }
            }
        }
        Ok(())
    }

    /// Disconnect (fabrics, on this queue) and close the connection. A target without the
    /// Disconnect command (Linux's nvmet-tcp answers Invalid Command Opcode; Linux's own host
    /// never sends it and just closes the connection) loses the queue with the connection.
    pub fn close(mut self) -> Result<(), NvmeError> {
        let what = format!("Disconnect (I/O queue {})", self.qid);
        let r = self
            .conn
            .submit(disconnect_sqe(0), None)
            .and_then(|cid| self.conn.wait(cid, self.timeout, &what))
            .and_then(|d| check(d, &what))
            .map(|_| ())
            .or_else(disconnect_unsupported_is_fine);
        self.conn.shutdown(Duration::from_secs(1));
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_nvme::Status;

    /// Linux 6.1's nvmet-tcp answers Disconnect with Invalid Command Opcode (it implements no
    /// Disconnect); any other failure still fails the close.
    #[test]
    fn a_disconnect_the_target_does_not_implement_still_closes() {
        let refused = |status| NvmeError::Status {
            command: "Disconnect (I/O queue 1)".into(),
            status,
            dw0: 0,
        };
        assert!(disconnect_unsupported_is_fine(refused(Status::INVALID_OPCODE)).is_ok());
        assert!(disconnect_unsupported_is_fine(refused(Status::INVALID_FIELD)).is_err());
        assert!(
            disconnect_unsupported_is_fine(NvmeError::Closed {
                reason: "reset".into()
            })
            .is_err()
        );
    }
}
