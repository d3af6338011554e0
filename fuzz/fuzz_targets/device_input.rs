//! Bytes from a device, as the gateway reads them: framing (which must not
//! depend on how the bytes were split into reads), validation, the auth
//! frame, and every reply and envelope the gateway would write (which must
//! be JSON; an envelope is spliced from the request's raw fields).
#![no_main]

use libfuzzer_sys::fuzz_target;

use edgegate::wire::frame::{Frame, LineDecoder};
use edgegate::wire::protocol::{self, Inbound, Origin, Timestamp};

fn frames(max: usize, stream: &[u8], step: usize) -> Vec<Option<Vec<u8>>> {
    let mut out = Vec::new();
    let mut decoder = LineDecoder::new(max);
    for chunk in stream.chunks(step.max(1)) {
        decoder.decode(chunk, |f| match f {
            Frame::Line(l) => out.push(Some(l.to_vec())),
            Frame::TooLarge => out.push(None),
        });
    }
    out
}

fn json_line(bytes: &[u8]) {
    let text = std::str::from_utf8(bytes).expect("replies are UTF-8");
    let body = text
        .strip_suffix('\n')
        .expect("a reply ends with a newline");
    assert!(!body.contains('\n'), "one line per reply: {text:?}");
    serde_json::from_str::<serde_json::Value>(body).expect("replies are JSON");
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let max = 16 + usize::from(data[0]) * 4;
    let step = 1 + usize::from(data[1]) % 97;
    let stream = &data[2..];
    let whole = frames(max, stream, stream.len());
    assert_eq!(
        whole,
        frames(max, stream, step),
        "framing depends on read boundaries"
    );
    let client = uuid::Uuid::nil();
    for line in whole.iter().flatten() {
        assert!(!line.is_empty() && line.len() <= max + 1 && !line.contains(&b'\n'));
        let mut out = Vec::new();
        match protocol::parse_frame(line, protocol::DEFAULT_MAX_JSON_DEPTH) {
            Err(rejection) => {
                protocol::write_rejection(&mut out, &rejection);
                json_line(&out);
            }
            Ok(Inbound::TextPing) => {}
            Ok(Inbound::JsonPing(uid)) => {
                protocol::write_pong(&mut out, uid.raw);
                json_line(&out);
            }
            Ok(Inbound::Request(req)) => {
                if req.action.value == "auth" {
                    let _ = protocol::auth_claim(&req);
                }
                protocol::write_ack(&mut out, req.uid.raw, &client);
                json_line(&out);
                for bound in [None, Some("dev\"\\\u{1}")] {
                    let origin = Origin {
                        server_id: "gw",
                        client_id: &client,
                        bound_device: bound,
                        reply_topic: Some("replies.gw"),
                    };
                    let mut envelope = Vec::new();
                    protocol::write_envelope(
                        &mut envelope,
                        &req,
                        &origin,
                        &client,
                        &Timestamp::now(),
                    );
                    let v: serde_json::Value =
                        serde_json::from_slice(&envelope).expect("an envelope is JSON");
                    assert_eq!(v["deviceRequest"]["uid"].as_str(), Some(&*req.uid.value));
                    let mut key = [0u8; 45];
                    assert!(!protocol::record_key(&req, &origin, &mut key).is_empty());
                }
            }
        }
    }
});
