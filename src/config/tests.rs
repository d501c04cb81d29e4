use super::*;

const EXAMPLE: &str = include_str!("../../proxy.example.toml");

fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn parse(text: &str) -> Result<Config, Vec<Problem>> {
    Config::from_str(text, &repo_root().join("proxy.toml"))
}

fn messages(text: &str) -> Vec<String> {
    match parse(text) {
        Ok(_) => panic!("expected problems in:\n{text}"),
        Err(problems) => problems.iter().map(|p| format!("{}: {}", p.line, p.message)).collect(),
    }
}

#[test]
fn the_example_config_is_valid_and_documents_every_key() {
    let config = parse(EXAMPLE).unwrap_or_else(|p| panic!("{p:?}"));
    let app = &config.apps[0];
    assert_eq!(app.name, "web");
    assert_eq!(app.instances, Instances::MaxMinus(0));
    assert_eq!(app.listen, Some("127.0.0.1:4321".parse().expect("addr")));
    assert_eq!(app.env, vec![("NODE_ENV".to_owned(), "production".to_owned())]);
    // Switching users needs root, and the example runs as whoever tries it, on plain HTTP
    // without certificates, and does not watch files: these are shown commented.
    let commented = [
        "user",
        "group",
        "http_redirect",
        "hosts",
        "default",
        "hsts",
        "ignore_watch",
        "watch_delay",
        "cron_restart",
    ];
    for key in super::parse::APP_KEYS {
        let documented = EXAMPLE.contains(&format!("\n{key} = "))
            || EXAMPLE.contains(&format!("\n# [app.{key}]"))
            || EXAMPLE.contains(&format!("[app.{key}]"))
            || (commented.contains(key) && EXAMPLE.contains(&format!("\n# {key} = ")));
        assert!(documented, "proxy.example.toml does not document `{key}`");
    }
}

#[test]
fn defaults() {
    let config = parse("[[app]]\nname = \"a\"\ncommand = [\"node\"]\n").expect("valid");
    let app = &config.apps[0];
    assert_eq!(app.instances, Instances::Count(NonZeroUsize::MIN));
    assert_eq!(app.listen, None);
    assert_eq!(app.port_env, "PORT");
    assert_eq!(app.listen_timeout, Duration::from_secs(10));
    assert_eq!(app.kill_timeout, Duration::from_secs(5));
    assert_eq!(app.kill_signal, Signal::SIGTERM);
    assert_eq!(app.drain_timeout, Duration::from_secs(30));
    assert_eq!(app.http, HttpLimits::default());
    assert_eq!(app.cwd, repo_root());
    assert!(!app.logs.utc && !app.logs.compress);
    assert_eq!(app.logs.rotate_interval, None);
}

#[test]
fn log_keys() {
    let config = parse(
        "[[app]]\nname = \"a\"\ncommand = [\"node\"]\nlog_utc = true\nlog_compress = true\nlog_rotate_interval = \"daily\"\n",
    )
    .expect("valid");
    let logs = &config.apps[0].logs;
    assert!(logs.utc && logs.compress);
    assert_eq!(logs.rotate_interval, crate::cron::Schedule::parse("0 0 * * *").ok());
    for (value, schedule) in [
        ("hourly", "0 * * * *"),
        ("*/5 8-18 * * mon-fri", "*/5 8-18 * * mon-fri"),
    ] {
        let text = format!("[[app]]\nname = \"a\"\ncommand = [\"node\"]\nlog_rotate_interval = {value:?}\n");
        let config = parse(&text).expect("valid");
        assert_eq!(
            config.apps[0].logs.rotate_interval,
            crate::cron::Schedule::parse(schedule).ok()
        );
    }
    let got = messages(
        "[[app]]\nname = \"a\"\ncommand = [\"node\"]\nlog_rotate_interval = \"weekly-ish\"\nlog_compress = \"yes\"\n",
    );
    assert_eq!(got.len(), 2, "{got:#?}");
    assert!(got[0].starts_with("4: app \"a\": log_rotate_interval: expected \"daily\", \"hourly\" or a cron expression: \"weekly-ish\" has 1 field"), "{got:#?}");
    assert!(
        got[1].starts_with("5: app \"a\": log_compress: expected true or false"),
        "{got:#?}"
    );
}

#[test]
fn every_problem_is_reported_with_its_line() {
    let text = r#"[[app]]
name = "web"
command = ["node", "server.js"]
listen_timout = "10s"
kill_timeout = "10x"
instances = 0
listen = "nowhere"
kill_signal = "SIGFOO"
tls = true
"#;
    let got = messages(text);
    let want = [
        "4: app \"web\": listen_timout: unknown key (did you mean `listen_timeout`?)",
        "5: app \"web\": kill_timeout: expected a duration such as",
        "6: app \"web\": instances: expected a positive integer, \"max\", or a negative integer (max - n), found 0",
        "7: app \"web\": listen: expected an address such as",
        "8: app \"web\": kill_signal: \"SIGFOO\" is not a signal name",
        "9: app \"web\": tls: expected a table",
    ];
    assert_eq!(got.len(), want.len(), "{got:#?}");
    for (got, want) in got.iter().zip(want) {
        assert!(got.starts_with(want), "got {got:?}, want {want:?}");
    }
}

#[test]
fn wrong_types_and_missing_keys() {
    let got = messages("[[app]]\ncommand = \"node server.js\"\ninstances = true\n[app.env]\nA = [1]\n");
    assert!(
        got.iter().any(|m| m.starts_with("1: app #1: name: missing")),
        "{got:#?}"
    );
    assert!(
        got.iter()
            .any(|m| m.starts_with("2: app #1: command: expected an array of strings")),
        "{got:#?}"
    );
    assert!(
        got.iter()
            .any(|m| m.starts_with("3: app #1: instances: expected a positive integer")),
        "{got:#?}"
    );
    assert!(
        got.iter()
            .any(|m| m.contains("env: A: expected a string, number or boolean")),
        "{got:#?}"
    );
}

#[test]
fn syntax_errors_name_the_line() {
    let got = messages("[[app]]\nname = \"web\"\ncommand = [\"node\"\n");
    assert_eq!(got.len(), 1);
    assert!(got[0].contains("TOML syntax error"), "{got:?}");
    assert!(got[0].starts_with("3: ") || got[0].starts_with("4: "), "{got:?}");
}

#[test]
fn apps_must_be_distinct() {
    let text = "[[app]]\nname = \"a\"\ncommand = [\"node\"]\nlisten = 4000\n\n[[app]]\nname = \"a\"\ncommand = [\"node\"]\nlisten = \"127.0.0.1:4000\"\n";
    let got = messages(text);
    assert!(
        got.iter().any(|m| m.contains("name: another app has this name")),
        "{got:#?}"
    );
    assert!(
        got.iter().any(|m| m.contains("overlaps the address of another app")),
        "{got:#?}"
    );
    let same = "[[app]]\nname = \"a\"\ncommand = [\"node\"]\nlisten = 4000\n\n[[app]]\nname = \"b\"\ncommand = [\"node\"]\nlisten = 4000\n";
    assert!(
        messages(same)
            .iter()
            .any(|m| m.contains("apps share an address only when each names `hosts`")),
        "{:#?}",
        messages(same)
    );
    assert!(messages("").iter().any(|m| m.contains("no [[app]] table")));
    assert!(messages("[app]\nname = \"a\"\n")
        .iter()
        .any(|m| m.contains("write [[app]]")));
}

#[test]
fn instances_forms() {
    let instances = |v: &str| {
        parse(&format!(
            "[[app]]\nname = \"a\"\ncommand = [\"node\"]\ninstances = {v}\n"
        ))
        .map(|c| c.apps[0].instances)
    };
    assert_eq!(instances("4"), Ok(Instances::Count(NonZeroUsize::new(4).expect("4"))));
    assert_eq!(instances("\"max\""), Ok(Instances::MaxMinus(0)));
    assert_eq!(instances("-1"), Ok(Instances::MaxMinus(1)));
    assert_eq!(instances("\"-2\""), Ok(Instances::MaxMinus(2)));
    assert!(instances("\"many\"").is_err());
    assert_eq!(Instances::MaxMinus(1).resolve(4), 3);
    assert_eq!(Instances::MaxMinus(8).resolve(4), 1);
    assert_eq!(Instances::MaxMinus(0).resolve(2), 2);
}

#[test]
fn programs_and_folders_must_exist() {
    let got = messages("[[app]]\nname = \"a\"\ncommand = [\"no-such-program-xyz\"]\n");
    assert!(
        got[0].contains("`no-such-program-xyz` was not found on PATH"),
        "{got:?}"
    );
    let got = messages("[[app]]\nname = \"a\"\ncommand = [\"node\"]\ncwd = \"no/such/dir\"\n");
    assert!(got[0].contains("is not a directory"), "{got:?}");
}

#[test]
fn a_missing_file_is_a_read_error() {
    let e = Config::load(Path::new("/no/such/proxy.toml")).expect_err("missing");
    assert!(matches!(e, ConfigError::Read { .. }));
    assert!(e.to_string().contains("/no/such/proxy.toml"));
}

#[test]
fn readiness_and_reload_keys() {
    let config = parse("[[app]]\nname = \"a\"\ncommand = [\"node\"]\nready_path = \"/health\"\nreload_batch = 2\n")
        .expect("valid");
    assert_eq!(config.apps[0].ready_path.as_deref(), Some("/health"));
    assert_eq!(config.apps[0].reload_batch, 2);
    assert!(config.apps[0].reload_keep_old, "reload_keep_old defaults to true");
    let config = parse("[[app]]\nname = \"a\"\ncommand = [\"node\"]\nreload_keep_old = false\n").expect("valid");
    assert!(!config.apps[0].reload_keep_old);
    let got = messages("[[app]]\nname = \"a\"\ncommand = [\"node\"]\n\nreload_keep_old = \"no\"\n");
    assert!(
        got.iter()
            .any(|m| m.starts_with("5: ") && m.contains("reload_keep_old: expected true or false, found a string")),
        "{got:#?}"
    );
    let got = messages("[[app]]\nname = \"a\"\ncommand = [\"node\"]\nready_path = \"health\"\nreload_batch = 0\n");
    assert!(
        got.iter()
            .any(|m| m.starts_with("4: ") && m.contains("ready_path: \"health\" is not a request path")),
        "{got:#?}"
    );
    assert!(
        got.iter()
            .any(|m| m.starts_with("5: ") && m.contains("reload_batch: 0 is outside the allowed range")),
        "{got:#?}"
    );
}

#[test]
fn apps_share_an_address_by_host_name_with_one_default() {
    let app =
        |name: &str, extra: &str| format!("[[app]]\nname = \"{name}\"\ncommand = [\"node\"]\nlisten = 4000\n{extra}\n");
    let ok = app("a", "hosts = [\"a.test\", \"*.a.test\"]")
        + &app("b", "hosts = [\"B.test\"]")
        + &app("c", "default = true");
    let config = parse(&ok).unwrap_or_else(|p| panic!("{p:?}"));
    assert_eq!(config.apps[1].hosts, vec!["b.test".to_owned()], "names are lower-cased");
    assert!(config.apps[2].default_host);

    let twice = app("a", "hosts = [\"a.test\"]") + &app("b", "hosts = [\"x.test\", \"a.test\"]");
    let got = messages(&twice);
    assert!(
        got.iter()
            .any(|m| m.contains("hosts: \"a.test\" is claimed by app \"a\"")),
        "{got:#?}"
    );

    let defaults = app("a", "default = true") + &app("b", "default = true");
    assert!(messages(&defaults).iter().any(|m| m.contains("already the default")));

    let bad = app("a", "hosts = [\"a.test:443\"]");
    assert!(messages(&bad).iter().any(|m| m.contains("is not a host name")));
}

#[test]
fn the_edge_keys_need_tls_and_tls_needs_its_files() {
    let text = "[[app]]\nname = \"a\"\ncommand = [\"node\"]\nlisten = 4443\nhttp_redirect = 4080\nhsts = \"1y\"\n";
    let got = messages(text);
    assert!(
        got.iter().any(|m| m.contains("http_redirect: needs [app.tls]")),
        "{got:#?}"
    );
    assert!(got.iter().any(|m| m.contains("hsts: needs [app.tls]")), "{got:#?}");

    let missing = "[[app]]\nname = \"a\"\ncommand = [\"node\"]\nlisten = 4443\n[app.tls]\ncert = \"no/such.pem\"\nkey = \"no/such.key\"\n";
    let got = messages(missing);
    assert!(
        got.iter()
            .any(|m| m.contains("tls.cert: ") && m.contains("no/such.pem: cannot read")),
        "{got:#?}"
    );

    let both = "[[app]]\nname = \"a\"\ncommand = [\"node\"]\nlisten = 4443\n[app.tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\n[app.tls.acme]\ndomains = [\"a.test\"]\n";
    assert!(messages(both).iter().any(|m| m.contains("not both")));

    let acme = "[[app]]\nname = \"a\"\ncommand = [\"node\"]\nlisten = 4443\n[app.tls.acme]\ndomains = [\"a.test\"]\ndirectory = \"http://insecure\"\nemale = \"x\"\n";
    let got = messages(acme);
    assert!(
        got.iter()
            .any(|m| m.contains("tls.acme.directory: must be an https:// URL")),
        "{got:#?}"
    );
    assert!(
        got.iter()
            .any(|m| m.contains("tls.acme.emale: unknown key (did you mean `email`?)")),
        "{got:#?}"
    );

    let acme = "[[app]]\nname = \"a\"\ncommand = [\"node\"]\nlisten = 4443\n[app.tls.acme]\ndomains = [\"a.test\"]\n";
    let config = parse(acme).unwrap_or_else(|p| panic!("{p:?}"));
    let Some(super::Tls::Acme(acme)) = &config.apps[0].tls else {
        panic!("acme expected")
    };
    assert_eq!(acme.directory, super::tls::LETS_ENCRYPT);
    assert_eq!(acme.cache_dir, repo_root().join("acme"));
}

#[test]
fn env_tables_merge_over_env_when_chosen_and_bad_ones_are_named() {
    let text = r#"
[[app]]
name = "a"
command = ["node", "a.js"]
[app.env]
NODE_ENV = "development"
KEPT = 1
[app.env_production]
NODE_ENV = "production"
ADDED = true

[[app]]
name = "b"
command = ["node", "b.js"]
[app.env]
NODE_ENV = "development"
"#;
    let mut config = parse(text).unwrap_or_else(|p| panic!("{p:?}"));
    assert_eq!(config.apps[0].envs.len(), 1);
    let why = config.clone().choose_env("staging").expect_err("no such table");
    assert!(why.contains("env_production"), "{why}");
    config.choose_env("production").expect("chosen");
    let pairs = |app: &AppConfig| {
        let mut pairs = app.env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>();
        pairs.sort();
        pairs
    };
    assert_eq!(pairs(&config.apps[0]), ["ADDED=true", "KEPT=1", "NODE_ENV=production"]);
    // An app without the table keeps its own.
    assert_eq!(pairs(&config.apps[1]), ["NODE_ENV=development"]);
    assert_eq!(config.env_name.as_deref(), Some("production"));

    let bad =
        messages("[[app]]\nname = \"a\"\ncommand = [\"x\"]\nenv_ = { A = \"1\" }\nenv_prod = 3\n\"env_a b\" = {}\n");
    assert!(bad.iter().any(|m| m.contains("env_: an environment's name")), "{bad:?}");
    assert!(bad.iter().any(|m| m.contains("env_prod: expected a table")), "{bad:?}");
    assert!(
        bad.iter().any(|m| m.contains("env_a b: an environment's name")),
        "{bad:?}"
    );
}
