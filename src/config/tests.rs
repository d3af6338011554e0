use super::*;
use std::io::Write;

fn load(
    toml_text: Option<&str>,
    env: &[(&str, &str)],
    flags: &[(&'static str, &str)],
) -> Result<Config, ConfigError> {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    let mut f = Flags::default();
    if let Some(text) = toml_text {
        file.write_all(text.as_bytes()).unwrap();
        f.config = Some(file.path().to_owned());
    }
    for (k, v) in flags {
        f.values.insert(k, v.to_string());
    }
    let env = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Config::load(&f, &env)
}

#[test]
fn defaults_without_a_file() {
    let c = load(None, &[], &[]).unwrap();
    assert_eq!(c.listener.address.to_string(), "0.0.0.0:3000");
    assert_eq!(c.listener.max_frame_bytes, 65_536);
    assert_eq!(c.listener.max_connections, 100_000);
    assert_eq!(c.listener.idle_timeout, Duration::from_secs(300));
    assert_eq!(c.kafka.producer_topic, "tcp_layer_messages");
    assert_eq!(c.kafka.consumer_topics, vec!["workers_layer_messages"]);
    assert_eq!(c.outbox.max_bytes, 1 << 30);
    assert_eq!(c.admin.address.to_string(), "127.0.0.1:8080");
    assert_eq!(c.consumer_group("abc"), "edgegate-abc");
    assert!(c.server_id.is_none());
}

#[test]
fn flag_beats_env_beats_file() {
    let file = "[kafka]\nbrokers = \"file:1\"\nproducer_topic = \"from_file\"\n[listener]\nmax_frame_bytes = 100\n";
    let c = load(
        Some(file),
        &[
            ("EDGEGATE_KAFKA_BROKERS", "env:1"),
            ("EDGEGATE_LISTENER_MAX_FRAME_BYTES", "200"),
        ],
        &[("kafka.brokers", "flag:1")],
    )
    .unwrap();
    assert_eq!(c.kafka.brokers, "flag:1");
    assert_eq!(c.listener.max_frame_bytes, 200);
    assert_eq!(c.kafka.producer_topic, "from_file");
}

#[test]
fn topics_from_env_are_comma_separated_and_properties_pass_through() {
    let file = "[kafka.properties]\n\"security.protocol\" = \"SASL_SSL\"\n\"linger.ms\" = 10\n";
    let c = load(
        Some(file),
        &[("EDGEGATE_KAFKA_CONSUMER_TOPICS", "a, b")],
        &[],
    )
    .unwrap();
    assert_eq!(c.kafka.consumer_topics, vec!["a", "b"]);
    assert_eq!(c.kafka.properties["security.protocol"], "SASL_SSL");
    assert_eq!(c.kafka.properties["linger.ms"], "10");
}

#[test]
fn bad_values_name_their_key() {
    type Case<'a> = (Option<&'a str>, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case<'_>> = vec![
        (
            Some("[listener]\nmax_frame_bytes = \"big\"\n"),
            vec![],
            "listener.max_frame_bytes",
        ),
        (
            None,
            vec![("EDGEGATE_LISTENER_MAX_CONNECTIONS", "0")],
            "listener.max_connections",
        ),
        (
            None,
            vec![("EDGEGATE_LISTENER_ADDRESS", "nowhere")],
            "listener.address",
        ),
        (
            None,
            vec![("EDGEGATE_KAFKA_PRODUCER_TOPIC", "bad topic")],
            "kafka.producer_topic",
        ),
        (
            None,
            vec![("EDGEGATE_OUTBOX_MAX_BYTES", "-1")],
            "outbox.max_bytes",
        ),
        (None, vec![("EDGEGATE_SERVER_ID", "has space")], "server_id"),
        (
            Some("[outbox]\nflush_interval_ms = -5\n"),
            vec![],
            "outbox.flush_interval_ms",
        ),
    ];
    for (file, env, key) in cases {
        let err = load(file, &env, &[]).unwrap_err();
        assert!(err.to_string().contains(key), "{err} should name {key}");
    }
}

#[test]
fn unknown_keys_and_bad_toml_are_refused() {
    let err = load(Some("[listener]\nmax_frame_byte = 5\n"), &[], &[]).unwrap_err();
    assert!(err.to_string().contains("listener.max_frame_byte"), "{err}");
    let err = load(Some("[listener\n"), &[], &[]).unwrap_err();
    assert!(matches!(err, ConfigError::Toml { .. }), "{err}");
}

#[test]
fn security_settings_are_checked_against_each_other() {
    let c = load(None, &[], &[]).unwrap();
    assert_eq!(c.auth.mode, AuthMode::None);
    assert_eq!(c.auth.timeout, Duration::from_secs(10));
    assert!(c.tls.address.is_none());
    let refused: &[(&[(&str, &str)], &str)] = &[
        (&[("EDGEGATE_AUTH_MODE", "tokens")], "auth.mode"),
        (&[("EDGEGATE_AUTH_MODE", "token")], "auth.token_key_file"),
        (&[("EDGEGATE_AUTH_MODE", "mtls")], "tls.address"),
        (
            &[
                ("EDGEGATE_AUTH_MODE", "mtls"),
                ("EDGEGATE_TLS_ADDRESS", "127.0.0.1:3443"),
                ("EDGEGATE_TLS_CERT_FILE", "c.pem"),
                ("EDGEGATE_TLS_KEY_FILE", "k.pem"),
            ],
            "tls.client_ca_file",
        ),
        (
            &[("EDGEGATE_TLS_ADDRESS", "127.0.0.1:3443")],
            "tls.cert_file",
        ),
        (&[("EDGEGATE_TLS_ADDRESS", "nowhere")], "tls.address"),
        (
            &[("EDGEGATE_TLS_CLIENT_CA_FILE", "ca.pem")],
            "tls.client_ca_file",
        ),
        (&[("EDGEGATE_AUTH_TIMEOUT_SECS", "0")], "auth.timeout_secs"),
    ];
    for (env, key) in refused {
        let e = load(None, env, &[]).unwrap_err().to_string();
        assert!(e.contains(&format!("`{key}`")), "{env:?}: {e}");
    }
    let c = load(
        Some("[auth]\nmode = \"mtls\"\n[tls]\naddress = \"127.0.0.1:3443\"\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"\nclient_ca_file = \"ca.pem\"\n"),
        &[],
        &[],
    )
    .unwrap();
    assert_eq!(c.auth.mode, AuthMode::Mtls);
    assert_eq!(c.tls.address.unwrap().port(), 3443);
    assert!(c.describe().contains("auth.mode = \"mtls\""));
}

#[test]
fn env_names() {
    assert_eq!(env_name("server_id"), "EDGEGATE_SERVER_ID");
    assert_eq!(
        env_name("outbox.flush_interval_ms"),
        "EDGEGATE_OUTBOX_FLUSH_INTERVAL_MS"
    );
}

#[test]
fn describe_hides_secrets() {
    let c = load(
        Some("[kafka.properties]\n\"sasl.password\" = \"hunter2\"\n"),
        &[],
        &[],
    )
    .unwrap();
    let text = c.describe();
    assert!(!text.contains("hunter2"));
    assert!(text.contains("sasl.password"));
}

#[test]
fn every_key_is_read_and_reported_with_its_origin() {
    let file = "[listener]\nmax_frame_bytes = 100\n";
    let c = load(
        Some(file),
        &[("EDGEGATE_KAFKA_BROKERS", "env:1")],
        &[("admin.address", "127.0.0.1:1")],
    )
    .unwrap();
    let keys: Vec<&str> = c.settings.iter().map(|s| s.key).collect();
    let table: Vec<&str> = KEYS.iter().map(|k| k.name).collect();
    assert_eq!(keys, table, "build() reads every key of the table, once");
    let origin = |key: &str| c.settings.iter().find(|s| s.key == key).unwrap().origin;
    assert_eq!(origin("listener.max_frame_bytes"), Origin::File);
    assert_eq!(origin("kafka.brokers"), Origin::Environment);
    assert_eq!(origin("admin.address"), Origin::CommandLine);
    assert_eq!(origin("data_dir"), Origin::Default);
    let text = c.describe();
    assert!(
        text.contains("listener.max_frame_bytes = 100  # config file\n"),
        "{text}"
    );
    assert!(
        text.contains("kafka.brokers = \"env:1\"  # environment\n"),
        "{text}"
    );
    assert!(text.contains("outbox.max_bytes = 1073741824\n"), "{text}");
}

#[test]
fn a_missing_setting_is_not_blamed_on_a_file() {
    let e = load(None, &[("EDGEGATE_AUTH_MODE", "token")], &[])
        .unwrap_err()
        .to_string();
    assert!(!e.contains("config file)"), "{e}");
    assert!(e.contains("EDGEGATE_AUTH_TOKEN_KEY_FILE"), "{e}");
    let e = load(None, &[("EDGEGATE_LISTENER_MAX_CONNECTIONS", "0")], &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("(from the environment)"), "{e}");
}

/// The packaged file lists every key, commented out, at the table's default.
#[test]
fn packaged_config_matches_the_key_table() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/packaging/edgegate.toml");
    let text = std::fs::read_to_string(path).unwrap();
    let mut section = String::new();
    let mut listed = Vec::new();
    for line in text.lines() {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = format!("{name}.");
            continue;
        }
        let Some((name, value)) = line.strip_prefix('#').and_then(|l| l.split_once(" = ")) else {
            continue;
        };
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
            continue; // prose, or a librdkafka example
        }
        let key = format!("{section}{name}");
        let known = KEYS.iter().find(|k| k.name == key);
        let known = known.unwrap_or_else(|| panic!("{path} lists `{key}`, which is no key"));
        assert_eq!(value, known.default_toml(), "default of `{key}` in {path}");
        listed.push(known.name);
    }
    let table: Vec<&str> = KEYS.iter().map(|k| k.name).collect();
    assert_eq!(
        listed, table,
        "{path} lists every key, in the table's order"
    );
    // And as a file, uncommented, it loads to the defaults.
    let uncommented: String = text
        .lines()
        .map(|l| match l.strip_prefix('#') {
            Some(rest) if rest.contains(" = ") && !rest.starts_with('"') => rest,
            _ => l,
        })
        .map(|l| format!("{l}\n"))
        .collect();
    let c = load(Some(&uncommented), &[], &[]).unwrap();
    assert!(c.settings.iter().all(|s| s.origin == Origin::File));
    let defaults = load(None, &[], &[]).unwrap();
    let values = |c: &Config| {
        c.settings
            .iter()
            .map(|s| s.value.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(values(&c), values(&defaults));
}

#[test]
fn usage_lists_each_flag_with_its_default() {
    let text = keys::usage_options();
    for k in KEYS {
        if let Some(f) = k.flag {
            assert!(text.contains(&format!("{} {}", f.name, f.value)), "{text}");
            assert!(text.contains(k.default), "{text}");
        }
    }
    assert_eq!(keys::by_flag("--listen").unwrap().name, "listener.address");
    assert!(keys::by_flag("--nope").is_none());
}

/// The README's table of keys says what the key table says: every key, its
/// environment variable, its flag and (where it has a literal one) its
/// default.
#[test]
fn readme_table_matches_the_key_table() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/README.md");
    let text = std::fs::read_to_string(path).unwrap();
    let mut listed = Vec::new();
    for line in text.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let name = cells[1].trim_matches('`');
        let Some(key) = KEYS.iter().find(|k| k.name == name) else {
            continue;
        };
        let env = cells[2].split(' ').next().unwrap_or_default();
        assert_eq!(env, format!("`{}`", key.env()), "{name} in {path}");
        let flag = key
            .flag
            .map(|f| format!("`{}`", f.name))
            .unwrap_or_default();
        assert_eq!(cells[3], flag, "flag of {name} in {path}");
        if let Some(shown) = cells[4].strip_prefix('`').and_then(|c| c.strip_suffix('`')) {
            if !key.default.is_empty() {
                let expected = match key.kind {
                    keys::Kind::Topics => key.default_toml(),
                    _ => key.default.to_owned(),
                };
                assert_eq!(shown, expected, "default of {name} in {path}");
            }
        } else {
            assert!(key.default.is_empty(), "{name}: {path} gives no default");
        }
        listed.push(key.name);
    }
    let table: Vec<&str> = KEYS.iter().map(|k| k.name).collect();
    assert_eq!(
        listed, table,
        "{path} lists every key, in the table's order"
    );
}
