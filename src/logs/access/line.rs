//! One access log line: what the request head says, kept from its arrival ([`Pending`]), and
//! the line written at the response's end into the shard's buffer.
//!
//! Cheap on purpose (callgrind, `benches/callgrind.py`): at the head, the method, target,
//! referer, user agent and request id are escaped at once into one small buffer of the
//! `Pending` (no `Uri` or header value is cloned, so nothing pins hyper's read buffer and
//! nothing is allocated but that buffer); at the end the line is assembled from slices and
//! digits written by hand (no `fmt` machinery); escaping finds the next byte to escape by table
//! and copies the runs between. The log is referred to by a `&'static` (the logs live as long
//! as the process), so no reference count shared by every CPU is touched per request.

use std::cell::RefCell;
use std::io::Write as _;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::mpsc::TrySendError;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http::{HeaderValue, Request, Version};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::{AccessLog, Msg, BATCH, FLUSH_EVERY, WARN_EVERY};
use crate::config::AccessLogFormat;
use crate::logs::files::{civil_from_days, Zone};
use crate::proxy::forward::Peer;

/// The fields taken from the request head, escaped for the log's format, in this order.
const METHOD: usize = 0;
const TARGET: usize = 1;
const REFERER: usize = 2;
const USER_AGENT: usize = 3;
const REQUEST_ID: usize = 4;
const FIELDS: usize = 5;

/// A response's line, from its request's head until its end.
#[derive(Debug)]
pub struct Pending {
    pub(super) log: &'static AccessLog,
    arrived: Instant,
    pub(super) time: SystemTime,
    client: IpAddr,
    version: Version,
    /// The fields, escaped (JSON strings with their quotes), one after the other.
    text: Vec<u8>,
    /// Where each field ends in `text`; `None` for a header the request did not have.
    ends: [Option<u32>; FIELDS],
    /// The status sent, set once the response head is known.
    pub status: u16,
}

impl Pending {
    /// The line of `req` from `peer`, whose head arrived at `arrived`, with its request id.
    pub fn new<B>(
        log: &'static AccessLog,
        req: &Request<B>,
        peer: &Peer,
        arrived: Instant,
        request_id: Option<HeaderValue>,
    ) -> Pending {
        let headers = req.headers();
        let referer = headers.get(http::header::REFERER).map(HeaderValue::as_bytes);
        let user_agent = headers.get(http::header::USER_AGENT).map(HeaderValue::as_bytes);
        let id = request_id.as_ref().map(HeaderValue::as_bytes);
        let uri = req.uri();
        let absolute;
        let target: &[u8] = if req.version() != Version::HTTP_2 && uri.scheme().is_some() {
            // An absolute-form target of HTTP/1.1 is shown whole.
            absolute = uri.to_string();
            absolute.as_bytes()
        } else {
            uri.path_and_query().map_or(b"/", |p| p.as_str().as_bytes())
        };
        let method = req.method().as_str().as_bytes();
        let fields: [Option<&[u8]>; FIELDS] = [Some(method), Some(target), referer, user_agent, id];
        let size: usize = fields.iter().flatten().map(|f| f.len() + 2).sum();
        let mut text = Vec::with_capacity(size + 8);
        let mut ends = [None; FIELDS];
        for (end, field) in ends.iter_mut().zip(fields) {
            if let Some(bytes) = field {
                match log.format {
                    AccessLogFormat::Combined => escape_combined(&mut text, bytes),
                    AccessLogFormat::Json => escape_json(&mut text, bytes),
                }
                *end = u32::try_from(text.len()).ok();
            }
        }
        Pending {
            log,
            arrived,
            time: SystemTime::now(),
            client: peer.ip,
            version: req.version(),
            text,
            ends,
            status: 0,
        }
    }

    /// Field `index` as escaped, if the request had it.
    fn field(&self, index: usize) -> Option<&[u8]> {
        let end = self.ends[index]? as usize;
        let start = self.ends[..index]
            .iter()
            .rev()
            .flatten()
            .next()
            .map_or(0, |&e| e as usize);
        self.text.get(start..end)
    }

    /// The response ended after `sent` body bytes, from the worker of `slot` (none: corral
    /// answered): the line goes to this shard's buffer.
    pub fn finish(self: Box<Self>, sent: u64, slot: Option<usize>) {
        let duration = self.arrived.elapsed();
        // A body dropped while the thread's storage is being torn down loses its line.
        let _torn_down = LOCAL.try_with(|local| {
            let Ok(mut local) = local.try_borrow_mut() else {
                return;
            };
            local.append(&self, sent, slot, duration);
        });
    }
}

/// What a thread (a shard) holds for the writer.
#[derive(Default)]
struct Local {
    buffers: Vec<Buffer>,
    /// Local time and UTC.
    clocks: [Clock; 2],
    /// Lines lost since the last warning, and when that was.
    lost: u64,
    warned: Option<Instant>,
}

/// The lines of one file waiting on one thread.
struct Buffer {
    /// The log they belong to, compared by address (two apps sharing a file have a buffer
    /// each).
    log: &'static AccessLog,
    lines: Vec<u8>,
    count: u64,
    since: Instant,
}

thread_local! {
    static LOCAL: RefCell<Local> = RefCell::new(Local::default());
}

impl Local {
    fn append(&mut self, line: &Pending, sent: u64, slot: Option<usize>, duration: Duration) {
        let index = match self.buffers.iter().position(|b| std::ptr::eq(b.log, line.log)) {
            Some(index) => index,
            None => {
                self.buffers.push(Buffer {
                    log: line.log,
                    lines: Vec::with_capacity(BATCH + 1024),
                    count: 0,
                    since: Instant::now(),
                });
                self.buffers.len() - 1
            }
        };
        let buffer = &mut self.buffers[index];
        if buffer.count == 0 {
            buffer.since = line.arrived + duration;
        }
        let clock = &mut self.clocks[usize::from(line.log.zone == Zone::Utc)];
        match line.log.format {
            AccessLogFormat::Combined => combined(&mut buffer.lines, clock, line, sent, slot, duration),
            AccessLogFormat::Json => json(&mut buffer.lines, clock, line, sent, slot, duration),
        }
        buffer.count += 1;
        if buffer.lines.len() >= BATCH || buffer.since.elapsed() >= FLUSH_EVERY {
            self.send(index);
        }
    }

    /// Hands buffer `index` to the writer, or counts its lines lost.
    fn send(&mut self, index: usize) {
        let buffer = &mut self.buffers[index];
        if buffer.count == 0 {
            return;
        }
        let count = std::mem::take(&mut buffer.count);
        let lines = std::mem::replace(&mut buffer.lines, Vec::with_capacity(BATCH + 1024));
        let drops = Arc::clone(&buffer.log.drops);
        let batch = Msg::Batch {
            file: buffer.log.file,
            lines,
            count,
            drops,
        };
        match buffer.log.tx.try_send(batch) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                buffer.log.drops.fetch_add(count, Ordering::Relaxed);
                self.lost += count;
                if self.warned.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
                    let path = buffer.log.path.display();
                    warn!(path = %path, lines = self.lost, shard = crate::shards::current(), "access log: lines dropped, the writer does not keep up (slow or full disk?)");
                    self.warned = Some(Instant::now());
                    self.lost = 0;
                }
            }
        }
    }

    fn send_all(&mut self) {
        for index in 0..self.buffers.len() {
            self.send(index);
        }
    }
}

/// Hands everything this thread holds to the writer.
pub fn flush_local() {
    let _torn_down = LOCAL.try_with(|local| {
        if let Ok(mut local) = local.try_borrow_mut() {
            local.send_all();
        }
    });
}

/// On a shard until `stop`: every [`FLUSH_EVERY`], hands over what the shard holds (so the
/// lines of an idle shard are never more than that late).
pub async fn flush_every(stop: CancellationToken) {
    let mut every = tokio::time::interval(FLUSH_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = every.tick() => flush_local(),
        }
    }
    flush_local();
}

/// The time of the last second formatted, per thread and zone: formatting (and looking up the
/// local offset) happens once a second.
#[derive(Default)]
struct Clock {
    second: u64,
    /// `10/Oct/2000:13:55:36 +0530`
    combined: [u8; 26],
    /// `2000-10-10T13:55:36`
    iso: [u8; 19],
    /// `+05:30`, or `Z` at offset zero.
    iso_offset: String,
}

impl Clock {
    fn at(&mut self, time: SystemTime, zone: Zone) -> (&[u8; 26], &[u8; 19], &str, u32) {
        let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
        let second = since.as_secs();
        if second != self.second || self.iso[0] == 0 {
            self.second = second;
            let offset = zone.offset(time);
            let local = second as i64 + i64::from(offset);
            let (year, month, day) = civil_from_days(local.div_euclid(86_400));
            let of_day = local.rem_euclid(86_400);
            let (hour, minute, sec) = (of_day / 3600, (of_day / 60) % 60, of_day % 60);
            let sign = if offset < 0 { '-' } else { '+' };
            let (off_h, off_m) = (offset.unsigned_abs() / 3600, (offset.unsigned_abs() / 60) % 60);
            // RFC 3339 either way; `Z` whenever the offset is zero, as before local time.
            self.iso_offset = if offset == 0 {
                "Z".to_owned()
            } else {
                format!("{sign}{off_h:02}:{off_m:02}")
            };
            const MONTHS: [&str; 12] = [
                "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
            ];
            let month_name = MONTHS[(month as usize).saturating_sub(1) % 12];
            let mut combined = &mut self.combined[..];
            // Writing into a buffer of exactly the right size cannot fail for years 0..=9999.
            let _ = write!(
                combined,
                "{day:02}/{month_name}/{year:04}:{hour:02}:{minute:02}:{sec:02} {sign}{off_h:02}{off_m:02}"
            );
            let mut iso = &mut self.iso[..];
            let _ = write!(iso, "{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{sec:02}");
        }
        (&self.combined, &self.iso, &self.iso_offset, since.subsec_millis())
    }
}

fn protocol(version: Version) -> &'static [u8] {
    match version {
        Version::HTTP_09 => b"HTTP/0.9",
        Version::HTTP_10 => b"HTTP/1.0",
        Version::HTTP_11 => b"HTTP/1.1",
        Version::HTTP_2 => b"HTTP/2.0",
        Version::HTTP_3 => b"HTTP/3.0",
        _ => b"HTTP/?",
    }
}

/// "00" to "99": two digits per division.
const PAIRS: &[u8; 200] = b"\
0001020304050607080910111213141516171819\
2021222324252627282930313233343536373839\
4041424344454647484950515253545556575859\
6061626364656667686970717273747576777879\
8081828384858687888990919293949596979899";

/// `n` in decimal, at least `width` digits (zeros in front; `width` at most 20).
fn push_padded(out: &mut Vec<u8>, mut n: u64, width: usize) {
    let mut digits = [b'0'; 20];
    let mut at = digits.len();
    while n >= 100 {
        let pair = (n % 100) as usize * 2;
        n /= 100;
        at -= 2;
        digits[at..at + 2].copy_from_slice(&PAIRS[pair..pair + 2]);
    }
    if n >= 10 {
        let pair = n as usize * 2;
        at -= 2;
        digits[at..at + 2].copy_from_slice(&PAIRS[pair..pair + 2]);
    } else {
        at -= 1;
        digits[at] = b'0' + n as u8;
    }
    let from = at.min(digits.len() - width.min(digits.len()));
    out.extend_from_slice(&digits[from..]);
}

/// `n` in decimal.
fn push_u64(out: &mut Vec<u8>, n: u64) {
    push_padded(out, n, 1);
}

/// The client address as text: IPv4 by hand (the common case), IPv6 through `Display`.
fn push_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                push_u64(out, u64::from(octet));
            }
        }
        IpAddr::V6(v6) => {
            // Writing to a Vec cannot fail.
            let _ = write!(out, "{v6}");
        }
    }
}

/// One `combined` line.
fn combined(out: &mut Vec<u8>, clock: &mut Clock, line: &Pending, sent: u64, slot: Option<usize>, duration: Duration) {
    let (time, _, _, _) = clock.at(line.time, line.log.zone);
    out.reserve(line.text.len() + 160);
    push_ip(out, line.client);
    out.extend_from_slice(b" - - [");
    out.extend_from_slice(time);
    out.extend_from_slice(b"] \"");
    out.extend_from_slice(line.field(METHOD).unwrap_or(b"-"));
    out.push(b' ');
    out.extend_from_slice(line.field(TARGET).unwrap_or(b"/"));
    out.push(b' ');
    out.extend_from_slice(protocol(line.version));
    out.extend_from_slice(b"\" ");
    push_u64(out, u64::from(line.status));
    out.push(b' ');
    push_u64(out, sent);
    out.extend_from_slice(b" \"");
    out.extend_from_slice(line.field(REFERER).unwrap_or(b"-"));
    out.extend_from_slice(b"\" \"");
    out.extend_from_slice(line.field(USER_AGENT).unwrap_or(b"-"));
    out.extend_from_slice(b"\" rt=");
    push_u64(out, duration.as_secs());
    out.push(b'.');
    push_padded(out, u64::from(duration.subsec_micros()), 6);
    out.extend_from_slice(b" slot=");
    match slot {
        Some(slot) => push_u64(out, slot as u64),
        None => out.push(b'-'),
    }
    out.extend_from_slice(b" id=");
    out.extend_from_slice(line.field(REQUEST_ID).unwrap_or(b"-"));
    out.push(b'\n');
}

/// Bytes `combined` writes as they are: printable ASCII but `"` and `\`.
const fn plain_table() -> [bool; 256] {
    let mut table = [false; 256];
    let mut b = 0x20;
    while b < 0x7f {
        table[b] = b != b'"' as usize && b != b'\\' as usize;
        b += 1;
    }
    table
}

static PLAIN: [bool; 256] = plain_table();

/// nginx's escaping: `"`, `\`, bytes below 0x20 and from 0x7f become `\xHH`.
pub fn escape_combined(out: &mut Vec<u8>, mut bytes: &[u8]) {
    loop {
        let run = bytes
            .iter()
            .position(|&b| !PLAIN[usize::from(b)])
            .unwrap_or(bytes.len());
        out.extend_from_slice(&bytes[..run]);
        let Some(&b) = bytes.get(run) else { return };
        out.extend_from_slice(&[b'\\', b'x', HEX[usize::from(b >> 4)], HEX[usize::from(b & 0xf)]]);
        bytes = &bytes[run + 1..];
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// One `json` line.
fn json(out: &mut Vec<u8>, clock: &mut Clock, line: &Pending, sent: u64, slot: Option<usize>, duration: Duration) {
    let (_, iso, offset, millis) = clock.at(line.time, line.log.zone);
    out.reserve(line.text.len() + line.log.app_json.len() + 220);
    out.extend_from_slice(b"{\"time\":\"");
    out.extend_from_slice(iso);
    out.push(b'.');
    push_padded(out, u64::from(millis), 3);
    out.extend_from_slice(offset.as_bytes());
    out.extend_from_slice(b"\",\"app\":");
    out.extend_from_slice(&line.log.app_json);
    out.extend_from_slice(b",\"client\":\"");
    push_ip(out, line.client);
    out.extend_from_slice(b"\",\"method\":");
    out.extend_from_slice(line.field(METHOD).unwrap_or(b"null"));
    out.extend_from_slice(b",\"target\":");
    out.extend_from_slice(line.field(TARGET).unwrap_or(b"\"/\""));
    out.extend_from_slice(b",\"protocol\":\"");
    out.extend_from_slice(protocol(line.version));
    out.extend_from_slice(b"\",\"status\":");
    push_u64(out, u64::from(line.status));
    out.extend_from_slice(b",\"bytes\":");
    push_u64(out, sent);
    out.extend_from_slice(b",\"duration_ms\":");
    push_u64(out, duration.as_millis() as u64);
    out.push(b'.');
    push_padded(out, u64::from(duration.subsec_micros() % 1000), 3);
    out.extend_from_slice(b",\"slot\":");
    match slot {
        Some(slot) => push_u64(out, slot as u64),
        None => out.extend_from_slice(b"null"),
    }
    for (key, index) in [
        (&b",\"request_id\":"[..], REQUEST_ID),
        (b",\"user_agent\":", USER_AGENT),
        (b",\"referer\":", REFERER),
    ] {
        out.extend_from_slice(key);
        out.extend_from_slice(line.field(index).unwrap_or(b"null"));
    }
    out.extend_from_slice(b"}\n");
}

/// `bytes` as a JSON string, quotes included. UTF-8 text keeps its characters (with `"`, `\`,
/// controls, DEL, U+2028 and U+2029 escaped); other bytes are read as Latin-1, so every byte
/// from 0x80 becomes `\u00HH`. The output is always one line of valid JSON.
pub fn escape_json(out: &mut Vec<u8>, bytes: &[u8]) {
    out.push(b'"');
    let run = bytes
        .iter()
        .position(|&b| !PLAIN[usize::from(b)])
        .unwrap_or(bytes.len());
    out.extend_from_slice(&bytes[..run]);
    if run < bytes.len() {
        escape_json_slow(out, bytes, run);
    }
    out.push(b'"');
}

/// The rest of [`escape_json`], from the first byte that needs a look (`from`).
fn escape_json_slow(out: &mut Vec<u8>, bytes: &[u8], from: usize) {
    let escaped = |out: &mut Vec<u8>, c: u32| {
        out.extend_from_slice(b"\\u");
        for shift in [12, 8, 4, 0] {
            out.push(HEX[((c >> shift) & 0xf) as usize]);
        }
    };
    match std::str::from_utf8(bytes) {
        Ok(text) => {
            for c in text[from..].chars() {
                match c {
                    '"' => out.extend_from_slice(b"\\\""),
                    '\\' => out.extend_from_slice(b"\\\\"),
                    '\n' => out.extend_from_slice(b"\\n"),
                    '\r' => out.extend_from_slice(b"\\r"),
                    '\t' => out.extend_from_slice(b"\\t"),
                    c if (c as u32) < 0x20 || c == '\u{7f}' || c == '\u{2028}' || c == '\u{2029}' => {
                        escaped(out, c as u32)
                    }
                    c => {
                        let mut utf8 = [0u8; 4];
                        out.extend_from_slice(c.encode_utf8(&mut utf8).as_bytes());
                    }
                }
            }
        }
        Err(_) => {
            for &b in &bytes[from..] {
                match b {
                    b'"' => out.extend_from_slice(b"\\\""),
                    b'\\' => out.extend_from_slice(b"\\\\"),
                    b if PLAIN[usize::from(b)] => out.push(b),
                    b => escaped(out, u32::from(b)),
                }
            }
        }
    }
}

#[cfg(test)]
#[path = "line_tests.rs"]
mod tests;
