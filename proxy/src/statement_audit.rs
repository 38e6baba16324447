//! Statement audit, the pure part: a state machine fed the bytes of an audited session as
//! they pass (client to server and back), which says what each statement was and how it
//! ended, and where the client's stream must wait for the log.
//!
//! No I/O and no tokio: [`StatementAudit::client`] and [`StatementAudit::server`] take byte
//! slices of any size, split anywhere, and return [`Event`]s through
//! [`StatementAudit::take_events`]. Memory is bounded whatever the peers send: a message body
//! is walked field by field and only the first [`MAX_TEXT_BYTES`] of a statement's text are
//! kept; result rows and COPY data are counted, never kept; the tables of prepared
//! statements and portals hold at most [`MAX_NAMES`] names of fewer than 64 bytes each, and
//! at most [`MAX_IN_FLIGHT`] requests may await an answer.
//!
//! # What is logged
//!
//! * A simple Query, a Parse and a FunctionCall are each a [`Event::Statement`]: the text
//!   (capped), its length, the number of parameter types a Parse declares. Parameter values
//!   (Bind) never leave this module: only their count.
//! * Every outcome is a [`Event::Result`] naming the statement by its `seq`: the command tag
//!   and row count of CommandComplete, the SQLSTATE of ErrorResponse (never its message,
//!   which can quote values), an empty query, a suspended portal; for COPY its direction
//!   and the bytes of CopyData that crossed. A Query with several statements has one result
//!   per statement (`index` 1, 2, …); an error ends the list, as it ends the Query.
//! * An execution of a prepared statement (Bind + Execute) is attributed to the Parse that
//!   PostgreSQL confirmed (ParseComplete) for that name before the Execute's outcome: the
//!   name tables are updated from the server's answers, not from what the client claims.
//!
//! # Gates
//!
//! The client messages that make PostgreSQL run something — Query, Parse (its text is what
//! a later Execute runs), Execute and FunctionCall — are gates: [`StatementAudit::client`]
//! stops at the end of such a message and says so, and the relay holds the message's last
//! byte until every line produced so far is durable. PostgreSQL acts on a message only once
//! it has all of it, so nothing runs before its text is in the log, and nothing runs after an
//! outcome the log does not have yet.

use std::collections::VecDeque;

/// Most bytes of a statement's text kept (cut at a character boundary).
pub const MAX_TEXT_BYTES: usize = 4096;

/// Prepared statement and portal names tracked per table; older ones are forgotten.
pub const MAX_NAMES: usize = 256;

/// Longest statement or portal name tracked; longer names are not followed, so their
/// executions have no `seq` (PostgreSQL may compare such names on a 63-byte prefix).
pub const MAX_NAME_BYTES: usize = 63;

/// Requests (Query, Parse, Bind, Execute, …) that may await the server's answer at once.
pub const MAX_IN_FLIGHT: usize = 16_384;

/// Command tags and SQLSTATEs are short; longer ones are cut.
const MAX_TAG_BYTES: usize = 64;

/// What a statement was sent as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Simple,
    Extended,
    Function,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Simple => "simple",
            Protocol::Extended => "extended",
            Protocol::Function => "function",
        }
    }
}

/// A COPY's direction, as the server announced it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyDirection {
    In,
    Out,
    Both,
}

impl CopyDirection {
    pub fn as_str(self) -> &'static str {
        match self {
            CopyDirection::In => "in",
            CopyDirection::Out => "out",
            CopyDirection::Both => "both",
        }
    }
}

/// How one statement (or one execution of a prepared one) ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// CommandComplete: the tag, and the row count when the tag ends in one.
    Complete { tag: String, rows: Option<u64> },
    /// ErrorResponse: its SQLSTATE.
    Error { sqlstate: String },
    /// EmptyQueryResponse.
    Empty,
    /// PortalSuspended: an Execute with a row limit stopped before the end.
    Suspended,
    /// FunctionCallResponse.
    FunctionResult,
}

/// What the audit reports, in the order it learned it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Statement {
        seq: u64,
        protocol: Protocol,
        /// The prepared statement's name (Parse only; "" is the unnamed one).
        name: Option<String>,
        /// The first [`MAX_TEXT_BYTES`] of the text, lossily UTF-8.
        text: String,
        /// The text's whole length in bytes.
        text_bytes: u64,
        truncated: bool,
        /// Parse: how many parameter types it declares.
        param_types: Option<u16>,
        /// FunctionCall: the function's OID.
        function_oid: Option<u32>,
    },
    Result {
        /// The statement this is the outcome of; None when no confirmed statement is known
        /// (an Execute of a portal PostgreSQL bound from an untracked name).
        seq: Option<u64>,
        /// 1-based statement index within a simple Query.
        index: Option<u32>,
        outcome: Outcome,
        /// Bind + Execute: how many parameter values were bound (never the values).
        params: Option<u16>,
        copy: Option<(CopyDirection, u64)>,
        /// An error reported for a Sync (e.g. a deferred constraint at the implicit commit).
        at_sync: bool,
    },
}

/// Why the audit can no longer follow the session (the relay ends it: fail closed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lost {
    /// More requests awaiting an answer than [`MAX_IN_FLIGHT`].
    TooManyInFlight,
    /// The server sent an answer to a request the audit does not know of.
    Unexpected(u8),
}

impl std::fmt::Display for Lost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Lost::TooManyInFlight => write!(
                f,
                "more than {MAX_IN_FLIGHT} requests await an answer in an audited session"
            ),
            Lost::Unexpected(tag) => write!(
                f,
                "the statement audit lost track of the protocol (server message {:?})",
                char::from(*tag)
            ),
        }
    }
}

/// A string field of a message body, walked as it passes.
#[derive(Debug, Default, Clone)]
struct Captured {
    kept: Vec<u8>,
    len: u64,
}

impl Captured {
    fn text(&self) -> String {
        // Cut at a character boundary: a multi-byte character split by the cap is dropped.
        match std::str::from_utf8(&self.kept) {
            Ok(s) => s.to_owned(),
            Err(e) if e.error_len().is_none() => {
                String::from_utf8_lossy(&self.kept[..e.valid_up_to()]).into_owned()
            }
            Err(_) => String::from_utf8_lossy(&self.kept).into_owned(),
        }
    }

    fn name(&self) -> Option<Vec<u8>> {
        (self.len as usize <= MAX_NAME_BYTES && self.kept.len() as u64 == self.len)
            .then(|| self.kept.clone())
    }
}

/// One step of a message body's layout.
#[derive(Debug, Clone, Copy)]
enum Want {
    /// A NUL-terminated string, keeping at most this many bytes.
    Str(usize),
    /// A big-endian 16-bit integer.
    I16,
    I32,
    /// One byte (Describe's and Close's 'S' / 'P').
    Byte,
    /// 2 × the last I16 bytes (Bind's parameter format codes).
    SkipLastI16Pairs,
    /// ErrorResponse's fields, (code byte, string) pairs up to a zero code; only the
    /// SQLSTATE (code 'C') is kept, never the message or detail (they can quote values).
    Fields,
}

const QUERY: &[Want] = &[Want::Str(MAX_TEXT_BYTES)];
const PARSE: &[Want] = &[
    Want::Str(MAX_NAME_BYTES + 1),
    Want::Str(MAX_TEXT_BYTES),
    Want::I16,
];
const BIND: &[Want] = &[
    Want::Str(MAX_NAME_BYTES + 1),
    Want::Str(MAX_NAME_BYTES + 1),
    Want::I16,
    Want::SkipLastI16Pairs,
    Want::I16,
];
const EXECUTE: &[Want] = &[Want::Str(MAX_NAME_BYTES + 1)];
const CLOSE: &[Want] = &[Want::Byte, Want::Str(MAX_NAME_BYTES + 1)];
const FUNCTION: &[Want] = &[Want::I32];
const COMMAND_COMPLETE: &[Want] = &[Want::Str(MAX_TAG_BYTES)];
const ERROR_RESPONSE: &[Want] = &[Want::Fields];

/// Walks one message body along a layout; what the layout does not name is skipped.
#[derive(Debug, Default)]
struct Walk {
    plan: &'static [Want],
    step: usize,
    strs: Vec<Captured>,
    ints: Vec<i64>,
    /// Bytes of the current integer read so far.
    int_buf: [u8; 4],
    int_have: usize,
    skip: u64,
    current: Captured,
    /// The code of the ErrorResponse field being read.
    code: Option<u8>,
    sqlstate: Captured,
}

impl Walk {
    fn new(plan: &'static [Want]) -> Self {
        Walk {
            plan,
            ..Walk::default()
        }
    }

    /// Consumes all of `bytes` (the body's next part).
    fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let Some(want) = self.plan.get(self.step).copied() else {
                return;
            };
            match want {
                Want::Str(keep) => match bytes.iter().position(|&b| b == 0) {
                    Some(nul) => {
                        self.take_str_part(&bytes[..nul], keep);
                        self.strs.push(std::mem::take(&mut self.current));
                        self.step += 1;
                        bytes = &bytes[nul + 1..];
                    }
                    None => {
                        self.take_str_part(bytes, keep);
                        return;
                    }
                },
                Want::I16 | Want::I32 | Want::Byte => {
                    let size = match want {
                        Want::I16 => 2,
                        Want::I32 => 4,
                        _ => 1,
                    };
                    let take = (size - self.int_have).min(bytes.len());
                    self.int_buf[self.int_have..self.int_have + take]
                        .copy_from_slice(&bytes[..take]);
                    self.int_have += take;
                    bytes = &bytes[take..];
                    if self.int_have == size {
                        let b = self.int_buf;
                        self.ints.push(match size {
                            2 => i64::from(i16::from_be_bytes([b[0], b[1]])),
                            4 => i64::from(u32::from_be_bytes(b)),
                            _ => i64::from(b[0]),
                        });
                        self.int_have = 0;
                        self.step += 1;
                        if let Some(Want::SkipLastI16Pairs) = self.plan.get(self.step) {
                            self.skip = 2 * self.ints.last().copied().unwrap_or(0).max(0) as u64;
                        }
                    }
                }
                Want::Fields => match self.code {
                    None => {
                        if bytes[0] == 0 {
                            self.step += 1;
                        } else {
                            self.code = Some(bytes[0]);
                        }
                        bytes = &bytes[1..];
                    }
                    Some(code) => {
                        let nul = bytes.iter().position(|&b| b == 0);
                        let part = &bytes[..nul.unwrap_or(bytes.len())];
                        if code == b'C' {
                            let room = MAX_TAG_BYTES.saturating_sub(self.sqlstate.kept.len());
                            self.sqlstate
                                .kept
                                .extend_from_slice(&part[..room.min(part.len())]);
                            self.sqlstate.len += part.len() as u64;
                        }
                        match nul {
                            Some(nul) => {
                                self.code = None;
                                bytes = &bytes[nul + 1..];
                            }
                            None => return,
                        }
                    }
                },
                Want::SkipLastI16Pairs => {
                    let take = self.skip.min(bytes.len() as u64);
                    self.skip -= take;
                    bytes = &bytes[take as usize..];
                    if self.skip == 0 {
                        self.step += 1;
                    }
                }
            }
        }
        // A skip of zero bytes is done without input.
        if let Some(Want::SkipLastI16Pairs) = self.plan.get(self.step) {
            if self.skip == 0 {
                self.step += 1;
            }
        }
    }

    fn take_str_part(&mut self, part: &[u8], keep: usize) {
        let room = keep.saturating_sub(self.current.kept.len());
        self.current
            .kept
            .extend_from_slice(&part[..room.min(part.len())]);
        self.current.len += part.len() as u64;
    }

    fn str(&self, i: usize) -> Option<&Captured> {
        self.strs.get(i)
    }

    /// The string being read when the body ended without its NUL (a malformed message):
    /// what was sent is still what is logged.
    fn str_or_partial(&self, i: usize) -> Captured {
        match self.strs.get(i) {
            Some(s) => s.clone(),
            None if i == self.strs.len() => self.current.clone(),
            None => Captured::default(),
        }
    }

    fn int(&self, i: usize) -> Option<i64> {
        self.ints.get(i).copied()
    }
}

/// Message framing of one direction: tag, length, and the body walked or skipped.
#[derive(Debug, Default)]
struct Framing {
    header: [u8; 5],
    header_len: usize,
    body_left: u64,
    tag: u8,
    /// The body's layout, for the messages whose fields matter.
    walk: Option<Walk>,
    /// A length below 4 went by: nothing after it is framed.
    lost: bool,
}

/// Where a framing step left off.
enum Framed {
    /// The bytes were consumed; the message is not over.
    More,
    /// A message ended after this many bytes of the input.
    End(usize),
}

impl Framing {
    /// Consumes bytes up to the end of the current message. `plan` chooses the layout of a
    /// message whose header just completed.
    fn step(
        &mut self,
        bytes: &[u8],
        plan: impl Fn(u8) -> Option<&'static [Want]>,
        on_header: impl FnOnce(u8, u64),
    ) -> Framed {
        let mut i = 0;
        if self.lost {
            return Framed::More;
        }
        if self.header_len < 5 {
            let take = (5 - self.header_len).min(bytes.len());
            self.header[self.header_len..self.header_len + take].copy_from_slice(&bytes[..take]);
            self.header_len += take;
            i += take;
            if self.header_len < 5 {
                return Framed::More;
            }
            let h = self.header;
            let len = u32::from_be_bytes([h[1], h[2], h[3], h[4]]);
            if len < 4 {
                self.lost = true;
                return Framed::More;
            }
            self.tag = h[0];
            self.body_left = u64::from(len - 4);
            self.walk = plan(self.tag).map(Walk::new);
            on_header(self.tag, self.body_left);
        }
        let take = self.body_left.min((bytes.len() - i) as u64) as usize;
        if let Some(walk) = &mut self.walk {
            walk.feed(&bytes[i..i + take]);
        }
        self.body_left -= take as u64;
        i += take;
        if self.body_left == 0 {
            self.header_len = 0;
            Framed::End(i)
        } else {
            Framed::More
        }
    }
}

/// A request awaiting the server's answer.
#[derive(Debug)]
enum Expect {
    Query {
        seq: u64,
        index: u32,
        copy: Option<CopyDirection>,
        copy_in: u64,
        copy_out: u64,
    },
    Parse {
        seq: u64,
        name: Option<Vec<u8>>,
    },
    Bind {
        portal: Option<Vec<u8>>,
        statement: Option<Vec<u8>>,
        params: Option<u16>,
    },
    Describe,
    Execute {
        portal: Option<Vec<u8>>,
        copy: Option<CopyDirection>,
        copy_in: u64,
        copy_out: u64,
    },
    Close {
        statement: bool,
        name: Option<Vec<u8>>,
    },
    Sync,
    Function {
        seq: u64,
    },
    /// The client's CopyDone or CopyFail: no answer of its own, it marks where a COPY's data
    /// ended in the client's stream (see `copy_in_started`).
    CopyEnd,
}

/// Names PostgreSQL confirmed, each with what it stands for; bounded, oldest forgotten.
#[derive(Debug, Default)]
struct Names<T> {
    entries: VecDeque<(Vec<u8>, T)>,
}

impl<T: Clone> Names<T> {
    fn get(&self, name: &[u8]) -> Option<T> {
        self.entries
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    }

    fn set(&mut self, name: Vec<u8>, value: T) {
        self.remove(&name);
        if self.entries.len() == MAX_NAMES {
            self.entries.pop_front();
        }
        self.entries.push_back((name, value));
    }

    fn remove(&mut self, name: &[u8]) {
        self.entries.retain(|(n, _)| n != name);
    }

    fn clear_named(&mut self) {
        self.entries.retain(|(n, _)| n.is_empty());
    }
}

/// The state machine of one audited session (see the module doc).
#[derive(Debug, Default)]
pub struct StatementAudit {
    client: Framing,
    server: Framing,
    expect: VecDeque<Expect>,
    /// After an error in the extended protocol PostgreSQL ignores everything up to Sync.
    skipping: bool,
    /// The server is in COPY FROM STDIN and the client has not ended its data yet: PostgreSQL
    /// ignores Sync (and Flush) meanwhile, so a Sync sent now gets no ReadyForQuery.
    client_in_copy: bool,
    /// Confirmed prepared statements: name → seq of their Parse.
    statements: Names<u64>,
    /// Confirmed portals: name → (seq of their statement, parameter values bound).
    portals: Names<(Option<u64>, Option<u16>)>,
    /// The last statement seq handed out.
    seq: u64,
    /// The seq of the last execution answered, for an error a Sync reports.
    last_executed: Option<u64>,
    events: Vec<Event>,
    lost: Option<Lost>,
}

fn tracked(name: Option<&Captured>) -> Option<Vec<u8>> {
    name.and_then(Captured::name)
}

fn client_plan(tag: u8) -> Option<&'static [Want]> {
    match tag {
        b'Q' => Some(QUERY),
        b'P' => Some(PARSE),
        b'B' => Some(BIND),
        b'E' => Some(EXECUTE),
        b'C' => Some(CLOSE),
        b'F' => Some(FUNCTION),
        _ => None,
    }
}

fn server_plan(tag: u8) -> Option<&'static [Want]> {
    match tag {
        b'C' => Some(COMMAND_COMPLETE),
        b'E' => Some(ERROR_RESPONSE),
        _ => None,
    }
}

/// The row count a command tag ends in (`INSERT 0 5`, `SELECT 3`, `COPY 2`), if any.
pub fn rows_of(tag: &str) -> Option<u64> {
    let mut words = tag.split(' ');
    let first = words.next()?;
    let last = tag.rsplit(' ').next()?;
    if first == last {
        return None;
    }
    last.parse().ok()
}

impl StatementAudit {
    pub fn new() -> Self {
        Self::default()
    }

    /// Why the audit lost the session, once it has; the relay then ends it.
    pub fn lost(&self) -> Option<&Lost> {
        self.lost.as_ref()
    }

    /// The events learned since the last call.
    pub fn take_events(&mut self) -> std::vec::Drain<'_, Event> {
        self.events.drain(..)
    }

    /// Client bytes. Returns how many were consumed and whether the last of them ends a
    /// gate message (then `bytes[consumed - 1]` must wait for the log, and the rest of
    /// `bytes` is to be fed again after it).
    pub fn client(&mut self, bytes: &[u8]) -> (usize, bool) {
        let mut i = 0;
        while i < bytes.len() {
            let expect_in = &mut self.expect;
            let framed = self.client.step(&bytes[i..], client_plan, |tag, body| {
                // CopyData counts towards the latest request that may be a COPY.
                if tag == b'd' {
                    if let Some(Expect::Query { copy_in, .. } | Expect::Execute { copy_in, .. }) =
                        expect_in
                            .iter_mut()
                            .rev()
                            .find(|e| matches!(e, Expect::Query { .. } | Expect::Execute { .. }))
                    {
                        *copy_in += body;
                    }
                }
            });
            match framed {
                Framed::More => return (bytes.len(), false),
                Framed::End(n) => {
                    i += n;
                    if self.client_message() {
                        return (i, true);
                    }
                }
            }
        }
        (i, false)
    }

    /// A whole client message went by; returns whether it is a gate.
    fn client_message(&mut self) -> bool {
        let tag = self.client.tag;
        let walk = self.client.walk.take().unwrap_or_default();
        let mut gate = false;
        let expect = match tag {
            b'Q' => {
                gate = true;
                let seq = self.statement(Protocol::Simple, None, &walk.str_or_partial(0));
                (!self.skipping).then_some(Expect::Query {
                    seq,
                    index: 0,
                    copy: None,
                    copy_in: 0,
                    copy_out: 0,
                })
            }
            b'P' => {
                gate = true;
                let name = walk.str(0).cloned().unwrap_or_default();
                let seq = self.statement(Protocol::Extended, Some(&name), &walk.str_or_partial(1));
                if let Some(Event::Statement { param_types, .. }) = self.events.last_mut() {
                    *param_types = walk.int(0).map(|n| n.clamp(0, i64::from(u16::MAX)) as u16);
                }
                Some(Expect::Parse {
                    seq,
                    name: tracked(walk.str(0)),
                })
            }
            b'B' => Some(Expect::Bind {
                portal: tracked(walk.str(0)),
                statement: tracked(walk.str(1)),
                params: walk.int(1).map(|n| n.clamp(0, i64::from(u16::MAX)) as u16),
            }),
            b'E' => {
                gate = true;
                Some(Expect::Execute {
                    portal: tracked(walk.str(0)),
                    copy: None,
                    copy_in: 0,
                    copy_out: 0,
                })
            }
            b'D' => Some(Expect::Describe),
            b'C' => Some(Expect::Close {
                statement: walk.int(0) == Some(i64::from(b'S')),
                name: tracked(walk.str(0)),
            }),
            b'S' if self.client_in_copy => None,
            b'S' => {
                self.skipping = false;
                Some(Expect::Sync)
            }
            b'c' | b'f' => {
                self.client_in_copy = false;
                Some(Expect::CopyEnd)
            }
            b'F' => {
                gate = true;
                self.seq += 1;
                let seq = self.seq;
                self.events.push(Event::Statement {
                    seq,
                    protocol: Protocol::Function,
                    name: None,
                    text: String::new(),
                    text_bytes: 0,
                    truncated: false,
                    param_types: None,
                    function_oid: walk.int(0).map(|n| n as u32),
                });
                (!self.skipping).then_some(Expect::Function { seq })
            }
            _ => None,
        };
        // While PostgreSQL skips to Sync it answers nothing but the Sync.
        if let Some(expect) = expect {
            if !self.skipping || matches!(expect, Expect::Sync | Expect::CopyEnd) {
                if self.expect.len() >= MAX_IN_FLIGHT {
                    self.lost.get_or_insert(Lost::TooManyInFlight);
                } else {
                    self.expect.push_back(expect);
                }
            }
        }
        gate
    }

    fn statement(&mut self, protocol: Protocol, name: Option<&Captured>, text: &Captured) -> u64 {
        self.seq += 1;
        self.events.push(Event::Statement {
            seq: self.seq,
            protocol,
            name: name.map(Captured::text),
            text: text.text(),
            text_bytes: text.len,
            truncated: text.len > text.kept.len() as u64,
            param_types: None,
            function_oid: None,
        });
        self.seq
    }

    /// Server bytes; never held.
    pub fn server(&mut self, bytes: &[u8]) {
        let mut i = 0;
        while i < bytes.len() {
            let expect = &mut self.expect;
            let framed = self.server.step(&bytes[i..], server_plan, |tag, body| {
                // CopyData from the server: a COPY TO's bytes.
                if tag == b'd' {
                    if let Some(Expect::Query { copy_out, .. } | Expect::Execute { copy_out, .. }) =
                        expect.front_mut()
                    {
                        *copy_out += body;
                    }
                }
            });
            match framed {
                Framed::More => return,
                Framed::End(n) => {
                    i += n;
                    self.server_message();
                }
            }
        }
    }

    fn unexpected(&mut self, tag: u8) {
        self.lost.get_or_insert(Lost::Unexpected(tag));
    }

    fn server_message(&mut self) {
        let tag = self.server.tag;
        let walk = self.server.walk.take();
        while let Some(Expect::CopyEnd) = self.expect.front() {
            self.expect.pop_front();
        }
        match tag {
            // Asynchronous: notices, parameter changes, notifications. Rows: counted by the tag.
            b'N' | b'S' | b'A' | b'D' | b'd' | b'c' => {}
            b'1' => match self.expect.pop_front() {
                Some(Expect::Parse { seq, name }) => {
                    if let Some(name) = name {
                        self.statements.set(name, seq);
                    }
                }
                _ => self.unexpected(tag),
            },
            b'2' => match self.expect.pop_front() {
                Some(Expect::Bind {
                    portal,
                    statement,
                    params,
                }) => {
                    if let Some(portal) = portal {
                        let seq = statement.and_then(|s| self.statements.get(&s));
                        self.portals.set(portal, (seq, params));
                    }
                }
                _ => self.unexpected(tag),
            },
            b'3' => match self.expect.pop_front() {
                Some(Expect::Close { statement, name }) => {
                    if let Some(name) = name {
                        if statement {
                            self.statements.remove(&name);
                        } else {
                            self.portals.remove(&name);
                        }
                    }
                }
                _ => self.unexpected(tag),
            },
            // ParameterDescription comes first of Describe's two answers.
            b't' if !matches!(self.expect.front(), Some(Expect::Describe)) => self.unexpected(tag),
            b't' => {}
            b'T' | b'n' => match self.expect.front() {
                Some(Expect::Describe) => {
                    self.expect.pop_front();
                }
                // A Query's rows are described before they come.
                Some(Expect::Query { .. }) if tag == b'T' => {}
                _ => self.unexpected(tag),
            },
            b'G' | b'H' | b'W' => {
                let direction = match tag {
                    b'G' => CopyDirection::In,
                    b'H' => CopyDirection::Out,
                    _ => CopyDirection::Both,
                };
                match self.expect.front_mut() {
                    Some(Expect::Query { copy, .. } | Expect::Execute { copy, .. }) => {
                        *copy = Some(direction);
                        if direction != CopyDirection::Out {
                            self.copy_in_started();
                        }
                    }
                    _ => self.unexpected(tag),
                }
            }
            b'C' => {
                let tag_text = walk
                    .as_ref()
                    .map(|w| w.str_or_partial(0).text())
                    .unwrap_or_default();
                let rows = rows_of(&tag_text);
                self.note_prepared_changes(&tag_text);
                self.outcome(
                    tag,
                    Outcome::Complete {
                        tag: tag_text,
                        rows,
                    },
                );
            }
            b'I' => self.outcome(tag, Outcome::Empty),
            b's' => self.outcome(tag, Outcome::Suspended),
            b'V' => match self.expect.front() {
                Some(Expect::Function { seq }) => {
                    let seq = *seq;
                    self.result(Some(seq), None, Outcome::FunctionResult, None, None);
                }
                _ => self.unexpected(tag),
            },
            b'E' => self.error(walk.map(|w| w.sqlstate.text()).unwrap_or_default()),
            b'Z' => match self.expect.pop_front() {
                Some(Expect::Query { .. } | Expect::Sync | Expect::Function { .. }) => {}
                _ => self.unexpected(tag),
            },
            _ => {}
        }
    }

    /// PostgreSQL reads the client's COPY data now and ignores the Syncs among it (libpq and
    /// tokio-postgres send one with the Execute, before they know it is a COPY): those the
    /// client sent before its CopyDone get no answer, nor do those it sends until then.
    fn copy_in_started(&mut self) {
        let mut i = 1;
        while i < self.expect.len() {
            match self.expect[i] {
                Expect::CopyEnd => return,
                Expect::Sync => {
                    self.expect.remove(i);
                }
                _ => i += 1,
            }
        }
        self.client_in_copy = true;
    }

    /// SQL's DEALLOCATE and DISCARD ALL drop prepared statements by a name the tag does not
    /// give: every named one is forgotten (executions of it then have no `seq`, rather than
    /// a wrong one).
    fn note_prepared_changes(&mut self, tag: &str) {
        if tag.starts_with("DEALLOCATE") || tag == "DISCARD ALL" {
            self.statements.clear_named();
            self.portals.clear_named();
        }
    }

    fn result(
        &mut self,
        seq: Option<u64>,
        index: Option<u32>,
        outcome: Outcome,
        params: Option<u16>,
        copy: Option<(CopyDirection, u64)>,
    ) {
        self.events.push(Event::Result {
            seq,
            index,
            outcome,
            params,
            copy,
            at_sync: false,
        });
    }

    /// CommandComplete, EmptyQueryResponse or PortalSuspended for the request in front.
    fn outcome(&mut self, tag: u8, outcome: Outcome) {
        match self.expect.front_mut() {
            Some(Expect::Query {
                seq,
                index,
                copy,
                copy_in,
                copy_out,
            }) if tag != b's' => {
                *index += 1;
                let (seq, index) = (*seq, *index);
                let copy = copy.take().map(|d| (d, copy_bytes(d, *copy_in, *copy_out)));
                (*copy_in, *copy_out) = (0, 0);
                self.last_executed = Some(seq);
                self.result(Some(seq), Some(index), outcome, None, copy);
            }
            Some(Expect::Execute { .. }) => {
                let Some(Expect::Execute {
                    portal,
                    copy,
                    copy_in,
                    copy_out,
                }) = self.expect.pop_front()
                else {
                    return;
                };
                let (seq, params) = portal
                    .and_then(|p| self.portals.get(&p))
                    .unwrap_or((None, None));
                self.last_executed = seq;
                let copy = copy.map(|d| (d, copy_bytes(d, copy_in, copy_out)));
                self.result(seq, None, outcome, params, copy);
            }
            _ => self.unexpected(tag),
        }
    }

    fn error(&mut self, sqlstate: String) {
        let outcome = Outcome::Error { sqlstate };
        match self.expect.front_mut() {
            // An error ends a simple Query's list; ReadyForQuery follows.
            Some(Expect::Query {
                seq,
                index,
                copy,
                copy_in,
                copy_out,
            }) => {
                *index += 1;
                let (seq, index) = (*seq, *index);
                let copy = copy.take().map(|d| (d, copy_bytes(d, *copy_in, *copy_out)));
                self.result(Some(seq), Some(index), outcome, None, copy);
            }
            Some(Expect::Function { seq }) => {
                let seq = *seq;
                self.result(Some(seq), None, outcome, None, None);
            }
            Some(Expect::Sync) => {
                self.events.push(Event::Result {
                    seq: self.last_executed,
                    index: None,
                    outcome,
                    params: None,
                    copy: None,
                    at_sync: true,
                });
            }
            // The extended protocol: the request in front failed, and PostgreSQL skips the
            // rest up to Sync.
            Some(_) => {
                match self.expect.pop_front() {
                    Some(Expect::Parse { seq, .. }) => {
                        self.result(Some(seq), None, outcome, None, None)
                    }
                    Some(Expect::Bind {
                        statement, params, ..
                    }) => {
                        let seq = statement.and_then(|s| self.statements.get(&s));
                        self.result(seq, None, outcome, params, None);
                    }
                    Some(Expect::Execute {
                        portal,
                        copy,
                        copy_in,
                        copy_out,
                    }) => {
                        let (seq, params) = portal
                            .and_then(|p| self.portals.get(&p))
                            .unwrap_or((None, None));
                        let copy = copy.map(|d| (d, copy_bytes(d, copy_in, copy_out)));
                        self.result(seq, None, outcome, params, copy);
                    }
                    _ => {}
                }
                while !matches!(self.expect.front(), None | Some(Expect::Sync)) {
                    self.expect.pop_front();
                }
                if self.expect.is_empty() {
                    self.skipping = true;
                }
            }
            // Nothing asked: a FATAL the server sends on its own (e.g. terminated by an
            // administrator). It closes the session; there is no statement to tie it to.
            None => {}
        }
    }
}

fn copy_bytes(direction: CopyDirection, copy_in: u64, copy_out: u64) -> u64 {
    match direction {
        CopyDirection::In => copy_in,
        CopyDirection::Out => copy_out,
        CopyDirection::Both => copy_in + copy_out,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    fn cstr(s: &str) -> Vec<u8> {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        v
    }

    fn query(text: &str) -> Vec<u8> {
        msg(b'Q', &cstr(text))
    }

    fn parse(name: &str, text: &str, types: u16) -> Vec<u8> {
        let mut b = cstr(name);
        b.extend(cstr(text));
        b.extend(types.to_be_bytes());
        for _ in 0..types {
            b.extend(23u32.to_be_bytes());
        }
        msg(b'P', &b)
    }

    fn bind(portal: &str, statement: &str, values: &[&str]) -> Vec<u8> {
        let mut b = cstr(portal);
        b.extend(cstr(statement));
        b.extend(1u16.to_be_bytes());
        b.extend(0u16.to_be_bytes());
        b.extend((values.len() as u16).to_be_bytes());
        for v in values {
            b.extend((v.len() as u32).to_be_bytes());
            b.extend(v.as_bytes());
        }
        b.extend(0u16.to_be_bytes());
        msg(b'B', &b)
    }

    fn execute(portal: &str) -> Vec<u8> {
        let mut b = cstr(portal);
        b.extend(0u32.to_be_bytes());
        msg(b'E', &b)
    }

    fn sync() -> Vec<u8> {
        msg(b'S', b"")
    }

    fn complete(tag: &str) -> Vec<u8> {
        msg(b'C', &cstr(tag))
    }

    fn error(sqlstate: &str, message: &str) -> Vec<u8> {
        let mut b = vec![b'S'];
        b.extend(cstr("ERROR"));
        b.push(b'C');
        b.extend(cstr(sqlstate));
        b.push(b'M');
        b.extend(cstr(message));
        b.push(0);
        msg(b'E', &b)
    }

    fn ready() -> Vec<u8> {
        msg(b'Z', b"I")
    }

    fn cat(parts: &[Vec<u8>]) -> Vec<u8> {
        parts.concat()
    }

    /// Feeds the client stream in `chunk`-sized pieces, re-feeding after each gate as the
    /// relay does; returns the gate positions (offsets just after each gate message).
    fn feed_client(a: &mut StatementAudit, stream: &[u8], chunk: usize) -> Vec<usize> {
        let mut gates = Vec::new();
        let mut pos = 0;
        for part in stream.chunks(chunk.max(1)) {
            let mut off = 0;
            while off < part.len() {
                let (n, gate) = a.client(&part[off..]);
                off += n;
                if gate {
                    gates.push(pos + off);
                }
            }
            pos += part.len();
        }
        gates
    }

    fn feed_server(a: &mut StatementAudit, stream: &[u8], chunk: usize) {
        for part in stream.chunks(chunk.max(1)) {
            a.server(part);
        }
    }

    fn results(events: &[Event]) -> Vec<(Option<u64>, Option<u32>, Outcome)> {
        events
            .iter()
            .filter_map(|e| match e {
                Event::Result {
                    seq,
                    index,
                    outcome,
                    ..
                } => Some((*seq, *index, outcome.clone())),
                _ => None,
            })
            .collect()
    }

    fn ok(tag: &str, rows: Option<u64>) -> Outcome {
        Outcome::Complete {
            tag: tag.into(),
            rows,
        }
    }

    /// One session: the client's stream, then the server's, both split at every size.
    fn run(client: &[u8], server: &[u8], check: impl Fn(&[Event], &[usize])) {
        for chunk in 1..=client.len().max(server.len()) {
            let mut a = StatementAudit::new();
            let gates = feed_client(&mut a, client, chunk);
            feed_server(&mut a, server, chunk);
            assert_eq!(a.lost(), None, "chunk size {chunk}");
            let events: Vec<Event> = a.take_events().collect();
            check(&events, &gates);
        }
    }

    #[test]
    fn a_simple_query_is_one_statement_with_its_tag_at_any_split() {
        let client = query("CREATE TABLE t (id int)");
        let server = cat(&[complete("CREATE TABLE"), ready()]);
        run(&client, &server, |events, gates| {
            assert_eq!(gates, [client.len()], "the Query is a gate at its end");
            assert!(
                matches!(&events[0], Event::Statement { seq: 1, protocol: Protocol::Simple, text, truncated: false, text_bytes: 23, .. } if text == "CREATE TABLE t (id int)")
            );
            assert_eq!(
                results(events),
                [(Some(1), Some(1), ok("CREATE TABLE", None))]
            );
        });
    }

    #[test]
    fn a_query_of_several_statements_has_one_result_each_until_an_error() {
        let client = query("select 1; insert into t values (1); select nope; select 2");
        let row_desc = msg(b'T', &[0, 0]);
        let server = cat(&[
            row_desc.clone(),
            msg(b'D', &[0, 1, 0, 0, 0, 1, b'1']),
            complete("SELECT 1"),
            complete("INSERT 0 1"),
            error("42703", "column \"nope\" does not exist"),
            ready(),
        ]);
        run(&client, &server, |events, _| {
            assert_eq!(
                results(events),
                [
                    (Some(1), Some(1), ok("SELECT 1", Some(1))),
                    (Some(1), Some(2), ok("INSERT 0 1", Some(1))),
                    (
                        Some(1),
                        Some(3),
                        Outcome::Error {
                            sqlstate: "42703".into()
                        }
                    ),
                ]
            );
        });
    }

    #[test]
    fn an_execute_is_tied_to_its_parse_and_parameter_values_are_never_kept() {
        let client = cat(&[
            parse("s0", "INSERT INTO t VALUES ($1) RETURNING id", 1),
            msg(b'D', &cat(&[vec![b'S'], cstr("s0")])),
            sync(),
            bind("", "s0", &["hunter2-secret"]),
            execute(""),
            sync(),
        ]);
        let server = cat(&[
            msg(b'1', b""),
            msg(b't', &[0, 1, 0, 0, 0, 23]),
            msg(b'T', &[0, 0]),
            ready(),
            msg(b'2', b""),
            msg(b'D', &[0, 1, 0, 0, 0, 1, b'7']),
            complete("INSERT 0 1"),
            ready(),
        ]);
        let parse_end = parse("s0", "INSERT INTO t VALUES ($1) RETURNING id", 1).len();
        run(&client, &server, |events, gates| {
            assert_eq!(
                gates,
                [parse_end, client.len() - 5],
                "Parse and Execute are gates"
            );
            assert!(
                matches!(&events[0], Event::Statement { seq: 1, protocol: Protocol::Extended, name: Some(n), param_types: Some(1), .. } if n == "s0")
            );
            let last = events.last().unwrap();
            assert!(
                matches!(
                    last,
                    Event::Result {
                        seq: Some(1),
                        params: Some(1),
                        outcome: Outcome::Complete { rows: Some(1), .. },
                        ..
                    }
                ),
                "{last:?}"
            );
            assert!(!format!("{events:?}").contains("hunter2"));
        });
    }

    #[test]
    fn copy_in_and_out_count_their_bytes() {
        let client = cat(&[
            query("COPY t FROM STDIN"),
            msg(b'd', b"1\n2\n"),
            msg(b'd', b"3\n"),
            msg(b'c', b""),
            query("COPY t TO STDOUT"),
        ]);
        let server = cat(&[
            msg(b'G', &[0, 0, 0]),
            complete("COPY 3"),
            ready(),
            msg(b'H', &[0, 0, 0]),
            msg(b'd', b"1\n"),
            msg(b'd', b"2\n"),
            msg(b'd', b"3\n"),
            msg(b'c', b""),
            complete("COPY 3"),
            ready(),
        ]);
        run(&client, &server, |events, _| {
            let copies: Vec<_> = events
                .iter()
                .filter_map(|e| match e {
                    Event::Result { copy, .. } => *copy,
                    _ => None,
                })
                .collect();
            assert_eq!(copies, [(CopyDirection::In, 6), (CopyDirection::Out, 6)]);
        });
    }

    /// tokio-postgres's copy_in: Bind, Execute and Sync at once, then the data, CopyDone and
    /// another Sync. PostgreSQL ignores the first Sync inside the COPY.
    #[test]
    fn syncs_inside_an_extended_copy_in_are_not_answered() {
        let client = cat(&[
            parse("s0", "COPY t FROM STDIN", 0),
            sync(),
            bind("", "s0", &[]),
            execute(""),
            sync(),
            msg(b'd', b"1\n2\n"),
            msg(b'c', b""),
            sync(),
            query("select 1"),
        ]);
        let server = cat(&[
            msg(b'1', b""),
            ready(),
            msg(b'2', b""),
            msg(b'G', &[0, 0, 0]),
            complete("COPY 2"),
            ready(),
            complete("SELECT 1"),
            ready(),
        ]);
        // The server's answers may come before or after the client's later messages.
        for split in [0usize, 3, 4] {
            let server_first: Vec<u8> = cat(&[
                msg(b'1', b""),
                ready(),
                msg(b'2', b""),
                msg(b'G', &[0, 0, 0]),
            ]);
            let mut a = StatementAudit::new();
            let parts = [
                parse("s0", "COPY t FROM STDIN", 0),
                sync(),
                bind("", "s0", &[]),
                execute(""),
                sync(),
                msg(b'd', b"1\n2\n"),
                msg(b'c', b""),
                sync(),
                query("select 1"),
            ];
            feed_client(&mut a, &cat(&parts[..split + 5]), 1000);
            feed_server(&mut a, &server_first, 1000);
            feed_client(&mut a, &cat(&parts[split + 5..]), 1000);
            feed_server(&mut a, &server[server_first.len()..], 1000);
            assert_eq!(a.lost(), None, "split {split}");
            let events: Vec<Event> = a.take_events().collect();
            assert_eq!(
                results(&events),
                [
                    (Some(1), None, ok("COPY 2", Some(2))),
                    (Some(2), Some(1), ok("SELECT 1", Some(1)))
                ],
                "split {split}"
            );
        }
        run(&client, &server, |events, _| {
            assert_eq!(results(events).len(), 2);
        });
    }

    #[test]
    fn after_an_extended_error_the_skipped_requests_get_no_result() {
        let client = cat(&[
            parse("", "selec 1", 0),
            bind("", "", &[]),
            execute(""),
            sync(),
            query("select 1"),
        ]);
        let server = cat(&[
            error("42601", "syntax error"),
            ready(),
            complete("SELECT 1"),
            ready(),
        ]);
        run(&client, &server, |events, _| {
            assert_eq!(
                results(events),
                [
                    (
                        Some(1),
                        None,
                        Outcome::Error {
                            sqlstate: "42601".into()
                        }
                    ),
                    (Some(2), Some(1), ok("SELECT 1", Some(1))),
                ]
            );
        });
    }

    /// The attack: re-parse a live name with other text in a pipeline and execute it.
    /// PostgreSQL refuses the duplicate and runs the first text; so does the audit.
    #[test]
    fn an_execution_is_attributed_to_the_parse_postgresql_confirmed() {
        let client = cat(&[
            parse("s1", "DELETE FROM t", 0),
            sync(),
            parse("s1", "SELECT 1", 0),
            sync(),
            bind("", "s1", &[]),
            execute(""),
            sync(),
        ]);
        let server = cat(&[
            msg(b'1', b""),
            ready(),
            error("42P05", "prepared statement \"s1\" already exists"),
            ready(),
            msg(b'2', b""),
            complete("DELETE 4"),
            ready(),
        ]);
        run(&client, &server, |events, _| {
            let r = results(events);
            assert_eq!(r.last().unwrap(), &(Some(1), None, ok("DELETE 4", Some(4))));
        });
        // After SQL's DEALLOCATE the name is forgotten: no seq rather than a wrong one.
        let client = cat(&[
            parse("s1", "SELECT 1", 0),
            sync(),
            query("DEALLOCATE s1; PREPARE s1 AS DELETE FROM t"),
            bind("", "s1", &[]),
            execute(""),
            sync(),
        ]);
        let server = cat(&[
            msg(b'1', b""),
            ready(),
            complete("DEALLOCATE"),
            complete("PREPARE"),
            ready(),
            msg(b'2', b""),
            complete("DELETE 4"),
            ready(),
        ]);
        run(&client, &server, |events, _| {
            let r = results(events);
            assert_eq!(r.last().unwrap(), &(None, None, ok("DELETE 4", Some(4))));
        });
    }

    #[test]
    fn a_huge_statement_keeps_only_its_cap_and_passes_in_pieces() {
        let text = "x".repeat(3 * 1024 * 1024);
        let client = query(&text);
        let mut a = StatementAudit::new();
        let gates = feed_client(&mut a, &client, 16 * 1024);
        assert_eq!(gates, [client.len()]);
        let events: Vec<Event> = a.take_events().collect();
        match &events[0] {
            Event::Statement {
                text: kept,
                text_bytes,
                truncated,
                ..
            } => {
                assert_eq!(kept.len(), MAX_TEXT_BYTES);
                assert_eq!(*text_bytes, text.len() as u64);
                assert!(*truncated);
            }
            other => panic!("{other:?}"),
        }
        // A cut inside a multi-byte character drops the character, never splits it.
        let mut a = StatementAudit::new();
        let text = format!("{}é{}", "a".repeat(MAX_TEXT_BYTES - 1), "b".repeat(10));
        a.client(&query(&text));
        let first = a.take_events().next();
        match first {
            Some(Event::Statement { text, .. }) => {
                assert_eq!(text.len(), MAX_TEXT_BYTES - 1);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn hostile_lengths_and_garbage_never_panic_or_grow() {
        // A header claiming 2 GiB: the body streams, nothing is buffered.
        let mut a = StatementAudit::new();
        let mut header = vec![b'Q'];
        header.extend(0x7fff_ffffu32.to_be_bytes());
        assert_eq!(a.client(&header), (5, false));
        for _ in 0..64 {
            assert_eq!(a.client(&[b'a'; 16 * 1024]), (16 * 1024, false));
        }
        // A length below 4: PostgreSQL closes; nothing after it is framed or gated.
        let mut a = StatementAudit::new();
        assert_eq!(a.client(&[b'Q', 0, 0, 0, 3]), (5, false));
        let q = query("select 1");
        assert_eq!(a.client(&q), (q.len(), false));
        // Deterministic noise both ways.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut noise = vec![0u8; 200_000];
        for b in noise.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        for chunk in [1usize, 7, 4096] {
            let mut a = StatementAudit::new();
            feed_client(&mut a, &noise, chunk);
            feed_server(&mut a, &noise, chunk);
            let _ = a.take_events().count();
            assert!(a.expect.len() <= MAX_IN_FLIGHT);
        }
        // A malformed Query (no NUL) is still logged with what it said.
        let mut a = StatementAudit::new();
        let (_, gate) = a.client(&msg(b'Q', b"drop table t"));
        assert!(gate);
        assert!(
            matches!(a.take_events().next(), Some(Event::Statement { text, .. }) if text == "drop table t")
        );
    }

    #[test]
    fn too_many_requests_in_flight_loses_the_session() {
        let mut a = StatementAudit::new();
        let one = sync();
        for _ in 0..=MAX_IN_FLIGHT {
            a.client(&one);
        }
        assert_eq!(a.lost(), Some(&Lost::TooManyInFlight));
        assert_eq!(a.expect.len(), MAX_IN_FLIGHT);
    }

    #[test]
    fn an_answer_to_nothing_loses_the_session() {
        let mut a = StatementAudit::new();
        a.server(&complete("DROP TABLE"));
        assert_eq!(a.lost(), Some(&Lost::Unexpected(b'C')));
        // Notices and a FATAL nobody asked for are not.
        let mut a = StatementAudit::new();
        a.server(&msg(b'N', &[0]));
        a.server(&error("57P01", "terminating connection"));
        assert_eq!(a.lost(), None);
    }

    #[test]
    fn row_counts_come_from_the_tags_last_number() {
        assert_eq!(rows_of("INSERT 0 5"), Some(5));
        assert_eq!(rows_of("SELECT 3"), Some(3));
        assert_eq!(rows_of("CREATE TABLE"), None);
        assert_eq!(rows_of("BEGIN"), None);
        assert_eq!(rows_of(""), None);
    }
}
