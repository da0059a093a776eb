//! The NBD export of `keelctl host` driven by real clients (`qemu-io` from qemu-utils,
//! `nbdinfo`/`nbdcopy` from libnbd-bin), over the host NVMe driver, over a window file served
//! by an in-process firmware (`Emulator`: a thread polling a `PcieFunction` with a RAM
//! namespace, as the firmware does over its ivshmem BAR). Skipped (with a note) when a client
//! is not installed.

use keel_host_tools::host::{Emulator, EmulatorConfig, HostController, NbdServer, Window};
use std::net::TcpListener;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn run(cmd: &mut Command) -> String {
    let o = cmd.output().expect("spawn");
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        o.status.success(),
        "{cmd:?} failed: {}\n{out}",
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

#[test]
fn nbd_clients_over_the_emulated_function() {
    if !have("qemu-io") {
        eprintln!("skipped: qemu-io (qemu-utils) not installed");
        return;
    }
    let dir = std::env::temp_dir().join(format!("keel-host-nbd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("window");
    // The "firmware" side maps the file, the host side maps it again: two mappings of one
    // file, exactly as with QEMU's memory-backend-file.
    let fw_win = Arc::new(Window::create(&path, 64 << 20).unwrap());
    let emu = Emulator::start(
        fw_win,
        EmulatorConfig {
            namespaces: vec![16 << 20],
            ..EmulatorConfig::default()
        },
    )
    .unwrap();
    let host_win = Arc::new(Window::open(&path).unwrap());
    let ctrl = HostController::open(host_win, Duration::from_secs(10)).unwrap();
    let server = NbdServer::new(ctrl, 1, 4, 32).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("nbd://{}/", listener.local_addr().unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = server.clone();
    let st = stop.clone();
    let h = std::thread::spawn(move || s2.serve(listener, &st));

    let out = run(Command::new("qemu-io").args([
        "-f",
        "raw",
        &url,
        "-c",
        "write -P 0x5a 0 1M",
        "-c",
        "read -P 0x5a 0 1M",
        "-c",
        "write -P 0xa5 4096 512",
        "-c",
        "read -P 0xa5 4096 512",
        "-c",
        "read -P 0x5a 0 4096",
        "-c",
        "flush",
        "-c",
        "write -z 2M 256k",
        "-c",
        "read -P 0 2M 256k",
        "-c",
        "discard 1M 64k",
        "-c",
        "read -P 0 1M 64k",
    ]));
    assert!(!out.contains("Pattern verification failed"), "{out}");
    // A second client sees the first one's data.
    let out =
        run(Command::new("qemu-io").args(["-f", "raw", &url, "-c", "read -P 0x5a 8192 8192"]));
    assert!(!out.contains("failed"), "{out}");
    // qemu-img: the size, and a round trip through a file.
    let info = run(Command::new("qemu-img").args(["info", "--output=json", &url]));
    assert!(info.contains("\"virtual-size\": 16777216"), "{info}");
    let img = dir.join("copy.raw");
    run(Command::new("qemu-img").args([
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        &url,
        img.to_str().unwrap(),
    ]));
    let copy = std::fs::read(&img).unwrap();
    assert_eq!(copy.len(), 16 << 20);
    assert!(copy[..4096].iter().all(|&b| b == 0x5a));
    assert!(copy[4096..4608].iter().all(|&b| b == 0xa5));

    if have("nbdinfo") && have("nbdcopy") {
        let out = run(Command::new("nbdinfo").arg(&url));
        assert!(out.contains("16777216"), "{out}");
        let src = dir.join("src.raw");
        let data: Vec<u8> = (0..4u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&src, &data).unwrap();
        run(Command::new("nbdcopy").args([src.to_str().unwrap(), &url]));
        let back = dir.join("back.raw");
        run(Command::new("nbdcopy").args([&url, back.to_str().unwrap()]));
        assert_eq!(&std::fs::read(&back).unwrap()[..data.len()], &data[..]);
    } else {
        eprintln!("note: nbdinfo/nbdcopy (libnbd-bin) not installed; that part skipped");
    }

    stop.store(true, Ordering::Relaxed);
    h.join().unwrap().unwrap();
    server.shutdown().unwrap();
    emu.stop().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
