//! The NBD server's protocol (`keelctl host nbd`, sans-IO `host::nbd::proto`) driven from
//! bytes: a client's handshake options, then transmission requests, over a shadow disk.
//!
//! Input: one configuration byte (bit 0: 4096-byte blocks, else 512; bit 1: the export offers
//! no optional command), then the client's bytes. Invariants besides "no panic": the greeting
//! is the fixed newstyle one; every request the server decides to serve is in range, block
//! aligned and exactly what the header asked (so the device is only asked for blocks it
//! has, and a write's payload is its length); a refusal carries a non-zero errno and the
//! reply header echoes the handle; a command the export does not offer is refused.

use keel_host_tools::host::nbd::proto::{
    Command, Export, NBDMAGIC, Negotiation, Outcome, REPLY_LEN, REQUEST_LEN, RequestHeader,
    SIMPLE_REPLY_MAGIC, simple_reply,
};

const BLOCKS: u64 = 64;

pub fn run(data: &[u8]) {
    let Some((&cfg, mut input)) = data.split_first() else {
        return;
    };
    let bs: u32 = if cfg & 1 != 0 { 4096 } else { 512 };
    let export = Export {
        size: BLOCKS * bs as u64,
        block_size: bs,
        max_payload: 32 << 20,
        flags: if cfg & 2 != 0 { 0 } else { Export::ALL_FLAGS },
    };
    let mut disk = vec![0u8; (BLOCKS * bs as u64) as usize];
    let (mut neg, greeting) = Negotiation::new(export);
    assert_eq!(greeting[..8], NBDMAGIC.to_be_bytes(), "greeting");
    // Handshake.
    let mut out = Vec::new();
    loop {
        match neg.input(input, &mut out) {
            Err(_) => return,
            Ok((used, outcome)) => {
                assert!(used <= input.len(), "consumed more than given");
                input = &input[used..];
                match outcome {
                    Outcome::Transmission => break,
                    Outcome::Abort => return,
                    Outcome::Pending if used == 0 => return,
                    Outcome::Pending => {}
                }
            }
        }
    }
    // Transmission.
    let b = bs as u64;
    while let Ok(Some(h)) = RequestHeader::parse(input) {
        input = &input[REQUEST_LEN..];
        let payload = h.payload() as usize;
        let body = &input[..payload.min(input.len())];
        input = &input[body.len()..];
        let span = |lba: u64, blocks: u64| {
            assert!(blocks > 0 && lba + blocks <= BLOCKS, "{h:?}: out of range");
            assert_eq!((lba * b, blocks * b), (h.offset, h.length as u64), "{h:?}");
            (lba * b) as usize..((lba + blocks) * b) as usize
        };
        let errno = match Command::classify(&h, &export) {
            Command::Read { lba, blocks } => {
                let r = span(lba, blocks);
                assert_eq!(disk[r].len(), h.length as usize);
                0
            }
            Command::Write { lba, blocks, .. } => {
                let r = span(lba, blocks);
                assert_eq!(payload, r.len(), "{h:?}: payload");
                if body.len() < payload {
                    return; // the client went away mid-payload
                }
                disk[r].copy_from_slice(body);
                0
            }
            Command::Trim { lba, blocks } | Command::WriteZeroes { lba, blocks, .. } => {
                assert!(export.flags != 0, "{h:?}: not offered");
                let r = span(lba, blocks);
                disk[r].fill(0);
                0
            }
            Command::Flush => {
                assert!(export.flags != 0, "{h:?}: not offered");
                0
            }
            Command::Nothing => 0,
            Command::Disconnect => return,
            Command::Refuse { errno } => {
                assert_ne!(errno, 0, "{h:?}: a refusal without errno");
                errno
            }
        };
        let reply = simple_reply(errno, h.handle);
        assert_eq!(reply.len(), REPLY_LEN);
        assert_eq!(reply[..4], SIMPLE_REPLY_MAGIC.to_be_bytes());
        assert_eq!(reply[4..8], errno.to_be_bytes());
        assert_eq!(reply[8..16], h.handle.to_be_bytes());
    }
}
