//! Processes the harness spawns, and the ports they listen on.
//!
//! A [`Proc`] owns one child process and kills it with SIGKILL (by the PID it spawned) when
//! dropped. Nothing here ever signals a process the harness did not start.

use std::collections::HashSet;
use std::fs::OpenOptions;
use std::io::{ErrorKind, Read, Seek, SeekFrom};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, OnceLock};

use anyhow::{bail, Context, Result};

/// How many times [`free_port`] asks the kernel before giving up.
const PORT_ATTEMPTS: usize = 100;

/// Returns a 127.0.0.1 port that was free a moment ago: binds port 0, reads the port the kernel
/// chose and releases it. A port is handed out at most once per process.
pub fn free_port() -> Result<u16> {
    static HANDED_OUT: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let handed_out = HANDED_OUT.get_or_init(|| Mutex::new(HashSet::new()));
    for _ in 0..PORT_ATTEMPTS {
        let listener = TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0")?;
        let port = listener
            .local_addr()
            .context("read the bound address")?
            .port();
        drop(listener);
        let mut ports = handed_out
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if ports.insert(port) {
            return Ok(port);
        }
    }
    bail!("found no free port on 127.0.0.1 in {PORT_ATTEMPTS} attempts")
}

/// A free address on 127.0.0.1 (see [`free_port`]).
pub fn free_addr() -> Result<SocketAddr> {
    Ok(SocketAddr::from(([127, 0, 0, 1], free_port()?)))
}

/// A child process with its output appended to a log file. Dropping it kills the process.
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
    status: Option<ExitStatus>,
}

impl Proc {
    /// Spawns `program args…` with stdin closed and stdout and stderr appended to `log`.
    pub fn spawn(name: &str, program: &Path, args: &[String], log: &Path) -> Result<Self> {
        let stdout = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("open log file {}", log.display()))?;
        let stderr = stdout
            .try_clone()
            .context("duplicate the log file handle")?;
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("spawn {name}: {} {}", program.display(), args.join(" ")))?;
        Ok(Self {
            name: name.to_owned(),
            child,
            log: log.to_owned(),
            status: None,
        })
    }

    /// The name given at spawn.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The PID of the spawned process.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if the process has exited (and reaps it); `None` while it runs.
    pub fn exited(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .with_context(|| format!("poll process {} ({})", self.name, self.pid()))?;
        }
        Ok(self.status)
    }

    /// Sends SIGKILL to the spawned PID (unless it was already reaped) and reaps it.
    pub fn kill(&mut self) -> Result<()> {
        if self.status.is_some() {
            return Ok(());
        }
        match self.child.kill() {
            Ok(()) => {}
            // The process has already exited and been reaped.
            Err(err) if err.kind() == ErrorKind::InvalidInput => {}
            Err(err) => {
                return Err(err)
                    .with_context(|| format!("kill process {} ({})", self.name, self.pid()))
            }
        }
        let status = self
            .child
            .wait()
            .with_context(|| format!("reap process {} ({})", self.name, self.pid()))?;
        self.status = Some(status);
        Ok(())
    }

    /// The last `max_bytes` of the process's log, for error messages.
    pub fn log_tail(&self, max_bytes: u64) -> String {
        log_tail(&self.log, max_bytes)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Err(err) = self.kill() {
            eprintln!("warning: {err:#}");
        }
    }
}

/// The last `max_bytes` of a log file, or a note saying why it could not be read.
pub fn log_tail(path: &Path, max_bytes: u64) -> String {
    let read = || -> std::io::Result<String> {
        let mut file = std::fs::File::open(path)?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(max_bytes)))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    match read() {
        Ok(text) => text,
        Err(err) => format!("(could not read {}: {err})", path.display()),
    }
}

/// Resolves on Ctrl-C or SIGTERM, so that a benchmark can drop its guards (killing what it
/// started and removing what it created) before exiting.
pub async fn shutdown_signal() -> Result<()> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("install the SIGTERM handler")?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result.context("wait for Ctrl-C"),
        _ = terminate.recv() => Ok(()),
    }
}

/// The `main` of a benchmark: prints its command line, runs `run` on a multi-threaded runtime
/// until it ends or a signal comes, and reports the outcome in one line. On a signal, `run`'s
/// future is dropped, and with it the guards that remove what it started; `interrupted` is
/// the error then.
pub fn run_benchmark(
    run: impl std::future::Future<Output = Result<()>>,
    interrupted: &str,
) -> std::process::ExitCode {
    println!(
        "command: {}",
        std::env::args().collect::<Vec<_>>().join(" ")
    );
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: start the async runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        tokio::select! {
            result = run => result,
            signal = shutdown_signal() => match signal {
                Ok(()) => Err(anyhow::anyhow!("{interrupted}")),
                Err(error) => Err(error),
            },
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The flotilla binary a benchmark drives: `given`, else `flotilla` next to this executable
/// (both built into the same target directory).
pub fn flotilla_binary(given: Option<&Path>) -> Result<PathBuf> {
    match given {
        Some(path) => Ok(path.to_path_buf()),
        None => Ok(std::env::current_exe()
            .context("find this executable")?
            .parent()
            .context("find the directory of this executable")?
            .join("flotilla")),
    }
}

/// Clock ticks per second of `/proc/PID/stat` (USER_HZ, 100 on Linux).
pub const TICKS_PER_SECOND: f64 = 100.0;

/// CPU time (user + system) a process used so far, in clock ticks, from `/proc/PID/stat`.
pub fn cpu_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// The CPU ticks used so far by every process whose name is one of `names`, by PID.
pub fn cpu_ticks_of_named(names: &[&str]) -> std::collections::HashMap<String, u64> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Default::default();
    };
    entries
        .filter_map(|entry| {
            let pid = entry.ok()?.file_name().into_string().ok()?;
            pid.bytes().all(|b| b.is_ascii_digit()).then_some(pid)
        })
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| names.contains(&comm.trim()))
        })
        .filter_map(|pid| Some((pid.clone(), cpu_ticks(&pid)?)))
        .collect()
}

/// The CPU seconds the processes named `names` used between two snapshots of
/// [`cpu_ticks_of_named`]; a process that started in between counts from zero.
pub fn cpu_seconds_between(
    before: &std::collections::HashMap<String, u64>,
    after: &std::collections::HashMap<String, u64>,
) -> f64 {
    let ticks: u64 = after
        .iter()
        .map(|(pid, now)| now.saturating_sub(before.get(pid).copied().unwrap_or(0)))
        .sum();
    ticks as f64 / TICKS_PER_SECOND
}
