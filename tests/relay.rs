//! The fault-injecting relay (tests/support/relay.rs) does what each fault
//! says, against a trivial greeting-then-echo backend.

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use support::relay::{Backend, Fault, Relay, Speaks};

const GREETING: &[u8] = b"HELLO 0123456789\n";

fn setup() -> (Backend, Relay) {
    let backend = Backend::start(Speaks::Echo(GREETING.to_vec()));
    let relay = Relay::start(backend.addr);
    (backend, relay)
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, support::STEP).expect("connect");
    s.set_read_timeout(Some(support::STEP)).unwrap();
    s
}

/// Reads exactly `n` bytes.
fn read_n(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).expect("read");
    buf
}

/// Reads until EOF or error; returns the bytes and the error kind, if any.
fn read_to_end(s: &mut TcpStream) -> (Vec<u8>, Option<ErrorKind>) {
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (out, None),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) => return (out, Some(e.kind())),
        }
    }
}

#[test]
fn passes_greeting_and_echo_through() {
    let (_b, relay) = setup();
    let mut s = connect(relay.addr);
    assert_eq!(read_n(&mut s, GREETING.len()), GREETING);
    s.write_all(b"ping").unwrap();
    assert_eq!(read_n(&mut s, 4), b"ping");
    assert_eq!(relay.accepted(), 1);
}

#[test]
fn refuse_closes_the_port_and_open_connections_until_lifted() {
    let (_b, relay) = setup();
    let mut open = connect(relay.addr);
    read_n(&mut open, GREETING.len());

    relay.set_fault(Fault::Refuse);
    relay.set_fault(Fault::Refuse);
    let err = TcpStream::connect(relay.addr).expect_err("connect must fail while refusing");
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
    // The open connection is closed, as by a server that exited.
    assert_eq!(read_to_end(&mut open), (vec![], None));

    relay.clear();
    let mut s = connect(relay.addr);
    assert_eq!(read_n(&mut s, GREETING.len()), GREETING, "same address serves again");
}

#[test]
fn reset_resets_open_and_new_connections() {
    let (_b, relay) = setup();
    let mut open = connect(relay.addr);
    read_n(&mut open, GREETING.len());

    relay.set_fault(Fault::Reset);
    assert_eq!(read_to_end(&mut open).1, Some(ErrorKind::ConnectionReset));
    // A new connection is accepted (the kernel completes it), then reset; the
    // RST can arrive before connect() returns, which then reports it.
    match TcpStream::connect_timeout(&relay.addr, support::STEP) {
        Ok(mut new) => {
            new.set_read_timeout(Some(support::STEP)).unwrap();
            assert_eq!(read_to_end(&mut new), (vec![], Some(ErrorKind::ConnectionReset)));
        }
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}"),
    }

    relay.clear();
    let mut s = connect(relay.addr);
    assert_eq!(read_n(&mut s, GREETING.len()), GREETING);
}

#[test]
fn black_hole_accepts_but_forwards_nothing_until_lifted() {
    let (_b, relay) = setup();
    let mut open = connect(relay.addr);
    read_n(&mut open, GREETING.len());

    relay.set_fault(Fault::BlackHole);
    let mut new = connect(relay.addr);
    open.write_all(b"held").unwrap();
    for s in [&mut open, &mut new] {
        s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        let mut b = [0u8; 1];
        let err = s.read(&mut b).expect_err("nothing may arrive through a black hole");
        assert!(matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut), "{err}");
        s.set_read_timeout(Some(support::STEP)).unwrap();
    }

    relay.clear();
    assert_eq!(read_n(&mut open, 4), b"held", "held bytes are delivered once lifted");
    assert_eq!(read_n(&mut new, GREETING.len()), GREETING);
}

#[test]
fn latency_holds_each_chunk_in_each_direction() {
    let (_b, relay) = setup();
    let mut s = connect(relay.addr);
    read_n(&mut s, GREETING.len());

    relay.set_fault(Fault::Latency(Duration::from_millis(200)));
    let started = Instant::now();
    s.write_all(b"ping").unwrap();
    assert_eq!(read_n(&mut s, 4), b"ping");
    // A lower bound only: the relay must not deliver early.
    assert!(started.elapsed() >= Duration::from_millis(400), "round trip took {:?}", started.elapsed());
}

#[test]
fn drip_forwards_a_few_bytes_at_a_time() {
    let (_b, relay) = setup();
    relay.set_fault(Fault::Drip { bytes: 2, every: Duration::from_millis(30) });
    let started = Instant::now();
    let mut s = connect(relay.addr);
    let mut first = [0u8; 64];
    let n = s.read(&mut first).unwrap();
    assert!(n <= 2, "first read got {n} bytes");
    let mut rest = read_n(&mut s, GREETING.len() - n);
    let mut all = first[..n].to_vec();
    all.append(&mut rest);
    assert_eq!(all, GREETING);
    // 17 bytes in pieces of 2 with 30 ms before each: at least 9 pauses.
    assert!(started.elapsed() >= Duration::from_millis(270), "took {:?}", started.elapsed());
}

#[test]
fn close_after_cuts_the_greeting_short() {
    let (_b, relay) = setup();
    relay.set_fault(Fault::CloseAfter(5));
    let mut s = connect(relay.addr);
    assert_eq!(read_to_end(&mut s), (GREETING[..5].to_vec(), None));

    // On an open connection it counts from the moment the fault is set.
    relay.clear();
    let mut open = connect(relay.addr);
    read_n(&mut open, GREETING.len());
    relay.set_fault(Fault::CloseAfter(3));
    open.write_all(b"abcdef").unwrap();
    assert_eq!(read_to_end(&mut open), (b"abc".to_vec(), None));
}

#[test]
fn close_connections_closes_open_ones_only() {
    let (_b, relay) = setup();
    let mut open = connect(relay.addr);
    read_n(&mut open, GREETING.len());
    relay.close_connections();
    assert_eq!(read_to_end(&mut open), (vec![], None));
    let mut s = connect(relay.addr);
    assert_eq!(read_n(&mut s, GREETING.len()), GREETING);
}

#[test]
fn backend_restarts_on_the_same_port() {
    let mut backend = Backend::start(Speaks::Echo(GREETING.to_vec()));
    let mut open = connect(backend.addr);
    read_n(&mut open, GREETING.len());
    backend.stop();
    assert_eq!(TcpStream::connect(backend.addr).unwrap_err().kind(), ErrorKind::ConnectionRefused);
    assert_eq!(read_to_end(&mut open).0, b"");
    backend.restart();
    assert_eq!(read_n(&mut connect(backend.addr), GREETING.len()), GREETING);
}

#[test]
fn relay_is_shareable_between_threads() {
    fn send_sync<T: Send + Sync>(_: &T) {}
    let (_b, relay) = setup();
    send_sync(&relay);
    std::thread::scope(|s| {
        s.spawn(|| relay.set_fault(Fault::Refuse)).join().unwrap();
    });
    assert_eq!(relay.fault(), Fault::Refuse);
    assert_eq!(TcpStream::connect(relay.addr).unwrap_err().kind(), ErrorKind::ConnectionRefused);
}
