//! Hostile NVMe/TCP input against the real image: malformed PDUs get the C2HTermReq the spec
//! prescribes (NVMe/TCP 1.0 §3.6.2.5, fatal error status), floods of idle and half-open
//! connections are bounded, and the target keeps serving other hosts throughout.
//!
//! PDUs are written byte by byte here (not with the crate under test) so these tests check the
//! wire format independently.

use keel_tests::{BOOT_TIMEOUT, Build, Qemu, free_port};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

fn boot() -> (Qemu, u16) {
    let port = free_port();
    let mut q = Qemu::boot(Build::Release, &["--nvmf-port", &port.to_string()]);
    q.wait_for("keel: ready", BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    (q, port)
}

fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// Common header: type, flags, hlen, pdo, plen.
fn ch(ty: u8, flags: u8, hlen: u8, pdo: u8, plen: u32) -> Vec<u8> {
    let mut v = vec![ty, flags, hlen, pdo];
    v.extend_from_slice(&plen.to_le_bytes());
    v
}

fn icreq() -> Vec<u8> {
    let mut v = ch(0x00, 0, 128, 0, 128);
    v.extend_from_slice(&0u16.to_le_bytes()); // PFV
    v.push(0); // HPDA
    v.push(0); // DGST
    v.extend_from_slice(&0u32.to_le_bytes()); // MAXR2T
    v.resize(128, 0);
    v
}

fn read_exact_or_eof(s: &mut TcpStream, n: usize) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).ok()?;
    Some(buf)
}

/// Reads one PDU (common header first, then PLEN).
fn read_pdu(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut pdu = read_exact_or_eof(s, 8)?;
    let plen = u32::from_le_bytes(pdu[4..8].try_into().unwrap()) as usize;
    assert!(
        (8..=1 << 20).contains(&plen),
        "absurd PLEN {plen} from the target: {pdu:?}"
    );
    pdu.extend(read_exact_or_eof(s, plen - 8)?);
    Some(pdu)
}

fn handshake(port: u16) -> TcpStream {
    let mut s = connect(port);
    s.write_all(&icreq()).unwrap();
    let resp = read_pdu(&mut s).expect("ICResp");
    assert_eq!(resp[0], 0x01, "expected ICResp, got {resp:?}");
    assert_eq!(resp.len(), 128);
    s
}

/// Expects a C2HTermReq with this FES (and FEI when given), then the connection closing.
fn expect_termreq(s: &mut TcpStream, fes: u16, fei: Option<u32>) {
    let pdu = read_pdu(s).expect("C2HTermReq");
    assert_eq!(
        pdu[0],
        0x03,
        "expected C2HTermReq, got {:02x?}",
        &pdu[..pdu.len().min(32)]
    );
    assert_eq!(pdu[2], 24, "C2HTermReq HLEN");
    assert_eq!(
        u16::from_le_bytes([pdu[8], pdu[9]]),
        fes,
        "FES; term req {:02x?}",
        &pdu[..pdu.len().min(40)]
    );
    if let Some(fei) = fei {
        assert_eq!(
            u32::from_le_bytes(pdu[10..14].try_into().unwrap()),
            fei,
            "FEI"
        );
    }
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(rest.is_empty(), "data after C2HTermReq: {rest:?}");
}

#[test]
fn malformed_pdus_get_the_prescribed_termination_and_others_keep_being_served() {
    let (q, port) = boot();
    let mut good = handshake(port);

    // Unknown PDU type: Invalid Header Field.
    let mut s = connect(port);
    let mut bad = ch(0x0f, 0, 128, 0, 128);
    bad.resize(128, 0);
    s.write_all(&bad).unwrap();
    expect_termreq(&mut s, 0x01, Some(0));

    // A CapsuleCmd before the ICReq: PDU Sequence Error.
    let mut s = connect(port);
    let mut cmd = ch(0x04, 0, 72, 0, 72);
    cmd.resize(72, 0);
    s.write_all(&cmd).unwrap();
    expect_termreq(&mut s, 0x02, None);

    // A second ICReq: PDU Sequence Error.
    let mut s = handshake(port);
    s.write_all(&icreq()).unwrap();
    expect_termreq(&mut s, 0x02, None);

    // ICReq with a wrong PLEN: Invalid Header Field pointing at PLEN (offset 4).
    let mut s = connect(port);
    let mut ic = icreq();
    ic[4..8].copy_from_slice(&0xffff_ffffu32.to_le_bytes());
    s.write_all(&ic).unwrap();
    expect_termreq(&mut s, 0x01, Some(4));

    // A capsule announcing 4 GiB of in-capsule data: Data Transfer Limit Exceeded, decided
    // from the common header before anything is buffered.
    let mut s = handshake(port);
    s.write_all(&ch(0x04, 0, 72, 72, 0xffff_fff0)).unwrap();
    expect_termreq(&mut s, 0x05, None);

    // H2CData with no R2T outstanding: PDU Sequence Error.
    let mut s = handshake(port);
    let mut h2c = ch(0x06, 0x04, 24, 24, 24 + 512);
    h2c.resize(16, 0); // CCCID, TTAG, DATAO
    h2c.extend_from_slice(&512u32.to_le_bytes()); // DATAL
    h2c.resize(24, 0); // reserved
    h2c.resize(24 + 512, 0xaa);
    s.write_all(&h2c).unwrap();
    expect_termreq(&mut s, 0x02, None);

    // The first connection was never disturbed: it still answers (a second ICReq on it is a
    // sequence error, which proves it is alive and still in its own state).
    good.write_all(&icreq()).unwrap();
    expect_termreq(&mut good, 0x02, None);
    // And new hosts are still served.
    drop(handshake(port));
    let c = q.console();
    assert!(!c.contains("panic") && !c.contains("CPU exception"), "{c}");
}

#[test]
fn floods_of_idle_and_half_open_connections_are_bounded() {
    let (q, port) = boot();
    // 40 connections that never speak, 10 that send an ICReq and then vanish with a reset.
    let idle: Vec<TcpStream> = (0..40).map(|_| connect(port)).collect();
    for _ in 0..10 {
        let s = handshake(port);
        let sock = socket_linger_zero(s);
        drop(sock);
    }
    // A well-behaved host still gets in.
    drop(handshake(port));
    // The target ends connections whose ICReq never came (ICReq timeout), freeing them.
    let start = Instant::now();
    let mut closed = 0;
    for mut s in idle {
        let mut b = [0u8; 256];
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        match s.read(&mut b) {
            Ok(0) => closed += 1,
            Ok(n) => {
                // A C2HTermReq before the close is acceptable too.
                assert_eq!(b[0], 0x03, "unexpected PDU {:02x?}", &b[..n]);
                closed += 1;
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => closed += 1,
            Err(e) => panic!(
                "idle connection not closed by the target after {:?}: {e}",
                start.elapsed()
            ),
        }
    }
    assert_eq!(closed, 40);
    drop(handshake(port));
    let c = q.console();
    assert!(!c.contains("panic") && !c.contains("CPU exception"), "{c}");
}

/// Sets SO_LINGER to 0 so dropping the stream sends a RST instead of a FIN.
fn socket_linger_zero(s: TcpStream) -> TcpStream {
    use std::os::fd::AsRawFd;
    #[repr(C)]
    struct Linger {
        l_onoff: i32,
        l_linger: i32,
    }
    unsafe extern "C" {
        fn setsockopt(fd: i32, level: i32, name: i32, val: *const Linger, len: u32) -> i32;
    }
    const SOL_SOCKET: i32 = 1;
    const SO_LINGER: i32 = 13;
    let l = Linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket descriptor and a correctly sized option value.
    let rc = unsafe {
        setsockopt(
            s.as_raw_fd(),
            SOL_SOCKET,
            SO_LINGER,
            &l,
            std::mem::size_of::<Linger>() as u32,
        )
    };
    assert_eq!(rc, 0);
    s
}
