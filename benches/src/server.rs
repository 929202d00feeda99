//! Starting, probing and stopping the registry servers under test.
//!
//! Every server runs as a child process whose stdout and stderr go to a log
//! file in its own directory. [`Server`] kills its child when dropped, and the
//! child is additionally asked by the kernel to die with the benchmark process
//! (`PR_SET_PDEATHSIG`), so no server outlives a run, including on error or
//! interruption. A restarted cluster node appends to its earlier log.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use reqwest::{StatusCode, Url};

use crate::cli::Target;

/// A running registry server, stopped on drop.
pub struct Server {
    pub target: Target,
    /// Name in log lines and error messages (`raftyard`, `raftyard node 2`, …).
    pub name: String,
    pub base: Url,
    pub log_path: PathBuf,
    child: Child,
}

impl Server {
    /// Starts `<bin> serve --listen 127.0.0.1:PORT --data-dir DIR/data`.
    pub fn start_raftyard(bin: &Path, dir: &Path) -> Result<Server> {
        let data_dir = dir.join("data");
        fs::create_dir_all(&data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
        let port = free_port()?;
        let mut cmd = Command::new(bin);
        cmd.arg("serve").arg("--listen").arg(format!("127.0.0.1:{port}")).arg("--data-dir").arg(&data_dir);
        spawn(Target::Raftyard, Target::Raftyard.name().to_string(), cmd, bin, dir, port)
    }

    /// Starts `<bin> serve --config CONFIG` for a cluster node whose registry API listens on
    /// `registry_port`; its log goes to `DIR/server.log`.
    ///
    /// `PR_SET_PDEATHSIG` fires when the *thread* that spawned the child exits, so nodes must
    /// be started from the benchmark's main task, never from a spawned or blocking task.
    pub fn start_raftyard_node(
        bin: &Path,
        name: String,
        config: &Path,
        dir: &Path,
        registry_port: u16,
    ) -> Result<Server> {
        let mut cmd = Command::new(bin);
        cmd.arg("serve").arg("--config").arg(config);
        spawn(Target::Raftyard, name, cmd, bin, dir, registry_port)
    }

    /// Writes a filesystem-backed configuration and starts
    /// `<bin> serve DIR/config.yml`.
    pub fn start_docker_registry(bin: &Path, dir: &Path) -> Result<Server> {
        Self::start_docker_registry_with(bin, dir, "")
    }

    /// The same, with `auth: htpasswd` over the file at `htpasswd`.
    pub fn start_docker_registry_htpasswd(bin: &Path, dir: &Path, htpasswd: &Path) -> Result<Server> {
        let path = serde_json::to_string(&htpasswd.to_string_lossy()).expect("string serializes");
        Self::start_docker_registry_with(bin, dir, &format!("auth:\n  htpasswd:\n    realm: bench\n    path: {path}\n"))
    }

    fn start_docker_registry_with(bin: &Path, dir: &Path, extra: &str) -> Result<Server> {
        let data_dir = dir.join("data");
        fs::create_dir_all(&data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
        let port = free_port()?;
        let config_path = dir.join("config.yml");
        fs::write(&config_path, docker_registry_config(&data_dir, port) + extra)
            .with_context(|| format!("writing {}", config_path.display()))?;
        let mut cmd = Command::new(bin);
        cmd.arg("serve").arg(&config_path);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("REGISTRY_") {
                cmd.env_remove(key);
            }
        }
        spawn(Target::DockerRegistry, Target::DockerRegistry.name().to_string(), cmd, bin, dir, port)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Polls `GET /v2/` until it answers 200, the process exits, or `timeout`
    /// passes. The last two cases are errors that include the log tail.
    pub async fn wait_ready(&mut self, http: &reqwest::Client, timeout: Duration) -> Result<()> {
        let url = self.base.join("/v2/")?;
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited during startup ({status}); last lines of {}:\n{}",
                    self.name,
                    self.log_path.display(),
                    self.log_tail(20)
                );
            }
            let last = match http.get(url.clone()).timeout(Duration::from_secs(2)).send().await {
                Ok(resp) if resp.status() == StatusCode::OK => return Ok(()),
                Ok(resp) => format!("GET /v2/ answered {}", resp.status()),
                Err(err) => format!("GET /v2/ failed: {:#}", anyhow::Error::from(err)),
            };
            if started.elapsed() > timeout {
                bail!(
                    "{} did not become ready at {} within {:?} ({last}); last lines of {}:\n{}",
                    self.name,
                    self.base,
                    timeout,
                    self.log_path.display(),
                    self.log_tail(20)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The last `lines` lines of the server's log (stdout and stderr).
    pub fn log_tail(&self, lines: usize) -> String {
        match read_tail(&self.log_path, 64 * 1024) {
            Ok(text) if text.trim().is_empty() => "  (log is empty)".to_string(),
            Ok(text) => {
                let all: Vec<&str> = text.lines().collect();
                all[all.len().saturating_sub(lines)..].iter().map(|l| format!("  {l}")).collect::<Vec<_>>().join("\n")
            }
            Err(err) => format!("  (cannot read log: {err})"),
        }
    }

    /// Fails if the server has exited since it became ready.
    pub fn ensure_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited unexpectedly ({status}); last lines of {}:\n{}",
                self.name,
                self.log_path.display(),
                self.log_tail(20)
            );
        }
        Ok(())
    }

    /// Kills the server with SIGKILL at once (no graceful shutdown) and reaps it.
    pub fn kill(&mut self) -> Result<()> {
        if self.child.try_wait()?.is_some() {
            bail!("{} had already exited before it was to be killed", self.name);
        }
        self.child.kill().with_context(|| format!("killing {}", self.name))?;
        self.child.wait().with_context(|| format!("reaping {}", self.name))?;
        Ok(())
    }

    /// Sends SIGTERM and returns at once ([`Server::wait_exit`] reaps the process).
    pub fn terminate(&mut self) -> Result<()> {
        if self.child.try_wait()?.is_some() {
            bail!("{} had already exited before it was to be stopped", self.name);
        }
        let pid = libc::pid_t::try_from(self.child.id())?;
        // SAFETY: plain kill(2) on our own child's pid, which has not been reaped.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        Ok(())
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!("{} did not exit within {timeout:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, a short grace period, then SIGKILL.
    fn stop(&mut self) {
        if !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: plain kill(2) on our own child's pid, which has not been reaped.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

fn spawn(target: Target, name: String, mut cmd: Command, bin: &Path, dir: &Path, port: u16) -> Result<Server> {
    let log_path = dir.join("server.log");
    let child = spawn_logged(&mut cmd, &log_path).with_context(|| {
        let hint = match target {
            Target::Raftyard => "build it with `cargo build --release -p raftyard`",
            Target::DockerRegistry => "install it with `apt-get install -y docker-registry`",
        };
        format!("cannot start {name} from {}; {hint}, or pass its path with --{}", bin.display(), target.name())
    })?;
    let base = Url::parse(&format!("http://127.0.0.1:{port}/"))?;
    Ok(Server { target, name, base, log_path, child })
}

/// Spawns `cmd` with stdout and stderr appended to `log_path`, asking the kernel to kill it
/// when the spawning thread exits (`PR_SET_PDEATHSIG`), so no child outlives the benchmark.
pub fn spawn_logged(cmd: &mut Command, log_path: &Path) -> Result<Child> {
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
    // SAFETY: the closure only calls prctl(2), which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(cmd.spawn()?)
}

/// Picks a currently free loopback port.
fn free_port() -> Result<u16> {
    Ok(free_ports(1)?[0])
}

/// Picks `count` distinct, currently free loopback ports (all probe sockets are held until
/// every port is picked, so none is handed out twice).
pub fn free_ports(count: usize) -> Result<Vec<u16>> {
    let listeners = (0..count)
        .map(|_| TcpListener::bind("127.0.0.1:0").context("binding a probe socket"))
        .collect::<Result<Vec<_>>>()?;
    listeners.iter().map(|l| Ok(l.local_addr()?.port())).collect()
}

fn docker_registry_config(data_dir: &Path, port: u16) -> String {
    let root = serde_json::to_string(&data_dir.to_string_lossy()).expect("string serializes");
    format!(
        "version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {root}
  delete:
    enabled: true
  cache:
    blobdescriptor: inmemory
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:{port}
  secret: raftyard-bench-not-secret
health:
  storagedriver:
    enabled: false
"
    )
}

fn read_tail(path: &Path, max_bytes: u64) -> io::Result<String> {
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(max_bytes)))?;
    let mut buf = Vec::new();
    file.read_to_end(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// Bytes of the files under `dir`, recursively; what cannot be read counts as nothing.
pub fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Resident set size of a process in KiB, from `VmRSS` in `/proc/<pid>/status`.
pub fn rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmRSS:")
}

/// The most a process has been resident over its life, in KiB (`VmHWM`).
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmHWM:")
}

fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
}

/// First line of `<bin> --version`, for the report.
pub fn docker_registry_version(bin: &Path) -> Option<String> {
    let out = Command::new(bin).arg("--version").stdin(Stdio::null()).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().next().map(|l| l.trim().to_string()).filter(|l| !l.is_empty())
}

/// Where a benchmark runs and where its results go: the options the benchmark binaries share
/// (`#[command(flatten)]`).
#[derive(clap::Args, Debug, Clone)]
pub struct RunOptions {
    /// Where the run directory goes.
    #[arg(long, default_value = "target/bench-tmp")]
    pub work_dir: PathBuf,
    /// Keep the run directory.
    #[arg(long)]
    pub keep: bool,
    /// Also write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

impl RunOptions {
    /// A new run directory under `work_dir`.
    pub fn run_dir(&self) -> Result<RunDir> {
        RunDir::create(&self.work_dir, self.keep)
    }
}

/// A per-run directory under the work dir, removed on drop unless kept.
pub struct RunDir {
    pub path: PathBuf,
    keep: bool,
}

impl RunDir {
    pub fn create(work_dir: &Path, keep: bool) -> Result<Self> {
        fs::create_dir_all(work_dir).with_context(|| format!("creating {}", work_dir.display()))?;
        let work_dir = work_dir.canonicalize().with_context(|| format!("resolving {}", work_dir.display()))?;
        let stamp = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        let path = work_dir.join(format!("run-{stamp}-{}", std::process::id()));
        fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(RunDir { path, keep })
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("kept run directory {}", self.path.display());
        } else if let Err(err) = fs::remove_dir_all(&self.path) {
            eprintln!("warning: cannot remove {}: {err}", self.path.display());
        }
    }
}
