use uuid::Uuid;

use super::*;

fn reject(line: &str) -> Rejection {
    match parse_frame(line.as_bytes(), DEFAULT_MAX_JSON_DEPTH) {
        Err(r) => r,
        Ok(other) => panic!("{line} was accepted as {other:?}"),
    }
}

fn request(line: &str) -> Request<'_> {
    match parse_frame(line.as_bytes(), DEFAULT_MAX_JSON_DEPTH) {
        Ok(Inbound::Request(r)) => r,
        other => panic!("{line} gave {other:?}"),
    }
}

proptest::proptest! {
    // A failing case is printed, not saved beside the sources.
    #![proptest_config(proptest::prelude::ProptestConfig { failure_persistence: None, ..Default::default() })]
    /// Any auth frame the parser accepts gives back exactly its claim,
    /// and damaged frames never panic (they are refused or parsed).
    #[test]
    fn auth_frame_parsing_is_exact_and_total(
        device in "\\PC{0,140}",
        token in "\\PC{0,90}",
        edits in proptest::collection::vec((proptest::prelude::any::<usize>(), proptest::prelude::any::<u8>()), 0..4),
    ) {
        let frame = serde_json::json!({"action":"auth","uid":"a1","deviceUid":device,"data":{"token":token}}).to_string();
        match parse_frame(frame.as_bytes(), DEFAULT_MAX_JSON_DEPTH) {
            Ok(Inbound::Request(req)) => {
                let claim = auth_claim(&req).unwrap();
                proptest::prop_assert_eq!(&*claim.device_uid, device.as_str());
                proptest::prop_assert_eq!(&*claim.token, token.as_str());
            }
            Ok(other) => proptest::prop_assert!(false, "{:?}", other),
            Err(r) => proptest::prop_assert!(!valid_device_uid(&device), "{:?}", r),
        }
        let mut damaged = frame.into_bytes();
        for (at, byte) in edits {
            let at = at % damaged.len();
            damaged[at] = byte;
        }
        if let Ok(Inbound::Request(req)) = parse_frame(&damaged, DEFAULT_MAX_JSON_DEPTH) {
            let _ = auth_claim(&req);
        }
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { failure_persistence: None, ..Default::default() })]
    /// The copy-as-is path writes exactly what serde_json would.
    #[test]
    fn json_strings_are_written_as_serde_json_writes_them(s in "(\\PC|[\\x00-\\x1f\"\\\\\\x7f])*") {
        let mut ours = b"x".to_vec();
        reply::write_json_str(&mut ours, &s);
        let theirs = [b"x".to_vec(), serde_json::to_vec(&s).unwrap()].concat();
        proptest::prop_assert_eq!(ours, theirs);
    }
}

#[test]
fn auth_frames_give_their_claim() {
    let r =
        request(r#"{"action":"auth","uid":"a1","deviceUid":"dev-42","data":{"token":"ab\u0063"}}"#);
    let claim = auth_claim(&r).unwrap();
    assert_eq!(claim.device_uid, "dev-42");
    assert_eq!(claim.token, "abc");
    for (line, why) in [
        (
            r#"{"action":"auth","uid":"a1","data":{"token":"t"}}"#,
            "deviceUid",
        ),
        (
            r#"{"action":"auth","uid":"a1","deviceUid":"d"}"#,
            "data.token",
        ),
        (
            r#"{"action":"auth","uid":"a1","deviceUid":"d","data":{"token":7}}"#,
            "string",
        ),
        (
            r#"{"action":"auth","uid":"a1","deviceUid":"d","data":[1]}"#,
            "string",
        ),
        (
            r#"{"action":"auth","uid":"a1","deviceUid":"d","data":{}}"#,
            "string",
        ),
    ] {
        let e = auth_claim(&request(line)).unwrap_err();
        assert!(e.contains(why), "{line}: {e}");
    }
    let mut out = Vec::new();
    write_auth_ok(&mut out, "\"a1\"");
    assert_eq!(
        out,
        b"{\"action\":\"auth\",\"uid\":\"a1\",\"status\":\"ok\"}\n"
    );
}

#[test]
fn full_request_is_accepted() {
    let r = request(
        r#"{"action":"telemetry","deviceUid":"dev-42","uid":"req-1","data":{"t":21.5},"extra":1}"#,
    );
    assert_eq!(r.action.value, "telemetry");
    assert_eq!(r.uid.raw, "\"req-1\"");
    assert_eq!(r.device_uid.unwrap().value, "dev-42");
    assert_eq!(r.data.unwrap().get(), r#"{"t":21.5}"#);
}

#[test]
fn nulls_count_as_absent() {
    let r = request(r#"{"action":"a","uid":"u","deviceUid":null,"data":null}"#);
    assert!(r.device_uid.is_none());
    assert!(r.data.is_none());
}

#[test]
fn escaped_strings_are_decoded_for_checks_and_kept_raw_for_splicing() {
    let r = request(r#"{"action":"a","uid":"\u0041\n","deviceUid":"d\"x"}"#);
    assert_eq!(r.uid.value, "A\n");
    assert_eq!(r.uid.raw, r#""\u0041\n""#);
    assert_eq!(r.device_uid.unwrap().value, "d\"x");
}

#[test]
fn pings() {
    assert!(matches!(
        parse_frame(b"Ping", DEFAULT_MAX_JSON_DEPTH),
        Ok(Inbound::TextPing)
    ));
    match parse_frame(br#"{"action":"ping","uid":"p1"}"#, DEFAULT_MAX_JSON_DEPTH) {
        Ok(Inbound::JsonPing(uid)) => assert_eq!(uid.raw, "\"p1\""),
        other => panic!("{other:?}"),
    }
}

#[test]
fn bad_json_cases() {
    for line in ["{", "ping", "{\"uid\":\"x\"", "{\"a\":\u{0}}"] {
        assert_eq!(reject(line).code, ErrorCode::BadJson, "{line}");
    }
    let invalid_utf8 = b"{\"action\":\"a\",\"uid\":\"\xff\"}";
    assert_eq!(
        parse_frame(invalid_utf8, DEFAULT_MAX_JSON_DEPTH)
            .unwrap_err()
            .code,
        ErrorCode::BadJson
    );
}

#[test]
fn bad_request_cases_echo_the_uid() {
    let long = "x".repeat(129);
    let cases = [
        (r#"[1,2]"#.to_string(), None, "object"),
        (r#""str""#.to_string(), None, "object"),
        (r#"{"action":"a"}"#.to_string(), None, "uid is missing"),
        (
            r#"{"action":"a","uid":7}"#.to_string(),
            None,
            "uid must be a string",
        ),
        (
            r#"{"action":"a","uid":""}"#.to_string(),
            Some("\"\""),
            "uid must be",
        ),
        (
            format!(r#"{{"action":"a","uid":"{long}"}}"#),
            Some(&*format!("\"{long}\"")),
            "uid must be",
        ),
        (
            r#"{"uid":"u1"}"#.to_string(),
            Some("\"u1\""),
            "action is missing",
        ),
        (
            r#"{"uid":"u1","action":5}"#.to_string(),
            Some("\"u1\""),
            "action must be a string",
        ),
        (
            r#"{"uid":"u1","action":"a b"}"#.to_string(),
            Some("\"u1\""),
            "action must be",
        ),
        (
            r#"{"uid":"u1","action":""}"#.to_string(),
            Some("\"u1\""),
            "action must be",
        ),
        (
            format!(r#"{{"uid":"u1","action":"{long}"}}"#),
            Some("\"u1\""),
            "action must be",
        ),
        (
            r#"{"uid":"u1","action":"a","deviceUid":1}"#.to_string(),
            Some("\"u1\""),
            "deviceUid must be",
        ),
        (
            r#"{"uid":"u1","action":"a","deviceUid":""}"#.to_string(),
            Some("\"u1\""),
            "deviceUid must be",
        ),
    ];
    for (line, uid, msg) in cases {
        let r = reject(&line);
        assert_eq!(r.code, ErrorCode::BadRequest, "{line}");
        assert_eq!(r.uid_json.as_deref(), uid, "{line}");
        assert!(r.message.contains(msg), "{line}: {}", r.message);
    }
}

#[test]
fn action_limit_is_inclusive() {
    let ok = "a".repeat(128);
    request(&format!(
        r#"{{"action":"{ok}","uid":"{ok}","deviceUid":"{ok}"}}"#
    ));
}

#[test]
fn replies_are_single_json_lines() {
    let mut out = Vec::new();
    let id = Uuid::nil();
    write_ack(&mut out, "\"r1\"", &id);
    write_error(
        &mut out,
        None,
        ErrorCode::FrameTooLarge,
        "frame \"too\" large",
    );
    write_pong(&mut out, "\"p\"");
    let text = String::from_utf8(out).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        lines[0]["messageId"],
        "00000000-0000-0000-0000-000000000000"
    );
    assert_eq!(lines[0]["status"], "accepted");
    assert_eq!(lines[1]["uid"], "");
    assert_eq!(lines[1]["errorCode"], "frame_too_large");
    assert_eq!(lines[1]["errorMessage"], "frame \"too\" large");
    assert_eq!(
        lines[2],
        serde_json::json!({"action":"pong","uid":"p","status":"ok"})
    );
}

#[test]
fn envelope_has_every_field_of_the_contract() {
    let line = r#"{"action":"telemetry","uid":"req-1","deviceUid":"dev-\"42","data":{"t":[1,2]}}"#;
    let req = request(line);
    let client = Uuid::new_v4();
    let mid = Uuid::new_v4();
    let origin = Origin {
        server_id: "gw-1",
        client_id: &client,
        bound_device: None,
        reply_topic: None,
    };
    let mut out = Vec::new();
    write_envelope(
        &mut out,
        &req,
        &origin,
        &mid,
        &Timestamp::from_unix_millis(1_795_644_000_123),
    );
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(
        v["deviceRequest"],
        serde_json::json!({"action":"telemetry","deviceUid":"dev-\"42","uid":"req-1","data":{"t":[1,2]}})
    );
    assert_eq!(v["serverId"], "gw-1");
    assert_eq!(v["clientId"], client.to_string());
    assert_eq!(v["deviceUid"], serde_json::Value::Null);
    assert_eq!(v["messageId"], mid.to_string());
    assert_eq!(v["receivedAt"], "2026-11-25T22:00:00.123Z");
    assert_eq!(v.get("replyTopic"), None, "no reply topic, no field");
    let mut out = Vec::new();
    let replies = Origin {
        reply_topic: Some("edgegate.replies.gw-1"),
        ..origin
    };
    write_envelope(&mut out, &req, &replies, &mid, &Timestamp::now());
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["replyTopic"], "edgegate.replies.gw-1");

    let mut buf = [0u8; 45];
    assert_eq!(record_key(&req, &origin, &mut buf), b"dev-\"42");
    let bound = Origin {
        bound_device: Some("dev-b"),
        ..origin
    };
    assert_eq!(record_key(&req, &bound, &mut buf), b"dev-b");
    let anon = request(r#"{"action":"a","uid":"u"}"#);
    let origin = Origin {
        server_id: "gw-1",
        client_id: &client,
        bound_device: None,
        reply_topic: None,
    };
    assert_eq!(
        record_key(&anon, &origin, &mut buf),
        client.to_string().as_bytes()
    );
    let mut out = Vec::new();
    write_envelope(&mut out, &anon, &origin, &mid, &Timestamp::now());
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["deviceRequest"]["data"], serde_json::Value::Null);
    assert_eq!(v["deviceRequest"]["deviceUid"], serde_json::Value::Null);
}

#[test]
fn timestamps() {
    assert_eq!(
        Timestamp::from_unix_millis(0).to_string(),
        "1970-01-01T00:00:00.000Z"
    );
    assert_eq!(
        Timestamp::from_unix_millis(951_782_400_999).to_string(),
        "2000-02-29T00:00:00.999Z"
    );
    assert_eq!(
        Timestamp::from_unix_millis(4_102_444_799_000).to_string(),
        "2099-12-31T23:59:59.000Z"
    );
}

#[test]
fn server_response_routing_fields() {
    let r = parse_server_response(
        br#"{"deviceResponse":{"action":"connect.response","uid":"1","status":"ok"},"serverId":"","clientId":"c","deviceUid":"d"}"#,
    )
    .unwrap();
    assert!(r.binds);
    assert_eq!(r.server_id, None);
    assert_eq!(r.client_id.as_deref(), Some("c"));
    assert_eq!(
        r.line,
        b"{\"action\":\"connect.response\",\"uid\":\"1\",\"status\":\"ok\"}\n"
    );
    let r = parse_server_response(
        br#"{"deviceResponse":{"action":"connect.response","status":"error"}}"#,
    )
    .unwrap();
    assert!(!r.binds);
}

#[test]
fn pretty_printed_device_response_becomes_one_line() {
    let r = parse_server_response(
        b"{\"deviceResponse\":{\n  \"action\": \"x\",\n  \"data\": [1,\n 2]\n}}",
    )
    .unwrap();
    assert_eq!(r.line, b"{\"action\":\"x\",\"data\":[1,2]}\n");
}

#[test]
fn garbage_server_responses_are_errors() {
    assert!(matches!(
        parse_server_response(b"nope"),
        Err(ResponseError::Json(_))
    ));
    assert_eq!(
        parse_server_response(b"{}").unwrap_err(),
        ResponseError::MissingDeviceResponse
    );
    assert_eq!(
        parse_server_response(br#"{"deviceResponse":null}"#).unwrap_err(),
        ResponseError::MissingDeviceResponse
    );
    assert_eq!(
        parse_server_response(br#"{"deviceResponse":"hi"}"#).unwrap_err(),
        ResponseError::DeviceResponseNotObject
    );
    assert!(matches!(
        parse_server_response(br#"{"deviceResponse":{},"clientId":5}"#),
        Err(ResponseError::Json(_))
    ));
}

#[test]
fn record_overhead_covers_the_worst_envelope() {
    // Every field the gateway adds at its longest: the bound deviceUid of
    // control characters (escaped as \u00XX), the longest serverId.
    let line = r#"{"action":"a","uid":"u","deviceUid":"d","data":1}"#;
    let req = request(line);
    let client = Uuid::new_v4();
    let device: String = std::iter::repeat_n('\u{1}', 128).collect();
    let server: String = std::iter::repeat_n('s', 128).collect();
    // Kafka's longest topic name.
    let topic = "t".repeat(249);
    let origin = Origin {
        server_id: &server,
        client_id: &client,
        bound_device: Some(&device),
        reply_topic: Some(&topic),
    };
    let mut out = Vec::new();
    write_envelope(&mut out, &req, &origin, &Uuid::new_v4(), &Timestamp::now());
    let mut buf = [0u8; 45];
    let key = record_key(&req, &origin, &mut buf).len();
    let header = "message-id".len() + 36 + "reply-topic".len() + topic.len();
    let added = out.len() + key + header - line.len();
    assert!(added <= RECORD_OVERHEAD_BYTES, "{added} bytes added");
}

#[test]
fn one_rule_for_device_uids() {
    for ok in ["dev-42", "d", "Dévice 7", "a#b", &"x".repeat(128)] {
        assert!(valid_device_uid(ok), "{ok:?}");
    }
    for bad in [
        "",
        " dev",
        "dev ",
        "#dev",
        "dev\n",
        "de\u{1b}v",
        "dev\t",
        &"x".repeat(129),
    ] {
        assert!(!valid_device_uid(bad), "{bad:?}");
        let frame = serde_json::json!({"action":"t","uid":"u","deviceUid":bad}).to_string();
        let r = parse_frame(frame.as_bytes(), DEFAULT_MAX_JSON_DEPTH).unwrap_err();
        assert_eq!(r.code, ErrorCode::BadRequest, "{bad:?}");
    }
}

#[test]
fn presence_events_have_every_field_of_the_contract() {
    let client = Uuid::new_v4();
    let event = Presence {
        change: Change::Disconnected(Reason::TakenOver),
        device_uid: "dev-\"42".into(),
        client_id: client,
        at: Timestamp::from_unix_millis(1_795_644_000_123),
    };
    let mut out = Vec::new();
    write_presence(&mut out, &event, "gw-1", Some("replies.gw-1"));
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"event":"disconnected","deviceUid":"dev-\"42","serverId":"gw-1",
            "clientId":client.to_string(),"replyTopic":"replies.gw-1",
            "at":"2026-11-25T22:00:00.123Z","reason":"taken_over"})
    );
    let connected = Presence {
        change: Change::Connected,
        ..event
    };
    let mut out = Vec::new();
    write_presence(&mut out, &connected, "gw-1", None);
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(
        (&v["event"], &v["replyTopic"]),
        (&serde_json::json!("connected"), &serde_json::Value::Null)
    );
    assert_eq!(v.get("reason"), None);
}
