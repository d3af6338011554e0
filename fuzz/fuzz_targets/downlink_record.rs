//! A record from a consumer topic, as the router reads it: whatever a
//! worker (or anyone with write access to the topic) put there. What is
//! passed to a device must be exactly one JSON object on one line.
#![no_main]

use libfuzzer_sys::fuzz_target;

use edgegate::wire::protocol;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = protocol::parse_server_response(data) {
        let line = r.line.strip_suffix(b"\n").expect("ends with a newline");
        assert!(!line.contains(&b'\n') && !line.contains(&b'\r'), "one line");
        let v: serde_json::Value = serde_json::from_slice(line).expect("JSON");
        assert!(v.is_object());
    }
});
