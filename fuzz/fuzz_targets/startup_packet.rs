//! Fuzz target: the front door's decoders must never panic or over-allocate on any bytes a
//! client sends before it has a session.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    // Decode as many packets as the bytes hold, as the front door would.
    while let Ok(Some(_)) = eastwall::codec::decode_startup(&mut buf) {}
    let mut buf = BytesMut::from(data);
    while let Ok(Some(msg)) = eastwall::codec::decode_message(&mut buf, eastwall::codec::MAX_PASSWORD_LEN) {
        let _ = eastwall::codec::parse_password(&msg.body);
        let _ = eastwall::codec::parse_auth_request(&msg.body);
        let _ = eastwall::codec::parse_error_fields(&msg.body);
    }
});
