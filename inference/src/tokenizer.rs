//! Tokenizers embedded in GGUF files.

/// GPT-2's reversible byte → printable-character map used by byte-level BPE vocabularies:
/// printable Latin-1 bytes map to themselves, the other 68 bytes to U+0100.. in order.
pub fn byte_to_unicode() -> [char; 256] {
    let mut out = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let keep = (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        let c = if keep {
            b
        } else {
            n += 1;
            255 + n
        };
        out[b as usize] = char::from_u32(c).unwrap_or('\u{fffd}');
    }
    out
}
