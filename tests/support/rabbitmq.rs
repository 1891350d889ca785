//! A private RabbitMQ node for tests, one per test binary.
//!
//! The node gets its own name (`hg<random>@localhost`), AMQP and
//! distribution ports, Erlang cookie (in a private `HOME`), mnesia, log,
//! config, env and (empty) plugins files, all in a temp dir, so the machine's
//! shared broker on 5672 is never touched. Booting takes 5-10 s, so [`node`]
//! starts it once and every test of the binary shares it; tests that disturb
//! it (freeze, stop, alarm) take [`exclusive`], the others [`shared`].
//!
//! Shutdown: a `static` is never dropped, so a watchdog shell process (in
//! its own process group, so Ctrl-C does not kill it first) waits for the test
//! binary to exit, then thaws the node, stops it with `rabbitmqctl stop`
//! (SIGKILL if that fails) and removes the temp dir (kept, for reading the
//! broker's log, when `HG_KEEP_RABBITMQ_DIR` is set).

use std::io::Read;
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tokio::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::pki::Pki;
use super::{eventually_blocking, free_port, signal};

/// The user the tests' checks log in as.
pub const USER: &str = "hg";
/// Its password.
pub const PASSWORD: &str = "hg-Secret-123";

/// How long the node may take to boot (slow CI machines).
const BOOT: Duration = Duration::from_secs(90);

/// Bound on one `rabbitmqctl` call.
const CTL_TIMEOUT: Duration = Duration::from_secs(60);

static NODE: OnceLock<RabbitNode> = OnceLock::new();
static LOCK: RwLock<()> = RwLock::const_new(());

/// The private node of this test binary (started on first use).
pub fn node() -> &'static RabbitNode {
    NODE.get_or_init(RabbitNode::start)
}

/// For tests that only use the node: they may run together.
pub async fn shared() -> RwLockReadGuard<'static, ()> {
    LOCK.read().await
}

/// For tests that freeze, stop or alarm the node: they run alone.
pub async fn exclusive() -> RwLockWriteGuard<'static, ()> {
    LOCK.write().await
}

/// A private `rabbitmq-server`.
pub struct RabbitNode {
    /// Erlang node name (`hgNNNN@localhost`).
    pub name: String,
    /// AMQP port on 127.0.0.1.
    pub port: u16,
    /// AMQPS (TLS) port on 127.0.0.1, with a certificate from [`RabbitNode::pki`].
    pub tls_port: u16,
    dir: PathBuf,
    ctl: PathBuf,
}

/// Finds a RabbitMQ script. Debian's /usr/sbin entries are wrappers that
/// `su` to the `rabbitmq` user and use its home and cookie; the real scripts
/// in /usr/lib/rabbitmq/bin run as us with our private HOME.
fn binary(name: &str) -> PathBuf {
    let real = Path::new("/usr/lib/rabbitmq/bin").join(name);
    if real.is_file() {
        return real;
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for d in std::env::split_paths(&path).chain(["/usr/sbin".into(), "/usr/local/sbin".into()]) {
        let p = d.join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "{name} not found in /usr/lib/rabbitmq/bin, PATH or /usr/sbin: install rabbitmq-server (apt-get install rabbitmq-server)"
    )
}

fn random_suffix() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    format!("{}{:08x}", std::process::id(), nanos)
}

/// Runs a command with a time limit; `Err(output)` on failure.
fn run(cmd: &mut Command, limit: Duration) -> Result<String, String> {
    let mut child =
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().map_err(|e| e.to_string())?;
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().map_err(|e| e.to_string())? {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("{cmd:?} did not finish within {limit:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut out = String::new();
    let mut err = String::new();
    child.stdout.take().unwrap().read_to_string(&mut out).ok();
    child.stderr.take().unwrap().read_to_string(&mut err).ok();
    if status.success() { Ok(out) } else { Err(format!("{cmd:?} failed ({status}): {out}{err}")) }
}

impl RabbitNode {
    fn start() -> RabbitNode {
        let dir = tempfile::Builder::new().prefix("hg-rabbitmq-").tempdir().expect("temp dir").keep();
        let name = format!("hg{}@localhost", random_suffix());
        let port = free_port();
        let dist_port = free_port();
        let home = dir.join("home");
        std::fs::create_dir_all(&home).unwrap();
        // Our own cookie, so the node and our rabbitmqctl agree without touching the shared broker's.
        let cookie = home.join(".erlang.cookie");
        let letters: String = random_suffix().bytes().map(|b| (b'A' + b % 26) as char).collect();
        std::fs::write(&cookie, format!("HGCOOKIE{letters}")).unwrap();
        std::fs::set_permissions(&cookie, std::fs::Permissions::from_mode(0o400)).unwrap();
        let tls_port = free_port();
        std::fs::create_dir_all(dir.join("pki")).unwrap();
        let pki = Pki::generate_in(&dir.join("pki"));
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!(
                "loopback_users = none\ndisk_free_limit.absolute = 1MB\nlog.file.level = info\nlog.console = false\n\
                 listeners.ssl.default = 127.0.0.1:{tls_port}\nssl_options.cacertfile = {}\n\
                 ssl_options.certfile = {}\nssl_options.keyfile = {}\nssl_options.verify = verify_none\n\
                 ssl_options.fail_if_no_peer_cert = false\n",
                pki.path("ca.pem"),
                pki.path("server.pem"),
                pki.path("server.key")
            ),
        )
        .unwrap();
        std::fs::write(dir.join("enabled_plugins"), "[].\n").unwrap();
        std::fs::write(dir.join("rabbitmq-env.conf"), "").unwrap();

        let node = RabbitNode { name: name.clone(), port, tls_port, dir: dir.clone(), ctl: binary("rabbitmqctl") };
        let server = binary("rabbitmq-server");
        let stdout = std::fs::File::create(dir.join("server.out")).unwrap();
        let mut cmd = Command::new(&server);
        node.env(&mut cmd)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", port.to_string())
            .env("RABBITMQ_DIST_PORT", dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq.conf"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", dir.join("advanced.config"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_PID_FILE", dir.join("beam.pid"))
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(stdout.try_clone().unwrap())
            .stderr(stdout)
            .process_group(0);
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {}: {e}", server.display()));
        node.start_watchdog(child.id());

        eventually_blocking("the private RabbitMQ node to accept AMQP connections", BOOT, || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("rabbitmq-server exited ({status}) during boot:\n{}", node.tail());
            }
            TcpStream::connect(("127.0.0.1", port)).ok()
        });
        node.await_startup();
        node.rabbitmqctl(&["add_user", USER, PASSWORD]);
        node.rabbitmqctl(&["set_permissions", "-p", "/", USER, ".*", ".*", ".*"]);
        node
    }

    /// The environment every command against this node needs.
    fn env<'c>(&self, cmd: &'c mut Command) -> &'c mut Command {
        cmd.env("HOME", self.dir.join("home"))
            .env("RABBITMQ_NODENAME", &self.name)
            .env("RABBITMQ_CONF_ENV_FILE", self.dir.join("rabbitmq-env.conf"))
            .env_remove("ERL_FLAGS")
    }

    /// Stops the node when this process is gone (see the module docs).
    fn start_watchdog(&self, server_pid: u32) {
        let script = r#"
            while kill -0 "$HG_PARENT" 2>/dev/null; do sleep 0.5; done
            beam=$(cat "$HG_DIR/beam.pid" 2>/dev/null)
            [ -n "$beam" ] && kill -CONT "$beam" 2>/dev/null
            timeout 30 "$HG_CTL" -n "$RABBITMQ_NODENAME" stop >/dev/null 2>&1
            [ -n "$beam" ] && kill -KILL "$beam" 2>/dev/null
            kill -KILL "$HG_SERVER" 2>/dev/null
            [ -z "$HG_KEEP_RABBITMQ_DIR" ] && rm -rf "$HG_DIR"
        "#;
        let mut cmd = Command::new("sh");
        self.env(&mut cmd)
            .arg("-c")
            .arg(script)
            .env("HG_PARENT", std::process::id().to_string())
            .env("HG_DIR", &self.dir)
            .env("HG_CTL", &self.ctl)
            .env("HG_SERVER", server_pid.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0);
        // Never waited for: it is meant to outlive this process.
        #[allow(clippy::zombie_processes)]
        cmd.spawn().expect("start the rabbitmq watchdog");
    }

    /// The last lines of the node's output and log, for failure messages.
    fn tail(&self) -> String {
        let out = std::fs::read_to_string(self.dir.join("server.out")).unwrap_or_default();
        let log = self.log();
        let lines: Vec<&str> = out.lines().chain(log.lines()).collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// The PKI of the node's TLS listener (its CA signs the server certificate).
    pub fn pki(&self) -> Pki {
        Pki::at(&self.dir.join("pki"))
    }

    /// A private directory that lives as long as the node (for password files).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The node's log file so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log").join(format!("{}.log", self.name))).unwrap_or_default()
    }

    /// Runs `rabbitmqctl -n NODE args..`, or panics with its output.
    pub fn rabbitmqctl(&self, args: &[&str]) -> String {
        self.try_rabbitmqctl(args).unwrap_or_else(|e| panic!("{e}\n{}", self.tail()))
    }

    /// Runs `rabbitmqctl -n NODE args..`.
    pub fn try_rabbitmqctl(&self, args: &[&str]) -> Result<String, String> {
        let mut cmd = Command::new(&self.ctl);
        self.env(&mut cmd).arg("-n").arg(&self.name).args(args);
        run(&mut cmd, CTL_TIMEOUT)
    }

    fn await_startup(&self) {
        eventually_blocking("rabbitmqctl await_startup", BOOT, || self.try_rabbitmqctl(&["await_startup"]).ok());
    }

    /// An `amqp://` URL for `user` on this node.
    pub fn url(&self, user: &str, vhost: &str) -> String {
        format!("amqp://{user}@127.0.0.1:{}/{vhost}", self.port)
    }

    /// Creates a virtual host.
    pub fn add_vhost(&self, vhost: &str) {
        self.rabbitmqctl(&["add_vhost", vhost]);
    }

    /// Creates a user with full permissions on `vhost`.
    pub fn add_user(&self, user: &str, password: &str, vhost: &str) {
        self.rabbitmqctl(&["add_user", user, password]);
        self.rabbitmqctl(&["set_permissions", "-p", vhost, user, ".*", ".*", ".*"]);
    }

    /// The Erlang VM's pid.
    pub fn beam_pid(&self) -> u32 {
        let text = std::fs::read_to_string(self.dir.join("beam.pid")).expect("pid file");
        text.trim().parse().expect("pid")
    }

    /// SIGSTOPs the VM: the port still accepts (the kernel does), nothing answers.
    pub fn freeze(&self) -> Frozen<'_> {
        signal(self.beam_pid(), "STOP");
        Frozen(self)
    }

    /// Stops the RabbitMQ application (the VM stays; the AMQP port closes).
    pub fn stop_app(&self) -> Stopped<'_> {
        self.rabbitmqctl(&["stop_app"]);
        Stopped(self)
    }

    /// Starts the application again and waits until it serves AMQP.
    pub fn start_app(&self) {
        self.rabbitmqctl(&["start_app"]);
        self.await_startup();
        eventually_blocking("AMQP port after start_app", BOOT, || TcpStream::connect(("127.0.0.1", self.port)).ok());
    }

    /// Sets the memory high watermark (a tiny one raises the memory alarm);
    /// the guard restores the default 0.4.
    pub fn set_vm_memory_high_watermark(&self, fraction: f64) -> Alarm<'_> {
        self.rabbitmqctl(&["set_vm_memory_high_watermark", &fraction.to_string()]);
        Alarm(self)
    }

    /// The broker's log lines about connections named `connection_name`.
    ///
    /// "connection <0.123.0> (...) has a client-provided name: NAME" ties the
    /// Erlang pid of each such connection to the name; every later line
    /// logged by that pid is about it.
    pub fn connection_log(&self, connection_name: &str) -> Vec<String> {
        let log = self.log();
        let suffix = format!("has a client-provided name: {connection_name}");
        let pids: Vec<String> = log
            .lines()
            .filter(|l| l.ends_with(&suffix))
            .filter_map(|l| l.split_whitespace().nth(3).map(str::to_string))
            .collect();
        log.lines()
            .filter(|l| l.split_whitespace().nth(3).is_some_and(|p| pids.iter().any(|x| x == p)))
            .map(str::to_string)
            .collect()
    }

    /// How many connections named `connection_name` the broker opened.
    pub fn opened(&self, connection_name: &str) -> usize {
        let suffix = format!("has a client-provided name: {connection_name}");
        self.log().lines().filter(|l| l.ends_with(&suffix)).count()
    }

    /// Whether the broker logged a connection named `connection_name` as closed abruptly by the client.
    pub fn closed_abruptly(&self, connection_name: &str) -> bool {
        self.connection_log(connection_name).iter().any(|l| l.contains("client unexpectedly closed TCP connection"))
    }

    /// How many connections named `connection_name` the broker logged as closed normally
    /// (an abnormal close is logged at warning or error level, with its reason on the next line).
    pub fn closed_cleanly(&self, connection_name: &str) -> usize {
        self.connection_log(connection_name)
            .iter()
            .filter(|l| l.contains("[info]") && l.contains("closing AMQP connection"))
            .count()
    }
}

/// A frozen node; thawed on drop (also when the test panics).
pub struct Frozen<'a>(&'a RabbitNode);

impl Frozen<'_> {
    /// Thaws now.
    pub fn thaw(self) {}
}

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(self.0.dir.join("beam.pid")) {
            let _ = Command::new("kill").arg("-CONT").arg(pid.trim()).status();
        }
    }
}

/// A stopped application; started again on drop if the test did not.
pub struct Stopped<'a>(&'a RabbitNode);

impl Stopped<'_> {
    /// Starts the application again and waits until it serves AMQP.
    pub fn start(self) {}
}

impl Drop for Stopped<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // Best effort: a second panic would abort the whole test binary.
            let _ = self.0.try_rabbitmqctl(&["start_app"]);
        } else {
            self.0.start_app();
        }
    }
}

/// A raised memory alarm; cleared on drop.
pub struct Alarm<'a>(&'a RabbitNode);

impl Alarm<'_> {
    /// Restores the default watermark now.
    pub fn clear(self) {}
}

impl Drop for Alarm<'_> {
    fn drop(&mut self) {
        let _ = self.0.try_rabbitmqctl(&["set_vm_memory_high_watermark", "0.4"]);
    }
}
