//! Connection limits and file descriptors (issue 11, item 2): corral at the edge keeps serving
//! when clients try to exhaust it, and never blames a worker for its own limits.

mod support;

use std::error::Error;
use std::io::{ErrorKind, Read};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::process::Command;

use support::http::Conn;
use support::{poll_until, Corral, Options, PortHold, TestResult, DEADLINE};

/// Starts corral on `options` with `setup` applied to its command, and waits for its workers.
fn start_with(options: Options, setup: impl FnOnce(&mut Command)) -> Result<Corral, Box<dyn Error>> {
    support::require_node();
    let hold = PortHold::new()?;
    let corral = Corral::spawn_with(&options.config_text(hold.addr), hold.addr, setup)?;
    corral.wait_online(options.instances)?;
    hold.release();
    Ok(corral)
}

/// corral on one CPU (one proxy thread), so per-shard limits are the app's limits.
fn one_shard(command: &mut Command) {
    // SAFETY: only a system call between fork and exec.
    unsafe {
        command.pre_exec(|| {
            let mut cpus = nix::sched::CpuSet::new();
            cpus.set(0).map_err(std::io::Error::from)?;
            nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &cpus).map_err(std::io::Error::from)
        });
    }
}

/// corral with at most `limit` open files (soft and hard), on one proxy thread.
fn fd_limited(limit: u64) -> impl FnOnce(&mut Command) {
    move |command| {
        one_shard(command);
        // SAFETY: only a system call between fork and exec.
        unsafe {
            command.pre_exec(move || {
                nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, limit, limit)
                    .map_err(std::io::Error::from)
            });
        }
    }
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// True once `stream` has bytes to read (a response arrived), without waiting.
fn answered(stream: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    stream.set_nonblocking(true).expect("nonblocking");
    let ready = match stream.peek(&mut byte) {
        Ok(n) => n > 0,
        Err(e) => e.kind() != ErrorKind::WouldBlock,
    };
    stream.set_nonblocking(false).expect("blocking");
    ready
}

#[test]
fn running_out_of_file_descriptors_is_a_503_and_never_takes_a_worker_out_of_rotation() -> TestResult {
    // Enough connections allowed that the fd limit, not max_connections, is what runs out.
    let corral = start_with(
        Options::default().instances(1).key("max_connections = 1000"),
        fd_limited(96),
    )?;
    let pid = corral.pid();
    let idle = open_fds(pid);
    // A client connected before the pressure (no request yet, so no pooled worker connection).
    let mut early = Conn::open(corral.addr)?;
    poll_until(DEADLINE, "the early connection to be accepted", || {
        (open_fds(pid) > idle).then_some(())
    })?;
    // Take every descriptor corral has left: those it cannot accept wait in the backlog.
    let hogs: Vec<TcpStream> = (0..120)
        .map(|_| TcpStream::connect(corral.addr))
        .collect::<Result<_, _>>()?;
    poll_until(DEADLINE, "corral to run out of descriptors", || {
        (open_fds(pid) >= 96).then_some(())
    })
    .map_err(|e| corral.explain(e))?;

    let refused = early.get("/whoami")?;
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert!(
        !refused.text().contains("127.0.0.1:"),
        "no worker address: {}",
        refused.text()
    );

    drop(hogs);
    let served = poll_until(DEADLINE, "corral to answer again", || {
        let mut conn = Conn::open(corral.addr).ok()?;
        conn.get("/whoami").ok().filter(|r| r.status == 200)
    })
    .map_err(|e| corral.explain(e))?;
    assert_eq!(served.json()["slot"], "0");
    assert_eq!(early.get("/whoami")?.status, 200, "the early client is served too");
    let workers = corral.workers()?;
    assert_eq!(workers[0]["state"], "online", "{workers:?}");
    assert_eq!(workers[0]["restarts"], 0, "{workers:?}");
    Ok(())
}

#[test]
fn at_max_connections_new_clients_wait_in_the_backlog_until_a_slot_frees() -> TestResult {
    let corral = start_with(Options::default().instances(1).key("max_connections = 2"), one_shard)?;
    let mut waiting: Vec<Conn> = Vec::new();
    for _ in 0..5 {
        let mut conn = Conn::open(corral.addr)?;
        conn.send("GET", "/whoami", &[], &[])?;
        waiting.push(conn);
    }
    let mut served = 0;
    while !waiting.is_empty() {
        let expect = waiting.len().min(2);
        let ready = poll_until(DEADLINE, "the admitted clients' responses", || {
            let ready: Vec<usize> = (0..waiting.len())
                .filter(|&i| waiting[i].try_clone_stream().is_ok_and(|s| answered(&s)))
                .collect();
            (ready.len() >= expect).then_some(ready)
        })
        .map_err(|e| corral.explain(e))?;
        assert_eq!(
            ready.len(),
            expect,
            "no more than max_connections clients are served at once"
        );
        for i in ready.into_iter().rev() {
            let mut conn = waiting.remove(i);
            assert_eq!(conn.read_response()?.status, 200);
            served += 1;
            // Closing frees the slot for a client still in the backlog.
        }
    }
    assert_eq!(served, 5);
    Ok(())
}

#[test]
fn a_client_over_max_connections_per_ip_gets_503_and_the_others_are_unaffected() -> TestResult {
    let corral = Corral::start(Options::default().key("max_connections_per_ip = 2"))?;
    let mut first = Conn::open(corral.addr)?;
    let mut second = Conn::open(corral.addr)?;
    assert_eq!(first.get("/whoami")?.status, 200);
    assert_eq!(second.get("/whoami")?.status, 200);

    let mut third = Conn::open(corral.addr)?;
    let refused = third.get("/whoami")?;
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert_eq!(refused.header("connection"), Some("close"));
    let mut rest = Vec::new();
    third.try_clone_stream()?.read_to_end(&mut rest)?;
    assert!(rest.is_empty(), "the refused connection is closed");

    assert_eq!(second.get("/whoami")?.status, 200, "admitted connections keep working");
    drop(first);
    poll_until(DEADLINE, "a slot of this address to free up", || {
        let mut conn = Conn::open(corral.addr).ok()?;
        conn.get("/whoami").ok().filter(|r| r.status == 200)
    })
    .map_err(|e| corral.explain(e))?;
    Ok(())
}

#[test]
fn idle_worker_connections_are_closed_even_when_no_request_comes() -> TestResult {
    let corral = Corral::start(Options::default().instances(1))?;
    let pid = corral.pid();
    let idle = open_fds(pid);
    // Ten requests at once: ten connections to the worker, pooled once they are answered.
    let clients: Vec<Conn> = (0..10)
        .map(|_| {
            let mut conn = Conn::open(corral.addr)?;
            conn.send("GET", "/slow?ms=300", &[], &[])?;
            Ok(conn)
        })
        .collect::<std::io::Result<_>>()?;
    for mut conn in clients {
        assert_eq!(conn.read_response()?.text(), "slow done");
    }
    // The clients are gone; what is left is corral's pool. With no further request it must
    // still close them (Node closes its side after 5 s; nothing may sit in CLOSE_WAIT).
    poll_until(DEADLINE, "the pooled worker connections to be closed", || {
        (open_fds(pid) <= idle + 1).then_some(())
    })
    .map_err(|e| corral.explain(format!("{e}: {} fds open, {idle} before", open_fds(pid)).into()))?;
    Ok(())
}
