//! How long one policy decision takes: it runs on every connection, so it must stay far below 1 µs.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};

use criterion::{criterion_group, criterion_main, Criterion};
use eastwall_ca::spiffe::SpiffeId;
use eastwall_config::{authorize, Policy, Request};

fn sets(entries: &[(&str, &str)]) -> BTreeMap<String, Vec<String>> {
    entries
        .iter()
        .map(|(k, v)| (k.to_string(), vec![v.to_string()]))
        .collect()
}

fn bench(c: &mut Criterion) {
    let segments = sets(&[
        ("app", "spiffe://corp.example/app/**"),
        ("workstations", "spiffe://corp.example/workstations/**"),
        ("db", "spiffe://corp.example/db/**"),
        ("domain", "spiffe://corp.example/domain/**"),
    ]);
    let groups = sets(&[("human_operators", "spiffe://corp.example/app/operators/*")]);
    let policy = Policy::parse(
        "policy.ew",
        include_str!("../../examples/policy.ew"),
        &segments,
        &groups,
    )
    .expect("the seed policy parses");

    let cases = [
        (
            "allow_service",
            "spiffe://corp.example/app/billing",
            "billing",
            false,
        ),
        (
            "deny_alert_workstation",
            "spiffe://corp.example/workstations/finance-laptop",
            "finance-laptop",
            false,
        ),
        (
            "challenge_operator",
            "spiffe://corp.example/app/operators/alice",
            "alice",
            false,
        ),
        (
            "allow_operator_with_mfa",
            "spiffe://corp.example/app/operators/alice",
            "alice",
            true,
        ),
        (
            "deny_default",
            "spiffe://corp.example/printers/floor-3",
            "floor-3",
            false,
        ),
        (
            "deny_wrong_role",
            "spiffe://corp.example/app/billing",
            "postgres",
            false,
        ),
    ];
    let mut group = c.benchmark_group("authorize");
    for (name, id, user, mfa) in cases {
        let id = SpiffeId::parse(id).expect("valid id");
        let req = Request {
            id: &id,
            source: IpAddr::V4(Ipv4Addr::LOCALHOST),
            segment: "db",
            port: 5432,
            user,
            database: "billing",
            mfa_fresh: mfa,
            mfa_roles: None,
        };
        group.bench_function(name, |b| {
            b.iter(|| authorize(black_box(&policy), black_box(&req)))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
