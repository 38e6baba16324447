//! The `eastwall audit report` page: decision-log lines and signals in, one bounded, self-contained HTML page out, every log string escaped.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::{self, Display, Write as _};
use std::hash::Hash;

use eastwall_detect::{Signal, Time};
use serde_json::{Map, Value};

/// Most identities (left) and most databases/roles (right) drawn in the flow graph.
pub const MAX_NODES: usize = 24;
/// Most edges drawn in the flow graph.
pub const MAX_EDGES: usize = 60;
/// Rows in each top-talker table.
pub const MAX_ROWS: usize = 15;
/// Signals listed and drawn on the timeline; the rest are counted as not shown.
pub const MAX_SIGNALS_SHOWN: usize = 300;
/// Distinct signals held while reading; more are only counted.
pub const MAX_SIGNALS_KEPT: usize = 5_000;
/// Distinct keys each tally (identities, sources, targets, flows) tracks; a line whose key
/// would be one more is counted as untracked. So a hostile log bounds memory as well as the page.
pub const MAX_KEYS: usize = 250_000;
/// Longest string kept from a line, in characters (the log itself caps fields at 1 KiB).
const KEPT_CHARS: usize = 160;
/// Longest short text (a signal's name or kind, a count) shown; the full text is in a tooltip.
const LABEL_CHARS: usize = 40;
/// Longest node label in the graph, cut in the middle; the full text is in its tooltip.
const NODE_CHARS: usize = 46;
/// Items of each evidence list shown per signal.
const EVIDENCE_ITEMS: usize = 12;
/// Timeline rows: the five known signals and other names by count; the rest share `other`.
const MAX_TIMELINE_ROWS: usize = 8;
/// Distinct `event` names counted in the header; the rest are `other`.
const MAX_EVENT_NAMES: usize = 24;

/// The known signals, in the order the timeline draws them, with their colours.
const SIGNAL_COLOURS: [(&str, &str); 5] = [
    ("new_flow", "#2563eb"),
    ("shared_admin", "#9333ea"),
    ("odd_hour", "#0891b2"),
    ("credential_anomaly", "#dc2626"),
    ("fan_out", "#ea580c"),
];
const OTHER_COLOUR: &str = "#6b7280";

/// The events that carry one connection's admission decision.
const FLOW_EVENTS: [&str; 4] = ["connect", "mfa_challenge", "mfa_failure", "mfa_lockout"];

/// What the page says about where its lines came from.
#[derive(Clone, Debug, Default)]
pub struct Header {
    /// The files read, in order.
    pub files: Vec<String>,
    /// How the chain was checked, e.g. `verified: intact, last hash 2603…`.
    pub chain: String,
}

/// One page in one pass: feed every line with [`Report::line`] and every replayed signal with
/// [`Report::signal`], then [`Report::render`]. Memory is bounded by [`MAX_KEYS`] and
/// [`MAX_SIGNALS_KEPT`], the page by [`MAX_NODES`], [`MAX_EDGES`], [`MAX_ROWS`] and
/// [`MAX_SIGNALS_SHOWN`].
#[derive(Debug, Default)]
pub struct Report {
    lines: u64,
    /// Lines that are not a JSON object.
    not_objects: u64,
    first: Option<Time>,
    last: Option<Time>,
    events: BTreeMap<String, u64>,
    identities: Tally<String>,
    sources: Tally<String>,
    targets: Tally<String>,
    flows: Tally<(String, String)>,
    findings: Vec<Finding>,
    seen: HashMap<FindingKey, usize>,
    findings_dropped: u64,
}

/// Renders the page for these lines and the signals the detectors found in them; the
/// `signal` lines already in the log are merged in, one entry per (signal, kind, subject, time).
pub fn render(header: &Header, lines: &[Value], detected: &[Signal]) -> String {
    let mut report = Report::new();
    for line in lines {
        report.line(line);
    }
    for signal in detected {
        report.signal(signal);
    }
    report.render(header)
}

impl Report {
    pub fn new() -> Report {
        Report::default()
    }

    /// Counts one decision-log line. Any JSON is accepted: missing fields and wrong types
    /// count as absent, never as an error.
    pub fn line(&mut self, line: &Value) {
        self.lines += 1;
        let Some(obj) = line.as_object() else {
            self.not_objects += 1;
            return;
        };
        if let Some(t) = text(obj, "ts").and_then(|s| Time::parse_rfc3339(&s)) {
            self.first = Some(self.first.map_or(t, |f| f.min(t)));
            self.last = Some(self.last.map_or(t, |l| l.max(t)));
        }
        let event = text(obj, "event").unwrap_or_else(|| "(none)".into());
        let name = if self.events.len() < MAX_EVENT_NAMES || self.events.contains_key(&event) {
            event.clone()
        } else {
            "other".into()
        };
        *self.events.entry(name).or_default() += 1;
        if event == "signal" {
            if let Some(f) = Finding::from_json(obj, Origin::Log) {
                self.add_finding(f);
            }
            return;
        }
        if event == "refusals_summary" {
            // Refusals counted per source rather than written one by one.
            if let Some(source) = text(obj, "source") {
                let n = obj.get("suppressed").and_then(Value::as_u64).unwrap_or(0);
                self.sources.add(source, Decision::Deny, n);
            }
            return;
        }
        let decision = match text(obj, "decision").as_deref() {
            Some("allow") => Decision::Allow,
            Some("deny") => Decision::Deny,
            Some("challenge") => Decision::Challenge,
            _ => return,
        };
        if !FLOW_EVENTS.contains(&event.as_str()) {
            return;
        }
        let identity = text(obj, "spiffe_id")
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| NO_IDENTITY.into());
        let source = text(obj, "peer")
            .map(|p| source_ip(&p))
            .unwrap_or_else(|| "(no address)".into());
        let target = target_label(text(obj, "database"), text(obj, "db_user"));
        self.identities.add(identity.clone(), decision, 1);
        self.sources.add(source, decision, 1);
        self.targets.add(target.clone(), decision, 1);
        self.flows.add((identity, target), decision, 1);
    }

    /// Adds a signal the detectors raised over these lines.
    pub fn signal(&mut self, signal: &Signal) {
        if let Value::Object(obj) = signal.to_json() {
            if let Some(f) = Finding::from_json(&obj, Origin::Replay) {
                self.add_finding(f);
            }
        }
    }

    /// Lines counted so far.
    pub fn lines(&self) -> u64 {
        self.lines
    }

    /// Distinct signals so far (after de-duplication), including any not kept.
    pub fn signals(&self) -> u64 {
        self.findings.len() as u64 + self.findings_dropped
    }

    fn add_finding(&mut self, f: Finding) {
        let key = f.key();
        if let Some(&i) = self.seen.get(&key) {
            let kept = &mut self.findings[i];
            kept.in_log |= f.in_log;
            kept.replayed |= f.replayed;
            return;
        }
        if self.findings.len() >= MAX_SIGNALS_KEPT {
            self.findings_dropped += 1;
            return;
        }
        self.seen.insert(key, self.findings.len());
        self.findings.push(f);
    }

    /// The whole page.
    pub fn render(&self, header: &Header) -> String {
        let mut findings: Vec<&Finding> = self.findings.iter().collect();
        findings.sort_by(|a, b| {
            (a.time, &a.name, &a.kind, &a.subject).cmp(&(b.time, &b.name, &b.kind, &b.subject))
        });
        let hidden_findings =
            findings.len().saturating_sub(MAX_SIGNALS_SHOWN) as u64 + self.findings_dropped;
        findings.truncate(MAX_SIGNALS_SHOWN);

        let mut page = String::with_capacity(64 * 1024);
        page.push_str(HEAD);
        self.header(&mut page, header);
        self.graph(&mut page, &findings);
        timeline(&mut page, &findings, hidden_findings);
        self.talkers(&mut page);
        signal_list(&mut page, &findings, hidden_findings);
        page.push_str(
            "<footer><p>Written by <code>eastwall audit report</code>. Every name, address and \
             reason on this page is text from the log, shown escaped; the page loads nothing \
             and runs no script.</p></footer>\n</body>\n</html>\n",
        );
        page
    }

    fn header(&self, page: &mut String, header: &Header) {
        page.push_str("<header>\n<h1>Eastwall decision log report</h1>\n<dl class=\"facts\">\n");
        let files: Vec<String> = header
            .files
            .iter()
            .take(20)
            .map(|f| format!("<code>{}</code>", Clip(f, 200)))
            .collect();
        let more = header.files.len().saturating_sub(20);
        let _ = write!(page, "<dt>Files</dt><dd id=\"files\">{}", files.join(", "));
        if more > 0 {
            let _ = write!(page, " and {more} more");
        }
        page.push_str("</dd>\n");
        let span = match (self.first, self.last) {
            (Some(f), Some(l)) => format!(
                "{} to {} ({})",
                Esc(&f.to_string()),
                Esc(&l.to_string()),
                duration(l.0.saturating_sub(f.0))
            ),
            _ => "no line with a readable time".into(),
        };
        let _ = writeln!(page, "<dt>Time span</dt><dd id=\"span\">{span}</dd>");
        let mut events: Vec<(&String, &u64)> = self.events.iter().collect();
        events.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        let events: Vec<String> = events
            .iter()
            .map(|(e, n)| format!("{} {}", Clip(e, LABEL_CHARS), num(**n)))
            .collect();
        let _ = write!(page, "<dt>Lines</dt><dd id=\"lines\">{}", num(self.lines));
        if !events.is_empty() {
            let _ = write!(page, " <small>({})</small>", events.join(", "));
        }
        if self.not_objects > 0 {
            let _ = write!(page, "; {} not a JSON object", num(self.not_objects));
        }
        page.push_str("</dd>\n");
        let _ = writeln!(
            page,
            "<dt>Chain</dt><dd id=\"chain\">{}</dd>",
            Clip(&header.chain, 300)
        );
        let mut by_name: BTreeMap<&str, u64> = BTreeMap::new();
        for f in &self.findings {
            *by_name.entry(&f.name).or_default() += 1;
        }
        let mut names: Vec<(&str, u64)> = by_name.into_iter().collect();
        names.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        let names: Vec<String> = names
            .iter()
            .take(MAX_TIMELINE_ROWS)
            .map(|(n, c)| format!("{} {}", Clip(n, LABEL_CHARS), num(*c)))
            .collect();
        let _ = write!(
            page,
            "<dt>Signals</dt><dd id=\"signal-count\">{}",
            num(self.signals())
        );
        if !names.is_empty() {
            let _ = write!(page, " <small>({})</small>", names.join(", "));
        }
        page.push_str("</dd>\n</dl>\n</header>\n");
    }

    fn graph(&self, page: &mut String, findings: &[&Finding]) {
        page.push_str(
            "<section id=\"flows-section\">\n<h2>Flows: identities to databases and roles</h2>\n",
        );
        let named: HashSet<&str> = findings
            .iter()
            .flat_map(|f| {
                f.identities
                    .iter()
                    .map(String::as_str)
                    .chain([f.subject.as_str()])
            })
            .collect();
        let (left, left_more) = pick(&self.identities, |id, c| {
            c.deny > 0 || named.contains(id.as_str())
        });
        let (right, right_more) = pick(&self.targets, |_, c| c.deny > 0);
        let row_of =
            |nodes: &[(&String, Counts)], key: &String| nodes.iter().position(|(k, _)| *k == key);
        let mut edges: Vec<(usize, usize, Decision, u64)> = Vec::new();
        let mut all_edges = 0u64;
        for ((id, target), c) in &self.flows.map {
            let (l, r) = (row_of(&left, id), row_of(&right, target));
            for d in Decision::ALL {
                let n = c.get(d);
                if n == 0 {
                    continue;
                }
                all_edges += 1;
                if let (Some(l), Some(r)) = (l, r) {
                    edges.push((l, r, d, n));
                }
            }
        }
        edges.sort_by(|a, b| b.3.cmp(&a.3).then((a.0, a.1, a.2).cmp(&(b.0, b.1, b.2))));
        edges.truncate(MAX_EDGES);
        let hidden_edges = all_edges - edges.len() as u64;
        // Allow first, deny last: the red edges are drawn on top.
        edges.sort_by_key(|e| (e.2.draw_order(), std::cmp::Reverse(e.3)));

        const W: usize = 1200;
        const BOX_W: usize = 380;
        const ROW: usize = 28;
        const TOP: usize = 44;
        let (lx, rx) = (10, W - 10 - BOX_W);
        let rows = left.len().max(right.len()).max(1);
        let h = TOP + rows * ROW + 16;
        let max_n = edges.iter().map(|e| e.3).max().unwrap_or(1).max(1) as f64;
        let _ = writeln!(
            page,
            "<svg id=\"flows\" class=\"graph\" xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {W} {h}\" width=\"{W}\" height=\"{h}\" role=\"img\" aria-label=\"flow graph: identities to databases and roles\">"
        );
        let _ = writeln!(
            page,
            "<text class=\"col\" x=\"{lx}\" y=\"20\">identities ({})</text><text class=\"col\" x=\"{}\" y=\"20\" text-anchor=\"end\">databases / roles ({})</text>",
            num(self.identities.map.len() as u64),
            rx + BOX_W,
            num(self.targets.map.len() as u64),
        );
        if left.is_empty() {
            let _ = writeln!(page, "<text class=\"empty\" x=\"{}\" y=\"{}\" text-anchor=\"middle\">no connection decisions in this log</text>", W / 2, TOP + 18);
        }
        let y_of = |row: usize| TOP + row * ROW + ROW / 2;
        page.push_str("<g class=\"edges\">\n");
        for &(l, r, d, n) in &edges {
            let off = d.offset();
            let (y1, y2) = (y_of(l) as i64 + off, y_of(r) as i64 + off);
            let (x1, x2) = (lx + BOX_W, rx);
            let mid = (x1 + x2) / 2;
            let width = 1.5 + 8.5 * (n as f64 / max_n).sqrt();
            let _ = writeln!(
                page,
                "<path class=\"edge {cls}\" d=\"M{x1},{y1} C{mid},{y1} {mid},{y2} {x2},{y2}\" stroke=\"{col}\" stroke-width=\"{width:.1}\"><title>{id} → {target}: {n} {cls}</title></path>",
                cls = d.as_str(),
                col = d.colour(),
                id = Clip(left[l].0, KEPT_CHARS),
                target = Clip(right[r].0, KEPT_CHARS),
                n = num(n),
            );
        }
        page.push_str("</g>\n<g class=\"nodes\">\n");
        for (side, nodes, x) in [("identity", &left, lx), ("target", &right, rx)] {
            for (row, (key, c)) in nodes.iter().enumerate() {
                let y = TOP + row * ROW + 3;
                let alarm = if c.deny > 0 { " denied" } else { "" };
                let _ = writeln!(
                    page,
                    "<g class=\"node {side}{alarm}\"><title>{full}: {total} decisions, {allow} allowed, {deny} denied, {ch} challenged</title><rect x=\"{x}\" y=\"{y}\" width=\"{BOX_W}\" height=\"{hgt}\" rx=\"4\"/><text x=\"{tx}\" y=\"{ty}\">{label}</text><text class=\"n\" x=\"{nx}\" y=\"{ty}\" text-anchor=\"end\">{total}</text></g>",
                    full = Clip(key, KEPT_CHARS),
                    total = num(c.total()),
                    allow = num(c.allow),
                    deny = num(c.deny),
                    ch = num(c.challenge),
                    hgt = ROW - 6,
                    tx = x + 8,
                    ty = y + 15,
                    nx = x + BOX_W - 8,
                    label = Middle(key, NODE_CHARS),
                );
            }
        }
        page.push_str("</g>\n</svg>\n");
        let legend = "<p class=\"legend\"><span class=\"key allow\"></span>allowed <span class=\"key challenge\"></span>challenged (MFA) <span class=\"key deny\"></span>denied; width: number of decisions</p>";
        page.push_str(legend);
        let mut notes = Vec::new();
        if left_more > 0 {
            notes.push(format!(
                "{} more identities not shown",
                num(left_more as u64)
            ));
        }
        if right_more > 0 {
            notes.push(format!(
                "{} more databases/roles not shown",
                num(right_more as u64)
            ));
        }
        if hidden_edges > 0 {
            notes.push(format!("{} more edges not shown", num(hidden_edges)));
        }
        let untracked = self.identities.untracked + self.targets.untracked + self.flows.untracked;
        if untracked > 0 {
            notes.push(format!(
                "{} decisions past the {} keys tracked per table not counted here",
                num(untracked),
                num(MAX_KEYS as u64)
            ));
        }
        if !notes.is_empty() {
            let _ = writeln!(page, "<p class=\"more\">{}.</p>", notes.join("; "));
        }
        page.push_str("</section>\n");
    }

    fn talkers(&self, page: &mut String) {
        page.push_str("<section id=\"talkers\">\n<h2>Top talkers</h2>\n<div class=\"tables\">\n");
        talker_table(
            page,
            "sources",
            "Sources by decisions",
            "source",
            &self.sources,
            |c| c.total(),
        );
        talker_table(
            page,
            "identities",
            "Identities by decisions",
            "identity",
            &self.identities,
            |c| c.total(),
        );
        talker_table(
            page,
            "denied",
            "Identities by denials",
            "identity",
            &self.identities,
            |c| c.deny,
        );
        page.push_str("</div>\n</section>\n");
    }
}

fn talker_table(
    page: &mut String,
    id: &str,
    title: &str,
    what: &str,
    tally: &Tally<String>,
    by: impl Fn(&Counts) -> u64,
) {
    let mut rows: Vec<(&String, &Counts)> = tally.map.iter().filter(|(_, c)| by(c) > 0).collect();
    let total = rows.len();
    rows.sort_by(|a, b| by(b.1).cmp(&by(a.1)).then(a.0.cmp(b.0)));
    rows.truncate(MAX_ROWS);
    let _ = writeln!(
        page,
        "<table id=\"{id}\"><caption>{title}</caption><thead><tr><th>{what}</th><th>decisions</th><th>allowed</th><th>denied</th></tr></thead><tbody>"
    );
    for (key, c) in &rows {
        let _ = writeln!(
            page,
            "<tr><td><code title=\"{full}\">{short}</code></td><td>{}</td><td>{}</td><td class=\"{cls}\">{}</td></tr>",
            num(c.total()),
            num(c.allow),
            num(c.deny),
            full = Clip(key, KEPT_CHARS),
            short = Middle(key, 60),
            cls = if c.deny > 0 { "bad" } else { "" },
        );
    }
    if rows.is_empty() {
        page.push_str("<tr><td colspan=\"4\">none</td></tr>\n");
    }
    page.push_str("</tbody></table>\n");
    if total > rows.len() {
        let _ = writeln!(
            page,
            "<p class=\"more\">{} more not shown.</p>",
            num((total - rows.len()) as u64)
        );
    }
}

fn timeline(page: &mut String, findings: &[&Finding], hidden: u64) {
    page.push_str("<section id=\"timeline-section\">\n<h2>Signals over time</h2>\n");
    let timed: Vec<&&Finding> = findings.iter().filter(|f| f.time.is_some()).collect();
    // Rows: the known signals present, in their order, then other names by count.
    let mut rows: Vec<String> = SIGNAL_COLOURS
        .iter()
        .map(|(n, _)| n.to_string())
        .filter(|n| timed.iter().any(|f| &f.name == n))
        .collect();
    let mut others: BTreeMap<&str, u64> = BTreeMap::new();
    for f in &timed {
        if !rows.contains(&f.name) {
            *others.entry(&f.name).or_default() += 1;
        }
    }
    let mut others: Vec<(&str, u64)> = others.into_iter().collect();
    others.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let room = MAX_TIMELINE_ROWS.saturating_sub(rows.len());
    let overflow = others.len() > room;
    let named_others = if overflow {
        room.saturating_sub(1)
    } else {
        room
    };
    rows.extend(others.iter().take(named_others).map(|(n, _)| n.to_string()));
    if overflow {
        rows.push(OTHER_ROW.into());
    }
    let row_of = |name: &str| {
        rows.iter()
            .position(|r| r == name)
            .unwrap_or(rows.len().saturating_sub(1))
    };

    const W: i64 = 1200;
    const LABEL_W: i64 = 190;
    const ROW: i64 = 36;
    const TOP: i64 = 16;
    let (x0, x1) = (LABEL_W + 20, W - 30);
    let h = TOP + ROW * rows.len().max(1) as i64 + 44;
    let (mut t0, mut t1) = timed
        .iter()
        .filter_map(|f| f.time)
        .fold((i64::MAX, i64::MIN), |(lo, hi), t| {
            (lo.min(t.0), hi.max(t.0))
        });
    if timed.is_empty() {
        (t0, t1) = (0, 60_000);
    }
    if t1 - t0 < 60_000 {
        let mid = t0 / 2 + t1 / 2;
        (t0, t1) = (mid - 30_000, mid + 30_000);
    }
    let pad = (t1 - t0) / 25;
    let (t0, t1) = (t0 - pad, t1 + pad);
    let x_of = |t: i64| x0 + ((t - t0) as f64 / (t1 - t0) as f64 * (x1 - x0) as f64) as i64;
    let _ = writeln!(
        page,
        "<svg id=\"timeline\" class=\"timeline\" xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {W} {h}\" width=\"{W}\" height=\"{h}\" role=\"img\" aria-label=\"signals on a timeline\">"
    );
    for (i, name) in rows.iter().enumerate() {
        let y = TOP + ROW * i as i64;
        let _ = writeln!(
            page,
            "<g class=\"row\"><rect class=\"band{}\" x=\"0\" y=\"{y}\" width=\"{W}\" height=\"{ROW}\"/><text class=\"signal-name\" x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text></g>",
            if i % 2 == 0 { " even" } else { "" },
            LABEL_W,
            y + ROW / 2 + 5,
            Clip(name, 26),
        );
    }
    if rows.is_empty() {
        let _ = writeln!(
            page,
            "<text class=\"empty\" x=\"{}\" y=\"{}\" text-anchor=\"middle\">no signals</text>",
            W / 2,
            TOP + ROW / 2 + 5
        );
    }
    // The axis: six ticks, labelled as precisely as the span needs.
    let axis_y = TOP + ROW * rows.len().max(1) as i64 + 8;
    let _ = writeln!(
        page,
        "<line class=\"axis\" x1=\"{x0}\" y1=\"{axis_y}\" x2=\"{x1}\" y2=\"{axis_y}\"/>"
    );
    for i in 0..6 {
        let t = t0 + (t1 - t0) * i / 5;
        let x = x_of(t);
        let _ = writeln!(
            page,
            "<line class=\"tick\" x1=\"{x}\" y1=\"{TOP}\" x2=\"{x}\" y2=\"{}\"/><text class=\"tick-label\" x=\"{x}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            axis_y + 5,
            axis_y + 20,
            Esc(&tick_label(Time(t), t1 - t0)),
        );
    }
    for (i, f) in findings.iter().enumerate() {
        let Some(t) = f.time else { continue };
        let row = row_of(&f.name);
        let y = TOP + ROW * row as i64 + ROW / 2;
        let _ = writeln!(
            page,
            "<a href=\"#signal-{i}\"><circle class=\"marker\" data-signal=\"{name}\" cx=\"{}\" cy=\"{y}\" r=\"7\" fill=\"{}\"><title>{}</title></circle></a>",
            x_of(t.0),
            colour(&f.name),
            f.tooltip(),
            name = Clip(&f.name, LABEL_CHARS),
        );
    }
    page.push_str("</svg>\n");
    let untimed = findings.len() - timed.len();
    let mut notes = Vec::new();
    if untimed > 0 {
        notes.push(format!(
            "{} signals without a readable time are listed below only",
            num(untimed as u64)
        ));
    }
    if hidden > 0 {
        notes.push(format!("{} more signals not shown", num(hidden)));
    }
    if !notes.is_empty() {
        let _ = writeln!(page, "<p class=\"more\">{}.</p>", notes.join("; "));
    }
    page.push_str("</section>\n");
}

fn signal_list(page: &mut String, findings: &[&Finding], hidden: u64) {
    page.push_str("<section id=\"signals-section\">\n<h2>Signals and their evidence</h2>\n");
    page.push_str("<table id=\"signals\"><thead><tr><th>time</th><th>signal</th><th>kind</th><th>subject</th><th>evidence</th><th>from</th></tr></thead><tbody>\n");
    for (i, f) in findings.iter().enumerate() {
        let mut evidence = String::new();
        for (label, items, more) in [
            ("identities", &f.identities, f.more[0]),
            ("sources", &f.sources, f.more[1]),
            ("targets", &f.targets, f.more[2]),
        ] {
            if items.is_empty() {
                continue;
            }
            let list: Vec<String> = items
                .iter()
                .map(|s| format!("<code>{}</code>", Clip(s, KEPT_CHARS)))
                .collect();
            let _ = write!(evidence, "<li><b>{label}</b> {}", list.join(", "));
            if more > 0 {
                let _ = write!(evidence, " and {} more", num(more as u64));
            }
            evidence.push_str("</li>");
        }
        if !f.counts.is_empty() {
            let list: Vec<String> = f
                .counts
                .iter()
                .map(|(k, v)| format!("{} {}", Clip(k, LABEL_CHARS), Clip(v, LABEL_CHARS)))
                .collect();
            let _ = write!(evidence, "<li><b>counts</b> {}</li>", list.join(", "));
        }
        if let Some((from, to)) = &f.window {
            let _ = write!(
                evidence,
                "<li><b>window</b> {} to {}</li>",
                Clip(from, LABEL_CHARS),
                Clip(to, LABEL_CHARS)
            );
        }
        let from = match (f.in_log, f.replayed) {
            (true, true) => "log and replay",
            (true, false) => "log",
            _ => "replay",
        };
        let _ = writeln!(
            page,
            "<tr id=\"signal-{i}\"><td>{time}</td><td><span class=\"dot\" style=\"background:{col}\"></span>{name}</td><td>{kind}</td><td><code>{subject}</code></td><td><ul>{evidence}</ul></td><td>{from}</td></tr>",
            time = Clip(&f.time_text, LABEL_CHARS),
            col = colour(&f.name),
            name = Clip(&f.name, LABEL_CHARS),
            kind = Clip(&f.kind, LABEL_CHARS),
            subject = Clip(&f.subject, KEPT_CHARS),
        );
    }
    if findings.is_empty() {
        page.push_str("<tr><td colspan=\"6\">No signal: the detectors found nothing in this log and it holds no signal line.</td></tr>\n");
    }
    page.push_str("</tbody></table>\n");
    if hidden > 0 {
        let _ = writeln!(
            page,
            "<p class=\"more\">{} more signals not shown.</p>",
            num(hidden)
        );
    }
    page.push_str("</section>\n");
}

const NO_IDENTITY: &str = "(no identity)";
const OTHER_ROW: &str = "(other)";

/// The timeline's colour for a signal name; unknown names share one. Never log text.
fn colour(name: &str) -> &'static str {
    SIGNAL_COLOURS
        .iter()
        .find(|(n, _)| *n == name)
        .map_or(OTHER_COLOUR, |(_, c)| c)
}

/// The graph's nodes for one side: up to half of [`MAX_NODES`] flagged ones (denied, or named
/// by a signal) by count, the rest the busiest; returned busiest first, with how many were left out.
fn pick(
    tally: &Tally<String>,
    flagged: impl Fn(&String, &Counts) -> bool,
) -> (Vec<(&String, Counts)>, usize) {
    let mut all: Vec<(&String, Counts)> = tally.map.iter().map(|(k, c)| (k, *c)).collect();
    all.sort_by(|a, b| b.1.total().cmp(&a.1.total()).then(a.0.cmp(b.0)));
    let mut chosen: Vec<bool> = vec![false; all.len()];
    let mut n = 0;
    for (i, (k, c)) in all.iter().enumerate() {
        if n >= MAX_NODES / 2 {
            break;
        }
        if flagged(k, c) {
            chosen[i] = true;
            n += 1;
        }
    }
    for flag in chosen.iter_mut() {
        if n >= MAX_NODES {
            break;
        }
        if !*flag {
            *flag = true;
            n += 1;
        }
    }
    let more = all.len() - n;
    let nodes = all
        .into_iter()
        .zip(chosen)
        .filter_map(|(node, keep)| keep.then_some(node))
        .collect();
    (nodes, more)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Decision {
    Allow,
    Challenge,
    Deny,
}

impl Decision {
    const ALL: [Decision; 3] = [Decision::Allow, Decision::Challenge, Decision::Deny];

    fn as_str(self) -> &'static str {
        match self {
            Decision::Allow => "allow",
            Decision::Challenge => "challenge",
            Decision::Deny => "deny",
        }
    }

    fn colour(self) -> &'static str {
        match self {
            Decision::Allow => "#16a34a",
            Decision::Challenge => "#d97706",
            Decision::Deny => "#dc2626",
        }
    }

    /// Edges of one pair are drawn side by side, a few pixels apart.
    fn offset(self) -> i64 {
        match self {
            Decision::Allow => -4,
            Decision::Challenge => 0,
            Decision::Deny => 4,
        }
    }

    fn draw_order(self) -> u8 {
        self as u8
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Counts {
    allow: u64,
    challenge: u64,
    deny: u64,
}

impl Counts {
    fn total(&self) -> u64 {
        self.allow
            .saturating_add(self.challenge)
            .saturating_add(self.deny)
    }

    fn get(&self, d: Decision) -> u64 {
        match d {
            Decision::Allow => self.allow,
            Decision::Challenge => self.challenge,
            Decision::Deny => self.deny,
        }
    }

    fn add(&mut self, d: Decision, n: u64) {
        let slot = match d {
            Decision::Allow => &mut self.allow,
            Decision::Challenge => &mut self.challenge,
            Decision::Deny => &mut self.deny,
        };
        *slot = slot.saturating_add(n);
    }
}

/// Decisions per key, for at most [`MAX_KEYS`] keys.
#[derive(Debug)]
struct Tally<K> {
    map: HashMap<K, Counts>,
    /// Decisions whose key arrived after the table was full.
    untracked: u64,
}

impl<K> Default for Tally<K> {
    fn default() -> Self {
        Tally {
            map: HashMap::new(),
            untracked: 0,
        }
    }
}

impl<K: Hash + Eq> Tally<K> {
    fn add(&mut self, key: K, d: Decision, n: u64) {
        let full = self.map.len() >= MAX_KEYS;
        match self.map.get_mut(&key) {
            Some(c) => c.add(d, n),
            None if !full => self.map.entry(key).or_default().add(d, n),
            None => self.untracked = self.untracked.saturating_add(n),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Origin {
    /// A `signal` line of the log.
    Log,
    /// Raised by the detectors replaying the log.
    Replay,
}

/// (signal, kind, subject, time): one entry on the page.
type FindingKey = (String, String, String, String);

/// A signal as the page shows it, from a `signal` line or a replayed [`Signal`], every
/// string capped.
#[derive(Clone, Debug)]
struct Finding {
    name: String,
    kind: String,
    subject: String,
    time: Option<Time>,
    time_text: String,
    identities: Vec<String>,
    sources: Vec<String>,
    targets: Vec<String>,
    /// Evidence items left out of identities, sources, targets.
    more: [usize; 3],
    counts: Vec<(String, String)>,
    window: Option<(String, String)>,
    in_log: bool,
    replayed: bool,
}

impl Finding {
    /// None when the object names no signal.
    fn from_json(obj: &Map<String, Value>, origin: Origin) -> Option<Finding> {
        let name = text(obj, "signal")?;
        let time_text = text(obj, "time")
            .or_else(|| text(obj, "ts"))
            .unwrap_or_default();
        let list = |key: &str| -> (Vec<String>, usize) {
            let items = obj.get(key).and_then(Value::as_array);
            let all = items.map_or(0, Vec::len);
            let kept: Vec<String> = items
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .take(EVIDENCE_ITEMS)
                .map(capped)
                .collect();
            let more = all - kept.len();
            (kept, more)
        };
        let (identities, mi) = list("identities");
        let (sources, ms) = list("sources");
        let (targets, mt) = list("targets");
        let counts = obj
            .get("counts")
            .and_then(Value::as_object)
            .map(|c| {
                c.iter()
                    .take(EVIDENCE_ITEMS)
                    .map(|(k, v)| {
                        let v = match v {
                            Value::String(s) => capped(s),
                            Value::Number(n) => n.to_string(),
                            Value::Bool(b) => b.to_string(),
                            _ => "?".into(),
                        };
                        (capped(k), v)
                    })
                    .collect()
            })
            .unwrap_or_default();
        let window = obj.get("window").and_then(Value::as_object).map(|w| {
            (
                text(w, "from").unwrap_or_default(),
                text(w, "to").unwrap_or_default(),
            )
        });
        Some(Finding {
            name,
            kind: text(obj, "kind").unwrap_or_default(),
            subject: text(obj, "subject").unwrap_or_default(),
            time: Time::parse_rfc3339(&time_text),
            time_text,
            identities,
            sources,
            targets,
            more: [mi, ms, mt],
            counts,
            window,
            in_log: origin == Origin::Log,
            replayed: origin == Origin::Replay,
        })
    }

    fn key(&self) -> FindingKey {
        let time = match self.time {
            Some(t) => t.0.to_string(),
            None => self.time_text.clone(),
        };
        (
            self.name.clone(),
            self.kind.clone(),
            self.subject.clone(),
            time,
        )
    }

    /// The marker's tooltip, escaped: what fired, about whom, and its evidence.
    fn tooltip(&self) -> String {
        let mut t = format!(
            "{} / {}\n{}\n{}",
            Clip(&self.name, LABEL_CHARS),
            Clip(&self.kind, LABEL_CHARS),
            Clip(&self.subject, KEPT_CHARS),
            Clip(&self.time_text, LABEL_CHARS)
        );
        for (label, items) in [
            ("identities", &self.identities),
            ("sources", &self.sources),
            ("targets", &self.targets),
        ] {
            if !items.is_empty() {
                let list: Vec<String> = items
                    .iter()
                    .map(|s| Clip(s, KEPT_CHARS).to_string())
                    .collect();
                let _ = write!(t, "\n{label}: {}", list.join(", "));
            }
        }
        if !self.counts.is_empty() {
            let list: Vec<String> = self
                .counts
                .iter()
                .map(|(k, v)| format!("{}={}", Clip(k, LABEL_CHARS), Clip(v, LABEL_CHARS)))
                .collect();
            let _ = write!(t, "\ncounts: {}", list.join(", "));
        }
        t
    }
}

/// A string field, capped; None when absent or not a string.
fn text(obj: &Map<String, Value>, key: &str) -> Option<String> {
    obj.get(key).and_then(Value::as_str).map(capped)
}

fn capped(s: &str) -> String {
    match s.char_indices().nth(KEPT_CHARS) {
        Some((cut, _)) => format!("{}…", &s[..cut]),
        None => s.to_owned(),
    }
}

/// `10.0.0.7:51234` or `[fd00::7]:51234` → the address; anything else as it is.
fn source_ip(peer: &str) -> String {
    match peer.parse::<std::net::SocketAddr>() {
        Ok(addr) => addr.ip().to_string(),
        Err(_) => peer.to_owned(),
    }
}

/// `database / role`, as the graph's right-hand nodes name a target.
fn target_label(database: Option<String>, role: Option<String>) -> String {
    match (database, role) {
        (None, None) => "(before startup)".into(),
        (db, role) => format!(
            "{} / {}",
            db.unwrap_or_else(|| "?".into()),
            role.unwrap_or_else(|| "?".into())
        ),
    }
}

/// `1,234,567`.
fn num(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `3 d 4 h`, `2 h 14 min`, `5 min 3 s`, `12 s`.
fn duration(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    let (d, h, m, sec) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    if d > 0 {
        format!("{d} d {h} h")
    } else if h > 0 {
        format!("{h} h {m} min")
    } else if m > 0 {
        format!("{m} min {sec} s")
    } else {
        format!("{sec} s")
    }
}

/// A tick's label: the date and minute over long spans, the second over short ones.
fn tick_label(t: Time, span_ms: i64) -> String {
    let full = t.to_string(); // 2025-01-14T02:13:00.000Z
    let pick = |from: usize, to: usize| full.get(from..to).unwrap_or("").replace('T', " ");
    if span_ms > 86_400_000 {
        pick(5, 16)
    } else if span_ms > 600_000 {
        pick(11, 16)
    } else {
        pick(11, 19)
    }
}

/// Text escaped for HTML and SVG, in element content and in quoted attributes alike:
/// `& < > " '` become references, and control characters (newlines too: a tooltip's lines
/// are this module's own) and bidirectional overrides (which could reorder what a reader
/// sees) become U+FFFD.
struct Esc<'a>(&'a str);

impl Display for Esc<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in self.0.chars() {
            match c {
                '&' => f.write_str("&amp;")?,
                '<' => f.write_str("&lt;")?,
                '>' => f.write_str("&gt;")?,
                '"' => f.write_str("&quot;")?,
                '\'' => f.write_str("&#39;")?,
                c if c.is_control() || is_bidi(c) => f.write_char('\u{FFFD}')?,
                c => f.write_char(c)?,
            }
        }
        Ok(())
    }
}

fn is_bidi(c: char) -> bool {
    matches!(c, '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// At most `.1` characters (the last an ellipsis), then escaped.
struct Clip<'a>(&'a str, usize);

impl Display for Clip<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Clip(s, n) = *self;
        match s.char_indices().nth(n.saturating_sub(1)) {
            Some((cut, _)) if s.chars().count() > n => {
                write!(f, "{}…", Esc(&s[..cut]))
            }
            _ => write!(f, "{}", Esc(s)),
        }
    }
}

/// At most `.1` characters, cut in the middle (a SPIFFE ID's end tells it apart), then escaped.
struct Middle<'a>(&'a str, usize);

impl Display for Middle<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Middle(s, n) = *self;
        let count = s.chars().count();
        if count <= n {
            return write!(f, "{}", Esc(s));
        }
        let head = n / 3;
        let tail = n - head - 1;
        let start: String = s.chars().take(head).collect();
        let end: String = s.chars().skip(count - tail).collect();
        write!(f, "{}…{}", Esc(&start), Esc(&end))
    }
}

/// The document head: inline CSS only. The Content-Security-Policy forbids every script and
/// every fetch, so even a mistake in escaping could not run code or call out.
const HEAD: &str = r#"<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Eastwall decision log report</title>
<style>
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px;color:#111827;background:#fff;max-width:1240px}
h1{font-size:24px;margin:0 0 12px}
h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #e5e7eb;padding-bottom:4px}
code{font-family:ui-monospace,"DejaVu Sans Mono",monospace;font-size:12px;word-break:break-all}
dl.facts{display:grid;grid-template-columns:max-content 1fr;gap:4px 16px;margin:0}
dl.facts dt{font-weight:600;color:#374151}
dl.facts dd{margin:0}
small{color:#6b7280}
svg{display:block;max-width:100%;height:auto;font-family:ui-monospace,"DejaVu Sans Mono",monospace;font-size:12px}
svg .col{font-family:system-ui,sans-serif;font-size:13px;font-weight:600;fill:#374151}
svg .empty{fill:#6b7280;font-size:14px}
.node rect{fill:#f3f4f6;stroke:#9ca3af}
.node.denied rect{fill:#fef2f2;stroke:#dc2626}
.node text{fill:#111827}
.node text.n{fill:#6b7280}
.edge{fill:none;stroke-opacity:.65;stroke-linecap:round}
.band{fill:#fff}
.band.even{fill:#f8fafc}
.signal-name{font-family:system-ui,sans-serif;font-size:13px;fill:#111827}
.axis,.tick{stroke:#d1d5db}
.tick-label{fill:#6b7280;font-size:11px}
.marker{stroke:#fff;stroke-width:2}
.legend{font-size:13px;color:#374151}
.key{display:inline-block;width:22px;height:4px;margin:0 6px 3px 12px;vertical-align:middle}
.key.allow{background:#16a34a}.key.challenge{background:#d97706}.key.deny{background:#dc2626}
.more{color:#6b7280;font-size:13px;font-style:italic}
.tables{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start}
table{border-collapse:collapse;font-size:13px}
caption{text-align:left;font-weight:600;padding:4px 0}
th,td{border-bottom:1px solid #e5e7eb;padding:4px 8px;text-align:left;vertical-align:top}
td.bad{color:#dc2626;font-weight:600}
#signals ul{margin:0;padding-left:16px}
.dot{display:inline-block;width:10px;height:10px;border-radius:5px;margin-right:6px}
footer{margin-top:32px;color:#6b7280;font-size:12px}
</style>
</head>
<body>
"#;

#[cfg(test)]
mod tests {
    use super::*;
    use eastwall_detect::{Detectors, Settings};
    use serde_json::json;

    const HOSTILE: &str = "\"><script>alert(1)</script><img src=x onerror=alert(2)>'&</svg><!--";

    fn header() -> Header {
        Header {
            files: vec!["decisions.log".into()],
            chain: "verified: intact".into(),
        }
    }

    fn connect(ts: &str, id: &str, peer: &str, db: &str, role: &str, decision: &str) -> Value {
        json!({"ts": ts, "conn_id": "c", "event": "connect", "decision": decision, "peer": peer,
            "spiffe_id": id, "cert_serial": "b1", "db_user": role, "database": db,
            "rule": "policy.txt:3", "reason": "r", "alert": false, "prev": "0", "hash": "0"})
    }

    // `style` only ever holds one of [`SIGNAL_COLOURS`].
    const ATTRIBUTES: [&str; 34] = [
        "style",
        "html",
        "lang",
        "charset",
        "http-equiv",
        "content",
        "name",
        "id",
        "class",
        "xmlns",
        "viewBox",
        "width",
        "height",
        "role",
        "aria-label",
        "x",
        "y",
        "x1",
        "y1",
        "x2",
        "y2",
        "d",
        "stroke",
        "stroke-width",
        "rx",
        "text-anchor",
        "fill",
        "cx",
        "cy",
        "r",
        "data-signal",
        "href",
        "title",
        "colspan",
    ];

    /// Every tag in the page is one this module writes: no log text became markup.
    fn assert_only_our_tags(page: &str) {
        const OURS: [&str; 37] = [
            "!DOCTYPE", "html", "head", "meta", "title", "style", "body", "header", "h1", "h2",
            "dl", "dt", "dd", "code", "small", "section", "svg", "text", "g", "path", "rect", "p",
            "span", "div", "table", "caption", "thead", "tbody", "tr", "th", "td", "line", "a",
            "circle", "ul", "li", "b",
        ];
        let mut rest = page;
        while let Some(at) = rest.find('<') {
            rest = &rest[at + 1..];
            let name: String = rest
                .trim_start_matches('/')
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '!')
                .collect();
            assert!(
                OURS.contains(&name.as_str()) || name == "footer",
                "unexpected tag <{name} in {}",
                &rest[..rest.len().min(80)]
            );
        }
        assert!(!page.contains("<script"), "a script tag");
        // Outside its quoted values, no tag has an attribute the module does not write.
        for tag in page.split('<').skip(1) {
            let inside = tag.split('>').next().unwrap_or("");
            let bare: String = inside.split('"').step_by(2).collect();
            for attr in bare.split_whitespace().skip(1) {
                let name = attr.split('=').next().unwrap_or("");
                assert!(ATTRIBUTES.contains(&name), "attribute {name} in <{inside}>");
            }
        }
    }

    #[test]
    fn log_text_in_every_field_is_inert() {
        let mut hostile_line = connect(
            "2025-01-14T02:13:00Z",
            HOSTILE,
            HOSTILE,
            HOSTILE,
            HOSTILE,
            "deny",
        );
        hostile_line["event"] = json!(HOSTILE);
        let signal_line = json!({"ts": "2025-01-14T02:14:00Z", "event": "signal", "decision": null,
            "alert": true, "signal": HOSTILE, "time": "2025-01-14T02:14:00.000Z", "kind": HOSTILE,
            "subject": HOSTILE, "identities": [HOSTILE], "sources": [HOSTILE], "targets": [HOSTILE],
            "counts": {HOSTILE: HOSTILE}, "window": {"from": HOSTILE, "to": HOSTILE, "seconds": 1}});
        let lines = vec![
            connect(
                "2025-01-14T02:13:00Z",
                HOSTILE,
                "10.3.0.42:5000",
                HOSTILE,
                HOSTILE,
                "deny",
            ),
            connect(
                "2025-01-14T02:13:01Z",
                "spiffe://corp.example/a",
                HOSTILE,
                "db",
                "r",
                "allow",
            ),
            hostile_line,
            signal_line,
            json!({"ts": "2025-01-14T02:15:00Z", "event": "refusals_summary", "decision": "deny",
                "source": HOSTILE, "suppressed": 12}),
        ];
        let page = render(
            &Header {
                files: vec![HOSTILE.into()],
                chain: HOSTILE.into(),
            },
            &lines,
            &[],
        );
        assert_only_our_tags(&page);
        // The hostile text is there, visibly, as text.
        assert!(
            page.contains("&quot;&gt;&lt;script&gt;alert(1)&lt;/script&gt;"),
            "{page}"
        );
        // No attribute was closed early: every `"` in the page is one of ours, in pairs
        // inside tags, and never inside text.
        for tag in page.split('<').skip(1) {
            let inside = tag.split('>').next().unwrap_or("");
            assert_eq!(
                inside.matches('"').count() % 2,
                0,
                "unbalanced quotes in <{inside}>"
            );
        }
        // The hostile signal is on the timeline and in the list, escaped.
        assert!(
            page.contains("data-signal=\"&quot;&gt;&lt;script&gt;"),
            "{page}"
        );
    }

    #[test]
    fn escaping_covers_quotes_controls_and_bidi_overrides() {
        assert_eq!(Esc("a<b>&\"c'").to_string(), "a&lt;b&gt;&amp;&quot;c&#39;");
        assert_eq!(
            Esc("x\u{0}\u{1b}[31m\u{202E}y").to_string(),
            "x\u{FFFD}\u{FFFD}[31m\u{FFFD}y"
        );
        // Clipping never cuts an entity in half: it clips first, then escapes.
        assert_eq!(Clip("&&&&", 3).to_string(), "&amp;&amp;…");
        assert_eq!(Middle("<<<<<<<<<<", 4).to_string(), "&lt;…&lt;&lt;");
        assert_eq!(Clip("é".repeat(10).as_str(), 4).to_string(), "ééé…");
    }

    #[test]
    fn hostile_lines_are_counted_never_a_panic() {
        let huge = "x".repeat(1 << 20);
        let lines = vec![
            json!(null),
            json!([1, 2, 3]),
            json!("connect"),
            json!(42),
            json!({}),
            json!({"ts": 5, "event": "connect", "decision": "allow"}),
            json!({"ts": "2025-01-14T02:13:00Z", "event": "connect", "decision": {"a": 1},
                "spiffe_id": ["x"], "peer": 7, "database": null, "db_user": false}),
            json!({"ts": "9999-12-31T23:59:59Z", "event": "connect", "decision": "deny"}),
            json!({"ts": huge.clone(), "event": huge.clone(), "decision": "deny",
                "spiffe_id": huge.clone(), "peer": huge.clone(), "database": huge.clone(),
                "db_user": huge.clone()}),
            json!({"event": "signal", "signal": huge.clone(), "kind": 5, "subject": null,
                "identities": "not a list", "sources": [1, null, huge.clone()],
                "counts": [1], "window": "soon", "time": huge.clone()}),
            json!({"event": "signal"}),
            json!({"event": "refusals_summary", "source": "10.9.0.9", "suppressed": "many"}),
            json!({"event": "refusals_summary", "source": "10.9.0.9", "suppressed": u64::MAX}),
            json!({"event": "refusals_summary", "source": "10.9.0.9", "suppressed": u64::MAX}),
        ];
        let page = render(&header(), &lines, &[]);
        assert_only_our_tags(&page);
        // A megabyte string is shown as a short label, not copied.
        assert!(page.len() < 100_000, "page is {} bytes", page.len());
        assert!(page.contains("<dd id=\"lines\">14"), "{page}");
        assert!(page.contains("4 not a JSON object"));
        // The signal line without a readable time is listed, not placed on the timeline.
        assert!(page.contains("signals without a readable time"));
        // Saturating counts, not an overflow panic.
        assert!(page.contains(&num(u64::MAX)));
    }

    #[test]
    fn a_hundred_thousand_identities_give_a_bounded_page() {
        let mut report = Report::new();
        for i in 0..100_000u32 {
            let id = format!(
                "spiffe://corp.example/app/workload-{i:06}-{}",
                "p".repeat(100)
            );
            let decision = if i % 10 == 0 { "deny" } else { "allow" };
            let line = connect(
                "2025-01-14T02:13:00Z",
                &id,
                &format!("10.{}.{}.{}:5000", i >> 16, (i >> 8) & 255, i & 255),
                &format!("db{}", i % 5000),
                "app",
                decision,
            );
            report.line(&line);
        }
        let page = report.render(&header());
        assert!(page.len() < 400_000, "page is {} bytes", page.len());
        assert!(
            page.contains(&format!(
                "{} more identities not shown",
                num(100_000 - MAX_NODES as u64)
            )),
            "{}",
            &page[..2000]
        );
        assert!(page.contains("more databases/roles not shown"));
        assert!(page.contains("more edges not shown"));
        assert_eq!(page.matches("class=\"node identity").count(), MAX_NODES);
        assert!(page.matches("class=\"edge ").count() <= MAX_EDGES);
        // The tables: the top rows and how many more.
        assert!(page.contains(&format!(
            "{} more not shown.",
            num(100_000 - MAX_ROWS as u64)
        )));
    }

    #[test]
    fn memory_is_bounded_too_past_max_keys() {
        let mut t: Tally<String> = Tally::default();
        for i in 0..MAX_KEYS + 10 {
            t.add(i.to_string(), Decision::Allow, 1);
        }
        t.add("0".into(), Decision::Deny, 1);
        assert_eq!(t.map.len(), MAX_KEYS);
        assert_eq!(t.untracked, 10);
        assert_eq!(t.map["0"].deny, 1);
    }

    #[test]
    fn a_signal_in_the_log_and_from_the_replay_is_listed_once() {
        let id = "spiffe://corp.example/app/billing";
        let mut lines = vec![connect(
            "2025-01-14T02:00:00Z",
            id,
            "10.1.0.5:5000",
            "billing",
            "billing",
            "allow",
        )];
        // The detectors' own signal, then the same as a `signal` line of the log.
        let mut d = Detectors::new(Settings::default()).unwrap();
        let mut detected = Vec::new();
        lines.push(connect(
            "2025-01-14T02:20:00Z",
            id,
            "10.3.0.42:5000",
            "billing",
            "billing",
            "allow",
        ));
        for l in &lines {
            detected.extend(d.observe_line(l));
        }
        // Whatever fired (billing's certificate from a second source), log it as the sidecar would.
        assert!(!detected.is_empty(), "no signal from two sources at once");
        for s in &detected {
            let mut line = json!({"ts": "2025-01-14T02:20:00.000001Z", "conn_id": "s", "event": "signal",
                "decision": null, "peer": null, "spiffe_id": null, "cert_serial": null, "db_user": null,
                "database": null, "rule": null, "reason": "detector", "alert": true});
            for (k, v) in s.to_json().as_object().unwrap() {
                line[k] = v.clone();
            }
            lines.push(line);
        }
        let page = render(&header(), &lines, &detected);
        assert_eq!(
            page.matches("<tr id=\"signal-").count(),
            detected.len(),
            "{page}"
        );
        assert!(page.contains("<td>log and replay</td>"));
        assert_eq!(
            page.matches("<circle class=\"marker\"").count(),
            detected.len()
        );
        // The graph shows billing's allowed flow; the header counts both lines' span.
        assert!(page.contains("class=\"edge allow\""));
        assert!(page.contains("2025-01-14T02:00:00.000Z to"));
    }

    #[test]
    fn an_empty_log_still_gives_a_page_with_both_svgs() {
        let page = render(&header(), &[], &[]);
        assert!(page.contains("<svg id=\"flows\""));
        assert!(page.contains("<svg id=\"timeline\""));
        assert!(page.contains("no connection decisions"));
        assert!(page.contains("no signals"));
        assert!(page.contains("no line with a readable time"));
        assert_only_our_tags(&page);
    }

    #[test]
    fn small_helpers() {
        assert_eq!(num(0), "0");
        assert_eq!(num(1234567), "1,234,567");
        assert_eq!(num(100), "100");
        assert_eq!(duration(3_600_000 * 26), "1 d 2 h");
        assert_eq!(duration(61_000), "1 min 1 s");
        assert_eq!(source_ip("[fd00::7]:5000"), "fd00::7");
        assert_eq!(source_ip("nonsense"), "nonsense");
        assert_eq!(target_label(None, None), "(before startup)");
        assert_eq!(target_label(Some("hr".into()), None), "hr / ?");
        let t = Time::parse_rfc3339("2025-01-14T02:13:05Z").unwrap();
        assert_eq!(tick_label(t, 86_400_001), "01-14 02:13");
        assert_eq!(tick_label(t, 600_001), "02:13");
        assert_eq!(tick_label(t, 1000), "02:13:05");
    }
}
