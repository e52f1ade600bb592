//! External programs the tests drive, each run with a time limit and its output captured.
//!
//! Real clients are the point of the integration tests (docs/design.md §10): fio's `nbd` engine,
//! `qemu-img`, `nbdsh`, `tcpdump`, `tshark`. A program that is not installed panics with the
//! Debian package that provides it ([`require`]), so a bare machine fails with the fix in
//! the message. Captured output is capped at [`OUTPUT_LIMIT`] per stream.

use anyhow::{bail, Context};
use rand::{RngCore, SeedableRng};
use serde_json::Value;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use crate::{scaled, wait_until, FIO_TIMEOUT, TOOL_TIMEOUT};

/// Most bytes kept from one output stream of one command.
pub const OUTPUT_LIMIT: u64 = 64 << 20;

/// The Debian package that provides each program the tests use.
const PACKAGES: &[(&str, &str)] = &[
    ("fio", "fio"),
    ("qemu-img", "qemu-utils"),
    ("nbdsh", "python3-libnbd"),
    ("nbdinfo", "libnbd-bin"),
    ("nbdkit", "nbdkit"),
    ("tcpdump", "tcpdump"),
    ("tshark", "tshark"),
    ("iperf3", "iperf3"),
];

/// Full path of `program` on `PATH`, or `None`.
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// Full path of `program`; panics naming the Debian package to install if it is missing.
pub fn require(program: &str) -> PathBuf {
    which(program).unwrap_or_else(|| {
        let pkg = PACKAGES
            .iter()
            .find(|(p, _)| *p == program)
            .map_or(program, |(_, pkg)| pkg);
        panic!(
            "`{program}` is not installed: run scripts/install-deps.sh \
             (or `apt-get install {pkg}`)"
        )
    })
}

/// What a finished command printed.
#[derive(Debug)]
pub struct CmdOutput {
    /// How it exited.
    pub status: ExitStatus,
    /// Its standard output (lossy UTF-8).
    pub stdout: String,
    /// Its standard error (lossy UTF-8).
    pub stderr: String,
}

impl CmdOutput {
    /// Panics with the output unless the command exited 0.
    pub fn assert_success(&self, what: &str) -> &Self {
        assert!(
            self.status.success(),
            "{what} failed ({})\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status,
            crate::bin::tail_lines(&self.stdout, 80),
            crate::bin::tail_lines(&self.stderr, 80)
        );
        self
    }

    /// Panics with the output unless the command failed with every one of `needles` in
    /// its stderr (a refusal that says why).
    pub fn assert_refused(&self, what: &str, needles: &[&str]) -> &Self {
        assert!(
            !self.status.success(),
            "{what} must fail, exited {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status,
            crate::bin::tail_lines(&self.stdout, 80),
            crate::bin::tail_lines(&self.stderr, 80)
        );
        for n in needles {
            assert!(
                self.stderr.contains(n),
                "{what}: stderr must contain {n:?}\n--- stderr ---\n{}",
                self.stderr
            );
        }
        self
    }
}

fn reader_thread(mut r: impl Read + Send + 'static) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        // A read error ends the capture; what was read so far is still reported.
        let _ = r.by_ref().take(OUTPUT_LIMIT).read_to_end(&mut buf);
        // Keep draining past the limit so the child never blocks on a full pipe.
        let _ = std::io::copy(&mut r, &mut std::io::sink());
        let _ = tx.send(buf);
    });
    rx
}

/// Waits for `child` until `deadline`; kills it and returns `None` past the deadline.
fn wait_deadline(child: &mut Child, deadline: Instant) -> std::io::Result<Option<ExitStatus>> {
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(Some(st));
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `cmd` (stdin closed) for at most `timeout` (scaled), capturing stdout and stderr.
/// A timeout is an error that carries what the command printed.
pub fn run_cmd(cmd: &mut Command, timeout: Duration, what: &str) -> anyhow::Result<CmdOutput> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {what}"))?;
    let out_rx = child.stdout.take().map(reader_thread);
    let err_rx = child.stderr.take().map(reader_thread);
    let deadline = Instant::now() + scaled(timeout);
    let status =
        wait_deadline(&mut child, deadline).with_context(|| format!("waiting for {what}"))?;
    // A grandchild that inherited the pipes may keep them open; do not wait for it forever.
    let collect = |rx: Option<mpsc::Receiver<Vec<u8>>>| {
        rx.and_then(|rx| rx.recv_timeout(Duration::from_secs(5)).ok())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    };
    let stdout = collect(out_rx);
    let stderr = collect(err_rx);
    match status {
        Some(status) => Ok(CmdOutput {
            status,
            stdout,
            stderr,
        }),
        None => bail!(
            "{what} did not finish within {:?}; killed\n--- stdout ---\n{}\n--- stderr ---\n{}",
            scaled(timeout),
            crate::bin::tail_lines(&stdout, 40),
            crate::bin::tail_lines(&stderr, 40)
        ),
    }
}

/// Sends `signal` (a name such as `TERM`, `INT`, `KILL`) to process `pid` with the shell's
/// `kill` builtin — this crate has no `unsafe` to call `kill(2)` directly.
pub fn send_signal(pid: u32, signal: &str) -> anyhow::Result<()> {
    let out = run_cmd(
        Command::new("/bin/sh").args(["-c", &format!("kill -s {signal} {pid}")]),
        Duration::from_secs(10),
        "kill",
    )?;
    if !out.status.success() {
        bail!("kill -s {signal} {pid}: {}", out.stderr.trim());
    }
    Ok(())
}

static UNIQUE: AtomicU32 = AtomicU32::new(0);

/// A number unique within this test process, for output file names.
pub fn unique() -> u32 {
    UNIQUE.fetch_add(1, Ordering::Relaxed)
}

// ---------------------------------------------------------------------------------------
// fio

/// One fio job against an NBD URI, with `--output-format=json`.
#[derive(Debug, Clone)]
pub struct Fio {
    args: Vec<String>,
    timeout: Duration,
}

impl Fio {
    /// A job named `tandem` with `--ioengine=nbd --uri=<uri>`; add the workload with
    /// [`Fio::arg`].
    pub fn nbd(uri: &str) -> Self {
        Fio {
            args: vec![
                "--name=tandem".into(),
                "--ioengine=nbd".into(),
                format!("--uri={uri}"),
            ],
            timeout: FIO_TIMEOUT,
        }
    }

    /// The standard verified random-write job of the tests: `--rw=randwrite --bs=<bs>
    /// --iodepth=32 --size=<size> --verify=crc32c --do_verify=1`; a `bs` with a dash
    /// (`4k-256k`) becomes `--bsrange`.
    pub fn randwrite_verify(uri: &str, bs: &str, size: &str) -> Self {
        let bs = if bs.contains('-') {
            format!("--bsrange={bs}")
        } else {
            format!("--bs={bs}")
        };
        Fio::nbd(uri)
            .arg("--rw=randwrite")
            .arg(bs)
            .arg("--iodepth=32")
            .arg(format!("--size={size}"))
            .arg("--verify=crc32c")
            .arg("--do_verify=1")
    }

    /// Adds one fio argument (`--key=value`).
    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
    }

    /// Overrides the time limit (default [`FIO_TIMEOUT`]).
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// Starts fio in the background; its JSON and stderr go to files in `dir`.
    pub fn spawn(self, dir: &Path) -> FioRun {
        let fio = require("fio");
        let n = unique();
        let json = dir.join(format!("fio-{n}.json"));
        let err = dir.join(format!("fio-{n}.stderr"));
        let mut cmd = Command::new(fio);
        // fio writes verify state files into its working directory: keep them in `dir`.
        // --thread: fio runs its jobs as threads of one process, so killing the child
        // (Drop, deadline) kills the jobs too. As forked processes they survived their
        // parent's SIGKILL and, spinning on a dead NBD socket, filled the disk with
        // error lines.
        cmd.current_dir(dir)
            .args(&self.args)
            .arg("--thread")
            .arg("--output-format=json")
            .arg("--verify_state_save=0")
            .arg(format!("--output={}", json.display()))
            .stdin(Stdio::null());
        let cmdline = format!("fio {}", self.args.join(" "));
        let stderr_file = std::fs::File::create(&err).expect("create fio stderr file");
        let stdout_file = stderr_file.try_clone().expect("clone fio stderr file");
        cmd.stdout(stdout_file).stderr(stderr_file);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmdline}: {e}"));
        FioRun {
            child: Some(child),
            json,
            err,
            cmdline,
            deadline: Instant::now() + scaled(self.timeout),
        }
    }

    /// Runs the job to completion (bounded by its time limit).
    pub fn run(self, dir: &Path) -> FioResult {
        self.spawn(dir).wait()
    }
}

/// A running fio job; killed if dropped before [`FioRun::wait`].
#[derive(Debug)]
pub struct FioRun {
    child: Option<Child>,
    json: PathBuf,
    err: PathBuf,
    cmdline: String,
    deadline: Instant,
}

impl FioRun {
    /// Whether fio is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Waits for fio to end; panics (after killing it) past its time limit.
    pub fn wait(mut self) -> FioResult {
        let mut child = self.child.take().expect("fio child present until wait");
        let status = wait_deadline(&mut child, self.deadline).expect("wait for fio");
        let stderr = std::fs::read_to_string(&self.err).unwrap_or_default();
        let Some(status) = status else {
            panic!(
                "{} did not finish in time; killed\n--- fio stderr ---\n{}",
                self.cmdline,
                crate::bin::tail_lines(&stderr, 40)
            );
        };
        let raw = std::fs::read_to_string(&self.json).unwrap_or_default();
        FioResult {
            status,
            json: parse_fio_json(&raw),
            stderr,
            cmdline: self.cmdline.clone(),
        }
    }
}

impl Drop for FioRun {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// fio may print notices ("fio: connected to NBD server") before its JSON: parse from the
/// first line that opens an object.
fn parse_fio_json(raw: &str) -> Option<Value> {
    let start = raw
        .match_indices('{')
        .map(|(i, _)| i)
        .find(|&i| i == 0 || raw.as_bytes().get(i.wrapping_sub(1)) == Some(&b'\n'))?;
    serde_json::from_str(raw.get(start..)?).ok()
}

/// The outcome of one fio run.
#[derive(Debug)]
pub struct FioResult {
    /// fio's exit status.
    pub status: ExitStatus,
    /// fio's JSON report, if it wrote a parseable one.
    pub json: Option<Value>,
    /// fio's stderr (and any stdout notices).
    pub stderr: String,
    /// The command line, for messages.
    pub cmdline: String,
}

impl FioResult {
    fn jobs(&self) -> &[Value] {
        self.json
            .as_ref()
            .and_then(|j| j.get("jobs"))
            .and_then(Value::as_array)
            .map_or(&[], Vec::as_slice)
    }

    /// The `error` field of every job (0 = no error).
    pub fn job_errors(&self) -> Vec<i64> {
        self.jobs()
            .iter()
            .map(|j| j.get("error").and_then(Value::as_i64).unwrap_or(-1))
            .collect()
    }

    fn sum(&self, dir: &str) -> u64 {
        self.jobs()
            .iter()
            .filter_map(|j| j.get(dir)?.get("io_bytes")?.as_u64())
            .sum()
    }

    /// Bytes written by all jobs.
    pub fn bytes_written(&self) -> u64 {
        self.sum("write")
    }

    /// Bytes read by all jobs (verification reads included).
    pub fn bytes_read(&self) -> u64 {
        self.sum("read")
    }

    /// Lines of fio's stderr that report a verification failure or an IO error.
    pub fn failure_lines(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .filter(|l| {
                let l = l.to_ascii_lowercase();
                l.contains("verify") && (l.contains("fail") || l.contains("bad"))
                    || l.contains("io_u error")
                    || l.contains("bad magic")
            })
            .collect()
    }

    /// Panics unless fio exited 0, wrote a JSON report, every job has `error` 0, it wrote
    /// something, and its stderr reports no verification failure.
    pub fn assert_ok(&self) -> &Self {
        let errors = self.job_errors();
        let problems = [
            (!self.status.success()).then(|| format!("exit status {}", self.status)),
            self.json.is_none().then(|| "no JSON report".to_string()),
            (errors.is_empty() || errors.iter().any(|&e| e != 0))
                .then(|| format!("job errors {errors:?}")),
            (self.bytes_written() == 0).then(|| "wrote nothing".to_string()),
            (!self.failure_lines().is_empty())
                .then(|| format!("failures: {:?}", self.failure_lines())),
        ];
        let problems: Vec<String> = problems.into_iter().flatten().collect();
        assert!(
            problems.is_empty(),
            "{} failed: {}\n--- fio stderr ---\n{}",
            self.cmdline,
            problems.join("; "),
            crate::bin::tail_lines(&self.stderr, 40)
        );
        self
    }
}

// ---------------------------------------------------------------------------------------
// nbdsh, qemu-img, tshark

/// Runs `nbdsh -u <uri> -c <script>`. Debian's nbdsh runs the first `python3` on `PATH`,
/// which must be Debian's (the one with the `nbd` module), so `/usr/bin` goes first.
pub fn nbdsh(uri: &str, script: &str) -> CmdOutput {
    let nbdsh = require("nbdsh");
    let path = std::env::var("PATH").unwrap_or_default();
    let mut cmd = Command::new(nbdsh);
    cmd.env("PATH", format!("/usr/bin:/bin:{path}"))
        .args(["-u", uri, "-c", script]);
    run_cmd(&mut cmd, TOOL_TIMEOUT, &format!("nbdsh -u {uri}")).unwrap_or_else(|e| panic!("{e}"))
}

/// Writes 4 KiB of fresh random data at `offset` through `uri` with nbdsh, flushes, reads it
/// back and checks it; panics with nbdsh's output otherwise. Proves the export serves IO.
pub fn nbd_roundtrip(uri: &str, offset: u64) {
    let script = format!(
        "import os\n\
         b = os.urandom(4096)\n\
         h.pwrite(b, {offset})\n\
         if h.can_flush(): h.flush()\n\
         assert h.pread(4096, {offset}) == b, 'read back differs'\n\
         print('roundtrip-ok', h.get_size())\n"
    );
    let out = nbdsh(uri, &script);
    out.assert_success(&format!("nbdsh read/write at {offset} via {uri}"));
    assert!(
        out.stdout.contains("roundtrip-ok"),
        "nbdsh printed no confirmation: {}",
        out.stdout
    );
}

/// Runs `qemu-img <args>`; panics if it cannot be run or times out (not on failure: look
/// at the returned status).
pub fn qemu_img(args: &[&str]) -> CmdOutput {
    let q = require("qemu-img");
    run_cmd(
        Command::new(q).args(args),
        TOOL_TIMEOUT,
        &format!("qemu-img {}", args.join(" ")),
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

/// Runs `tshark <args>`; panics if it cannot be run or times out.
pub fn tshark(args: &[&str]) -> CmdOutput {
    let t = require("tshark");
    run_cmd(
        Command::new(t).args(args),
        TOOL_TIMEOUT,
        &format!("tshark {}", args.join(" ")),
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

/// The DRBD command names (`P_DATA`, `P_WRITE_ACK`, ...) of every DRBD PDU in `pcap`, in
/// capture order, as Wireshark's DRBD dissector (heuristic on TCP) names them. A custom
/// column prints the value-string name; a frame with several PDUs yields several names.
pub fn drbd_commands(pcap: &Path) -> Vec<String> {
    let p = pcap.to_string_lossy();
    let out = tshark(&[
        "-r",
        &p,
        "--enable-heuristic",
        "drbd_tcp",
        "-Y",
        "drbd",
        "-o",
        "gui.column.format:\"cmd\",\"%Cus:drbd.command\"",
        "-T",
        "fields",
        "-e",
        "_ws.col.cmd",
    ]);
    out.assert_success("tshark: DRBD commands");
    out.stdout
        .lines()
        .flat_map(|l| l.split(','))
        .map(|c| c.trim().to_string())
        .filter(|c| !c.is_empty())
        .collect()
}

/// The packets of `pcap` that Wireshark finds malformed or flags with an expert error,
/// one summary line each (empty: the dissector accepted every packet).
pub fn tshark_problems(pcap: &Path) -> String {
    let p = pcap.to_string_lossy();
    let out = tshark(&[
        "-r",
        &p,
        "--enable-heuristic",
        "drbd_tcp",
        "-Y",
        "_ws.malformed || _ws.expert.severity >= error",
    ]);
    out.assert_success("tshark: malformed packets");
    out.stdout
}

/// Writes `len` bytes of seeded random data to `path` (the seed makes a failure
/// reproducible; it is part of any message about the file).
pub fn random_file(path: &Path, len: u64, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display())),
    );
    let mut chunk = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = usize::try_from(left.min(1 << 20)).expect("chunk fits usize");
        let buf = chunk.get_mut(..n).expect("n <= chunk len");
        rng.fill_bytes(buf);
        f.write_all(buf).expect("write random file");
        left -= n as u64;
    }
    f.flush().expect("flush random file");
}

// ---------------------------------------------------------------------------------------
// tcpdump

/// A running `tcpdump -w`, stopped with SIGINT (so it writes out its buffer).
#[derive(Debug)]
pub struct Capture {
    child: Option<Child>,
    stderr: Arc<Mutex<String>>,
    /// The pcap file.
    pub path: PathBuf,
}

impl Capture {
    /// Starts `tcpdump -i <iface> -U -s 0 -w <path> <filter>` and waits until it says
    /// "listening on" (so nothing sent after this returns is missed).
    pub fn start(iface: &str, path: &Path, filter: &str) -> Capture {
        let tcpdump = require("tcpdump");
        let mut child = Command::new(tcpdump)
            .args(["-i", iface, "-U", "-s", "0", "-w"])
            .arg(path)
            .arg(filter)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start tcpdump: {e}"));
        let stderr = Arc::new(Mutex::new(String::new()));
        if let Some(pipe) = child.stderr.take() {
            let sink = Arc::clone(&stderr);
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    if let Ok(mut s) = sink.lock() {
                        if s.len() < 1 << 20 {
                            let _ = writeln!(s, "{line}");
                        }
                    }
                }
            });
        }
        let mut cap = Capture {
            child: Some(child),
            stderr,
            path: path.to_path_buf(),
        };
        wait_until(
            Duration::from_secs(20),
            "tcpdump to say \"listening on\"",
            || {
                if let Some(c) = cap.child.as_mut() {
                    if let Ok(Some(st)) = c.try_wait() {
                        panic!(
                            "tcpdump exited with {st} (it needs root or CAP_NET_RAW):\n{}",
                            cap.stderr_text()
                        );
                    }
                }
                cap.stderr_text().contains("listening on")
            },
        );
        cap
    }

    /// What tcpdump printed on stderr so far.
    pub fn stderr_text(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Stops tcpdump with SIGINT and waits for it (bounded); returns its stderr.
    pub fn stop(mut self) -> String {
        let mut child = self.child.take().expect("tcpdump child present until stop");
        send_signal(child.id(), "INT").expect("SIGINT tcpdump");
        let st = wait_deadline(&mut child, Instant::now() + scaled(Duration::from_secs(20)))
            .expect("wait for tcpdump");
        assert!(
            st.is_some(),
            "tcpdump did not exit within 20 s of SIGINT:\n{}",
            self.stderr_text()
        );
        // Let the reader thread take the last lines ("N packets captured").
        std::thread::sleep(Duration::from_millis(100));
        self.stderr_text()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fio_json_after_notice() {
        let v = parse_fio_json("fio: connected to NBD server\n{\n \"jobs\": []\n}\n");
        assert!(v.is_some_and(|v| v.get("jobs").is_some()));
        assert!(parse_fio_json("no json here").is_none());
        assert!(parse_fio_json("{\"a\":1}").is_some());
    }

    #[test]
    fn run_cmd_captures_and_times_out() {
        let out = run_cmd(
            Command::new("/bin/sh").args(["-c", "echo out; echo err >&2; exit 3"]),
            Duration::from_secs(10),
            "sh",
        )
        .expect("sh runs");
        assert_eq!(out.stdout.trim(), "out");
        assert_eq!(out.stderr.trim(), "err");
        assert_eq!(out.status.code(), Some(3));

        let e = run_cmd(
            Command::new("/bin/sh").args(["-c", "echo started; exec sleep 30"]),
            Duration::from_millis(300),
            "sleeper",
        )
        .expect_err("must time out");
        let msg = e.to_string();
        assert!(msg.contains("sleeper did not finish"), "{msg}");
        assert!(msg.contains("started"), "{msg}");
    }

    #[test]
    #[should_panic(expected = "apt-get install")]
    fn missing_tool_names_a_package() {
        require("tandem-no-such-tool-xyz");
    }

    #[test]
    fn random_file_is_seeded() {
        let d = crate::TempDir::new("randfile");
        random_file(&d.join("a"), 3 << 20, 7);
        random_file(&d.join("b"), 3 << 20, 7);
        random_file(&d.join("c"), 3 << 20, 8);
        let a = std::fs::read(d.join("a")).expect("read a");
        assert_eq!(a.len(), 3 << 20);
        assert_eq!(a, std::fs::read(d.join("b")).expect("read b"));
        assert_ne!(a, std::fs::read(d.join("c")).expect("read c"));
    }

    #[test]
    fn signal_reaches_a_process() {
        let mut c = Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        send_signal(c.id(), "TERM").expect("kill -TERM");
        let st = wait_deadline(&mut c, Instant::now() + Duration::from_secs(10))
            .expect("wait")
            .expect("sleep exits on SIGTERM");
        assert!(!st.success());
    }
}

// ---------------------------------------------------------------------------------------
// nbdkit

/// An `nbdkit memory` server: a non-replicating NBD reference, used to check the
/// harness's own clients (and by benchmarks as the baseline). nbdkit listens on either a
/// Unix socket or TCP, not both.
#[derive(Debug)]
pub struct Nbdkit {
    child: Option<Child>,
    /// Its Unix socket, when started with [`Nbdkit::memory_unix`].
    pub socket: Option<PathBuf>,
    /// Its TCP address on 127.0.0.1, when started with [`Nbdkit::memory_tcp`].
    pub addr: Option<std::net::SocketAddr>,
}

impl Nbdkit {
    /// `nbdkit --foreground --exit-with-parent --unix <dir>/nbdkit-N.sock memory <size>`.
    pub fn memory_unix(dir: &Path, size: &str) -> Nbdkit {
        let socket = dir.join(format!("nbdkit-{}.sock", unique()));
        let mut args: Vec<std::ffi::OsString> = vec!["--unix".into(), socket.clone().into()];
        args.extend(["memory".into(), size.into()]);
        Nbdkit::start(&args, Some(socket), None)
    }

    /// `nbdkit --foreground --exit-with-parent -i 127.0.0.1 -p <free port> memory <size>`.
    pub fn memory_tcp(size: &str) -> Nbdkit {
        let port = crate::cluster::free_ports(1)
            .first()
            .copied()
            .expect("one port");
        let args: Vec<std::ffi::OsString> = vec![
            "-i".into(),
            "127.0.0.1".into(),
            "-p".into(),
            port.to_string().into(),
            "memory".into(),
            size.into(),
        ];
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        Nbdkit::start(&args, None, Some(addr))
    }

    fn start(
        args: &[std::ffi::OsString],
        socket: Option<PathBuf>,
        addr: Option<std::net::SocketAddr>,
    ) -> Nbdkit {
        let nbdkit = require("nbdkit");
        let child = Command::new(nbdkit)
            .args(["--foreground", "--exit-with-parent"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start nbdkit: {e}"));
        let mut k = Nbdkit {
            child: Some(child),
            socket,
            addr,
        };
        wait_until(Duration::from_secs(20), "nbdkit to listen", || {
            if let Some(c) = k.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    let mut err = String::new();
                    if let Some(e) = c.stderr.as_mut() {
                        let _ = e.read_to_string(&mut err);
                    }
                    panic!("nbdkit exited with {st}: {err}");
                }
            }
            // A probe connection that sends nothing is harmless to nbdkit.
            match (&k.socket, k.addr) {
                (Some(p), _) => std::os::unix::net::UnixStream::connect(p).is_ok(),
                (None, Some(a)) => std::net::TcpStream::connect(a).is_ok(),
                (None, None) => true,
            }
        });
        k
    }

    /// Its URI: `nbd+unix:///?socket=...` or `nbd://127.0.0.1:PORT/`.
    pub fn uri(&self) -> String {
        match (&self.socket, self.addr) {
            (Some(p), _) => format!("nbd+unix:///?socket={}", p.display()),
            (None, Some(a)) => format!("nbd://{a}/"),
            (None, None) => String::new(),
        }
    }
}

impl Drop for Nbdkit {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
