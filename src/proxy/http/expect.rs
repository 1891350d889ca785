//! `Expect: 100-continue` decided by the app (RFC 9110 §10.1.1).
//!
//! hyper's server writes `100 Continue` to the client by itself the first
//! time a request body is polled. So the request goes to the app with its
//! `Expect` header and the client's body is not polled until the app said
//! `100` (seen through hyper's client informational callback), or until the
//! app said nothing for [`CONTINUE_WAIT`] (an app that ignores the
//! expectation and waits for the body; clients such as curl give up
//! waiting after the same second). Then hyper sends our `100` and the body
//! streams. An app that answers with a final status first (`401`, `413`)
//! never gets the body: the client's body is dropped unread, the response
//! carries `Connection: close`, and that upstream connection is not reused
//! (it still owes the app a body).

use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use hyper::Version;
use hyper::header::{self, HeaderMap};
use tokio::time::Sleep;

/// How long the app may stay silent before the client's body is asked for anyway.
pub const CONTINUE_WAIT: Duration = Duration::from_secs(1);

const WAITING: u8 = 0;
const OPEN: u8 = 1;
const REFUSED: u8 = 2;

/// Whether the client's body may be sent, shared between the request body
/// (polled by the upstream connection's task) and hyper's informational
/// callback (which must be `Send + Sync`).
#[derive(Default)]
pub(super) struct Gate {
    state: AtomicU8,
    waker: Mutex<Option<Waker>>,
}

impl Gate {
    /// The app asked for the body (or was silent too long).
    pub(super) fn open(&self) {
        self.settle(OPEN);
    }

    /// The app answered with a final status; returns whether the body had
    /// not been asked for (it then never is).
    pub(super) fn refuse(&self) -> bool {
        self.settle(REFUSED)
    }

    fn settle(&self, to: u8) -> bool {
        let changed = self.state.compare_exchange(WAITING, to, Ordering::AcqRel, Ordering::Acquire).is_ok();
        if changed && let Some(w) = self.waker.lock().unwrap_or_else(|e| e.into_inner()).take() {
            w.wake();
        }
        changed
    }
}

/// Holds a request body back until its [`Gate`] opens.
pub(super) struct Hold {
    gate: Arc<Gate>,
    wait: Pin<Box<Sleep>>,
}

impl Hold {
    /// `Ready(true)`: send the body; `Ready(false)`: never.
    pub(super) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<bool> {
        for _ in 0..2 {
            match self.gate.state.load(Ordering::Acquire) {
                OPEN => return Poll::Ready(true),
                REFUSED => return Poll::Ready(false),
                _ => {}
            }
            if self.wait.as_mut().poll(cx).is_ready() {
                self.gate.open();
                continue;
            }
            // Stored, then the state read again: an `open` in between is not lost.
            *self.gate.waker.lock().unwrap_or_else(|e| e.into_inner()) = Some(cx.waker().clone());
        }
        match self.gate.state.load(Ordering::Acquire) {
            OPEN => Poll::Ready(true),
            REFUSED => Poll::Ready(false),
            _ => Poll::Pending,
        }
    }
}

/// Whether the client waits for `100 Continue` before sending a body: an
/// HTTP/1.1 request with `Expect: 100-continue` and a body (hyper's server
/// ignores the expectation otherwise, and so does this).
pub(super) fn expects_continue(h: &HeaderMap, version: Version, has_body: bool) -> bool {
    has_body
        && version == Version::HTTP_11
        && h.get(header::EXPECT).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

/// A gate for an upstream request and the [`Hold`] that goes into its body.
/// The app's `100` opens it: seen by the request's informational callback
/// (`forward::relay_informational`, hyper keeps one per request, which also
/// relays the other 1xx responses).
pub(super) fn watch_continue() -> (Arc<Gate>, Hold) {
    let gate = Arc::new(Gate::default());
    let hold = Hold { gate: gate.clone(), wait: Box::pin(tokio::time::sleep(CONTINUE_WAIT)) };
    (gate, hold)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hold() -> (Arc<Gate>, Hold) {
        let gate = Arc::new(Gate::default());
        let wait = Box::pin(tokio::time::sleep(Duration::from_secs(3600)));
        (gate.clone(), Hold { gate, wait })
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_body_waits_for_the_apps_100_and_never_goes_after_a_final_status() {
        let mut cx = Context::from_waker(Waker::noop());
        let (gate, mut h) = hold();
        assert_eq!(h.poll(&mut cx), Poll::Pending);
        gate.open();
        assert_eq!(h.poll(&mut cx), Poll::Ready(true));
        assert!(!gate.refuse(), "a final status after the 100 does not refuse");

        let (gate, mut h) = hold();
        assert!(gate.refuse());
        gate.open();
        assert_eq!(h.poll(&mut cx), Poll::Ready(false), "refused stays refused");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_silent_app_gets_the_body_once_the_wait_passed() {
        let gate = Arc::new(Gate::default());
        let wait = Duration::from_millis(1);
        let mut h = Hold { gate: gate.clone(), wait: Box::pin(tokio::time::sleep(wait)) };
        let mut cx = Context::from_waker(Waker::noop());
        assert_eq!(h.poll(&mut cx), Poll::Pending);
        // A later timer has fired, so the hold's has too.
        tokio::time::timeout(Duration::from_secs(5), tokio::time::sleep(wait * 5)).await.unwrap();
        assert_eq!(h.poll(&mut cx), Poll::Ready(true));
        assert!(!gate.refuse());
    }

    #[test]
    fn only_http11_requests_with_a_body_expect_continue() {
        let mut h = HeaderMap::new();
        h.insert(header::EXPECT, "100-Continue".parse().unwrap());
        assert!(expects_continue(&h, Version::HTTP_11, true));
        assert!(!expects_continue(&h, Version::HTTP_10, true));
        assert!(!expects_continue(&h, Version::HTTP_11, false));
        h.insert(header::EXPECT, "something".parse().unwrap());
        assert!(!expects_continue(&h, Version::HTTP_11, true));
    }
}
