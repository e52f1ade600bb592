//! The packets of resync and verify: what each send output puts on the wire
//! ([`TargetOutput::packet`], [`SourceOutput::packet`], [`VerifyOutput::packet`]) and
//! which machine input a received packet is ([`Inbound::from_packet`]).
//!
//! Every resync request and its answers carry `block_id` = `ID_SYNCER` (all ones); a
//! `P_RS_WRITE_ACK` or `P_NEG_ACK` with any other `block_id` acknowledges an application
//! write and belongs to the write pipeline, not here (DRBD's `got_BlockAck`,
//! `got_NegAck`). `P_OV_RESULT` says in sync with `block_id` 4711, out of sync with 4712.

use super::{Digest, Error, RequestKind, SourceOutput, TargetOutput, VerifyOutput};
use crate::wire::{
    BlockAck, BlockDesc, BlockReq, Command, DataHeader, Packet, ID_IN_SYNC, ID_OUT_OF_SYNC,
    ID_SYNCER,
};

fn req(cmd: Command, sector: u64, len: u32, digest: &[u8]) -> Packet {
    Packet::BlockReq {
        cmd,
        req: BlockReq {
            sector,
            block_id: ID_SYNCER,
            blksize: len,
            pad: 0,
        },
        digest: digest.to_vec(),
    }
}

fn ack(cmd: Command, sector: u64, len: u32, block_id: u64) -> Packet {
    Packet::BlockAck {
        cmd,
        ack: BlockAck {
            sector,
            block_id,
            blksize: len,
            seq_num: 0,
        },
    }
}

impl TargetOutput {
    /// The packet this output sends, if it is a send.
    pub fn packet(&self) -> Option<Packet> {
        Some(match *self {
            TargetOutput::SendRsDataRequest { sector, len, thin } => {
                let cmd = if thin {
                    Command::P_RS_THIN_REQ
                } else {
                    Command::P_RS_DATA_REQUEST
                };
                req(cmd, sector, len, &[])
            }
            TargetOutput::SendCsumRsRequest {
                sector,
                len,
                digest,
            } => req(Command::P_CSUM_RS_REQUEST, sector, len, digest.as_bytes()),
            TargetOutput::SendRsWriteAck { sector, len } => {
                ack(Command::P_RS_WRITE_ACK, sector, len, ID_SYNCER)
            }
            TargetOutput::SendNegAck { sector, len } => {
                ack(Command::P_NEG_ACK, sector, len, ID_SYNCER)
            }
            _ => return None,
        })
    }
}

impl SourceOutput {
    /// The packet this output sends, if it is a send. For `P_RS_DATA_REPLY` the packet is
    /// the header; `len` data bytes (the read's buffer) follow it.
    pub fn packet(&self) -> Option<Packet> {
        Some(match *self {
            SourceOutput::SendRsDataReply { sector, len, .. } => Packet::Data {
                cmd: Command::P_RS_DATA_REPLY,
                head: DataHeader {
                    sector,
                    block_id: ID_SYNCER,
                    seq_num: 0,
                    dp_flags: 0,
                },
                digest: Vec::new(),
                data_len: len,
            },
            SourceOutput::SendRsDeallocated { sector, len } => Packet::BlockDesc {
                cmd: Command::P_RS_DEALLOCATED,
                desc: BlockDesc {
                    sector,
                    blksize: len,
                    pad: 0,
                },
            },
            SourceOutput::SendRsIsInSync { sector, len } => {
                ack(Command::P_RS_IS_IN_SYNC, sector, len, ID_SYNCER)
            }
            SourceOutput::SendNegRsDReply { sector, len } => {
                ack(Command::P_NEG_RS_DREPLY, sector, len, ID_SYNCER)
            }
            _ => return None,
        })
    }
}

impl VerifyOutput {
    /// The packet this output sends, if it is a send.
    pub fn packet(&self) -> Option<Packet> {
        Some(match *self {
            VerifyOutput::SendOvRequest { sector, len } => {
                req(Command::P_OV_REQUEST, sector, len, &[])
            }
            VerifyOutput::SendOvReply {
                sector,
                len,
                digest,
            } => req(Command::P_OV_REPLY, sector, len, digest.as_bytes()),
            VerifyOutput::SendOvResult {
                sector,
                len,
                in_sync,
            } => {
                let id = if in_sync { ID_IN_SYNC } else { ID_OUT_OF_SYNC };
                ack(Command::P_OV_RESULT, sector, len, id)
            }
            _ => return None,
        })
    }
}

/// A received packet that belongs to resync or verify, with the machine input it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inbound {
    /// To the source: [`super::Source::request`].
    RsRequest {
        /// First sector.
        sector: u64,
        /// Bytes.
        len: u32,
        /// Data, thin or csum.
        kind: RequestKind,
    },
    /// To the target: [`super::Target::data_reply`] (`len` data bytes follow).
    RsDataReply {
        /// First sector.
        sector: u64,
        /// Bytes.
        len: u32,
    },
    /// To the target: [`super::Target::deallocated`].
    RsDeallocated {
        /// First sector.
        sector: u64,
        /// Bytes.
        len: u32,
    },
    /// To the target: [`super::Target::in_sync_reply`].
    RsIsInSync {
        /// First sector.
        sector: u64,
        /// Bytes.
        len: u32,
    },
    /// To the target: [`super::Target::neg_reply`].
    NegRsDReply {
        /// First sector.
        sector: u64,
        /// Bytes.
        len: u32,
    },
    /// To the target: [`super::Target::cancel_reply`].
    RsCancel {
        /// First sector.
        sector: u64,
        /// Bytes.
        len: u32,
    },
    /// To the source: [`super::Source::rs_write_ack`].
    RsWriteAck {
        /// First sector.
        sector: u64,
        /// Bytes.
        len: u32,
    },
    /// To the source: [`super::Source::neg_ack`].
    RsNegAck {
        /// First sector.
        sector: u64,
        /// Bytes.
        len: u32,
    },
    /// To the verify peer: [`super::VerifyPeer::ov_request`].
    OvRequest {
        /// First sector.
        sector: u64,
        /// Bytes.
        len: u32,
    },
    /// To the verify source: [`super::VerifySource::ov_reply`].
    OvReply {
        /// First sector.
        sector: u64,
        /// Bytes.
        len: u32,
        /// The peer's digest.
        digest: Digest,
    },
    /// To the verify peer: [`super::VerifyPeer::ov_result`].
    OvResult {
        /// First sector.
        sector: u64,
        /// Bytes.
        len: u32,
        /// `block_id` was `ID_IN_SYNC`.
        in_sync: bool,
    },
}

impl Inbound {
    /// What `pkt` means for resync or verify: `Ok(None)` if it is not theirs (including
    /// acks of application writes), an error for a digest that is not crc32c or an
    /// `P_OV_RESULT` id that is neither 4711 nor 4712.
    pub fn from_packet(pkt: &Packet) -> Result<Option<Inbound>, Error> {
        Ok(Some(match pkt {
            Packet::BlockReq { cmd, req, digest } => {
                let (sector, len) = (req.sector, req.blksize);
                match *cmd {
                    Command::P_RS_DATA_REQUEST => Inbound::RsRequest {
                        sector,
                        len,
                        kind: RequestKind::Data,
                    },
                    Command::P_RS_THIN_REQ => Inbound::RsRequest {
                        sector,
                        len,
                        kind: RequestKind::Thin,
                    },
                    Command::P_CSUM_RS_REQUEST => Inbound::RsRequest {
                        sector,
                        len,
                        kind: RequestKind::Csum(Digest::from_wire(digest)?),
                    },
                    Command::P_OV_REQUEST => Inbound::OvRequest { sector, len },
                    Command::P_OV_REPLY => Inbound::OvReply {
                        sector,
                        len,
                        digest: Digest::from_wire(digest)?,
                    },
                    _ => return Ok(None),
                }
            }
            Packet::Data {
                cmd,
                head,
                data_len,
                ..
            } if *cmd == Command::P_RS_DATA_REPLY => Inbound::RsDataReply {
                sector: head.sector,
                len: *data_len,
            },
            Packet::BlockDesc { cmd, desc } if *cmd == Command::P_RS_DEALLOCATED => {
                Inbound::RsDeallocated {
                    sector: desc.sector,
                    len: desc.blksize,
                }
            }
            Packet::BlockAck { cmd, ack } => {
                let (sector, len) = (ack.sector, ack.blksize);
                let syncer = ack.block_id == ID_SYNCER;
                match *cmd {
                    Command::P_RS_IS_IN_SYNC => Inbound::RsIsInSync { sector, len },
                    Command::P_NEG_RS_DREPLY => Inbound::NegRsDReply { sector, len },
                    Command::P_RS_CANCEL => Inbound::RsCancel { sector, len },
                    Command::P_RS_WRITE_ACK if syncer => Inbound::RsWriteAck { sector, len },
                    Command::P_NEG_ACK if syncer => Inbound::RsNegAck { sector, len },
                    Command::P_OV_RESULT => Inbound::OvResult {
                        sector,
                        len,
                        in_sync: match ack.block_id {
                            ID_IN_SYNC => true,
                            ID_OUT_OF_SYNC => false,
                            _ => return Err(Error::Protocol("P_OV_RESULT block_id")),
                        },
                    },
                    _ => return Ok(None),
                }
            }
            _ => return Ok(None),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{decode_frame, encode, WireCtx};

    fn round_trip(p: &Packet, data: &[u8]) -> Packet {
        let ctx = WireCtx::new(101, crate::wire::ff::PRO_FEATURES_84).expect("ctx");
        let mut buf = Vec::new();
        encode(p, &ctx, 0, &mut buf).expect("encodes");
        buf.extend_from_slice(data);
        let f = decode_frame(&buf, &ctx).expect("decodes").expect("whole");
        assert_eq!(f.len, buf.len());
        assert_eq!(f.data, data);
        f.packet
    }

    #[test]
    fn every_send_round_trips_through_the_codec_to_its_input() {
        let d = Digest::of(b"x");
        let cases: Vec<(Option<Packet>, Inbound)> = vec![
            (
                TargetOutput::SendRsDataRequest {
                    sector: 8,
                    len: 4096,
                    thin: false,
                }
                .packet(),
                Inbound::RsRequest {
                    sector: 8,
                    len: 4096,
                    kind: RequestKind::Data,
                },
            ),
            (
                TargetOutput::SendRsDataRequest {
                    sector: 8,
                    len: 4096,
                    thin: true,
                }
                .packet(),
                Inbound::RsRequest {
                    sector: 8,
                    len: 4096,
                    kind: RequestKind::Thin,
                },
            ),
            (
                TargetOutput::SendCsumRsRequest {
                    sector: 16,
                    len: 8192,
                    digest: d,
                }
                .packet(),
                Inbound::RsRequest {
                    sector: 16,
                    len: 8192,
                    kind: RequestKind::Csum(d),
                },
            ),
            (
                TargetOutput::SendRsWriteAck {
                    sector: 1,
                    len: 512,
                }
                .packet(),
                Inbound::RsWriteAck {
                    sector: 1,
                    len: 512,
                },
            ),
            (
                TargetOutput::SendNegAck {
                    sector: 1,
                    len: 512,
                }
                .packet(),
                Inbound::RsNegAck {
                    sector: 1,
                    len: 512,
                },
            ),
            (
                SourceOutput::SendRsDeallocated {
                    sector: 2,
                    len: 4096,
                }
                .packet(),
                Inbound::RsDeallocated {
                    sector: 2,
                    len: 4096,
                },
            ),
            (
                SourceOutput::SendRsIsInSync {
                    sector: 2,
                    len: 4096,
                }
                .packet(),
                Inbound::RsIsInSync {
                    sector: 2,
                    len: 4096,
                },
            ),
            (
                SourceOutput::SendNegRsDReply {
                    sector: 2,
                    len: 4096,
                }
                .packet(),
                Inbound::NegRsDReply {
                    sector: 2,
                    len: 4096,
                },
            ),
            (
                VerifyOutput::SendOvRequest {
                    sector: 0,
                    len: 4096,
                }
                .packet(),
                Inbound::OvRequest {
                    sector: 0,
                    len: 4096,
                },
            ),
            (
                VerifyOutput::SendOvResult {
                    sector: 0,
                    len: 4096,
                    in_sync: false,
                }
                .packet(),
                Inbound::OvResult {
                    sector: 0,
                    len: 4096,
                    in_sync: false,
                },
            ),
            (
                VerifyOutput::SendOvReply {
                    sector: 0,
                    len: 4096,
                    digest: d,
                }
                .packet(),
                Inbound::OvReply {
                    sector: 0,
                    len: 4096,
                    digest: d,
                },
            ),
        ];
        for (p, want) in cases {
            let p = p.expect("a send");
            let back = round_trip(&p, &[]);
            assert_eq!(back, p);
            assert_eq!(Inbound::from_packet(&back), Ok(Some(want)));
        }
        let reply = SourceOutput::SendRsDataReply {
            tag: 1,
            sector: 24,
            len: 4096,
        }
        .packet()
        .expect("a send");
        let back = round_trip(&reply, &[7u8; 4096]);
        assert_eq!(
            Inbound::from_packet(&back),
            Ok(Some(Inbound::RsDataReply {
                sector: 24,
                len: 4096
            }))
        );
        // An application write's ack is not resync's.
        let app_ack = ack(Command::P_RS_WRITE_ACK, 0, 4096, 77);
        assert_eq!(Inbound::from_packet(&app_ack), Ok(None));
        assert!(Inbound::from_packet(&ack(Command::P_OV_RESULT, 0, 4096, 1)).is_err());
        assert!(Inbound::from_packet(&req(Command::P_OV_REPLY, 0, 4096, &[1; 16])).is_err());
        assert!(TargetOutput::AppWriteReady { id: 1 }.packet().is_none());
    }
}
