//! Wiring: threads, runtimes, sockets, and the shutdown sequence.
//!
//! Threads (all named, visible in `top -H`):
//! * `hg-worker-N` × `workers`: one current-thread runtime each, with its own
//!   `SO_REUSEPORT` socket per listener, so the kernel spreads connections
//!   and workers share no lock (measured faster than a multi-thread runtime,
//!   see the README's Performance section).
//! * `hg-monitor`: every dependency's monitor task and the aggregator.
//! * `hg-admin`: probes, status, metrics, on their own runtime so they answer
//!   even when the data plane is saturated.
//! * the main thread: waits for signals and runs the drain.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::admin::{Admin, Heartbeats};
use crate::config::{Config, ListenerProtocol};
use crate::control::Control;
use crate::fleet::Fleet;
use crate::metrics::Metrics;
use crate::monitor;
use crate::proxy::{self, ListenerCtx, LiveCtx};
use crate::reload::{ReloadSender, Reloader};
use crate::state::Health;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listen address could not be bound.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        /// What the address is for.
        what: String,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: io::Error,
    },
    /// A thread or runtime could not be created.
    #[error("cannot start {what}: {source}")]
    Runtime {
        /// Which one.
        what: &'static str,
        /// The OS error.
        source: io::Error,
    },
}

/// A running healthgate.
pub struct Running {
    /// Each listener's bound address, in config order.
    pub listeners: Vec<SocketAddr>,
    /// The admin server's bound address.
    pub admin: SocketAddr,
    /// The shared health state.
    pub health: Arc<Health>,
    /// The metrics.
    pub metrics: Arc<Metrics>,
    config: Config,
    /// Where SIGHUP asks for a reload.
    reload: ReloadSender,
    drain_tx: watch::Sender<Option<Instant>>,
    stop_monitors: watch::Sender<bool>,
    workers: Vec<JoinHandle<()>>,
    monitor: Option<JoinHandle<()>>,
}

/// Binds a listening socket with `SO_REUSEPORT` (one per worker).
fn bind_reuseport(addr: SocketAddr, backlog: i32) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(false).ok();
    }
    socket.set_tcp_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// Accept backlog of the admin socket (the kernel caps it at `somaxconn`).
const ADMIN_BACKLOG: i32 = 4096;

/// Binds the admin socket.
fn bind_admin(addr: SocketAddr, backlog: i32) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog)?;
    Ok(socket.into())
}

fn spawn_thread(name: String, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>, StartError> {
    std::thread::Builder::new().name(name).spawn(f).map_err(|source| StartError::Runtime { what: "thread", source })
}

fn runtime_current() -> Result<tokio::runtime::Runtime, StartError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| StartError::Runtime { what: "runtime", source })
}

/// Starts every thread; returns once all sockets are bound.
pub fn start(config: Config) -> Result<Running, StartError> {
    let health = Health::new(&config);
    let metrics = Metrics::new(&config);
    let workers = config.workers;

    // Bind everything first: a bad address fails the start before any thread runs.
    let mut sockets: Vec<Vec<std::net::TcpListener>> = (0..workers).map(|_| Vec::new()).collect();
    let mut bound = Vec::new();
    for l in &config.listeners {
        let err = |source, addr| StartError::Bind { what: format!("listener {}", l.name), addr, source };
        let first = bind_reuseport(l.listen, 1024).map_err(|e| err(e, l.listen))?;
        let addr = first.local_addr().map_err(|e| err(e, l.listen))?;
        sockets[0].push(first);
        for w in sockets.iter_mut().skip(1) {
            w.push(bind_reuseport(addr, 1024).map_err(|e| err(e, addr))?);
        }
        bound.push(addr);
    }
    // A long accept backlog: under a connection flood a kubelet probe's SYN
    // must wait in the queue (the admin server sheds the flood at accept),
    // not be dropped and retried a second later.
    let admin_listener = bind_admin(config.admin.listen, ADMIN_BACKLOG).map_err(|source| StartError::Bind {
        what: "admin".into(),
        addr: config.admin.listen,
        source,
    })?;
    admin_listener.set_nonblocking(true).map_err(|source| StartError::Runtime { what: "admin socket", source })?;
    let admin_addr =
        admin_listener.local_addr().map_err(|source| StartError::Runtime { what: "admin socket", source })?;

    let mut loop_names: Vec<String> = (0..workers).map(|i| format!("hg-worker-{i}")).collect();
    loop_names.push("hg-monitor".into());
    if config.fleet.is_some() {
        loop_names.push("hg-fleet".into());
    }
    let heartbeats = Heartbeats::new(loop_names);
    let fleet = config.fleet.clone().map(|f| Fleet::new(f, &config, health.clone(), metrics.clone()));

    // The control state and the admin handlers: the reloader updates them.
    let max_ttl = config.admin.control.as_ref().map_or(crate::config::admin::DEFAULT_MAX_TTL, |c| c.max_ttl);
    let control = Control::new(health.clone(), metrics.clone(), max_ttl);
    let admin = Admin::new(
        &config,
        &bound,
        health.clone(),
        metrics.clone(),
        heartbeats.clone(),
        control.clone(),
        fleet.clone(),
    );
    // Each worker reads its own copy of each listener's context; a reload swaps them.
    let lives: Vec<Vec<LiveCtx>> = (0..config.listeners.len())
        .map(|i| {
            (0..workers).map(|_| proxy::live(ListenerCtx::new(&config, i, health.clone(), metrics.clone()))).collect()
        })
        .collect();
    let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(4);
    control.set_reloader(reload_tx.clone());

    // Monitor thread: checks, aggregator, reloader.
    let (stop_monitors, stop_rx) = watch::channel(false);
    let monitor = {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("hg-monitor")
            .enable_all()
            .build()
            .map_err(|source| StartError::Runtime { what: "monitor runtime", source })?;
        let (health, metrics, heartbeats, control, admin) =
            (health.clone(), metrics.clone(), heartbeats.clone(), control.clone(), admin.clone());
        let (config, bound, lives) = (config.clone(), bound.clone(), lives.clone());
        spawn_thread("hg-monitor-main".into(), move || {
            rt.block_on(async move {
                tokio::spawn(heartbeats.beat(workers));
                tokio::spawn(monitor::aggregate(health.clone(), metrics.clone()));
                // The loop lives (and its heartbeat ticks) until the stop,
                // even with nothing to check: an idle loop is not a stuck one.
                Reloader::start(config, health, metrics, control, admin, bound, lives).run(reload_rx, stop_rx).await;
            });
        })?
    };

    // Fleet thread: peer polls never share a loop with checks or requests.
    if let Some(fleet) = fleet.clone() {
        let rt = runtime_current()?;
        let (heartbeats, stop) = (heartbeats.clone(), stop_monitors.subscribe());
        spawn_thread("hg-fleet".into(), move || {
            rt.block_on(async move {
                tokio::spawn(heartbeats.beat(workers + 1));
                fleet.run(stop).await;
            })
        })?;
    }

    // Admin thread.
    {
        let rt = runtime_current()?;
        spawn_thread("hg-admin".into(), move || {
            rt.block_on(async move {
                match tokio::net::TcpListener::from_std(admin_listener) {
                    Ok(l) => crate::admin::serve(l, admin).await,
                    Err(e) => warn!(error = %e, "admin listener failed"),
                }
            })
        })?;
    }

    // Worker threads.
    let (drain_tx, drain_rx) = watch::channel(None);
    let mut worker_handles = Vec::new();
    for (w, socks) in sockets.into_iter().enumerate() {
        let rt = runtime_current()?;
        let ctxs: Vec<LiveCtx> = lives.iter().map(|l| l[w].clone()).collect();
        let protocols: Vec<ListenerProtocol> = config.listeners.iter().map(|l| l.protocol).collect();
        let (drain_rx, heartbeats) = (drain_rx.clone(), heartbeats.clone());
        worker_handles.push(spawn_thread(format!("hg-worker-{w}"), move || {
            let local = tokio::task::LocalSet::new();
            local.block_on(&rt, async move {
                let beat = tokio::task::spawn_local(heartbeats.beat(w));
                let mut serving = Vec::new();
                for ((sock, ctx), protocol) in socks.into_iter().zip(ctxs).zip(protocols) {
                    let listener = match tokio::net::TcpListener::from_std(sock) {
                        Ok(l) => l,
                        Err(e) => {
                            warn!(error = %e, "listener registration failed");
                            continue;
                        }
                    };
                    let drain = drain_rx.clone();
                    serving.push(tokio::task::spawn_local(async move {
                        match protocol {
                            ListenerProtocol::Http => proxy::http::serve(listener, ctx, drain).await,
                            ListenerProtocol::Tcp => proxy::tcp::serve(listener, ctx, drain).await,
                        }
                    }));
                }
                for s in serving {
                    let _ = s.await;
                }
                beat.abort();
            });
        })?);
    }

    Ok(Running {
        listeners: bound,
        admin: admin_addr,
        health,
        metrics,
        config,
        reload: reload_tx,
        drain_tx,
        stop_monitors,
        workers: worker_handles,
        monitor: Some(monitor),
    })
}

impl Running {
    /// The drain sequence after SIGTERM: readiness fails at once; keep
    /// serving for `drain.delay` (HTTP answers now close their connections,
    /// see `proxy::http`); stop accepting; wait for in-flight work up
    /// to `drain.timeout`; close the checks' connections cleanly.
    ///
    /// `interrupted` resolves on a second signal and cuts the drain short.
    pub async fn drain(mut self, interrupted: impl std::future::Future<Output = ()>) {
        let drain = self.config.drain;
        self.health.start_draining();
        info!(delay = ?drain.delay, timeout = ?drain.timeout, "drain started: readiness now fails; still serving");
        tokio::pin!(interrupted);
        let forced = tokio::select! {
            _ = tokio::time::sleep(drain.delay) => false,
            _ = &mut interrupted => true,
        };
        if forced {
            warn!("second signal: exiting without waiting");
            return;
        }
        let deadline = Instant::now() + drain.timeout;
        info!("drain: no longer accepting; waiting for in-flight requests");
        self.drain_tx.send_replace(Some(deadline));
        let workers = std::mem::take(&mut self.workers);
        let joined = tokio::task::spawn_blocking(move || {
            for w in workers {
                let _ = w.join();
            }
        });
        tokio::select! {
            _ = joined => info!("drain: every connection finished"),
            _ = tokio::time::sleep_until(deadline + Duration::from_millis(500)) => warn!("drain: timeout; closing remaining connections"),
            _ = &mut interrupted => { warn!("second signal: exiting without waiting"); return; }
        }
        self.stop_checks().await;
    }

    /// Stops the monitors; each closes its connection cleanly (bounded).
    pub async fn stop_checks(&mut self) {
        self.stop_monitors.send_replace(true);
        if let Some(m) = self.monitor.take() {
            let _ = tokio::time::timeout(Duration::from_secs(3), tokio::task::spawn_blocking(move || m.join())).await;
        }
    }
}

/// Runs until SIGTERM/SIGINT and the drain complete. Returns the exit code.
pub fn run(config: Config) -> Result<i32, StartError> {
    let rt = runtime_current()?;
    let code = rt.block_on(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term =
            signal(SignalKind::terminate()).map_err(|source| StartError::Runtime { what: "signals", source })?;
        let mut int =
            signal(SignalKind::interrupt()).map_err(|source| StartError::Runtime { what: "signals", source })?;
        let mut hup = signal(SignalKind::hangup()).map_err(|source| StartError::Runtime { what: "signals", source })?;
        let running = start(config)?;
        let listeners: Vec<String> = running.listeners.iter().map(|a| a.to_string()).collect();
        info!(
            listeners = %listeners.join(","), admin = %running.admin, workers = running.config.workers,
            dependencies = running.config.dependencies.len(), "healthgate started"
        );
        let which = loop {
            tokio::select! {
                _ = term.recv() => break "SIGTERM",
                _ = int.recv() => break "SIGINT",
                // A reload runs on the monitor thread; its outcome is logged there.
                _ = hup.recv() => crate::reload::on_sighup(&running.reload).await,
            }
        };
        info!(signal = which, "shutdown requested");
        let second = async move {
            tokio::select! {
                _ = term.recv() => {},
                _ = int.recv() => {},
            }
        };
        let forced = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let f = forced.clone();
        running
            .drain(async move {
                second.await;
                f.store(true, std::sync::atomic::Ordering::SeqCst);
            })
            .await;
        info!("healthgate stopped");
        // 130: the conventional code for "interrupted"; a forced exit is not a clean drain.
        Ok(if forced.load(std::sync::atomic::Ordering::SeqCst) { 130 } else { 0 })
    });
    // Dropping a runtime waits for its blocking tasks, and after a second
    // signal (or a drain timeout) one of them is still joining the workers
    // that serve the remaining connections: the process would not exit until
    // they finished. Leave them to the process exit instead.
    rt.shutdown_background();
    code
}
