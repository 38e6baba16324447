#!/usr/bin/env python3
"""bench/report.py: turns bench/run's raw results into report.md (goal table) and report.svg.

Usage: report.py RESULTS_DIR REPORT_MD REPORT_SVG. Standard library only.
"""
import json
import os
import statistics
import sys


def load_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def pairwise(rows, peer, key, combine):
    """Per-pair combine(direct, peer) for pgbench rows; returns (median, min, max) or None."""
    by = {}
    for r in rows:
        by.setdefault(r["pair"], {})[r["peer"]] = r
    vals = []
    for pair in sorted(by):
        d, p = by[pair].get("direct"), by[pair].get(peer)
        if d and p and d[key]:
            vals.append(combine(d[key], p[key]))
    if not vals:
        return None
    return statistics.median(vals), min(vals), max(vals)


def pair_of(rows, a, b, key):
    """Per-pair b/a between two peers (e.g. eastwall over pgbouncer)."""
    by = {}
    for r in rows:
        by.setdefault(r["pair"], {})[r["peer"]] = r
    vals = [by[p][b][key] / by[p][a][key] for p in by if a in by[p] and b in by[p] and by[p][a][key]]
    return (statistics.median(vals), min(vals), max(vals)) if vals else None


def med(rows, peer, fn):
    vals = [fn(r) for r in rows if r["peer"] == peer]
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def lt_runs(doc, side, key):
    if not doc:
        return {}
    return {r["pair"]: r["figures"][key] for r in doc["runs"] if r["side"] == side and key in r["figures"]}


def lt_ratio(doc, key):
    if not doc or key not in doc.get("compared", {}):
        return None
    c = doc["compared"][key]
    return c


def lt_delta(doc, key):
    """Per-pair proxy - direct of a latency figure: (direct median, proxy median, delta med/min/max)."""
    d, p = lt_runs(doc, "direct", key), lt_runs(doc, "proxy", key)
    deltas = [p[k] - d[k] for k in d if k in p]
    if not deltas:
        return None
    return statistics.median(d.values()), statistics.median(p.values()), (
        statistics.median(deltas), min(deltas), max(deltas))


def lt_proxy_only(doc, key):
    if not doc:
        return None
    return doc.get("proxy_only", {}).get(key)


def fmt(v, unit=""):
    if v is None:
        return "–"
    if abs(v) >= 1000:
        s = f"{v:,.0f}"
    elif abs(v) >= 100:
        s = f"{v:.0f}"
    elif abs(v) >= 10:
        s = f"{v:.1f}"
    else:
        s = f"{v:.2f}"
    return s + unit


def fmt_r(r):
    if r is None:
        return "–"
    return f"{r[0]:.3f} [{r[1]:.3f}–{r[2]:.3f}]"


def fmt_d(r, unit=" µs"):
    if r is None:
        return "–"
    return f"{r[0]:+.1f}{unit} [{r[1]:+.1f} to {r[2]:+.1f}]"


def main():
    res, out_md, out_svg = sys.argv[1], sys.argv[2], sys.argv[3]
    machine = {}
    with open(os.path.join(res, "machine.txt")) as f:
        for line in f:
            k, _, v = line.rstrip("\n").partition("=")
            machine[k] = v
    pgb_why = ""
    try:
        with open(os.path.join(res, "pgbouncer_unavailable.txt")) as f:
            pgb_why = f.read().strip()
    except OSError:
        pass
    rows = []
    with open(os.path.join(res, "pgbench.jsonl")) as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
    bench = {}
    for r in rows:
        bench.setdefault(r["bench"], []).append(r)
    peers = sorted({r["peer"] for r in rows} - {"direct"}, key=lambda p: p != "eastwall")
    has_pgb = "pgbouncer" in peers
    lt = {}
    for name in ["query_c1", "query_c8", "connect", "idle", "copy"]:
        for peer in peers:
            lt[(name, peer)] = load_json(os.path.join(res, f"lt_{name}_{peer}.json"))

    table = []  # (metric, direct, ew, ew_ratio, goal, met, pgb, pgb_ratio, ew_vs_pgb, met_vs_pgb)
    chart = []  # (label, ew ratio, pgb ratio, goal)

    def tps_row(label, b, goal):
        rs = bench.get(b, [])
        d = med(rs, "direct", lambda r: r["tps"])
        e = med(rs, "eastwall", lambda r: r["tps"])
        er = pairwise(rs, "eastwall", "tps", lambda a, x: x / a)
        p = med(rs, "pgbouncer", lambda r: r["tps"]) if has_pgb else None
        pr = pairwise(rs, "pgbouncer", "tps", lambda a, x: x / a) if has_pgb else None
        vs = pair_of(rs, "pgbouncer", "eastwall", "tps") if has_pgb else None
        met = ("yes" if er[0] >= goal else f"no (short by {goal - er[0]:.3f})") if (er and goal) else ""
        metp = ("yes" if vs[0] >= 1.0 else f"no ({vs[0]:.3f})") if vs else "–"
        table.append((label, fmt(d), fmt(e), fmt_r(er), f"≥ {goal:.2f}" if goal else "(info)",
                      met, fmt(p), fmt_r(pr), fmt_r(vs), metp if goal else ""))
        if er:
            chart.append((label, er[0], pr[0] if pr else None, goal))

    tps_row("pgbench -S simple, c=8: tps", "select_simple_c8", 0.85)
    tps_row("pgbench -S prepared, c=8: tps", "select_prepared_c8", 0.80)
    tps_row("pgbench -S simple, c=1: tps", "select_simple_c1", None)
    tps_row("pgbench -S prepared, c=1: tps", "select_prepared_c1", None)
    tps_row("pgbench -S -C (new mTLS conn per tx), c=8: tps", "connect_c8", 1.0)

    # CPU per relayed query, from /proc utime+stime around each pgbench run.
    for label, b, goal in [("proxy CPU per query, -S simple c=8 (µs)", "select_simple_c8", 10.0),
                           ("proxy CPU per query, -S prepared c=8 (µs)", "select_prepared_c8", 10.0),
                           ("proxy CPU per new connection, -C c=8 (µs)", "connect_c8", None)]:
        rs = bench.get(b, [])
        per = lambda r: r["cpu_us"] / r["transactions"] if r["transactions"] else None
        e = med(rs, "eastwall", per)
        p = med(rs, "pgbouncer", per) if has_pgb else None
        met = ("yes" if e <= goal else f"no (over by {e - goal:.1f} µs)") if (e is not None and goal) else ""
        metp = ("yes" if e <= p else f"no ({e / p:.2f}× PgBouncer's)") if (e is not None and p) else "–"
        table.append((label, "–", fmt(e), "–", f"≤ {goal:.0f} µs" if goal else "(info)", met,
                      fmt(p), "–", f"{e / p:.2f}×" if (e is not None and p) else "–", metp if goal else ""))

    # Added latency at c=1, prepared, from eastwall-loadtest's per-query histograms.
    for key, goal, label in [("lat_p50_us", 25.0, "added latency c=1 p50 (µs)"),
                             ("lat_p99_us", 75.0, "added latency c=1 p99 (µs)"),
                             ("lat_p999_us", None, "added latency c=1 p99.9 (µs)")]:
        e = lt_delta(lt.get(("query_c1", "eastwall")), key)
        p = lt_delta(lt.get(("query_c1", "pgbouncer")), key) if has_pgb else None
        met = ("yes" if e[2][0] <= goal else f"no (over by {e[2][0] - goal:.1f} µs)") if (e and goal) else ""
        metp = ("yes" if e[2][0] <= p[2][0] else "no") if (e and p) else "–"
        table.append((label, fmt(e[0]) if e else "–", fmt(e[1]) if e else "–", fmt_d(e[2]) if e else "–",
                      f"≤ +{goal:.0f} µs" if goal else "(info)", met,
                      fmt(p[1]) if p else "–", fmt_d(p[2]) if p else "–", "–", metp if goal else ""))

    # Memory per idle admitted session.
    # The largest per-run delta: later runs reuse pages the allocator kept from earlier ones,
    # so the median would flatter; the high-water figure is the honest one.
    def high_water(doc, key):
        vals = lt_runs(doc, "proxy", key).values()
        return max(vals) if vals else None
    e = high_water(lt.get(("idle", "eastwall")), "proxy_rss_anon_kib_per_session")
    e_rss = high_water(lt.get(("idle", "eastwall")), "proxy_rss_kib_per_session")
    p = high_water(lt.get(("idle", "pgbouncer")), "proxy_rss_anon_kib_per_session") if has_pgb else None
    met = ("yes" if e <= 24 else f"no (over by {e - 24:.1f} KiB)") if e is not None else ""
    metp = ("yes" if e <= p else f"no ({e:.1f} vs {p:.1f} KiB)") if (e is not None and p is not None) else "–"
    table.append(("proxy memory per idle session, RssAnon delta (KiB)", "–",
                  fmt(e) + (f" (VmRSS {fmt(e_rss)})" if e_rss is not None else ""), "–", "≤ 24 KiB", met,
                  fmt(p), "–", "–", metp))

    # COPY out / in.
    for key, label in [("copy_out_mb_s", "COPY out (TO STDOUT), MB/s"), ("copy_in_mb_s", "COPY in (FROM STDIN), MB/s")]:
        e = lt_ratio(lt.get(("copy", "eastwall")), key)
        p = lt_ratio(lt.get(("copy", "pgbouncer")), key) if has_pgb else None
        er = (e["ratio_median"], e["ratio_min"], e["ratio_max"]) if e else None
        pr = (p["ratio_median"], p["ratio_min"], p["ratio_max"]) if p else None
        met = ("yes" if er[0] >= 0.95 else f"no (short by {0.95 - er[0]:.3f})") if er else ""
        metp = ("yes" if p and e["proxy_median"] >= p["proxy_median"] else "no") if (e and p) else "–"
        table.append((label, fmt(e["direct_median"]) if e else "–", fmt(e["proxy_median"]) if e else "–",
                      fmt_r(er), "≥ 0.95", met, fmt(p["proxy_median"]) if p else "–", fmt_r(pr),
                      f"{e['proxy_median'] / p['proxy_median']:.3f}" if (e and p) else "–", metp))
        if er:
            chart.append((label, er[0], pr[0] if pr else None, 0.95))

    # Handshake-only churn from the loadtest (full mTLS handshake, startup, select 1, close).
    e = lt_ratio(lt.get(("connect", "eastwall")), "conn_per_s")
    p = lt_ratio(lt.get(("connect", "pgbouncer")), "conn_per_s") if has_pgb else None
    if e:
        er = (e["ratio_median"], e["ratio_min"], e["ratio_max"])
        pr = (p["ratio_median"], p["ratio_min"], p["ratio_max"]) if p else None
        table.append(("loadtest connect churn, c=4: conn/s", fmt(e["direct_median"]), fmt(e["proxy_median"]),
                      fmt_r(er), "(info)", "", fmt(p["proxy_median"]) if p else "–", fmt_r(pr),
                      f"{e['proxy_median'] / p['proxy_median']:.3f}" if p else "–", ""))
        chart.append(("loadtest connect churn c=4", er[0], pr[0] if pr else None, None))
    e = lt_ratio(lt.get(("query_c8", "eastwall")), "tps")
    p = lt_ratio(lt.get(("query_c8", "pgbouncer")), "tps") if has_pgb else None
    if e:
        er = (e["ratio_median"], e["ratio_min"], e["ratio_max"])
        pr = (p["ratio_median"], p["ratio_min"], p["ratio_max"]) if p else None
        cpu = lt_proxy_only(lt.get(("query_c8", "eastwall")), "proxy_cpu_us_per_query")
        cpup = lt_proxy_only(lt.get(("query_c8", "pgbouncer")), "proxy_cpu_us_per_query") if has_pgb else None
        table.append(("loadtest query simple, c=8: tps (proxy CPU µs/query)", fmt(e["direct_median"]),
                      f"{fmt(e['proxy_median'])} ({fmt(cpu)})", fmt_r(er), "(info)", "",
                      f"{fmt(p['proxy_median'])} ({fmt(cpup)})" if p else "–", fmt_r(pr), "–", ""))

    lines = []
    lines.append("# Eastwall benchmark report\n")
    lines.append("Produced by `bench/run` (one command). Every ratio is the median of per-pair ratios "
                 "(runs alternate direct, Eastwall, PgBouncer, direct, …), with min–max over the pairs.\n")
    lines.append("## Machine and settings\n")
    for k in ["cpu", "nproc", "kernel", "postgres", "pgbench", "pgbouncer", "eastwall_commit",
              "seconds_pgbench", "seconds_loadtest", "pairs", "scale"]:
        lines.append(f"- {k}: {machine.get(k, '?')}")
    lines.append("")
    lines.append("Setup: PostgreSQL 15 on 127.0.0.1 with `ssl = on`, TLS 1.3 only, "
                 "`hostssl all all 127.0.0.1/32 cert clientcert=verify-full`, server certificate and "
                 "`ssl_ca_file` from the quickstart CA. Every path (direct, Eastwall, PgBouncer) is mTLS "
                 "with `sslmode=verify-full` and the same billing SVID (CN=billing, URI "
                 "spiffe://corp.example/app/billing). Eastwall is `eastwall quickstart` + `eastwall proxy`, "
                 "logging in to PostgreSQL over its Unix socket (trust for local). PgBouncer: "
                 "`auth_type = cert`, `client_tls_sslmode = verify-full`, `pool_mode = session`, server "
                 "over the Unix socket. Eastwall's TLS session resumption is off on purpose: every "
                 "connection is a full handshake that re-verifies the client certificate and the CRL. "
                 "All three share the machine's 2 cores with pgbench (nothing pinned).\n")
    if not has_pgb:
        lines.append(f"**PgBouncer could not be set up:** {pgb_why or 'unknown reason'}\n")
    lines.append("## Goals\n")
    hdr = ["metric", "direct", "Eastwall", "Eastwall/direct median [min–max]", "goal", "met?",
           "PgBouncer", "PgBouncer/direct", "Eastwall vs PgBouncer", "better than PgBouncer?"]
    lines.append("| " + " | ".join(hdr) + " |")
    lines.append("|" + "---|" * len(hdr))
    for row in table:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    lines.append("")
    lines.append("Added latency rows: direct and Eastwall columns are medians of the per-run percentiles; "
                 "the third column is the per-pair difference (proxy − direct). CPU rows divide the proxy "
                 "process's utime+stime delta (/proc/PID/stat) by the transactions pgbench reports. "
                 "Memory: (RssAnon with N idle admitted sessions − RssAnon before) / N, the largest over the pairs "
                 "(later runs reuse pages the allocator kept, so they read lower).\n")
    lines.append("![proxy/direct ratios](report.svg)\n")
    cg = load_json(os.path.join(res, "callgrind.json"))
    lines.append("## Regression figure (callgrind, deterministic)\n")
    if cg:
        lines.append(f"- instructions per relayed query: **{cg['ir_per_query']:,}**")
        lines.append(f"- instructions per full mTLS handshake (accept, TLS 1.3 with client certificate "
                     f"and CRL check, startup, policy decision, audit record, upstream login, close): "
                     f"**{cg['ir_per_handshake']:,}**")
        lines.append(f"- raw: workload A (1 connection, 2000 prepared selects) {cg['ir_workload_a']:,} Ir; "
                     f"workload B (100 connections of 1 simple select) {cg['ir_workload_b']:,} Ir\n")
    else:
        lines.append("Not measured in this run (valgrind/callgrind_control missing, or CALLGRIND=0).\n")
    lines.append("## Raw runs (pgbench)\n")
    lines.append("| bench | pair | peer | tps | transactions | proxy CPU µs |")
    lines.append("|---|---|---|---|---|---|")
    for r in rows:
        lines.append(f"| {r['bench']} | {r['pair'] + 1} | {r['peer']} | {fmt(r['tps'])} | {r['transactions']} | "
                     f"{r['cpu_us'] if r['peer'] != 'direct' else '–'} |")
    lines.append("")
    lines.append("Loadtest JSON for every run is in `bench/results/`.\n")
    with open(out_md, "w") as f:
        f.write("\n".join(lines))

    write_svg(out_svg, chart, has_pgb)


def write_svg(path, chart, has_pgb):
    """Horizontal bars of proxy/direct ratios, one group per metric, with the goal marked."""
    left, width, bar_h, gap = 330, 420, 14, 14
    scale_max = max([1.2] + [v for _, e, p, _ in chart for v in (e, p) if v is not None])
    scale_max = min(scale_max, 3.0)
    group_h = bar_h * (2 if has_pgb else 1) + gap
    height = 60 + group_h * len(chart) + 30
    x = lambda v: left + width * min(v, scale_max) / scale_max
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 90}" height="{height}" '
           'font-family="sans-serif" font-size="12">',
           '<rect width="100%" height="100%" fill="white"/>',
           f'<text x="10" y="20" font-size="14" font-weight="bold">Throughput through the peer / direct mTLS '
           '(median of per-pair ratios; 1.0 = no cost)</text>',
           f'<rect x="{left}" y="30" width="12" height="10" fill="#2b6cb0"/>'
           f'<text x="{left + 16}" y="39">Eastwall</text>']
    if has_pgb:
        out.append(f'<rect x="{left + 90}" y="30" width="12" height="10" fill="#dd6b20"/>'
                   f'<text x="{left + 106}" y="39">PgBouncer (cert auth)</text>')
    out.append(f'<text x="{left + 250}" y="39">| goal</text>')
    y = 55
    for label, e, p, goal in chart:
        out.append(f'<text x="{left - 8}" y="{y + bar_h}" text-anchor="end">{escape(label)}</text>')
        out.append(f'<rect x="{left}" y="{y}" width="{x(e) - left:.1f}" height="{bar_h - 2}" fill="#2b6cb0"/>')
        out.append(f'<text x="{x(e) + 4:.1f}" y="{y + bar_h - 3}">{e:.3f}</text>')
        if has_pgb and p is not None:
            yy = y + bar_h
            out.append(f'<rect x="{left}" y="{yy}" width="{x(p) - left:.1f}" height="{bar_h - 2}" fill="#dd6b20"/>')
            out.append(f'<text x="{x(p) + 4:.1f}" y="{yy + bar_h - 3}">{p:.3f}</text>')
        if goal:
            out.append(f'<line x1="{x(goal):.1f}" x2="{x(goal):.1f}" y1="{y - 2}" y2="{y + group_h - gap + 2}" '
                       'stroke="black" stroke-width="2"/>')
        y += group_h
    out.append(f'<line x1="{x(1.0):.1f}" x2="{x(1.0):.1f}" y1="50" y2="{y}" stroke="#888" stroke-dasharray="4 3"/>')
    out.append(f'<text x="{x(1.0):.1f}" y="{y + 14}" text-anchor="middle">1.0</text>')
    out.append(f'<text x="{left}" y="{y + 14}" text-anchor="middle">0</text>')
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def escape(s):
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


if __name__ == "__main__":
    main()
