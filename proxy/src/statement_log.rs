//! An audited session's statement lines: the [`StatementAudit`]'s events become
//! decision-log entries (`statement`, `statement_result`) written through the same
//! [`AuditLog`] (same chain, same group commit), and the relay's [`Audit`] hook holds the
//! client's stream at each gate until every line so far is durable.
//!
//! Only sessions that are audited build an [`Auditor`]; every other session's relay runs
//! with [`crate::relay::NoAudit`] and pays nothing.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use serde_json::{json, Value};

use crate::audit::{AuditError, AuditLog, Entry};
use crate::relay::{Audit, EndReason};
use crate::statement_audit::{Event, Outcome, StatementAudit};

type Writing = Pin<Box<dyn Future<Output = Result<(), AuditError>> + Send>>;

/// Lines on their way to the log at once, at most; beyond it the relay waits (back-pressure
/// from a slow disk reaches the client, never memory).
const MAX_WRITING: usize = 256;

/// The statement audit of one session, as the relay drives it.
pub struct Auditor {
    machine: StatementAudit,
    log: AuditLog,
    /// Every line's fixed fields (conn_id, peer, identity, role, database).
    template: Entry,
    writing: VecDeque<Writing>,
    /// Client bytes waiting for the log; the first `held_parsed` of them were already fed
    /// to the machine (the last byte of a gate message).
    held: Vec<u8>,
    held_parsed: usize,
    failed: Option<EndReason>,
}

impl std::fmt::Debug for Auditor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auditor")
            .field("writing", &self.writing.len())
            .field("held", &self.held.len())
            .finish_non_exhaustive()
    }
}

impl Auditor {
    /// `template` carries the fields every line repeats; its event and extra are replaced.
    pub fn new(log: AuditLog, template: Entry) -> Self {
        Auditor {
            machine: StatementAudit::new(),
            log,
            template,
            writing: VecDeque::new(),
            held: Vec::new(),
            held_parsed: 0,
            failed: None,
        }
    }

    /// Waits for every line still being written (before the session_end line).
    pub async fn finish(&mut self) -> Result<(), EndReason> {
        self.queue_events();
        std::future::poll_fn(|cx| self.poll_lines(cx)).await
    }

    /// Turns the machine's new events into lines on their way.
    fn queue_events(&mut self) {
        let events: Vec<Event> = self.machine.take_events().collect();
        for event in events {
            let entry = self.entry(event);
            let log = self.log.clone();
            self.writing
                .push_back(Box::pin(async move { log.record(entry).await }));
        }
        if let Some(lost) = self.machine.lost() {
            self.failed.get_or_insert(EndReason::AuditFailed {
                message: lost.to_string(),
            });
        }
    }

    fn entry(&self, event: Event) -> Entry {
        let mut entry = self.template.clone();
        match event {
            Event::Statement {
                seq,
                protocol,
                name,
                text,
                text_bytes,
                truncated,
                param_types,
                function_oid,
            } => {
                entry.event = "statement";
                let x = &mut entry.extra;
                x.insert("seq".into(), json!(seq));
                x.insert("protocol".into(), json!(protocol.as_str()));
                if let Some(name) = name {
                    x.insert("statement_name".into(), json!(name));
                }
                if let Some(oid) = function_oid {
                    x.insert("function_oid".into(), json!(oid));
                } else {
                    x.insert("text".into(), json!(text));
                    x.insert("text_bytes".into(), json!(text_bytes));
                    x.insert("truncated".into(), json!(truncated));
                }
                if let Some(n) = param_types {
                    x.insert("param_types".into(), json!(n));
                }
            }
            Event::Result {
                seq,
                index,
                outcome,
                params,
                copy,
                at_sync,
            } => {
                entry.event = "statement_result";
                let x = &mut entry.extra;
                x.insert("seq".into(), seq.map_or(Value::Null, |s| json!(s)));
                if let Some(index) = index {
                    x.insert("index".into(), json!(index));
                }
                let (name, tag, rows, sqlstate) = match outcome {
                    Outcome::Complete { tag, rows } => ("ok", Some(tag), rows, None),
                    Outcome::Error { sqlstate } => ("error", None, None, Some(sqlstate)),
                    Outcome::Empty => ("empty", None, None, None),
                    Outcome::Suspended => ("suspended", None, None, None),
                    Outcome::FunctionResult => ("ok", None, None, None),
                };
                x.insert("outcome".into(), json!(name));
                if let Some(tag) = tag {
                    x.insert("tag".into(), json!(tag));
                }
                if let Some(rows) = rows {
                    x.insert("rows".into(), json!(rows));
                }
                if let Some(sqlstate) = sqlstate {
                    x.insert("sqlstate".into(), json!(sqlstate));
                }
                if let Some(params) = params {
                    x.insert("params".into(), json!(params));
                }
                if let Some((direction, bytes)) = copy {
                    x.insert("copy_direction".into(), json!(direction.as_str()));
                    x.insert("copy_bytes".into(), json!(bytes));
                }
                if at_sync {
                    x.insert("at_sync".into(), json!(true));
                }
            }
        }
        entry
    }

    fn failure(err: &AuditError) -> EndReason {
        tracing::error!(%err, "statement audit line not written; ending the audited session");
        EndReason::AuditFailed {
            message: "the statement audit log cannot be written; an audited session cannot go on"
                .into(),
        }
    }
}

impl Audit for Auditor {
    const ACTIVE: bool = true;

    fn client_bytes(&mut self, bytes: &[u8]) -> usize {
        let (n, gate) = self.machine.client(bytes);
        self.queue_events();
        if !gate {
            return bytes.len();
        }
        // The gate message's last byte, and whatever follows it, wait.
        self.held = bytes[n - 1..].to_vec();
        self.held_parsed = 1;
        n - 1
    }

    fn server_bytes(&mut self, bytes: &[u8]) {
        self.machine.server(bytes);
        self.queue_events();
    }

    fn holding(&self) -> bool {
        !self.held.is_empty()
    }

    fn poll_release(&mut self, cx: &mut Context<'_>) -> Poll<Result<Vec<u8>, EndReason>> {
        std::task::ready!(self.poll_lines(cx))?;
        let mut held = std::mem::take(&mut self.held);
        let parsed = std::mem::take(&mut self.held_parsed);
        let (n, gate) = self.machine.client(&held[parsed..]);
        self.queue_events();
        if gate {
            let cut = parsed + n - 1;
            self.held = held.split_off(cut);
            self.held_parsed = 1;
        }
        Poll::Ready(Ok(held))
    }

    fn poll_lines(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), EndReason>> {
        if let Some(reason) = &self.failed {
            return Poll::Ready(Err(reason.clone()));
        }
        // Each future enqueues its line when first polled: poll them in order. Only the
        // first MAX_WRITING are started; the rest wait their turn.
        let mut i = 0;
        while i < self.writing.len().min(MAX_WRITING) {
            match self.writing[i].as_mut().poll(cx) {
                Poll::Ready(Ok(())) => {
                    let _ = self.writing.remove(i);
                }
                Poll::Ready(Err(err)) => {
                    let reason = Self::failure(&err);
                    self.writing.clear();
                    self.failed = Some(reason.clone());
                    return Poll::Ready(Err(reason));
                }
                Poll::Pending => i += 1,
            }
        }
        if self.writing.is_empty() {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }

    fn drop_held(&mut self) -> usize {
        let n = self.held.len().saturating_sub(self.held_parsed);
        // The already-parsed gate byte was never sent either.
        let n = n + self.held_parsed.min(self.held.len());
        self.held = Vec::new();
        self.held_parsed = 0;
        n
    }
}
