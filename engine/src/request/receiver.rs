//! The Secondary's side of replication: it applies the peer's writes epoch by epoch,
//! acknowledges them as asked, and acknowledges each barrier only after the epoch's writes
//! are on its disk and flushed (docs/drbd-reference.md §4.2, DRBD 9 semantics).
//!
//! Every message from the peer (write or barrier) enters a FIFO (the *held* queue, at most
//! `max_held` entries) and is applied from its head:
//!
//! - a write joins the current epoch (`size += 1`) and is submitted to the local disk,
//!   unless `max_active` local writes are in flight (then it waits at the head);
//! - a barrier `P_BARRIER(nr)` closes the current epoch. Nothing behind it is applied
//!   until every write of the closed epoch completed locally (DRBD's drain; without it
//!   two overlapping writes of consecutive epochs could reach this disk in the wrong
//!   order). Then a local flush is issued and the next epoch's writes are submitted at
//!   once (they need not wait for the flush). `P_BARRIER_ACK(nr, size)` is sent when that
//!   flush (or a later one) completed, oldest epoch first. An empty epoch gets its ack too.
//!
//! `P_RECV_ACK` goes out on receipt when `DP_SEND_RECEIVE_ACK` is set, `P_WRITE_ACK` after
//! a successful local write when `DP_SEND_WRITE_ACK` is set. A failed local write is
//! answered with `P_NEG_ACK` under every protocol (DRBD 8.4 sends it only when a write
//! ack was requested; its Primary accepts it under every protocol — "Protocol A has no
//! P_WRITE_ACKs, but has P_NEG_ACKs" — and marking the block out of sync is what keeps
//! the replicas honest). A failed flush makes the core ask for the connection to be
//! dropped: an epoch that cannot be made durable must not be acknowledged, and the
//! Primary marks every un-acked write out of sync when the connection goes.
//!
//! On connection loss nothing more is acknowledged for the old connection, but what it
//! delivered is still applied: the held messages go on draining in order (epochs,
//! drains and flushes as before), and a marker at the end of the queue
//! ([`Held::Lost`]) makes the next connection's first epoch start only once all of
//! them are on the disk. DRBD 8.4 submits a write when it arrives, so a write its peer
//! received survives the Primary's death: protocol B's `P_RECV_ACK` promises that, and
//! protocol A's peer keeps what it received. Dropping the held writes instead (as this
//! core did before) lost such a write when the Primary died with the connection and
//! this node was promoted.
//!
//! Bounds: `max_held` queued messages (the driver stops reading the data socket while
//! [`Receiver::can_accept`] is false) plus one connection marker per lost connection that
//! delivered something (consecutive losses share one), `max_active` local writes in
//! flight, and at most `max_held` epochs flushed but not yet acked.

use super::{check_range, dp, make_handle, split_handle, Error, WriteKind};
use std::collections::VecDeque;

/// Configuration of a [`Receiver`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiverConfig {
    /// Volume size in 512-byte sectors; writes past it are protocol errors.
    pub sectors: u64,
    /// Local writes in flight (DRBD's `max-buffers`, default 2048).
    pub max_active: usize,
    /// Messages (writes and barriers) received and not yet applied.
    pub max_held: usize,
}

impl ReceiverConfig {
    /// Defaults: 2048 local writes in flight, 1024 held messages.
    pub fn new(sectors: u64) -> Self {
        ReceiverConfig {
            sectors,
            max_active: 2048,
            max_held: 1024,
        }
    }
}

/// A write received from the peer (`P_DATA`, `P_TRIM`, `P_ZEROES`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerWrite {
    /// Opaque; echoed in the acks.
    pub block_id: u64,
    /// First sector.
    pub sector: u64,
    /// Length in bytes.
    pub len: u32,
    /// Data, discard or zeroes (from the packet type and flags).
    pub kind: WriteKind,
    /// The packet's `dp_flags` (ack requests, FUA).
    pub dp_flags: u32,
}

/// IO the Receiver asks its driver to do, in order. Acks go on the meta stream in output
/// order (a write's ack before its epoch's barrier ack).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReceiverOutput {
    /// Write the data the driver stored under `token` (or discard/zero the range).
    SubmitLocal {
        /// From [`Receiver::peer_write`]; pass back in [`Receiver::local_done`].
        token: u64,
        /// First sector.
        sector: u64,
        /// Length in bytes.
        len: u32,
        /// Data, discard or zeroes.
        kind: WriteKind,
        /// Force unit access (`DP_FUA`).
        fua: bool,
    },
    /// Flush the local disk; report [`Receiver::local_flush_done`] with `token`.
    SubmitLocalFlush {
        /// Flush handle.
        token: u64,
    },
    /// Send `P_RECV_ACK`.
    SendRecvAck {
        /// Echoed block id.
        block_id: u64,
        /// Sector of the write.
        sector: u64,
        /// Length of the write.
        len: u32,
    },
    /// Send `P_WRITE_ACK`.
    SendWriteAck {
        /// Echoed block id.
        block_id: u64,
        /// Sector of the write.
        sector: u64,
        /// Length of the write.
        len: u32,
    },
    /// Send `P_NEG_ACK`: the local write failed.
    SendNegAck {
        /// Echoed block id.
        block_id: u64,
        /// Sector of the write.
        sector: u64,
        /// Length of the write.
        len: u32,
    },
    /// Send `P_BARRIER_ACK(nr, set_size)`.
    SendBarrierAck {
        /// The barrier number, echoed.
        nr: u32,
        /// Writes in the epoch.
        set_size: u32,
    },
    /// Drop the connection (a local flush failed; its epochs must not be acked).
    DropConnection {
        /// For the log.
        reason: &'static str,
    },
}

/// Counters for status and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct ReceiverStats {
    /// Local writes in flight.
    pub active_writes: usize,
    /// Messages received and not yet applied.
    pub held: usize,
    /// Epochs drained and flushing, ack not yet sent.
    pub epochs_flushing: usize,
    /// Writes received.
    pub writes_received: u64,
    /// Writes that could not be applied on receipt (waited behind a drain or a bound).
    pub writes_held: u64,
    /// Writes a lost connection delivered, applied after the loss.
    pub writes_after_loss: u64,
    /// Barriers received.
    pub barriers_received: u64,
    /// Barrier acks sent.
    pub barrier_acks_sent: u64,
    /// Local flushes issued.
    pub flushes_issued: u64,
}

#[derive(Debug, Clone)]
struct RxSlot {
    gen: u32,
    live: bool,
    submitted: bool,
    /// Connection generation the write arrived on; acks only go to that connection.
    conn: u32,
    w: PeerWrite,
}

#[derive(Debug, Clone, Copy)]
enum Held {
    Write(u32),
    Barrier(u32),
    /// The connection that delivered what is ahead was lost; what follows came on
    /// connection `.0` (see the module docs).
    Lost(u32),
}

#[derive(Debug, Clone, Copy)]
struct Flushing {
    nr: u32,
    size: u32,
    flush: u64,
    /// The connection whose epoch it is: only the current one is acked.
    conn: u32,
}

/// Deliberate bugs for proving that the simulator's checkers can fail.
#[cfg(test)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ReceiverSabotage {
    /// Start the next epoch without waiting for the closed one's writes (its flush and
    /// ack still wait, so only the ordering of overlapping writes is broken).
    pub skip_drain: bool,
    /// Send the barrier ack when the epoch drained, before its flush completed.
    pub ack_before_flush: bool,
    /// Drop the held messages at a connection loss (the rule before DRBD 8.4's:
    /// a received write is lost if the Primary dies with the connection).
    pub drop_held_at_loss: bool,
}

/// The Secondary's receiver for one volume. See the module docs.
#[derive(Debug)]
pub struct Receiver {
    cfg: ReceiverConfig,
    slots: Vec<RxSlot>,
    free: Vec<u32>,
    conn: u32,
    /// The connection whose messages are at the head of `held` (behind the current one
    /// while a lost connection's messages still drain).
    head_conn: u32,
    held: VecDeque<Held>,
    /// Writes applied to the current epoch.
    epoch_size: u32,
    /// `Some(nr)`: `P_BARRIER(nr)` closed the current epoch; draining.
    epoch_barrier: Option<u32>,
    /// A lost connection's messages are all applied ([`Held::Lost`]): draining its
    /// local writes before the next connection's first epoch, no ack.
    epoch_lost: bool,
    active: usize,
    flushing: VecDeque<Flushing>,
    flush_seq: u64,
    out: Vec<ReceiverOutput>,
    stats: ReceiverStats,
    #[cfg(test)]
    pub(crate) sabotage: ReceiverSabotage,
    /// Sabotage `skip_drain`: closed epochs waiting for nothing to be in flight.
    #[cfg(test)]
    sabotaged_epochs: VecDeque<(u32, u32)>,
}

impl Receiver {
    /// A receiver with nothing in flight.
    pub fn new(cfg: ReceiverConfig) -> Result<Self, Error> {
        if cfg.sectors == 0 || cfg.max_active == 0 || cfg.max_held == 0 {
            return Err(Error::Invalid(
                "receiver needs sectors, max_active and max_held > 0",
            ));
        }
        if u32::try_from(cfg.max_active.saturating_add(cfg.max_held)).is_err() {
            return Err(Error::Invalid("receiver bounds must fit in 32 bits"));
        }
        Ok(Receiver {
            slots: Vec::new(),
            free: Vec::new(),
            conn: 0,
            head_conn: 0,
            held: VecDeque::with_capacity(cfg.max_held),
            epoch_size: 0,
            epoch_barrier: None,
            epoch_lost: false,
            active: 0,
            flushing: VecDeque::new(),
            flush_seq: 0,
            out: Vec::new(),
            stats: ReceiverStats::default(),
            cfg,
            #[cfg(test)]
            sabotage: ReceiverSabotage::default(),
            #[cfg(test)]
            sabotaged_epochs: VecDeque::new(),
        })
    }

    /// Takes the IO requested since the last call, in order. Call after every input.
    pub fn drain_outputs(&mut self) -> std::vec::Drain<'_, ReceiverOutput> {
        self.out.drain(..)
    }

    /// Whether one more message (write or barrier) may be read from the data stream.
    /// While false the driver must not read the socket (TCP then pushes back on the peer).
    pub fn can_accept(&self) -> bool {
        self.held.len() < self.cfg.max_held
    }

    /// Counters for status.
    pub fn stats(&self) -> ReceiverStats {
        ReceiverStats {
            active_writes: self.active,
            held: self.held.len(),
            epochs_flushing: self.flushing.len(),
            ..self.stats
        }
    }

    /// A write from the peer. Returns the token under which the driver keeps its data
    /// until [`ReceiverOutput::SubmitLocal`] (then until [`Receiver::local_done`]) or
    /// (never dropped: a lost connection's writes are applied too).
    pub fn peer_write(&mut self, w: PeerWrite) -> Result<u64, Error> {
        check_range(w.sector, w.len, self.cfg.sectors).ok_or(Error::Protocol(
            "peer write empty, unaligned or past the end",
        ))?;
        if !self.can_accept() {
            return Err(Error::Busy);
        }
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                let i = u32::try_from(self.slots.len()).map_err(|_| Error::Busy)?;
                self.slots.push(RxSlot {
                    gen: 0,
                    live: false,
                    submitted: false,
                    conn: 0,
                    w,
                });
                i
            }
        };
        let s = &mut self.slots[idx as usize];
        s.live = true;
        s.submitted = false;
        s.conn = self.conn;
        s.w = w;
        let token = make_handle(idx as usize, s.gen);
        self.stats.writes_received += 1;
        if w.dp_flags & dp::DP_SEND_RECEIVE_ACK != 0 {
            self.out.push(ReceiverOutput::SendRecvAck {
                block_id: w.block_id,
                sector: w.sector,
                len: w.len,
            });
        }
        self.held.push_back(Held::Write(idx));
        self.pump();
        if !self.slots[idx as usize].submitted {
            self.stats.writes_held += 1;
        }
        Ok(token)
    }

    /// `P_BARRIER(nr)` from the peer: closes the epoch.
    pub fn peer_barrier(&mut self, nr: u32) -> Result<(), Error> {
        if !self.can_accept() {
            return Err(Error::Busy);
        }
        self.stats.barriers_received += 1;
        self.held.push_back(Held::Barrier(nr));
        self.pump();
        Ok(())
    }

    /// The local write `token` finished.
    pub fn local_done(&mut self, token: u64, ok: bool) -> Result<(), Error> {
        let (idx, gen) = split_handle(token);
        let s = self
            .slots
            .get_mut(idx)
            .filter(|s| s.live && s.gen == gen && s.submitted)
            .ok_or(Error::Invalid("local_done for an unknown token"))?;
        s.live = false;
        s.gen = s.gen.wrapping_add(1);
        let (w, same_conn) = (s.w, s.conn == self.conn);
        if let Ok(i) = u32::try_from(idx) {
            self.free.push(i);
        }
        self.active -= 1;
        if same_conn {
            let (block_id, sector, len) = (w.block_id, w.sector, w.len);
            if !ok {
                self.out.push(ReceiverOutput::SendNegAck {
                    block_id,
                    sector,
                    len,
                });
            } else if w.dp_flags & dp::DP_SEND_WRITE_ACK != 0 {
                self.out.push(ReceiverOutput::SendWriteAck {
                    block_id,
                    sector,
                    len,
                });
            }
        }
        self.pump();
        Ok(())
    }

    /// The writes submitted to the disk and not completed yet, as `(token, sector, len)`,
    /// of this connection or an earlier one: what a resync starting now must be told of.
    pub fn submitted_writes(&self) -> impl Iterator<Item = (u64, u64, u32)> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.live && s.submitted)
            .map(|(i, s)| (make_handle(i, s.gen), s.w.sector, s.w.len))
    }

    /// The local flush `token` finished. On success every epoch whose flush was issued no
    /// later than this one is acknowledged, oldest first.
    pub fn local_flush_done(&mut self, token: u64, ok: bool) -> Result<(), Error> {
        if token == 0 || token > self.flush_seq {
            return Err(Error::Invalid("local_flush_done for an unknown token"));
        }
        if !ok {
            let current = |f: &Flushing| f.flush == token && f.conn == self.conn;
            if self.flushing.iter().any(current) {
                self.out.push(ReceiverOutput::DropConnection {
                    reason: "local flush failed; cannot acknowledge the epoch",
                });
                return Ok(());
            }
            // A lost connection's epochs: nobody waits for their acks (the Primary
            // marked their writes out of sync); the next epochs go on.
            let conn = self.conn;
            self.flushing.retain(|f| f.flush > token || f.conn == conn);
            self.pump();
            return Ok(());
        }
        while let Some(f) = self.flushing.front().copied() {
            if f.flush > token {
                break;
            }
            self.flushing.pop_front();
            if f.conn == self.conn {
                self.send_barrier_ack(f.nr, f.size);
            }
        }
        self.pump();
        Ok(())
    }

    /// The connection is gone: no ack of it will be sent; what it delivered is still
    /// applied, and the next connection's writes wait until all of it is on the disk
    /// (see the module docs).
    pub fn connection_lost(&mut self) {
        self.conn = self.conn.wrapping_add(1);
        match self.held.back_mut() {
            // Nothing came between two losses: one marker serves both.
            Some(Held::Lost(c)) => *c = self.conn,
            _ => self.held.push_back(Held::Lost(self.conn)),
        }
        // The epochs flushing now are the lost connection's: never acked; their flushes
        // still complete (`local_flush_done`).
        self.flushing.clear();
        #[cfg(test)]
        {
            self.sabotaged_epochs.clear();
            if self.sabotage.drop_held_at_loss {
                self.drop_held();
            }
        }
        self.pump();
    }

    /// Sabotage `drop_held_at_loss`: the held writes are forgotten (their buffers stay
    /// with the driver, which the simulator does not check).
    #[cfg(test)]
    fn drop_held(&mut self) {
        let mut kept = VecDeque::new();
        while let Some(h) = self.held.pop_front() {
            match h {
                Held::Write(i) => {
                    let s = &mut self.slots[i as usize];
                    s.live = false;
                    s.gen = s.gen.wrapping_add(1);
                    self.free.push(i);
                }
                Held::Barrier(_) => {}
                Held::Lost(_) => kept.push_back(h),
            }
        }
        self.held = kept;
    }

    fn send_barrier_ack(&mut self, nr: u32, set_size: u32) {
        self.stats.barrier_acks_sent += 1;
        self.out
            .push(ReceiverOutput::SendBarrierAck { nr, set_size });
    }

    /// The epoch `nr` drained: flush, and ack once the flush completed.
    fn finish_epoch(&mut self, nr: u32, size: u32) {
        self.flush_seq += 1;
        self.stats.flushes_issued += 1;
        let flush = self.flush_seq;
        self.out
            .push(ReceiverOutput::SubmitLocalFlush { token: flush });
        #[cfg(test)]
        if self.sabotage.ack_before_flush {
            if self.head_conn == self.conn {
                self.send_barrier_ack(nr, size);
            }
            return;
        }
        self.flushing.push_back(Flushing {
            nr,
            size,
            flush,
            conn: self.head_conn,
        });
    }

    /// Applies held messages from the head as far as the drain and the bounds allow.
    fn pump(&mut self) {
        loop {
            #[cfg(test)]
            if self.active == 0 {
                while let Some((nr, size)) = self.sabotaged_epochs.pop_front() {
                    self.finish_epoch(nr, size);
                }
            }
            if self.epoch_barrier.is_some() || self.epoch_lost {
                #[cfg(test)]
                if self.active > 0 && self.sabotage.skip_drain {
                    // Sabotage: open the next epoch now; the closed one is flushed and
                    // acked once nothing at all is in flight (durability kept, order not).
                    if let Some(nr) = self.epoch_barrier.take() {
                        self.sabotaged_epochs.push_back((nr, self.epoch_size));
                    }
                    self.epoch_lost = false;
                    self.epoch_size = 0;
                    continue;
                }
                if self.active > 0 || self.flushing.len() >= self.cfg.max_held {
                    return;
                }
                if let Some(nr) = self.epoch_barrier.take() {
                    self.finish_epoch(nr, self.epoch_size);
                }
                self.epoch_lost = false;
                self.epoch_size = 0;
                continue;
            }
            match self.held.front().copied() {
                None => return,
                Some(Held::Barrier(nr)) => {
                    self.held.pop_front();
                    self.epoch_barrier = Some(nr);
                }
                Some(Held::Lost(conn)) => {
                    self.held.pop_front();
                    self.head_conn = conn;
                    self.epoch_lost = true;
                }
                Some(Held::Write(i)) => {
                    if self.active >= self.cfg.max_active {
                        return;
                    }
                    self.held.pop_front();
                    self.active += 1;
                    self.epoch_size = self.epoch_size.saturating_add(1);
                    let token = make_handle(i as usize, self.slots[i as usize].gen);
                    let s = &mut self.slots[i as usize];
                    s.submitted = true;
                    let w = s.w;
                    if s.conn != self.conn {
                        self.stats.writes_after_loss += 1;
                    }
                    self.out.push(ReceiverOutput::SubmitLocal {
                        token,
                        sector: w.sector,
                        len: w.len,
                        kind: w.kind,
                        fua: w.dp_flags & dp::DP_FUA != 0,
                    });
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use ReceiverOutput as O;

    fn rx(max_active: usize, max_held: usize) -> Receiver {
        Receiver::new(ReceiverConfig {
            sectors: 1 << 20,
            max_active,
            max_held,
        })
        .unwrap()
    }

    fn w(block_id: u64, sector: u64, dp_flags: u32) -> PeerWrite {
        PeerWrite {
            block_id,
            sector,
            len: 4096,
            kind: WriteKind::Data,
            dp_flags,
        }
    }

    fn outs(r: &mut Receiver) -> Vec<O> {
        r.drain_outputs().collect()
    }

    fn submitted(o: &[O]) -> Vec<u64> {
        o.iter()
            .filter_map(|x| match x {
                O::SubmitLocal { token, .. } => Some(*token),
                _ => None,
            })
            .collect()
    }

    fn flush_token(o: &[O]) -> Option<u64> {
        o.iter().find_map(|x| match x {
            O::SubmitLocalFlush { token } => Some(*token),
            _ => None,
        })
    }

    #[test]
    fn submitted_writes_are_those_on_the_disk_across_a_connection_loss() {
        let mut r = rx(8, 8);
        let t1 = r.peer_write(w(1, 0, dp::DP_SEND_WRITE_ACK)).unwrap();
        let t2 = r.peer_write(w(2, 8, dp::DP_SEND_WRITE_ACK)).unwrap();
        assert_eq!(submitted(&outs(&mut r)), vec![t1, t2]);
        r.local_done(t1, true).unwrap();
        r.connection_lost();
        // The write of the lost connection still on the disk is one.
        assert_eq!(
            r.submitted_writes().collect::<Vec<_>>(),
            vec![(t2, 8, 4096)]
        );
        r.local_done(t2, true).unwrap();
        assert_eq!(r.submitted_writes().count(), 0);
    }

    #[test]
    fn acks_follow_the_flags() {
        let mut r = rx(8, 8);
        let t1 = r.peer_write(w(11, 0, dp::DP_SEND_RECEIVE_ACK)).unwrap();
        let o = outs(&mut r);
        assert_eq!(
            o[0],
            O::SendRecvAck {
                block_id: 11,
                sector: 0,
                len: 4096
            }
        );
        assert_eq!(submitted(&o), vec![t1]);
        r.local_done(t1, true).unwrap();
        assert!(outs(&mut r).is_empty());
        let t2 = r
            .peer_write(w(12, 8, dp::DP_SEND_WRITE_ACK | dp::DP_FUA))
            .unwrap();
        let o = outs(&mut r);
        assert!(matches!(o[0], O::SubmitLocal { fua: true, .. }));
        r.local_done(t2, true).unwrap();
        assert_eq!(
            outs(&mut r),
            vec![O::SendWriteAck {
                block_id: 12,
                sector: 8,
                len: 4096
            }]
        );
        let t3 = r.peer_write(w(13, 16, 0)).unwrap();
        outs(&mut r);
        r.local_done(t3, false).unwrap();
        assert_eq!(
            outs(&mut r),
            vec![O::SendNegAck {
                block_id: 13,
                sector: 16,
                len: 4096
            }]
        );
        assert!(r.local_done(t3, true).is_err());
    }

    #[test]
    fn next_epoch_is_held_until_the_drain_and_ack_waits_for_the_flush() {
        let mut r = rx(8, 8);
        let a = r.peer_write(w(1, 0, dp::DP_SEND_WRITE_ACK)).unwrap();
        let b = r.peer_write(w(2, 8, dp::DP_SEND_WRITE_ACK)).unwrap();
        r.peer_barrier(77).unwrap();
        let c = r.peer_write(w(3, 0, dp::DP_SEND_WRITE_ACK)).unwrap();
        let o = outs(&mut r);
        assert_eq!(submitted(&o), vec![a, b]);
        assert_eq!(r.stats().held, 1);
        assert_eq!(r.stats().writes_held, 1);
        r.local_done(a, true).unwrap();
        let o = outs(&mut r);
        assert!(submitted(&o).is_empty() && flush_token(&o).is_none());
        r.local_done(b, true).unwrap();
        let o = outs(&mut r);
        // Drained: ack of b, then the flush, then the held write starts.
        assert!(matches!(o[0], O::SendWriteAck { block_id: 2, .. }));
        let f = flush_token(&o).unwrap();
        assert_eq!(submitted(&o), vec![c]);
        assert!(!o.iter().any(|x| matches!(x, O::SendBarrierAck { .. })));
        r.local_flush_done(f, true).unwrap();
        assert_eq!(
            outs(&mut r),
            vec![O::SendBarrierAck {
                nr: 77,
                set_size: 2
            }]
        );
        assert!(r.local_flush_done(f + 1, true).is_err());
    }

    #[test]
    fn out_of_order_flushes_ack_in_order_and_empty_epochs_are_acked() {
        let mut r = rx(8, 8);
        let a = r.peer_write(w(1, 0, 0)).unwrap();
        r.peer_barrier(1).unwrap();
        r.peer_barrier(2).unwrap(); // empty epoch
        outs(&mut r);
        r.local_done(a, true).unwrap();
        let o = outs(&mut r);
        let flushes: Vec<u64> = o
            .iter()
            .filter_map(|x| match x {
                O::SubmitLocalFlush { token } => Some(*token),
                _ => None,
            })
            .collect();
        assert_eq!(flushes.len(), 2);
        // The second flush finishing first covers the first epoch too (issued after it
        // drained): both acks, oldest first.
        r.local_flush_done(flushes[1], true).unwrap();
        assert_eq!(
            outs(&mut r),
            vec![
                O::SendBarrierAck { nr: 1, set_size: 1 },
                O::SendBarrierAck { nr: 2, set_size: 0 }
            ]
        );
        r.local_flush_done(flushes[0], true).unwrap();
        assert!(outs(&mut r).is_empty());
    }

    #[test]
    fn flush_failure_asks_to_drop_the_connection() {
        let mut r = rx(8, 8);
        r.peer_barrier(5).unwrap();
        let f = flush_token(&outs(&mut r)).unwrap();
        r.local_flush_done(f, false).unwrap();
        assert!(matches!(outs(&mut r)[..], [O::DropConnection { .. }]));
    }

    #[test]
    fn bounds_hold_back_and_refuse() {
        let mut r = rx(1, 2);
        let a = r.peer_write(w(1, 0, 0)).unwrap();
        let b = r.peer_write(w(2, 8, 0)).unwrap(); // waits: max_active 1
        assert_eq!(submitted(&outs(&mut r)), vec![a]);
        r.peer_barrier(9).unwrap();
        assert!(!r.can_accept());
        assert_eq!(r.peer_write(w(3, 16, 0)), Err(Error::Busy));
        assert_eq!(r.peer_barrier(10), Err(Error::Busy));
        r.local_done(a, true).unwrap();
        assert_eq!(submitted(&outs(&mut r)), vec![b]);
        assert!(r.can_accept());
        assert!(matches!(
            r.peer_write(PeerWrite {
                len: 4096,
                sector: (1 << 20) - 1,
                ..w(4, 0, 0)
            }),
            Err(Error::Protocol(_))
        ));
        assert!(matches!(
            r.peer_write(PeerWrite {
                len: 0,
                ..w(4, 0, 0)
            }),
            Err(Error::Protocol(_))
        ));
    }

    #[test]
    fn connection_loss_applies_held_writes_and_silences_old_acks() {
        let mut r = rx(8, 8);
        let a = r.peer_write(w(1, 0, dp::DP_SEND_WRITE_ACK)).unwrap();
        r.peer_barrier(3).unwrap();
        let b = r.peer_write(w(2, 0, dp::DP_SEND_WRITE_ACK)).unwrap();
        outs(&mut r);
        r.connection_lost();
        assert!(outs(&mut r).is_empty(), "b waits for epoch 3's drain");
        // New connection: its write waits for the old connection's writes, b included.
        let c = r.peer_write(w(7, 0, dp::DP_SEND_WRITE_ACK)).unwrap();
        assert!(submitted(&outs(&mut r)).is_empty());
        r.local_done(a, true).unwrap();
        let o = outs(&mut r);
        // Epoch 3 is flushed (the order on the disk still holds), not acked; b goes on.
        assert_eq!(submitted(&o), vec![b]);
        let flush = flush_token(&o).expect("epoch 3's flush");
        r.local_flush_done(flush, true).unwrap();
        assert!(
            outs(&mut r).is_empty(),
            "no ack to the new connection for epoch 3"
        );
        r.local_done(b, true).unwrap();
        let o = outs(&mut r);
        assert_eq!(
            submitted(&o),
            vec![c],
            "c after the lost connection's writes"
        );
        assert!(!o.iter().any(|x| matches!(
            x,
            O::SendWriteAck { .. } | O::SubmitLocalFlush { .. } | O::SendBarrierAck { .. }
        )));
        r.local_done(c, true).unwrap();
        assert!(matches!(
            outs(&mut r)[..],
            [O::SendWriteAck { block_id: 7, .. }]
        ));
        // The new connection's first epoch counts only its own write.
        r.peer_barrier(1).unwrap();
        let flush = flush_token(&outs(&mut r)).unwrap();
        r.local_flush_done(flush, true).unwrap();
        assert_eq!(outs(&mut r), vec![O::SendBarrierAck { nr: 1, set_size: 1 }]);
    }

    /// Losses with nothing received between them share one marker; the next
    /// connection's acks still go out.
    #[test]
    fn repeated_losses_share_a_marker() {
        let mut r = rx(8, 4);
        let a = r.peer_write(w(1, 0, dp::DP_SEND_WRITE_ACK)).unwrap();
        r.peer_barrier(3).unwrap();
        let x = r.peer_write(w(2, 0, dp::DP_SEND_WRITE_ACK)).unwrap();
        outs(&mut r);
        for _ in 0..5 {
            r.connection_lost();
        }
        assert_eq!(r.stats().held, 2, "x and one marker");
        r.local_done(a, true).unwrap();
        assert_eq!(submitted(&outs(&mut r)), vec![x]);
        r.local_done(x, true).unwrap();
        assert_eq!(r.stats().held, 0);
        let b = r.peer_write(w(9, 8, dp::DP_SEND_WRITE_ACK)).unwrap();
        assert_eq!(submitted(&outs(&mut r)), vec![b]);
        r.local_done(b, true).unwrap();
        assert!(matches!(
            outs(&mut r)[..],
            [O::SendWriteAck { block_id: 9, .. }]
        ));
    }
}
