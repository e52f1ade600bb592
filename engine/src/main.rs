//! The `tandem` command: run a node, query it, or run the two-node demo.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use tandem_engine::meta;
use tandem_engine::mgmt::Request;

#[derive(Parser, Debug)]
#[command(
    name = "tandem",
    version,
    about = "Userspace block replication with a DRBD-compatible data path"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run one node of a resource in the foreground.
    Up {
        /// The resource's TOML config.
        #[arg(long)]
        config: PathBuf,
        /// Which node of the config this is (default: the one whose address is local).
        #[arg(long)]
        node: Option<String>,
    },
    /// Show a node's state (role, disk, connection, replication counters).
    Status {
        /// The node's management socket.
        #[arg(long, conflicts_with = "config")]
        socket: Option<PathBuf>,
        /// Or: the config and node name, to find the socket.
        #[arg(long, requires = "node")]
        config: Option<PathBuf>,
        /// Node name within --config.
        #[arg(long)]
        node: Option<String>,
        /// Print the raw JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Make a node Primary.
    #[command(name = "primary")]
    Primary {
        #[command(flatten)]
        s: SocketArg,
        /// Promote a disk that is not UpToDate: its data becomes the good copy, and the
        /// peer gets a full resync from it (DRBD's `primary --force`).
        #[arg(long)]
        force: bool,
    },
    /// Make a node Secondary. Refused while an NBD client has the export open for writing
    /// (DRBD's "held open"); the refusal names the clients.
    #[command(name = "secondary")]
    Secondary {
        #[command(flatten)]
        s: SocketArg,
        /// Demote anyway: the open clients' next writes fail with EPERM.
        #[arg(long)]
        force: bool,
    },
    /// Drop the replication connection and stay StandAlone.
    Disconnect(SocketArg),
    /// Connect again after `disconnect` (or after a split brain).
    Connect {
        #[command(flatten)]
        s: SocketArg,
        /// This node loses a split brain: its changes are overwritten by the peer's.
        #[arg(long)]
        discard_my_data: bool,
    },
    /// Hold the running resync.
    #[command(name = "pause-sync")]
    PauseSync(SocketArg),
    /// Let a paused resync go on.
    #[command(name = "resume-sync")]
    ResumeSync(SocketArg),
    /// Declare this node's data invalid: a full resync from the peer (Secondary only).
    Invalidate(SocketArg),
    /// Print the node's state events (connections, roles, resync, verify, split brain),
    /// one JSON object per line.
    Events {
        #[command(flatten)]
        s: SocketArg,
        /// Keep printing new events until interrupted.
        #[arg(long)]
        follow: bool,
    },
    /// Online verify: compare every block with the peer's by digest (`verify-alg`), wait,
    /// and print the blocks that differ (they are marked out of sync; a disconnect and
    /// connect with a Primary resyncs them).
    Verify {
        #[command(flatten)]
        s: SocketArg,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Start a new data generation; with --clear-bitmap on a connected pair whose
    /// metadata was just created, skip the initial full sync (both sides become UpToDate).
    #[command(name = "new-current-uuid")]
    NewCurrentUuid {
        #[command(flatten)]
        s: SocketArg,
        /// Skip the initial sync (both disks must hold the same data, e.g. zeroes).
        #[arg(long)]
        clear_bitmap: bool,
    },
    /// Two nodes on loopback with file backends, exported over NBD: the main job.
    Demo {
        /// Where the backing files, sockets and logs go.
        #[arg(long, default_value = "/var/tmp/tandem-demo")]
        dir: PathBuf,
        /// Volume size.
        #[arg(long, default_value = "1GiB")]
        size: String,
        /// Replication protocol (A, B or C).
        #[arg(long, default_value = "C")]
        protocol: String,
    },
    /// Write fresh DRBD 9 (v09) metadata, as `drbdmeta … v09 … create-md 1` does.
    #[command(name = "create-md")]
    CreateMd {
        #[command(flatten)]
        target: MetaTarget,
        /// This node's id (0..=31); default: left to the first attach (-1).
        #[arg(long, allow_negative_numbers = true)]
        node_id: Option<i32>,
        /// `al-extents` recorded in the superblock (67..=65534).
        #[arg(long, default_value_t = 1237)]
        al_extents: u32,
        /// Activity-log stripes.
        #[arg(long, default_value_t = 1)]
        al_stripes: u32,
        /// Activity-log stripe size (e.g. 32k, 1M; a bare number is KiB).
        #[arg(long, default_value = "32k")]
        al_stripe_size: String,
        /// Overwrite DRBD metadata that is already there (its UUIDs and bitmap are lost).
        #[arg(long)]
        force: bool,
    },
    /// Print the metadata's superblock fields and the bitmap's set-bit count.
    #[command(name = "dump-md")]
    DumpMd {
        #[command(flatten)]
        target: MetaTarget,
        /// Dump unclean metadata too (its bitmap does not include the activity log yet),
        /// and read a device that a running node holds (it may be changing meanwhile).
        #[arg(long)]
        force: bool,
        /// One JSON object instead of drbdmeta-style text.
        #[arg(long)]
        json: bool,
    },
    /// Apply the activity log of a crashed node to its bitmap and mark the metadata clean.
    #[command(name = "apply-al")]
    ApplyAl {
        #[command(flatten)]
        target: MetaTarget,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// The device of a metadata command.
#[derive(clap::Args, Debug)]
struct MetaTarget {
    /// The data device (or file); it holds the metadata unless --meta-device is given.
    device: PathBuf,
    /// A separate metadata device or file (DRBD's flex-external metadata).
    #[arg(long)]
    meta_device: Option<PathBuf>,
}

impl MetaTarget {
    fn target(self) -> meta::tool::Target {
        meta::tool::Target {
            device: self.device,
            meta_device: self.meta_device,
        }
    }
}

/// Runs a metadata command and prints what it returns.
fn meta_cmd(f: impl FnOnce() -> Result<String, meta::MetaError>) -> anyhow::Result<()> {
    let out = f()?;
    tandem_engine::daemon::out_line(format_args!("{}", out.trim_end_matches('\n')))
}

#[derive(clap::Args, Debug)]
struct SocketArg {
    /// The node's management socket.
    #[arg(long)]
    socket: PathBuf,
}

fn send(s: &SocketArg, req: Request) -> anyhow::Result<()> {
    tandem_engine::daemon::cli_command(&s.socket, &req)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Up { config, node } => tandem_engine::daemon::run_node(&config, node.as_deref()),
        Cmd::Status {
            socket,
            config,
            node,
            json,
        } => tandem_engine::daemon::cli_status(socket, config, node.as_deref(), json),
        Cmd::Primary { s, force } => send(&s, Request::Primary { force }),
        Cmd::Secondary { s, force } => send(&s, Request::Secondary { force }),
        Cmd::Disconnect(s) => send(&s, Request::Disconnect),
        Cmd::Connect { s, discard_my_data } => send(&s, Request::Connect { discard_my_data }),
        Cmd::PauseSync(s) => send(&s, Request::PauseSync),
        Cmd::ResumeSync(s) => send(&s, Request::ResumeSync),
        Cmd::Invalidate(s) => send(&s, Request::Invalidate),
        Cmd::Events { s, follow } => tandem_engine::daemon::cli_events(&s.socket, follow),
        Cmd::Verify { s, json } => tandem_engine::daemon::cli_verify(&s.socket, json).map(|_| ()),
        Cmd::NewCurrentUuid { s, clear_bitmap } => {
            send(&s, Request::NewCurrentUuid { clear_bitmap })
        }
        Cmd::Demo {
            dir,
            size,
            protocol,
        } => tandem_engine::daemon::run_demo(&dir, &size, &protocol),
        Cmd::CreateMd {
            target,
            node_id,
            al_extents,
            al_stripes,
            al_stripe_size,
            force,
        } => meta_cmd(|| {
            let args = meta::tool::CreateArgs {
                node_id,
                al_extents: Some(al_extents),
                al_stripes: Some(al_stripes),
                al_stripe_size: Some(al_stripe_size),
                force,
            };
            meta::tool::create_md(&target.target(), &args)
        }),
        Cmd::DumpMd {
            target,
            force,
            json,
        } => meta_cmd(|| meta::tool::dump_md(&target.target(), force, json)),
        Cmd::ApplyAl { target, json } => meta_cmd(|| meta::tool::apply_al(&target.target(), json)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // A reader that closed our stdout (`tandem status | head -1`) has what it wanted.
        Err(e) if e.is::<tandem_engine::daemon::StdoutClosed>() => ExitCode::SUCCESS,
        Err(e) => {
            // Not eprintln!: it panics when stderr is a closed pipe.
            use std::io::Write as _;
            let _ = writeln!(std::io::stderr(), "tandem: {e:#}");
            ExitCode::FAILURE
        }
    }
}
