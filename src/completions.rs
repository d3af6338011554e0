//! `edgegate completions bash` (a module of the binary): the bash
//! completion script, made from the same tables as `--help` (the
//! subcommands here, the flags from `config::keys`), so it cannot drift
//! from them. The .deb ships its output, `packaging/edgegate.bash-completion`
//! (a test keeps the two equal).

use edgegate::config::keys;

/// Subcommands and the words that may follow each.
const COMMANDS: &[(&str, &[&str])] = &[
    ("run", &[]),
    ("check-config", &[]),
    ("outbox", &["stat", "dump", "purge"]),
    ("device", &[]),
    ("token", &[]),
    ("completions", &["bash"]),
];

pub fn bash() -> String {
    let mut flags = vec!["--config".to_owned(), "--help".to_owned()];
    flags.extend(
        keys::KEYS
            .iter()
            .filter_map(|k| k.flag)
            .map(|f| f.name.to_owned()),
    );
    let commands: Vec<&str> = COMMANDS.iter().map(|(c, _)| *c).collect();
    let mut next_words = String::new();
    for (command, words) in COMMANDS.iter().filter(|(_, w)| !w.is_empty()) {
        next_words.push_str(&format!(
            "        {command}) COMPREPLY=($(compgen -W \"{}\" -- \"$cur\")); return ;;\n",
            words.join(" ")
        ));
    }
    format!(
        r#"# bash completion for edgegate (made by `edgegate completions bash`)
_edgegate() {{
    local cur prev
    cur="${{COMP_WORDS[COMP_CWORD]}}"
    prev="${{COMP_WORDS[COMP_CWORD-1]}}"
    case "$prev" in
        --config|--data-dir|--key-file) COMPREPLY=($(compgen -f -- "$cur")); return ;;
    esac
    if [ "$COMP_CWORD" -eq 2 ]; then
        case "$prev" in
{next_words}        esac
    fi
    if [ "$COMP_CWORD" -eq 1 ] && [[ "$cur" != -* ]]; then
        COMPREPLY=($(compgen -W "{commands}" -- "$cur"))
        return
    fi
    case "${{COMP_WORDS[1]}}" in
        token) COMPREPLY=($(compgen -W "--key-file --help" -- "$cur")) ;;
        device) COMPREPLY=($(compgen -W "--help" -- "$cur")) ;;
        outbox) COMPREPLY=($(compgen -W "--config --data-dir --yes --help" -- "$cur")) ;;
        *) COMPREPLY=($(compgen -W "{flags} --version" -- "$cur")) ;;
    esac
}}
complete -F _edgegate edgegate
"#,
        commands = commands.join(" "),
        flags = flags.join(" "),
    )
}
