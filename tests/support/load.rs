//! A closed-loop load for tests: keep-alive clients and fresh-connection clients that send
//! `GET /whoami` back to back and count every answer that is not a 200.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::http::{get, Conn};

/// No load runs longer than this, whatever the test does.
const MAX_RUN: Duration = Duration::from_secs(120);

#[derive(Debug, Default)]
pub struct Tally {
    pub ok: u64,
    pub failed: u64,
    /// The first few failures, for the assertion message.
    pub failures: Vec<String>,
}

impl Tally {
    fn fail(&mut self, what: String) {
        self.failed += 1;
        if self.failures.len() < 10 {
            self.failures.push(what);
        }
    }

    fn add(&mut self, other: Tally) {
        self.ok += other.ok;
        self.failed += other.failed;
        self.failures.extend(other.failures.into_iter().take(10));
    }
}

pub struct Load {
    stop: Arc<AtomicBool>,
    clients: Vec<JoinHandle<Tally>>,
}

impl Load {
    /// Starts `keep_alive` clients that reuse one connection each and `fresh` clients that
    /// open a connection per request.
    pub fn start(addr: SocketAddr, keep_alive: usize, fresh: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let mut clients = Vec::new();
        for _ in 0..keep_alive {
            let stop = Arc::clone(&stop);
            clients.push(std::thread::spawn(move || {
                let mut tally = Tally::default();
                let started = Instant::now();
                let mut conn = None;
                while !stop.load(Ordering::Relaxed) && started.elapsed() < MAX_RUN {
                    if conn.is_none() {
                        match Conn::open(addr) {
                            Ok(c) => conn = Some(c),
                            Err(e) => {
                                tally.fail(format!("connect: {e}"));
                                continue;
                            }
                        }
                    }
                    let Some(c) = conn.as_mut() else { continue };
                    match c.get("/whoami") {
                        Ok(r) if r.status == 200 => {
                            tally.ok += 1;
                            // As every HTTP/1.1 client must: no further request on a
                            // connection the server said it closes (RFC 9112, 9.6).
                            if r.header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close")) {
                                conn = None;
                            }
                        }
                        Ok(r) => tally.fail(format!("{} {}", r.status, r.text().trim())),
                        Err(e) => {
                            tally.fail(format!("keep-alive request: {e}"));
                            conn = None;
                        }
                    }
                }
                tally
            }));
        }
        for _ in 0..fresh {
            let stop = Arc::clone(&stop);
            clients.push(std::thread::spawn(move || {
                let mut tally = Tally::default();
                let started = Instant::now();
                while !stop.load(Ordering::Relaxed) && started.elapsed() < MAX_RUN {
                    match get(addr, "/whoami") {
                        Ok(r) if r.status == 200 => tally.ok += 1,
                        Ok(r) => tally.fail(format!("{} {}", r.status, r.text().trim())),
                        Err(e) => tally.fail(format!("fresh request: {e}")),
                    }
                }
                tally
            }));
        }
        Load { stop, clients }
    }

    /// Stops the clients and adds up what they saw.
    pub fn finish(self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = Tally::default();
        for client in self.clients {
            match client.join() {
                Ok(tally) => total.add(tally),
                Err(_) => total.fail("a load client panicked".into()),
            }
        }
        total
    }
}
