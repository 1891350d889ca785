//! A fault-injecting TCP relay, and a small restartable backend to put
//! behind it.
//!
//! [`Relay`] listens on 127.0.0.1:0 and forwards every connection to a
//! target. [`Relay::set_fault`] changes what it does, from any thread, and
//! returns once the change is in effect for the listener (new connections);
//! existing connections react within a few milliseconds. Like the other
//! support servers it runs on its own thread with its own tokio runtime, so
//! it works from sync and async tests alike and keeps running while a test
//! blocks.
//!
//! [`Backend`] is a trivial server (echo with a greeting, or HTTP/1.1 200)
//! that can be stopped and started again on the same port, for "server
//! restart" cases and for testing the relay itself.

use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the relay does to traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward everything unchanged.
    None,
    /// The target "went away": the listening socket is closed, so a connect
    /// gets ECONNREFUSED, and existing connections are closed (FIN), as a
    /// process that exits closes its sockets. Lifting it binds the same port
    /// again.
    Refuse,
    /// Existing connections are reset (RST, via `SO_LINGER 0`); new ones are
    /// accepted and reset at once.
    Reset,
    /// Connections are accepted and kept, but no byte is forwarded in either
    /// direction (a frozen node: the kernel still completes handshakes).
    /// Bytes already read are held and delivered once the fault is lifted.
    BlackHole,
    /// Every chunk is held this long before it is forwarded, in each
    /// direction (a round trip grows by twice this).
    Latency(Duration),
    /// Bytes are forwarded `bytes` at a time, with a pause of `every` before
    /// each piece, in each direction.
    Drip {
        /// Bytes per piece.
        bytes: usize,
        /// Pause before each piece.
        every: Duration,
    },
    /// From the moment the fault is set, each connection forwards at most
    /// this many more bytes from the target, then the relay closes it (FIN).
    /// On a new connection that cuts the server's greeting (or first reply)
    /// short: a close in mid-handshake.
    CloseAfter(usize),
}

/// The relay's control state, watched by the acceptor and every connection.
#[derive(Debug, Clone, Copy)]
struct Control {
    fault: Fault,
    /// Bumped by every `set_fault` (restarts `CloseAfter` budgets).
    generation: u64,
    /// Bumped by `close_connections`; connections opened before close.
    close_epoch: u64,
}

/// A running relay; stops (closing everything) on drop.
pub struct Relay {
    /// Where clients connect (stable across [`Fault::Refuse`]).
    pub addr: SocketAddr,
    /// Where it forwards to.
    pub target: SocketAddr,
    control: watch::Sender<Control>,
    /// The generation the acceptor has applied.
    applied: Arc<(Mutex<u64>, Condvar)>,
    counters: Arc<Mutex<Counters>>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Counters {
    accepted: u64,
    open: u64,
}

impl Relay {
    /// Starts a relay to `target` on 127.0.0.1:0, passing traffic through.
    pub fn start(target: SocketAddr) -> Relay {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind relay");
        std_listener.set_nonblocking(true).unwrap();
        let addr = std_listener.local_addr().unwrap();
        let (control, rx) = watch::channel(Control { fault: Fault::None, generation: 0, close_epoch: 0 });
        let applied = Arc::new((Mutex::new(0u64), Condvar::new()));
        let counters = Arc::new(Mutex::new(Counters::default()));
        let (shutdown, shutdown_rx) = tokio::sync::oneshot::channel();
        let (ap, ct) = (applied.clone(), counters.clone());
        std::thread::Builder::new()
            .name(format!("relay-{}", addr.port()))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                rt.block_on(async move {
                    let listener = TcpListener::from_std(std_listener).unwrap();
                    tokio::select! {
                        _ = accept_loop(listener, addr, target, rx, ap, ct) => {}
                        _ = shutdown_rx => {}
                    }
                });
                // Dropping the runtime drops every connection task and socket.
            })
            .expect("spawn relay thread");
        Relay { addr, target, control, applied, counters, shutdown: Some(shutdown) }
    }

    /// Changes the fault; returns once the listener obeys it (a connect after
    /// `set_fault(Fault::Refuse)` is refused, and after lifting it succeeds).
    pub fn set_fault(&self, fault: Fault) {
        let mut generation = 0;
        self.control.send_modify(|c| {
            c.fault = fault;
            c.generation += 1;
            generation = c.generation;
        });
        let (lock, cvar) = &*self.applied;
        let guard = lock.lock().unwrap();
        let (_guard, waited) = cvar.wait_timeout_while(guard, super::STEP, |applied| *applied < generation).unwrap();
        assert!(!waited.timed_out(), "relay did not apply {fault:?} within {:?}", super::STEP);
    }

    /// Back to passing traffic through.
    pub fn clear(&self) {
        self.set_fault(Fault::None);
    }

    /// The current fault.
    pub fn fault(&self) -> Fault {
        self.control.borrow().fault
    }

    /// Closes (FIN) every connection open now, as a server does to idle
    /// clients; new connections are unaffected.
    pub fn close_connections(&self) {
        self.control.send_modify(|c| c.close_epoch += 1);
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.counters.lock().unwrap().accepted
    }

    /// Connections open now.
    pub fn open(&self) -> u64 {
        self.counters.lock().unwrap().open
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(s) = self.shutdown.take() {
            let _ = s.send(());
        }
    }
}

async fn accept_loop(
    mut listener: TcpListener,
    addr: SocketAddr,
    target: SocketAddr,
    mut rx: watch::Receiver<Control>,
    applied: Arc<(Mutex<u64>, Condvar)>,
    counters: Arc<Mutex<Counters>>,
) {
    let ack = |generation: u64| {
        let (lock, cvar) = &*applied;
        let mut a = lock.lock().unwrap();
        *a = (*a).max(generation);
        cvar.notify_all();
    };
    loop {
        let control = *rx.borrow_and_update();
        if control.fault == Fault::Refuse {
            // A real refusal: nothing listens on the port until the fault is lifted.
            drop(listener);
            ack(control.generation);
            let generation = loop {
                if rx.changed().await.is_err() {
                    return;
                }
                let c = *rx.borrow_and_update();
                if c.fault != Fault::Refuse {
                    break c.generation;
                }
                // Refused again: already in effect.
                ack(c.generation);
            };
            listener = rebind(addr).await;
            ack(generation);
            continue;
        }
        ack(control.generation);
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((client, _)) = accepted else { continue };
                counters.lock().unwrap().accepted += 1;
                let (rx, counters) = (rx.clone(), counters.clone());
                tokio::spawn(async move {
                    counters.lock().unwrap().open += 1;
                    connection(client, target, rx).await;
                    counters.lock().unwrap().open -= 1;
                });
            }
            changed = rx.changed() => if changed.is_err() { return },
        }
    }
}

/// Binds `addr` again (SO_REUSEADDR is set by tokio, so TIME_WAIT
/// connections of the old listener do not block it).
async fn rebind(addr: SocketAddr) -> TcpListener {
    for _ in 0..100 {
        if let Ok(l) = TcpListener::bind(addr).await {
            return l;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("relay could not bind {addr} again");
}

/// How a connection ends when the relay ends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kill {
    Fin,
    Rst,
}

/// Waits until the control state says this connection must die.
async fn killed(mut rx: watch::Receiver<Control>, epoch: u64) -> Kill {
    loop {
        let c = *rx.borrow_and_update();
        match c.fault {
            Fault::Reset => return Kill::Rst,
            Fault::Refuse => return Kill::Fin,
            _ if c.close_epoch > epoch => return Kill::Fin,
            _ => {}
        }
        if rx.changed().await.is_err() {
            return Kill::Fin;
        }
    }
}

/// Resets a socket: `SO_LINGER 0` makes the close send RST. `forget` stops
/// the write half from sending a FIN first when dropped; the socket closes
/// (with RST) when its read half is dropped.
fn reset(half: OwnedWriteHalf) {
    let _ = socket2::SockRef::from(half.as_ref()).set_linger(Some(Duration::ZERO));
    half.forget();
}

/// Why a pump stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// Its source ended (or a write failed); the other direction may go on.
    Eof,
    /// A `CloseAfter` budget ran out: the whole connection must close.
    Close,
}

async fn connection(client: TcpStream, target: SocketAddr, rx: watch::Receiver<Control>) {
    let epoch = rx.borrow().close_epoch;
    let _ = client.set_nodelay(true);
    let (mut cr, mut cw) = client.into_split();
    let upstream = tokio::select! {
        u = tokio::time::timeout(super::STEP, TcpStream::connect(target)) => u,
        k = killed(rx.clone(), epoch) => {
            if k == Kill::Rst { reset(cw); }
            return;
        }
    };
    let Ok(Ok(upstream)) = upstream else {
        // The target is gone; the closest a relay can get to its refusal.
        reset(cw);
        return;
    };
    let _ = upstream.set_nodelay(true);
    let (mut ur, mut uw) = upstream.into_split();
    let outcome = {
        let to_server = std::pin::pin!(pump(&mut cr, &mut uw, rx.clone(), false));
        let to_client = std::pin::pin!(pump(&mut ur, &mut cw, rx.clone(), true));
        let kill = std::pin::pin!(killed(rx.clone(), epoch));
        let (mut to_server, mut to_client, mut kill) = (to_server, to_client, kill);
        let (mut server_done, mut client_done) = (false, false);
        loop {
            tokio::select! {
                e = &mut to_server, if !server_done => {
                    if e == End::Close { break Some(Kill::Fin) }
                    server_done = true;
                }
                e = &mut to_client, if !client_done => {
                    if e == End::Close { break Some(Kill::Fin) }
                    client_done = true;
                }
                k = &mut kill => break Some(k),
            }
            if server_done && client_done {
                break None;
            }
        }
    };
    match outcome {
        Some(Kill::Rst) => {
            reset(cw);
            reset(uw);
        }
        Some(Kill::Fin) => {
            let _ = cw.shutdown().await;
            let _ = uw.shutdown().await;
        }
        None => {}
    }
}

/// Waits while the fault is [`Fault::BlackHole`]; returns the control state
/// to forward under (`None` when the relay is gone).
async fn wait_flowing(rx: &mut watch::Receiver<Control>) -> Option<Control> {
    rx.wait_for(|c| c.fault != Fault::BlackHole).await.ok().map(|c| *c)
}

/// Forwards `from` to `to` under the current fault until `from` ends (then
/// half-closes `to`), a write fails, or a `CloseAfter` budget runs out on
/// the target's direction.
async fn pump(
    from: &mut OwnedReadHalf,
    to: &mut OwnedWriteHalf,
    mut rx: watch::Receiver<Control>,
    from_target: bool,
) -> End {
    let mut buf = vec![0u8; 16 * 1024];
    // (generation, bytes left) of the CloseAfter fault being counted.
    let mut budget: Option<(u64, usize)> = None;
    loop {
        if wait_flowing(&mut rx).await.is_none() {
            return End::Eof;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return End::Eof;
            }
            Ok(n) => n,
        };
        // Checked again: a black hole may have opened while we waited to read.
        let Some(control) = wait_flowing(&mut rx).await else { return End::Eof };
        let chunk = &buf[..n];
        let written = match control.fault {
            Fault::Latency(d) => {
                tokio::time::sleep(d).await;
                to.write_all(chunk).await
            }
            Fault::Drip { bytes, every } => {
                let mut r = Ok(());
                for piece in chunk.chunks(bytes.max(1)) {
                    tokio::time::sleep(every).await;
                    r = to.write_all(piece).await;
                    if r.is_err() {
                        break;
                    }
                }
                r
            }
            Fault::CloseAfter(limit) if from_target => {
                let left = match budget {
                    Some((g, left)) if g == control.generation => left,
                    _ => limit,
                };
                let take = left.min(chunk.len());
                let _ = to.write_all(&chunk[..take]).await;
                budget = Some((control.generation, left - take));
                if left - take == 0 {
                    return End::Close;
                }
                Ok(())
            }
            _ => to.write_all(chunk).await,
        };
        if written.is_err() {
            return End::Eof;
        }
    }
}

/// What a [`Backend`] speaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Speaks {
    /// Sends this greeting on connect (may be empty), then echoes every byte.
    Echo(Vec<u8>),
    /// HTTP/1.1 (hyper): `200 ok` to every request, keep-alive.
    Http,
}

/// A trivial server on 127.0.0.1 that can be stopped and started again on
/// the same port (its own thread and runtime).
pub struct Backend {
    /// Its address (stable across restarts).
    pub addr: SocketAddr,
    speaks: Speaks,
    /// Dropping it stops the current incarnation (listener and connections).
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Backend {
    /// Starts a backend on 127.0.0.1:0.
    pub fn start(speaks: Speaks) -> Backend {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind backend");
        let addr = listener.local_addr().unwrap();
        let mut b = Backend { addr, speaks, stop: None };
        b.serve(listener);
        b
    }

    fn serve(&mut self, listener: std::net::TcpListener) {
        listener.set_nonblocking(true).unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let speaks = self.speaks.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let listener = TcpListener::from_std(listener).unwrap();
                let _ = ready_tx.send(());
                let serve = async {
                    loop {
                        let Ok((stream, _)) = listener.accept().await else { continue };
                        tokio::spawn(serve_one(stream, speaks.clone()));
                    }
                };
                tokio::select! {
                    _ = serve => {}
                    _ = stopped => {}
                }
            });
            // Dropping the runtime closes the listener and every connection,
            // like a process that exits.
        });
        ready_rx.recv_timeout(super::STEP).expect("backend thread started");
        self.stop = Some(stop);
    }

    /// Stops it: the port refuses connections and open ones are closed.
    /// Returns once the port refuses.
    pub fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let addr = self.addr;
        super::eventually_blocking("the stopped backend's port to refuse", super::STEP, || {
            std::net::TcpStream::connect(addr).is_err().then_some(())
        });
    }

    /// Starts it again on the same port.
    pub fn restart(&mut self) {
        assert!(self.stop.is_none(), "backend is running");
        let addr = self.addr;
        let listener = super::eventually_blocking("the backend's port to bind again", super::STEP, || {
            std::net::TcpListener::bind(addr).ok()
        });
        self.serve(listener);
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

async fn serve_one(mut stream: TcpStream, speaks: Speaks) {
    match speaks {
        Speaks::Echo(greeting) => {
            if stream.write_all(&greeting).await.is_err() {
                return;
            }
            let (mut r, mut w) = stream.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        }
        Speaks::Http => {
            let svc = hyper::service::service_fn(|_req: hyper::Request<hyper::body::Incoming>| async {
                Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(
                    bytes::Bytes::from_static(b"ok"),
                )))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
        }
    }
}
