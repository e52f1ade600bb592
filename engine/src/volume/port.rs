//! The volume as the replica a connection serves ([`crate::net::Replica`]): the one
//! place where `net`'s events enter the volume, dispatched to the methods that own them.

use super::Volume;
use crate::net::handshake::{Agreed, LocalParams, PeerParams};
use crate::net::NetError;
use crate::net::{Link, LinkEvent, PeerData, PeerEvent, Replica, SourceStart};
use crate::replica::Event;
use crate::state::ConnState;
use crate::store::{AlignedBuf, SECTOR_SIZE};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::Notify;

impl Replica for Volume {
    fn link_event(&self, ev: LinkEvent) {
        match ev {
            LinkEvent::State(s) => self.lock().node.conn = s,
            LinkEvent::Error(why) => self.set_connection_error(why),
            LinkEvent::Refused => self.set_standalone(true),
            LinkEvent::SplitBrain(why) => self.split_brain(why),
            LinkEvent::SplitBrainResolved(why) => self.split_brain_resolved(why),
            LinkEvent::Lost(session) => self.connection_lost(session),
        }
    }

    fn conn_state(&self) -> ConnState {
        self.lock().node.conn
    }

    fn is_standalone(&self) -> bool {
        Volume::is_standalone(self)
    }

    async fn wait_standalone(&self) {
        loop {
            let n = self.conn_changed.notified();
            if self.is_standalone() {
                return;
            }
            n.await;
        }
    }

    async fn wait_connect_allowed(&self) {
        loop {
            let n = self.conn_changed.notified();
            if !self.is_standalone() {
                return;
            }
            n.await;
        }
    }

    fn handshake_params(&self, resolve_conflicts: bool) -> LocalParams {
        LocalParams {
            protocol: self.protocol,
            size_sectors: self.size_bytes / SECTOR_SIZE as u64,
            side: self.lock().node.hello(),
            resolve_conflicts,
            policy: self.sync.policy,
            csums: self.sync.csums,
            verify: self.sync.verify,
            rate: self.sync.rate,
        }
    }

    async fn wait_sync_io_idle(&self) {
        Volume::wait_sync_io_idle(self).await;
    }

    fn use_rle(&self) -> bool {
        self.sync.use_rle
    }

    fn exchange_snapshot(&self, full: bool) -> (Vec<u64>, u64) {
        Volume::exchange_snapshot(self, full)
    }

    fn merge_peer_bitmap(&self, words: &[u64]) -> u64 {
        self.lock()
            .node
            .primary
            .out_of_sync_mut()
            .merge_words(words)
    }

    async fn begin_sync_source(&self) -> Result<u64, String> {
        Volume::begin_sync_source(self).await
    }

    async fn begin_sync_target(&self, sync_uuid: u64) -> Result<(), String> {
        Volume::begin_sync_target(self, sync_uuid).await
    }

    fn agree(&self, sent: &LocalParams, peer: &PeerParams) -> Result<Agreed, NetError> {
        let a = self
            .lock()
            .node
            .agree(
                &sent.side,
                &peer.side,
                &sent.handshake_ctx(&peer.ctx),
                &sent.policy,
            )
            .map_err(NetError::Changed)?;
        if let Some(why) = a.refusal() {
            return Err(NetError::SplitBrain(why));
        }
        if let Some(note) = a.correction() {
            tracing::info!("{note}");
        }
        Ok(Agreed {
            sync: a.outcome,
            split_brain_resolved: a.resolved(),
        })
    }

    fn connection_up(
        &self,
        link: Link,
        peer: &PeerParams,
        agreed: &Agreed,
        resolve_conflicts: bool,
        source: Option<SourceStart>,
    ) -> Arc<Notify> {
        Volume::connection_up(self, link, peer, agreed, resolve_conflicts, source)
    }

    async fn receive_buffer(&self, len: usize) -> Result<PeerData, String> {
        let units =
            u32::try_from(len.div_ceil(SECTOR_SIZE)).map_err(|_| format!("{len}-byte write"))?;
        let budget = self
            .peer_data
            .clone()
            .acquire_many_owned(units)
            .await
            .map_err(|e| e.to_string())?;
        // From the IO buffer pool (no allocation for a 4 KiB write once warm): not
        // zeroed, the receiver reads the whole payload into it before using it.
        let buf = AlignedBuf::from_pool(len).map_err(|e| e.to_string())?;
        Ok(PeerData::new(buf, budget))
    }

    async fn peer_event(&self, session: u64, ev: PeerEvent) -> Result<(), String> {
        match ev {
            PeerEvent::Write(w) => self.peer_write(session, w).await,
            PeerEvent::ResyncData { sector, len, data } => {
                self.rs_data_reply(session, sector, len, data)
            }
            PeerEvent::ReadReply { block_id, data } => self.data_reply(session, block_id, data),
            PeerEvent::ReadRequest {
                sector,
                len,
                block_id,
            } => self.peer_read_request(session, sector, len, block_id).await,
            PeerEvent::Resync(inbound) => self.sync_inbound(session, inbound).await,
            PeerEvent::Barrier(nr) => self.peer_barrier(session, nr).await,
            PeerEvent::OutOfSync { sector, len } => self.peer_out_of_sync(session, sector, len),
            PeerEvent::State(word) => self.peer_state(session, word),
            PeerEvent::StateRequest { cmd, req } => {
                self.peer_state_request(session, cmd, req);
                Ok(())
            }
            PeerEvent::Uuids(u) => {
                self.peer_uuids(session, u);
                Ok(())
            }
            PeerEvent::Ack { cmd, ack } => self.peer_ack(session, cmd, ack),
            PeerEvent::BarrierAck { barrier, set_size } => {
                self.barrier_ack(session, barrier, set_size)
            }
            PeerEvent::StateReply(retcode) => {
                self.state_reply(session, retcode);
                Ok(())
            }
        }
    }

    fn count_tx(&self, bytes: u64) {
        self.net_tx_bytes
            .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    fn handed_to_network(&self, session: u64, block_id: u64) {
        let _ = self.with_session(session, |v, inner, fx| {
            Volume::step(inner, Event::Handed { block_id })?;
            v.drain(inner, fx);
            Ok(())
        });
    }

    fn oldest_peer_wait(&self) -> Option<Instant> {
        self.lock().peer_waits.oldest()
    }

    fn tick(&self, session: u64) -> bool {
        self.sync_tick(session)
    }

    async fn wait_sync_run(&self) {
        self.sync_run_started.notified().await;
    }
}
