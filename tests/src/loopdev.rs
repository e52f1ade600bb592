//! Loop devices and drbd-utils' `drbdmeta` for the metadata tests: a [`Loop`] device over a
//! sparse file (detached on drop, also on panic), a drbdmeta [`Minor`] number, and
//! [`drbdmeta`] / [`tandem`] runners with a time limit. Loop devices need root and
//! `/dev/loop-control`: [`loop_devices_usable`] says SKIPPED loudly when they are missing.

use crate::tools::{run_cmd, CmdOutput};
use crate::{tandem_bin, TempDir};
use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// Time limit of one drbdmeta / tandem / losetup call.
pub const TIMEOUT: Duration = Duration::from_secs(120);

/// Whether loop devices can be used; prints a loud SKIPPED line when not.
pub fn loop_devices_usable(test: &str) -> bool {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    let losetup = crate::tools::which("losetup").is_some()
        || Path::new("/usr/sbin/losetup").is_file()
        || Path::new("/sbin/losetup").is_file();
    let control = Path::new("/dev/loop-control").exists();
    if root && losetup && control {
        return true;
    }
    eprintln!(
        "\n*** SKIPPED {test}: needs root, losetup and /dev/loop-control (root={root}, \
         losetup={losetup}, loop-control={control}) ***\n"
    );
    false
}

pub fn drbdmeta_bin() -> PathBuf {
    ["/usr/sbin/drbdmeta", "/sbin/drbdmeta"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .or_else(|| crate::tools::which("drbdmeta"))
        .unwrap_or_else(|| {
            panic!(
                "`drbdmeta` is not installed: run scripts/install-deps.sh \
                 (or `apt-get install drbd-utils`)"
            )
        })
}

pub fn losetup() -> PathBuf {
    crate::tools::which("losetup").unwrap_or_else(|| PathBuf::from("/usr/sbin/losetup"))
}

/// A loop device over a sparse file, detached (and the file removed with its directory)
/// on drop, also when the test panics.
#[derive(Debug)]
pub struct Loop {
    /// `/dev/loopN`.
    pub dev: String,
    /// The backing file.
    pub file: PathBuf,
}

impl Loop {
    /// A loop device over a new sparse file of `bytes` in `dir`.
    pub fn new(dir: &TempDir, name: &str, bytes: u64) -> Loop {
        let file = dir.join(name);
        File::create(&file)
            .and_then(|f| f.set_len(bytes))
            .expect("create the sparse backing file");
        Loop::attach(file)
    }

    /// A loop device over `file`.
    pub fn attach(file: PathBuf) -> Loop {
        let out = run_cmd(
            Command::new(losetup()).args(["-f", "--show"]).arg(&file),
            TIMEOUT,
            "losetup",
        )
        .expect("run losetup");
        out.assert_success("losetup -f --show");
        let dev = out.stdout.trim().to_string();
        assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
        Loop { dev, file }
    }

    /// A second loop device over a copy of this one's file.
    pub fn copy(&self, dir: &TempDir, name: &str) -> Loop {
        let file = dir.join(name);
        let out = run_cmd(
            Command::new("cp")
                .arg("--sparse=always")
                .arg(&self.file)
                .arg(&file),
            TIMEOUT,
            "cp",
        )
        .expect("run cp");
        out.assert_success("cp --sparse=always");
        Loop::attach(file)
    }

    /// Reads `len` bytes at `offset` of the device.
    pub fn read(&self, offset: u64, len: usize) -> Vec<u8> {
        let f = File::open(&self.dev).expect("open loop device");
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, offset).expect("read loop device");
        buf
    }

    /// Writes (and fsyncs) `data` at `offset` of the device.
    pub fn write(&self, offset: u64, data: &[u8]) {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&self.dev)
            .expect("open loop device for writing");
        f.seek(SeekFrom::Start(offset)).expect("seek");
        f.write_all(data).expect("write loop device");
        f.sync_all().expect("fsync loop device");
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new(losetup()).arg("-d").arg(&self.dev).status();
    }
}

/// A drbdmeta minor number for one device; drbdmeta remembers the size of internal
/// metadata devices in `/var/lib/drbd/drbd-minor-N.lkbd`, which is removed on drop.
#[derive(Debug)]
pub struct Minor(pub u32);

impl Minor {
    /// A minor number no other test uses.
    pub fn new() -> Minor {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        Minor(0xdb00 + NEXT.fetch_add(1, Ordering::Relaxed) + 64 * (std::process::id() % 64))
    }
}

impl Default for Minor {
    fn default() -> Minor {
        Minor::new()
    }
}

impl Drop for Minor {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(format!("/var/lib/drbd/drbd-minor-{}.lkbd", self.0));
    }
}

/// `drbdmeta --force MINOR v09 DEV KIND ARGS…`.
pub fn drbdmeta(minor: &Minor, dev: &str, kind: &str, args: &[&str]) -> CmdOutput {
    let mut cmd = Command::new(drbdmeta_bin());
    cmd.arg("--force")
        .arg(minor.0.to_string())
        .args(["v09", dev, kind])
        .args(args);
    run_cmd(&mut cmd, TIMEOUT, "drbdmeta").expect("run drbdmeta")
}

/// Runs the tandem CLI; asserts it did not panic.
pub fn tandem(args: &[&str]) -> CmdOutput {
    let out =
        run_cmd(Command::new(tandem_bin()).args(args), TIMEOUT, "tandem").expect("run tandem");
    assert!(
        !out.stderr.contains("panicked"),
        "tandem {args:?} panicked:\n{}",
        out.stderr
    );
    out
}

/// `tandem dump-md --json ARGS…`, parsed; panics if it fails.
pub fn dump_md_json(args: &[&str]) -> serde_json::Value {
    let mut a = vec!["dump-md", "--json"];
    a.extend_from_slice(args);
    let out = tandem(&a);
    out.assert_success("tandem dump-md --json");
    serde_json::from_str(&out.stdout).expect("dump-md JSON")
}
