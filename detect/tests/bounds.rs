//! Memory stays bounded: 100,000 identities, each from its own address, fit under the configured cap and a stated size.

mod common;

use common::*;
use eastwall_detect::{Detectors, Settings, Span};

/// 100,000 workloads, each its own identity, certificate and address, each connecting once
/// (and one session ending), after the learning period so every one is a new flow.
fn crowd(d: &mut Detectors, n: u32) -> usize {
    let mut signals = 0;
    for i in 0..n {
        let w = who(
            &format!("app/service-{i:06}"),
            &format!("{i:08x}"),
            &format!("10.{}.{}.{}", i >> 16, (i >> 8) & 0xff, i & 0xff),
        );
        let at = t(8, 0, 0).plus(Span(i64::from(i) * 10));
        signals += d.observe_line(&connect(at, &w, "app", "app", true)).len();
        d.observe_line(&end(at.plus(Span(5)), &w, "app", "app"));
    }
    signals
}

/// The bound we state: 1 KiB per tracked key, across all tables.
const BYTES_PER_KEY: usize = 1024;

#[test]
fn a_hundred_thousand_identities_stay_within_the_stated_bound() {
    let mut d = Detectors::new(Settings::default()).unwrap();
    // Learning started a week before the crowd arrives.
    d.observe_line(&connect(
        t(0, 0, 0),
        &who("app/first", "f", "10.255.0.1"),
        "app",
        "app",
        true,
    ));
    let signals = crowd(&mut d, 100_000);
    let s = d.state();
    let max = d.settings().max_keys;
    assert!(s.largest_table() <= max, "{} > {max}", s.largest_table());
    assert_eq!(
        s.profiles.len(),
        100_001,
        "every identity fits under the default cap"
    );
    let bytes = d.approx_bytes();
    println!(
        "100k identities x sources: approx_bytes = {bytes} ({:.1} MiB); tables: profiles {}, certs {}, reach {}, fired {}; new_flow signals {signals}",
        bytes as f64 / (1024.0 * 1024.0),
        s.profiles.len(),
        s.certs.len(),
        s.reach.len(),
        s.fired.len()
    );
    let keys = s.profiles.len()
        + s.certs.len()
        + s.reach.len()
        + s.fired.len()
        + s.roles.len()
        + s.failures.len();
    assert!(
        bytes <= keys * BYTES_PER_KEY,
        "{bytes} bytes for {keys} keys"
    );
    assert_eq!(
        signals, 100_000,
        "one new_flow per new identity, each de-duplicated on its own"
    );
}

#[test]
fn a_small_cap_holds_under_the_same_crowd_by_evicting_the_oldest() {
    let settings = Settings {
        max_keys: 5_000,
        ..Settings::default()
    };
    let mut d = Detectors::new(settings).unwrap();
    crowd(&mut d, 100_000);
    let s = d.state();
    assert!(s.largest_table() <= 5_000);
    assert_eq!(s.profiles.len(), 5_000);
    assert!(s.profiles.evicted() >= 95_000);
    // The newest survive: the last identity is still known, the first is gone.
    assert!(s
        .profiles
        .get(&"spiffe://corp.example/app/service-099999".to_owned())
        .is_some());
    assert!(s
        .profiles
        .get(&"spiffe://corp.example/app/service-000000".to_owned())
        .is_none());
    // And a reload under a smaller cap cuts to it.
    let smaller = Settings {
        max_keys: 100,
        ..Settings::default()
    };
    let back = Detectors::restore(smaller, &d.save()).unwrap();
    assert!(back.state().largest_table() <= 100);
}
