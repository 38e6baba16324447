//! Certificate serial numbers: random, positive, unique, and written one way in hex.

use rand::RngCore;
use rcgen::SerialNumber;

use crate::error::CaError;

/// 16 random bytes: RFC 5280 allows up to 20, CA/B Forum asks for at least 64 bits of entropy.
const SERIAL_LEN: usize = 16;

/// A fresh random serial and its lowercase hex form.
///
/// rcgen would otherwise derive the serial from the public key, so re-signing a CSR would
/// repeat it and revoking one certificate would revoke both.
pub(crate) fn random_serial() -> (SerialNumber, String) {
    let mut bytes = [0u8; SERIAL_LEN];
    loop {
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        // Positive INTEGER, and a non-zero first byte so the DER encoding keeps all 16 bytes
        // and the hex we record is exactly what parsers print.
        bytes[0] &= 0x7f;
        if bytes[0] != 0 {
            break;
        }
    }
    (SerialNumber::from_slice(&bytes), hex::encode(bytes))
}

/// Normalises a serial as a user may type it (`0A:1b:…`, `0x0a1b…`) to our lowercase hex,
/// without leading zero bytes.
pub fn normalize_serial(input: &str) -> Result<String, CaError> {
    let invalid = || CaError::InvalidSerial(input.to_owned());
    let trimmed = input.trim();
    let body = trimmed
        .strip_prefix("0x")
        .or_else(|| trimmed.strip_prefix("0X"))
        .unwrap_or(trimmed);
    let digits: String = body.chars().filter(|c| *c != ':').collect();
    if digits.is_empty() || digits.len() > 2 * 20 + 2 {
        return Err(invalid());
    }
    if !digits.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(invalid());
    }
    let digits = digits.to_ascii_lowercase();
    let digits = if digits.len() % 2 == 1 {
        format!("0{digits}")
    } else {
        digits
    };
    let bytes = hex::decode(&digits).map_err(|_| invalid())?;
    Ok(serial_hex(&bytes))
}

/// Hex of a serial's bytes, leading zero bytes dropped (as DER and parsers present it).
pub(crate) fn serial_hex(bytes: &[u8]) -> String {
    let first = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    hex::encode(&bytes[first..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_serials_are_positive_full_length_and_distinct() {
        let (a, ahex) = random_serial();
        let (b, bhex) = random_serial();
        assert_ne!(ahex, bhex);
        for (s, h) in [(a, ahex), (b, bhex)] {
            let bytes = s.to_bytes();
            assert_eq!(bytes.len(), SERIAL_LEN);
            assert!(bytes[0] & 0x80 == 0 && bytes[0] != 0);
            assert_eq!(normalize_serial(&h).unwrap(), h);
        }
    }

    #[test]
    fn typed_serials_normalise() {
        assert_eq!(normalize_serial("0A:1B:ff").unwrap(), "0a1bff");
        assert_eq!(normalize_serial("0x0a1bff").unwrap(), "0a1bff");
        assert_eq!(normalize_serial("00:0a").unwrap(), "0a");
        assert_eq!(normalize_serial("abc").unwrap(), "0abc");
    }

    #[test]
    fn garbage_serials_are_refused() {
        for bad in ["", "xyz", "spiffe", "12 34", &"ab".repeat(30)] {
            assert!(
                matches!(normalize_serial(bad), Err(CaError::InvalidSerial(_))),
                "{bad}"
            );
        }
    }
}
