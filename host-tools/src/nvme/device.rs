//! NVMe/TCP as a [`BlockDevice`]: one I/O queue (its own TCP connection) and one namespace;
//! [`TcpTarget`] opens one per benchmark worker on a connected controller.

use super::ctrl::{Controller, IoKind, IoQueue};
use crate::blockdev::{BlockDevice, BlockOp, Completion, Geometry, IoError, Request, Target};
use anyhow::{Context, Result, bail};
use std::collections::HashMap;
use std::sync::OnceLock;

/// An I/O queue of a controller, reading and writing one namespace.
#[derive(Debug)]
pub struct TcpDevice {
    q: IoQueue,
    nsid: u32,
    geometry: Geometry,
    /// Tag of each CID in flight.
    tags: HashMap<u16, u64>,
}

impl TcpDevice {
    /// Namespace `nsid` through I/O queue `qid` of `qd` commands on `ctrl`.
    pub fn open(ctrl: &Controller, nsid: u32, qid: u16, qd: u16) -> Result<Self> {
        let id = ctrl
            .identify_namespace(nsid)
            .with_context(|| format!("Identify Namespace {nsid}"))?;
        let bs = id.block_size();
        if id.nsze == 0 || bs == 0 {
            bail!("namespace {nsid} is not active on this controller");
        }
        let q = ctrl
            .io_queue(qid, qd)
            .with_context(|| format!("connecting I/O queue {qid}"))?;
        Ok(Self {
            q,
            nsid,
            geometry: Geometry {
                block_size: bs,
                blocks: id.nsze,
            },
            tags: HashMap::new(),
        })
    }

    /// Disconnects the queue.
    pub fn close(self) -> Result<()> {
        self.q.close().context("disconnecting the I/O queue")
    }
}

impl BlockDevice for TcpDevice {
    type Buf = Vec<u8>;

    fn geometry(&self) -> Geometry {
        self.geometry
    }

    fn max_transfer(&self) -> u32 {
        self.q.max_transfer()
    }

    fn depth(&self) -> usize {
        self.q.depth() as usize
    }

    fn alloc(&mut self) -> Result<Vec<u8>> {
        Ok(vec![0; self.q.max_transfer() as usize])
    }

    fn free(&mut self, _buf: Vec<u8>) {}

    fn submit(&mut self, req: Request<Vec<u8>>) -> Result<()> {
        let kind = match req.op {
            BlockOp::Read => IoKind::Read,
            BlockOp::Write { fua: false } => IoKind::Write,
            op => bail!("{op:?} is not offered by keelctl's NVMe/TCP initiator"),
        };
        let len = req.blocks as u64 * self.geometry.block_size as u64;
        let buf = req.buf.context("read or write without a buffer")?;
        if len > buf.len() as u64 {
            bail!("{len} bytes do not fit a {}-byte buffer", buf.len());
        }
        let cid = self
            .q
            .submit(kind, self.nsid, req.lba, req.blocks, buf, len as u32)?;
        self.tags.insert(cid, req.tag);
        Ok(())
    }

    fn complete(&mut self) -> Result<Completion<Vec<u8>>> {
        let (cid, done) = self.q.next_completion()?;
        let tag = self
            .tags
            .remove(&cid)
            .with_context(|| format!("completion for unknown CID {cid}"))?;
        let s = done.cqe.status;
        Ok(Completion {
            tag,
            result: if s.is_success() {
                Ok(())
            } else {
                Err(IoError::Status(s))
            },
            buf: done.buf,
        })
    }
}

/// A connected controller as a [`Target`]: every worker gets its own I/O queue (TCP
/// connection and thread). When the controller grants fewer I/O queues than the run asks
/// for (Keel grants 8, Linux's nvmet one per target CPU), further controllers of the same
/// host are connected (Keel and Linux allow several per host, dynamic controller model) and
/// the queues spread over them, so `--connections 64` means 64 I/O queues whatever one
/// controller grants. Workers connect their queues at the same time (connecting them one
/// at a time, as Linux's nvme-tcp does, made `tests/tests/nvme_cli.rs`'s two-host test hit
/// the firmware stall described in README "Known bug" in 4 of 6 runs, against 0 of 7).
#[derive(Debug)]
pub struct TcpTarget {
    /// The controller (admin queue).
    pub ctrl: Controller,
    /// The further controllers and the I/O queues each serves, once [`Target::prepare`] ran.
    extra: OnceLock<(Vec<Controller>, u16)>,
    /// I/O queues per controller asked for (`None`: as many as the first one grants).
    per_controller: Option<u16>,
}

impl TcpTarget {
    /// A target on `ctrl`.
    pub fn new(ctrl: Controller) -> Self {
        Self {
            ctrl,
            extra: OnceLock::new(),
            per_controller: None,
        }
    }

    /// At most `n` I/O queues per controller (`None`: as many as the first one grants):
    /// `--connections 16` with 4 is four controllers of four queues each, as a host with
    /// four `nvme connect`s of `--nr-io-queues 4` would have.
    pub fn per_controller(mut self, n: Option<u16>) -> Self {
        self.per_controller = n.filter(|&n| n > 0);
        self
    }

    /// Closes every controller (shutdown, Disconnect), the first error returned.
    pub fn close(self) -> Result<()> {
        let mut r = Ok(());
        if let Some((extra, _)) = self.extra.into_inner() {
            for c in extra {
                if let Err(e) = c.close() {
                    r = r.and(Err(e));
                }
            }
        }
        if let Err(e) = self.ctrl.close() {
            r = r.and(Err(e));
        }
        r.context("closing the controller")
    }
}

/// How `queues` I/O queues spread over controllers when each should get `want` and the first
/// granted `granted` (at least 1): queues per controller, and how many controllers beyond the
/// first.
fn spread(queues: u16, want: u16, granted: u16) -> (u16, u16) {
    let per = granted.min(want).max(1);
    (per, queues.div_ceil(per) - 1)
}

impl Target for TcpTarget {
    type Dev = TcpDevice;

    fn prepare(&self, queues: u16) -> Result<()> {
        let want = self.per_controller.unwrap_or(queues).min(queues);
        let granted = self
            .ctrl
            .set_io_queues(want)
            .context("Set Features (Number of Queues)")?;
        if granted == 0 {
            bail!("the controller grants no I/O queue");
        }
        let (per, more) = spread(queues, want, granted);
        let mut extra = Vec::with_capacity(more as usize);
        for i in 0..more {
            let c = Controller::connect(self.ctrl.params().clone())
                .with_context(|| format!("connecting controller {} of {}", i + 2, more + 1))?;
            let g = c
                .set_io_queues(per)
                .context("Set Features (Number of Queues)")?;
            if g < per {
                bail!(
                    "controller {} grants {g} I/O queues, the first {per}",
                    i + 2
                );
            }
            extra.push(c);
        }
        if self.extra.set((extra, per)).is_err() {
            bail!("the target was prepared twice");
        }
        Ok(())
    }

    fn workers(&self, queues: u16) -> u16 {
        queues
    }

    fn open(&self, nsid: u32, _queues: u16, qd: u16, index: u16) -> Result<TcpDevice> {
        let Some((extra, per)) = self.extra.get() else {
            return TcpDevice::open(&self.ctrl, nsid, index + 1, qd);
        };
        let c = match (index / per) as usize {
            0 => &self.ctrl,
            n => extra.get(n - 1).context("no controller for this queue")?,
        };
        TcpDevice::open(c, nsid, index % per + 1, qd)
    }

    fn close(&self, dev: TcpDevice) -> Result<()> {
        dev.close()
    }
}

#[cfg(test)]
mod tests {
    use super::spread;

    #[test]
    fn queues_spread_over_controllers() {
        // 16 queues, 4 per controller, the controller grants 8: 4 controllers of 4.
        assert_eq!(spread(16, 4, 8), (4, 3));
        // The controller grants fewer than asked: more controllers.
        assert_eq!(spread(16, 8, 2), (2, 7));
        // Everything on one controller when it grants them all.
        assert_eq!(spread(6, 6, 8), (6, 0));
        // A partial last controller.
        assert_eq!(spread(10, 4, 64), (4, 2));
    }
}
