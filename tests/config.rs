//! Configuration as the service loads it: refusals name the key and exit
//! non-zero; check-config prints the effective settings.

mod common;

use common::run_cli as run;

#[test]
fn bad_values_are_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("edgegate.toml");
    std::fs::write(&file, "[listener]\nmax_connections = \"lots\"\n").unwrap();
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case<'_>> = vec![
        (
            vec!["--config", file.to_str().unwrap()],
            vec![],
            "listener.max_connections",
        ),
        (
            vec![],
            vec![("EDGEGATE_OUTBOX_FLUSH_INTERVAL_MS", "soon")],
            "outbox.flush_interval_ms",
        ),
        (
            vec!["--listen", "not-an-address"],
            vec![],
            "listener.address",
        ),
        (
            vec![],
            vec![("EDGEGATE_KAFKA_CONSUMER_TOPICS", "ok,bad topic")],
            "kafka.consumer_topics",
        ),
    ];
    for (args, env, key) in cases {
        let (code, _, stderr) = run(&args, &env);
        assert_ne!(code, Some(0), "{key} was accepted");
        assert!(
            stderr.contains(key),
            "refusal does not name {key}: {stderr}"
        );
    }
}

#[test]
fn unknown_keys_missing_files_and_flags_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("edgegate.toml");
    std::fs::write(&file, "[outbox]\nmax_byte = 5\n").unwrap();
    let (code, _, stderr) = run(&["--config", file.to_str().unwrap()], &[]);
    assert_ne!(code, Some(0));
    assert!(stderr.contains("outbox.max_byte"), "{stderr}");
    let (code, _, stderr) = run(&["--config", "/nonexistent/edgegate.toml"], &[]);
    assert_ne!(code, Some(0));
    assert!(stderr.contains("/nonexistent/edgegate.toml"), "{stderr}");
    let (code, _, _) = run(&["--no-such-flag"], &[]);
    assert_eq!(code, Some(2));
}

#[test]
fn check_config_prints_effective_settings_with_precedence() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("edgegate.toml");
    std::fs::write(
        &file,
        "data_dir = \"/var/lib/x\"\n[kafka]\nbrokers = \"file:9092\"\nproducer_topic = \"from_file\"\n[kafka.properties]\n\"sasl.password\" = \"s3cret\"\n",
    )
    .unwrap();
    let (code, stdout, stderr) = run(
        &[
            "check-config",
            "--config",
            file.to_str().unwrap(),
            "--brokers",
            "flag:9092",
        ],
        &[
            ("EDGEGATE_KAFKA_PRODUCER_TOPIC", "from_env"),
            ("EDGEGATE_KAFKA_BROKERS", "env:9092"),
        ],
    );
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("kafka.brokers = \"flag:9092\""), "{stdout}");
    assert!(
        stdout.contains("kafka.producer_topic = \"from_env\""),
        "{stdout}"
    );
    assert!(stdout.contains("data_dir = \"/var/lib/x\""), "{stdout}");
    assert!(
        stdout.contains("listener.max_frame_bytes = 65536"),
        "{stdout}"
    );
    assert!(!stdout.contains("s3cret"), "secrets are not printed");
}

#[test]
fn packaged_config_documents_every_key_at_its_default() {
    // Uncomment every `#key = value` line of the shipped file (but not the
    // example librdkafka properties): it must load, and give the defaults.
    let shipped = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/packaging/edgegate.toml"
    ))
    .unwrap();
    let mut uncommented = String::new();
    let mut in_properties_example = false;
    for line in shipped.lines() {
        if line.starts_with("#[kafka.properties]") {
            in_properties_example = true;
        } else if line.starts_with('[') {
            in_properties_example = false;
        }
        let active = line
            .strip_prefix('#')
            .filter(|l| !in_properties_example && l.contains(" = "));
        uncommented.push_str(active.unwrap_or(line));
        uncommented.push('\n');
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("edgegate.toml");
    std::fs::write(&file, &uncommented).unwrap();
    let (code, with_file, stderr) = run(&["check-config", "--config", file.to_str().unwrap()], &[]);
    assert_eq!(code, Some(0), "{stderr}\n{uncommented}");
    let (_, defaults, _) = run(&["check-config"], &[]);
    // Each value is marked as the file's, and equals the default.
    let values: String = with_file
        .lines()
        .map(|l| {
            let value = l.strip_suffix("  # config file");
            format!(
                "{}\n",
                value.unwrap_or_else(|| panic!("not from the file: {l}"))
            )
        })
        .collect();
    assert_eq!(
        values, defaults,
        "the shipped file's values are the defaults"
    );
    // And every key appears in it.
    let keys: Vec<&str> = defaults
        .lines()
        .filter_map(|l| l.split(" = ").next())
        .collect();
    assert!(keys.len() >= 15);
    for key in keys {
        let leaf = key.rsplit('.').next().unwrap();
        assert!(
            shipped.contains(&format!("#{leaf} = ")),
            "{key} is not documented in the shipped config"
        );
    }
}

#[test]
fn check_config_refuses_what_run_would_refuse_with_status_78() {
    let dir = tempfile::tempdir().unwrap();
    let misspelt = dir.path().join("misspelt.toml");
    std::fs::write(
        &misspelt,
        "[kafka.properties]\n\"securty.protocol\" = \"SSL\"\n",
    )
    .unwrap();
    let invalid = dir.path().join("invalid.toml");
    std::fs::write(&invalid, "[kafka.properties]\n\"linger.ms\" = \"abc\"\n").unwrap();
    let a_file = dir.path().join("a-file");
    std::fs::write(&a_file, "").unwrap();
    let under_a_file = a_file.join("data");
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case<'_>> = vec![
        (
            vec!["--config", misspelt.to_str().unwrap()],
            vec![],
            "No such configuration property: \"securty.protocol\"",
        ),
        (
            vec!["--config", invalid.to_str().unwrap()],
            vec![],
            "Invalid value for configuration property",
        ),
        (
            vec![],
            vec![("EDGEGATE_KAFKA_BROKER", "prod:9092")],
            "unknown environment variable `EDGEGATE_KAFKA_BROKER`",
        ),
        (
            vec!["--data-dir", under_a_file.to_str().unwrap()],
            vec![],
            "is not a directory",
        ),
        (
            vec![],
            vec![("EDGEGATE_AUTH_MODE", "token")],
            "`auth.token_key_file` is required when auth.mode is token",
        ),
    ];
    for (args, env, expected) in cases {
        let check: Vec<&str> = ["check-config"]
            .into_iter()
            .chain(args.iter().copied())
            .collect();
        let (code, stdout, stderr) = run(&check, &env);
        assert_eq!(
            code,
            Some(78),
            "check-config {args:?} {env:?}: {stdout}{stderr}"
        );
        assert!(stderr.contains(expected), "{stderr}");
        assert!(
            stdout.is_empty(),
            "settings printed for a refused config: {stdout}"
        );
    }
    // `run` refuses the same properties with the same status, before it
    // opens anything.
    let (code, _, stderr) = run(
        &[
            "run",
            "--config",
            misspelt.to_str().unwrap(),
            "--data-dir",
            dir.path().join("data").to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, Some(78), "{stderr}");
    assert!(!dir.path().join("data").exists());
}

#[test]
fn version_names_the_commit_target_and_librdkafka() {
    let (code, stdout, _) = run(&["--version"], &[]);
    assert_eq!(code, Some(0));
    let line = stdout.trim();
    assert!(
        line.starts_with(&format!("edgegate {} (commit ", env!("CARGO_PKG_VERSION"))),
        "{line}"
    );
    assert!(line.contains("-linux-"), "the target: {line}");
    assert!(line.contains(", librdkafka 2."), "{line}");
}

/// The .deb ships these as the binary makes them from its one command-line
/// definition.
const SHIPPED: &[(&[&str], &str)] = &[
    (&["completions", "bash"], "edgegate.bash-completion"),
    (&["completions", "zsh"], "edgegate.zsh-completion"),
    (&["completions", "fish"], "edgegate.fish-completion"),
    (&["manual"], "edgegate.1"),
];

#[test]
fn completions_and_the_man_page_are_shipped_as_made() {
    for (args, file) in SHIPPED {
        let (code, made, stderr) = run(args, &[]);
        assert_eq!(code, Some(0), "{args:?}: {stderr}");
        let path = format!("{}/packaging/{file}", env!("CARGO_MANIFEST_DIR"));
        let shipped = std::fs::read_to_string(&path).unwrap();
        assert!(
            made == shipped,
            "packaging/{file} differs from the binary's; regenerate: edgegate {} > packaging/{file}",
            args.join(" ")
        );
    }
}

#[test]
fn bash_completion_completes_commands_and_their_flags() {
    let (code, script, _) = run(&["completions", "bash"], &[]);
    assert_eq!(code, Some(0));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("edgegate");
    std::fs::write(&file, &script).unwrap();
    let complete = |words: &str| {
        let n = words.split(' ').count() - 1;
        let out = std::process::Command::new("bash")
            .arg("-c")
            .arg(format!(
                "source {}; COMP_WORDS=({words}); COMP_CWORD={n}; \\
                 _edgegate edgegate \"${{COMP_WORDS[$COMP_CWORD]}}\" \"${{COMP_WORDS[$COMP_CWORD-1]}}\"; \\
                 echo \"${{COMPREPLY[*]}}\"",
                file.display()
            ))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!(complete("edgegate out"), "outbox");
    assert_eq!(complete("edgegate outbox p"), "purge");
    assert_eq!(complete("edgegate run --da"), "--data-dir");
    assert_eq!(complete("edgegate outbox purge --y"), "--yes");
    assert_eq!(complete("edgegate token --k"), "--key-file");
}

#[test]
fn the_man_page_lists_every_command_and_flag_of_the_help() {
    let man = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/packaging/edgegate.1"))
        .unwrap();
    for args in [
        &["--help"][..],
        &["token", "--help"],
        &["outbox", "purge", "--help"],
        &["check-config", "--help"],
    ] {
        let (code, help, _) = run(args, &[]);
        assert_eq!(code, Some(0), "{args:?}");
        for flag in help
            .split_whitespace()
            .filter(|w| w.starts_with("--") && w.len() > 2)
        {
            let roff = flag.replace('-', "\\-");
            assert!(man.contains(&roff), "the man page lacks {flag} ({roff})");
        }
    }
    for command in [
        "run",
        "check\\-config",
        "outbox purge",
        "device",
        "token",
        "completions",
    ] {
        let heading = format!(".SS \"edgegate {command}\"");
        assert!(man.contains(&heading), "the man page lacks {heading}");
    }
    for section in ["SIGNALS", "EXIT STATUS", "FILES", "ENVIRONMENT"] {
        assert!(man.contains(&format!(".SH {section}")), "{section}");
    }
}
