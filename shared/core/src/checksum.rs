//! File checksums as grid data management writes them.

use std::io::Read;

/// adler32 of everything `reader` yields, as 8 lowercase hex digits (DIRAC and Rucio's form).
pub fn adler32_hex(mut reader: impl Read) -> std::io::Result<(u64, String)> {
    let mut hash = adler32::RollingAdler32::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut size = 0u64;
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        hash.update_buffer(&buf[..n]);
    }
    Ok((size, format!("{:08x}", hash.hash())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adler32_matches_the_reference_value() {
        // Reference value from RFC 1950's algorithm: adler32("Wikipedia") = 0x11E60398.
        let (size, sum) = adler32_hex(&b"Wikipedia"[..]).unwrap();
        assert_eq!(size, 9);
        assert_eq!(sum, "11e60398");
    }

    #[test]
    fn adler32_of_nothing_is_one() {
        assert_eq!(adler32_hex(&b""[..]).unwrap(), (0, "00000001".to_string()));
    }
}
