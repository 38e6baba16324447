//! `eastwall audit report` end to end: a chained decision log of a benign week and the seed's
//! attack night, the real binary writing the page, and a real headless Chromium rendering it.
//! The DOM Chromium built must hold the flow graph's and the timeline's SVG with the attack's
//! identities and all five signals, the screenshot must be a window-sized PNG with the
//! graph's colours in it, and log text made of markup must stay text.
//!
//! Chromium is Debian's `chromium` (tests/run installs it when run as root). Missing and not
//! root, the test fails with the command that installs it. Every Chromium run is bounded and
//! its process group killed at the timeout.

use std::io::Read as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use eastwall_e2e::eastwall_bin;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

/// Longest a Chromium run may take; it normally takes a few seconds.
const CHROMIUM_TIMEOUT: Duration = Duration::from_secs(90);
/// The window the screenshot is taken at.
const WINDOW: (u32, u32) = (1400, 1800);

const LAPTOP_IP: &str = "10.3.0.42";
const LAPTOP: &str = "spiffe://corp.example/workstations/finance-laptop";
const BILLING: &str = "spiffe://corp.example/app/billing";
const HOSTILE_ID: &str =
    "spiffe://corp.example/\"><script>alert(1)</script><img src=x onerror=alert(2)>";

// ---------------------------------------------------------------------------------------
// The log: lines as the sidecar writes them, on a fixed clock, chained as audit.rs documents.

/// Monday 2025-01-06 + `day` days, `h`:`m` UTC, in the writer's microsecond form.
fn at(day: i64, h: i64, m: i64) -> String {
    let total = day * 1440 + h * 60 + m;
    let (d, rest) = (total / 1440, total % 1440);
    format!(
        "2025-01-{:02}T{:02}:{:02}:00.000000Z",
        6 + d,
        rest / 60,
        rest % 60
    )
}

#[derive(Clone)]
struct Who {
    id: String,
    serial: String,
    ip: String,
}

fn who(path: &str, serial: &str, ip: &str) -> Who {
    Who {
        id: format!("spiffe://corp.example/{path}"),
        serial: serial.into(),
        ip: ip.into(),
    }
}

/// The fixed fields in the log's order; extra fields go after them, then the chain's.
fn line(
    ts: &str,
    event: &str,
    decision: Option<&str>,
    w: Option<&Who>,
    target: Option<(&str, &str)>,
    reason: &str,
) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("ts".into(), json!(ts));
    m.insert(
        "conn_id".into(),
        json!(format!("c{}", ts.len() + reason.len())),
    );
    m.insert("event".into(), json!(event));
    m.insert("decision".into(), json!(decision));
    m.insert("peer".into(), json!(w.map(|w| format!("{}:50000", w.ip))));
    m.insert("spiffe_id".into(), json!(w.map(|w| w.id.clone())));
    m.insert("cert_serial".into(), json!(w.map(|w| w.serial.clone())));
    m.insert("db_user".into(), json!(target.map(|t| t.1)));
    m.insert("database".into(), json!(target.map(|t| t.0)));
    m.insert("rule".into(), json!("policy.ew:3"));
    m.insert("reason".into(), json!(reason));
    m.insert("alert".into(), json!(false));
    m
}

fn connect(ts: &str, w: &Who, db: &str, role: &str, allow: bool) -> Map<String, Value> {
    let (decision, reason) = if allow {
        ("allow", "allowed by rule policy.ew:3")
    } else {
        ("deny", "no rule allows this flow")
    };
    line(
        ts,
        "connect",
        Some(decision),
        Some(w),
        Some((db, role)),
        reason,
    )
}

fn end(ts: &str, w: &Who, db: &str, role: &str) -> Map<String, Value> {
    line(
        ts,
        "session_end",
        Some("allow"),
        Some(w),
        Some((db, role)),
        "client_closed",
    )
}

/// An operator's psql: the challenge, the step-up, the session on a token, its end.
fn operator(w: &Who, db: &str, day: i64, h: i64, m: i64) -> Vec<Map<String, Value>> {
    let target = Some((db, "postgres"));
    let mut admitted = connect(&at(day, h, m + 2), w, db, "postgres", true);
    admitted.insert("mfa".into(), json!("token"));
    admitted.insert("mfa_age_s".into(), json!(30));
    vec![
        line(
            &at(day, h, m),
            "mfa_challenge",
            Some("challenge"),
            Some(w),
            target,
            "mfa required",
        ),
        line(
            &at(day, h, m + 1),
            "stepup",
            Some("allow"),
            Some(w),
            None,
            "mfa_accepted",
        ),
        admitted,
        end(&at(day, h, m + 50), w, db, "postgres"),
    ]
}

/// Eight benign days (services around the clock from their own hosts, operators stepping up
/// on weekdays), then the night of the seed's story on day 8, a Tuesday.
fn seed_attack_log() -> Vec<Map<String, Value>> {
    let billing_a = who("app/billing", "b1", "10.1.0.5");
    let billing_b = who("app/billing", "b2", "10.1.0.6");
    let inventory = who("app/inventory", "i1", "10.1.0.7");
    let reports = who("app/reports", "r1", "10.1.0.8");
    let alice = who("app/operators/alice", "a1", "10.2.0.10");
    let bob = who("app/operators/bob", "o1", "10.2.0.11");
    let mut timed: Vec<(String, Map<String, Value>)> = Vec::new();
    let mut push = |l: Map<String, Value>| timed.push((l["ts"].as_str().unwrap().to_owned(), l));
    for day in 0..8 {
        for minute in (0..24 * 60).step_by(15) {
            let (h, m) = (minute / 60, minute % 60);
            let b = if minute % 30 == 0 {
                &billing_a
            } else {
                &billing_b
            };
            push(connect(&at(day, h, m), b, "billing", "billing", true));
            push(end(&at(day, h, m + 5), b, "billing", "billing"));
            if minute % 60 == 0 {
                push(connect(
                    &at(day, h, m + 1),
                    &inventory,
                    "inventory",
                    "inventory",
                    true,
                ));
                push(end(
                    &at(day, h, m + 9),
                    &inventory,
                    "inventory",
                    "inventory",
                ));
                push(connect(
                    &at(day, h, m + 2),
                    &reports,
                    "billing",
                    "reports_ro",
                    true,
                ));
                push(end(&at(day, h, m + 7), &reports, "billing", "reports_ro"));
            }
        }
        if day % 7 < 5 {
            for (w, db, hours) in [
                (&alice, "billing", [(9, 30), (14, 0)]),
                (&bob, "inventory", [(10, 0), (15, 30)]),
            ] {
                for (h, m) in hours {
                    operator(w, db, day, h, m).into_iter().for_each(&mut push);
                }
            }
        }
    }
    timed.sort_by(|a, b| a.0.cmp(&b.0));
    let mut lines: Vec<Map<String, Value>> = timed.into_iter().map(|(_, l)| l).collect();

    // Day 8, 02:00: billing's own host holds a session through the night.
    let d = 8;
    let laptop = who("workstations/finance-laptop", "l1", LAPTOP_IP);
    let stolen_billing = Who {
        ip: LAPTOP_IP.into(),
        ..billing_a.clone()
    };
    let stolen_alice = Who {
        ip: LAPTOP_IP.into(),
        ..alice.clone()
    };
    lines.push(connect(
        &at(d, 2, 0),
        &billing_a,
        "billing",
        "billing",
        true,
    ));
    // 02:13: the phished finance laptop tries the database directly; policy refuses it.
    let mut refused = connect(&at(d, 2, 13), &laptop, "billing", "billing", false);
    refused.insert("alert".into(), json!(true));
    lines.push(refused);
    lines.push(connect(
        &at(d, 2, 14),
        &laptop,
        "postgres",
        "postgres",
        false,
    ));
    // 02:20: billing's certificate from the laptop, while billing's own session is open.
    let mut reuse = connect(&at(d, 2, 20), &stolen_billing, "billing", "billing", true);
    reuse.insert("alert".into(), json!(true));
    reuse.insert(
        "cert_reuse".into(),
        json!("certificate in use from another source address"),
    );
    lines.push(reuse);
    // 02:21..: a walk over databases and roles, refused.
    let walk = [
        ("hr", "billing"),
        ("payroll", "billing"),
        ("crm", "billing"),
        ("ledger", "billing"),
        ("inventory", "billing"),
        ("billing", "postgres"),
        ("billing", "admin"),
        ("billing", "reports_ro"),
    ];
    for (i, (db, role)) in walk.iter().enumerate() {
        lines.push(connect(
            &at(d, 2, 21 + i as i64),
            &stolen_billing,
            db,
            role,
            false,
        ));
    }
    // 02:31..: alice's MFA code brute-forced from the laptop until the sidecar locks it out.
    let target = Some(("billing", "postgres"));
    for i in 0..5 {
        let ts = at(d, 2, 31 + i);
        lines.push(line(
            &ts,
            "mfa_failure",
            Some("deny"),
            Some(&stolen_alice),
            target,
            "mfa_wrong_code",
        ));
    }
    let mut lockout = line(
        &at(d, 2, 36),
        "mfa_lockout",
        Some("deny"),
        Some(&stolen_alice),
        target,
        "mfa_locked_out",
    );
    lockout.insert("alert".into(), json!(true));
    lines.push(lockout);
    // 03:05: billing's certificate, revoked at 03:00, tried again: refused before identity.
    let mut revoked = line(&at(d, 3, 5), "connect", Some("deny"), None, None, "revoked");
    revoked.insert("peer".into(), json!(format!("{LAPTOP_IP}:50001")));
    lines.push(revoked);
    lines.push(end(&at(d, 3, 30), &billing_a, "billing", "billing"));
    lines
}

/// Writes `lines` as a decision log: each gets `prev` and `hash` as audit.rs's module doc
/// defines them (`hash` = SHA-256 hex of prev ‖ "\n" ‖ the compact line without `hash`),
/// which `eastwall audit verify` then checks with the real code.
fn write_chained(path: &Path, lines: Vec<Map<String, Value>>) {
    let mut prev = "0".repeat(64);
    let mut out = String::new();
    for mut l in lines {
        l.insert("prev".into(), json!(prev));
        let body = serde_json::to_string(&Value::Object(l)).unwrap();
        let hash = hex::encode(Sha256::digest(format!("{prev}\n{body}").as_bytes()));
        out.push_str(&body[..body.len() - 1]);
        out.push_str(&format!(",\"hash\":\"{hash}\"}}\n"));
        prev = hash;
    }
    std::fs::write(path, out).unwrap();
}

// ---------------------------------------------------------------------------------------
// Running things, bounded.

fn eastwall(args: &[&str]) -> Output {
    eastwall_in(Path::new("."), args)
}

fn eastwall_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(eastwall_bin().expect("eastwall builds"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("eastwall runs")
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Debian's chromium: found on PATH; installed with apt-get when we are root (as tests/run
/// does); otherwise the test fails saying how to install it.
fn chromium() -> PathBuf {
    let find = || {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("chromium"))
                .find(|p| p.is_file())
        })
    };
    if let Some(found) = find() {
        return found;
    }
    let root = unsafe { libc::getuid() } == 0;
    let has_apt = Path::new("/usr/bin/apt-get").is_file();
    if root && has_apt {
        eprintln!("chromium not found; installing: apt-get install -y chromium");
        let install = |args: &[&str]| {
            let mut cmd = Command::new("apt-get");
            cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
            run_bounded(cmd, Duration::from_secs(900), "apt-get")
                .status
                .success()
        };
        if !install(&["install", "-y", "chromium"]) {
            install(&["update"]);
            install(&["install", "-y", "chromium"]);
        }
        if let Some(found) = find() {
            return found;
        }
        panic!("apt-get install -y chromium ran but there is still no chromium on PATH");
    }
    panic!(
        "chromium is not installed; this test renders the report in a real headless browser. \
         Install it with: sudo apt-get install chromium   (tests/run does this when run as root)"
    );
}

/// Runs `cmd` in its own process group with its output in files (no pipe to fill up),
/// killing the whole group if it outlives `timeout`.
fn run_bounded(mut cmd: Command, timeout: Duration, what: &str) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let (out_path, err_path) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > timeout {
            // The group holds chromium's helpers (zygote, GPU, renderer) too.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
            let err = std::fs::read_to_string(&err_path).unwrap_or_default();
            panic!("{what} did not finish within {timeout:?}; killed it. stderr:\n{err}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // Helpers that outlived the main process (they should not) go with the group.
    unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
    let read = |p: &Path| {
        let mut v = Vec::new();
        std::fs::File::open(p).unwrap().read_to_end(&mut v).unwrap();
        v
    };
    Output {
        status,
        stdout: read(&out_path),
        stderr: read(&err_path),
    }
}

/// Headless Chromium on `page` with `mode` (`--dump-dom` or `--screenshot=FILE`), a
/// throwaway profile, no network beyond the file.
fn chromium_run(browser: &Path, page: &Path, mode: &str) -> Output {
    let profile = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(browser);
    cmd.args([
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--hide-scrollbars",
        &format!("--user-data-dir={}", profile.path().display()),
        &format!("--window-size={},{}", WINDOW.0, WINDOW.1),
        mode,
        &format!("file://{}", page.display()),
    ]);
    let out = run_bounded(cmd, CHROMIUM_TIMEOUT, "chromium");
    assert!(
        out.status.success(),
        "chromium {mode} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

// ---------------------------------------------------------------------------------------
// PNG, decoded with flate2 (already in Cargo.lock) rather than a PNG crate.

struct Image {
    width: u32,
    height: u32,
    /// RGB per pixel, row by row.
    rgb: Vec<[u8; 3]>,
}

fn decode_png(bytes: &[u8]) -> Image {
    assert!(bytes.len() > 8, "not a PNG: {} bytes", bytes.len());
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "no PNG signature");
    let (mut at, mut ihdr, mut idat) = (8, None, Vec::new());
    while at + 12 <= bytes.len() {
        let len = u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        let kind = &bytes[at + 4..at + 8];
        let data = &bytes[at + 8..at + 8 + len];
        match kind {
            b"IHDR" => ihdr = Some(data.to_vec()),
            b"IDAT" => idat.extend_from_slice(data),
            b"IEND" => break,
            _ => {}
        }
        at += 12 + len;
    }
    let ihdr = ihdr.expect("no IHDR chunk");
    let width = u32::from_be_bytes(ihdr[0..4].try_into().unwrap());
    let height = u32::from_be_bytes(ihdr[4..8].try_into().unwrap());
    let (depth, colour, interlace) = (ihdr[8], ihdr[9], ihdr[12]);
    assert_eq!((depth, interlace), (8, 0), "expected 8-bit non-interlaced");
    let channels = match colour {
        2 => 3,
        6 => 4,
        other => panic!("unexpected PNG colour type {other}"),
    };
    let mut raw = Vec::new();
    flate2::read::ZlibDecoder::new(&idat[..])
        .read_to_end(&mut raw)
        .expect("IDAT inflates");
    let stride = width as usize * channels;
    assert_eq!(raw.len(), height as usize * (stride + 1), "IDAT size");
    let mut prior = vec![0u8; stride];
    let mut rgb = Vec::with_capacity(width as usize * height as usize);
    for row in raw.chunks_exact(stride + 1) {
        let (filter, src) = (row[0], &row[1..]);
        let mut cur = vec![0u8; stride];
        for i in 0..stride {
            let a = if i >= channels {
                cur[i - channels] as i16
            } else {
                0
            };
            let b = prior[i] as i16;
            let c = if i >= channels {
                prior[i - channels] as i16
            } else {
                0
            };
            let predicted = match filter {
                0 => 0,
                1 => a,
                2 => b,
                3 => (a + b) / 2,
                4 => {
                    let p = a + b - c;
                    let (pa, pb, pc) = ((p - a).abs(), (p - b).abs(), (p - c).abs());
                    if pa <= pb && pa <= pc {
                        a
                    } else if pb <= pc {
                        b
                    } else {
                        c
                    }
                }
                other => panic!("bad PNG filter {other}"),
            };
            cur[i] = src[i].wrapping_add(predicted as u8);
        }
        rgb.extend(cur.chunks_exact(channels).map(|p| [p[0], p[1], p[2]]));
        prior = cur;
    }
    Image { width, height, rgb }
}

impl Image {
    /// Pixels within `tolerance` of `colour` on every channel.
    fn count_near(&self, colour: [u8; 3], tolerance: u8) -> usize {
        self.rgb
            .iter()
            .filter(|p| (0..3).all(|i| p[i].abs_diff(colour[i]) <= tolerance))
            .count()
    }
}

// ---------------------------------------------------------------------------------------

#[test]
fn chromium_renders_the_seed_attack_report_with_its_graph_timeline_and_signals() {
    let browser = chromium();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("decisions.log");
    write_chained(&log, seed_attack_log());
    let page = dir.path().join("report.html");
    // Relative names, as an operator types them; the page's header shows them.
    let out = eastwall_in(
        dir.path(),
        &["audit", "report", "decisions.log", "--out", "report.html"],
    );
    let (stdout, stderr) = text(&out);
    assert!(
        out.status.success(),
        "audit report failed: {stdout}{stderr}"
    );
    assert!(stdout.contains("wrote report.html: "), "{stdout}");
    let wrote = stdout
        .lines()
        .find(|l| l.starts_with("wrote "))
        .unwrap_or_else(|| panic!("{stdout}"));
    // `wrote FILE: N lines, M signals`: every line of the log, the seed's signals.
    let counts: Vec<u64> = wrote
        .rsplit(": ")
        .next()
        .unwrap()
        .split(", ")
        .map(|part| part.split(' ').next().unwrap().parse().unwrap())
        .collect();
    let lines = std::fs::read_to_string(&log).unwrap().lines().count() as u64;
    assert_eq!(counts[0], lines, "{wrote}");
    assert!(counts[1] >= 9, "{wrote}");

    let dom = chromium_run(&browser, &page, "--dump-dom");
    let dom = String::from_utf8_lossy(&dom.stdout);
    // The flow graph: identities on the left, targets on the right, edges by decision.
    let flows = section(&dom, "<svg id=\"flows\"", "</svg>");
    for needle in [
        LAPTOP,
        BILLING,
        "spiffe://corp.example/app/operators/alice",
        "payroll / billing",
        "class=\"edge allow\"",
        "class=\"edge deny\"",
        "class=\"edge challenge\"",
        "class=\"node identity denied\"",
    ] {
        assert!(
            flows.contains(needle),
            "flow graph lacks {needle}:\n{flows}"
        );
    }
    // The timeline: one row per signal, a marker for each, all five of the seed's signals.
    let timeline = section(&dom, "<svg id=\"timeline\"", "</svg>");
    for name in [
        "new_flow",
        "shared_admin",
        "odd_hour",
        "credential_anomaly",
        "fan_out",
    ] {
        assert!(
            timeline.contains(&format!(">{name}</text>"))
                && timeline.contains(&format!("data-signal=\"{name}\"")),
            "timeline lacks {name}:\n{timeline}"
        );
    }
    for evidence in [
        "cert_two_sources",
        "mfa_brute_force",
        "distinct_databases",
        "new_identity",
        LAPTOP_IP,
    ] {
        assert!(
            timeline.contains(evidence),
            "no marker title names {evidence}"
        );
    }
    // Top talkers and the evidence list.
    let talkers = section(&dom, "<section id=\"talkers\"", "</section>");
    assert!(
        talkers.contains(LAPTOP_IP) && talkers.contains("10.1.0.5"),
        "{talkers}"
    );
    let signals = section(&dom, "<table id=\"signals\"", "</table>");
    assert!(
        signals.contains("certificate b1") && signals.contains("revoked_cert_retry"),
        "{signals}"
    );

    let png_path = dir.path().join("report.png");
    chromium_run(
        &browser,
        &page,
        &format!("--screenshot={}", png_path.display()),
    );
    let bytes = std::fs::read(&png_path).expect("chromium wrote the screenshot");
    let image = decode_png(&bytes);
    assert_eq!((image.width, image.height), WINDOW, "screenshot size");
    let pixels = image.rgb.len();
    let non_white = pixels - image.count_near([255, 255, 255], 8);
    assert!(
        non_white > pixels / 20,
        "mostly blank: {non_white} of {pixels} pixels are not white"
    );
    // The edges' colours made it to the screen: green allows and red denials (anti-aliasing
    // and opacity blend them, so count anything close).
    let green = image.count_near([0x16, 0xa3, 0x4a], 60) + image.count_near([0x7c, 0xc9, 0x94], 40);
    let red = image.count_near([0xdc, 0x26, 0x26], 60) + image.count_near([0xe9, 0x7b, 0x7b], 40);
    assert!(
        green > 200 && red > 200,
        "edge colours: {green} green, {red} red pixels"
    );

    if let Some(keep) = std::env::var_os("EASTWALL_REPORT_KEEP") {
        let keep = PathBuf::from(keep);
        std::fs::create_dir_all(&keep).unwrap();
        for f in ["decisions.log", "report.html", "report.png"] {
            std::fs::copy(dir.path().join(f), keep.join(f)).unwrap();
        }
    }
}

#[test]
fn chromium_shows_log_text_made_of_markup_as_text() {
    let browser = chromium();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("decisions.log");
    let evil = Who {
        id: HOSTILE_ID.into(),
        serial: "e1".into(),
        ip: "10.6.6.6".into(),
    };
    let lines = vec![
        connect(
            &at(0, 1, 0),
            &evil,
            "</svg><script>alert(3)</script>",
            "\"onmouseover=\"alert(4)",
            false,
        ),
        connect(
            &at(0, 1, 1),
            &who("app/billing", "b1", "10.1.0.5"),
            "billing",
            "billing",
            true,
        ),
    ];
    write_chained(&log, lines);
    let page = dir.path().join("report.html");
    let out = eastwall(&[
        "audit",
        "report",
        log.to_str().unwrap(),
        "--out",
        page.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{:?}", text(&out));
    let dom = chromium_run(&browser, &page, "--dump-dom");
    let dom = String::from_utf8_lossy(&dom.stdout);
    // Chromium parsed no element and no attribute out of the log's text.
    for (name, attributes) in tags(&dom) {
        assert!(
            !["script", "img", "iframe", "object"].contains(&name.as_str()),
            "a <{name}> element:\n{dom}"
        );
        for a in attributes {
            assert!(
                !a.starts_with("on") && a != "src",
                "attribute {a} on <{name}>:\n{dom}"
            );
        }
    }
    // It is on the page as text, in the graph too, and both SVGs are still whole.
    assert!(
        dom.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
        "{dom}"
    );
    assert!(section(&dom, "<svg id=\"flows\"", "</svg>").contains("alert(3)"));
    assert!(dom.contains("<svg id=\"timeline\""));
}

#[test]
fn a_broken_chain_gives_file_line_and_no_page_and_an_existing_page_needs_force() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("decisions.log");
    let billing = who("app/billing", "b1", "10.1.0.5");
    let lines = (0..5)
        .map(|i| connect(&at(0, 1, i), &billing, "billing", "billing", true))
        .collect();
    write_chained(&log, lines);
    let page = dir.path().join("report.html");
    let (log_s, page_s) = (log.to_str().unwrap(), page.to_str().unwrap());

    let out = eastwall(&["audit", "report", log_s, "--out", page_s]);
    let (stdout, _) = text(&out);
    assert!(out.status.success(), "{:?}", text(&out));
    assert!(
        stdout.contains("wrote ") && stdout.contains(": 5 lines, "),
        "{stdout}"
    );
    let meta = std::fs::metadata(&page).unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(meta.permissions().mode() & 0o777, 0o644);

    // An existing page is not replaced without --force.
    let before = std::fs::read(&page).unwrap();
    let out = eastwall(&["audit", "report", log_s, "--out", page_s]);
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(
        stderr.contains("already exists; pass --force to replace it"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&page).unwrap(), before);
    let out = eastwall(&["audit", "report", log_s, "--out", page_s, "--force"]);
    assert!(out.status.success(), "{:?}", text(&out));

    // The log itself is never the page, not even with --force.
    let out = eastwall(&["audit", "report", log_s, "--out", log_s, "--force"]);
    assert!(!out.status.success());
    assert!(
        text(&out).1.contains("is the decision log being"),
        "{:?}",
        text(&out)
    );
    assert_eq!(eastwall(&["audit", "verify", log_s]).status.code(), Some(0));

    // Line 3 edited: FILE:3, exit 1, and no page written.
    let mut edited: Vec<String> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    edited[2] = edited[2].replace("\"database\":\"billing\"", "\"database\":\"payroll\"");
    let edited = edited.join("\n") + "\n";
    std::fs::write(&log, edited).unwrap();
    let fresh = dir.path().join("fresh.html");
    let out = eastwall(&["audit", "report", log_s, "--out", fresh.to_str().unwrap()]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.starts_with(&format!("{log_s}:3: ")), "{stderr}");
    assert!(!fresh.exists(), "a page was written for a broken chain");
}

/// The text from `start` to the next `end` after it.
fn section<'a>(dom: &'a str, start: &str, end: &str) -> &'a str {
    let from = dom
        .find(start)
        .unwrap_or_else(|| panic!("no {start} in the DOM:\n{dom}"));
    let to = dom[from..]
        .find(end)
        .map_or(dom.len(), |i| from + i + end.len());
    &dom[from..to]
}

/// Every start tag of a serialized DOM: its name and attribute names. A tag ends at the first
/// `>` outside a quoted value; text never holds a raw `<` (the serializer escapes it).
fn tags(dom: &str) -> Vec<(String, Vec<String>)> {
    let mut found = Vec::new();
    let mut rest = dom;
    while let Some(at) = rest.find('<') {
        rest = &rest[at + 1..];
        let (mut quote, mut end) = (false, rest.len());
        for (i, c) in rest.char_indices() {
            match c {
                '"' => quote = !quote,
                '>' if !quote => {
                    end = i;
                    break;
                }
                _ => {}
            }
        }
        let inside = &rest[..end];
        rest = &rest[end..];
        if inside.starts_with('/') || inside.starts_with('!') {
            continue;
        }
        let bare: String = inside.split('"').step_by(2).collect::<Vec<_>>().join(" ");
        let mut words = bare.split_whitespace();
        let name = words.next().unwrap_or("").to_ascii_lowercase();
        let attributes = words
            .map(|w| w.split('=').next().unwrap_or("").to_ascii_lowercase())
            .filter(|a| !a.is_empty())
            .collect();
        found.push((name, attributes));
    }
    found
}
