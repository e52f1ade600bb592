//! Generation UUIDs and the sync decision: DRBD 8.4's UUID life cycle,
//! `drbd_uuid_compare` and `drbd_sync_handshake`, as pure functions.
//!
//! When two nodes connect, each decides **on its own**, from both sides' UUIDs, roles and
//! disk states, whether to resync, in which direction, and whether from the bitmap or in
//! full. No packet carries the decision. A kernel DRBD 8.4 peer runs its C code on the
//! mirrored inputs, so this module must reproduce that table exactly: one different rule
//! and the two sides disagree (both SyncSource, or one syncing while the other
//! disconnects). Everything here is pure. The caller supplies random numbers, the roles
//! and the disk states, and applies the results (corrections, new UUIDs) itself.
//! Nothing here does I/O or keeps state between calls.
//!
//! Sources: LINBIT drbd-8.4 `27deda96` (8.4.12) `drbd_receiver.c` (`drbd_uuid_compare`,
//! `drbd_sync_handshake`, `drbd_asb_recover_{0,1,2}p`, `receive_uuids`, `receive_state`,
//! `receive_sync_uuid`), `drbd_main.c` (`_drbd_send_uuids`, `__drbd_uuid_set`,
//! `drbd_uuid_set`, `drbd_uuid_new_current`, `drbd_uuid_set_bm`,
//! `drbd_gen_and_send_sync_uuid`), `drbd_worker.c` (`drbd_resync_finished`),
//! `drbd_state.c` (`after_state_ch`), `drbd_nl.c` (`drbd_set_role`,
//! `drbd_adm_new_c_uuid`). The in-tree 8.4.11 receiver (docs/drbd-reference.md, source \[L\])
//! has the same two decision functions, rule 41 included, and `tests/uuid_captures.rs`
//! checks the decisions against the Linux 6.12 kernel's. The config names come from
//! drbd-utils `user/v84/config_flags.c`.
//!
//! # The UUID set
//!
//! `P_UUIDS` offset, field: meaning.
//!
//! - 0, `current`: the generation of the data on this disk; bit 0 = "was Primary"
//! - 8, `bitmap`: the generation the bitmap counts changes against (0: none)
//! - 16, 24, `history[0..2]`: older generations, newest first
//! - 32, `dirty_bits`: bits set in the bitmap when the packet was sent (`comm_bm_set`)
//! - 40, `uuid_flags`: 1 discard-my-data, 2 crashed primary, 4 disk Inconsistent, 8 skip initial
//!   sync
//!
//! [`UuidSet`] is the four UUIDs and [`UuidPacket`] the whole payload. It converts to
//! and from [`crate::wire::Uuids`] and the `[u64; 6]` array DRBD uses (`p_uuid[]`, indexed by
//! `UI_CURRENT` … `UI_FLAGS`). A fresh disk has `current = UUID_JUST_CREATED` (4) and
//! zeros elsewhere.
//!
//! **History slots.** tandem keeps [`HISTORY_UUIDS`] = 2, like the v08 superblock
//! (`uuid[4]`: current, bitmap, history\[2\]). The v09 superblock has 32
//! (`history_uuids[32]`, plus a bitmap UUID per peer slot), but `P_UUIDS` carries only 2
//! to an 8.4 peer, and rules 60, 80 and 100 only look at those. More slots could never
//! change a decision against an 8.4 peer, and the two sides must see the same history.
//!
//! **Bit 0 of `current`** is 1 while, or since, this node was Primary in that generation.
//! `__drbd_uuid_set(UI_CURRENT)` sets it from the role at the time, promotion sets it
//! and demotion clears it. Every comparison masks it off. The bitmap UUID keeps the bit
//! of the current UUID it was made from. `after-sb-0pri discard-younger/older-primary`
//! reads exactly that bit: it tells whether the node was Primary before the split.
//!
//! # Life cycle ([`UuidSet`] methods)
//!
//! - [`UuidSet::new_current`] (DRBD: `drbd_uuid_new_current`): bitmap ← current (the old bitmap
//!   UUID is overwritten, DRBD only warns), current ← random, bit 0 ← role
//! - [`UuidSet::promote`] (DRBD: `drbd_set_role` (Primary)): new current if forced, or if the
//!   peer's disk is unreachable and bitmap = 0; then bit 0 ← 1
//! - [`UuidSet::demote`] (DRBD: `drbd_set_role` (Secondary)): bit 0 ← 0
//! - [`UuidSet::lost_peer_disk`] (DRBD: `after_state_ch`, `lost_contact_to_peer_data`): new current
//!   if either side is Primary, bitmap = 0 and the local disk is UpToDate
//! - [`UuidSet::start_sync_source`] (DRBD: `drbd_gen_and_send_sync_uuid`): bitmap ← bitmap + 2^48
//!   (random if it was 0 or `JUST_CREATED`); the old bitmap rotates into history; the result is
//!   sent in `P_SYNC_UUID`
//! - [`UuidSet::start_sync_target`] (DRBD: `receive_sync_uuid`): current ← the received sync UUID
//!   (bit 0 ← role), bitmap ← 0 (no rotation)
//! - [`UuidSet::finish_sync_source`] (DRBD: `drbd_resync_finished`): bitmap rotates into history
//!   (`drbd_uuid_set_bm(0)`)
//! - [`UuidSet::finish_sync_target`] (DRBD: `drbd_resync_finished`): bitmap, history ← the peer's;
//!   then its own current rotates in as bitmap; current ← the peer's current; then the bitmap
//!   rotates into history
//! - [`UuidSet::new_current_uuid_cmd`] (DRBD: `drbd_adm_new_c_uuid`): the bitmap rotates into
//!   history, then a new current; with `--clear-bitmap` on a fresh connected pair, the bitmap UUID
//!   is zeroed after `P_UUIDS` with flag 8 is sent
//! - [`UuidSet::accept_skip_initial_sync`] (DRBD: `receive_uuids`): a just-created disk adopts the
//!   peer's current and bitmap 0 when flag 8 arrives
//!
//! After a successful resync both sides hold the same four UUIDs. On the source,
//! `(X, S, [B, h0])` becomes `(X, 0, [S, B])`, where S = B + 2^48 is the sync UUID. The
//! target ends up with the same set, apart from bit 0 of its own copies.
//!
//! # `uuid_compare` ([`uuid_compare`])
//!
//! The result is DRBD's integer `hg`: > 0 means this node becomes SyncSource, ±1 means
//! use the bitmap, ±2 means a full sync. UUIDs are compared with bit 0 masked off.
//!
//! Rule: condition (me vs. peer) → hg.
//!
//! - 10: both currents `JUST_CREATED` → 0
//! - 20: mine `JUST_CREATED` or 0, the peer's not `JUST_CREATED` → −2
//! - 30: the peer's `JUST_CREATED` or 0, mine not → +2
//! - 34: currents equal, my bitmap ≠ 0, the peer's 0, and my bitmap = peer h0 and my h0 = peer h1:
//!   I missed "resync finished". **Correction (mine):** the bitmap rotates into history → +1
//! - 36: as 34 without the history match (the peer failed to write the sync UUID) → +1
//! - 35: currents equal, my bitmap 0, the peer's ≠ 0, and my h0 = peer bitmap and my h1 = peer h0:
//!   the peer missed it. **Correction (peer):** its bitmap rotates into history → −1
//! - 37: as 35 without the history match → −1
//! - 34–37, agreed < 91 → −1091 (reported with rule 30, as DRBD does)
//! - 40: currents equal, neither side crashed while Primary → 0
//! - 41: currents equal, a crashed-primary flag set, someone Primary now: needs `FF_WSAME` (else
//!   −(0x10000 | 101 | 4≪8) = −66661); both Primary: −100; else the Primary is source → ±1 / −100
//! - 40 (rct): both Secondary: only I crashed +1, only the peer −1, both: −1 if I hold
//!   `RESOLVE_CONFLICTS`, else +1 → ±1
//! - 50: my current = peer bitmap → −1
//! - 51: my current = peer h0, and (agreed < 96: my h0 = peer h1; ≥ 96: peer h0 + 2^48 = peer
//!   bitmap). The peer's `P_SYNC_UUID` was lost. **Correction (peer):** bitmap ← h0, h0 ← h1 (h1
//!   stays); < 91: −1091 → −1
//! - 60: my current ∈ peer history → −2
//! - 70: my bitmap = peer current → +1
//! - 71: my h0 = peer current, and (< 96: my h1 = peer h0; ≥ 96: my h0 + 2^48 = my bitmap). My
//!   `P_SYNC_UUID` was lost. **Correction (mine):** bitmap ← h0, h0 ← h1; < 91: −1091 → +1
//! - 80: peer current ∈ my history → +2
//! - 90: bitmaps equal and ≠ 0 → 100 (split brain, auto-recovery possible)
//! - 100: any history UUID of mine = any of the peer's → −100 (split brain)
//! - –: nothing matched → −1000 (unrelated data)
//!
//! −1096 ("needs protocol 96") appears in DRBD's comment table, but no 8.4 code path
//! returns it. [`SyncDecision::from_drbd`] still decodes it. DRBD applies the corrections
//! to its in-memory UUIDs. Here they come back as [`Correction`], which the caller
//! applies: a `Mine` correction must be persisted, a `Peer` one updates what this node
//! knows of the peer. The peer makes the mirrored correction to its own UUIDs.
//!
//! # `sync_handshake` ([`sync_handshake`])
//!
//! 1. −1000, and the "needs protocol/feature" results, disconnect.
//! 2. If exactly one disk is Inconsistent (the other above it, `DUnknown` included), the
//!    disk states decide: the Inconsistent side becomes SyncTarget. The sync is full if
//!    hg was ±2 or −100, bitmap-based otherwise (100 included).
//! 3. hg = 100, or −100 with `always-asbp`, applies the after-sb policy for the number of
//!    Primaries now (table below). If it decides, and hg was −100, the sync is made full.
//! 4. A remaining −100 is decided by discard-my-data if exactly one side set it (that
//!    side becomes SyncTarget, bitmap-based). Otherwise split brain: disconnect.
//! 5. SyncSource with a disk ≤ Inconsistent: disconnect. SyncTarget while Primary with a
//!    disk ≥ Consistent: `rr-conflict` (disconnect unless `violently`).
//! 6. hg = 0 → Connected, > 0 → WFBitMapS, < 0 → WFBitMapT. |hg| = 2 sets the whole bitmap.
//!
//! DRBD's helpers (`initial-split-brain`, `split-brain`, `pri-lost`,
//! `pri-lost-after-sb`) are user-mode programs. tandem has none. [`Handshake`] reports
//! where DRBD would have called one, and the **`call-pri-lost*` policies act as
//! `disconnect`**. DRBD's `call-pri-lost-after-sb` can also resolve a split brain by
//! demoting this node in the middle of the handshake. tandem does not demote itself
//! there, so it drops the connection, and the split brain waits for the operator. Dry-run
//! (`tentative`) connects are not modelled.
//!
//! ## After-split-brain policies
//!
//! "Changes" are the `dirty_bits` each side reported. "Was Primary" is bit 0 of its
//! bitmap UUID. A tie goes to the side without `RESOLVE_CONFLICTS` as SyncSource.
//!
//! Option: value → decision (the loser becomes SyncTarget).
//!
//! - after-sb-0pri
//!   - `disconnect` (default) → none: split brain
//!   - `discard-younger-primary` → discard the side that was not Primary before the split.
//!     Undecided: zero-changes, then least-changes
//!   - `discard-older-primary` → discard the side that was Primary before the split. Undecided: as
//!     above
//!   - `discard-zero-changes` → a side without changes is discarded (both without: tie). Both
//!     changed: split brain
//!   - `discard-least-changes` → the side with fewer changes is discarded. Equal: tie
//!   - `discard-local` / `discard-remote` → this node's / the peer's data is discarded
//! - after-sb-1pri
//!   - `disconnect` (default) → none
//!   - `consensus` → the after-sb-0pri decision, if it discards the Secondary. Otherwise none
//!   - `violently-as0p` → the after-sb-0pri decision, even if it discards the Primary's data
//!   - `discard-secondary` → the Secondary's data is discarded
//!   - `call-pri-lost-after-sb` → tandem: none (DRBD: 0pri's decision, demoting the Primary if it
//!     loses)
//! - after-sb-2pri
//!   - `disconnect` (default) → none
//!   - `violently-as0p` → the after-sb-0pri decision
//!   - `call-pri-lost-after-sb` → tandem: none (DRBD: as for 1pri)
//! - `always-asbp`
//!   - off (default) → on: also apply the policies to rule 100 (−100), with a full sync
//! - rr-conflict
//!   - `disconnect` (default) / `call-pri-lost` → a Primary that would become SyncTarget drops the
//!     connection
//!   - `violently` → it becomes SyncTarget anyway
//! - discard-my-data
//!   - per connect, either side → decides a split brain left unresolved: that side becomes
//!     SyncTarget
//!
//! A 0pri policy that is not one of its values (and likewise for 1pri and 2pri) is a
//! "Configuration error" in DRBD that acts as disconnect. The types here cannot express
//! it. `P_PROTOCOL` carries each side's policies, and DRBD refuses a peer whose
//! policies differ, with `discard-local` and `discard-remote` swapped
//! ([`AfterSb0Pri::matches_peer`]).
//!
//! # `RESOLVE_CONFLICTS`
//!
//! Exactly one side of a connection holds it, and it breaks the ties above (and, in
//! DRBD, concurrent-write conflicts). DRBD 8.4 and DRBD 9's TCP transport give it to the
//! node that **accepted the meta socket**, the one that received `P_INITIAL_META`
//! (`conn_connect`: `set_bit` on receiving it, `clear_bit` on sending it). No address
//! decides it. When tandem opens both sockets (it connects when its address sorts
//! higher), the peer holds the flag. When the peer's pair is taken, tandem holds it. The
//! caller must take it from the connection actually made, or the two sides break ties
//! the same way and disagree.
//!
//! # DRBD 9
//!
//! A DRBD 9 node talking 8.4's protocol (< 110) still sends `P_UUIDS` with two history
//! slots, but it decides with its own `drbd_uuid_compare` (named rules, per-peer bitmap
//! UUIDs, `UUID_FLAG_RECONNECT`, quorum flags). Where it differs from 8.4:
//! - its "SyncSource missed the resync end" fix-up (8.4 rule 34) requires my h0 = peer
//!   h0, where 8.4 requires my h0 = peer h1;
//! - it treats a current UUID of 0 as `JUST_CREATED` on both sides, so both 0 means no
//!   sync. 8.4's rule 20 makes each side want to be the SyncTarget;
//! - "both crashed while Primary" is decided without 8.4's rule 41, and 9.2 adds a
//!   protocol-A/B case.
//!
//! This module implements 8.4, the dialect tandem speaks. Against a DRBD 9 peer the
//! corner cases above can decide differently, and nothing guarantees that the two sides
//! then agree. The caller must compare the peer's next `P_STATE` with its own decision
//! (a SyncSource expects WFBitMapT, a SyncTarget WFBitMapS, Connected expects
//! Connected), and drop the connection on a mismatch.

use super::{DiskState, UnknownName};
use crate::wire;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

pub use crate::wire::uuid_flags::{
    UUID_FLAG_CRASHED_PRIMARY, UUID_FLAG_DISCARD_MY_DATA, UUID_FLAG_INCONSISTENT,
    UUID_FLAG_SKIP_INITIAL_SYNC,
};

/// The current UUID of freshly created metadata (`UUID_JUST_CREATED`).
pub const UUID_JUST_CREATED: u64 = 4;
/// What a SyncSource adds to its bitmap UUID to make the sync UUID
/// (`UUID_NEW_BM_OFFSET`, 2^48).
pub const UUID_NEW_BM_OFFSET: u64 = 1 << 48;
/// Bit 0 of the current UUID: this node was Primary in this generation.
pub(crate) const UUID_PRIMARY: u64 = 1;
/// History slots tandem keeps: what `P_UUIDS` and the v08 superblock carry.
pub(crate) const HISTORY_UUIDS: usize = 2;
/// History slots of the DRBD 9 (v09) superblock, for reference. tandem keeps
/// [`HISTORY_UUIDS`], since an 8.4 peer never sees more.
pub const V09_HISTORY_UUIDS: usize = 32;
/// `PRO_VERSION_MAX` of DRBD 8.4, which rule 41 puts into its "needs feature" result.
pub(crate) const DRBD84_PRO_VERSION_MAX: u32 = 101;

/// Bit 0 masked off: the form in which DRBD compares UUIDs.
fn m(uuid: u64) -> u64 {
    uuid & !UUID_PRIMARY
}

/// A random UUID from `rng`, for [`UuidSet::new_current`] and
/// [`UuidSet::start_sync_source`]. DRBD takes `get_random_bytes` as it comes. This draws
/// again on the 2^-62 chance that the value, bit 0 masked, is 0 or `JUST_CREATED`, whose
/// meanings no generation may take. The peer cannot tell the difference.
pub fn random_uuid<R: rand::RngCore + ?Sized>(rng: &mut R) -> u64 {
    loop {
        let v = rng.next_u64();
        if m(v) != 0 && m(v) != UUID_JUST_CREATED {
            return v;
        }
    }
}

/// A node's generation UUIDs (`ldev->md.uuid[UI_CURRENT..=UI_HISTORY_END]`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct UuidSet {
    /// Current data generation. Bit 0: was Primary.
    pub current: u64,
    /// The generation the bitmap counts changes against. 0: none.
    pub bitmap: u64,
    /// Older generations, newest first.
    pub history: [u64; HISTORY_UUIDS],
}

impl fmt::Display for UuidSet {
    /// DRBD's log format: `current:bitmap:history0:history1`, 16 hex digits each.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:016X}:{:016X}:{:016X}:{:016X}",
            self.current, self.bitmap, self.history[0], self.history[1]
        )
    }
}

impl UuidSet {
    /// The UUIDs of freshly created metadata: current `JUST_CREATED`, all else 0.
    pub const JUST_CREATED: UuidSet = UuidSet {
        current: UUID_JUST_CREATED,
        bitmap: 0,
        history: [0; HISTORY_UUIDS],
    };

    /// Whether bit 0 of the current UUID is set (Primary in this generation).
    pub fn was_primary(&self) -> bool {
        self.current & UUID_PRIMARY != 0
    }

    /// Whether the current UUID is still `JUST_CREATED` (bit 0 masked).
    pub fn is_just_created(&self) -> bool {
        m(self.current) == UUID_JUST_CREATED
    }

    /// `drbd_uuid_move_history`: history\[0\] moves to history\[1\]. The oldest is dropped.
    fn move_history(&mut self) {
        self.history[1] = self.history[0];
    }

    /// `drbd_uuid_set(UI_BITMAP, val)`: a non-zero old bitmap UUID rotates into history
    /// first.
    fn set_bitmap_rotating(&mut self, val: u64) {
        if self.bitmap != 0 {
            self.move_history();
            self.history[0] = self.bitmap;
        }
        self.bitmap = val;
    }

    /// `__drbd_uuid_set(UI_CURRENT, val)`: bit 0 follows the role at the time.
    pub fn set_current(&mut self, val: u64, primary: bool) {
        self.current = if primary { val | UUID_PRIMARY } else { m(val) };
    }

    /// `drbd_uuid_new_current`: the current UUID becomes the bitmap UUID, and `random`,
    /// with bit 0 from the role, the current one. This starts a new generation, and the
    /// bitmap now counts changes against the old one. It returns the bitmap UUID it
    /// overwrote, if one was set: DRBD only warns about that, and its callers avoid it by
    /// testing bitmap = 0 first (see [`Self::promote`], [`Self::lost_peer_disk`],
    /// [`Self::new_current_uuid_cmd`]).
    pub fn new_current(&mut self, random: u64, primary: bool) -> Option<u64> {
        let overwritten = (self.bitmap != 0).then_some(self.bitmap);
        self.bitmap = self.current;
        self.set_current(random, primary);
        overwritten
    }

    /// Promotion (`drbd_set_role` to Primary). A new current UUID is made when `forced`
    /// (`primary --force`), or when the peer's disk cannot be reached and no bitmap UUID
    /// is set yet. `peer_disk_reachable` = connected and the peer's disk > Failed. Either way bit 0
    /// is set afterwards. Returns whether a new UUID was made. DRBD then sends `P_UUIDS` if forced
    /// while connected.
    pub fn promote(&mut self, random: u64, peer_disk_reachable: bool, forced: bool) -> bool {
        let new = (!peer_disk_reachable && self.bitmap == 0) || forced;
        if new {
            self.new_current(random, true);
        }
        self.current |= UUID_PRIMARY;
        new
    }

    /// Demotion (`drbd_set_role` to Secondary): bit 0 is cleared.
    pub fn demote(&mut self) {
        self.current = m(self.current);
    }

    /// `after_state_ch` on losing contact with the peer's disk (the peer's disk goes
    /// from ≥ Inconsistent to unknown, Outdated or below Inconsistent). While either node
    /// is Primary and the local disk is UpToDate, new writes start a generation the peer
    /// does not have, unless a bitmap UUID already marks one. Returns whether a new
    /// current UUID was made. DRBD then sends `P_UUIDS` if still connected. (With I/O
    /// suspended DRBD defers this until the I/O resumes. That is the caller's business.)
    pub fn lost_peer_disk(
        &mut self,
        random: u64,
        primary: bool,
        peer_primary: bool,
        disk: DiskState,
    ) -> bool {
        let new = (primary || peer_primary)
            && self.bitmap == 0
            && disk.as_u32() >= DiskState::UpToDate.as_u32();
        if new {
            self.new_current(random, primary);
        }
        new
    }

    /// `drbd_gen_and_send_sync_uuid`, on becoming SyncSource (agreed ≥ 96: on entering
    /// SyncSource; below that, when the resync starts). The sync UUID is the bitmap UUID
    /// plus `UUID_NEW_BM_OFFSET`, or `random` if the bitmap UUID was 0 or
    /// `JUST_CREATED`. It becomes the new bitmap UUID, and a non-zero old bitmap UUID
    /// rotates into history. Returns the value to send in `P_SYNC_UUID`.
    pub fn start_sync_source(&mut self, random: u64) -> u64 {
        let sync_uuid = if self.bitmap != 0 && self.bitmap != UUID_JUST_CREATED {
            self.bitmap.wrapping_add(UUID_NEW_BM_OFFSET)
        } else {
            random
        };
        self.set_bitmap_rotating(sync_uuid);
        sync_uuid
    }

    /// `receive_sync_uuid`, on the SyncTarget: current ← the received sync UUID (bit 0
    /// from the role), bitmap ← 0. Nothing rotates into history. While the resync runs,
    /// this disk's generation is the source's bitmap generation, not yet the source's
    /// current one.
    pub fn start_sync_target(&mut self, sync_uuid: u64, primary: bool) {
        self.set_current(sync_uuid, primary);
        self.bitmap = 0;
    }

    /// `drbd_uuid_set_bm(0)`: a non-zero bitmap UUID rotates into history\[0\], and the
    /// bitmap UUID becomes 0.
    pub fn clear_bitmap_uuid(&mut self) {
        if self.bitmap != 0 {
            self.move_history();
            self.history[0] = self.bitmap;
            self.bitmap = 0;
        }
    }

    /// `drbd_resync_finished` on the SyncSource (no failed blocks): the bitmap UUID
    /// rotates into history.
    pub fn finish_sync_source(&mut self) {
        self.clear_bitmap_uuid();
    }

    /// `drbd_resync_finished` on the SyncTarget (no failed blocks). `peer` is the peer's
    /// UUID set as this node last received it (its `P_UUIDS` from the handshake). The
    /// bitmap and history become the peer's. This node's own current UUID (the sync
    /// UUID) rotates in as the bitmap UUID, then the current UUID becomes the peer's (bit
    /// 0 from this node's role), and finally the bitmap UUID rotates into history. After
    /// this, DRBD also overwrites its copy of the peer's UUIDs with the result. With
    /// failed blocks DRBD leaves the UUIDs as they are: the disk stays Inconsistent.
    pub fn finish_sync_target(&mut self, peer: &UuidSet, primary: bool) {
        self.bitmap = peer.bitmap;
        self.history = peer.history;
        let own = self.current;
        self.set_bitmap_rotating(own);
        self.set_current(peer.current, primary);
        self.clear_bitmap_uuid();
    }

    /// `drbd_adm_new_c_uuid` (`new-current-uuid`): the bitmap UUID rotates into history,
    /// then a new current UUID is made (the old current becomes the bitmap UUID). DRBD
    /// refuses the command unless StandAlone, or connected with `--clear-bitmap`, agreed
    /// ≥ 90 and a current UUID still `JUST_CREATED` ([`Self::may_skip_initial_sync`]).
    ///
    /// With `skip_initial_sync` (that second case) it returns the set to announce: the
    /// caller sends it in `P_UUIDS` with [`UUID_FLAG_SKIP_INITIAL_SYNC`] added to the
    /// usual flags. The announced set still has the bitmap UUID; afterwards this node
    /// zeroes it, holds `(new, 0, history)`, and both disks become UpToDate. The peer
    /// adopts the new current UUID with [`Self::accept_skip_initial_sync`].
    /// `--clear-bitmap` also clears the bitmap itself, which is the caller's part.
    pub fn new_current_uuid_cmd(
        &mut self,
        random: u64,
        primary: bool,
        skip_initial_sync: bool,
    ) -> Option<UuidSet> {
        self.clear_bitmap_uuid();
        self.new_current(random, primary);
        if !skip_initial_sync {
            return None;
        }
        let announce = *self;
        self.bitmap = 0;
        Some(announce)
    }

    /// Whether `new-current-uuid --clear-bitmap` may skip the initial sync: connected,
    /// agreed ≥ 90, and the current UUID still exactly `JUST_CREATED`.
    pub fn may_skip_initial_sync(&self, connected: bool, agreed_version: u32) -> bool {
        connected && agreed_version >= 90 && self.current == UUID_JUST_CREATED
    }

    /// `receive_uuids`: a connected just-created disk that gets `P_UUIDS` with
    /// [`UUID_FLAG_SKIP_INITIAL_SYNC`] (agreed ≥ 90) adopts the peer's current UUID,
    /// bitmap 0, and both disks become UpToDate (the caller also clears the bitmap).
    /// Returns whether it did.
    pub fn accept_skip_initial_sync(
        &mut self,
        peer: &UuidPacket,
        connected: bool,
        agreed_version: u32,
        primary: bool,
    ) -> bool {
        let skip = self.may_skip_initial_sync(connected, agreed_version)
            && peer.flags & UUID_FLAG_SKIP_INITIAL_SYNC != 0;
        if skip {
            self.set_current(peer.uuids.current, primary);
            self.bitmap = 0;
        }
        skip
    }
}

/// The whole `P_UUIDS` payload: a [`UuidSet`] plus `dirty_bits` and `uuid_flags`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct UuidPacket {
    /// The UUIDs.
    pub uuids: UuidSet,
    /// Bits set in the sender's bitmap (`comm_bm_set`), i.e. its changes.
    pub dirty_bits: u64,
    /// `UUID_FLAG_*` bits.
    pub flags: u64,
}

impl UuidPacket {
    /// The `P_UUIDS` this node sends (`_drbd_send_uuids`): flag 1 if the connection has
    /// discard-my-data, 2 while the crashed-primary flag is set, 4 if the disk the
    /// handshake works with (`new_state_tmp.disk`) is Inconsistent. Flag 8 only comes
    /// from [`UuidSet::new_current_uuid_cmd`].
    pub fn local(
        uuids: UuidSet,
        dirty_bits: u64,
        discard_my_data: bool,
        crashed_primary: bool,
        disk: DiskState,
    ) -> Self {
        let mut flags = 0;
        if discard_my_data {
            flags |= UUID_FLAG_DISCARD_MY_DATA;
        }
        if crashed_primary {
            flags |= UUID_FLAG_CRASHED_PRIMARY;
        }
        if disk == DiskState::Inconsistent {
            flags |= UUID_FLAG_INCONSISTENT;
        }
        UuidPacket {
            uuids,
            dirty_bits,
            flags,
        }
    }

    /// DRBD's `p_uuid[]` order: current, bitmap, history\[0\], history\[1\], dirty bits,
    /// flags.
    pub fn to_array(&self) -> [u64; 6] {
        [
            self.uuids.current,
            self.uuids.bitmap,
            self.uuids.history[0],
            self.uuids.history[1],
            self.dirty_bits,
            self.flags,
        ]
    }

    /// From DRBD's `p_uuid[]` order (see [`Self::to_array`]).
    pub fn from_array(a: [u64; 6]) -> Self {
        let [current, bitmap, h0, h1, dirty_bits, flags] = a;
        UuidPacket {
            uuids: UuidSet {
                current,
                bitmap,
                history: [h0, h1],
            },
            dirty_bits,
            flags,
        }
    }

    /// Whether the sender asked to discard its own data (flag 1).
    pub fn discard_my_data(&self) -> bool {
        self.flags & UUID_FLAG_DISCARD_MY_DATA != 0
    }

    /// Whether the sender crashed while Primary (flag 2).
    pub fn crashed_primary(&self) -> bool {
        self.flags & UUID_FLAG_CRASHED_PRIMARY != 0
    }
}

impl From<wire::Uuids> for UuidPacket {
    fn from(u: wire::Uuids) -> Self {
        UuidPacket {
            uuids: UuidSet {
                current: u.current,
                bitmap: u.bitmap,
                history: u.history,
            },
            dirty_bits: u.dirty_bits,
            flags: u.uuid_flags,
        }
    }
}

impl From<UuidPacket> for wire::Uuids {
    fn from(p: UuidPacket) -> Self {
        wire::Uuids {
            current: p.uuids.current,
            bitmap: p.uuids.bitmap,
            history: p.uuids.history,
            dirty_bits: p.dirty_bits,
            uuid_flags: p.flags,
        }
    }
}

/// The disk state the handshake uses for the peer (`receive_state`'s
/// `real_peer_disk`). A peer still Negotiating (attaching) counts as Inconsistent if its
/// `P_UUIDS` had flag 4, and as Consistent otherwise.
fn real_peer_disk(reported: DiskState, peer_flags: u64) -> DiskState {
    if reported == DiskState::Negotiating {
        if peer_flags & UUID_FLAG_INCONSISTENT != 0 {
            DiskState::Inconsistent
        } else {
            DiskState::Consistent
        }
    } else {
        reported
    }
}

// ---------------------------------------------------------------------------------------
// uuid_compare

/// What [`uuid_compare`] needs besides the two UUID sets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct CompareCtx {
    /// The agreed protocol version (86..=101).
    pub agreed_version: u32,
    /// `DRBD_FF_WSAME` is agreed. Rule 41 uses it as "the peer is new enough".
    pub wsame: bool,
    /// This node is Primary now.
    pub me_primary: bool,
    /// The peer is Primary now (from its `P_STATE`).
    pub peer_primary: bool,
    /// This node's crashed-primary flag (`CRASHED_PRIMARY`). It is set on attach if the
    /// metadata says Primary (`MDF_PRIMARY_IND`) or crashed-primary, and cleared once
    /// both disks are UpToDate.
    pub me_crashed_primary: bool,
    /// The peer's crashed-primary flag: bit 2 of its `uuid_flags`.
    pub peer_crashed_primary: bool,
    /// This node holds `RESOLVE_CONFLICTS`: it accepted the meta socket (see the
    /// module docs).
    pub resolve_conflicts: bool,
}

/// [`uuid_compare`]'s result as a type. DRBD's integer is [`Comparison::hg`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SyncDecision {
    /// 0: no resync.
    NoSync,
    /// +1: become SyncSource, send what the bitmap marks.
    SourceBitmap,
    /// +2: become SyncSource, full sync.
    SourceFull,
    /// −1: become SyncTarget, bitmap-based.
    TargetBitmap,
    /// −2: become SyncTarget, full sync.
    TargetFull,
    /// 100: split brain, the after-sb policies may resolve it.
    SplitBrainAutoRecoverable,
    /// −100: split brain.
    SplitBrain,
    /// −1000: the data sets share no generation.
    Unrelated,
    /// −1091 / −1096: needs protocol `version` (`features` 0), or
    /// −(0x10000 | version | features ≪ 8): needs that version and those feature flags.
    NeedsProtocol {
        /// Protocol version needed.
        version: u32,
        /// `DRBD_FF_*` bits needed (0: none).
        features: u32,
    },
}

impl SyncDecision {
    /// The decision for DRBD's integer, or `None` for an integer DRBD never produces.
    pub fn from_drbd(hg: i32) -> Option<Self> {
        Some(match hg {
            0 => SyncDecision::NoSync,
            1 => SyncDecision::SourceBitmap,
            2 => SyncDecision::SourceFull,
            -1 => SyncDecision::TargetBitmap,
            -2 => SyncDecision::TargetFull,
            100 => SyncDecision::SplitBrainAutoRecoverable,
            -100 => SyncDecision::SplitBrain,
            -1000 => SyncDecision::Unrelated,
            h if h < -0x10000 => {
                let v = h.unsigned_abs();
                SyncDecision::NeedsProtocol {
                    version: v & 0xff,
                    features: (v >> 8) & 0xff,
                }
            }
            h if (-1255..-1000).contains(&h) => SyncDecision::NeedsProtocol {
                version: h.unsigned_abs() - 1000,
                features: 0,
            },
            _ => return None,
        })
    }

    /// DRBD's integer for this decision.
    pub fn as_drbd(self) -> i32 {
        match self {
            SyncDecision::NoSync => 0,
            SyncDecision::SourceBitmap => 1,
            SyncDecision::SourceFull => 2,
            SyncDecision::TargetBitmap => -1,
            SyncDecision::TargetFull => -2,
            SyncDecision::SplitBrainAutoRecoverable => 100,
            SyncDecision::SplitBrain => -100,
            SyncDecision::Unrelated => -1000,
            SyncDecision::NeedsProtocol { version, features } => {
                let v = i32::try_from(version & 0xff).unwrap_or(0);
                if features == 0 {
                    -1000 - v
                } else {
                    let f = i32::try_from(features & 0xff).unwrap_or(0);
                    -(0x10000 | v | (f << 8))
                }
            }
        }
    }
}

/// Whose UUIDs a [`Correction`] replaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UuidSide {
    /// This node's own UUIDs: persist the corrected set.
    Mine,
    /// What this node knows of the peer's UUIDs (the peer corrects its own in step).
    Peer,
}

/// A fix-up DRBD makes to the UUIDs while comparing them (rules 34, 35, 51 and 71): an
/// earlier resync start or end was not recorded on one side. `uuids` is the corrected set
/// that replaces `side`'s.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Correction {
    /// Whose UUIDs change.
    pub side: UuidSide,
    /// The corrected set.
    pub uuids: UuidSet,
}

/// The result of [`uuid_compare`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Comparison {
    /// The decision.
    pub decision: SyncDecision,
    /// DRBD's integer ("uuid_compare()=%d").
    pub hg: i32,
    /// DRBD's rule number ("by rule %d").
    pub rule: u32,
    /// The UUID fix-up to apply, if any.
    pub correction: Option<Correction>,
}

impl fmt::Display for Comparison {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "uuid_compare()={} by rule {}", self.hg, self.rule)
    }
}

fn cmp_result(hg: i32, rule: u32, correction: Option<Correction>) -> Comparison {
    Comparison {
        // Every integer produced below is one from_drbd knows.
        decision: SyncDecision::from_drbd(hg).unwrap_or(SyncDecision::Unrelated),
        hg,
        rule,
        correction,
    }
}

/// `drbd_uuid_compare`: which side has the newer data, by DRBD 8.4's rule table (see
/// the module docs). `me` and `peer` are the UUID sets as received (`peer` from its
/// `P_UUIDS`).
pub(crate) fn uuid_compare(me: &UuidSet, peer: &UuidSet, ctx: &CompareCtx) -> Comparison {
    let this = m(me.current);
    let that = m(peer.current);

    if this == UUID_JUST_CREATED && that == UUID_JUST_CREATED {
        return cmp_result(0, 10, None);
    }
    if (this == UUID_JUST_CREATED || this == 0) && that != UUID_JUST_CREATED {
        return cmp_result(-2, 20, None);
    }
    if this != UUID_JUST_CREATED && (that == UUID_JUST_CREATED || that == 0) {
        return cmp_result(2, 30, None);
    }

    if this == that {
        if peer.bitmap == 0 && me.bitmap != 0 {
            if ctx.agreed_version < 91 {
                // DRBD returns before setting a rule number: the log says rule 30.
                return cmp_result(-1091, 30, None);
            }
            if m(me.bitmap) == m(peer.history[0]) && m(me.history[0]) == m(peer.history[1]) {
                let mut fixed = *me;
                fixed.move_history();
                fixed.history[0] = fixed.bitmap;
                fixed.bitmap = 0;
                let c = Correction {
                    side: UuidSide::Mine,
                    uuids: fixed,
                };
                return cmp_result(1, 34, Some(c));
            }
            return cmp_result(1, 36, None);
        }
        if me.bitmap == 0 && peer.bitmap != 0 {
            if ctx.agreed_version < 91 {
                return cmp_result(-1091, 30, None);
            }
            if m(me.history[0]) == m(peer.bitmap) && m(me.history[1]) == m(peer.history[0]) {
                let mut fixed = *peer;
                fixed.history[1] = fixed.history[0];
                fixed.history[0] = fixed.bitmap;
                fixed.bitmap = 0;
                let c = Correction {
                    side: UuidSide::Peer,
                    uuids: fixed,
                };
                return cmp_result(-1, 35, Some(c));
            }
            return cmp_result(-1, 37, None);
        }

        // Common power failure? Bit 0: I crashed as Primary, bit 1: the peer did.
        let rct = u8::from(ctx.me_crashed_primary) + 2 * u8::from(ctx.peer_crashed_primary);
        if rct == 0 {
            return cmp_result(0, 40, None);
        }
        if ctx.me_primary || ctx.peer_primary {
            if !ctx.wsame {
                let f = i32::try_from(wire::ff::DRBD_FF_WSAME).unwrap_or(0);
                let v = i32::try_from(DRBD84_PRO_VERSION_MAX).unwrap_or(0);
                return cmp_result(-(0x10000 | v | (f << 8)), 41, None);
            }
            if ctx.me_primary && ctx.peer_primary {
                return cmp_result(-100, 41, None);
            }
            return cmp_result(if ctx.me_primary { 1 } else { -1 }, 41, None);
        }
        let hg = match rct {
            1 => 1,
            2 => -1,
            _ => {
                if ctx.resolve_conflicts {
                    -1
                } else {
                    1
                }
            }
        };
        return cmp_result(hg, 40, None);
    }

    if this == m(peer.bitmap) {
        return cmp_result(-1, 50, None);
    }

    let peer_h0 = m(peer.history[0]);
    if this == peer_h0 {
        let lost_sync_uuid = if ctx.agreed_version < 96 {
            m(me.history[0]) == m(peer.history[1])
        } else {
            peer_h0.wrapping_add(UUID_NEW_BM_OFFSET) == m(peer.bitmap)
        };
        if lost_sync_uuid {
            if ctx.agreed_version < 91 {
                return cmp_result(-1091, 51, None);
            }
            let mut fixed = *peer;
            fixed.bitmap = peer.history[0];
            fixed.history[0] = peer.history[1];
            let c = Correction {
                side: UuidSide::Peer,
                uuids: fixed,
            };
            return cmp_result(-1, 51, Some(c));
        }
    }

    if peer.history.iter().any(|&h| m(h) == this) {
        return cmp_result(-2, 60, None);
    }

    if m(me.bitmap) == that {
        return cmp_result(1, 70, None);
    }

    let my_h0 = m(me.history[0]);
    if my_h0 == that {
        let lost_sync_uuid = if ctx.agreed_version < 96 {
            m(me.history[1]) == m(peer.history[0])
        } else {
            my_h0.wrapping_add(UUID_NEW_BM_OFFSET) == m(me.bitmap)
        };
        if lost_sync_uuid {
            if ctx.agreed_version < 91 {
                return cmp_result(-1091, 71, None);
            }
            let mut fixed = *me;
            fixed.bitmap = me.history[0];
            fixed.history[0] = me.history[1];
            let c = Correction {
                side: UuidSide::Mine,
                uuids: fixed,
            };
            return cmp_result(1, 71, Some(c));
        }
    }

    if me.history.iter().any(|&h| m(h) == that) {
        return cmp_result(2, 80, None);
    }

    if m(me.bitmap) == m(peer.bitmap) && m(me.bitmap) != 0 {
        return cmp_result(100, 90, None);
    }

    if me
        .history
        .iter()
        .any(|&a| peer.history.iter().any(|&b| m(a) == m(b)))
    {
        return cmp_result(-100, 100, None);
    }

    cmp_result(-1000, 100, None)
}

// ---------------------------------------------------------------------------------------
// Policies

/// Declares an after-sb style policy enum: DRBD's config names (kebab-case) for
/// `FromStr`, `Display` and serde, and its `enum drbd_after_sb_p` number for `P_PROTOCOL`.
macro_rules! asb_enum {
    (
        $(#[$meta:meta])*
        $name:ident, $kind:literal {
            $( $(#[$vmeta:meta])* $var:ident = $wire:literal => $text:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
        pub enum $name {
            $( $(#[$vmeta])* $var, )+
        }

        impl $name {
            /// Every value.
            pub const ALL: &'static [$name] = &[ $( $name::$var, )+ ];

            /// The config name (as `drbdsetup` and `drbd.conf` spell it).
            pub fn name(self) -> &'static str {
                match self {
                    $( $name::$var => $text, )+
                }
            }

            /// DRBD's `enum drbd_after_sb_p` number, as `P_PROTOCOL` carries it.
            pub fn as_wire(self) -> u32 {
                match self {
                    $( $name::$var => $wire, )+
                }
            }

            /// The value with `P_PROTOCOL` number `v`, or `None` if this option has
            /// no such value.
            pub fn from_wire(v: u32) -> Option<Self> {
                match v {
                    $( $wire => Some($name::$var), )+
                    _ => None,
                }
            }
        }

        named_enum_impls!($name, $kind);
    };
}

asb_enum! {
    /// `after-sb-0pri`: split brain with no Primary now.
    AfterSb0Pri, "after-sb-0pri policy" {
        /// Do not resolve: disconnect.
        #[default]
        Disconnect = 0 => "disconnect",
        /// Discard the side that was not Primary before the split.
        DiscardYoungerPrimary = 1 => "discard-younger-primary",
        /// Discard the side that was Primary before the split.
        DiscardOlderPrimary = 2 => "discard-older-primary",
        /// Discard a side that made no changes.
        DiscardZeroChanges = 3 => "discard-zero-changes",
        /// Discard the side with fewer changes.
        DiscardLeastChanges = 4 => "discard-least-changes",
        /// Discard this node's data.
        DiscardLocal = 5 => "discard-local",
        /// Discard the peer's data.
        DiscardRemote = 6 => "discard-remote",
    }
}

impl AfterSb0Pri {
    /// Whether the peer's `P_PROTOCOL` value `peer_wire` is compatible with this
    /// setting (`receive_protocol` → `convert_after_sb`): equal, except that the peer's
    /// `discard-local` must be this node's `discard-remote` and vice versa.
    pub fn matches_peer(self, peer_wire: u32) -> bool {
        let local = AfterSb0Pri::DiscardLocal.as_wire();
        let remote = AfterSb0Pri::DiscardRemote.as_wire();
        let seen = if peer_wire == remote {
            local
        } else if peer_wire == local {
            remote
        } else {
            peer_wire
        };
        seen == self.as_wire()
    }
}

asb_enum! {
    /// `after-sb-1pri`: split brain with one Primary now.
    AfterSb1Pri, "after-sb-1pri policy" {
        /// Do not resolve: disconnect.
        #[default]
        Disconnect = 0 => "disconnect",
        /// Follow after-sb-0pri if it discards the Secondary's data.
        Consensus = 7 => "consensus",
        /// Discard the Secondary's data.
        DiscardSecondary = 8 => "discard-secondary",
        /// DRBD: after-sb-0pri, demoting the Primary if it loses. tandem: disconnect.
        CallPriLostAfterSb = 9 => "call-pri-lost-after-sb",
        /// Follow after-sb-0pri, even if it discards the Primary's data.
        ViolentlyAs0p = 10 => "violently-as0p",
    }
}

asb_enum! {
    /// `after-sb-2pri`: split brain with both nodes Primary now.
    AfterSb2Pri, "after-sb-2pri policy" {
        /// Do not resolve: disconnect.
        #[default]
        Disconnect = 0 => "disconnect",
        /// DRBD: after-sb-0pri, demoting the losing Primary. tandem: disconnect.
        CallPriLostAfterSb = 9 => "call-pri-lost-after-sb",
        /// Follow after-sb-0pri.
        ViolentlyAs0p = 10 => "violently-as0p",
    }
}

asb_enum! {
    /// `rr-conflict`: the handshake makes a Primary the SyncTarget.
    RrConflict, "rr-conflict policy" {
        /// Drop the connection.
        #[default]
        Disconnect = 0 => "disconnect",
        /// DRBD: call the `pri-lost` helper, then drop the connection. tandem: drop it.
        CallPriLost = 9 => "call-pri-lost",
        /// Become SyncTarget anyway: the data under the application changes.
        Violently = 10 => "violently",
    }
}

/// The net options that steer the handshake after a split brain. The defaults are
/// DRBD's: disconnect everywhere, `always-asbp` off.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default)]
pub struct SplitBrainPolicy {
    /// `after-sb-0pri`.
    pub after_sb_0pri: AfterSb0Pri,
    /// `after-sb-1pri`.
    pub after_sb_1pri: AfterSb1Pri,
    /// `after-sb-2pri`.
    pub after_sb_2pri: AfterSb2Pri,
    /// `always-asbp`: also apply the policies when the histories only partly match
    /// (rule 100), with a full sync.
    pub always_asbp: bool,
    /// `rr-conflict`.
    pub rr_conflict: RrConflict,
}

// ---------------------------------------------------------------------------------------
// sync_handshake

/// One side as [`sync_handshake`] sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HandshakeSide {
    /// Its UUIDs (the peer's from its `P_UUIDS`).
    pub uuids: UuidSet,
    /// Its changes: the `dirty_bits` it sent in `P_UUIDS` (for this node,
    /// `comm_bm_set`, the bitmap weight when its `P_UUIDS` went out).
    pub dirty_bits: u64,
    /// Primary now.
    pub primary: bool,
    /// Its disk state. For this node, the disk it attaches with if it is still
    /// Negotiating (DRBD's `mydisk`). For the peer, [`real_peer_disk`] of its `P_STATE`.
    /// DRBD's rr-conflict test reads the raw state instead, which differs only while a
    /// disk attaches during a live connection; tandem attaches before it connects.
    pub disk: DiskState,
    /// Its crashed-primary flag (the peer's: `uuid_flags & 2`).
    pub crashed_primary: bool,
    /// It connected with discard-my-data (the peer's: `uuid_flags & 1`).
    pub discard_my_data: bool,
}

impl HandshakeSide {
    /// The `P_UUIDS` this side sends ([`UuidPacket::local`]); [`Self::peer`] of it (with
    /// the role and disk of its `P_STATE`) is this side again.
    pub fn packet(&self) -> UuidPacket {
        UuidPacket::local(
            self.uuids,
            self.dirty_bits,
            self.discard_my_data,
            self.crashed_primary,
            self.disk,
        )
    }

    /// The peer as its `P_UUIDS` and `P_STATE` describe it (`role_primary` and `disk`
    /// from `P_STATE`; a Negotiating disk is resolved with [`real_peer_disk`]).
    pub fn peer(p: &UuidPacket, primary: bool, disk: DiskState) -> Self {
        HandshakeSide {
            uuids: p.uuids,
            dirty_bits: p.dirty_bits,
            primary,
            disk: real_peer_disk(disk, p.flags),
            crashed_primary: p.crashed_primary(),
            discard_my_data: p.discard_my_data(),
        }
    }
}

/// The connection facts [`sync_handshake`] needs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HandshakeCtx {
    /// The agreed protocol version.
    pub agreed_version: u32,
    /// `DRBD_FF_WSAME` is agreed.
    pub wsame: bool,
    /// This node holds `RESOLVE_CONFLICTS` (it accepted the meta socket).
    pub resolve_conflicts: bool,
}

/// Why the handshake drops the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DisconnectReason {
    /// −1000: the two disks share no generation.
    UnrelatedData,
    /// The decision needs a newer protocol or feature than agreed.
    NeedsProtocol {
        /// Protocol version needed.
        version: u32,
        /// `DRBD_FF_*` bits needed.
        features: u32,
    },
    /// Split brain that no policy and no discard-my-data resolved.
    SplitBrain,
    /// This node would be SyncSource, but its disk is not consistent.
    SourceInconsistent,
    /// This node would be SyncTarget while Primary, and `rr-conflict` says no.
    TargetPrimary,
}

impl fmt::Display for DisconnectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DisconnectReason::UnrelatedData => f.write_str("unrelated data"),
            DisconnectReason::NeedsProtocol { version, features } => write!(
                f,
                "both sides need at least protocol {version} and feature flags {features:#x}"
            ),
            DisconnectReason::SplitBrain => f.write_str("split brain detected but unresolved"),
            DisconnectReason::SourceInconsistent => {
                f.write_str("this node would become SyncSource, but its disk is inconsistent")
            }
            DisconnectReason::TargetPrimary => {
                f.write_str("this node would become SyncTarget, but it is Primary")
            }
        }
    }
}

/// What the connection does next.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HandshakeOutcome {
    /// No resync: Connected.
    Connected,
    /// Become SyncSource (WFBitMapS first).
    SyncSource {
        /// Set every bit first (full sync).
        full: bool,
    },
    /// Become SyncTarget (WFBitMapT first).
    SyncTarget {
        /// Set every bit first (full sync).
        full: bool,
    },
    /// Drop the connection (DRBD: `C_MASK`, then Disconnecting).
    Disconnect(DisconnectReason),
}

impl HandshakeOutcome {
    /// The connection state DRBD enters: Connected, WFBitMapS or WFBitMapT. `None` for
    /// a disconnect.
    pub fn conn_state(&self) -> Option<super::ConnState> {
        match self {
            HandshakeOutcome::Connected => Some(super::ConnState::Connected),
            HandshakeOutcome::SyncSource { .. } => Some(super::ConnState::WFBitMapS),
            HandshakeOutcome::SyncTarget { .. } => Some(super::ConnState::WFBitMapT),
            HandshakeOutcome::Disconnect(_) => None,
        }
    }
}

/// How a split brain was resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SplitBrainResolution {
    /// By the after-sb policy for `primaries` Primaries ("automatically solved").
    AfterSbPolicy {
        /// Primaries at the time (0, 1 or 2).
        primaries: u8,
    },
    /// By discard-my-data on one side ("manually solved").
    DiscardMyData,
}

/// The result of [`sync_handshake`], with what DRBD would log along the way.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Handshake {
    /// [`uuid_compare`]'s result, including any UUID correction to apply.
    pub comparison: Comparison,
    /// The final integer (±2 full, ±1 bitmap, 0 none), or the one that caused the
    /// disconnect.
    pub hg: i32,
    /// What to do.
    pub outcome: HandshakeOutcome,
    /// The disk states decided the direction ("Becoming sync … due to disk states").
    pub by_disk_states: bool,
    /// A split brain was seen: DRBD runs its `initial-split-brain` helper here.
    pub split_brain: bool,
    /// How the split brain was resolved, if it was.
    pub resolution: Option<SplitBrainResolution>,
    /// `rr-conflict violently` let a Primary become SyncTarget.
    pub violently: bool,
}

/// `drbd_asb_recover_0p`. Returns −100 if the policy does not decide.
fn recover_0p(
    policy: AfterSb0Pri,
    me: &HandshakeSide,
    peer: &HandshakeSide,
    resolve_conflicts: bool,
) -> i32 {
    // Bit 0 of the bitmap UUID: Primary when the pre-split generation ended.
    let was_pri_self = me.uuids.bitmap & UUID_PRIMARY;
    let was_pri_peer = peer.uuids.bitmap & UUID_PRIMARY;
    let (ch_self, ch_peer) = (me.dirty_bits, peer.dirty_bits);
    // Equal changes: the RESOLVE_CONFLICTS holder becomes SyncTarget.
    let tie = if resolve_conflicts { -1 } else { 1 };
    let by_primary = |discard_younger: bool| match (was_pri_self, was_pri_peer) {
        (0, 1) => Some(if discard_younger { -1 } else { 1 }),
        (1, 0) => Some(if discard_younger { 1 } else { -1 }),
        _ => None,
    };
    let zero_changes = || {
        if ch_peer == 0 && ch_self == 0 {
            Some(tie)
        } else if ch_peer == 0 {
            Some(1)
        } else if ch_self == 0 {
            Some(-1)
        } else {
            None
        }
    };
    let least_changes = || match ch_self.cmp(&ch_peer) {
        std::cmp::Ordering::Less => -1,
        std::cmp::Ordering::Greater => 1,
        std::cmp::Ordering::Equal => tie,
    };
    match policy {
        AfterSb0Pri::Disconnect => -100,
        // DRBD's switch falls through younger → older → zero-changes → least-changes.
        AfterSb0Pri::DiscardYoungerPrimary => by_primary(true)
            .or_else(zero_changes)
            .unwrap_or_else(least_changes),
        AfterSb0Pri::DiscardOlderPrimary => by_primary(false)
            .or_else(zero_changes)
            .unwrap_or_else(least_changes),
        AfterSb0Pri::DiscardZeroChanges => zero_changes().unwrap_or(-100),
        AfterSb0Pri::DiscardLeastChanges => least_changes(),
        AfterSb0Pri::DiscardLocal => -1,
        AfterSb0Pri::DiscardRemote => 1,
    }
}

/// `drbd_asb_recover_1p`.
fn recover_1p(
    policy: &SplitBrainPolicy,
    me: &HandshakeSide,
    peer: &HandshakeSide,
    rc: bool,
) -> i32 {
    match policy.after_sb_1pri {
        AfterSb1Pri::Disconnect | AfterSb1Pri::CallPriLostAfterSb => -100,
        AfterSb1Pri::Consensus => match recover_0p(policy.after_sb_0pri, me, peer, rc) {
            -1 if !me.primary => -1,
            1 if me.primary => 1,
            _ => -100,
        },
        AfterSb1Pri::ViolentlyAs0p => recover_0p(policy.after_sb_0pri, me, peer, rc),
        AfterSb1Pri::DiscardSecondary => {
            if me.primary {
                1
            } else {
                -1
            }
        }
    }
}

/// `drbd_asb_recover_2p`.
fn recover_2p(
    policy: &SplitBrainPolicy,
    me: &HandshakeSide,
    peer: &HandshakeSide,
    rc: bool,
) -> i32 {
    match policy.after_sb_2pri {
        AfterSb2Pri::Disconnect | AfterSb2Pri::CallPriLostAfterSb => -100,
        AfterSb2Pri::ViolentlyAs0p => recover_0p(policy.after_sb_0pri, me, peer, rc),
    }
}

/// `drbd_sync_handshake`: [`uuid_compare`], then the disk states, the split-brain
/// policies, discard-my-data and the role checks decide what the connection does (see
/// the module docs). The caller applies `comparison.correction`, sets the whole bitmap
/// for a full sync, and moves to [`HandshakeOutcome::conn_state`].
pub fn sync_handshake(
    me: &HandshakeSide,
    peer: &HandshakeSide,
    ctx: &HandshakeCtx,
    policy: &SplitBrainPolicy,
) -> Handshake {
    let comparison = uuid_compare(
        &me.uuids,
        &peer.uuids,
        &CompareCtx {
            agreed_version: ctx.agreed_version,
            wsame: ctx.wsame,
            me_primary: me.primary,
            peer_primary: peer.primary,
            me_crashed_primary: me.crashed_primary,
            peer_crashed_primary: peer.crashed_primary,
            resolve_conflicts: ctx.resolve_conflicts,
        },
    );
    let mut out = Handshake {
        comparison,
        hg: comparison.hg,
        outcome: HandshakeOutcome::Connected,
        by_disk_states: false,
        split_brain: false,
        resolution: None,
        violently: false,
    };
    let disconnect = |mut out: Handshake, why: DisconnectReason| {
        out.outcome = HandshakeOutcome::Disconnect(why);
        out
    };
    let mut hg = comparison.hg;
    if hg == -1000 {
        return disconnect(out, DisconnectReason::UnrelatedData);
    }
    if let SyncDecision::NeedsProtocol { version, features } = comparison.decision {
        return disconnect(out, DisconnectReason::NeedsProtocol { version, features });
    }

    let inc = DiskState::Inconsistent.as_u32();
    let (mine, theirs) = (me.disk.as_u32(), peer.disk.as_u32());
    if (mine == inc && theirs > inc) || (theirs == inc && mine > inc) {
        let full = hg == -100 || hg.abs() == 2;
        hg = if mine > inc { 1 } else { -1 };
        if full {
            hg *= 2;
        }
        out.by_disk_states = true;
    }

    if hg.abs() == 100 {
        out.split_brain = true;
    }

    if hg == 100 || (hg == -100 && policy.always_asbp) {
        let primaries = u8::from(me.primary) + u8::from(peer.primary);
        let forced = hg == -100;
        let rc = ctx.resolve_conflicts;
        hg = match primaries {
            0 => recover_0p(policy.after_sb_0pri, me, peer, rc),
            1 => recover_1p(policy, me, peer, rc),
            _ => recover_2p(policy, me, peer, rc),
        };
        if hg.abs() < 100 {
            out.resolution = Some(SplitBrainResolution::AfterSbPolicy { primaries });
            if forced {
                // The UUIDs were ambiguous: the bitmaps say nothing reliable.
                hg *= 2;
            }
        }
    }

    if hg == -100 {
        if me.discard_my_data && !peer.discard_my_data {
            hg = -1;
        }
        if !me.discard_my_data && peer.discard_my_data {
            hg = 1;
        }
        if hg.abs() < 100 {
            out.resolution = Some(SplitBrainResolution::DiscardMyData);
        }
    }

    out.hg = hg;
    if hg == -100 {
        return disconnect(out, DisconnectReason::SplitBrain);
    }
    if hg > 0 && mine <= inc {
        return disconnect(out, DisconnectReason::SourceInconsistent);
    }
    if hg < 0 && me.primary && mine >= DiskState::Consistent.as_u32() {
        match policy.rr_conflict {
            RrConflict::Disconnect | RrConflict::CallPriLost => {
                return disconnect(out, DisconnectReason::TargetPrimary);
            }
            RrConflict::Violently => out.violently = true,
        }
    }

    let full = hg.abs() >= 2;
    out.outcome = match hg.signum() {
        1 => HandshakeOutcome::SyncSource { full },
        -1 => HandshakeOutcome::SyncTarget { full },
        _ => HandshakeOutcome::Connected,
    };
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const OFF: u64 = UUID_NEW_BM_OFFSET;
    // Generations, bit 0 clear. Arbitrary values far apart.
    const A: u64 = 0x1111_2222_3333_4440;
    const B: u64 = 0x5555_6666_7777_8880;
    const C: u64 = 0x9999_aaaa_bbbb_ccc0;
    const D: u64 = 0xdddd_eeee_ffff_0000;
    const E: u64 = 0x0123_4567_89ab_cde0;
    const F: u64 = 0x0fed_cba9_8765_4320;

    fn set(current: u64, bitmap: u64, h0: u64, h1: u64) -> UuidSet {
        UuidSet {
            current,
            bitmap,
            history: [h0, h1],
        }
    }

    fn ctx(v: u32) -> CompareCtx {
        CompareCtx {
            agreed_version: v,
            wsame: true,
            ..CompareCtx::default()
        }
    }

    /// One row of the rule table: inputs, DRBD's integer and rule, and the correction.
    struct Row {
        what: &'static str,
        me: UuidSet,
        peer: UuidSet,
        ctx: CompareCtx,
        hg: i32,
        rule: u32,
        correction: Option<Correction>,
    }

    fn row(what: &'static str, me: UuidSet, peer: UuidSet, hg: i32, rule: u32) -> Row {
        Row {
            what,
            me,
            peer,
            ctx: ctx(101),
            hg,
            rule,
            correction: None,
        }
    }

    fn check(rows: &[Row]) {
        for r in rows {
            let c = uuid_compare(&r.me, &r.peer, &r.ctx);
            assert_eq!((c.hg, c.rule), (r.hg, r.rule), "{}", r.what);
            assert_eq!(c.correction, r.correction, "{}", r.what);
            assert_eq!(
                Some(c.decision),
                SyncDecision::from_drbd(r.hg),
                "{}",
                r.what
            );
            assert_eq!(c.decision.as_drbd(), r.hg, "{}", r.what);
        }
    }

    const JC: u64 = UUID_JUST_CREATED;

    #[test]
    fn rule_10_both_just_created() {
        check(&[
            row(
                "both fresh",
                UuidSet::JUST_CREATED,
                UuidSet::JUST_CREATED,
                0,
                10,
            ),
            row(
                "bit 0 ignored",
                set(JC | 1, 0, 0, 0),
                set(JC, 0, 0, 0),
                0,
                10,
            ),
        ]);
    }

    #[test]
    fn rule_20_mine_just_created_or_zero() {
        check(&[
            row("mine fresh", set(JC, 0, 0, 0), set(A, JC, 0, 0), -2, 20),
            row("mine zero", set(0, 0, 0, 0), set(A, 0, 0, 0), -2, 20),
            // 8.4's quirk: both zero makes each side want to be the target.
            row("both zero", set(0, 0, 0, 0), set(0, 0, 0, 0), -2, 20),
        ]);
    }

    #[test]
    fn rule_30_peer_just_created_or_zero() {
        check(&[
            row("peer fresh", set(A | 1, JC, 0, 0), set(JC, 0, 0, 0), 2, 30),
            row("peer zero", set(A, 0, 0, 0), set(0, 0, 0, 0), 2, 30),
            row(
                "mine zero, peer fresh",
                set(0, 0, 0, 0),
                set(JC, 0, 0, 0),
                2,
                30,
            ),
        ]);
    }

    #[test]
    fn rules_34_and_36_i_was_sync_source() {
        // I (source) still have the sync UUID S as bitmap UUID; the target finished and
        // rotated: (X, 0, [S, B]). 34: I missed the end and correct myself.
        let s = B + OFF;
        let mut r34 = row("34", set(A | 1, s, B, C), set(A, 0, s, B), 1, 34);
        r34.correction = Some(Correction {
            side: UuidSide::Mine,
            uuids: set(A | 1, 0, s, B),
        });
        check(&[
            r34,
            row(
                "36: history differs",
                set(A, s, B, C),
                set(A, 0, D, E),
                1,
                36,
            ),
        ]);
    }

    #[test]
    fn rules_35_and_37_i_was_sync_target() {
        let s = B + OFF;
        let mut r35 = row("35", set(A, 0, s, B), set(A | 1, s, B, C), -1, 35);
        r35.correction = Some(Correction {
            side: UuidSide::Peer,
            uuids: set(A | 1, 0, s, B),
        });
        check(&[
            r35,
            row(
                "37: history differs",
                set(A, 0, D, E),
                set(A, s, B, C),
                -1,
                37,
            ),
        ]);
    }

    #[test]
    fn rules_34_to_37_need_protocol_91_reported_as_rule_30() {
        let s = B + OFF;
        let mut rows = [
            row("34 at 90", set(A, s, B, C), set(A, 0, s, B), -1091, 30),
            row("35 at 90", set(A, 0, s, B), set(A, s, B, C), -1091, 30),
        ];
        for r in &mut rows {
            r.ctx.agreed_version = 90;
        }
        check(&rows);
        let c = uuid_compare(&rows[0].me, &rows[0].peer, &rows[0].ctx);
        assert_eq!(
            c.decision,
            SyncDecision::NeedsProtocol {
                version: 91,
                features: 0
            }
        );
    }

    #[test]
    fn rule_40_equal_currents() {
        let same = set(A, 0, B, C);
        let mut rows = vec![row("plain reconnect", same, set(A | 1, 0, B, C), 0, 40)];
        let mut r = row("I crashed as Primary", same, same, 1, 40);
        r.ctx.me_crashed_primary = true;
        rows.push(r);
        let mut r = row("peer crashed as Primary", same, same, -1, 40);
        r.ctx.peer_crashed_primary = true;
        rows.push(r);
        let mut r = row("both crashed, I resolve conflicts", same, same, -1, 40);
        r.ctx.me_crashed_primary = true;
        r.ctx.peer_crashed_primary = true;
        r.ctx.resolve_conflicts = true;
        rows.push(r);
        let mut r = row("both crashed, the peer resolves", same, same, 1, 40);
        r.ctx.me_crashed_primary = true;
        r.ctx.peer_crashed_primary = true;
        rows.push(r);
        check(&rows);
    }

    #[test]
    fn rule_41_crashed_with_a_primary_present() {
        let same = set(A, 0, B, C);
        let mut rows = Vec::new();
        let mut r = row("I am Primary", same, same, 1, 41);
        r.ctx.peer_crashed_primary = true;
        r.ctx.me_primary = true;
        rows.push(r);
        let mut r = row("the peer is Primary", same, same, -1, 41);
        r.ctx.me_crashed_primary = true;
        r.ctx.peer_primary = true;
        rows.push(r);
        let mut r = row("both Primary", same, same, -100, 41);
        r.ctx.me_crashed_primary = true;
        r.ctx.me_primary = true;
        r.ctx.peer_primary = true;
        rows.push(r);
        let mut r = row("no FF_WSAME", same, same, -0x10465, 41);
        r.ctx.me_crashed_primary = true;
        r.ctx.me_primary = true;
        r.ctx.wsame = false;
        rows.push(r);
        check(&rows);
        let c = uuid_compare(&same, &same, &rows[3].ctx);
        assert_eq!(c.hg, -66661);
        assert_eq!(
            c.decision,
            SyncDecision::NeedsProtocol {
                version: 101,
                features: wire::ff::DRBD_FF_WSAME
            }
        );
    }

    #[test]
    fn rule_50_my_current_is_the_peers_bitmap() {
        check(&[
            row(
                "bitmap-based target",
                set(A, 0, B, C),
                set(D | 1, A | 1, B, C),
                -1,
                50,
            ),
            row(
                "bit 0 ignored",
                set(A | 1, 0, 0, 0),
                set(D, A, 0, 0),
                -1,
                50,
            ),
        ]);
    }

    #[test]
    fn rule_51_the_peers_sync_uuid_was_lost() {
        // The peer (X, B, [C, D]) started as SyncSource: (X, B+OFF, [B, C]); my
        // P_SYNC_UUID never came, so my current is still B.
        let peer = set(A | 1, B + OFF, B, C);
        let mut r = row("≥ 96", set(B, 0, C, E), peer, -1, 51);
        r.correction = Some(Correction {
            side: UuidSide::Peer,
            uuids: set(A | 1, B, C, C),
        });
        let mut r95 = row("< 96: my h0 = peer h1", set(B, 0, C, E), peer, -1, 51);
        r95.ctx.agreed_version = 95;
        r95.correction = r.correction;
        let mut r90 = row("< 91", set(B, 0, C, E), peer, -1091, 51);
        r90.ctx.agreed_version = 90;
        // Without the tell-tale offset it is a plain "my current in peer history".
        let no = row(
            "≥ 96, bitmap not h0 + offset",
            set(B, 0, C, E),
            set(A, D, B, C),
            -2,
            60,
        );
        let mut no95 = row(
            "< 96, my h0 ≠ peer h1",
            set(B, 0, E, F),
            set(A, B + OFF, B, C),
            -2,
            60,
        );
        no95.ctx.agreed_version = 95;
        check(&[r, r95, r90, no, no95]);
    }

    #[test]
    fn rule_60_my_current_in_the_peers_history() {
        check(&[
            row("h0", set(C, 0, D, 0), set(A, 0, C, D), -2, 60),
            row("h1", set(D, 0, 0, 0), set(A, B, C, D | 1), -2, 60),
        ]);
    }

    #[test]
    fn rule_70_my_bitmap_is_the_peers_current() {
        check(&[row(
            "bitmap-based source",
            set(D | 1, A | 1, B, C),
            set(A, 0, B, C),
            1,
            70,
        )]);
    }

    #[test]
    fn rule_71_my_sync_uuid_was_lost() {
        let me = set(A | 1, B + OFF, B, C);
        let mut r = row("≥ 96", me, set(B, 0, C, E), 1, 71);
        r.correction = Some(Correction {
            side: UuidSide::Mine,
            uuids: set(A | 1, B, C, C),
        });
        let mut r95 = row("< 96: my h1 = peer h0", me, set(B, 0, C, E), 1, 71);
        r95.ctx.agreed_version = 95;
        r95.correction = r.correction;
        let mut r90 = row("< 91", me, set(B, 0, C, E), -1091, 71);
        r90.ctx.agreed_version = 90;
        let no = row("no offset", set(A, D, B, C), set(B, 0, C, E), 2, 80);
        check(&[r, r95, r90, no]);
    }

    #[test]
    fn rule_80_the_peers_current_in_my_history() {
        check(&[
            row("h0", set(A, 0, C, D), set(C, 0, D, 0), 2, 80),
            row("h1", set(A, B, C, D), set(D | 1, 0, 0, 0), 2, 80),
        ]);
    }

    #[test]
    fn rule_90_equal_bitmaps_split_brain() {
        check(&[row(
            "both moved on from A",
            set(B | 1, A | 1, C, D),
            set(E, A, C, D),
            100,
            90,
        )]);
    }

    #[test]
    fn rule_100_common_history_split_brain() {
        check(&[
            row("h0 = h1", set(B, E, C, D), set(F, A, 0, C), -100, 100),
            row(
                "both zero bitmaps",
                set(B, 0, C, D),
                set(E, 0, C, D),
                -100,
                100,
            ),
        ]);
    }

    #[test]
    fn unrelated_data() {
        let r = row(
            "nothing shared",
            set(A, B, C, 0),
            set(D, E, F, JC),
            -1000,
            100,
        );
        check(&[r]);
    }

    #[test]
    fn drbd_integers_decode() {
        for (hg, d) in [
            (
                -1091,
                SyncDecision::NeedsProtocol {
                    version: 91,
                    features: 0,
                },
            ),
            (
                -1096,
                SyncDecision::NeedsProtocol {
                    version: 96,
                    features: 0,
                },
            ),
            (
                -66661,
                SyncDecision::NeedsProtocol {
                    version: 101,
                    features: 4,
                },
            ),
            (100, SyncDecision::SplitBrainAutoRecoverable),
            (-100, SyncDecision::SplitBrain),
            (-1000, SyncDecision::Unrelated),
        ] {
            assert_eq!(SyncDecision::from_drbd(hg), Some(d));
            assert_eq!(d.as_drbd(), hg);
        }
        for hg in [3, -3, 99, -999, -1000 - 256, 1000] {
            assert_eq!(SyncDecision::from_drbd(hg), None, "{hg}");
        }
    }

    // -----------------------------------------------------------------------------------
    // Life cycle and sync_handshake, two nodes at a time

    /// What a node knows about itself for a handshake.
    #[derive(Clone, Copy, Debug)]
    struct Node {
        uuids: UuidSet,
        primary: bool,
        disk: DiskState,
        dirty: u64,
        crashed: bool,
        discard: bool,
    }

    impl Node {
        fn fresh() -> Self {
            Node {
                uuids: UuidSet::JUST_CREATED,
                primary: false,
                disk: DiskState::Inconsistent,
                dirty: 1014,
                crashed: false,
                discard: false,
            }
        }

        fn side(&self) -> HandshakeSide {
            HandshakeSide {
                uuids: self.uuids,
                dirty_bits: self.dirty,
                primary: self.primary,
                disk: self.disk,
                crashed_primary: self.crashed,
                discard_my_data: self.discard,
            }
        }

        /// The peer as it reaches this node: through `P_UUIDS` and `P_STATE`.
        fn as_peer(&self) -> HandshakeSide {
            let p = UuidPacket::local(
                self.uuids,
                self.dirty,
                self.discard,
                self.crashed,
                self.disk,
            );
            let p = UuidPacket::from(wire::Uuids::from(p));
            HandshakeSide::peer(&p, self.primary, self.disk)
        }
    }

    /// The peer's view of the same configuration: DRBD requires `discard-local` on one
    /// side to face `discard-remote` on the other (`convert_after_sb`).
    fn mirrored(p: &SplitBrainPolicy) -> SplitBrainPolicy {
        let after_sb_0pri = match p.after_sb_0pri {
            AfterSb0Pri::DiscardLocal => AfterSb0Pri::DiscardRemote,
            AfterSb0Pri::DiscardRemote => AfterSb0Pri::DiscardLocal,
            other => other,
        };
        assert!(after_sb_0pri.matches_peer(p.after_sb_0pri.as_wire()));
        SplitBrainPolicy {
            after_sb_0pri,
            ..*p
        }
    }

    /// Both sides' handshakes; `a_rc`: `a` holds RESOLVE_CONFLICTS; `b` runs the
    /// mirrored policy. Asserts the two decisions fit together: one source and one
    /// target with the same full/bitmap, or both connected, or a disconnect on at least
    /// one side (which drops the connection for both, whatever the other decided).
    fn connect(
        a: &Node,
        b: &Node,
        a_rc: bool,
        policy: &SplitBrainPolicy,
    ) -> (Handshake, Handshake) {
        let cx = |rc| HandshakeCtx {
            agreed_version: 101,
            wsame: true,
            resolve_conflicts: rc,
        };
        let ha = sync_handshake(&a.side(), &b.as_peer(), &cx(a_rc), policy);
        let hb = sync_handshake(&b.side(), &a.as_peer(), &cx(!a_rc), &mirrored(policy));
        use HandshakeOutcome as O;
        let fits = match (ha.outcome, hb.outcome) {
            (O::Connected, O::Connected) | (O::Disconnect(_), _) | (_, O::Disconnect(_)) => true,
            (O::SyncSource { full: x }, O::SyncTarget { full: y })
            | (O::SyncTarget { full: x }, O::SyncSource { full: y }) => x == y,
            _ => false,
        };
        assert!(fits, "sides disagree: {ha:?} vs {hb:?}");
        (ha, hb)
    }

    /// A resync from `src` to `tgt` as DRBD runs it, with `random` for the sync UUID
    /// where one is drawn. Returns the sync UUID sent.
    fn resync(src: &mut Node, tgt: &mut Node, random: u64) -> u64 {
        let as_received = src.uuids; // the target's copy: the handshake's P_UUIDS
        let sync = src.uuids.start_sync_source(random);
        tgt.uuids.start_sync_target(sync, tgt.primary);
        src.uuids.finish_sync_source();
        tgt.uuids.finish_sync_target(&as_received, tgt.primary);
        for n in [&mut *src, &mut *tgt] {
            n.disk = DiskState::UpToDate;
            n.dirty = 0;
            n.crashed = false; // both UpToDate clears CRASHED_PRIMARY
        }
        sync
    }

    fn same_generation(a: &UuidSet, b: &UuidSet) {
        assert_eq!(m(a.current), m(b.current), "{a} vs {b}");
        assert_eq!(a.bitmap, b.bitmap, "{a} vs {b}");
        assert_eq!(
            [m(a.history[0]), m(a.history[1])],
            [m(b.history[0]), m(b.history[1])],
            "{a} vs {b}"
        );
    }

    fn fresh_synced_pair() -> (Node, Node) {
        let (mut a, mut b) = (Node::fresh(), Node::fresh());
        a.uuids.promote(A, true, true);
        a.primary = true;
        a.disk = DiskState::UpToDate;
        resync(&mut a, &mut b, B);
        (a, b)
    }

    #[test]
    fn scenario_a_fresh_pair_initial_full_sync() {
        let policy = SplitBrainPolicy::default();
        let (mut a, mut b) = (Node::fresh(), Node::fresh());
        let (ha, hb) = connect(&a, &b, false, &policy);
        assert_eq!(
            (ha.comparison.rule, ha.outcome),
            (10, HandshakeOutcome::Connected)
        );
        assert_eq!(hb.outcome, HandshakeOutcome::Connected);

        // primary --force: a new current UUID, the old one (JUST_CREATED) as bitmap.
        assert!(a.uuids.promote(A, true, true));
        assert_eq!(a.uuids, set(A | 1, JC, 0, 0));
        a.primary = true;
        a.disk = DiskState::UpToDate;
        let (ha, hb) = connect(&a, &b, false, &policy);
        assert_eq!((ha.hg, ha.comparison.rule), (2, 30));
        assert!(ha.by_disk_states);
        assert_eq!(ha.outcome, HandshakeOutcome::SyncSource { full: true });
        assert_eq!((hb.hg, hb.comparison.rule), (-2, 20));
        assert_eq!(hb.outcome, HandshakeOutcome::SyncTarget { full: true });

        // The bitmap UUID was JUST_CREATED, so the sync UUID is the random one.
        assert_eq!(resync(&mut a, &mut b, B | 1), B | 1);
        assert_eq!(a.uuids, set(A | 1, 0, B | 1, JC));
        assert_eq!(b.uuids, set(A, 0, B, JC));
        same_generation(&a.uuids, &b.uuids);
        let (ha, hb) = connect(&a, &b, false, &policy);
        assert_eq!((ha.hg, ha.comparison.rule, hb.hg), (0, 40, 0));
        assert_eq!(ha.outcome, HandshakeOutcome::Connected);
    }

    #[test]
    fn scenario_b_primary_writes_alone_then_bitmap_resync() {
        let policy = SplitBrainPolicy::default();
        let (mut a, mut b) = fresh_synced_pair();
        let before = a.uuids;
        // The link breaks: the Primary starts a new generation, the Secondary (whose
        // peer role is now Unknown) does not.
        assert!(a.uuids.lost_peer_disk(C, true, false, a.disk));
        assert!(!b.uuids.lost_peer_disk(D, false, false, b.disk));
        assert_eq!(a.uuids, set(C | 1, before.current, before.history[0], JC));
        // Writes while alone change nothing else: the bitmap UUID is set already.
        assert!(!a.uuids.lost_peer_disk(D, true, false, a.disk));
        a.dirty = 8;

        let (ha, hb) = connect(&a, &b, true, &policy);
        assert_eq!((ha.hg, ha.comparison.rule), (1, 70));
        assert_eq!(ha.outcome, HandshakeOutcome::SyncSource { full: false });
        assert_eq!((hb.hg, hb.comparison.rule), (-1, 50));
        assert_eq!(hb.outcome, HandshakeOutcome::SyncTarget { full: false });
        let sync = resync(&mut a, &mut b, 0);
        assert_eq!(sync, before.current + OFF);
        same_generation(&a.uuids, &b.uuids);
        let (ha, _) = connect(&a, &b, true, &policy);
        assert_eq!(
            (ha.comparison.rule, ha.outcome),
            (40, HandshakeOutcome::Connected)
        );
    }

    /// Two nodes that split from a synced pair while `a` was Primary, `b` was promoted
    /// alone, both wrote (`a_dirty`, `b_dirty` blocks), and both were demoted again.
    fn split_brain(a_dirty: u64, b_dirty: u64) -> (Node, Node) {
        let (mut a, mut b) = fresh_synced_pair();
        assert!(a.uuids.lost_peer_disk(C, true, false, a.disk));
        assert!(b.uuids.promote(D, false, false));
        a.dirty = a_dirty;
        b.dirty = b_dirty;
        for n in [&mut a, &mut b] {
            n.uuids.demote();
            n.primary = false;
        }
        (a, b)
    }

    #[test]
    fn scenario_c_both_promoted_split_brain_detected() {
        let policy = SplitBrainPolicy::default();
        let (mut a, mut b) = split_brain(5, 7);
        for (ap, bp) in [(true, true), (true, false), (false, true), (false, false)] {
            a.primary = ap;
            b.primary = bp;
            let (ha, hb) = connect(&a, &b, false, &policy);
            for h in [ha, hb] {
                assert_eq!((h.comparison.hg, h.comparison.rule), (100, 90));
                assert!(h.split_brain);
                assert_eq!(
                    h.outcome,
                    HandshakeOutcome::Disconnect(DisconnectReason::SplitBrain)
                );
            }
        }
        // One more generation on `a` (new-current-uuid while alone): the bitmaps no
        // longer match, only the histories do: rule 100.
        a.uuids.new_current_uuid_cmd(E, false, false);
        a.primary = false;
        b.primary = false;
        let (ha, hb) = connect(&a, &b, false, &policy);
        assert_eq!((ha.comparison.hg, ha.comparison.rule), (-100, 100));
        assert_eq!((hb.comparison.hg, hb.comparison.rule), (-100, 100));
        assert_eq!(
            ha.outcome,
            HandshakeOutcome::Disconnect(DisconnectReason::SplitBrain)
        );
    }

    #[test]
    fn scenario_d_crashed_primary_becomes_sync_source() {
        let policy = SplitBrainPolicy::default();
        let (mut a, mut b) = fresh_synced_pair();
        // Connected Primary `a` dies; the Secondary sees its peer's role go Unknown and
        // makes no new UUID. `a` restarts Secondary with the crashed-primary flag (its
        // metadata said Primary).
        assert!(!b.uuids.lost_peer_disk(C, false, false, b.disk));
        a.primary = false;
        a.uuids.demote();
        a.crashed = true;
        a.dirty = 3; // what its activity log marked
        let (ha, hb) = connect(&a, &b, false, &policy);
        assert_eq!((ha.hg, ha.comparison.rule), (1, 40));
        assert_eq!(ha.outcome, HandshakeOutcome::SyncSource { full: false });
        assert_eq!((hb.hg, hb.comparison.rule), (-1, 40));
        resync(&mut a, &mut b, 0);
        assert!(!a.crashed);
        let (ha, _) = connect(&a, &b, false, &policy);
        assert_eq!(ha.outcome, HandshakeOutcome::Connected);

        // Had the survivor been promoted meanwhile, its new generation wins instead.
        let (mut a, mut b) = fresh_synced_pair();
        a.primary = false;
        a.crashed = true;
        assert!(b.uuids.promote(C, false, false));
        b.primary = true;
        let (ha, hb) = connect(&a, &b, false, &policy);
        assert_eq!((ha.comparison.rule, hb.comparison.rule), (50, 70));
        assert_eq!(hb.outcome, HandshakeOutcome::SyncSource { full: false });
    }

    #[test]
    fn scenario_e_unrelated_data_refused() {
        // Two disks, each synced with a different partner. While both still have
        // JUST_CREATED in their history (their first sync), 8.4 calls that a split
        // brain (rule 100); once it has rotated out, the data is unrelated.
        let (a, _) = fresh_synced_pair();
        let (mut b, _) = fresh_synced_pair();
        b.uuids = set(D | 1, 0, E, JC);
        let (ha, _) = connect(&a, &b, false, &SplitBrainPolicy::default());
        assert_eq!((ha.comparison.hg, ha.comparison.rule), (-100, 100));
        b.uuids = set(D | 1, 0, E, F);
        let (ha, hb) = connect(&a, &b, false, &SplitBrainPolicy::default());
        for h in [ha, hb] {
            assert_eq!(
                (h.hg, h.comparison.decision),
                (-1000, SyncDecision::Unrelated)
            );
            assert_eq!(
                h.outcome,
                HandshakeOutcome::Disconnect(DisconnectReason::UnrelatedData)
            );
        }
    }

    #[test]
    fn two_fresh_disks_forced_apart_look_like_split_brain() {
        // 8.4 quirk: `primary --force` on two separately created disks leaves both
        // bitmap UUIDs at JUST_CREATED, so rule 90 calls it a recoverable split brain,
        // not unrelated data. An after-sb-0pri policy would then sync one onto the other.
        let (mut a, mut b) = (Node::fresh(), Node::fresh());
        for (n, r) in [(&mut a, A), (&mut b, B)] {
            n.uuids.promote(r, false, true);
            n.uuids.demote();
            n.disk = DiskState::UpToDate;
        }
        let (ha, _) = connect(&a, &b, false, &SplitBrainPolicy::default());
        assert_eq!((ha.comparison.hg, ha.comparison.rule), (100, 90));
        assert_eq!(
            ha.outcome,
            HandshakeOutcome::Disconnect(DisconnectReason::SplitBrain)
        );
    }

    #[test]
    fn scenario_f_clear_bitmap_skips_the_initial_sync() {
        let (mut a, mut b) = (Node::fresh(), Node::fresh());
        assert!(a.uuids.may_skip_initial_sync(true, 101));
        assert!(!a.uuids.may_skip_initial_sync(true, 89));
        assert!(!a.uuids.may_skip_initial_sync(false, 101));
        let announce = a.uuids.new_current_uuid_cmd(A, false, true).expect("skip");
        // The announcement still carries the old current as bitmap UUID; afterwards
        // the bitmap UUID is gone.
        assert_eq!(announce, set(A, JC, 0, 0));
        assert_eq!(a.uuids, set(A, 0, 0, 0));
        let mut pkt = UuidPacket::local(announce, 0, false, false, DiskState::Inconsistent);
        pkt.flags |= UUID_FLAG_SKIP_INITIAL_SYNC;
        let mut not_now = b.uuids;
        assert!(!not_now.accept_skip_initial_sync(&pkt, true, 89, false));
        assert!(!not_now.accept_skip_initial_sync(
            &UuidPacket { flags: 0, ..pkt },
            true,
            101,
            false
        ));
        assert_eq!(not_now, UuidSet::JUST_CREATED);
        assert!(b.uuids.accept_skip_initial_sync(&pkt, true, 101, false));
        assert_eq!(b.uuids, set(A, 0, 0, 0));
        for n in [&mut a, &mut b] {
            n.disk = DiskState::UpToDate;
            n.dirty = 0;
        }
        let (ha, _) = connect(&a, &b, false, &SplitBrainPolicy::default());
        assert_eq!(
            (ha.comparison.rule, ha.outcome),
            (40, HandshakeOutcome::Connected)
        );

        // StandAlone: the bitmap UUID rotates into history first, and nothing is
        // announced.
        let mut s = set(B, C, D, 0);
        assert_eq!(s.new_current_uuid_cmd(E | 1, true, false), None);
        assert_eq!(s, set(E | 1, B, C, D));
    }

    // -----------------------------------------------------------------------------------
    // After-split-brain policies

    fn policy0(p: AfterSb0Pri) -> SplitBrainPolicy {
        SplitBrainPolicy {
            after_sb_0pri: p,
            ..SplitBrainPolicy::default()
        }
    }

    /// Which of the two nodes ends up SyncSource, or `None` if the connection drops.
    fn source(a: &Node, b: &Node, a_rc: bool, p: &SplitBrainPolicy) -> Option<char> {
        let (ha, hb) = connect(a, b, a_rc, p);
        match (ha.outcome, hb.outcome) {
            (HandshakeOutcome::Disconnect(_), _) | (_, HandshakeOutcome::Disconnect(_)) => None,
            (HandshakeOutcome::SyncSource { full }, _) => {
                assert!(!full, "rule 90 recovers with the bitmap");
                Some('a')
            }
            (HandshakeOutcome::SyncTarget { .. }, _) => Some('b'),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn after_sb_0pri_each_policy() {
        use AfterSb0Pri as P;
        // `a` was the Primary before the split (its bitmap UUID has bit 0), `b` the
        // younger one. Both are Secondary now.
        let (a, b) = split_brain(5, 7);
        assert!(a.uuids.bitmap & 1 == 1 && b.uuids.bitmap & 1 == 0);
        for (p, want) in [
            (P::Disconnect, None),
            (P::DiscardYoungerPrimary, Some('a')),
            (P::DiscardOlderPrimary, Some('b')),
            (P::DiscardZeroChanges, None), // both changed
            (P::DiscardLeastChanges, Some('b')),
            (P::DiscardLocal, Some('b')),
            (P::DiscardRemote, Some('a')),
        ] {
            for rc in [false, true] {
                assert_eq!(source(&a, &b, rc, &policy0(p)), want, "{p} rc {rc}");
            }
        }
        // discard-zero-changes: the side without changes loses; both without: the side
        // holding RESOLVE_CONFLICTS loses.
        let (za, zb) = split_brain(0, 7);
        assert_eq!(
            source(&za, &zb, false, &policy0(P::DiscardZeroChanges)),
            Some('b')
        );
        let (za, zb) = split_brain(0, 0);
        assert_eq!(
            source(&za, &zb, false, &policy0(P::DiscardZeroChanges)),
            Some('a')
        );
        assert_eq!(
            source(&za, &zb, true, &policy0(P::DiscardZeroChanges)),
            Some('b')
        );
        // discard-least-changes tie: the same rule.
        let (ta, tb) = split_brain(6, 6);
        assert_eq!(
            source(&ta, &tb, false, &policy0(P::DiscardLeastChanges)),
            Some('a')
        );
        assert_eq!(
            source(&ta, &tb, true, &policy0(P::DiscardLeastChanges)),
            Some('b')
        );
    }

    #[test]
    fn younger_older_primary_fall_back_to_changes() {
        use AfterSb0Pri as P;
        // Both bitmap UUIDs carry the same bit 0: no decision by role, so DRBD falls
        // through to zero-changes, then least-changes.
        let (mut a, mut b) = split_brain(9, 2);
        a.primary = false;
        b.primary = false;
        b.uuids.bitmap |= 1;
        for p in [P::DiscardYoungerPrimary, P::DiscardOlderPrimary] {
            assert_eq!(source(&a, &b, false, &policy0(p)), Some('a'), "{p}");
            let (mut za, zb) = (a, b);
            za.dirty = 0;
            assert_eq!(source(&za, &zb, false, &policy0(p)), Some('b'), "{p}");
        }
    }

    #[test]
    fn after_sb_1pri_each_policy() {
        use AfterSb1Pri as P;
        // `b` is Primary, `a` Secondary; `b` made more changes.
        let (a, mut b) = split_brain(3, 9);
        b.primary = true;
        let with = |p1: P, p0: AfterSb0Pri| SplitBrainPolicy {
            after_sb_0pri: p0,
            after_sb_1pri: p1,
            ..SplitBrainPolicy::default()
        };
        let least = AfterSb0Pri::DiscardLeastChanges;
        let local = AfterSb0Pri::DiscardLocal;
        assert_eq!(source(&a, &b, false, &with(P::Disconnect, least)), None);
        assert_eq!(
            source(&a, &b, false, &with(P::DiscardSecondary, least)),
            Some('b')
        );
        // consensus: 0pri discards the Secondary `a` (fewer changes): accepted.
        assert_eq!(source(&a, &b, false, &with(P::Consensus, least)), Some('b'));
        // consensus: 0pri would discard the Primary: refused. (discard-local from
        // `a`'s point of view is discard-remote from `b`'s, so both sides agree.)
        let (ra, mut rb) = (a, b);
        rb.dirty = 1;
        assert_eq!(source(&ra, &rb, false, &with(P::Consensus, least)), None);
        // violently-as0p: the Primary loses its data.
        assert_eq!(
            source(&ra, &rb, false, &with(P::ViolentlyAs0p, least)),
            None
        );
        let mut pv = with(P::ViolentlyAs0p, least);
        pv.rr_conflict = RrConflict::Violently;
        assert_eq!(source(&ra, &rb, false, &pv), Some('a'));
        // call-pri-lost-after-sb: tandem has no helper, so it is disconnect.
        assert_eq!(
            source(&a, &b, false, &with(P::CallPriLostAfterSb, least)),
            None
        );
        // 1pri consensus/violently follow the after-sb-0pri policy, local/remote included.
        assert_eq!(
            source(&a, &b, false, &with(P::ViolentlyAs0p, local)),
            Some('b')
        );
        assert_eq!(source(&a, &b, false, &with(P::Consensus, local)), Some('b'));
        assert_eq!(source(&b, &a, false, &with(P::Consensus, local)), None);
    }

    #[test]
    fn after_sb_2pri_each_policy() {
        use AfterSb2Pri as P;
        let (mut a, mut b) = split_brain(3, 9);
        a.primary = true;
        b.primary = true;
        let with = |p2: P| SplitBrainPolicy {
            after_sb_0pri: AfterSb0Pri::DiscardLeastChanges,
            after_sb_2pri: p2,
            rr_conflict: RrConflict::Violently,
            ..SplitBrainPolicy::default()
        };
        assert_eq!(source(&a, &b, false, &with(P::Disconnect)), None);
        assert_eq!(source(&a, &b, false, &with(P::ViolentlyAs0p)), Some('b'));
        assert_eq!(source(&a, &b, false, &with(P::CallPriLostAfterSb)), None);
        // Without rr-conflict violently the Primary that would become target refuses.
        let mut p = with(P::ViolentlyAs0p);
        p.rr_conflict = RrConflict::Disconnect;
        let (ha, hb) = connect(&a, &b, false, &p);
        assert_eq!(
            ha.outcome,
            HandshakeOutcome::Disconnect(DisconnectReason::TargetPrimary)
        );
        assert_eq!(hb.hg, 1);
        p.rr_conflict = RrConflict::CallPriLost;
        let (ha, _) = connect(&a, &b, false, &p);
        assert_eq!(
            ha.outcome,
            HandshakeOutcome::Disconnect(DisconnectReason::TargetPrimary)
        );
    }

    #[test]
    fn always_asbp_applies_policies_to_rule_100_with_a_full_sync() {
        let (mut a, mut b) = split_brain(3, 9);
        a.uuids.new_current_uuid_cmd(E, false, false);
        a.primary = false;
        b.primary = false;
        let mut p = policy0(AfterSb0Pri::DiscardLeastChanges);
        let (ha, _) = connect(&a, &b, false, &p);
        assert_eq!(
            ha.outcome,
            HandshakeOutcome::Disconnect(DisconnectReason::SplitBrain)
        );
        p.always_asbp = true;
        let (ha, hb) = connect(&a, &b, false, &p);
        assert_eq!(ha.comparison.hg, -100);
        assert_eq!(ha.outcome, HandshakeOutcome::SyncTarget { full: true });
        assert_eq!(hb.outcome, HandshakeOutcome::SyncSource { full: true });
        assert_eq!(
            ha.resolution,
            Some(SplitBrainResolution::AfterSbPolicy { primaries: 0 })
        );
    }

    #[test]
    fn discard_my_data_resolves_a_split_brain() {
        let (mut a, b) = split_brain(3, 9);
        a.primary = false;
        a.discard = true;
        let (ha, hb) = connect(&a, &b, false, &SplitBrainPolicy::default());
        assert_eq!(ha.outcome, HandshakeOutcome::SyncTarget { full: false });
        assert_eq!(hb.outcome, HandshakeOutcome::SyncSource { full: false });
        assert_eq!(ha.resolution, Some(SplitBrainResolution::DiscardMyData));
        // Both sides asking for it cancels out.
        let mut b2 = b;
        b2.discard = true;
        let (ha, _) = connect(&a, &b2, false, &SplitBrainPolicy::default());
        assert_eq!(
            ha.outcome,
            HandshakeOutcome::Disconnect(DisconnectReason::SplitBrain)
        );
    }

    #[test]
    fn disk_states_override_and_refusals() {
        // Equal UUIDs, but `b` is Inconsistent (an interrupted resync): `a` is source.
        let (a, mut b) = fresh_synced_pair();
        b.disk = DiskState::Inconsistent;
        let (ha, hb) = connect(&a, &b, false, &SplitBrainPolicy::default());
        assert!(ha.by_disk_states && hb.by_disk_states);
        assert_eq!(ha.outcome, HandshakeOutcome::SyncSource { full: false });
        // A split brain with one Inconsistent side: the disk states decide, bitmap-based.
        let (mut sa, mut sb) = split_brain(1, 1);
        sa.primary = false;
        sb.primary = false;
        sb.disk = DiskState::Inconsistent;
        let (ha, _) = connect(&sa, &sb, false, &SplitBrainPolicy::default());
        assert_eq!((ha.comparison.hg, ha.hg), (100, 1));
        // Rule 80 (+2) with the target Inconsistent stays full.
        let mut x = Node::fresh();
        x.uuids = set(A, 0, C, 0);
        x.disk = DiskState::UpToDate;
        let mut y = Node::fresh();
        y.uuids = set(C, 0, 0, 0);
        let (hx, _) = connect(&x, &y, false, &SplitBrainPolicy::default());
        assert_eq!(hx.outcome, HandshakeOutcome::SyncSource { full: true });

        // The UUIDs say "source" but my disk is Inconsistent and so is the peer's.
        let mut me = Node::fresh();
        me.uuids = set(A, 0, 0, 0);
        let mut peer = Node::fresh();
        peer.uuids = set(B, 0, A, 0);
        peer.disk = DiskState::Inconsistent;
        let h = sync_handshake(
            &peer.side(),
            &me.as_peer(),
            &HandshakeCtx {
                agreed_version: 101,
                wsame: true,
                resolve_conflicts: false,
            },
            &SplitBrainPolicy::default(),
        );
        assert_eq!(
            h.outcome,
            HandshakeOutcome::Disconnect(DisconnectReason::SourceInconsistent)
        );

        // A Primary that would become target, and rr-conflict violently.
        let (mut p, q) = fresh_synced_pair();
        p.uuids.new_current(D, true); // a stale generation ...
        p.uuids = set(B, 0, 0, 0); // ... entirely behind `q`
        p.primary = true;
        let mut pol = SplitBrainPolicy::default();
        let hp = sync_handshake(
            &p.side(),
            &q.as_peer(),
            &HandshakeCtx {
                agreed_version: 101,
                wsame: true,
                resolve_conflicts: false,
            },
            &pol,
        );
        assert_eq!(hp.comparison.rule, 60);
        assert_eq!(
            hp.outcome,
            HandshakeOutcome::Disconnect(DisconnectReason::TargetPrimary)
        );
        pol.rr_conflict = RrConflict::Violently;
        let hp = sync_handshake(
            &p.side(),
            &q.as_peer(),
            &HandshakeCtx {
                agreed_version: 101,
                wsame: true,
                resolve_conflicts: false,
            },
            &pol,
        );
        assert!(hp.violently);
        assert_eq!(hp.outcome, HandshakeOutcome::SyncTarget { full: true });
    }

    #[test]
    fn needs_protocol_disconnects() {
        let same = set(A, 0, 0, 0);
        let me = HandshakeSide {
            uuids: same,
            dirty_bits: 0,
            primary: true,
            disk: DiskState::UpToDate,
            crashed_primary: true,
            discard_my_data: false,
        };
        let peer = HandshakeSide {
            primary: false,
            crashed_primary: false,
            ..me
        };
        let h = sync_handshake(
            &me,
            &peer,
            &HandshakeCtx {
                agreed_version: 101,
                wsame: false,
                resolve_conflicts: false,
            },
            &SplitBrainPolicy::default(),
        );
        assert_eq!(
            h.outcome,
            HandshakeOutcome::Disconnect(DisconnectReason::NeedsProtocol {
                version: 101,
                features: 4
            })
        );
    }

    // -----------------------------------------------------------------------------------
    // Smaller pieces

    #[test]
    fn life_cycle_steps_match_drbd() {
        // new_current overwrites a set bitmap UUID (DRBD warns) and reports it.
        let mut s = set(A, B, C, D);
        assert_eq!(s.new_current(E, false), Some(B));
        assert_eq!(s, set(E, A, C, D));
        // The role decides bit 0 of the new current UUID.
        let mut s = set(A, 0, C, D);
        assert_eq!(s.new_current(E, true), None);
        assert_eq!(s, set(E | 1, A, C, D));
        s.demote();
        assert!(!s.was_primary());
        // Promotion while connected to a good disk keeps the generation.
        let mut s = set(A, 0, C, D);
        assert!(!s.promote(E, true, false));
        assert_eq!(s, set(A | 1, 0, C, D));
        // Promotion while disconnected with a bitmap UUID already set: no new UUID.
        let mut s = set(A, B, C, D);
        assert!(!s.promote(E, false, false));
        assert_eq!(s, set(A | 1, B, C, D));
        // lost_peer_disk needs a Primary and UpToDate.
        let mut s = set(A, 0, C, D);
        assert!(!s.lost_peer_disk(E, false, false, DiskState::UpToDate));
        assert!(!s.lost_peer_disk(E, true, false, DiskState::Consistent));
        assert!(s.lost_peer_disk(E, false, true, DiskState::UpToDate));
        assert_eq!(s, set(E, A, C, D));
        // Sync source: bitmap + 2^48, the old bitmap rotates.
        let mut s = set(A, B, C, D);
        assert_eq!(s.start_sync_source(E), B + OFF);
        assert_eq!(s, set(A, B + OFF, B, C));
        // ... random when there was none (no rotation of 0) ...
        let mut s = set(A, 0, C, D);
        assert_eq!(s.start_sync_source(E), E);
        assert_eq!(s, set(A, E, C, D));
        // ... or only JUST_CREATED (which rotates).
        let mut s = set(A, JC, 0, 0);
        assert_eq!(s.start_sync_source(E), E);
        assert_eq!(s, set(A, E, JC, 0));
        // Sync target: adopt, bitmap 0, no rotation.
        let mut s = set(A, B, C, D);
        s.start_sync_target(E | 1, false);
        assert_eq!(s, set(E, 0, C, D));
        // clear_bitmap_uuid does nothing without a bitmap UUID.
        let mut s = set(A, 0, C, D);
        s.clear_bitmap_uuid();
        assert_eq!(s, set(A, 0, C, D));
    }

    #[test]
    fn random_uuid_avoids_reserved_values() {
        struct Seq(Vec<u64>);
        impl rand::RngCore for Seq {
            fn next_u32(&mut self) -> u32 {
                0
            }
            fn next_u64(&mut self) -> u64 {
                self.0.remove(0)
            }
            fn fill_bytes(&mut self, _: &mut [u8]) {}
            fn try_fill_bytes(&mut self, _: &mut [u8]) -> Result<(), rand::Error> {
                Ok(())
            }
        }
        let mut r = Seq(vec![0, 1, 4, 5, A]);
        assert_eq!(random_uuid(&mut r), A);
    }

    #[test]
    fn packet_conversions() {
        let p = UuidPacket {
            uuids: set(A, B, C, D),
            dirty_bits: 17,
            flags: UUID_FLAG_CRASHED_PRIMARY | UUID_FLAG_DISCARD_MY_DATA,
        };
        assert_eq!(p.to_array(), [A, B, C, D, 17, 3]);
        assert_eq!(UuidPacket::from_array(p.to_array()), p);
        let w = wire::Uuids::from(p);
        assert_eq!(
            (w.current, w.bitmap, w.history, w.dirty_bits, w.uuid_flags),
            (A, B, [C, D], 17, 3)
        );
        assert_eq!(UuidPacket::from(w), p);
        assert!(p.crashed_primary() && p.discard_my_data());
        let l = UuidPacket::local(set(A, 0, 0, 0), 5, false, true, DiskState::Inconsistent);
        assert_eq!(l.flags, UUID_FLAG_CRASHED_PRIMARY | UUID_FLAG_INCONSISTENT);
        assert_eq!(
            set(A | 1, B, C, 0).to_string(),
            "1111222233334441:5555666677778880:9999AAAABBBBCCC0:0000000000000000"
        );
        assert_eq!(
            real_peer_disk(DiskState::Negotiating, UUID_FLAG_INCONSISTENT),
            DiskState::Inconsistent
        );
        assert_eq!(
            real_peer_disk(DiskState::Negotiating, 0),
            DiskState::Consistent
        );
        assert_eq!(
            real_peer_disk(DiskState::Outdated, UUID_FLAG_INCONSISTENT),
            DiskState::Outdated
        );
        // A side's P_UUIDS, as the peer reads it with the role and disk of its P_STATE,
        // is that side again, every flag included.
        for (disk, discard_my_data, crashed_primary) in [
            (DiskState::Inconsistent, true, false),
            (DiskState::UpToDate, false, true),
        ] {
            let side = HandshakeSide {
                uuids: set(A, B, C, D),
                dirty_bits: 9,
                primary: crashed_primary,
                disk,
                crashed_primary,
                discard_my_data,
            };
            let read = UuidPacket::from(wire::Uuids::from(side.packet()));
            assert_eq!(HandshakeSide::peer(&read, side.primary, disk), side);
        }
    }

    #[test]
    fn policy_names_and_numbers() {
        for p in AfterSb0Pri::ALL {
            assert_eq!(p.name().parse::<AfterSb0Pri>().unwrap(), *p);
            assert_eq!(AfterSb0Pri::from_wire(p.as_wire()), Some(*p));
        }
        for p in AfterSb1Pri::ALL {
            assert_eq!(p.name().parse::<AfterSb1Pri>().unwrap(), *p);
            assert_eq!(AfterSb1Pri::from_wire(p.as_wire()), Some(*p));
        }
        for p in AfterSb2Pri::ALL {
            assert_eq!(p.name().parse::<AfterSb2Pri>().unwrap(), *p);
        }
        for p in RrConflict::ALL {
            assert_eq!(p.name().parse::<RrConflict>().unwrap(), *p);
        }
        assert_eq!(AfterSb0Pri::DiscardLeastChanges.as_wire(), 4);
        assert_eq!(AfterSb1Pri::ViolentlyAs0p.name(), "violently-as0p");
        assert_eq!(AfterSb1Pri::from_wire(1), None);
        assert_eq!(RrConflict::CallPriLost.as_wire(), 9);
        assert!("discard-secondary".parse::<AfterSb0Pri>().is_err());
        assert_eq!(
            "bogus".parse::<RrConflict>().unwrap_err().to_string(),
            "unknown rr-conflict policy \"bogus\""
        );
        // discard-local here must face discard-remote there.
        assert!(AfterSb0Pri::DiscardLocal.matches_peer(6));
        assert!(!AfterSb0Pri::DiscardLocal.matches_peer(5));
        assert!(AfterSb0Pri::DiscardLeastChanges.matches_peer(4));
        assert!(!AfterSb0Pri::Disconnect.matches_peer(4));

        let p: SplitBrainPolicy = serde_json::from_str(
            r#"{"after-sb-0pri":"discard-zero-changes","after-sb-1pri":"consensus",
                "rr-conflict":"violently","always-asbp":true}"#,
        )
        .unwrap();
        assert_eq!(p.after_sb_0pri, AfterSb0Pri::DiscardZeroChanges);
        assert_eq!(p.after_sb_1pri, AfterSb1Pri::Consensus);
        assert_eq!(p.after_sb_2pri, AfterSb2Pri::Disconnect);
        assert!(p.always_asbp);
        assert_eq!(p.rr_conflict, RrConflict::Violently);
        let json = serde_json::to_string(&SplitBrainPolicy::default()).unwrap();
        assert_eq!(
            json,
            concat!(
                r#"{"after-sb-0pri":"disconnect","after-sb-1pri":"disconnect","#,
                r#""after-sb-2pri":"disconnect","always-asbp":false,"rr-conflict":"disconnect"}"#
            )
        );
        assert!(
            serde_json::from_str::<SplitBrainPolicy>(r#"{"after-sb-2pri":"consensus"}"#).is_err()
        );
    }
}
