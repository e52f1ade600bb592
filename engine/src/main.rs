//! The `tandem` command: run a node, query it, or run the two-node demo.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

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
    /// Make a node Primary, Secondary, or connect/disconnect it.
    #[command(name = "primary")]
    Primary(SocketArg),
    /// Make a node Secondary.
    #[command(name = "secondary")]
    Secondary(SocketArg),
    /// Drop the replication connection and stay StandAlone.
    Disconnect(SocketArg),
    /// Connect again after `disconnect`.
    Connect(SocketArg),
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
}

#[derive(clap::Args, Debug)]
struct SocketArg {
    /// The node's management socket.
    #[arg(long)]
    socket: PathBuf,
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
        Cmd::Primary(s) => tandem_engine::daemon::cli_command(&s.socket, "primary"),
        Cmd::Secondary(s) => tandem_engine::daemon::cli_command(&s.socket, "secondary"),
        Cmd::Disconnect(s) => tandem_engine::daemon::cli_command(&s.socket, "disconnect"),
        Cmd::Connect(s) => tandem_engine::daemon::cli_command(&s.socket, "connect"),
        Cmd::Demo {
            dir,
            size,
            protocol,
        } => tandem_engine::daemon::run_demo(&dir, &size, &protocol),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tandem: {e:#}");
            ExitCode::FAILURE
        }
    }
}
