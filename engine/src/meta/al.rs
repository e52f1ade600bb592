//! The activity log (AL): which 4 MiB extents of the volume may have writes in flight,
//! kept on disk so that after a crash only those extents need a resync.
//!
//! Two halves, both pure (no IO):
//!
//! - **The on-disk format** (docs/drbd-reference.md §5): a ring of
//!   `al_stripes × al_stripe_size_4k` 4 KiB transaction blocks (default 1 × 8 = 32 KiB),
//!   each a big-endian `al_transaction_on_disk`: magic, transaction number, crc32c, up to
//!   [`AL_UPDATES_PER_TRANSACTION`] (64) slot updates, and a rolling window of
//!   [`AL_CONTEXT_PER_TRANSACTION`] (919) slots of the whole active set. [`replay`] is
//!   drbdmeta's `replay_al_84`: it rebuilds the active set of the newest transaction from
//!   a ring, skipping blocks with a bad magic or crc. [`apply_hot_extents`] sets the
//!   bits of those extents in an on-disk bitmap (drbdmeta's `apply_al`, without its
//!   off-by-one that skips a hot extent ending exactly at the bitmap's end).
//! - **The runtime LRU** ([`ActivityLog`]): `al-extents` slots (67..=65534, default
//!   1237, so 4.8 GiB of the volume can be written without an AL update). A write whose
//!   extents are all active takes a reference on each and goes ahead ("hit"). A write
//!   that needs an inactive extent waits for a transaction: the extent is *staged* into a
//!   free slot or the least recently used slot whose extent has no references (evicting
//!   it); every write that misses while no transaction is being written is staged into
//!   the same next transaction (≤ 64 changes). Before the transaction is written, the
//!   bitmap pages of the evicted extents must be written (their bits are the only record
//!   left of writes there that the peer has not acknowledged). References are dropped
//!   when the write is retired, i.e. barrier-acked or out of sync — so an extent leaves
//!   the log only once the peer has everything written there, or the bitmap says what
//!   it lacks.
//!
//! Memory: 16 bytes per slot plus a hash map entry per active extent: ≈ 40 KiB for the
//! default 1237 extents, 2.6 MiB at the 65534 maximum. One transaction is in flight at a
//! time (DRBD serialises them too).

use std::collections::HashMap;

/// log2 of an AL extent's size (4 MiB).
pub const AL_EXTENT_SHIFT: u32 = 22;
/// Bytes per AL extent.
pub(crate) const AL_EXTENT_BYTES: u64 = 1 << AL_EXTENT_SHIFT;
/// 512-byte sectors per AL extent.
pub const AL_EXTENT_SECTORS: u64 = AL_EXTENT_BYTES >> 9;
/// Bitmap bits (4 KiB blocks) per AL extent.
pub(crate) const BITS_PER_EXTENT: u64 = AL_EXTENT_BYTES >> 12;
/// Slot changes carried by one transaction.
pub const AL_UPDATES_PER_TRANSACTION: usize = 64;
/// Slots of context carried by one transaction: (4096 − 36 − 6 × 64) / 4.
pub(crate) const AL_CONTEXT_PER_TRANSACTION: usize = AL_CONTEXT_U32 as usize;
const AL_CONTEXT_U32: u32 = 919;
/// `DRBD_AL_MAGIC`.
pub(crate) const AL_MAGIC: u32 = 0x69cb_65a2;
/// `AL_TR_UPDATE`: a transaction with updates.
pub(crate) const AL_TR_UPDATE: u16 = 0;
/// `AL_TR_INITIALIZED`: a block written by create-md / apply-al.
pub const AL_TR_INITIALIZED: u16 = 0xffff;
/// `LC_FREE`: an unused slot's extent number.
pub const LC_FREE: u32 = u32::MAX;
/// Smallest `al-extents` (DRBD_AL_EXTENTS_MIN).
pub(crate) const AL_EXTENTS_MIN: u32 = 67;
/// Largest `al-extents` (DRBD_AL_EXTENTS_MAX; slot numbers are u16, 0xffff means free).
pub const AL_EXTENTS_MAX: u32 = 0xfffe;
/// Default `al-extents` (DRBD_AL_EXTENTS_DEF).
pub(crate) const AL_EXTENTS_DEFAULT: u32 = 1237;
/// Size of one transaction block.
pub const AL_BLOCK: usize = 4096;
/// Largest ring drbdmeta can read in one buffer (32 MiB): tandem refuses larger ones so
/// that `drbdmeta apply-al` can always replay what tandem wrote.
pub(crate) const AL_MAX_BLOCKS: u32 = 8192;

// Field offsets in a transaction block.
const OFF_UPDATE_SLOTS: usize = 36;
const OFF_UPDATE_EXTENTS: usize = OFF_UPDATE_SLOTS + 2 * AL_UPDATES_PER_TRANSACTION;
const OFF_CONTEXT: usize = OFF_UPDATE_EXTENTS + 4 * AL_UPDATES_PER_TRANSACTION;

/// Shape of the on-disk ring: `stripes` stripes of `stripe_size_4k` blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AlGeometry {
    stripes: u32,
    stripe_size_4k: u32,
}

impl AlGeometry {
    /// A ring of `stripes × stripe_size_4k` 4 KiB blocks: at least 8 (32 KiB, DRBD's
    /// minimum) and at most [`AL_MAX_BLOCKS`].
    pub fn new(stripes: u32, stripe_size_4k: u32) -> Result<AlGeometry, &'static str> {
        if stripes == 0 || stripe_size_4k == 0 {
            return Err("al-stripes and al-stripe-size must be positive");
        }
        let blocks = u64::from(stripes) * u64::from(stripe_size_4k);
        if blocks < 8 {
            return Err("the activity log needs at least 32 KiB (al-stripes × al-stripe-size)");
        }
        if blocks > u64::from(AL_MAX_BLOCKS) {
            return Err("the activity log may be at most 32 MiB (al-stripes × al-stripe-size)");
        }
        Ok(AlGeometry {
            stripes,
            stripe_size_4k,
        })
    }

    /// DRBD's default ring: one stripe of 32 KiB.
    pub fn default_ring() -> AlGeometry {
        AlGeometry {
            stripes: 1,
            stripe_size_4k: 8,
        }
    }

    /// Number of stripes.
    pub fn stripes(&self) -> u32 {
        self.stripes
    }

    /// Blocks per stripe.
    pub fn stripe_size_4k(&self) -> u32 {
        self.stripe_size_4k
    }

    /// Ring size in 4 KiB blocks.
    pub fn blocks(&self) -> u32 {
        // Both ≤ AL_MAX_BLOCKS by construction.
        self.stripes * self.stripe_size_4k
    }

    /// Ring size in bytes.
    pub fn bytes(&self) -> u64 {
        u64::from(self.blocks()) * AL_BLOCK as u64
    }

    /// The largest `al-extents` this ring can describe (DRBD's `drbd_al_extents_max`):
    /// the newest transaction may be torn, and the rest must carry every slot's context.
    pub fn max_al_extents(&self) -> u32 {
        let ctx = AL_CONTEXT_U32;
        let sufficient = AL_EXTENTS_MAX.div_ceil(ctx);
        let blocks = self.blocks();
        if blocks > sufficient + 1 {
            AL_EXTENTS_MAX
        } else {
            (blocks - 1) * ctx
        }
    }
}

/// First and last extent of `len` bytes at `sector`, for extents of `2^shift` sectors
/// ([`AL_EXTENT_SHIFT`] − 9 for DRBD's 4 MiB). A zero length counts as one sector.
pub fn extent_range(sector: u64, len: u32, shift: u32) -> (u32, u32) {
    let end = sector.saturating_add(u64::from(len.div_ceil(512)).max(1)) - 1;
    let e = |x: u64| u32::try_from(x >> shift).unwrap_or(u32::MAX - 1);
    (e(sector), e(end))
}

/// The ring block (0-based, in 4 KiB blocks from the ring's start) that holds
/// transaction `tr_number` (`al_tr_number_to_on_disk_sector`): transactions go round
/// the stripes, so consecutive ones land on different stripes.
pub(crate) fn al_block_of(geo: &AlGeometry, tr_number: u32) -> u32 {
    let t = tr_number % geo.blocks();
    (t % geo.stripes) * geo.stripe_size_4k + t / geo.stripes
}

/// The number after `t`. Normally `t + 1`; at the u32 wrap of a ring whose size does not
/// divide 2^32 (e.g. 3 stripes × 5 blocks), `u32::MAX` and 0 would land in the same
/// block and the newer transaction would overwrite the one before it, so the number
/// jumps to the one that lands in the next block instead (still newer by serial-number
/// arithmetic, which is all replay compares).
pub(crate) fn next_tr_number(geo: &AlGeometry, t: u32) -> u32 {
    match t.checked_add(1) {
        Some(n) => n,
        None => (t % geo.blocks() + 1) % geo.blocks(),
    }
}

/// DRBD's AL checksum: CRC32C with initial value 0 and no final inversion (the
/// kernel's `crc32c(0, buf, 4096)`), over the block with its crc field zeroed.
pub fn al_crc(block: &[u8; AL_BLOCK]) -> u32 {
    let mut b = *block;
    b[8..12].fill(0);
    // crc32c_append(c, d) = !raw(!c, d); with c = !0 that is !raw(0, d).
    !crc32c::crc32c_append(u32::MAX, &b)
}

/// One transaction, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlTransaction {
    /// Its number (serial; wraps).
    pub tr_number: u32,
    /// Slot changes `(slot, new extent)`, at most [`AL_UPDATES_PER_TRANSACTION`].
    pub updates: Vec<(u16, u32)>,
    /// First slot of the context window.
    pub context_start: u16,
    /// `al-extents` when it was written.
    pub context_size: u16,
    /// Extents of slots `context_start..`, at most [`AL_CONTEXT_PER_TRANSACTION`];
    /// [`LC_FREE`] for free slots.
    pub context: Vec<u32>,
}

/// Encodes an update transaction (type [`AL_TR_UPDATE`]) with its crc. Updates and
/// context beyond the per-transaction limits are dropped (callers never produce them).
pub fn encode_transaction(t: &AlTransaction) -> [u8; AL_BLOCK] {
    let mut b = [0u8; AL_BLOCK];
    b[0..4].copy_from_slice(&AL_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&t.tr_number.to_be_bytes());
    b[12..14].copy_from_slice(&AL_TR_UPDATE.to_be_bytes());
    let n = t.updates.len().min(AL_UPDATES_PER_TRANSACTION);
    // n ≤ 64.
    b[14..16].copy_from_slice(&u16::try_from(n).unwrap_or(0).to_be_bytes());
    b[16..18].copy_from_slice(&t.context_size.to_be_bytes());
    b[18..20].copy_from_slice(&t.context_start.to_be_bytes());
    for i in 0..AL_UPDATES_PER_TRANSACTION {
        let (slot, extent) = t.updates.get(i).copied().unwrap_or((u16::MAX, LC_FREE));
        let s = OFF_UPDATE_SLOTS + 2 * i;
        b[s..s + 2].copy_from_slice(&slot.to_be_bytes());
        let e = OFF_UPDATE_EXTENTS + 4 * i;
        b[e..e + 4].copy_from_slice(&extent.to_be_bytes());
    }
    for i in 0..AL_CONTEXT_PER_TRANSACTION {
        let extent = t.context.get(i).copied().unwrap_or(LC_FREE);
        let c = OFF_CONTEXT + 4 * i;
        b[c..c + 4].copy_from_slice(&extent.to_be_bytes());
    }
    let crc = al_crc(&b);
    b[8..12].copy_from_slice(&crc.to_be_bytes());
    b
}

/// A block as drbdmeta's `v84_al_disk_to_cpu` sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlBlock {
    /// Magic and crc are right.
    pub valid: bool,
    /// `transaction_type`.
    pub kind: u16,
    /// The transaction's fields (meaningful for `kind == AL_TR_UPDATE`). `updates` holds
    /// every entry drbdmeta would apply: the first `n_updates`, plus later ones whose
    /// slot is not 0xffff.
    pub tr: AlTransaction,
}

fn be16(b: &[u8], at: usize) -> u16 {
    b.get(at..at + 2)
        .and_then(|s| <[u8; 2]>::try_from(s).ok())
        .map_or(0, u16::from_be_bytes)
}

fn be32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .and_then(|s| <[u8; 4]>::try_from(s).ok())
        .map_or(0, u32::from_be_bytes)
}

/// Decodes one 4 KiB block. Never fails: a bad block comes back with `valid: false`.
pub fn decode_block(block: &[u8; AL_BLOCK]) -> AlBlock {
    let magic = be32(block, 0);
    let crc = be32(block, 8);
    let valid = magic == AL_MAGIC && crc == al_crc(block);
    let n_updates = usize::from(be16(block, 14));
    let mut updates = Vec::new();
    for i in 0..AL_UPDATES_PER_TRANSACTION {
        let slot = be16(block, OFF_UPDATE_SLOTS + 2 * i);
        if i >= n_updates && slot == u16::MAX {
            continue;
        }
        updates.push((slot, be32(block, OFF_UPDATE_EXTENTS + 4 * i)));
    }
    let context = (0..AL_CONTEXT_PER_TRANSACTION)
        .map(|i| be32(block, OFF_CONTEXT + 4 * i))
        .collect();
    AlBlock {
        valid,
        kind: be16(block, 12),
        tr: AlTransaction {
            tr_number: be32(block, 4),
            updates,
            context_start: be16(block, 18),
            context_size: be16(block, 16),
            context,
        },
    }
}

/// The ring create-md writes (drbdmeta's `initialize_al`): every block has the magic,
/// type [`AL_TR_INITIALIZED`], and a valid crc.
pub fn initialized_ring(geo: &AlGeometry) -> Vec<u8> {
    let mut block = [0u8; AL_BLOCK];
    block[0..4].copy_from_slice(&AL_MAGIC.to_be_bytes());
    block[12..14].copy_from_slice(&AL_TR_INITIALIZED.to_be_bytes());
    let crc = al_crc(&block);
    block[8..12].copy_from_slice(&crc.to_be_bytes());
    let mut ring = Vec::with_capacity(usize::try_from(geo.bytes()).unwrap_or(0));
    for _ in 0..geo.blocks() {
        ring.extend_from_slice(&block);
    }
    ring
}

/// What [`replay`] found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Replay {
    /// Extents of the active set at the newest transaction, sorted, no duplicates.
    pub hot: Vec<u32>,
    /// Blocks with a good magic and crc.
    pub valid: u32,
    /// Blocks with a bad magic or crc.
    pub corrupt: u32,
    /// Valid update transactions.
    pub updates: u32,
    /// Slot numbers ≥ 65534 found in transactions and skipped.
    pub bad_slots: u32,
}

/// Why a ring cannot be replayed (drbdmeta's negative returns).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReplayError {
    /// Not one valid block (drbdmeta: -ENODATA).
    #[error(
        "no usable activity log found (not one valid transaction block); was create-md run on \
         this device?"
    )]
    NoValidTransaction,
    /// Some valid initialised blocks, some corrupt ones, and no update transaction
    /// (drbdmeta: -EINVAL).
    #[error("activity log has corrupt blocks and no valid update transaction")]
    Inconsistent,
}

/// Rebuilds the active set from a ring (drbdmeta's `replay_al_84`). `ring` holds the
/// ring's blocks in on-disk order; missing trailing blocks count as corrupt.
/// An all-initialised ring replays to an empty set.
pub fn replay(ring: &[u8], geo: &AlGeometry) -> Result<Replay, ReplayError> {
    let mx = geo.blocks();
    let mut out = Replay::default();
    // Logical index b holds the transactions numbered ≡ b (mod mx).
    let mut blocks: Vec<Option<AlBlock>> = Vec::with_capacity(mx as usize);
    // (logical index, tr_number) of the oldest and newest update transactions.
    let mut oldest: Option<(u32, u32)> = None;
    let mut newest: Option<(u32, u32)> = None;
    for b in 0..mx {
        let o = al_block_of(geo, b) as usize;
        let blk = ring
            .get(o * AL_BLOCK..(o + 1) * AL_BLOCK)
            .and_then(|s| <&[u8; AL_BLOCK]>::try_from(s).ok())
            .map(decode_block)
            .filter(|d| d.valid);
        match &blk {
            None => out.corrupt += 1,
            Some(d) => {
                out.valid += 1;
                if d.kind != AL_TR_INITIALIZED {
                    out.updates += 1;
                    let t = d.tr.tr_number;
                    match (oldest, newest) {
                        (Some((_, ot)), Some((_, nt))) => {
                            // Serial-number comparison, as drbdmeta's (int) casts.
                            if t.wrapping_sub(ot).cast_signed() < 0 {
                                oldest = Some((b, t));
                            }
                            if t.wrapping_sub(nt).cast_signed() > 0 {
                                newest = Some((b, t));
                            }
                        }
                        _ => {
                            oldest = Some((b, t));
                            newest = Some((b, t));
                        }
                    }
                }
            }
        }
        blocks.push(blk);
    }
    if out.valid == 0 {
        return Err(ReplayError::NoValidTransaction);
    }
    let (Some((first, _)), Some((last, _))) = (oldest, newest) else {
        let first_torn = blocks.first().is_some_and(Option::is_none);
        return if out.valid == mx || (first_torn && out.valid == mx - 1) {
            Ok(out)
        } else {
            Err(ReplayError::Inconsistent)
        };
    };
    let last = if last < first { last + mx } else { last };
    let mut hot = vec![LC_FREE; AL_EXTENTS_MAX as usize];
    for b in first..=last {
        let Some(Some(d)) = blocks.get((b % mx) as usize) else {
            continue;
        };
        if d.kind == AL_TR_INITIALIZED {
            continue;
        }
        for (i, &extent) in d.tr.context.iter().enumerate() {
            let slot = usize::from(d.tr.context_start) + i;
            if extent == LC_FREE && slot >= usize::from(d.tr.context_size) {
                continue;
            }
            match hot.get_mut(slot) {
                Some(h) => *h = extent,
                None => out.bad_slots += 1,
            }
        }
        for &(slot, extent) in &d.tr.updates {
            match hot.get_mut(usize::from(slot)) {
                Some(h) => *h = extent,
                None => out.bad_slots += 1,
            }
        }
    }
    hot.retain(|&e| e != LC_FREE);
    hot.sort_unstable();
    hot.dedup();
    out.hot = hot;
    Ok(out)
}

/// Sets the bits of every hot extent (1024 bits = 128 bytes each) in `bitmap`, an
/// on-disk bitmap of one peer (little-endian bits; bit n = block n). Extents past the
/// end are clipped. Returns how many bits were newly set.
pub fn apply_hot_extents(bitmap: &mut [u8], hot: &[u32]) -> u64 {
    let per = (BITS_PER_EXTENT / 8) as usize;
    let mut added = 0u64;
    for &e in hot {
        let Some(start) = (e as usize).checked_mul(per) else {
            continue;
        };
        let end = start.saturating_add(per).min(bitmap.len());
        if let Some(bytes) = bitmap.get_mut(start..end) {
            for byte in bytes {
                added += u64::from((!*byte).count_ones());
                *byte = 0xff;
            }
        }
    }
    added
}

// ----- the runtime LRU ------------------------------------------------------------------

const NIL: u32 = u32::MAX;

#[derive(Debug, Clone, Copy)]
struct Slot {
    /// Extent as of the last committed transaction ([`LC_FREE`] if none).
    extent: u32,
    /// Extent this slot is being changed to by a staged or in-flight transaction.
    staged: Option<u32>,
    /// Writes holding the slot's (new) extent.
    refs: u32,
    /// LRU links: `prev` is towards the most recently used end.
    prev: u32,
    next: u32,
}

#[derive(Debug, Clone, Copy)]
struct Change {
    slot: u16,
    old: u32,
    new: u32,
}

/// What [`ActivityLog::begin`] decided for a write's extents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Begin {
    /// Every extent is committed; references taken: the write may go to disk.
    Active,
    /// References taken; some extent waits for a transaction to be written.
    Pending,
    /// Not enough room in the next transaction or no evictable slot: nothing was taken;
    /// try again after a transaction commits or a write retires.
    NoRoom,
}

/// A transaction ready to be written: first the bitmap pages of `evicted` extents, then
/// `block` at ring block `ring_block`, with FUA.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The 4 KiB transaction.
    pub block: Box<[u8; AL_BLOCK]>,
    /// Where in the ring it goes.
    pub ring_block: u32,
    /// Extents leaving the log; their bitmap pages must be on disk first.
    pub evicted: Vec<u32>,
}

/// Counters for status and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct AlStats {
    /// Writes whose extents were all active.
    pub hits: u64,
    /// Extents that had to be added by a transaction.
    pub misses: u64,
    /// Transactions written.
    pub transactions: u64,
    /// Extents evicted to make room.
    pub evictions: u64,
    /// Times a write found no room and had to wait for a commit or a retirement.
    pub starved: u64,
    /// Extents in the log (committed or staged).
    pub active: u32,
    /// Slots (al-extents).
    pub slots: u32,
}

/// The runtime activity log of one volume. See the module docs.
#[derive(Debug)]
pub struct ActivityLog {
    geo: AlGeometry,
    slots: Vec<Slot>,
    /// Extent → slot for every extent committed or staged (not for evicted ones).
    map: HashMap<u32, u16>,
    /// Most and least recently used slots.
    head: u32,
    tail: u32,
    staged: Vec<Change>,
    in_flight: Vec<Change>,
    writing: bool,
    tr_number: u32,
    cycle: u32,
    stats: AlStats,
}

impl ActivityLog {
    /// An empty log of `al_extents` slots over ring `geo`; the first transaction gets
    /// number `first_tr_number` (the ring must have been initialised, or replayed and
    /// re-initialised, so that older numbers in it cannot be mistaken for newer ones).
    pub fn new(
        geo: AlGeometry,
        al_extents: u32,
        first_tr_number: u32,
    ) -> Result<ActivityLog, &'static str> {
        if !(AL_EXTENTS_MIN..=AL_EXTENTS_MAX).contains(&al_extents) {
            return Err("al-extents must be within 67..=65534");
        }
        if al_extents > geo.max_al_extents() {
            return Err(
                "al-extents is larger than the activity log ring can describe (raise \
                 al-stripe-size)",
            );
        }
        let n = al_extents;
        let slots = (0..n)
            .map(|i| Slot {
                extent: LC_FREE,
                staged: None,
                refs: 0,
                prev: if i == 0 { NIL } else { i - 1 },
                next: if i + 1 == n { NIL } else { i + 1 },
            })
            .collect();
        Ok(ActivityLog {
            geo,
            slots,
            map: HashMap::with_capacity(n as usize),
            head: 0,
            tail: n - 1,
            staged: Vec::new(),
            in_flight: Vec::new(),
            writing: false,
            tr_number: first_tr_number,
            cycle: 0,
            stats: AlStats {
                slots: n,
                ..AlStats::default()
            },
        })
    }

    /// The ring's shape.
    pub fn geometry(&self) -> &AlGeometry {
        &self.geo
    }

    /// Counters.
    pub fn stats(&self) -> AlStats {
        AlStats {
            active: u32::try_from(self.map.len()).unwrap_or(u32::MAX),
            ..self.stats
        }
    }

    /// Whether a transaction is being written.
    pub fn is_writing(&self) -> bool {
        self.writing
    }

    /// Whether changes wait for the next transaction.
    pub fn has_staged(&self) -> bool {
        !self.staged.is_empty()
    }

    /// The extents in the log (committed or staged), sorted.
    pub fn active_extents(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.map.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// Takes a reference on every extent of `first..=last` for a write, staging the
    /// missing ones into the next transaction. See [`Begin`].
    pub fn begin(&mut self, first: u32, last: u32) -> Begin {
        // The hit path (every extent in the log) allocates nothing.
        if (first..=last).all(|e| self.map.contains_key(&e)) {
            self.stats.hits += 1;
        } else {
            let missing: Vec<u32> = (first..=last)
                .filter(|e| !self.map.contains_key(e))
                .collect();
            if self.staged.len() + missing.len() > AL_UPDATES_PER_TRANSACTION {
                self.stats.starved += 1;
                return Begin::NoRoom;
            }
            // Pin the write's own present extents so none of them is picked as a victim.
            let present: Vec<u16> = (first..=last)
                .filter_map(|e| self.map.get(&e).copied())
                .collect();
            for &p in &present {
                self.slots[usize::from(p)].refs += 1;
            }
            let victims = self.victims(missing.len());
            for &p in &present {
                self.slots[usize::from(p)].refs -= 1;
            }
            if victims.len() < missing.len() {
                self.stats.starved += 1;
                return Begin::NoRoom;
            }
            for (&e, &slot) in missing.iter().zip(&victims) {
                self.stage(slot, e);
            }
        }
        let mut committed = true;
        for e in first..=last {
            if let Some(&slot) = self.map.get(&e) {
                let s = &mut self.slots[usize::from(slot)];
                s.refs += 1;
                committed &= s.staged.is_none();
                self.touch(u32::from(slot));
            }
        }
        if committed {
            Begin::Active
        } else {
            Begin::Pending
        }
    }

    /// Whether every extent of `first..=last` is committed (a pending write may go).
    pub fn is_active(&self, first: u32, last: u32) -> bool {
        (first..=last).all(|e| {
            self.map
                .get(&e)
                .is_some_and(|&s| self.slots[usize::from(s)].staged.is_none())
        })
    }

    /// Drops a write's references (when it is retired).
    pub fn put(&mut self, first: u32, last: u32) {
        for e in first..=last {
            if let Some(&slot) = self.map.get(&e) {
                let s = &mut self.slots[usize::from(slot)];
                s.refs = s.refs.saturating_sub(1);
            }
        }
    }

    /// The next transaction, if changes are staged and none is being written.
    pub fn prepare(&mut self) -> Option<Prepared> {
        if self.writing || self.staged.is_empty() {
            return None;
        }
        self.writing = true;
        self.in_flight = std::mem::take(&mut self.staged);
        let n = self.slots.len();
        let start = self.cycle as usize;
        let end = (start + AL_CONTEXT_PER_TRANSACTION).min(n);
        let tr = AlTransaction {
            tr_number: self.tr_number,
            updates: self.in_flight.iter().map(|c| (c.slot, c.new)).collect(),
            // Both < 65535: at most AL_EXTENTS_MAX slots.
            context_start: u16::try_from(start).unwrap_or(u16::MAX),
            context_size: u16::try_from(n).unwrap_or(u16::MAX),
            context: self.slots[start..end].iter().map(|s| s.extent).collect(),
        };
        let ring_block = al_block_of(&self.geo, self.tr_number);
        self.tr_number = next_tr_number(&self.geo, self.tr_number);
        self.cycle = if end >= n {
            0
        } else {
            u32::try_from(end).unwrap_or(0)
        };
        let evicted = self
            .in_flight
            .iter()
            .filter(|c| c.old != LC_FREE)
            .map(|c| c.old)
            .collect();
        Some(Prepared {
            block: Box::new(encode_transaction(&tr)),
            ring_block,
            evicted,
        })
    }

    /// The prepared transaction is on disk: its extents are committed.
    pub fn committed(&mut self) {
        for c in std::mem::take(&mut self.in_flight) {
            let s = &mut self.slots[usize::from(c.slot)];
            s.extent = c.new;
            s.staged = None;
        }
        self.writing = false;
        self.stats.transactions += 1;
    }

    /// Writing the transaction (or the bitmap pages before it) failed: every staged and
    /// in-flight change is undone (their extents leave the log, evicted ones come back,
    /// their references are dropped). The caller fails the writes that waited for them.
    pub fn failed(&mut self) {
        let mut undo = std::mem::take(&mut self.in_flight);
        undo.append(&mut self.staged);
        for c in undo.into_iter().rev() {
            self.map.remove(&c.new);
            if c.old != LC_FREE {
                self.map.insert(c.old, c.slot);
            }
            let s = &mut self.slots[usize::from(c.slot)];
            s.staged = None;
            s.refs = 0;
        }
        self.writing = false;
    }

    /// Up to `n` slots that can take a new extent: free ones first, then the least
    /// recently used ones with no references and no change pending.
    fn victims(&self, n: usize) -> Vec<u16> {
        let mut out = Vec::with_capacity(n);
        let mut i = self.tail;
        while i != NIL && out.len() < n {
            let s = &self.slots[i as usize];
            if s.refs == 0 && s.staged.is_none() {
                // i < al_extents ≤ 65534.
                out.extend(u16::try_from(i).ok());
            }
            i = s.prev;
        }
        out
    }

    fn stage(&mut self, slot: u16, extent: u32) {
        let s = &mut self.slots[usize::from(slot)];
        let old = s.extent;
        s.staged = Some(extent);
        if old != LC_FREE {
            self.map.remove(&old);
            self.stats.evictions += 1;
        }
        self.map.insert(extent, slot);
        self.staged.push(Change {
            slot,
            old,
            new: extent,
        });
        self.stats.misses += 1;
    }

    /// Moves slot `i` to the most recently used end.
    fn touch(&mut self, i: u32) {
        if self.head == i {
            return;
        }
        let Slot { prev, next, .. } = self.slots[i as usize];
        if prev != NIL {
            self.slots[prev as usize].next = next;
        }
        if next != NIL {
            self.slots[next as usize].prev = prev;
        } else {
            self.tail = prev;
        }
        self.slots[i as usize].prev = NIL;
        self.slots[i as usize].next = self.head;
        if self.head != NIL {
            self.slots[self.head as usize].prev = i;
        }
        self.head = i;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::sim::rng::Rng;
    use std::collections::BTreeSet;

    /// CRC32C bit by bit with DRBD's convention (initial 0, no final xor), independent
    /// of the crc32c crate.
    fn crc_reference(data: &[u8]) -> u32 {
        let mut crc = 0u32;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0x82f6_3b78
                } else {
                    crc >> 1
                };
            }
        }
        crc
    }

    #[test]
    fn crc_uses_drbds_convention() {
        let ring = initialized_ring(&AlGeometry::default_ring());
        assert_eq!(ring.len(), 32768);
        let mut b: [u8; AL_BLOCK] = ring[..AL_BLOCK].try_into().unwrap();
        let stored = u32::from_be_bytes(b[8..12].try_into().unwrap());
        b[8..12].fill(0);
        assert_eq!(stored, crc_reference(&b));
        assert_eq!(al_crc(&b), stored);
        // Every block of the ring is the same valid INITIALIZED block.
        for blk in ring.chunks(AL_BLOCK) {
            let d = decode_block(blk.try_into().unwrap());
            assert!(d.valid);
            assert_eq!(d.kind, AL_TR_INITIALIZED);
        }
    }

    #[test]
    fn transaction_layout_round_trips_and_detects_damage() {
        let t = AlTransaction {
            tr_number: 0xdead_beef,
            updates: vec![(3, 17), (1000, 4_000_000)],
            context_start: 919,
            context_size: 1237,
            context: vec![5; 318],
        };
        let b = encode_transaction(&t);
        assert_eq!(&b[0..4], &[0x69, 0xcb, 0x65, 0xa2]);
        assert_eq!(&b[4..8], &[0xde, 0xad, 0xbe, 0xef]);
        assert_eq!(&b[14..16], &[0, 2]); // n_updates
        assert_eq!(&b[16..18], &1237u16.to_be_bytes());
        assert_eq!(&b[18..20], &919u16.to_be_bytes());
        assert_eq!(&b[36..38], &3u16.to_be_bytes());
        assert_eq!(&b[40..42], &[0xff, 0xff]); // unused update slot
        assert_eq!(&b[164..168], &17u32.to_be_bytes());
        assert_eq!(&b[420..424], &5u32.to_be_bytes());
        assert_eq!(&b[420 + 4 * 318..424 + 4 * 318], &[0xff; 4]); // LC_FREE
        let d = decode_block(&b);
        assert!(d.valid);
        assert_eq!(d.kind, AL_TR_UPDATE);
        assert_eq!(d.tr.updates, t.updates);
        assert_eq!(&d.tr.context[..318], &t.context[..]);
        assert_eq!(d.tr.context.len(), AL_CONTEXT_PER_TRANSACTION);
        for i in [0usize, 4, 9, 14, 100, 4095] {
            let mut bad = b;
            bad[i] ^= 0x10;
            assert!(!decode_block(&bad).valid, "flip at byte {i} not detected");
        }
    }

    #[test]
    fn geometry_limits_and_striped_placement() {
        assert!(AlGeometry::new(1, 7).is_err());
        assert!(AlGeometry::new(0, 8).is_err());
        assert!(AlGeometry::new(8193, 1).is_err());
        let g = AlGeometry::default_ring();
        assert_eq!(g.max_al_extents(), 7 * 919);
        assert_eq!(
            AlGeometry::new(4, 32).unwrap().max_al_extents(),
            AL_EXTENTS_MAX
        );
        let g = AlGeometry::new(4, 2).unwrap();
        let order: Vec<u32> = (0..10).map(|t| al_block_of(&g, t)).collect();
        // Round the stripes: 0,2,4,6 then 1,3,5,7, then wrap.
        assert_eq!(order, vec![0, 2, 4, 6, 1, 3, 5, 7, 0, 2]);
        assert!(ActivityLog::new(AlGeometry::default_ring(), 66, 0).is_err());
        assert!(ActivityLog::new(AlGeometry::default_ring(), 6434, 0).is_err());
        assert!(ActivityLog::new(AlGeometry::default_ring(), 6433, 0).is_ok());
    }

    #[test]
    fn transaction_numbers_stay_in_ring_order_across_the_wrap() {
        for (stripes, size) in [(1u32, 8u32), (3, 5), (2, 7)] {
            let geo = AlGeometry::new(stripes, size).unwrap();
            let n = geo.blocks();
            let mut ring = initialized_ring(&geo);
            let mut al = ActivityLog::new(geo, 67, u32::MAX - 3 * n).unwrap();
            let mut blocks = Vec::new();
            for e in 0..(6 * n) {
                assert_eq!(al.begin(e, e), Begin::Pending);
                let p = al.prepare().unwrap();
                blocks.push(p.ring_block);
                let o = p.ring_block as usize * AL_BLOCK;
                ring[o..o + AL_BLOCK].copy_from_slice(&p.block[..]);
                al.committed();
                al.put(e, e);
                let r = replay(&ring, &geo).unwrap();
                assert_eq!(r.hot, committed_set(&al), "{stripes}x{size} after {e}");
            }
            // Consecutive transactions always go to consecutive logical blocks: no block
            // is written twice in a row.
            assert!(blocks.windows(2).all(|w| w[0] != w[1]), "{blocks:?}");
        }
    }

    #[test]
    fn extent_range_covers_the_range() {
        const SHIFT_4M: u32 = AL_EXTENT_SHIFT - 9;
        assert_eq!(extent_range(0, 4096, SHIFT_4M), (0, 0));
        assert_eq!(extent_range(8191, 1024, SHIFT_4M), (0, 1));
        assert_eq!(extent_range(8192, 128 << 20, SHIFT_4M), (1, 32));
    }

    /// Writes a prepared transaction into a ring image.
    fn put_block(ring: &mut [u8], p: &Prepared) {
        let o = p.ring_block as usize * AL_BLOCK;
        ring[o..o + AL_BLOCK].copy_from_slice(&p.block[..]);
    }

    fn committed_set(al: &ActivityLog) -> Vec<u32> {
        let mut v: Vec<u32> = al
            .slots
            .iter()
            .map(|s| s.extent)
            .filter(|&e| e != LC_FREE)
            .collect();
        v.sort_unstable();
        v
    }

    /// Random writes against the LRU; after every commit the ring replays to exactly the
    /// committed set, and a torn newest block replays to the previous one.
    #[test]
    fn replay_of_the_ring_equals_the_committed_set() {
        for (seed, stripes, size, n, extents) in [
            (1u64, 1u32, 8u32, 67u32, 200u32),
            (2, 4, 2, 67, 1000),
            (3, 1, 8, 1237, 5000),
            (4, 3, 3, 2000, 3000),
            (5, 1, 8, 6433, 20000),
        ] {
            let geo = AlGeometry::new(stripes, size).unwrap();
            let mut ring = initialized_ring(&geo);
            let mut al = ActivityLog::new(geo, n, 0).unwrap();
            let mut rng = Rng::new(seed);
            let mut held: Vec<(u32, u32)> = Vec::new();
            let mut waiting: Vec<(u32, u32)> = Vec::new();
            let mut last_committed = Vec::new();
            for _ in 0..3000 {
                match rng.below(10) {
                    0..=5 => {
                        let first = u32::try_from(rng.below(u64::from(extents))).unwrap();
                        let last = first + u32::from(rng.below(8) == 0);
                        match al.begin(first, last) {
                            Begin::Active => held.push((first, last)),
                            Begin::Pending => waiting.push((first, last)),
                            Begin::NoRoom => {}
                        }
                    }
                    6 | 7 => {
                        if !held.is_empty() {
                            let i = usize::try_from(rng.below(held.len() as u64)).unwrap();
                            let (f, l) = held.swap_remove(i);
                            al.put(f, l);
                        }
                    }
                    _ => {
                        if let Some(p) = al.prepare() {
                            assert!(p.evicted.iter().all(|e| !al.map.contains_key(e)));
                            if rng.below(20) == 0 {
                                // Torn write: the block never makes it.
                                let mut torn = ring.clone();
                                let o = p.ring_block as usize * AL_BLOCK;
                                torn[o + 100] ^= 1;
                                put_block(&mut torn, &p);
                                torn[o + 100] ^= 1;
                                let r = replay(&torn, &geo).unwrap();
                                assert_eq!(r.hot, last_committed, "seed {seed}: torn newest");
                            }
                            put_block(&mut ring, &p);
                            al.committed();
                            let r = replay(&ring, &geo).unwrap();
                            last_committed = committed_set(&al);
                            assert_eq!(r.hot, last_committed, "seed {seed}");
                            waiting.retain(|&(f, l)| {
                                if al.is_active(f, l) {
                                    held.push((f, l));
                                    false
                                } else {
                                    true
                                }
                            });
                        }
                    }
                }
                // Every held write's extents are committed and in the log.
                for &(f, l) in &held {
                    assert!(al.is_active(f, l));
                }
                assert!(al.map.len() <= n as usize);
            }
            assert!(
                al.stats().transactions > 10,
                "seed {seed}: too few transactions"
            );
            assert!(al.stats().evictions > 0 || al.stats().misses <= u64::from(n));
        }
    }

    #[test]
    fn hits_take_no_transaction_and_referenced_extents_are_never_evicted() {
        let mut al = ActivityLog::new(AlGeometry::default_ring(), 67, 0).unwrap();
        for e in 0..67 {
            assert_eq!(al.begin(e, e), Begin::Pending);
            if e % 64 == 63 {
                // A transaction carries at most 64 changes.
                assert_eq!(al.begin(1000, 1000), Begin::NoRoom);
                al.prepare().unwrap();
                al.committed();
            }
        }
        let p = al.prepare().unwrap();
        assert!(p.evicted.is_empty());
        al.committed();
        assert_eq!(al.begin(5, 5), Begin::Active);
        assert_eq!(al.stats().hits, 1);
        // All 67 slots referenced: a new extent has no room.
        assert_eq!(al.begin(100, 100), Begin::NoRoom);
        al.put(7, 7);
        al.put(7, 7); // once for begin above, and extents hold one ref each from staging
        assert_eq!(al.begin(100, 100), Begin::Pending);
        let p = al.prepare().unwrap();
        assert_eq!(p.evicted, vec![7]);
        assert!(!al.is_active(100, 100));
        // While it is being written, 7 is not a hit any more, and a miss waits for the
        // next transaction.
        assert_eq!(al.begin(7, 7), Begin::NoRoom);
        al.committed();
        assert!(al.is_active(100, 100));
        let active: BTreeSet<u32> = al.active_extents().into_iter().collect();
        assert!(active.contains(&100) && !active.contains(&7));
    }

    #[test]
    fn a_write_spanning_two_extents_never_evicts_its_own() {
        let mut al = ActivityLog::new(AlGeometry::default_ring(), 67, 0).unwrap();
        for e in 10..77 {
            al.begin(e, e);
            al.prepare();
            al.committed();
            al.put(e, e);
        }
        // Extent 10 is the least recently used; a write over 9..=10 must evict the next
        // one (11), not its own 10.
        assert_eq!(al.begin(9, 10), Begin::Pending);
        let p = al.prepare().unwrap();
        assert_eq!(p.evicted, vec![11]);
        al.committed();
        assert!(al.is_active(9, 10));
    }

    #[test]
    fn failure_rolls_back() {
        let mut al = ActivityLog::new(AlGeometry::default_ring(), 67, 0).unwrap();
        assert_eq!(al.begin(3, 3), Begin::Pending);
        al.prepare().unwrap();
        assert_eq!(al.begin(4, 4), Begin::Pending);
        al.failed();
        assert!(al.active_extents().is_empty());
        assert!(!al.is_writing() && !al.has_staged());
        assert_eq!(al.begin(3, 3), Begin::Pending);
        al.prepare().unwrap();
        al.committed();
        assert!(al.is_active(3, 3));
    }

    #[test]
    fn replay_edge_cases() {
        let geo = AlGeometry::default_ring();
        assert_eq!(
            replay(&vec![0u8; 32768], &geo),
            Err(ReplayError::NoValidTransaction)
        );
        let mut ring = initialized_ring(&geo);
        assert!(replay(&ring, &geo).unwrap().hot.is_empty());
        // First block torn, rest initialised: fine (a first transaction that failed).
        ring[0] ^= 1;
        assert!(replay(&ring, &geo).unwrap().hot.is_empty());
        // Another corrupt block too: drbdmeta's -EINVAL.
        ring[4096 * 3] ^= 1;
        assert_eq!(replay(&ring, &geo), Err(ReplayError::Inconsistent));
        // A short ring: missing blocks are corrupt.
        assert_eq!(
            replay(&initialized_ring(&geo)[..4096 * 6], &geo),
            Err(ReplayError::Inconsistent)
        );
        // Hostile slot numbers are skipped and counted.
        let mut ring = initialized_ring(&geo);
        let t = AlTransaction {
            tr_number: 1,
            updates: vec![(0xfffe, 9), (2, 8)],
            context_start: 0xff00,
            context_size: 0xffff,
            context: vec![1; 919],
        };
        ring[4096..8192].copy_from_slice(&encode_transaction(&t));
        let r = replay(&ring, &geo).unwrap();
        assert_eq!(r.hot, vec![1, 8]);
        assert!(r.bad_slots > 0);
    }

    #[test]
    fn apply_sets_whole_extents_and_clips() {
        let mut bm = vec![0u8; 4096];
        bm[128] = 0x0f;
        assert_eq!(
            apply_hot_extents(&mut bm, &[1, 31, 32, u32::MAX]),
            2 * 1024 - 4
        );
        assert!(bm[128..256].iter().all(|&b| b == 0xff));
        assert!(bm[31 * 128..].iter().all(|&b| b == 0xff));
        assert!(bm[..128].iter().all(|&b| b == 0));
    }
}
