//! A compressed record stores each request's messageId once: as the 16
//! bytes its entry holds anyway, not also as the 36 characters the
//! envelope spells it with. Random hex is what a compressor cannot shrink:
//! on telemetry requests that text was about a third of a compressed
//! request (75.7 -> 52.2 bytes with zstd, `benches/compact.py`). It is cut
//! out before compression and put back after decompression, byte for byte,
//! so everything after `from_disk` sees version 1 entries.
//!
//! A stripped entry: length (u32), key length and flag (u16), key,
//! messageId (16), where the text was in the payload (u32; `u32::MAX`: it
//! was not found, the payload is whole), the payload without it.

use uuid::Uuid;

use super::PRESENCE_FLAG;

const NOT_STRIPPED: u32 = u32::MAX;
const TEXT_LEN: usize = 36;

/// The bytes of an entry before its payload: key length, key, messageId.
fn fixed_len(entry: &[u8]) -> Option<usize> {
    let key_len = u16::from_le_bytes(entry.get(..2)?.try_into().ok()?) & !PRESENCE_FLAG;
    let fixed = 2 + key_len as usize + 16;
    (entry.len() >= fixed).then_some(fixed)
}

/// Splits off one length-prefixed entry.
fn next(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let len = u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
    let entry = bytes.get(4..4usize.checked_add(len)?)?;
    Some((entry, &bytes[4 + len..]))
}

fn text_of(id: &[u8]) -> Option<[u8; TEXT_LEN]> {
    let mut text = [0u8; TEXT_LEN];
    Uuid::from_slice(id)
        .ok()?
        .hyphenated()
        .encode_lower(&mut text);
    Some(text)
}

/// Version 1 entries with each messageId's text taken out of its payload.
pub(super) fn strip(entries: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(entries.len());
    let mut rest = entries;
    while !rest.is_empty() {
        let (entry, tail) = next(rest)?;
        rest = tail;
        let fixed = fixed_len(entry)?;
        let payload = &entry[fixed..];
        let text = text_of(&entry[fixed - 16..fixed])?;
        // Near the end of an envelope: searched from there.
        let at = payload.windows(TEXT_LEN).rposition(|w| w == text);
        let (offset, kept) = match at {
            Some(at) if at < NOT_STRIPPED as usize => (at as u32, payload.len() - TEXT_LEN),
            _ => (NOT_STRIPPED, payload.len()),
        };
        out.extend_from_slice(&((fixed + 4 + kept) as u32).to_le_bytes());
        out.extend_from_slice(&entry[..fixed]);
        out.extend_from_slice(&offset.to_le_bytes());
        match at {
            Some(at) if offset != NOT_STRIPPED => {
                out.extend_from_slice(&payload[..at]);
                out.extend_from_slice(&payload[at + TEXT_LEN..]);
            }
            _ => out.extend_from_slice(payload),
        }
    }
    Some(out)
}

/// The version 1 entries [`strip`] was given; `None` if they do not add up.
pub(super) fn restore(stripped: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(stripped.len() + stripped.len() / 4);
    let mut rest = stripped;
    while !rest.is_empty() {
        let (entry, tail) = next(rest)?;
        rest = tail;
        let fixed = fixed_len(entry)?;
        let offset = u32::from_le_bytes(entry.get(fixed..fixed + 4)?.try_into().ok()?);
        let payload = &entry[fixed + 4..];
        if offset == NOT_STRIPPED {
            out.extend_from_slice(&((fixed + payload.len()) as u32).to_le_bytes());
            out.extend_from_slice(&entry[..fixed]);
            out.extend_from_slice(payload);
            continue;
        }
        let at = offset as usize;
        if at > payload.len() {
            return None;
        }
        let text = text_of(&entry[fixed - 16..fixed])?;
        out.extend_from_slice(&((fixed + payload.len() + TEXT_LEN) as u32).to_le_bytes());
        out.extend_from_slice(&entry[..fixed]);
        out.extend_from_slice(&payload[..at]);
        out.extend_from_slice(&text);
        out.extend_from_slice(&payload[at..]);
    }
    Some(out)
}
