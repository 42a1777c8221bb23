//! One source for every setting and metric: the docs are checked against the code.
//!
//! Settings: the clap definitions of both binaries (`--help`) plus their secrets (no flags:
//! `NAME` or `NAME_FILE`) against the README's config tables, `relay/README.md`, the tables
//! at the top of both `config.rs` files and `deploy/env/*.env.example`: same names, and
//! where a row names one setting, its default as clap has it.
//!
//! Metrics: each binary's real registry, rendered, against `docs/metrics.md` (name as
//! scraped, type, label names), and every `callbridge_*` series the dashboard, the HPA, the
//! adapter rule and the documented alerts use must be one the registries export.
//!
//! A failure lists every drift at once, each naming the file and what to change.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use clap::CommandFactory;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace holds tests/")
        .to_path_buf()
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Drift found so far; the test fails at the end with all of it.
#[derive(Default)]
struct Drift(Vec<String>);

impl Drift {
    fn push(&mut self, what: String) {
        self.0.push(what);
    }

    fn assert_none(self, what: &str) {
        assert!(
            self.0.is_empty(),
            "{what} drifted from the code ({} problems):\n  - {}",
            self.0.len(),
            self.0.join("\n  - ")
        );
    }
}

// ---------------------------------------------------------------------------------------
// Settings

/// A binary's settings as the code defines them: env name → default (clap's, joined by
/// `,`), and the secret names (each with its `_FILE` twin).
struct CodeSettings {
    defaults: BTreeMap<String, Option<String>>,
    secrets: Vec<callbridge_relay::config::SecretVar>,
}

impl CodeSettings {
    fn new(command: clap::Command, secrets: &[callbridge_relay::config::SecretVar]) -> Self {
        let defaults = command
            .get_arguments()
            .filter_map(|arg| {
                let env = arg.get_env()?.to_str()?.to_owned();
                let default = arg.get_default_values();
                let default = (!default.is_empty()).then(|| {
                    default
                        .iter()
                        .map(|v| v.to_string_lossy().into_owned())
                        .collect::<Vec<_>>()
                        .join(",")
                });
                Some((env, default))
            })
            .collect();
        CodeSettings {
            defaults,
            secrets: secrets.to_vec(),
        }
    }

    /// Every variable a doc table must list: the settings, each secret and its file twin.
    fn table_names(&self) -> BTreeSet<String> {
        let mut names: BTreeSet<String> = self.defaults.keys().cloned().collect();
        for s in &self.secrets {
            names.insert(s.name.to_owned());
            names.insert(s.file.to_owned());
        }
        names
    }
}

fn relay_settings() -> CodeSettings {
    CodeSettings::new(
        callbridge_relay::config::Config::command(),
        &callbridge_relay::config::SECRETS,
    )
}

fn control_settings() -> CodeSettings {
    CodeSettings::new(
        callbridge_control::config::command(),
        &callbridge_control::config::SECRETS,
    )
}

/// The cells of a markdown table row; `\|` inside a cell is not a separator.
fn cells(row: &str) -> Vec<String> {
    let inner = row.trim().trim_start_matches('|').trim_end_matches('|');
    let mut out = vec![String::new()];
    let mut chars = inner.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'|') => {
                out.last_mut().expect("one cell").push('|');
                chars.next();
            }
            '|' => out.push(String::new()),
            c => out.last_mut().expect("one cell").push(c),
        }
    }
    out.into_iter().map(|c| c.trim().to_owned()).collect()
}

/// The `code` spans of a cell.
fn code_spans(cell: &str) -> Vec<String> {
    cell.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

fn is_env_name(s: &str) -> bool {
    s.len() > 2
        && s.starts_with(|c: char| c.is_ascii_uppercase())
        && s.bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
}

/// The body rows of the first table at or after the line `heading` (header and rule
/// dropped).
fn table_after(text: &str, heading: &str, file: &str) -> Vec<Vec<String>> {
    let mut lines = text.lines().skip_while(|l| l.trim() != heading).peekable();
    assert!(
        lines.peek().is_some(),
        "{file}: no line `{heading}` (the check looks for its table)"
    );
    // A heading above the table is passed; a table's own header row is kept (and dropped
    // below with the rule).
    if !heading.starts_with('|') {
        lines.next();
    }
    lines
        .skip_while(|l| !l.trim_start().starts_with('|'))
        .take_while(|l| l.trim_start().starts_with('|'))
        .skip(2)
        .map(cells)
        .collect()
}

/// A config table: each row's variable names (first column) and default (last column).
fn setting_rows(rows: &[Vec<String>]) -> Vec<(Vec<String>, String)> {
    rows.iter()
        .map(|row| {
            let names = code_spans(&row[0])
                .into_iter()
                .filter(|n| is_env_name(n))
                .collect();
            (names, row.last().cloned().unwrap_or_default())
        })
        .collect()
}

fn check_table(
    drift: &mut Drift,
    where_: &str,
    rows: &[(Vec<String>, String)],
    code: &CodeSettings,
) {
    let documented: BTreeSet<String> = rows.iter().flat_map(|(n, _)| n.clone()).collect();
    let wanted = code.table_names();
    for missing in wanted.difference(&documented) {
        drift.push(format!(
            "{where_}: no row for {missing}, which the code reads"
        ));
    }
    for extra in documented.difference(&wanted) {
        drift.push(format!(
            "{where_}: row for {extra}, which the code does not read"
        ));
    }
    for (names, default_cell) in rows {
        let [name] = names.as_slice() else { continue };
        let Some(Some(default)) = code.defaults.get(name) else {
            continue;
        };
        // A prose default (the standalone agent's prompt) is described, not quoted.
        if default.len() > 60 {
            continue;
        }
        if !code_spans(default_cell).iter().any(|d| d == default) {
            drift.push(format!(
                "{where_}: {name}'s default is `{default}` in the code; the table says \
                 \"{default_cell}\""
            ));
        }
    }
}

/// The table at the top of a `config.rs` (its `//!` lines).
fn module_doc(rel: &str) -> String {
    read(rel)
        .lines()
        .filter_map(|l| l.strip_prefix("//!"))
        .map(str::trim_start)
        .collect::<Vec<_>>()
        .join("\n")
}

fn check_env_example(drift: &mut Drift, rel: &str, code: &CodeSettings) {
    let text = read(rel);
    let listed: BTreeSet<String> = text
        .lines()
        .filter_map(|l| {
            let l = l.trim_start_matches('#').trim_start();
            let (name, _) = l.split_once('=')?;
            is_env_name(name).then(|| name.to_owned())
        })
        .collect();
    // Every setting (set, or commented out at its default); a secret's `_FILE` twin is
    // the alternative, not required.
    let mut wanted: BTreeSet<String> = code.defaults.keys().cloned().collect();
    wanted.extend(code.secrets.iter().map(|s| s.name.to_owned()));
    let allowed: BTreeSet<String> = code.table_names();
    for missing in wanted.difference(&listed) {
        drift.push(format!(
            "{rel}: {missing} is missing (set or commented out)"
        ));
    }
    for extra in listed.difference(&allowed) {
        drift.push(format!("{rel}: {extra} is not a setting the binary reads"));
    }
}

#[test]
fn settings_docs_and_env_examples_list_what_the_binaries_read() {
    let relay = relay_settings();
    let control = control_settings();
    assert!(relay.defaults.contains_key("RELAY_LISTEN") && relay.secrets.len() >= 4);
    assert!(control.defaults.contains_key("CONTROL_LISTEN") && control.secrets.len() >= 6);
    let mut drift = Drift::default();
    let readme = read("README.md");
    for (heading, code, what) in [
        (
            "### relay (`callbridge-relay`)",
            &relay,
            "README.md, relay table",
        ),
        (
            "### control (`callbridge-control`)",
            &control,
            "README.md, control table",
        ),
    ] {
        let rows = setting_rows(&table_after(&readme, heading, "README.md"));
        check_table(&mut drift, what, &rows, code);
    }
    let relay_readme = read("relay/README.md");
    let rows = setting_rows(&table_after(
        &relay_readme,
        "## Configuration",
        "relay/README.md",
    ));
    check_table(&mut drift, "relay/README.md", &rows, &relay);
    for (rel, code) in [
        ("relay/src/config.rs", &relay),
        ("control/src/config.rs", &control),
    ] {
        let doc = module_doc(rel);
        let rows = setting_rows(&table_after(&doc, "| variable | meaning | default |", rel));
        check_table(&mut drift, &format!("{rel} (module doc)"), &rows, code);
    }
    check_env_example(&mut drift, "deploy/env/relay.env.example", &relay);
    check_env_example(&mut drift, "deploy/env/control.env.example", &control);
    drift.assert_none("The settings docs");
}

#[test]
fn help_lists_the_secrets_and_no_secret_flag() {
    for (mut command, secrets) in [
        (
            callbridge_relay::config::Config::command(),
            &callbridge_relay::config::SECRETS[..],
        ),
        (
            callbridge_control::config::command(),
            &callbridge_control::config::SECRETS[..],
        ),
    ] {
        let help = command.render_long_help().to_string();
        for secret in secrets {
            assert!(
                help.contains(&format!("{}, {}", secret.name, secret.file)),
                "--help names {} and its file twin:\n{help}",
                secret.name
            );
            assert!(
                command
                    .get_arguments()
                    .all(|a| a.get_env().is_none_or(|e| e != secret.name)),
                "{} is a flag",
                secret.name
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// Metrics

/// A metric family as scraped: type and label names.
#[derive(Debug, PartialEq, Eq)]
struct Family {
    kind: String,
    labels: BTreeSet<String>,
}

/// Families of a text exposition, by scraped name (counters with `_total`), with the label
/// names their series carry (`le` aside).
fn families(exposition: &str) -> BTreeMap<String, Family> {
    let mut out = BTreeMap::new();
    let mut types: Vec<(String, String)> = Vec::new();
    for line in exposition.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
            types.push((name.to_owned(), kind.to_owned()));
            let scraped = if kind == "counter" {
                format!("{name}_total")
            } else {
                name.to_owned()
            };
            out.insert(
                scraped,
                Family {
                    kind: kind.to_owned(),
                    labels: BTreeSet::new(),
                },
            );
        }
    }
    for line in exposition.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, rest)) = line.split_once('{') else {
            continue;
        };
        let labels = rest.split_once('}').map_or("", |(l, _)| l);
        // The family a sample belongs to: its name, less a histogram's suffix.
        let family = ["_bucket", "_sum", "_count", "_created"]
            .iter()
            .find_map(|s| series.strip_suffix(s).filter(|b| out.contains_key(*b)))
            .unwrap_or(series);
        if let Some(f) = out.get_mut(family) {
            for pair in labels.split("\",") {
                if let Some((k, _)) = pair.split_once('=')
                    && k != "le"
                {
                    f.labels.insert(k.trim().to_owned());
                }
            }
        }
    }
    out
}

/// Both registries rendered, every labelled family touched once: prometheus-client writes
/// a family only once it has a series, and its label names show only then.
fn exported() -> BTreeMap<String, Family> {
    let relay = callbridge_relay::metrics::Metrics::new();
    relay.call_ended("caller_hangup");
    relay.stream_refused("bad_start");
    relay.signature_refused("voice", "missing");
    relay.model_breaker_open("wss://model.example.com/v1/realtime");
    relay.model_breaker_opened("wss://model.example.com/v1/realtime");
    relay.model_breaker_short_circuits("wss://model.example.com/v1/realtime", "webhook");
    let control = callbridge_control::metrics::Metrics::new();
    control.rpc("Calls", "CreateCall", tonic::Code::Ok);
    control
        .redis_latency
        .get_or_create(&callbridge_control::metrics::RedisLabels { command: "ping" })
        .observe(0.001);
    control
        .auth_refused
        .get_or_create(&callbridge_control::metrics::AuthLabels { api: "public" })
        .inc();
    let mut all = families(&relay.encode());
    all.extend(families(&control.encode()));
    all
}

/// `docs/metrics.md`'s table: scraped name → type and label names.
fn documented() -> BTreeMap<String, Family> {
    let doc = read("docs/metrics.md");
    let rows = table_after(
        &doc,
        "| name | type | labels | meaning | service |",
        "docs/metrics.md",
    );
    let mut out = BTreeMap::new();
    for row in rows {
        let name = code_spans(&row[0]).into_iter().next().unwrap_or_default();
        // Label names: the first code span of each comma-separated part, once the value
        // lists in parentheses are gone (`service` (`Agents`, …), `method`, `code`).
        let mut depth = 0usize;
        let flat: String = row[2]
            .chars()
            .filter(|c| {
                match c {
                    '(' => depth += 1,
                    ')' => depth = depth.saturating_sub(1),
                    _ => return depth == 0,
                }
                false
            })
            .collect();
        let labels = flat
            .split(',')
            .filter_map(|part| code_spans(part.split('=').next()?).into_iter().next())
            .collect();
        out.insert(
            name,
            Family {
                kind: row[1].clone(),
                labels,
            },
        );
    }
    out
}

#[test]
fn metrics_doc_matches_the_registries() {
    let code = exported();
    let doc = documented();
    assert!(code.len() > 20 && doc.len() > 20, "{code:?} {doc:?}");
    let mut drift = Drift::default();
    for (name, family) in &code {
        match doc.get(name) {
            None => drift.push(format!(
                "docs/metrics.md: no row for {name} ({}), which the code exports",
                family.kind
            )),
            Some(d) if d != family => drift.push(format!(
                "docs/metrics.md: {name} is a {} with labels {:?} in the code; the doc says a \
                 {} with labels {:?}",
                family.kind, family.labels, d.kind, d.labels
            )),
            Some(_) => {}
        }
    }
    for name in doc.keys().filter(|n| !code.contains_key(*n)) {
        drift.push(format!(
            "docs/metrics.md: row for {name}, which no registry exports (a labelled family \
             shows only once it has a series: if it is new, touch it in `exported()`)"
        ));
    }
    drift.assert_none("docs/metrics.md");
}

/// Every `callbridge_*` name in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("callbridge_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        // Only names that run to the end of a word (not `callbridge_relay::…` paths).
        if !tail[end..].starts_with("::") {
            out.insert(tail[..end].to_owned());
        }
        rest = &tail[end..];
    }
    out
}

fn files_under(rel: &str, ext: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut dirs = vec![root().join(rel)];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{dir:?}: {e}")) {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == ext) {
                let rel = path.strip_prefix(root()).expect("under root");
                out.push(rel.to_string_lossy().into_owned());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn dashboard_hpa_and_alerts_use_exported_series() {
    let code = exported();
    // What a query may name: each family's scraped name, and a histogram's series.
    let mut series: BTreeSet<String> = BTreeSet::new();
    for (name, family) in &code {
        series.insert(name.clone());
        if family.kind == "histogram" {
            for suffix in ["_bucket", "_sum", "_count"] {
                series.insert(format!("{name}{suffix}"));
            }
        }
    }
    let doc = read("docs/metrics.md");
    let alerts = doc
        .split_once("## What to alert on")
        .map(|(_, a)| a.split("\n## ").next().unwrap_or(a).to_owned())
        .expect("docs/metrics.md has an alert section");
    let mut sources = vec![("docs/metrics.md (alerts)".to_owned(), alerts)];
    sources.push((
        "deploy/grafana/callbridge-dashboard.json".to_owned(),
        read("deploy/grafana/callbridge-dashboard.json"),
    ));
    for rel in files_under("deploy/k8s", "yaml") {
        let text = read(&rel);
        sources.push((rel, text));
    }
    let mut drift = Drift::default();
    let mut used = 0;
    for (rel, text) in &sources {
        for name in metric_names(text) {
            // A recording rule or adapter alias is no series (the adapter renames
            // `…_total` to `…_per_second` with its own prefix).
            if !(name.starts_with("callbridge_relay_") || name.starts_with("callbridge_control_")) {
                continue;
            }
            used += 1;
            if !series.contains(&name) {
                drift.push(format!("{rel}: {name} is not exported by either binary"));
            }
        }
    }
    assert!(used > 10, "the queries were found ({used})");
    drift.assert_none("The dashboard, HPA and alerts");
}
