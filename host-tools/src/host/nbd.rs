//! An NBD server exporting one namespace through the host driver (NBD protocol
//! `doc/proto.md`: fixed newstyle handshake, `NBD_OPT_EXPORT_NAME`, `NBD_OPT_INFO`,
//! `NBD_OPT_GO`, `NBD_OPT_LIST`, `NBD_OPT_ABORT`; simple replies; `NBD_CMD_READ`, `WRITE`
//! (FUA), `FLUSH`, `TRIM`, `WRITE_ZEROES`, `DISC`). Every export name maps to the one
//! namespace. Each client connection runs on its own thread with its own I/O queue pair.
//! Offsets and lengths must be multiples of the block size (advertised with
//! `NBD_INFO_BLOCK_SIZE`); anything else gets `EINVAL`.
//!
//! The protocol ([`handshake`], [`transmission`]) is generic over the byte streams and the
//! storage behind it ([`Device`]), so it can be driven from bytes (the `nbd_server` fuzz
//! target) as well as from a socket and an I/O queue of the emulated function ([`Server`]).

use super::driver::{HostController, IoOp, IoQueue};
use anyhow::{Context, Result, bail};
use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const C_NO_ZEROES: u32 = 2;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;

const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = 0x8000_0001;
const REP_ERR_INVALID: u32 = 0x8000_0003;

const INFO_EXPORT: u16 = 0;
const INFO_BLOCK_SIZE: u16 = 3;

const TF_HAS_FLAGS: u16 = 1 << 0;
const TF_SEND_FLUSH: u16 = 1 << 2;
const TF_SEND_FUA: u16 = 1 << 3;
const TF_SEND_TRIM: u16 = 1 << 5;
const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;

const CMD_FLAG_FUA: u16 = 1 << 0;
const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;

const EIO: u32 = 5;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;
const ENOTSUP: u32 = 95;

/// Largest request payload accepted (32 MiB, as the reference server).
const MAX_REQUEST: u32 = 32 << 20;

/// What the server exports.
#[derive(Debug, Clone, Copy)]
pub struct Export {
    /// Namespace.
    pub nsid: u32,
    /// Block size.
    pub block_size: u32,
    /// Size in blocks.
    pub blocks: u64,
}

impl Export {
    /// Size in bytes.
    pub fn bytes(&self) -> u64 {
        self.blocks * self.block_size as u64
    }

    fn info(&self) -> Vec<u8> {
        let mut d = Vec::with_capacity(12);
        d.extend_from_slice(&INFO_EXPORT.to_be_bytes());
        d.extend_from_slice(&self.bytes().to_be_bytes());
        d.extend_from_slice(&TRANSMISSION_FLAGS.to_be_bytes());
        d
    }
}

/// The transmission flags the server advertises.
const TRANSMISSION_FLAGS: u16 =
    TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_TRIM | TF_SEND_WRITE_ZEROES;

/// The exported storage as the transmission phase uses it; `lba` and `count` are in the
/// export's blocks and always lie inside it (the protocol checks them first).
pub trait Device {
    /// Reads `count` blocks.
    fn read(&mut self, lba: u64, count: u64) -> Result<Vec<u8>>;
    /// Writes `data` (`count` blocks), durably first when `fua`.
    fn write(&mut self, lba: u64, count: u64, data: &[u8], fua: bool) -> Result<()>;
    /// Makes completed writes durable.
    fn flush(&mut self) -> Result<()>;
    /// Deallocates `count` blocks.
    fn trim(&mut self, lba: u64, count: u64) -> Result<()>;
    /// Zeroes `count` blocks, deallocating them when `deallocate`.
    fn write_zeroes(&mut self, lba: u64, count: u64, deallocate: bool) -> Result<()>;
}

/// An exported namespace reached through one I/O queue of the emulated function.
struct QueueDevice<'a> {
    q: &'a mut IoQueue,
    e: Export,
}

impl QueueDevice<'_> {
    fn run(&mut self, lba: u64, count: u64, op: IoOp, data: Option<&[u8]>) -> Result<()> {
        let e = self.e;
        self.q
            .pipeline(e.nsid, lba, count, e.block_size, op, |_, _, _, _| {}, data)
    }
}

impl Device for QueueDevice<'_> {
    fn read(&mut self, lba: u64, count: u64) -> Result<Vec<u8>> {
        self.q.read(self.e.nsid, lba, count, self.e.block_size)
    }
    fn write(&mut self, lba: u64, count: u64, data: &[u8], fua: bool) -> Result<()> {
        self.run(lba, count, IoOp::Write(fua), Some(data))
    }
    fn flush(&mut self) -> Result<()> {
        self.run(0, 1, IoOp::Flush, None)
    }
    fn trim(&mut self, lba: u64, count: u64) -> Result<()> {
        self.run(lba, count, IoOp::Deallocate, None)
    }
    fn write_zeroes(&mut self, lba: u64, count: u64, deallocate: bool) -> Result<()> {
        self.run(lba, count, IoOp::WriteZeroes(deallocate), None)
    }
}

/// Shared state of a server.
#[derive(Debug)]
pub struct Server {
    ctrl: Mutex<HostController>,
    export: Export,
    qids: Mutex<Vec<u16>>,
    depth: u16,
    buf_size: usize,
}

impl Server {
    /// A server for namespace `nsid` of `ctrl`; at most `queues` clients at once, each with
    /// an I/O queue of `depth` commands.
    pub fn new(mut ctrl: HostController, nsid: u32, queues: u16, depth: u16) -> Result<Arc<Self>> {
        let (block_size, blocks) = ctrl.geometry(nsid)?;
        let granted = ctrl.set_io_queues(queues.max(1))?;
        let buf_size = ctrl.max_transfer() as usize;
        Ok(Arc::new(Self {
            ctrl: Mutex::new(ctrl),
            export: Export {
                nsid,
                block_size,
                blocks,
            },
            qids: Mutex::new((1..=granted).rev().collect()),
            depth,
            buf_size,
        }))
    }

    /// The export.
    pub fn export(&self) -> Export {
        self.export
    }

    /// Accepts clients until `stop` is set (checked between connections and every 100 ms).
    pub fn serve(self: &Arc<Self>, listener: TcpListener, stop: &AtomicBool) -> Result<()> {
        listener.set_nonblocking(true)?;
        std::thread::scope(|s| {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((sock, peer)) => {
                        let me = self.clone();
                        s.spawn(move || {
                            if let Err(e) = me.client(sock) {
                                eprintln!("keelctl host nbd: client {peer}: {e:#}");
                            }
                        });
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(std::time::Duration::from_millis(20));
                    }
                    Err(e) => return Err(e).context("accept"),
                }
            }
            Ok(())
        })
    }

    /// Shuts the controller down (CC.SHN) once no client is connected.
    pub fn shutdown(self: Arc<Self>) -> Result<()> {
        match Arc::try_unwrap(self) {
            Ok(s) => s
                .ctrl
                .into_inner()
                .map_err(|_| anyhow::anyhow!("controller lock poisoned"))?
                .shutdown(),
            Err(_) => bail!("clients still connected"),
        }
    }

    fn client(&self, sock: TcpStream) -> Result<()> {
        sock.set_nonblocking(false)?;
        sock.set_nodelay(true)?;
        let mut r = BufReader::new(sock.try_clone()?);
        let mut w = BufWriter::new(sock);
        if !handshake(&self.export, &mut r, &mut w)? {
            return Ok(());
        }
        let qid = self
            .qids
            .lock()
            .map_err(|_| anyhow::anyhow!("lock poisoned"))?
            .pop()
            .context("no free I/O queue for another client")?;
        let q = self
            .ctrl
            .lock()
            .map_err(|_| anyhow::anyhow!("lock poisoned"))?
            .create_io_queue(qid, self.depth, self.buf_size);
        let mut q = match q {
            Ok(q) => q,
            Err(e) => {
                self.qids
                    .lock()
                    .map_err(|_| anyhow::anyhow!("lock poisoned"))?
                    .push(qid);
                return Err(e);
            }
        };
        let mut dev = QueueDevice {
            q: &mut q,
            e: self.export,
        };
        let r2 = transmission(&self.export, &mut r, &mut w, &mut dev);
        let d = self
            .ctrl
            .lock()
            .map_err(|_| anyhow::anyhow!("lock poisoned"))?
            .delete_io_queue(q);
        self.qids
            .lock()
            .map_err(|_| anyhow::anyhow!("lock poisoned"))?
            .push(qid);
        r2.and(d)
    }
}

fn option_reply(w: &mut impl Write, opt: u32, ty: u32, data: &[u8]) -> Result<()> {
    w.write_all(&REPLY_MAGIC.to_be_bytes())?;
    w.write_all(&opt.to_be_bytes())?;
    w.write_all(&ty.to_be_bytes())?;
    w.write_all(&(data.len() as u32).to_be_bytes())?;
    w.write_all(data)?;
    Ok(())
}

/// The fixed newstyle handshake for `export`: the server's greeting, then the client's
/// options until one enters transmission (returns true) or the client aborts (false).
pub fn handshake(export: &Export, r: &mut impl Read, w: &mut impl Write) -> Result<bool> {
    w.write_all(&NBDMAGIC.to_be_bytes())?;
    w.write_all(&IHAVEOPT.to_be_bytes())?;
    w.write_all(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes())?;
    w.flush()?;
    let mut b4 = [0u8; 4];
    r.read_exact(&mut b4)?;
    let cflags = u32::from_be_bytes(b4);
    loop {
        let mut h = [0u8; 16];
        r.read_exact(&mut h)?;
        let magic = u64::from_be_bytes(h[..8].try_into()?);
        let opt = u32::from_be_bytes(h[8..12].try_into()?);
        let len = u32::from_be_bytes(h[12..16].try_into()?);
        if magic != IHAVEOPT {
            bail!("bad option magic {magic:#x}");
        }
        if len > 64 << 10 {
            bail!("option {opt} of {len} bytes");
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data)?;
        match opt {
            OPT_EXPORT_NAME => {
                w.write_all(&export.bytes().to_be_bytes())?;
                w.write_all(&TRANSMISSION_FLAGS.to_be_bytes())?;
                if cflags & C_NO_ZEROES == 0 {
                    w.write_all(&[0u8; 124])?;
                }
                w.flush()?;
                return Ok(true);
            }
            OPT_ABORT => {
                option_reply(w, opt, REP_ACK, &[])?;
                w.flush()?;
                return Ok(false);
            }
            OPT_LIST => {
                let name = b"";
                let mut d = (name.len() as u32).to_be_bytes().to_vec();
                d.extend_from_slice(name);
                option_reply(w, opt, REP_SERVER, &d)?;
                option_reply(w, opt, REP_ACK, &[])?;
            }
            OPT_INFO | OPT_GO => {
                // name length, name, number of requests, requests.
                let ok = data.len() >= 6 && {
                    let n = u32::from_be_bytes(data[..4].try_into()?) as usize;
                    data.len() >= 4 + n + 2
                        && data.len()
                            == 4 + n
                                + 2
                                + 2 * u16::from_be_bytes(data[4 + n..6 + n].try_into()?) as usize
                };
                if !ok {
                    option_reply(w, opt, REP_ERR_INVALID, &[])?;
                    w.flush()?;
                    continue;
                }
                option_reply(w, opt, REP_INFO, &export.info())?;
                let bs = export.block_size;
                let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                d.extend_from_slice(&bs.to_be_bytes());
                d.extend_from_slice(&bs.max(4096).to_be_bytes());
                d.extend_from_slice(&MAX_REQUEST.to_be_bytes());
                option_reply(w, opt, REP_INFO, &d)?;
                option_reply(w, opt, REP_ACK, &[])?;
                w.flush()?;
                if opt == OPT_GO {
                    return Ok(true);
                }
            }
            _ => option_reply(w, opt, REP_ERR_UNSUP, &[])?,
        }
        w.flush()?;
    }
}

fn reply(w: &mut impl Write, err: u32, handle: u64, data: Option<&[u8]>) -> Result<()> {
    w.write_all(&SIMPLE_REPLY_MAGIC.to_be_bytes())?;
    w.write_all(&err.to_be_bytes())?;
    w.write_all(&handle.to_be_bytes())?;
    if let Some(d) = data {
        w.write_all(d)?;
    }
    w.flush()?;
    Ok(())
}

/// The transmission phase: requests until `NBD_CMD_DISC` or the end of the stream, each
/// answered with a simple reply; `dev` is only reached for requests inside the export.
pub fn transmission(
    export: &Export,
    r: &mut impl Read,
    w: &mut impl Write,
    dev: &mut dyn Device,
) -> Result<()> {
    let e = *export;
    let bs = e.block_size as u64;
    let mut payload = Vec::new();
    loop {
        let mut h = [0u8; 28];
        match r.read_exact(&mut h) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(err) => return Err(err.into()),
        }
        let magic = u32::from_be_bytes(h[..4].try_into()?);
        let flags = u16::from_be_bytes(h[4..6].try_into()?);
        let ty = u16::from_be_bytes(h[6..8].try_into()?);
        let handle = u64::from_be_bytes(h[8..16].try_into()?);
        let off = u64::from_be_bytes(h[16..24].try_into()?);
        let len = u32::from_be_bytes(h[24..28].try_into()?);
        if magic != REQUEST_MAGIC {
            bail!("bad request magic {magic:#x}");
        }
        if ty == CMD_WRITE {
            if len > MAX_REQUEST {
                bail!("write of {len} bytes");
            }
            payload.resize(len as usize, 0);
            r.read_exact(&mut payload)?;
        }
        if ty == CMD_DISC {
            return Ok(());
        }
        let in_range = off
            .checked_add(len as u64)
            .is_some_and(|end| end <= e.bytes());
        let aligned = off.is_multiple_of(bs) && (len as u64).is_multiple_of(bs);
        let lba = off / bs;
        let count = len as u64 / bs;
        let err = match ty {
            CMD_READ | CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES if !in_range => {
                if ty == CMD_WRITE || ty == CMD_WRITE_ZEROES {
                    ENOSPC
                } else {
                    EINVAL
                }
            }
            CMD_READ | CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES if !aligned => EINVAL,
            CMD_READ if len > MAX_REQUEST => EINVAL,
            _ => 0,
        };
        if err != 0 {
            reply(w, err, handle, None)?;
            continue;
        }
        let res = match ty {
            CMD_READ => match dev.read(lba, count) {
                Ok(d) => {
                    reply(w, 0, handle, Some(&d))?;
                    continue;
                }
                Err(e) => Err(e),
            },
            CMD_WRITE => dev.write(lba, count, &payload, flags & CMD_FLAG_FUA != 0),
            CMD_FLUSH => dev.flush(),
            CMD_TRIM => dev.trim(lba, count),
            CMD_WRITE_ZEROES => dev.write_zeroes(lba, count, flags & CMD_FLAG_NO_HOLE == 0),
            _ => {
                reply(w, ENOTSUP, handle, None)?;
                continue;
            }
        };
        let status = if res.is_ok() { 0 } else { EIO };
        reply(w, status, handle, None)?;
    }
}
