//! The per-frame decisions, the auth state machine included, without a
//! socket.

use super::*;

fn session(auth: AuthState) -> Session<'static> {
    Session {
        auth,
        bound: None,
        shutting_down: false,
        max_frame_bytes: 100,
        max_json_depth: 32,
    }
}

fn line(text: &str) -> Frame<'_> {
    Frame::Line(text.as_bytes())
}

/// An authenticator that must not be asked.
fn never(_: &Request<'_>) -> AuthResult {
    panic!("authenticate called outside an auth frame before authentication")
}

fn token_ok(req: &Request<'_>) -> AuthResult {
    match req.device_uid.as_ref().map(|d| d.value.as_ref()) {
        Some("dev-1") => Ok("dev-1".to_owned()),
        _ => Err((
            AuthFailure::BadToken,
            "the token is not valid for this deviceUid",
        )),
    }
}

const REQUEST: &str = r#"{"action":"t","uid":"u1","deviceUid":"dev-1","data":1}"#;
const AUTH: &str = r#"{"action":"auth","uid":"a1","deviceUid":"dev-1","data":{"token":"x"}}"#;

#[test]
fn without_authentication_requests_are_accepted_and_pings_answered() {
    let s = session(AuthState::Open);
    assert!(
        matches!(decide(line(REQUEST), &s, never), Decision::Accept(r) if r.uid.raw == "\"u1\"")
    );
    assert!(matches!(decide(line("Ping"), &s, never), Decision::Pong));
    assert!(matches!(
        decide(line(r#"{"action":"ping","uid":"p"}"#), &s, never),
        Decision::JsonPong { uid: "\"p\"" }
    ));
    assert!(
        matches!(decide(line("{nope"), &s, never), Decision::Reject(r) if r.code == ErrorCode::BadJson)
    );
    match decide(Frame::TooLarge, &s, never) {
        Decision::Error { code, message, .. } => {
            assert_eq!(code, ErrorCode::FrameTooLarge);
            assert!(message.contains("100 bytes"), "{message}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn before_authentication_only_pings_and_a_valid_auth_frame_pass() {
    let s = session(AuthState::Pending);
    // Pings are answered and do not count as the first frame.
    assert!(matches!(decide(line("Ping"), &s, never), Decision::Pong));
    // Anything else first: refused, with the uid where one could be read.
    for (frame, uid) in [
        (line(REQUEST), Some("\"u1\"")),
        (line("{nope"), None),
        (
            line(r#"{"action":"t","uid":"u2","data":1,"deviceUid":7}"#),
            Some("\"u2\""),
        ),
        (Frame::TooLarge, None),
    ] {
        match decide(frame, &s, never) {
            Decision::Refuse {
                uid: got,
                why,
                message,
            } => {
                assert_eq!(got.as_deref(), uid);
                assert_eq!(why, AuthFailure::NotAuthFirst);
                assert_eq!(message, NOT_AUTH_FIRST);
            }
            other => panic!("{other:?}"),
        }
    }
    // The auth frame: the authenticator decides.
    assert!(matches!(
        decide(line(AUTH), &s, token_ok),
        Decision::Authenticated { uid: "\"a1\"", ref device } if device == "dev-1"
    ));
    let wrong = r#"{"action":"auth","uid":"a2","deviceUid":"dev-2","data":{"token":"x"}}"#;
    assert!(matches!(
        decide(line(wrong), &s, token_ok),
        Decision::Refuse {
            why: AuthFailure::BadToken,
            ..
        }
    ));
}

#[test]
fn once_authenticated_a_second_auth_frame_is_a_bad_request_and_others_are_bound() {
    let s = Session {
        bound: Some("dev-1"),
        ..session(AuthState::Done)
    };
    assert!(matches!(
        decide(line(AUTH), &s, never),
        Decision::Error {
            code: ErrorCode::BadRequest,
            ..
        }
    ));
    assert!(matches!(
        decide(line(REQUEST), &s, never),
        Decision::Accept(_)
    ));
    let other = r#"{"action":"t","uid":"u3","deviceUid":"dev-9"}"#;
    assert!(matches!(
        decide(line(other), &s, never),
        Decision::Error {
            code: ErrorCode::Unauthorized,
            uid: Some("\"u3\""),
            ..
        }
    ));
    let unclaimed = r#"{"action":"t","uid":"u4"}"#;
    assert!(matches!(
        decide(line(unclaimed), &s, never),
        Decision::Accept(_)
    ));
}

#[test]
fn during_shutdown_requests_are_turned_away_but_pings_answered() {
    let s = Session {
        shutting_down: true,
        ..session(AuthState::Open)
    };
    assert!(matches!(
        decide(line(REQUEST), &s, never),
        Decision::ShuttingDown { uid: "\"u1\"" }
    ));
    assert!(matches!(decide(line("Ping"), &s, never), Decision::Pong));
}
