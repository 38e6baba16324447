//! The PostgreSQL wire codec: pure functions over bytes, no I/O, no trust in any length.
//!
//! Decoders take a `BytesMut` and return `Ok(None)` until a whole message is buffered; they
//! consume exactly one message on success and reject lengths outside the stated bounds before
//! allocating anything. Encoders append to a `BytesMut` and back-fill the length.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// SSLRequest's "protocol version" (1234.5679).
pub const SSL_REQUEST_CODE: u32 = 80_877_103;
/// GSSENCRequest's "protocol version" (1234.5680).
pub const GSSENC_REQUEST_CODE: u32 = 80_877_104;
/// CancelRequest's "protocol version" (1234.5678).
pub const CANCEL_REQUEST_CODE: u32 = 80_877_102;
/// Protocol 3.0, the only version Eastwall speaks to clients.
pub const PROTOCOL_3_0: u32 = 0x0003_0000;
/// PostgreSQL's MAX_STARTUP_PACKET_LENGTH: longer startup packets are an attack or a bug.
pub const MAX_STARTUP_LEN: usize = 10_000;
/// A startup packet is at least its length and its code.
pub const MIN_STARTUP_LEN: usize = 8;
/// PG_MAX_AUTH_TOKEN_LENGTH: the longest PasswordMessage PostgreSQL itself accepts.
pub const MAX_PASSWORD_LEN: usize = 65_535;
/// The largest backend message we buffer during upstream login (before the relay starts).
pub const MAX_LOGIN_MESSAGE_LEN: usize = 1 << 20;
/// A CancelRequest carries a key of 4 (protocol 3.0) to 256 (3.2) bytes.
const MAX_CANCEL_KEY_LEN: usize = 256;

/// Why bytes are not a valid message; every variant is a protocol violation (SQLSTATE 08P01).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("startup packet length {0} is outside {MIN_STARTUP_LEN}..={MAX_STARTUP_LEN}")]
    StartupLength(u32),
    #[error("message length {len} is outside 4..={max}")]
    MessageLength { len: u32, max: usize },
    #[error("invalid startup packet layout: {0}")]
    StartupLayout(&'static str),
    #[error("malformed {0} message")]
    Malformed(&'static str),
}

/// The first packet(s) a client sends, before any regular message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupPacket {
    SslRequest,
    GssEncRequest,
    Cancel { pid: u32, key: Bytes },
    Startup(StartupMessage),
}

/// A StartupMessage: the protocol version the client asks for and its parameters in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartupMessage {
    pub version: u32,
    pub params: Vec<(String, String)>,
}

impl StartupMessage {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Decodes one startup-phase packet (untagged, length-prefixed).
pub fn decode_startup(buf: &mut BytesMut) -> Result<Option<StartupPacket>, CodecError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    let len_usize = len as usize;
    if !(MIN_STARTUP_LEN..=MAX_STARTUP_LEN).contains(&len_usize) {
        return Err(CodecError::StartupLength(len));
    }
    if buf.len() < len_usize {
        return Ok(None);
    }
    let mut packet = buf.split_to(len_usize).freeze();
    packet.advance(4);
    let code = packet.get_u32();
    match code {
        SSL_REQUEST_CODE if packet.is_empty() => Ok(Some(StartupPacket::SslRequest)),
        GSSENC_REQUEST_CODE if packet.is_empty() => Ok(Some(StartupPacket::GssEncRequest)),
        SSL_REQUEST_CODE | GSSENC_REQUEST_CODE => Err(CodecError::StartupLayout(
            "encryption request with trailing bytes",
        )),
        CANCEL_REQUEST_CODE => {
            if packet.len() < 8 || packet.len() > 4 + MAX_CANCEL_KEY_LEN {
                return Err(CodecError::StartupLayout(
                    "cancel request of the wrong size",
                ));
            }
            let pid = packet.get_u32();
            Ok(Some(StartupPacket::Cancel { pid, key: packet }))
        }
        version => Ok(Some(StartupPacket::Startup(StartupMessage {
            version,
            params: decode_params(&packet)?,
        }))),
    }
}

fn decode_params(mut body: &[u8]) -> Result<Vec<(String, String)>, CodecError> {
    let mut params = Vec::new();
    loop {
        let name = take_cstr(&mut body).ok_or(CodecError::StartupLayout("missing terminator"))?;
        if name.is_empty() {
            if !body.is_empty() {
                return Err(CodecError::StartupLayout(
                    "bytes after the final terminator",
                ));
            }
            return Ok(params);
        }
        let value =
            take_cstr(&mut body).ok_or(CodecError::StartupLayout("parameter without a value"))?;
        let name = String::from_utf8(name.to_vec())
            .map_err(|_| CodecError::StartupLayout("parameter name is not UTF-8"))?;
        let value = String::from_utf8(value.to_vec())
            .map_err(|_| CodecError::StartupLayout("parameter value is not UTF-8"))?;
        params.push((name, value));
    }
}

/// Splits a NUL-terminated string off the front of `body`.
fn take_cstr<'a>(body: &mut &'a [u8]) -> Option<&'a [u8]> {
    let end = body.iter().position(|&b| b == 0)?;
    let (s, rest) = body.split_at(end);
    *body = &rest[1..];
    Some(s)
}

/// A tagged protocol message: its type byte and its body (without tag and length).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub tag: u8,
    pub body: Bytes,
}

/// Decodes one tagged message no longer than `max_len` (the length field's value).
pub fn decode_message(buf: &mut BytesMut, max_len: usize) -> Result<Option<Message>, CodecError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    let len_usize = len as usize;
    if len_usize < 4 || len_usize > max_len {
        return Err(CodecError::MessageLength { len, max: max_len });
    }
    let total = len_usize + 1;
    if buf.len() < total {
        // Reserve only what was announced, and only once it is below the cap.
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let mut frame = buf.split_to(total).freeze();
    let tag = frame.get_u8();
    frame.advance(4);
    Ok(Some(Message { tag, body: frame }))
}

/// Appends a tagged message whose body `fill` writes; the length is back-filled.
fn put_message(buf: &mut BytesMut, tag: u8, fill: impl FnOnce(&mut BytesMut)) {
    buf.put_u8(tag);
    let len_at = buf.len();
    buf.put_u32(0);
    fill(buf);
    let len = (buf.len() - len_at) as u32;
    buf[len_at..len_at + 4].copy_from_slice(&len.to_be_bytes());
}

fn put_cstr(buf: &mut BytesMut, s: &str) {
    // A NUL inside a field would truncate it on the wire; drop NULs rather than send a lie.
    buf.extend(s.bytes().filter(|&b| b != 0));
    buf.put_u8(0);
}

/// ErrorResponse severity levels Eastwall sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Fatal,
    Error,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Fatal => "FATAL",
            Severity::Error => "ERROR",
        }
    }
}

/// Appends an ErrorResponse with severity, SQLSTATE and message (plus an optional detail).
pub fn put_error(
    buf: &mut BytesMut,
    severity: Severity,
    sqlstate: &str,
    message: &str,
    detail: Option<&str>,
) {
    put_message(buf, b'E', |b| {
        b.put_u8(b'S');
        put_cstr(b, severity.as_str());
        b.put_u8(b'V');
        put_cstr(b, severity.as_str());
        b.put_u8(b'C');
        put_cstr(b, sqlstate);
        b.put_u8(b'M');
        put_cstr(b, message);
        if let Some(detail) = detail {
            b.put_u8(b'D');
            put_cstr(b, detail);
        }
        b.put_u8(0);
    });
}

/// Appends AuthenticationOk.
pub fn put_auth_ok(buf: &mut BytesMut) {
    put_message(buf, b'R', |b| b.put_u32(0));
}

/// Appends AuthenticationCleartextPassword: the MFA prompt, sent only inside TLS.
pub fn put_auth_cleartext(buf: &mut BytesMut) {
    put_message(buf, b'R', |b| b.put_u32(3));
}

/// Appends ParameterStatus.
pub fn put_parameter_status(buf: &mut BytesMut, name: &str, value: &str) {
    put_message(buf, b'S', |b| {
        put_cstr(b, name);
        put_cstr(b, value);
    });
}

/// Appends BackendKeyData with a 4-byte key (protocol 3.0).
pub fn put_backend_key(buf: &mut BytesMut, pid: u32, key: [u8; 4]) {
    put_message(buf, b'K', |b| {
        b.put_u32(pid);
        b.put_slice(&key);
    });
}

/// Appends ReadyForQuery with the given transaction status byte.
pub fn put_ready_for_query(buf: &mut BytesMut, status: u8) {
    put_message(buf, b'Z', |b| b.put_u8(status));
}

/// Appends NegotiateProtocolVersion: we speak 3.0 and ignore these `_pq_` options.
pub fn put_negotiate_protocol_version(buf: &mut BytesMut, unsupported: &[&str]) {
    put_message(buf, b'v', |b| {
        b.put_u32(PROTOCOL_3_0);
        b.put_u32(unsupported.len() as u32);
        for name in unsupported {
            put_cstr(b, name);
        }
    });
}

/// Appends a StartupMessage (protocol 3.0) with the given parameters.
pub fn put_startup(buf: &mut BytesMut, params: &[(&str, &str)]) {
    let len_at = buf.len();
    buf.put_u32(0);
    buf.put_u32(PROTOCOL_3_0);
    for (name, value) in params {
        put_cstr(buf, name);
        put_cstr(buf, value);
    }
    buf.put_u8(0);
    let len = (buf.len() - len_at) as u32;
    buf[len_at..len_at + 4].copy_from_slice(&len.to_be_bytes());
}

/// Appends an SSLRequest.
pub fn put_ssl_request(buf: &mut BytesMut) {
    buf.put_u32(8);
    buf.put_u32(SSL_REQUEST_CODE);
}

/// Appends a CancelRequest for the given backend.
pub fn put_cancel_request(buf: &mut BytesMut, pid: u32, key: &[u8]) {
    buf.put_u32(12 + key.len() as u32);
    buf.put_u32(CANCEL_REQUEST_CODE);
    buf.put_u32(pid);
    buf.put_slice(key);
}

/// Appends a PasswordMessage-family message ('p'): SASL responses and cleartext passwords.
pub fn put_password_message(buf: &mut BytesMut, payload: &[u8]) {
    put_message(buf, b'p', |b| b.put_slice(payload));
}

/// Appends a SASLInitialResponse for the given mechanism.
pub fn put_sasl_initial_response(buf: &mut BytesMut, mechanism: &str, data: &[u8]) {
    put_message(buf, b'p', |b| {
        put_cstr(b, mechanism);
        b.put_i32(data.len() as i32);
        b.put_slice(data);
    });
}

/// Appends a decoded message as it was on the wire (to pass a server's message on unchanged).
pub fn put_raw(buf: &mut BytesMut, msg: &Message) {
    put_message(buf, msg.tag, |b| b.put_slice(&msg.body));
}

/// Appends a simple Query.
pub fn put_query(buf: &mut BytesMut, sql: &str) {
    put_message(buf, b'Q', |b| put_cstr(b, sql));
}

/// Appends Parse: a named prepared statement whose parameter types the server infers.
pub fn put_parse(buf: &mut BytesMut, statement: &str, sql: &str) {
    put_message(buf, b'P', |b| {
        put_cstr(b, statement);
        put_cstr(b, sql);
        b.put_u16(0);
    });
}

/// Appends Bind of `statement` to the unnamed portal, every parameter and result in text.
pub fn put_bind_text(buf: &mut BytesMut, statement: &str, params: &[&str]) {
    put_message(buf, b'B', |b| {
        put_cstr(b, "");
        put_cstr(b, statement);
        b.put_u16(0);
        b.put_u16(params.len() as u16);
        for p in params {
            b.put_i32(p.len() as i32);
            b.put_slice(p.as_bytes());
        }
        b.put_u16(0);
    });
}

/// Appends Execute of the unnamed portal (all rows), then Sync.
pub fn put_execute_sync(buf: &mut BytesMut) {
    put_message(buf, b'E', |b| {
        put_cstr(b, "");
        b.put_i32(0);
    });
    put_message(buf, b'S', |_| {});
}

/// The columns of a DataRow body: each value's bytes, or None for SQL NULL.
pub fn parse_data_row(body: &[u8]) -> Result<Vec<Option<Bytes>>, CodecError> {
    let bad = CodecError::Malformed("DataRow");
    let mut b = Bytes::copy_from_slice(body);
    if b.len() < 2 {
        return Err(bad);
    }
    let count = b.get_u16();
    let mut columns = Vec::with_capacity(usize::from(count).min(64));
    for _ in 0..count {
        if b.len() < 4 {
            return Err(bad);
        }
        let len = b.get_i32();
        if len < 0 {
            columns.push(None);
            continue;
        }
        let len = len as usize;
        if b.len() < len {
            return Err(bad);
        }
        columns.push(Some(b.split_to(len)));
    }
    if !b.is_empty() {
        return Err(bad);
    }
    Ok(columns)
}

/// Appends Terminate.
pub fn put_terminate(buf: &mut BytesMut) {
    put_message(buf, b'X', |_| {});
}

/// The password a client typed (PasswordMessage body), without its terminator.
pub fn parse_password(body: &[u8]) -> Result<&str, CodecError> {
    let text = body
        .strip_suffix(&[0])
        .ok_or(CodecError::Malformed("password"))?;
    if text.contains(&0) {
        return Err(CodecError::Malformed("password"));
    }
    std::str::from_utf8(text).map_err(|_| CodecError::Malformed("password"))
}

/// An authentication request from the server ('R'), as far as the proxy's login needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthRequest {
    Ok,
    Cleartext,
    Md5,
    Sasl(Vec<String>),
    SaslContinue(Bytes),
    SaslFinal(Bytes),
    Other(u32),
}

/// Parses an 'R' message body.
pub fn parse_auth_request(body: &[u8]) -> Result<AuthRequest, CodecError> {
    let mut b = body;
    if b.len() < 4 {
        return Err(CodecError::Malformed("authentication request"));
    }
    let kind = b.get_u32();
    Ok(match kind {
        0 => AuthRequest::Ok,
        3 => AuthRequest::Cleartext,
        5 => AuthRequest::Md5,
        10 => {
            let mut mechanisms = Vec::new();
            loop {
                let name = take_cstr(&mut b).ok_or(CodecError::Malformed("SASL mechanisms"))?;
                if name.is_empty() {
                    break;
                }
                mechanisms.push(String::from_utf8_lossy(name).into_owned());
            }
            AuthRequest::Sasl(mechanisms)
        }
        11 => AuthRequest::SaslContinue(Bytes::copy_from_slice(b)),
        12 => AuthRequest::SaslFinal(Bytes::copy_from_slice(b)),
        other => AuthRequest::Other(other),
    })
}

/// Parses a ParameterStatus body into (name, value).
pub fn parse_parameter_status(body: &[u8]) -> Result<(String, String), CodecError> {
    let mut b = body;
    let name = take_cstr(&mut b).ok_or(CodecError::Malformed("ParameterStatus"))?;
    let value = take_cstr(&mut b).ok_or(CodecError::Malformed("ParameterStatus"))?;
    Ok((
        String::from_utf8_lossy(name).into_owned(),
        String::from_utf8_lossy(value).into_owned(),
    ))
}

/// Parses a BackendKeyData body into (pid, key).
pub fn parse_backend_key(body: &[u8]) -> Result<(u32, Bytes), CodecError> {
    if body.len() < 8 || body.len() > 4 + MAX_CANCEL_KEY_LEN {
        return Err(CodecError::Malformed("BackendKeyData"));
    }
    let mut b = body;
    let pid = b.get_u32();
    Ok((pid, Bytes::copy_from_slice(b)))
}

/// The fields of an ErrorResponse or NoticeResponse we care about; every field is optional
/// because a hostile or buggy server may omit any of them (see PgBouncer CVE-2026-6666).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorFields {
    pub severity: Option<String>,
    pub code: Option<String>,
    pub message: Option<String>,
}

/// Parses an ErrorResponse/NoticeResponse body.
pub fn parse_error_fields(body: &[u8]) -> ErrorFields {
    let mut fields = ErrorFields::default();
    let mut b = body;
    while let Some((&kind, rest)) = b.split_first() {
        if kind == 0 {
            break;
        }
        b = rest;
        let Some(value) = take_cstr(&mut b) else {
            break;
        };
        let value = String::from_utf8_lossy(value).into_owned();
        match kind {
            b'V' => fields.severity = Some(value),
            b'S' if fields.severity.is_none() => fields.severity = Some(value),
            b'C' => fields.code = Some(value),
            b'M' => fields.message = Some(value),
            _ => {}
        }
    }
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    fn startup_bytes(version: u32, params: &[(&str, &str)]) -> BytesMut {
        let mut buf = BytesMut::new();
        put_startup(&mut buf, params);
        buf[4..8].copy_from_slice(&version.to_be_bytes());
        buf
    }

    #[test]
    fn ssl_request_decodes() {
        let mut buf = BytesMut::new();
        put_ssl_request(&mut buf);
        assert_eq!(
            decode_startup(&mut buf).unwrap(),
            Some(StartupPacket::SslRequest)
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn gssenc_request_decodes() {
        let mut buf = BytesMut::from(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30][..]);
        assert_eq!(
            decode_startup(&mut buf).unwrap(),
            Some(StartupPacket::GssEncRequest)
        );
    }

    #[test]
    fn startup_message_round_trips_and_leaves_pipelined_bytes() {
        let mut buf = startup_bytes(PROTOCOL_3_0, &[("user", "billing"), ("database", "app")]);
        buf.extend_from_slice(b"Qextra");
        let Some(StartupPacket::Startup(msg)) = decode_startup(&mut buf).unwrap() else {
            panic!("not a startup message");
        };
        assert_eq!(msg.version, PROTOCOL_3_0);
        assert_eq!(msg.param("user"), Some("billing"));
        assert_eq!(msg.param("database"), Some("app"));
        assert_eq!(&buf[..], b"Qextra");
    }

    #[test]
    fn partial_packets_wait_for_more() {
        let full = startup_bytes(PROTOCOL_3_0, &[("user", "u")]);
        for cut in 0..full.len() {
            let mut buf = BytesMut::from(&full[..cut]);
            assert_eq!(decode_startup(&mut buf).unwrap(), None, "cut at {cut}");
            assert_eq!(buf.len(), cut);
        }
    }

    #[test]
    fn startup_lengths_outside_bounds_are_refused() {
        for len in [0u32, 3, 7, 10_001, 0x7fff_ffff, u32::MAX] {
            let mut buf = BytesMut::from(&len.to_be_bytes()[..]);
            buf.extend_from_slice(&PROTOCOL_3_0.to_be_bytes());
            assert_eq!(
                decode_startup(&mut buf),
                Err(CodecError::StartupLength(len)),
                "len {len}"
            );
        }
    }

    #[test]
    fn startup_without_final_terminator_is_refused() {
        let mut buf = BytesMut::new();
        buf.put_u32(4 + 4 + 5);
        buf.put_u32(PROTOCOL_3_0);
        buf.put_slice(b"user\0");
        assert!(matches!(
            decode_startup(&mut buf),
            Err(CodecError::StartupLayout(_))
        ));
    }

    #[test]
    fn startup_key_without_value_is_refused() {
        let mut buf = BytesMut::new();
        buf.put_u32(4 + 4 + 6);
        buf.put_u32(PROTOCOL_3_0);
        buf.put_slice(b"user\0\0");
        // "user" then "" as value, then no final terminator.
        assert!(decode_startup(&mut buf).is_err());
    }

    #[test]
    fn cancel_request_decodes_with_key() {
        let mut buf = BytesMut::new();
        put_cancel_request(&mut buf, 4242, &[1, 2, 3, 4]);
        assert_eq!(
            decode_startup(&mut buf).unwrap(),
            Some(StartupPacket::Cancel {
                pid: 4242,
                key: Bytes::from_static(&[1, 2, 3, 4])
            })
        );
    }

    #[test]
    fn cancel_request_too_short_is_refused() {
        let mut buf = BytesMut::new();
        buf.put_u32(12);
        buf.put_u32(CANCEL_REQUEST_CODE);
        buf.put_u32(1);
        assert!(decode_startup(&mut buf).is_err());
    }

    #[test]
    fn ssl_request_with_trailing_bytes_is_refused() {
        let mut buf = BytesMut::new();
        buf.put_u32(9);
        buf.put_u32(SSL_REQUEST_CODE);
        buf.put_u8(0);
        assert!(decode_startup(&mut buf).is_err());
    }

    #[test]
    fn messages_decode_and_wait_for_more() {
        let mut out = BytesMut::new();
        put_password_message(&mut out, b"123456\0");
        let full = out.clone();
        for cut in 0..full.len() {
            let mut buf = BytesMut::from(&full[..cut]);
            assert_eq!(decode_message(&mut buf, 100).unwrap(), None);
        }
        let msg = decode_message(&mut out, 100).unwrap().unwrap();
        assert_eq!(msg.tag, b'p');
        assert_eq!(parse_password(&msg.body).unwrap(), "123456");
    }

    #[test]
    fn message_lengths_outside_bounds_are_refused() {
        for len in [0u32, 3, 101, u32::MAX] {
            let mut buf = BytesMut::new();
            buf.put_u8(b'p');
            buf.put_u32(len);
            assert!(decode_message(&mut buf, 100).is_err(), "len {len}");
        }
    }

    #[test]
    fn a_decoded_message_re_encodes_byte_for_byte() {
        let mut wire = BytesMut::new();
        put_error(
            &mut wire,
            Severity::Fatal,
            "3D000",
            "no such database",
            None,
        );
        let original = wire.clone();
        let msg = decode_message(&mut wire, 1000).unwrap().unwrap();
        let mut again = BytesMut::new();
        put_raw(&mut again, &msg);
        assert_eq!(again, original);
    }

    #[test]
    fn error_response_encodes_fields_libpq_reads() {
        let mut buf = BytesMut::new();
        put_error(&mut buf, Severity::Fatal, "28000", "no\0pe", Some("d"));
        let msg = decode_message(&mut buf, 1000).unwrap().unwrap();
        assert_eq!(msg.tag, b'E');
        let fields = parse_error_fields(&msg.body);
        assert_eq!(fields.severity.as_deref(), Some("FATAL"));
        assert_eq!(fields.code.as_deref(), Some("28000"));
        assert_eq!(fields.message.as_deref(), Some("nope"));
    }

    #[test]
    fn error_fields_tolerate_missing_and_truncated_fields() {
        assert_eq!(parse_error_fields(b""), ErrorFields::default());
        assert_eq!(
            parse_error_fields(b"Mno terminator"),
            ErrorFields::default()
        );
        let f = parse_error_fields(b"Mmsg\0\0");
        assert_eq!(f.message.as_deref(), Some("msg"));
        assert_eq!(f.code, None);
    }

    #[test]
    fn negotiate_protocol_version_lists_options() {
        let mut buf = BytesMut::new();
        put_negotiate_protocol_version(&mut buf, &["_pq_.foo"]);
        let msg = decode_message(&mut buf, 1000).unwrap().unwrap();
        assert_eq!(msg.tag, b'v');
        assert_eq!(&msg.body[..8], &[0, 3, 0, 0, 0, 0, 0, 1]);
        assert_eq!(&msg.body[8..], b"_pq_.foo\0");
    }

    #[test]
    fn auth_requests_parse() {
        assert_eq!(parse_auth_request(&[0, 0, 0, 0]).unwrap(), AuthRequest::Ok);
        assert_eq!(
            parse_auth_request(&[0, 0, 0, 3]).unwrap(),
            AuthRequest::Cleartext
        );
        let mut body = vec![0, 0, 0, 10];
        body.extend_from_slice(b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0");
        assert_eq!(
            parse_auth_request(&body).unwrap(),
            AuthRequest::Sasl(vec!["SCRAM-SHA-256-PLUS".into(), "SCRAM-SHA-256".into()])
        );
        assert!(parse_auth_request(&[0, 0]).is_err());
    }

    proptest::proptest! {
        #[test]
        fn decode_startup_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            let mut buf = BytesMut::from(&bytes[..]);
            let _ = decode_startup(&mut buf);
        }

        #[test]
        fn decode_startup_on_valid_prefix_never_panics(
            params in proptest::collection::vec(("[a-z_]{1,8}", "\\PC{0,8}"), 0..6),
            tail in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..16),
        ) {
            let refs: Vec<(&str, &str)> = params.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let mut buf = BytesMut::new();
            put_startup(&mut buf, &refs);
            let cut = buf.len().saturating_sub(tail.len());
            buf.truncate(cut);
            buf.extend_from_slice(&tail);
            let _ = decode_startup(&mut buf);
        }

        #[test]
        fn decode_message_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            let mut buf = BytesMut::from(&bytes[..]);
            let _ = decode_message(&mut buf, 32);
            let _ = parse_error_fields(&bytes);
            let _ = parse_auth_request(&bytes);
            let _ = parse_parameter_status(&bytes);
            let _ = parse_backend_key(&bytes);
            let _ = parse_password(&bytes);
        }
    }

    #[test]
    fn data_rows_decode_values_and_nulls_and_refuse_short_bodies() {
        let mut body = BytesMut::new();
        body.put_u16(3);
        body.put_i32(1);
        body.put_slice(b"t");
        body.put_i32(-1);
        body.put_i32(0);
        let row = parse_data_row(&body).unwrap();
        assert_eq!(row[0].as_deref(), Some(&b"t"[..]));
        assert_eq!(row[1], None);
        assert_eq!(row[2].as_deref(), Some(&b""[..]));
        for cut in 0..body.len() {
            assert!(parse_data_row(&body[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = body.clone();
        long.put_u8(0);
        assert!(parse_data_row(&long).is_err(), "trailing bytes");
    }
}
