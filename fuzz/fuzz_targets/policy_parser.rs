//! Fuzz target: the policy parser must never panic, whatever bytes a policy file holds.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Real segment and group names, so inputs that name them reach the evaluator's tables.
    let segments = BTreeMap::from([
        (
            "app".to_owned(),
            vec!["spiffe://corp.example/app/**".to_owned()],
        ),
        (
            "db".to_owned(),
            vec!["spiffe://corp.example/db/**".to_owned()],
        ),
    ]);
    let groups = BTreeMap::from([(
        "human_operators".to_owned(),
        vec!["spiffe://corp.example/app/operators/*".to_owned()],
    )]);
    let text = String::from_utf8_lossy(data);
    let _ = eastwall_config::Policy::parse("fuzz.ew", &text, &segments, &groups);
});
