//! The offline metadata commands — `tandem create-md`, `dump-md`, `apply-al` — with the
//! meaning drbdmeta gives them, and their text and JSON output.
//!
//! `dump-md`'s text follows drbdmeta's `dump-md` line for line where the fields exist
//! (`version "v09";`, `max-peers`, the `# md_offset`/`# al_offset`/`# bm_offset`
//! comments, `node-id`, `current-uuid`, `flags`, the 32 `peer[i] { … }` blocks,
//! `history-uuids`, `# al-extents`, `la-size-sect`, `bm-byte-per-bit`, `device-uuid`,
//! `la-peer-max-bio-size`, `al-stripes`, `al-stripe-size-4k`, `# bm-bytes`,
//! `# bits-set`), so the two can be compared field by field; the bitmap itself is not
//! printed (a 1 PiB device has 32 GiB of it), only its set-bit count. `--json` gives the
//! same fields as one object for scripts and tests.
//!
//! Every command locks its device(s) first as a running node does
//! ([`crate::store::DeviceLock`]) and refuses a device in use, naming the holder's pid
//! (drbdmeta refuses a device in use too); `dump-md --force` only reads and goes on.

use super::al::AlGeometry;
use super::disk::{ApplyAlReport, CreateOptions, MetaDevice, MetaLocation};
use super::layout::SECTOR;
use super::superblock::{flag_names, mdf, mdf_peer};
use super::MetaError;
use crate::store::{DeviceLock, LockError, Store, StoreOptions};
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Which device(s) a command works on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The data device (which also holds internal metadata).
    pub device: PathBuf,
    /// A separate flex-external metadata device, if any.
    pub meta_device: Option<PathBuf>,
}

impl Target {
    /// The command-line arguments naming this target (for messages).
    pub fn args(&self) -> String {
        match &self.meta_device {
            None => self.device.display().to_string(),
            Some(m) => format!("{} --meta-device {}", self.device.display(), m.display()),
        }
    }
}

/// `create-md`'s options, as given on the command line.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CreateArgs {
    /// `--node-id`.
    pub node_id: Option<i32>,
    /// `--al-extents`.
    pub al_extents: Option<u32>,
    /// `--al-stripes` (default 1).
    pub al_stripes: Option<u32>,
    /// `--al-stripe-size` (default 32 KiB); a bare number is KiB, as in drbd.conf.
    pub al_stripe_size: Option<String>,
    /// `--force`.
    pub force: bool,
}

fn open_store(path: &Path) -> Result<Store, MetaError> {
    Store::open(path, &StoreOptions::default()).map_err(|source| MetaError::Io {
        device: path.display().to_string(),
        what: "opening",
        offset: 0,
        source,
    })
}

/// Locks `target`'s devices as a running node locks them ([`DeviceLock`]): a metadata
/// command on a device that a running node (or anything else) holds is refused, as
/// drbdmeta refuses a device in use. `read_anyway` (`dump-md --force`, which only reads)
/// goes on without the lock, with a warning on stderr.
fn lock_target(
    target: &Target,
    read_anyway: bool,
    hint: &'static str,
) -> Result<Vec<DeviceLock>, MetaError> {
    let mut locks = Vec::new();
    for path in std::iter::once(&target.device).chain(target.meta_device.as_ref()) {
        match DeviceLock::acquire(path, false) {
            Ok(l) => locks.push(l),
            Err(e @ (LockError::Held { .. } | LockError::Busy { .. })) if read_anyway => {
                use std::io::Write as _;
                let _ = writeln!(
                    std::io::stderr(),
                    "tandem: warning: {e}; dumping anyway (--force), the running node may \
                     change it meanwhile"
                );
            }
            Err(e @ (LockError::Held { .. } | LockError::Busy { .. })) => {
                return Err(MetaError::InUse {
                    reason: e.to_string(),
                    hint,
                })
            }
            // A missing device: opening it says so with the usual message.
            Err(LockError::Io { .. }) => {}
        }
    }
    Ok(locks)
}

/// Opens the metadata store of `target` and says where the metadata is.
fn open_target(target: &Target) -> Result<(Store, MetaLocation), MetaError> {
    match &target.meta_device {
        None => Ok((open_store(&target.device)?, MetaLocation::Internal)),
        Some(meta) => {
            let data_bytes = open_store(&target.device)?.size_bytes();
            Ok((open_store(meta)?, MetaLocation::FlexExternal { data_bytes }))
        }
    }
}

/// Parses `--al-stripe-size`: `32k`, `64KiB`, `1M`; a bare number is KiB. Returns 4 KiB
/// blocks.
pub(crate) fn parse_stripe_size(text: &str) -> Result<u32, MetaError> {
    let t = text.trim();
    let bytes = if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        t.parse::<u64>().ok().and_then(|k| k.checked_mul(1024))
    } else {
        crate::units::parse_size(t)
    };
    let bad = || {
        MetaError::Usage(format!(
            "--al-stripe-size {text:?} is not a size that is a positive multiple of 4 KiB \
             (e.g. 32k, 1M; a bare number is KiB)"
        ))
    };
    let bytes = bytes.filter(|b| *b > 0 && b % 4096 == 0).ok_or_else(bad)?;
    u32::try_from(bytes / 4096).map_err(|_| bad())
}

/// `tandem create-md`: fresh v09 metadata, as `drbdmeta … v09 … create-md 1` writes it.
/// Returns what to print.
pub fn create_md(target: &Target, args: &CreateArgs) -> Result<String, MetaError> {
    let stripes = args.al_stripes.unwrap_or(1);
    let size_4k = match &args.al_stripe_size {
        Some(s) => parse_stripe_size(s)?,
        None => 8,
    };
    let al = AlGeometry::new(stripes, size_4k).map_err(|why| {
        MetaError::Usage(format!(
            "--al-stripes {stripes} × --al-stripe-size {} KiB: {why}",
            u64::from(size_4k) * 4
        ))
    })?;
    let mut opts = CreateOptions::new(al);
    opts.force = args.force;
    if let Some(n) = args.node_id {
        opts.node_id = n;
    }
    if let Some(n) = args.al_extents {
        opts.al_extents = n;
    }
    let _locks = lock_target(target, false, "")?;
    let (store, location) = open_target(target)?;
    let dev = MetaDevice::create(store, location, &opts)?;
    let l = dev.layout();
    Ok(format!(
        "created v09 {} metadata on {}: md_size_sect {}, activity log {} × {} KiB, bitmap \
         {} bytes, up to {} data sectors ({} bytes)\n",
        l.kind.drbdmeta_name(),
        dev.device_name(),
        l.md_size_sect,
        l.al.stripes(),
        u64::from(l.al.stripe_size_4k()) * 4,
        l.bm_area_bytes,
        l.max_data_sectors,
        l.max_data_sectors * SECTOR
    ))
}

/// Opens `target`'s metadata, refusing unclean metadata unless `force`.
fn open_clean(target: &Target, force: bool) -> Result<MetaDevice, MetaError> {
    let (store, location) = open_target(target)?;
    let dev = MetaDevice::open(store, location)?;
    if !dev.superblock().is_clean() && !force {
        return Err(MetaError::Unclean {
            device: dev.device_name().to_string(),
            args: target.args(),
            force_hint: ", or pass --force to dump it anyway",
        });
    }
    Ok(dev)
}

fn hex64(v: u64) -> String {
    format!("0x{v:016X}")
}

fn hex32(v: u32) -> String {
    format!("0x{v:08X}")
}

/// `tandem dump-md`: the superblock fields and the bitmap's set-bit count, as text close
/// to drbdmeta's or (`json`) as one JSON object.
pub fn dump_md(target: &Target, force: bool, json: bool) -> Result<String, MetaError> {
    let _locks = lock_target(
        target,
        force,
        ", or pass --force to dump it anyway (read only; it may be changing)",
    )?;
    let dev = open_clean(target, force)?;
    let bits_set = dev.count_bits_blocking()?;
    Ok(if json {
        let mut v = dump_json(&dev, bits_set);
        v["device"] = json!(target.device.display().to_string());
        format!("{v:#}\n")
    } else {
        dump_text(&dev, bits_set, target)
    })
}

fn dump_json(dev: &MetaDevice, bits_set: u64) -> Value {
    let sb = dev.superblock();
    let l = dev.layout();
    let peers: Vec<Value> = sb
        .peers
        .iter()
        .map(|p| {
            json!({
                "bitmap_index": p.bitmap_index,
                "bitmap_uuid": hex64(p.bitmap_uuid),
                "bitmap_dagtag": hex64(p.bitmap_dagtag),
                "flags": hex32(p.flags),
                "flag_names": flag_names(p.flags, &mdf_peer::NAMES),
            })
        })
        .collect();
    json!({
        "version": "v09",
        "meta_device": dev.device_name(),
        "kind": l.kind.drbdmeta_name(),
        "clean": sb.is_clean(),
        "max_peers": sb.bm_max_peers,
        "md_size_sect": sb.md_size_sect,
        "md_offset": l.md_offset,
        "al_offset": l.al_offset,
        "bm_offset": l.bm_offset,
        "node_id": sb.node_id,
        "current_uuid": hex64(sb.current_uuid),
        "flags": hex32(sb.flags),
        "flag_names": flag_names(sb.flags, &mdf::NAMES),
        "members": hex64(sb.members),
        "peers": peers,
        "history_uuids": sb.history_uuids.iter().map(|u| hex64(*u)).collect::<Vec<_>>(),
        "al_extents": sb.al_nr_extents,
        "la_size_sect": sb.effective_size,
        "bm_byte_per_bit": sb.bm_bytes_per_bit,
        "device_uuid": hex64(sb.device_uuid),
        "la_peer_max_bio_size": sb.la_peer_max_bio_size,
        "al_stripes": sb.al_stripes,
        "al_stripe_size_4k": sb.al_stripe_size_4k,
        "bm_bytes": dev.bitmap_bytes(),
        "bits_set": bits_set,
        "max_data_sectors": l.max_data_sectors,
    })
}

fn dump_text(dev: &MetaDevice, bits_set: u64, target: &Target) -> String {
    let sb = dev.superblock();
    let l = dev.layout();
    let mut s = String::new();
    // Writing to a String cannot fail; the results are ignored on purpose.
    let _ = writeln!(
        s,
        "# tandem meta data dump\n# tandem dump-md {}\n#\n",
        target.args()
    );
    let _ = writeln!(s, "version \"v09\";\n");
    if !sb.is_clean() {
        let _ = writeln!(
            s,
            "This_is_an_unclean_meta_data_dump._Don't_trust_the_bitmap.\n\
             # You should \"apply-al\" first, if you plan to restore this.\n"
        );
    }
    let _ = writeln!(s, "max-peers {};", sb.bm_max_peers);
    let _ = writeln!(s, "# md_size_sect {}", sb.md_size_sect);
    let _ = writeln!(s, "# md_offset {}", l.md_offset);
    let _ = writeln!(s, "# al_offset {}", l.al_offset);
    let _ = writeln!(s, "# bm_offset {}\n", l.bm_offset);
    let _ = writeln!(s, "node-id {};", sb.node_id);
    let _ = writeln!(s, "current-uuid {};", hex64(sb.current_uuid));
    let names = flag_names(sb.flags, &mdf::NAMES);
    let _ = if names.is_empty() {
        writeln!(s, "flags {};", hex32(sb.flags))
    } else {
        writeln!(s, "flags {}; # {}", hex32(sb.flags), names.join(" | "))
    };
    let _ = writeln!(s, "# members {};", hex64(sb.members));
    for (i, p) in sb.peers.iter().enumerate() {
        let names = flag_names(p.flags, &mdf_peer::NAMES);
        let pretty = if names.is_empty() {
            String::new()
        } else {
            format!(" # {}", names.join(" | "))
        };
        let _ = writeln!(
            s,
            "peer[{i}] {{\n    bitmap-index {};\n    bitmap-uuid {};\n    bitmap-dagtag {};\n    \
             flags {};{pretty}\n}}",
            p.bitmap_index,
            hex64(p.bitmap_uuid),
            hex64(p.bitmap_dagtag),
            hex32(p.flags)
        );
    }
    let _ = write!(s, "history-uuids {{");
    for (i, u) in sb.history_uuids.iter().enumerate() {
        let sep = if i % 4 == 0 { "\n        " } else { " " };
        let _ = write!(s, "{sep}{};", hex64(*u));
    }
    let _ = writeln!(s, "\n}}");
    let _ = writeln!(s, "# al-extents {};", sb.al_nr_extents);
    let _ = writeln!(s, "la-size-sect {};", sb.effective_size);
    let _ = writeln!(s, "bm-byte-per-bit {};", sb.bm_bytes_per_bit);
    let _ = writeln!(s, "device-uuid {};", hex64(sb.device_uuid));
    let _ = writeln!(s, "la-peer-max-bio-size {};", sb.la_peer_max_bio_size);
    let _ = writeln!(s, "al-stripes {};", sb.al_stripes);
    let _ = writeln!(s, "al-stripe-size-4k {};", sb.al_stripe_size_4k);
    let _ = writeln!(s, "# bm-bytes {};", dev.bitmap_bytes());
    let _ = writeln!(s, "# bits-set {};", bits_set);
    s
}

/// `tandem apply-al`: drbdmeta's `apply-al` (see [`MetaDevice::apply_al_blocking`]).
/// Returns what to print: a summary, or (`json`) the report as JSON.
pub fn apply_al(target: &Target, json: bool) -> Result<String, MetaError> {
    let _locks = lock_target(target, false, "")?;
    let (store, location) = open_target(target)?;
    let mut dev = MetaDevice::open(store, location)?;
    let r = dev.apply_al_blocking()?;
    Ok(if json {
        format!("{:#}\n", report_json(&r, &dev))
    } else {
        report_text(&r, &dev)
    })
}

fn report_json(r: &ApplyAlReport, dev: &MetaDevice) -> Value {
    json!({
        "device": dev.device_name(),
        "was_clean": r.was_clean,
        "primary": r.primary,
        "valid_slots": r.valid_slots,
        "corrupt_slots": r.corrupt_slots,
        "updates": r.updates,
        "hot_extents": r.hot_extents,
        "applied_extents": r.applied_extents,
        "skipped_extents": r.skipped_extents,
        "bits_newly_set": r.bits_newly_set,
        "reinitialized": r.reinitialized,
        "ignored_error": r.ignored_error,
        "flags": hex32(dev.superblock().flags),
    })
}

fn report_text(r: &ApplyAlReport, dev: &MetaDevice) -> String {
    let mut s = String::new();
    if let Some(e) = &r.ignored_error {
        let _ = writeln!(s, "activity log: {e}; ignored, the node was not Primary");
    }
    if r.corrupt_slots > 0 {
        let _ = writeln!(s, "{} corrupt AL transactions found", r.corrupt_slots);
    }
    for e in &r.skipped_extents {
        let _ = writeln!(
            s,
            "extent {e} beyond the end of the bitmap ({} bytes for la-size-sect {}): skipped",
            dev.bitmap_bytes(),
            dev.superblock().effective_size
        );
    }
    if r.primary && r.updates > 0 {
        let _ = writeln!(
            s,
            "Marked additional {} KiB as out-of-sync based on AL ({} hot extents).",
            r.bits_newly_set * 4,
            r.applied_extents
        );
    } else if r.updates > 0 {
        let _ = writeln!(
            s,
            "{} hot extents in the AL; not applied: the node was not Primary.",
            r.hot_extents.len()
        );
    } else {
        let _ = writeln!(s, "Nothing to do.");
    }
    let _ = writeln!(
        s,
        "{}: activity log clean (flags {})",
        dev.device_name(),
        hex32(dev.superblock().flags)
    );
    s
}
