//! The NBD protocol, sans-IO (NetworkBlockDevice `doc/proto.md`): bytes in, bytes and
//! decisions out. Nothing here reads a socket, so it is tested (and fuzzed) on byte strings.
//!
//! - [`Negotiation`]: the fixed newstyle handshake (server side): `NBD_OPT_EXPORT_NAME`,
//!   `NBD_OPT_ABORT`, `NBD_OPT_LIST`, `NBD_OPT_INFO`, `NBD_OPT_GO` (with `NBD_INFO_EXPORT` and
//!   `NBD_INFO_BLOCK_SIZE`); every other option gets `NBD_REP_ERR_UNSUP` (structured
//!   replies are not offered, so replies are simple replies).
//! - [`RequestHeader::parse`]: one 28-byte transmission request; [`Command::classify`] checks
//!   it against the export (range, alignment, payload size, flags) and says what to do,
//!   including the errno of a request that must be refused and how many payload bytes to
//!   skip with it.
//! - [`simple_reply`]: the 16-byte reply header (replies may go out in any order; the
//!   client matches them by handle).

use std::fmt;

/// `NBDMAGIC`.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// Option reply magic.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Transmission request magic.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Simple reply magic.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Size of a transmission request header.
pub const REQUEST_LEN: usize = 28;
/// Size of a simple reply header.
pub const REPLY_LEN: usize = 16;
/// Largest option payload accepted (a 4 KiB name plus room for info requests).
pub const MAX_OPTION: u32 = 8 << 10;

/// Handshake flags.
pub mod handshake {
    /// `NBD_FLAG_FIXED_NEWSTYLE`.
    pub const FIXED_NEWSTYLE: u16 = 1 << 0;
    /// `NBD_FLAG_NO_ZEROES`.
    pub const NO_ZEROES: u16 = 1 << 1;
    /// `NBD_FLAG_C_FIXED_NEWSTYLE`.
    pub const C_FIXED_NEWSTYLE: u32 = 1 << 0;
    /// `NBD_FLAG_C_NO_ZEROES`.
    pub const C_NO_ZEROES: u32 = 1 << 1;
}

/// Option types.
pub mod opt {
    /// `NBD_OPT_EXPORT_NAME`.
    pub const EXPORT_NAME: u32 = 1;
    /// `NBD_OPT_ABORT`.
    pub const ABORT: u32 = 2;
    /// `NBD_OPT_LIST`.
    pub const LIST: u32 = 3;
    /// `NBD_OPT_INFO`.
    pub const INFO: u32 = 6;
    /// `NBD_OPT_GO`.
    pub const GO: u32 = 7;
}

/// Option reply types.
pub mod rep {
    /// `NBD_REP_ACK`.
    pub const ACK: u32 = 1;
    /// `NBD_REP_SERVER`.
    pub const SERVER: u32 = 2;
    /// `NBD_REP_INFO`.
    pub const INFO: u32 = 3;
    /// `NBD_REP_ERR_UNSUP`.
    pub const ERR_UNSUP: u32 = 0x8000_0001;
    /// `NBD_REP_ERR_INVALID`.
    pub const ERR_INVALID: u32 = 0x8000_0003;
}

/// `NBD_INFO_*` types.
pub mod info {
    /// `NBD_INFO_EXPORT`.
    pub const EXPORT: u16 = 0;
    /// `NBD_INFO_BLOCK_SIZE`.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Transmission flags.
pub mod tf {
    /// `NBD_FLAG_HAS_FLAGS`.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// `NBD_FLAG_SEND_FLUSH`.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// `NBD_FLAG_SEND_FUA`.
    pub const SEND_FUA: u16 = 1 << 3;
    /// `NBD_FLAG_SEND_TRIM`.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// `NBD_FLAG_SEND_WRITE_ZEROES`.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// `NBD_FLAG_CAN_MULTI_CONN`.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
}

/// Commands.
pub mod cmd {
    /// `NBD_CMD_READ`.
    pub const READ: u16 = 0;
    /// `NBD_CMD_WRITE`.
    pub const WRITE: u16 = 1;
    /// `NBD_CMD_DISC`.
    pub const DISC: u16 = 2;
    /// `NBD_CMD_FLUSH`.
    pub const FLUSH: u16 = 3;
    /// `NBD_CMD_TRIM`.
    pub const TRIM: u16 = 4;
    /// `NBD_CMD_WRITE_ZEROES`.
    pub const WRITE_ZEROES: u16 = 6;
    /// `NBD_CMD_FLAG_FUA`.
    pub const FLAG_FUA: u16 = 1 << 0;
    /// `NBD_CMD_FLAG_NO_HOLE`.
    pub const FLAG_NO_HOLE: u16 = 1 << 1;
}

/// Error values of replies.
pub mod errno {
    /// `NBD_EIO`.
    pub const EIO: u32 = 5;
    /// `NBD_EINVAL`.
    pub const EINVAL: u32 = 22;
    /// `NBD_ENOSPC`.
    pub const ENOSPC: u32 = 28;
}

/// What is exported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Export {
    /// Size in bytes.
    pub size: u64,
    /// Logical block size: offsets and lengths must be multiples of it.
    pub block_size: u32,
    /// Largest READ or WRITE payload served.
    pub max_payload: u32,
    /// Transmission flags ([`tf`]); commands whose flag is missing are refused.
    pub flags: u16,
}

impl Export {
    /// Every transmission flag this server can offer: flush, FUA, trim, write zeroes, and
    /// multi-connection (every connection reaches the same controller, and a Flush there
    /// covers every write the controller completed).
    pub const ALL_FLAGS: u16 = tf::HAS_FLAGS
        | tf::SEND_FLUSH
        | tf::SEND_FUA
        | tf::SEND_TRIM
        | tf::SEND_WRITE_ZEROES
        | tf::CAN_MULTI_CONN;

    /// Transmission flags.
    pub fn transmission_flags(&self) -> u16 {
        self.flags | tf::HAS_FLAGS
    }
}

/// A protocol violation after which the connection is dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtoError {
    /// Client flags with bits we did not offer.
    ClientFlags(u32),
    /// An option header without `IHAVEOPT`.
    OptionMagic(u64),
    /// An option longer than [`MAX_OPTION`].
    OptionTooLong(u32),
    /// A request header without the request magic.
    RequestMagic(u32),
}

impl fmt::Display for ProtoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ClientFlags(x) => write!(f, "client flags {x:#x} include bits not offered"),
            Self::OptionMagic(m) => write!(f, "option header magic {m:#x}"),
            Self::OptionTooLong(n) => write!(f, "option of {n} bytes"),
            Self::RequestMagic(m) => write!(f, "request magic {m:#x}"),
        }
    }
}

impl std::error::Error for ProtoError {}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    (be32(b, at) as u64) << 32 | be32(b, at + 4) as u64
}

/// How a handshake ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// More input is needed.
    Pending,
    /// The client chose the export: transmission starts after what was consumed.
    Transmission,
    /// The client aborted (reply sent); close after the output is written.
    Abort,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    ClientFlags,
    Options,
    Done,
}

/// The server side of the fixed newstyle handshake.
#[derive(Debug, Clone)]
pub struct Negotiation {
    export: Export,
    phase: Phase,
    no_zeroes: bool,
}

impl Negotiation {
    /// Starts a handshake; returns it and the server's greeting.
    pub fn new(export: Export) -> (Self, Vec<u8>) {
        let mut g = Vec::with_capacity(18);
        g.extend_from_slice(&NBDMAGIC.to_be_bytes());
        g.extend_from_slice(&IHAVEOPT.to_be_bytes());
        g.extend_from_slice(&(handshake::FIXED_NEWSTYLE | handshake::NO_ZEROES).to_be_bytes());
        (
            Self {
                export,
                phase: Phase::ClientFlags,
                no_zeroes: false,
            },
            g,
        )
    }

    fn option_reply(out: &mut Vec<u8>, opt: u32, ty: u32, data: &[u8]) {
        out.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
        out.extend_from_slice(&opt.to_be_bytes());
        out.extend_from_slice(&ty.to_be_bytes());
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(data);
    }

    /// Consumes what it can of `input`, appending replies to `out`. Returns the bytes
    /// consumed and the outcome; after [`Outcome::Transmission`] the rest of `input` (if any)
    /// is transmission requests.
    pub fn input(
        &mut self,
        input: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(usize, Outcome), ProtoError> {
        let mut used = 0;
        loop {
            let rest = &input[used..];
            match self.phase {
                Phase::Done => return Ok((used, Outcome::Transmission)),
                Phase::ClientFlags => {
                    if rest.len() < 4 {
                        return Ok((used, Outcome::Pending));
                    }
                    let f = be32(rest, 0);
                    if f & !(handshake::C_FIXED_NEWSTYLE | handshake::C_NO_ZEROES) != 0 {
                        return Err(ProtoError::ClientFlags(f));
                    }
                    self.no_zeroes = f & handshake::C_NO_ZEROES != 0;
                    self.phase = Phase::Options;
                    used += 4;
                }
                Phase::Options => {
                    if rest.len() < 16 {
                        return Ok((used, Outcome::Pending));
                    }
                    let magic = be64(rest, 0);
                    let option = be32(rest, 8);
                    let len = be32(rest, 12);
                    if magic != IHAVEOPT {
                        return Err(ProtoError::OptionMagic(magic));
                    }
                    if len > MAX_OPTION {
                        return Err(ProtoError::OptionTooLong(len));
                    }
                    if rest.len() < 16 + len as usize {
                        return Ok((used, Outcome::Pending));
                    }
                    let data = &rest[16..16 + len as usize];
                    used += 16 + len as usize;
                    match self.option(option, data, out) {
                        Outcome::Pending => {}
                        o => return Ok((used, o)),
                    }
                }
            }
        }
    }

    fn option(&mut self, option: u32, data: &[u8], out: &mut Vec<u8>) -> Outcome {
        let e = self.export;
        match option {
            opt::EXPORT_NAME => {
                // Every name is this one export.
                out.extend_from_slice(&e.size.to_be_bytes());
                out.extend_from_slice(&e.transmission_flags().to_be_bytes());
                if !self.no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                self.phase = Phase::Done;
                Outcome::Transmission
            }
            opt::ABORT => {
                Self::option_reply(out, option, rep::ACK, &[]);
                Outcome::Abort
            }
            opt::LIST => {
                if data.is_empty() {
                    Self::option_reply(out, option, rep::SERVER, &0u32.to_be_bytes());
                    Self::option_reply(out, option, rep::ACK, &[]);
                } else {
                    Self::option_reply(out, option, rep::ERR_INVALID, &[]);
                }
                Outcome::Pending
            }
            opt::INFO | opt::GO => {
                // Data: u32 name length, name, u16 number of info requests, the requests.
                let ok = data.len() >= 6 && {
                    let n = be32(data, 0) as usize;
                    n.checked_add(6).is_some_and(|end| data.len() >= end)
                        && data.len() == 6 + n + 2 * be16(data, 4 + n) as usize
                };
                if !ok {
                    Self::option_reply(out, option, rep::ERR_INVALID, &[]);
                    return Outcome::Pending;
                }
                let mut d = Vec::with_capacity(12);
                d.extend_from_slice(&info::EXPORT.to_be_bytes());
                d.extend_from_slice(&e.size.to_be_bytes());
                d.extend_from_slice(&e.transmission_flags().to_be_bytes());
                Self::option_reply(out, option, rep::INFO, &d);
                let mut d = Vec::with_capacity(14);
                d.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
                d.extend_from_slice(&e.block_size.to_be_bytes());
                d.extend_from_slice(&e.block_size.max(4096).to_be_bytes());
                d.extend_from_slice(&e.max_payload.to_be_bytes());
                Self::option_reply(out, option, rep::INFO, &d);
                Self::option_reply(out, option, rep::ACK, &[]);
                if option == opt::GO {
                    self.phase = Phase::Done;
                    Outcome::Transmission
                } else {
                    Outcome::Pending
                }
            }
            _ => {
                Self::option_reply(out, option, rep::ERR_UNSUP, &[]);
                Outcome::Pending
            }
        }
    }
}

/// A transmission request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// Command flags.
    pub flags: u16,
    /// Command type.
    pub ty: u16,
    /// The client's handle, echoed in the reply.
    pub handle: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub length: u32,
}

impl RequestHeader {
    /// Parses the header at the start of `input`: `Ok(None)` when fewer than 28 bytes are
    /// there.
    pub fn parse(input: &[u8]) -> Result<Option<Self>, ProtoError> {
        if input.len() < REQUEST_LEN {
            return Ok(None);
        }
        let magic = be32(input, 0);
        if magic != REQUEST_MAGIC {
            return Err(ProtoError::RequestMagic(magic));
        }
        Ok(Some(Self {
            flags: be16(input, 4),
            ty: be16(input, 6),
            handle: be64(input, 8),
            offset: be64(input, 16),
            length: be32(input, 24),
        }))
    }

    /// Payload bytes that follow the header on the wire (a write's data).
    pub fn payload(&self) -> u32 {
        if self.ty == cmd::WRITE {
            self.length
        } else {
            0
        }
    }
}

/// What to do with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Read `blocks` blocks at `lba`; the reply carries the data.
    Read {
        /// First block.
        lba: u64,
        /// Blocks.
        blocks: u64,
    },
    /// Write the payload's `blocks` blocks at `lba`.
    Write {
        /// First block.
        lba: u64,
        /// Blocks.
        blocks: u64,
        /// Force unit access.
        fua: bool,
    },
    /// Flush.
    Flush,
    /// Deallocate.
    Trim {
        /// First block.
        lba: u64,
        /// Blocks.
        blocks: u64,
    },
    /// Write zeroes.
    WriteZeroes {
        /// First block.
        lba: u64,
        /// Blocks.
        blocks: u64,
        /// The blocks may be deallocated (no `NBD_CMD_FLAG_NO_HOLE`).
        may_trim: bool,
        /// Force unit access.
        fua: bool,
    },
    /// Nothing to do (a zero-length request): reply success.
    Nothing,
    /// The client is leaving: no reply.
    Disconnect,
    /// Refuse with `errno`, after skipping the request's payload.
    Refuse {
        /// The reply's error.
        errno: u32,
    },
}

impl Command {
    /// Decides what `h` asks of `export`.
    pub fn classify(h: &RequestHeader, export: &Export) -> Command {
        let bs = export.block_size.max(1) as u64;
        let (off, len) = (h.offset, h.length as u64);
        let offered = |f: u16| export.flags & f != 0;
        let fua = if offered(tf::SEND_FUA) {
            cmd::FLAG_FUA
        } else {
            0
        };
        let known_flags = match h.ty {
            cmd::WRITE => fua,
            cmd::WRITE_ZEROES => fua | cmd::FLAG_NO_HOLE,
            _ => 0,
        };
        let refuse = |errno| Command::Refuse { errno };
        match h.ty {
            cmd::DISC => return Command::Disconnect,
            cmd::FLUSH if h.flags == 0 && offered(tf::SEND_FLUSH) => return Command::Flush,
            cmd::TRIM if !offered(tf::SEND_TRIM) => return refuse(errno::EINVAL),
            cmd::WRITE_ZEROES if !offered(tf::SEND_WRITE_ZEROES) => return refuse(errno::EINVAL),
            cmd::READ | cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES => {}
            _ => return refuse(errno::EINVAL),
        }
        if h.flags & !known_flags != 0 {
            return refuse(errno::EINVAL);
        }
        let writes = matches!(h.ty, cmd::WRITE | cmd::WRITE_ZEROES);
        if off.checked_add(len).is_none_or(|end| end > export.size) {
            return refuse(if writes { errno::ENOSPC } else { errno::EINVAL });
        }
        if !off.is_multiple_of(bs) || !len.is_multiple_of(bs) {
            return refuse(errno::EINVAL);
        }
        if matches!(h.ty, cmd::READ | cmd::WRITE) && h.length > export.max_payload {
            return refuse(errno::EINVAL);
        }
        if len == 0 {
            return Command::Nothing;
        }
        let (lba, blocks) = (off / bs, len / bs);
        let fua = h.flags & cmd::FLAG_FUA != 0;
        match h.ty {
            cmd::READ => Command::Read { lba, blocks },
            cmd::WRITE => Command::Write { lba, blocks, fua },
            cmd::TRIM => Command::Trim { lba, blocks },
            _ => Command::WriteZeroes {
                lba,
                blocks,
                may_trim: h.flags & cmd::FLAG_NO_HOLE == 0,
                fua,
            },
        }
    }
}

/// A simple reply header.
pub fn simple_reply(error: u32, handle: u64) -> [u8; REPLY_LEN] {
    let mut r = [0u8; REPLY_LEN];
    r[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    r[4..8].copy_from_slice(&error.to_be_bytes());
    r[8..].copy_from_slice(&handle.to_be_bytes());
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    const E: Export = Export {
        size: 16 << 20,
        block_size: 512,
        max_payload: 1 << 20,
        flags: Export::ALL_FLAGS,
    };

    fn option(o: u32, data: &[u8]) -> Vec<u8> {
        let mut v = IHAVEOPT.to_be_bytes().to_vec();
        v.extend_from_slice(&o.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn greeting_and_go_byte_for_byte() {
        // proto.md "Fixed newstyle negotiation": "NBDMAGIC", "IHAVEOPT", handshake flags.
        let (mut n, g) = Negotiation::new(E);
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(&g[16..], &[0, 3]);
        // Client flags (fixed newstyle + no zeroes), then NBD_OPT_GO for "" with no info
        // requests, fed one byte at a time.
        let mut input = 3u32.to_be_bytes().to_vec();
        input.extend(option(opt::GO, &[0, 0, 0, 0, 0, 0]));
        input.extend_from_slice(&[0x25, 0x60]);
        let mut out = Vec::new();
        let mut used = 0;
        let mut outcome = Outcome::Pending;
        for end in 1..=input.len() {
            let (u, o) = n.input(&input[used..end], &mut out).unwrap();
            used += u;
            outcome = o;
            if o != Outcome::Pending {
                break;
            }
        }
        assert_eq!(outcome, Outcome::Transmission);
        assert_eq!(used, 4 + 16 + 6, "the request bytes after GO are left");
        // NBD_REP_INFO (3) NBD_INFO_EXPORT: size, flags HAS_FLAGS|FLUSH|FUA|TRIM|WZ|MULTI_CONN.
        let mut want = REPLY_MAGIC.to_be_bytes().to_vec();
        want.extend_from_slice(&[0, 0, 0, 7, 0, 0, 0, 3, 0, 0, 0, 12, 0, 0]);
        want.extend_from_slice(&(16u64 << 20).to_be_bytes());
        want.extend_from_slice(&[0x01, 0x6d]);
        assert_eq!(&out[..want.len()], &want[..]);
        // NBD_INFO_BLOCK_SIZE: min 512, preferred 4096, max payload 1 MiB; then NBD_REP_ACK.
        let bsz = &out[want.len()..];
        assert_eq!(&bsz[8..20], &[0, 0, 0, 7, 0, 0, 0, 3, 0, 0, 0, 14]);
        assert_eq!(&bsz[20..22], &[0, 3]);
        assert_eq!(&bsz[22..34], &[0, 0, 2, 0, 0, 0, 0x10, 0, 0, 0x10, 0, 0]);
        assert_eq!(&bsz[34 + 8..34 + 20], &[0, 0, 0, 7, 0, 0, 0, 1, 0, 0, 0, 0]);
        assert_eq!(bsz.len(), 34 + 20);
    }

    #[test]
    fn export_name_list_abort_and_unknown_options() {
        let (mut n, _) = Negotiation::new(E);
        let mut input = 1u32.to_be_bytes().to_vec(); // fixed newstyle, zeroes wanted
        input.extend(option(opt::LIST, &[]));
        input.extend(option(8, &[])); // NBD_OPT_STRUCTURED_REPLY: not offered
        input.extend(option(opt::INFO, &[0, 0, 0, 9])); // malformed
        input.extend(option(opt::EXPORT_NAME, b"anything"));
        let mut out = Vec::new();
        let (used, o) = n.input(&input, &mut out).unwrap();
        assert_eq!((used, o), (input.len(), Outcome::Transmission));
        // NBD_REP_SERVER carries a 4-byte name length (the empty name): 24 bytes.
        let types: Vec<u32> = [0, 24, 44, 64]
            .iter()
            .map(|&at| be32(&out, at + 12))
            .collect();
        assert_eq!(
            types,
            vec![rep::SERVER, rep::ACK, rep::ERR_UNSUP, rep::ERR_INVALID]
        );
        // EXPORT_NAME: size, flags, 124 zeroes.
        let tail = &out[out.len() - 134..];
        assert_eq!(be64(tail, 0), 16 << 20);
        assert!(tail[10..].iter().all(|&b| b == 0));
        let (mut n, _) = Negotiation::new(E);
        let mut input = 3u32.to_be_bytes().to_vec();
        input.extend(option(opt::ABORT, &[]));
        let mut out = Vec::new();
        assert_eq!(n.input(&input, &mut out).unwrap().1, Outcome::Abort);
        assert_eq!(be32(&out, 12), rep::ACK);
        // Protocol violations end the connection.
        let (mut n, _) = Negotiation::new(E);
        assert_eq!(
            n.input(&4u32.to_be_bytes(), &mut out),
            Err(ProtoError::ClientFlags(4))
        );
        let (mut n, _) = Negotiation::new(E);
        let mut bad = 1u32.to_be_bytes().to_vec();
        bad.extend(option(opt::LIST, &[]));
        bad[4] ^= 1;
        assert!(matches!(
            n.input(&bad, &mut out),
            Err(ProtoError::OptionMagic(_))
        ));
        let (mut n, _) = Negotiation::new(E);
        let mut big = 1u32.to_be_bytes().to_vec();
        big.extend_from_slice(&IHAVEOPT.to_be_bytes());
        big.extend_from_slice(&[0, 0, 0, 1, 0x7f, 0xff, 0xff, 0xff]);
        assert_eq!(
            n.input(&big, &mut out),
            Err(ProtoError::OptionTooLong(0x7fff_ffff))
        );
    }

    fn req(ty: u16, flags: u16, off: u64, len: u32) -> RequestHeader {
        let mut b = REQUEST_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&ty.to_be_bytes());
        b.extend_from_slice(&0x1122_3344_5566_7788u64.to_be_bytes());
        b.extend_from_slice(&off.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        RequestHeader::parse(&b).unwrap().unwrap()
    }

    #[test]
    fn requests_are_classified_against_the_export() {
        let h = req(cmd::WRITE, cmd::FLAG_FUA, 4096, 8192);
        assert_eq!((h.handle, h.payload()), (0x1122_3344_5566_7788, 8192));
        assert_eq!(
            Command::classify(&h, &E),
            Command::Write {
                lba: 8,
                blocks: 16,
                fua: true
            }
        );
        use Command::*;
        let c = |ty, flags, off, len| Command::classify(&req(ty, flags, off, len), &E);
        assert_eq!(c(cmd::READ, 0, 0, 512), Read { lba: 0, blocks: 1 });
        assert_eq!(c(cmd::READ, 0, 0, 0), Nothing);
        assert_eq!(c(cmd::FLUSH, 0, 0, 0), Flush);
        assert_eq!(c(cmd::DISC, 0, 0, 0), Disconnect);
        assert_eq!(
            c(cmd::TRIM, 0, 1 << 20, 16 << 20 >> 1),
            Trim {
                lba: 2048,
                blocks: 16384
            }
        );
        assert_eq!(
            c(cmd::WRITE_ZEROES, cmd::FLAG_NO_HOLE, 512, 1024),
            WriteZeroes {
                lba: 1,
                blocks: 2,
                may_trim: false,
                fua: false
            }
        );
        let einval = Refuse {
            errno: errno::EINVAL,
        };
        let enospc = Refuse {
            errno: errno::ENOSPC,
        };
        assert_eq!(c(cmd::READ, 0, 16 << 20, 512), einval, "past the end");
        assert_eq!(c(cmd::WRITE, 0, (16 << 20) - 512, 1024), enospc);
        assert_eq!(c(cmd::WRITE_ZEROES, 0, u64::MAX - 10, 512), enospc);
        assert_eq!(c(cmd::READ, 0, 100, 512), einval, "misaligned offset");
        assert_eq!(c(cmd::TRIM, 0, 0, 100), einval, "misaligned length");
        assert_eq!(
            c(cmd::READ, 0, 0, (1 << 20) + 512),
            einval,
            "over max payload"
        );
        assert_eq!(
            c(cmd::READ, cmd::FLAG_FUA, 0, 512),
            einval,
            "flag not offered"
        );
        assert_eq!(c(cmd::FLUSH, cmd::FLAG_FUA, 0, 0), einval);
        assert_eq!(c(5, 0, 0, 512), einval, "NBD_CMD_CACHE not offered");
        assert_eq!(c(99, 0, 0, 0), einval);
        // Without trim and FUA offered: refused.
        let bare = Export {
            flags: tf::SEND_FLUSH,
            ..E
        };
        assert_eq!(bare.transmission_flags(), 0x05);
        let c2 = |ty, flags, len| Command::classify(&req(ty, flags, 0, len), &bare);
        assert_eq!(c2(cmd::TRIM, 0, 512), einval);
        assert_eq!(c2(cmd::WRITE_ZEROES, 0, 512), einval);
        assert_eq!(c2(cmd::WRITE, cmd::FLAG_FUA, 512), einval);
        assert_eq!(c2(cmd::FLUSH, 0, 0), Flush);
        let mut b = [0u8; 28];
        assert_eq!(RequestHeader::parse(&b[..27]), Ok(None));
        b[0] = 1;
        assert!(RequestHeader::parse(&b).is_err());
        assert_eq!(
            simple_reply(22, 7),
            [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22, 0, 0, 0, 0, 0, 0, 0, 7]
        );
    }
}
